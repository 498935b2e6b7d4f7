"""Our IKE engine as a process in a network namespace (appliance/ikerunner.py), for host tests:

    with EngineProc(tmp_path / "a", side_a, config) as a:
        up = a.wait_event(lambda e: e["event"] == "ChildSaInstalled")
        a.send("rekey_child to-b")

Events arrive as dicts (ikerunner.event_to_json: bytes hex, keys as SHA-256 fingerprints).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from tests.peers.topology import Side

TOP = Path(__file__).resolve().parents[2]


def tunnel_json(side: Side, peer: Side, name: str, *, local_id: str, remote_id: str, psk: bytes,
                **kw) -> dict:
    d = {"name": name, "local_addr": side.addr4, "remote_addr": peer.addr4, "local_id": local_id,
         "remote_id": remote_id, "psk_hex": psk.hex(), "if_id": 42, "start": True}
    d.update(kw)
    return d


class EngineProc:
    def __init__(self, workdir: Path, side: Side, tunnels: list[dict], *, listen: list[dict] | None = None,
                 log_level: str = "INFO", extra: dict | None = None, dos: dict | None = None) -> None:
        self.workdir = workdir
        self.side = side
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = {"listen": listen or [{"address": side.addr4, "port": 500},
                                    {"address": side.addr4, "port": 4500, "natt": True}],
               "tunnels": tunnels, **(extra or {})}
        if dos is not None:    # DosProtection's fields; None (JSON null) is "no limit"
            cfg["dos"] = dos
        self.config_path = workdir / "ikerunner.json"
        self.config_path.write_text(json.dumps(cfg))
        self.config_path.chmod(0o600)
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self.stderr_path = workdir / "ikerunner.log"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", side.name, sys.executable, "-m", "appliance.ikerunner",
             str(self.config_path), "--log-level", log_level],
            cwd=TOP, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_event(lambda e: e["event"] == "ready", 15, what="runner ready")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(e)
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_event(self, pred: Callable[[dict], bool], timeout: float = 15, *, since: int = 0,
                   what: str = "event") -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events[since:]:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"{what} not seen within {timeout} s; events: "
                                         f"{[x['event'] for x in self.events]}\nlog:\n{self.log_tail()}")
                self._cond.wait(min(left, 0.2))

    def of(self, kind: str, since: int = 0) -> list[dict]:
        with self._cond:
            return [e for e in self.events[since:] if e["event"] == kind]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def status(self, timeout: float = 15) -> dict:
        """The runner's `status` answer (IKE SAs, half-open count, COOKIE state, DoS counters)."""
        since = self.mark()
        self.send("status")
        return self.wait_event(lambda e: e["event"] == "status", timeout, since=since, what="status")

    def log_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()

    def kill(self) -> None:
        """SIGKILL the runner (for dead peer detection tests); `ip netns exec` execs python,
        so the child is the runner itself."""
        self.proc.kill()
        self.proc.wait(5)

    def __enter__(self) -> "EngineProc":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
