"""Two network namespaces joined by veth, the ground of every interop test.

    with pair_of_namespaces() as (a, b):     # a: 192.0.2.1/24 + 2001:db8::1/64, b: .2 / ::2
        ...

The same helper runs on the host (tests/host/) and inside the lab guest (tests/lab/).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

from tests.netns import Netns, veth_pair


@dataclass(frozen=True)
class Side:
    ns: Netns
    ifname: str
    addr4: str
    addr6: str

    @property
    def name(self) -> str:
        return self.ns.name


@contextlib.contextmanager
def pair_of_namespaces(hint: str = "ike") -> Iterator[tuple[Side, Side]]:
    with Netns(f"{hint}a") as na, Netns(f"{hint}b") as nb:
        veth_pair(na, "va", nb, "vb")
        a = Side(na, "va", "192.0.2.1", "2001:db8::1")
        b = Side(nb, "vb", "192.0.2.2", "2001:db8::2")
        for s in (a, b):
            s.ns.run(["ip", "addr", "add", f"{s.addr4}/24", "dev", s.ifname])
            s.ns.run(["ip", "addr", "add", f"{s.addr6}/64", "dev", s.ifname, "nodad"])
        # IPv6 addresses with nodad are usable at once; give the link a moment to be up.
        deadline = time.monotonic() + 5
        while "LOWER_UP" not in a.ns.run(["ip", "link", "show", "va"]).stdout and time.monotonic() < deadline:
            time.sleep(0.05)
        yield a, b
