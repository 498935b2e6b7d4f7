"""RIB update throughput with 100,000 IPv4 prefixes (issue 9, `make bench`; pure Python, no root).

What is timed is the route manager's own work on routes ExaBGP has already parsed: import policy
(guards + a prefix list), Adj-RIB-In, incremental best path, the FIB change list and the
transit export to a third neighbour. Phases, each over the same 100,000 /24s:

1. ``learn``: neighbour t1 announces them, in UPDATEs of 500 prefixes;
2. ``ecmp``: neighbour t2 announces the same prefixes with an equal path (every prefix becomes
   a 2-way ECMP route: each FIB entry is rewritten);
3. ``single``: 2,000 one-prefix UPDATEs (attribute changes) into the full table — the cost of
   one update must not depend on the table size (no full recomputation): printed against the
   same updates into a table of 1,000 prefixes (``single-1k``);
4. ``down``: t1's session goes down (instant withdraw: 100,000 prefixes fall back to t2 alone);
5. ``withdraw``: t2 withdraws everything, in UPDATEs of 500.

The anchor, measured in the same run on the same prefixes before every phase and after the last,
is a plain ``dict`` insert loop (``table[route.prefix] = route``): the floor any Python RIB pays
to hold the table. Each phase is printed as time, prefixes per second, and the ratio against the
mean of the anchors around it. The process's peak
RSS is printed too. Nothing is asserted on the numbers.

Run: `.venv/bin/python tests/bench/host_bgp_rib.py [--prefixes N]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import resource
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
if str(TOP) not in sys.path:
    sys.path.insert(0, str(TOP))

from netaddr import IPAddress, IPNetwork  # noqa: E402

from bgp.policy import PolicyEngine  # noqa: E402
from bgp.rib import Rib  # noqa: E402
from bgp.route import Route  # noqa: E402
from tests.unit.bgp.util import make_config, tunnel_yaml  # noqa: E402

BATCH = 500
SINGLES = 2000


def prefixes(n: int) -> list[IPNetwork]:
    return [IPNetwork(f"{20 + i // 65536}.{(i // 256) % 256}.{i % 256}.0/24") for i in range(n)]


def routes_from(tunnel: str, n: int, peer_as: int, nets: list[IPNetwork]) -> list[Route]:
    nh = IPAddress(f"169.254.{n}.2")
    return [Route(prefix=p, next_hop=nh, neighbor=tunnel, as_path=(peer_as, 64900), peer_as=peer_as)
            for p in nets]


def timed(fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefixes", type=int, default=100_000)
    args = ap.parse_args()
    n = args.prefixes

    cfg = make_config(tunnel_yaml("t1", 1, 65002, "in", "out") + tunnel_yaml("t2", 2, 65003, "in", "out")
                      + tunnel_yaml("t3", 3, 65004, "in", "transit"), """
asn: 65001
announce: [10.1.0.0/16]
policies:
  in: {prefixes: [{prefix: 10.0.0.0/8, le: 24, action: deny}, {prefix: 0.0.0.0/0, ge: 8, le: 24}]}
  out: {prefixes: [10.1.0.0/16]}
  transit: {transit: [t1, t2]}
""")
    nets = prefixes(n)
    r1 = routes_from("t1", 1, 65002, nets)
    r2 = routes_from("t2", 2, 65003, nets)
    singles = [dataclasses.replace(r1[(i * 7919) % n], med=i) for i in range(SINGLES)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def anchor() -> None:
        table = {}
        for r in r1:
            table[r.prefix] = r

    rib = Rib(cfg.bgp, cfg.tunnels, PolicyEngine(cfg.bgp, cfg.tunnels))
    for t in ("t1", "t2", "t3"):
        rib.neighbor_up(t, 0)
    counts = {}

    def batches(tunnel: str, routes: list[Route], key: str) -> None:
        fib = ann = 0
        for i in range(0, len(routes), BATCH):
            ch = rib.update(tunnel, routes[i:i + BATCH], [], 1.0)
            fib += len(ch.fib_set)
            ann += sum(len(v) for v in ch.announce.values())
        counts[key] = (fib, ann)

    def single() -> None:
        for r in singles:
            rib.update("t1", [r], [], 2.0)

    def down() -> None:
        ch = rib.neighbor_down("t1", 3.0)
        counts["down"] = (len(ch.fib_set), sum(len(v) for v in ch.announce.values()))

    def withdraw() -> None:
        fib = 0
        for i in range(0, n, BATCH):
            ch = rib.update("t2", [], nets[i:i + BATCH], 4.0)
            fib += len(ch.fib_remove)
        counts["withdraw"] = (fib, 0)

    # 2,000 one-prefix updates into a table of 1,000 prefixes (ECMP over t1 and t2, as the full
    # table is when "single" runs): the cost per update must not grow with the table
    small = Rib(cfg.bgp, cfg.tunnels, PolicyEngine(cfg.bgp, cfg.tunnels))
    for t in ("t1", "t2", "t3"):
        small.neighbor_up(t, 0)
    small.update("t1", r1[:1000], [], 1.0)
    small.update("t2", r2[:1000], [], 1.0)      # like the full table at that point: 2-way ECMP
    small_singles = [dataclasses.replace(r1[(i * 7919) % 1000], med=i) for i in range(SINGLES)]

    def single_small() -> None:
        for r in small_singles:
            small.update("t1", [r], [], 2.0)

    # The anchor runs before every phase and after the last; each phase is compared with the mean
    # of the two anchors around it (the machine is shared: its speed drifts during a run).
    anchors = [timed(anchor)]
    phases = []

    def phase(name: str, count: int, fn) -> None:
        phases.append((name, count, timed(fn)))
        anchors.append(timed(anchor))

    phase("single-1k", SINGLES, single_small)
    phase("learn", n, lambda: batches("t1", r1, "learn"))
    rss_table = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    phase("ecmp", n, lambda: batches("t2", r2, "ecmp"))
    phase("single", SINGLES, single)
    phase("down", n, down)
    phase("withdraw", n, withdraw)

    print(f"RIB update throughput, {n} IPv4 prefixes, UPDATEs of {BATCH} (anchor: dict insert loop over the "
          f"same prefixes, {min(anchors) * 1e3:.1f}..{max(anchors) * 1e3:.1f} ms = "
          f"{min(anchors) / n * 1e9:.0f}..{max(anchors) / n * 1e9:.0f} ns/prefix)")
    print(f"{'phase':<10} {'prefixes':>9} {'time':>9} {'prefixes/s':>11} {'us/prefix':>10} {'x anchor':>9}  changes")
    per = {}
    for i, (name, count, secs) in enumerate(phases):
        per[name] = secs / count
        per_anchor = (anchors[i] + anchors[i + 1]) / 2 / n
        fib, ann = counts.get(name, (0, 0))
        extra = f"fib {fib}, announced {ann}" if name in counts else ""
        print(f"{name:<10} {count:>9} {secs:>8.2f}s {count / secs:>11.0f} {per[name] * 1e6:>10.1f} "
              f"{per[name] / per_anchor:>9.0f}  {extra}")
    print(f"one-prefix update into {n} prefixes vs into 1,000: {per['single'] / per['single-1k']:.2f}x")
    st1 = rib.neighbor_stats("t3")
    print(f"peak RSS: {rss0 / 1024:.0f} MB before the RIB, {rss_table / 1024:.0f} MB with {n} routes "
          f"(+{(rss_table - rss0) / 1024:.0f} MB, routes built beforehand); t3 advertised at the end: "
          f"{st1['advertised']}")


if __name__ == "__main__":
    main()
