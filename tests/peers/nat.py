"""A masquerading middle namespace for NAT traversal tests (host and lab tiers).

    with natted_namespaces() as (inside, nat, outside):
        # inside: 10.0.0.1/24, default route via the NAT; outside: 192.0.2.2/24;
        # nat: 10.0.0.254 inside, PUBLIC (192.0.2.254) outside, nftables masquerade of UDP to
        # source ports 20000-20099 (so a mapping is visible), forwarding on
        nat.keepalives()          # NAT keepalives (one-octet 0xFF UDP to port 4500) it forwarded out
        nat.rebind(30000, 30099)  # new port range and conntrack flushed: every mapping changes
        nat.mappings()            # [(inside address, inside port, public port), ...] for UDP

Conntrack entries are flushed and listed over netlink (pyroute2's Conntrack, run inside the
namespace: `python -m tests.peers.nat flush|dump`); no conntrack(8) tool is needed.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from tests.netns import Netns, veth_pair
from tests.peers.topology import Side

TOP = Path(__file__).resolve().parents[2]
INSIDE4, NAT_INSIDE4, PUBLIC, OUTSIDE4 = "10.0.0.1", "10.0.0.254", "192.0.2.254", "192.0.2.2"

_RULES = """
table ip natt {{
    counter keepalives_out {{ }}
    counter keepalives_in {{ }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "nout" meta l4proto udp masquerade to :{lo}-{hi}
    }}
    chain counting {{
        type filter hook forward priority filter; policy accept;
        oifname "nout" udp dport 4500 udp length 9 @th,64,8 0xff counter name "keepalives_out"
        iifname "nout" udp sport 4500 udp length 9 @th,64,8 0xff counter name "keepalives_in"
    }}
}}
"""


class Nat:
    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.ports = (20000, 20099)

    def _ruleset(self, lo: int, hi: int) -> None:
        self.ns.run("nft delete table ip natt 2>/dev/null; true")
        self.ns.run(["nft", "-f", "-"], input=_RULES.format(lo=lo, hi=hi))
        self.ports = (lo, hi)

    def _counter(self, name: str) -> int:
        out = self.ns.run(["nft", "list", "counter", "ip", "natt", name]).stdout
        m = re.search(r"packets (\d+)", out)
        assert m, out
        return int(m.group(1))

    def keepalives(self) -> int:
        """NAT keepalives forwarded from inside to outside (RFC 3948 §2.3: UDP to 4500, 0xFF)."""
        return self._counter("keepalives_out")

    def keepalives_in(self) -> int:
        """...and from outside in (the side not behind the NAT must send none)."""
        return self._counter("keepalives_in")

    def _ct(self, what: str) -> str:
        r = subprocess.run(["ip", "netns", "exec", self.ns.name, sys.executable, "-m", "tests.peers.nat", what],
                           cwd=TOP, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"conntrack {what} in {self.ns.name} failed: {r.stderr}"
        return r.stdout

    def mappings(self) -> list[tuple[str, int, int]]:
        """UDP conntrack entries from inside: (inside address, inside port, public port)."""
        return [tuple(x) for x in json.loads(self._ct("dump"))]

    def public_port(self, inside_port: int) -> int | None:
        for addr, port, public in self.mappings():
            if addr == INSIDE4 and port == inside_port:
                return public
        return None

    def rebind(self, lo: int, hi: int) -> None:
        """What a NAT reboot or a conntrack flush does: every mapping is forgotten, and new ones
        are made from another port range (so the public port surely changes)."""
        self._ruleset(lo, hi)
        self._ct("flush")

    def set_udp_timeout(self, seconds: int) -> None:
        """How long an idle UDP mapping lives (both conntrack states)."""
        self.ns.run(["sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={seconds}",
                     f"net.netfilter.nf_conntrack_udp_timeout_stream={seconds}"])


@contextlib.contextmanager
def natted_namespaces(hint: str = "nat") -> Iterator[tuple[Side, Nat, Side]]:
    with Netns(f"{hint}i") as ni, Netns(f"{hint}n") as nn, Netns(f"{hint}o") as no:
        veth_pair(ni, "vi", nn, "nin")
        veth_pair(nn, "nout", no, "vo")
        inside = Side(ni, "vi", INSIDE4, "fd00:10::1")
        outside = Side(no, "vo", OUTSIDE4, "2001:db8::2")
        ni.run(["ip", "addr", "add", f"{INSIDE4}/24", "dev", "vi"])
        ni.run(["ip", "route", "add", "default", "via", NAT_INSIDE4])
        nn.run(["ip", "addr", "add", f"{NAT_INSIDE4}/24", "dev", "nin"])
        nn.run(["ip", "addr", "add", f"{PUBLIC}/24", "dev", "nout"])
        no.run(["ip", "addr", "add", f"{OUTSIDE4}/24", "dev", "vo"])
        nn.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        nat = Nat(nn)
        nat._ruleset(20000, 20099)
        deadline = time.monotonic() + 5   # (only UDP is masqueraded: no ping to wait with)
        while time.monotonic() < deadline and any(
                "LOWER_UP" not in ns.run(["ip", "link", "show", ifname]).stdout
                for ns, ifname in ((ni, "vi"), (nn, "nin"), (nn, "nout"), (no, "vo"))):
            time.sleep(0.05)
        yield inside, nat, outside


def _main(what: str) -> int:
    from pyroute2 import Conntrack

    ct = Conntrack()
    try:
        if what == "flush":
            ct.flush()
            return 0
        out = []
        for e in ct.dump_entries():
            o, r = e.tuple_orig, e.tuple_reply
            if o.proto == 17 and o.saddr == INSIDE4:
                out.append((o.saddr, o.sport, r.dport))
        print(json.dumps(out))
        return 0
    finally:
        ct.close()


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
