"""ExaBGP as a supervised child process, and the API pipe to it.

:class:`Speaker` (asyncio, the route manager's loop):

* serves a unix socket; ExaBGP's API process is :mod:`bgp.relay`, which connects to it;
* starts ``exabgp server CONF`` (optionally inside a network namespace via ``ip netns exec``,
  with ``PR_SET_PDEATHSIG`` so it never outlives isthmusd) and restarts it with back-off
  (1 s doubling to 30 s, back to 1 s once a run lasted 30 s) whenever it exits or its relay's
  connection drops (a relay reconnecting to a running ExaBGP would have missed messages: a
  fresh ExaBGP is the one state we can resynchronise from);
* reads every line ExaBGP writes, at once, always (acknowledgements included: ExaBGP answers
  each command with ``done`` or ``error`` and stalls if nobody reads) and hands each parsed
  message to ``on_message``; commands that ExaBGP refused are logged with the command;
* :meth:`configure` writes the configuration atomically and sends SIGUSR1: ExaBGP 5 reloads,
  starts new neighbors, stops removed ones, re-establishes only changed ones (the others keep
  their sessions - checked by tests/host/test_route_manager.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bgp import exabgp

log = logging.getLogger("isthmus.bgp.speaker")

RESTART_FIRST = 1.0
RESTART_MAX = 30.0
STABLE_AFTER = 30.0
STOP_WAIT = 5.0
PR_SET_PDEATHSIG = 1
RELOAD_CHECK = 0.5             # seconds before checking that ExaBGP reloaded
RELOAD_TRIES = 20


def _pdeathsig() -> None:   # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setpgrp()


class Speaker:
    def __init__(self, workdir: str | os.PathLike[str], *, on_message: Callable[[exabgp.ApiMessage], None],
                 on_connected: Callable[[], None], on_disconnected: Callable[[], None],
                 neighbor_name: Callable[[Any], str] | None = None, netns: str | None = None,
                 exabgp_argv: list[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.on_message, self.on_connected, self.on_disconnected = on_message, on_connected, on_disconnected
        self.neighbor_name = neighbor_name
        self.netns = netns
        self.exabgp_argv = exabgp_argv or [sys.executable, "-m", "exabgp"]
        self.conf_path = self.workdir / "exabgp.conf"
        self.log_path = self.workdir / "exabgp.log"
        sock = self.workdir / "api.sock"
        if len(str(sock)) > 100:     # sun_path is 108 bytes
            sock = Path(tempfile.mkdtemp(prefix="isthmus-bgp-")) / "api.sock"
        self.socket_path = sock
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0            # ExaBGP processes started after the first
        self.starts = 0
        self.acks_ok = 0
        self.acks_error = 0
        self.lines = 0
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sent: deque[str] = deque()
        self._config_text = ""
        self._loaded_text = ""          # the configuration the running ExaBGP has read
        self._log_offset = 0
        self._reload_tries = 0
        self._reload_check: asyncio.TimerHandle | None = None
        self.reloads = 0
        self._stopping = False
        self._supervisor: asyncio.Task | None = None
        self._conn_task: asyncio.Task | None = None
        self._backoff = RESTART_FIRST
        self._exited = asyncio.Event()

    # ------------------------------------------------------------------ life cycle
    @property
    def connected(self) -> bool:
        return self._writer is not None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def pending_acks(self) -> int:
        return len(self._sent)

    def relay_argv(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("relay.py")), str(self.socket_path)]

    async def start(self, config_text: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config(config_text)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._connection, path=str(self.socket_path),
                                                       limit=exabgp.MAX_LINE)
        os.chmod(self.socket_path, 0o600)
        self._supervisor = asyncio.ensure_future(self._supervise())

    async def stop(self) -> None:
        self._stopping = True
        if self._reload_check is not None:
            self._reload_check.cancel()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
        await self._terminate()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_WAIT)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def _write_config(self, text: str) -> None:
        self._config_text = text
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        tmp.replace(self.conf_path)

    def configure(self, config_text: str) -> bool:
        """New configuration: written, and ExaBGP told to reload (SIGUSR1). False if unchanged."""
        if config_text == self._config_text:
            return False
        self._write_config(config_text)
        # before its API process connected, ExaBGP may not have its signal handlers yet (SIGUSR1
        # would kill it): the connection handler sends the reload then
        if self.pid is not None and self._writer is not None:
            self._reload()
        return True

    def _reload(self) -> None:
        """SIGUSR1, until ExaBGP's log shows a reload that began after it. ExaBGP 5.0.15 drops a
        reload signal that arrives while an announcement is still queued for a peer (the loop
        re-arms the signal before it checks for pending updates), so one signal is not enough."""
        if self.pid is None:
            return
        self._loaded_text = self._config_text
        try:
            self._log_offset = self.log_path.stat().st_size
        except OSError:
            self._log_offset = 0
        self._reload_tries = 0
        self._signal_reload()
        log.info("ExaBGP configuration changed: reload requested")

    def _signal_reload(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGUSR1)
        self._reload_tries += 1
        if self._reload_check is not None:
            self._reload_check.cancel()
        self._reload_check = asyncio.get_running_loop().call_later(RELOAD_CHECK, self._check_reload)

    def _check_reload(self) -> None:
        self._reload_check = None
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                seen = b"performing reload" in f.read()
        except OSError:
            seen = True       # no log to read: trust the signal
        if seen:
            self.reloads += 1
            return
        if self._reload_tries >= RELOAD_TRIES:
            log.error("ExaBGP did not reload after %d signals; restarting it", self._reload_tries)
            self.kill_exabgp(signal.SIGTERM)
            return
        log.info("ExaBGP has not reloaded yet (a signal it dropped): signalling again")
        self._signal_reload()

    async def _spawn(self) -> None:
        argv = [*self.exabgp_argv, "server", str(self.conf_path)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        env = dict(os.environ, **exabgp.exabgp_env(str(self.log_path)))
        self._exited.clear()
        self._loaded_text = self._config_text
        self.proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=open(self.workdir / "exabgp.out", "ab"), preexec_fn=_pdeathsig)
        self.starts += 1
        if self.starts > 1:
            self.restarts += 1
        log.info("ExaBGP started (pid %d)%s", self.proc.pid, f" in netns {self.netns}" if self.netns else "")

    async def _supervise(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._spawn()
            except OSError as e:
                log.error("ExaBGP cannot be started: %s", e)
            else:
                rc = await self.proc.wait()
                if self._stopping:
                    return
                log.error("ExaBGP exited (status %s); restarting in %.0f s", rc,
                          RESTART_FIRST if time.monotonic() - started >= STABLE_AFTER else self._backoff)
            self._drop_connection()
            if time.monotonic() - started >= STABLE_AFTER:
                self._backoff = RESTART_FIRST
            await asyncio.sleep(self._backoff)
            self._backoff = min(RESTART_MAX, self._backoff * 2)

    def kill_exabgp(self, sig: int = signal.SIGKILL) -> None:
        """Signal the running ExaBGP (tests, and a relay connection lost under a live ExaBGP)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    # ------------------------------------------------------------------ the API connection
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            log.warning("a second ExaBGP API connection refused")
            writer.close()
            return
        self._writer = writer
        self._sent.clear()
        log.info("ExaBGP API process connected")
        if self._loaded_text != self._config_text:
            self._reload()
        try:
            self.on_connected()
        except Exception:  # noqa: BLE001
            log.exception("resynchronising after the ExaBGP connection failed")
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:       # longer than the limit: asyncio dropped it
                    exabgp.STATS.malformed += 1
                    log.warning("ExaBGP API: a line longer than %d bytes ignored", exabgp.MAX_LINE)
                    continue
                except (ConnectionError, OSError):
                    break
                if not line:
                    break
                self.lines += 1
                self._handle(line)
        finally:
            if self._writer is writer:
                self._drop_connection()
                if not self._stopping and self.pid is not None:
                    log.error("ExaBGP's API connection dropped while ExaBGP runs: restarting ExaBGP")
                    self.kill_exabgp(signal.SIGTERM)

    def _drop_connection(self) -> None:
        w, self._writer = self._writer, None
        if w is None:
            return
        with contextlib.suppress(Exception):
            w.close()
        self._sent.clear()
        try:
            self.on_disconnected()
        except Exception:  # noqa: BLE001
            log.exception("handling the ExaBGP disconnection failed")

    def _handle(self, line: bytes) -> None:
        msg = exabgp.parse_line(line, self.neighbor_name)
        if msg is None:
            return
        if msg.kind == "ack":
            cmd = self._sent.popleft() if self._sent else "?"
            if msg.ok:
                self.acks_ok += 1
            else:
                self.acks_error += 1
                log.error("ExaBGP refused a command: %s", cmd)
            return
        try:
            self.on_message(msg)
        except Exception:  # noqa: BLE001 - a bug handling one message must not stop the reader
            log.exception("handling an ExaBGP %s message failed", msg.kind)

    def send(self, command: str) -> bool:
        """Send one API command; False (dropped) while ExaBGP is not connected - the resync on
        the next connection covers it."""
        if self._writer is None:
            return False
        if "\n" in command:
            raise ValueError("an ExaBGP command is one line")
        self._sent.append(command)
        self._writer.write(command.encode() + b"\n")
        return True

    async def drain(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()
