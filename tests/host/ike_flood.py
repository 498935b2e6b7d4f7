"""A flood of spoofed IKE_SA_INIT requests, for the DoS host test and bench (RFC 7296 §2.6).

Run inside a flooder namespace (never the root namespace: the forged source addresses must not
leave the test's own links):

    ip netns exec NS python -m tests.host.ike_flood --dst 192.0.2.1 --prefix 198.18.0.0/16 \\
        --rate 2000 --count 20000 --seconds 20

Each datagram is a well-formed IKE_SA_INIT request (`aes256gcm16-prfsha384-x25519`, a valid
X25519 share, a 32-octet nonce) with its own SPIi, from its own source address inside
`--prefix` (cycled), source port 500, sent through a raw socket with the IPv4 header built
here (IP_HDRINCL). The pace is `--rate` datagrams per second in 5 ms ticks; the flood stops
after `--count` datagrams or `--seconds`, whichever comes first, or on SIGTERM. It prints one
JSON line: {"sent", "seconds", "errors"}. Nothing of the flood's answers is read here: give the
flooder namespace an nftables counter to see them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import struct
import sys
import time

from appliance.ike import message as M
from appliance.ike.constants import ExchangeType, ProtocolId
from appliance.ike.crypto import KeyExchange
from appliance.ike.proposals import Proposal, parse_proposals

IKE_PROPOSAL = "aes256gcm16-prfsha384-x25519"


def ike_sa_init_template() -> bytes:
    """One spoofable IKE_SA_INIT request; its first 8 octets (SPIi) are replaced per datagram."""
    props = [Proposal(ProtocolId.IKE, p.transforms, n)
             for n, p in enumerate(parse_proposals(IKE_PROPOSAL, "ike"), 1)]
    ke = KeyExchange.generate(31, os.urandom).public_bytes
    payloads = [M.SA(props), M.KE(31, ke), M.Nonce(os.urandom(32))]
    return M.encode_message(M.Message(b"\x01" * 8, bytes(8), ExchangeType.IKE_SA_INIT, 0, False, True, payloads))


def ipv4_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """IPv4 + UDP headers (the kernel fills in the IP checksum and ID; UDP checksum 0 = none)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, 0, 64, socket.IPPROTO_UDP, 0, src, dst)
    return ip + udp + payload


def flood(dst: str, prefix: str, rate: float, count: int, seconds: float, port: int = 500) -> dict:
    net = ipaddress.ip_network(prefix)
    hosts = net.num_addresses - 2
    base = int(net.network_address) + 1
    template = ike_sa_init_template()
    body = template[8:]
    dst_b = socket.inet_aton(dst)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    stop = False

    def on_term(*_a) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    sent = errors = 0
    tick = 0.005
    t0 = time.monotonic()
    deadline = t0 + seconds
    while not stop and sent < count:
        now = time.monotonic()
        if now >= deadline:
            break
        due = min(count, int((now - t0) * rate) + 1)
        while sent < due:
            spi = b"\xf1" + (sent + 1).to_bytes(7, "big")
            src = (base + sent % hosts).to_bytes(4, "big")
            try:
                sock.sendto(ipv4_udp(src, dst_b, port, port, spi + body), (dst, 0))
            except OSError:        # a full queue: counted, the pace goes on
                errors += 1
            sent += 1
        time.sleep(max(0.0, min(tick, t0 + due / rate - time.monotonic())))
    sock.close()
    return {"sent": sent, "seconds": round(time.monotonic() - t0, 3), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.host.ike_flood")
    ap.add_argument("--dst", required=True)
    ap.add_argument("--prefix", required=True, help="forged source addresses (IPv4 network)")
    ap.add_argument("--rate", type=float, default=2000.0, help="datagrams per second")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args(argv)
    print(json.dumps(flood(a.dst, a.prefix, a.rate, a.count, a.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------- the flooder's namespace

FLOOD_LINK = ("198.51.100.1", "198.51.100.2")   # target's end, flooder's end (/24)
FLOOD_PREFIX = "198.18.0.0/16"                   # the forged sources (RFC 2544 benchmarking)
ANSWERS = """
table ip isthmus_flood {
  chain pre {
    type filter hook prerouting priority -300; policy accept;
    udp sport 500 counter drop
  }
}
"""


class Flooder:
    """A namespace joined to `target` (a tests.peers.topology.Side) by its own veth link; the
    target routes FLOOD_PREFIX back over it, so its answers to forged sources arrive here, are
    counted (nftables) and dropped."""

    def __init__(self, ns, target, prefix: str = FLOOD_PREFIX) -> None:
        from tests.netns import veth_pair

        self.ns, self.target, self.prefix = ns, target, prefix
        veth_pair(target.ns, "flood0", ns, "flood1")
        target.ns.run(["ip", "addr", "add", FLOOD_LINK[0] + "/24", "dev", "flood0"])
        ns.run(["ip", "addr", "add", FLOOD_LINK[1] + "/24", "dev", "flood1"])
        ns.run(["ip", "route", "add", target.addr4 + "/32", "via", FLOOD_LINK[0]])
        target.ns.run(["ip", "route", "add", prefix, "via", FLOOD_LINK[1]])
        ns.run(["nft", "-f", "-"], input=ANSWERS)
        self.proc = None

    def start(self, *, rate: float, count: int, seconds: float):
        import subprocess
        from pathlib import Path

        top = Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=str(top))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, sys.executable, "-m", "tests.host.ike_flood",
             "--dst", self.target.addr4, "--prefix", self.prefix, "--rate", str(rate), "--count", str(count),
             "--seconds", str(seconds)], cwd=top, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self.proc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def finish(self, timeout: float = 60) -> dict:
        """Wait for the flood to end (SIGTERM first if `timeout` is 0); its JSON summary."""
        import subprocess

        assert self.proc is not None
        if timeout == 0 and self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=timeout or 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.proc = None
        lines = [x for x in out.splitlines() if x.startswith("{")]
        if not lines:
            raise AssertionError(f"flooder printed nothing; stderr: {err[-2000:]}")
        return json.loads(lines[-1])

    def answers(self) -> int:
        """Datagrams from UDP port 500 that reached the flooder namespace (the target's answers
        to forged sources)."""
        import re

        out = self.ns.run(["nft", "list", "chain", "ip", "isthmus_flood", "pre"]).stdout
        m = re.search(r"counter packets (\d+)", out)
        return int(m.group(1)) if m else -1


def rss_kib(pid: int) -> int:
    """A process's resident set (VmRSS, KiB) from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
