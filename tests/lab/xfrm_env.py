"""Two regions for the XFRM lab tests, and ways to look at their kernels without our own code.

Namespace A and namespace B are joined by an underlay link ``wan`` with IPv4 and IPv6 addresses;
each runs a :class:`~appliance.xfrm.Dataplane` with one tunnel (A: ``to-b`` on ``xfrm-b``, B:
``to-a`` on ``xfrm-a``). Namespace C is a client on a LAN behind A, so that traffic *forwarded*
through the tunnel (MSS clamping) can be produced. Both regions hold UDP 4500 sockets marked for
ESP-in-UDP, as the IKE daemon's NAT-T socket would be.

The observers (:func:`xfrm_states`, :func:`xfrm_policies`, :func:`link`, :func:`clamp_rules`,
:func:`ping`, :class:`Capture`, the ``probe`` nft counters on B's underlay) use iproute2, nft,
ping and tcpdump, never the code under test.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from pyroute2 import netns as pyroute2_netns

from appliance.xfrm import ChildSa, Dataplane, Endpoints, EspAlgorithms, Lifetime, SaKeys, TunnelInterface, UdpEncap
from appliance.xfrm.model import CIPHERS, INTEGRITY
from appliance.xfrm.natt import open_natt_socket
from tests.netns import Netns, sh, veth_pair

WAN4 = ("192.0.2.1", "192.0.2.2")
WAN6 = ("2001:db8:1::1", "2001:db8:1::2")
WAN4_MOVED = "192.0.2.11"          # A's second underlay address (MOBIKE)
INNER4 = ("169.254.21.1", "169.254.21.2")
INNER6 = ("fd00:21::1", "fd00:21::2")
LAN4 = ("10.1.0.1", "10.1.0.2")     # A's LAN address, client C's address
LAN6 = ("fd00:1::1", "fd00:1::2")

A_TUNNEL, A_IF = "to-b", "xfrm-b"
B_TUNNEL, B_IF = "to-a", "xfrm-a"

_spis = itertools.count(0x10000)

PROBE_NFT = """
table inet probe {
    counter wire_esp {}
    counter wire_natt {}
    counter wire_clear {}
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        iifname "wan" meta l4proto esp counter name "wire_esp"
        iifname "wan" udp dport 4500 counter name "wire_natt"
        iifname "wan" meta l4proto { tcp, icmp } counter name "wire_clear"
        iifname "wan" icmpv6 type { echo-request, echo-reply } counter name "wire_clear"
    }
}
"""


def a_iface(**kw) -> TunnelInterface:
    return TunnelInterface(A_TUNNEL, A_IF, addresses=(f"{INNER4[0]}/30", f"{INNER6[0]}/126"), **kw)


def b_iface(**kw) -> TunnelInterface:
    return TunnelInterface(B_TUNNEL, B_IF, addresses=(f"{INNER4[1]}/30", f"{INNER6[1]}/126"), **kw)


def random_keys(alg: EspAlgorithms) -> SaKeys:
    cipher = CIPHERS[alg.encryption]
    bits = alg.key_bits or cipher.key_bits[-1]
    integ = os.urandom(INTEGRITY[alg.integrity].key_bytes) if alg.integrity else b""
    return SaKeys(os.urandom(bits // 8 + cipher.salt_bytes), integ)


def child_pair(proposal: str | EspAlgorithms, outer: int = 4, encap: bool = False, esn: bool = False,
               replay_window: int = 64, lifetime_a: Lifetime = Lifetime(), a_local: str | None = None,
               ) -> tuple[ChildSa, ChildSa]:
    """Matching Child SAs for A and B: A's outbound keys are B's inbound keys and vice versa."""
    alg = proposal if isinstance(proposal, EspAlgorithms) else EspAlgorithms.from_proposal(proposal)
    wan = WAN4 if outer == 4 else WAN6
    la, lb = a_local or wan[0], wan[1]
    k_ab, k_ba = random_keys(alg), random_keys(alg)
    spi_a, spi_b = next(_spis), next(_spis)
    udp = UdpEncap() if encap else None
    ca = ChildSa(spi_in=spi_a, spi_out=spi_b, algorithms=alg, keys_in=k_ba, keys_out=k_ab,
                 endpoints=Endpoints(la, lb, udp), esn=esn, replay_window=replay_window, lifetime=lifetime_a)
    cb = ChildSa(spi_in=spi_b, spi_out=spi_a, algorithms=alg, keys_in=k_ab, keys_out=k_ba,
                 endpoints=Endpoints(lb, la, udp), esn=esn, replay_window=replay_window)
    return ca, cb


class Lab:
    """Namespaces A, B, C; a Dataplane in A and in B (kwargs_a / kwargs_b go to the Dataplanes)."""

    def __init__(self, kwargs_a: dict | None = None, kwargs_b: dict | None = None,
                 iface_a: TunnelInterface | None = None, iface_b: TunnelInterface | None = None):
        self._stack: list = []
        try:
            self.a = self._enter(Netns("a"))
            self.b = self._enter(Netns("b"))
            self.c = self._enter(Netns("c"))
            veth_pair(self.a, "wan", self.b, "wan")
            veth_pair(self.a, "lan", self.c, "lan")
            for ns, i in ((self.a, 0), (self.b, 1)):
                ns.run(f"ip addr add {WAN4[i]}/24 dev wan && ip addr add {WAN6[i]}/64 dev wan nodad")
            self.a.run(f"ip addr add {WAN4_MOVED}/24 dev wan")
            self.a.run(f"ip addr add {LAN4[0]}/24 dev lan && ip addr add {LAN6[0]}/64 dev lan nodad")
            self.c.run(f"ip addr add {LAN4[1]}/24 dev lan && ip addr add {LAN6[1]}/64 dev lan nodad && "
                       f"ip route add default via {LAN4[0]} && ip -6 route add default via {LAN6[0]}")
            for ns in (self.a, self.b):
                ns.run("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
            self.b.run("nft -f -", input=PROBE_NFT)
            self.natt = [open_natt_socket(fam, netns=ns.name) for ns in (self.a, self.b)
                         for fam in (socket.AF_INET, socket.AF_INET6)]
            self.iface_a = iface_a or a_iface()
            self.iface_b = iface_b or b_iface()
            self.dpa = Dataplane(self.a.name, **(kwargs_a or {}))
            self.dpb = Dataplane(self.b.name, **(kwargs_b or {}))
            self.dpa.reconcile([self.iface_a])
            self.dpb.reconcile([self.iface_b])
        except BaseException:
            self.close()
            raise

    def _enter(self, ns: Netns) -> Netns:
        ns.__enter__()
        self._stack.append(ns)
        return ns

    def close(self) -> None:
        for obj in ("dpa", "dpb"):
            dp = getattr(self, obj, None)
            if dp is not None:
                dp.close()
        for s in getattr(self, "natt", []):
            s.close()
        for ns in reversed(self._stack):
            ns.__exit__(None, None, None)

    def up(self, ca: ChildSa, cb: ChildSa) -> None:
        self.dpa.install(A_TUNNEL, ca)
        self.dpb.install(B_TUNNEL, cb)
        # B reaches the client LAN behind A through the tunnel (routes go with the interface state)
        self.b.run(f"ip route replace {LAN4[0].rsplit('.', 1)[0]}.0/24 dev {B_IF} && "
                   f"ip -6 route replace fd00:1::/64 dev {B_IF}")

    def down(self) -> None:
        self.dpa.down(A_TUNNEL)
        self.dpb.down(B_TUNNEL)

    def probe_counters(self) -> dict[str, int]:
        doc = json.loads(self.b.run("nft -j list counters table inet probe").stdout)
        return {item["counter"]["name"].removeprefix("wire_"): item["counter"]["packets"] for item in doc["nftables"] if "counter" in item}

    def reset_probe(self) -> None:
        self.b.run("nft reset counters table inet probe >/dev/null")


# --- observers (iproute2, nft, ping, tcpdump) --------------------------------------------------------


def xfrm_states(ns: Netns) -> list[dict]:
    """SAs as `ip -s xfrm state` shows them."""
    out = ns.run("ip -s xfrm state").stdout
    states = []
    for block in re.split(r"\n(?=src )", out.strip()):
        if not block.startswith("src "):
            continue
        m = re.match(r"src (\S+) dst (\S+)", block)
        st = {"src": m.group(1), "dst": m.group(2)}
        st["spi"] = int(re.search(r"spi (0x[0-9a-f]+)", block).group(1), 16)
        ifid = re.search(r"if_id (0x[0-9a-f]+)", block)
        st["if_id"] = int(ifid.group(1), 16) if ifid else 0
        cur = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", block)
        st["bytes"], st["packets"] = (int(cur.group(1)), int(cur.group(2))) if cur else (0, 0)
        enc = re.search(r"encap type (\S+) sport (\d+) dport (\d+)", block)
        st["encap"] = (enc.group(1), int(enc.group(2)), int(enc.group(3))) if enc else None
        alg = re.search(r"\n\s*(aead|enc) (\S+)", block)
        st["alg"] = alg.group(2) if alg else None
        flags = re.search(r"\bflag ([a-z0-9\- ]+)", block)
        st["flags"] = set(flags.group(1).split()) if flags else set()
        states.append(st)
    return states


def xfrm_policies(ns: Netns) -> list[dict]:
    """Policies as `ip xfrm policy` shows them."""
    out = ns.run("ip xfrm policy").stdout
    pols = []
    for block in re.split(r"\n(?=src )", out.strip()):
        if not block.startswith("src "):
            continue
        m = re.match(r"src (\S+) dst (\S+)", block)
        p = {"src": m.group(1), "dst": m.group(2), "dir": re.search(r"dir (\w+)", block).group(1)}
        ifid = re.search(r"if_id (0x[0-9a-f]+)", block)
        p["if_id"] = int(ifid.group(1), 16) if ifid else 0
        t = re.search(r"tmpl src (\S+) dst (\S+)", block)
        p["tmpl"] = (t.group(1), t.group(2)) if t else None
        pols.append(p)
    return pols


def link(ns: Netns, ifname: str) -> dict | None:
    """An interface as `ip -d -j link show` reports it (None if absent)."""
    r = ns.run(f"ip -d -j link show dev {ifname}", check=False)
    if r.returncode != 0:
        return None
    info = json.loads(r.stdout)[0]
    data = info.get("linkinfo", {}).get("info_data", {})
    if_id = data.get("if_id")
    return {"ifname": info["ifname"], "mtu": info["mtu"], "up": "UP" in info["flags"],
            "kind": info.get("linkinfo", {}).get("info_kind"),
            "if_id": int(if_id, 0) if isinstance(if_id, str) else if_id,
            "alias": info.get("ifalias"), "ifindex": info["ifindex"]}


def xfrm_links(ns: Netns) -> list[dict]:
    out = json.loads(ns.run("ip -d -j link show type xfrm").stdout or "[]")
    return sorted((link(ns, i["ifname"]) for i in out), key=lambda d: d["ifname"])


def addresses(ns: Netns, ifname: str) -> set[str]:
    info = json.loads(ns.run(f"ip -j addr show dev {ifname}").stdout)[0]
    return {f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", []) if a.get("scope") != "link"}


def clamp_rules(ns: Netns) -> list[str]:
    """The rules of our nft table, as text lines (empty list: table without rules; None: no table)."""
    r = ns.run("nft list table inet isthmus", check=False)
    if r.returncode != 0:
        return None
    return [line.strip() for line in r.stdout.splitlines() if "maxseg" in line]


def kernel_snapshot(ns: Netns) -> dict:
    """Everything our code could have touched, for before/after comparisons."""
    return {
        "states": sorted((s["src"], s["dst"], s["spi"], s["if_id"]) for s in xfrm_states(ns)),
        "policies": sorted((p["dir"], p["src"], p["dst"], p["if_id"], p["tmpl"]) for p in xfrm_policies(ns)),
        "links": [(l["ifname"], l["if_id"], l["up"], l["mtu"]) for l in xfrm_links(ns)],
        "clamps": clamp_rules(ns),
    }


@dataclass
class PingResult:
    transmitted: int
    received: int
    text: str


def ping(ns: Netns, dst: str, count: int = 3, size: int = 56, interval: float = 0.05, df: bool = False,
         wait: float = 2) -> PingResult:
    opts = f"-c {count} -s {size} -i {interval} -W {wait}" + (" -M do" if df else "")
    r = ns.run(f"ping -n {opts} {dst}", check=False, timeout=count * interval + wait + 30)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    return PingResult(int(m.group(1)) if m else 0, int(m.group(2)) if m else 0, r.stdout + r.stderr)


def kernel_pmtu(ns: Netns, ifname: str, dst: str, mtu_back: int) -> int | None:
    """The inner MTU the kernel itself derives for the tunnel: with the interface MTU lifted to
    1500, a 1500-byte DF ping is refused by the XFRM output path with the ESP MTU in the error."""
    ns.run(f"ip link set {ifname} mtu 1500 && ip route flush cache")
    try:
        res = ping(ns, dst, count=1, size=1472, df=True, wait=1)
    finally:
        ns.run(f"ip link set {ifname} mtu {mtu_back} && ip route flush cache")
    m = re.search(r"mtu ?[=:]? ?(\d+)", res.text)
    return int(m.group(1)) if m else None


def tcp_retransmitted_segments(ns: Netns) -> int:
    """The namespace's TCP RetransSegs counter (RFC 4022 tcpRetransSegs; IPv4 and IPv6 share it)."""
    lines = [line.split() for line in ns.run("cat /proc/net/snmp").stdout.splitlines() if line.startswith("Tcp:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("RetransSegs")])


def tcp_transfer(server_ns: Netns, server_addr: str, client_ns: Netns, size: int, port: int = 5001) -> None:
    """Send `size` bytes over TCP from client_ns to server_addr (in server_ns) and check them."""
    fam = socket.AF_INET6 if ":" in server_addr else socket.AF_INET
    payload = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    payload = payload[:size]
    srv = pyroute2_netns.create_socket(netns=server_ns.name, family=fam, socket_type=socket.SOCK_STREAM, flags=0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((server_addr, port))
    srv.listen(1)
    srv.settimeout(60)
    got = hashlib.sha256()
    count = [0]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = srv.accept()
            conn.settimeout(60)
            with conn:
                while True:
                    d = conn.recv(65536)
                    if not d:
                        break
                    got.update(d)
                    count[0] += len(d)
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    cli = pyroute2_netns.create_socket(netns=client_ns.name, family=fam, socket_type=socket.SOCK_STREAM, flags=0)
    try:
        cli.settimeout(60)
        cli.connect((server_addr, port))
        cli.sendall(payload)
        cli.shutdown(socket.SHUT_WR)
        t.join(90)
    finally:
        cli.close()
        srv.close()
    assert not errors, errors
    assert count[0] == size and got.hexdigest() == hashlib.sha256(payload).hexdigest()


class Capture:
    """tcpdump on an interface of a namespace, started and ready before traffic is made."""

    def __init__(self, ns: Netns, ifname: str, bpf: str, count: int = 1):
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "tcpdump", "-l", "-n", "-v", "-i", ifname,
                                      "-c", str(count), bpf], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + 30
        buf = ""
        while "listening on" not in buf and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            buf += line
        assert "listening on" in buf, f"tcpdump did not start: {buf}"

    def result(self, timeout: float = 20) -> str:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out
