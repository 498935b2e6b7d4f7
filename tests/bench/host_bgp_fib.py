"""Benchmark (make bench): 100,000 IPv4 prefixes from a BIRD peer -> the route manager (ExaBGP,
policy, RIB) -> the kernel FIB, against BIRD 2 receiving the same feed into a kernel table in the
same run. Prints both times and their ratio (goal <= 2x), the route manager's RSS per 100k routes
(goal <= 150 MB; ExaBGP's own RSS printed beside it), and how long a tunnel-down takes to remove
every route of that tunnel from the kernel.

    PYTHONPATH=. .venv/bin/python tests/bench/host_bgp_fib.py [N]
"""

from __future__ import annotations

import ipaddress
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.host.route_manager_env import Appliance, tunnel_yaml  # noqa: E402
from tests.netns import Netns, veth_pair  # noqa: E402
from tests.peers.bird import Bird  # noqa: E402
from tests.peers.daemon import BgpNeighbor  # noqa: E402


def prefixes(n: int) -> list[str]:
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    return [f"{ipaddress.IPv4Address(base + (i << 8))}/24" for i in range(n)]


def rss_kb(pid: int | str = "self") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def count_routes(ns: Netns, proto: str) -> int:
    r = ns.run(f"ip -4 route show proto {proto} | grep -c '^[0-9]' || true")
    return int(r.stdout.strip() or 0)


def wait_count(ns: Netns, proto: str, n: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if count_routes(ns, proto) >= n:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise SystemExit(f"timed out: {count_routes(ns, proto)} of {n} routes (proto {proto})")


def bird_baseline(tmp: Path, feed: list[str]) -> float:
    with Netns("bsrc") as s, Netns("bdst") as d:
        veth_pair(s, "v", d, "v")
        s.run("ip addr add 169.254.30.2/30 dev v")
        d.run("ip addr add 169.254.30.1/30 dev v")
        src = Bird(tmp / "src", s.name, router_id="169.254.30.2", local_as=65002, announce=feed,
                   neighbors=[BgpNeighbor("169.254.30.1", 65001, local_address="169.254.30.2", hold_time=30)])
        dst = Bird(tmp / "dst", d.name, router_id="169.254.30.1", local_as=65001,
                   neighbors=[BgpNeighbor("169.254.30.2", 65002, local_address="169.254.30.1", hold_time=30)],
                   extra="protocol kernel { ipv4 { export all; }; }")
        src.start()
        try:
            t0 = time.monotonic()
            dst.start()
            wait_count(d, "bird", len(feed), 600)
            return time.monotonic() - t0
        finally:
            dst.close()
            src.close()


def route_manager(tmp: Path, feed: list[str]) -> tuple[float, int, int, float]:
    text = ("appliance: {name: bench, router_id: 10.255.0.1}\ntunnels:\n" +
            tunnel_yaml("to-b", 1, 65002, imp="in", exp="out") +
            "bgp:\n  asn: 65001\n  announce: [192.168.0.0/16]\n  policies:\n"
            "    in: {prefixes: [{prefix: 0.0.0.0/0, le: 24}]}\n"         # 10.0.0.0/24 onwards: past 10/8 at 65,536

            "    out: {prefixes: [{prefix: 192.168.0.0/16}]}\n")
    with Appliance(tmp / "rm", text, [("to-b", 1)]) as app:
        p = app.peers["to-b"]
        bird = Bird(tmp / "peer", p.name, router_id=p.address, local_as=65002, announce=feed,
                    neighbors=[BgpNeighbor(p.app_address, 65001, local_address=p.address, hold_time=30)])
        bird.start()
        try:
            app.start()
            rss0 = rss_kb()
            t0 = time.monotonic()
            app.tunnel_up("to-b")
            wait_count(app.ns, "74", len(feed), 900)
            took = time.monotonic() - t0
            rss = rss_kb() - rss0
            exa = rss_kb(app.mgr.speaker.pid) if app.mgr.speaker.pid else 0
            t0 = time.monotonic()
            app.tunnel_down("to-b")
            while count_routes(app.ns, "74"):
                time.sleep(0.05)
            down = time.monotonic() - t0
            return took, rss, exa, down
        finally:
            bird.close()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    feed = prefixes(n)
    tmp = Path(tempfile.mkdtemp(prefix="isthmus-bench-bgp-"))
    base = bird_baseline(tmp / "bird", feed)
    print(f"BIRD 2 -> BIRD 2 -> kernel table: {n} prefixes in {base:.1f} s")
    took, rss, exa, down = route_manager(tmp, feed)
    print(f"BIRD 2 -> ExaBGP -> route manager (policy, RIB) -> kernel FIB: {n} prefixes in {took:.1f} s "
          f"= {took / base:.2f} x BIRD (goal <= 2x)")
    print(f"route manager RSS: +{rss / 1024:.0f} MB for {n} routes = {rss / 1024 * 100_000 / n:.0f} MB per 100k "
          f"(goal <= 150 MB); ExaBGP RSS {exa / 1024:.0f} MB; max RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"tunnel down: all {n} routes out of the kernel FIB in {down:.2f} s")


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    main()
