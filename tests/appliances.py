"""Real `isthmusd` processes for the host and lab tiers: each appliance in its own network namespace
with its own config directory, run directory and log file.

The control socket is a unix socket in the run directory - a file path, reachable from any
namespace - so the tests talk to each daemon with :class:`appliance.control.ControlClient` (or run
the real `isthmus` CLI) without entering its namespace. Metrics are read through a TCP socket
opened inside the namespace.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from appliance.control import ControlClient, DaemonUnreachable, RemoteError

T = TypeVar("T")

_RUNNING: set["Appliance"] = set()


@atexit.register
def _kill_leftovers() -> None:
    for a in list(_RUNNING):
        a.kill()


class ApplianceError(AssertionError):
    """A daemon failed or a wait timed out; the message carries the end of the daemon's log."""


def wait_for(what: str, fn: Callable[[], T], timeout: float = 60.0, interval: float = 0.1,
             log_of: "Appliance | None" = None) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (DaemonUnreachable, ConnectionError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    tail = f"\n--- log of {log_of.name}:\n{log_of.log_tail()}" if log_of is not None else ""
    raise ApplianceError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r}){tail}")


class Appliance:
    """One `isthmusd` in namespace `ns`, files under `workdir`."""

    def __init__(self, name: str, ns: str | None, workdir: Path, *, metrics_port: int = 9477):
        self.name = name
        self.ns = ns
        self.workdir = Path(workdir)
        self.etc = self.workdir / "etc"
        self.run_dir = self.workdir / "run"
        self.config_path = self.etc / "isthmus.yaml"
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.logs: list[Path] = []          # every log file of every start
        self.cli_output: list[str] = []     # everything the CLI printed for this appliance
        self.etc.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)

    # ------------------------------------------------------------------ files
    def write_psk(self, name: str, value: str, mode: int = 0o600) -> Path:
        d = self.etc / "secrets"
        d.mkdir(mode=0o700, exist_ok=True)
        path = d / name
        path.write_text(value + "\n")
        os.chmod(path, mode)
        return path

    def write_config(self, text: str, path: Path | None = None) -> Path:
        path = path or self.config_path
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    # ------------------------------------------------------------------ process
    def argv(self) -> list[str]:
        cmd = [sys.executable, "-m", "appliance.daemon", "--config", str(self.config_path),
               "--run-dir", str(self.run_dir), "--log-format", "json", "--log-level", "debug",
               "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--hooks-dir", str(self.etc / "hooks")]
        return (["ip", "netns", "exec", self.ns] if self.ns else []) + cmd

    def start(self, *, wait: bool = True, timeout: float = 120.0, env: dict[str, str] | None = None) -> "Appliance":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log_path = self.workdir / f"isthmusd-{len(self.logs) + 1}.log"
        self.logs.append(log_path)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        _RUNNING.add(self)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> dict:
        def ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise ApplianceError(f"{self.name}: isthmusd exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                return self.call("status", timeout=2)
            except RemoteError as e:
                if e.code == "unavailable":   # still starting
                    return None
                raise
        return wait_for(f"{self.name} to answer on its control socket", ready, timeout, 0.2, self)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the daemon and wait for it; returns its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise ApplianceError(f"{self.name}: isthmusd did not exit within {timeout:.0f} s of signal {sig}:\n"
                                 f"{self.log_tail()}") from None
        self._closed()
        return rc

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind (the kernel keeps what the daemon made)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._closed()

    def _closed(self) -> None:
        _RUNNING.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def pid(self) -> int | None:
        path = self.run_dir / "isthmusd.pid"
        return int(path.read_text()) if path.exists() else None

    # ------------------------------------------------------------------ talking to it
    def client(self, timeout: float = 30.0) -> ControlClient:
        return ControlClient(self.run_dir, timeout=timeout)

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> Any:
        with self.client(timeout) as c:
            return c.call(method, **params)

    def cli(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """The real `isthmus` CLI (a new Python process) against this daemon."""
        r = subprocess.run([sys.executable, "-m", "appliance.cli", "--run-dir", str(self.run_dir), *args],
                           capture_output=True, text=True, timeout=timeout)
        self.cli_output.append(r.stdout + r.stderr)
        if check and r.returncode != 0:
            raise ApplianceError(f"{self.name}: isthmus {' '.join(args)} exited {r.returncode}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def metrics(self, timeout: float = 10.0) -> str:
        """GET /metrics from inside the daemon's namespace."""
        if self.ns:
            from pyroute2 import netns as pyroute2_netns
            s = pyroute2_netns.create_socket(netns=self.ns, family=socket.AF_INET, socket_type=socket.SOCK_STREAM,
                                             flags=0)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with s:
            s.settimeout(timeout)
            s.connect(("127.0.0.1", self.metrics_port))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        text = body.decode()
        self.cli_output.append(text)
        return text

    # ------------------------------------------------------------------ logs
    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"message": line, "level": "raw"})
        return out

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ------------------------------------------------------------------ state
    def sas(self, tunnel: str | None = None) -> dict:
        return self.call("sas", **({"tunnel": tunnel} if tunnel else {}))

    def tunnel(self, name: str) -> dict:
        rows = {t["name"]: t for t in self.call("tunnels")["tunnels"]}
        return rows[name]

    def wait_tunnel_up(self, name: str, timeout: float = 120.0) -> dict:
        return wait_for(f"{self.name}: tunnel {name} up", lambda: (t := self.tunnel(name))["state"] == "up" and t,
                        timeout, 0.2, self)

    def installed_child(self, tunnel: str) -> dict | None:
        """The Child SA of `tunnel` that carries traffic (installed both ways)."""
        rows = [c for c in self.sas(tunnel)["child_sas"] if c["state"] == "installed"]
        return rows[-1] if rows else None
