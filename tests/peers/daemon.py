"""Shared plumbing for the routing-daemon peers (BIRD, FRR): a foreground process in a network
namespace with a private work directory, waiting helpers, and cleanup at interpreter exit."""

from __future__ import annotations

import atexit
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

_RUNNING: set["Daemon"] = set()


@atexit.register
def _kill_leftovers() -> None:
    for d in list(_RUNNING):
        d.kill()


class PeerError(AssertionError):
    """A peer daemon failed or a wait timed out; the message carries the daemon's log."""


@dataclass(frozen=True)
class BgpNeighbor:
    """A BGP neighbor (RFC 4271) as seen from the daemon being configured."""

    address: str
    remote_as: int
    local_address: str | None = None
    passive: bool = False
    hold_time: int | None = None    # seconds; keepalive = hold/3


class Daemon:
    """A foreground daemon in namespace `ns`, its output in `<workdir>/<name>.out`."""

    name = "daemon"

    def __init__(self, workdir: Path | str, ns: str | None = None):
        self.workdir = Path(workdir)
        self.ns = str(ns) if ns is not None else None
        self.proc: subprocess.Popen | None = None

    @property
    def out_path(self) -> Path:
        return self.workdir / f"{self.name}.out"

    def argv_in_ns(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv] if self.ns else list(argv)

    def spawn(self, argv: Sequence[str]) -> None:
        out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(self.argv_in_ns(argv), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        _RUNNING.add(self)

    def run(self, argv: Sequence[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv_in_ns(argv), capture_output=True, text=True, timeout=timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        return f"--- {self.name} output (tail) ---\n" + "\n".join(self.output().splitlines()[-40:])

    def wait_until(self, fn: Callable[[], T], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise PeerError(f"{self.name} exited ({self.proc.returncode}) while waiting for {what}\n"
                                + self.diagnostics())
            got = fn()
            if got:
                return got
            if time.monotonic() > deadline:
                raise PeerError(f"{self.name}: timed out after {timeout} s waiting for {what}\n" + self.diagnostics())
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _RUNNING.discard(self)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _RUNNING.discard(self)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.kill()

    def __exit__(self, *exc) -> None:
        self.close()
