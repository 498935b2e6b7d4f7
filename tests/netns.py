"""Network namespaces for tests (host tier and lab tier): created with unique names, always removed."""

from __future__ import annotations

import itertools
import os
import subprocess
from typing import Sequence

_counter = itertools.count()


def sh(cmd: str | Sequence[str], ns: str | None = None, check: bool = True, timeout: float = 60,
       input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command (a shell string or argv), optionally inside network namespace `ns`."""
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise AssertionError(f"command failed ({r.returncode}) in {ns or 'root ns'}: {cmd}\n"
                             f"stdout: {r.stdout}\nstderr: {r.stderr}")
    return r


class Netns:
    """A network namespace with a unique name; `with Netns("a") as a:` deletes it afterwards."""

    def __init__(self, hint: str):
        self.name = f"ist-{hint}-{os.getpid()}-{next(_counter)}"

    def __enter__(self) -> "Netns":
        sh(["ip", "netns", "add", self.name])
        sh(["ip", "link", "set", "lo", "up"], ns=self.name)
        return self

    def __exit__(self, *exc) -> None:
        sh(["ip", "netns", "del", self.name], check=False)

    def __str__(self) -> str:
        return self.name

    def run(self, cmd: str | Sequence[str], **kw) -> subprocess.CompletedProcess:
        return sh(cmd, ns=self.name, **kw)


def veth_pair(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """A veth link with one end in each namespace, both ends up."""
    tmp = f"vt{os.getpid() % 10000}{next(_counter)}"
    sh(["ip", "link", "add", tmp, "type", "veth", "peer", "name", tmp + "p"])
    sh(["ip", "link", "set", tmp, "netns", a.name, "name", a_if])
    sh(["ip", "link", "set", tmp + "p", "netns", b.name, "name", b_if])
    a.run(["ip", "link", "set", a_if, "up"])
    b.run(["ip", "link", "set", b_if, "up"])
