"""Benchmark (lab): BGP failover between two XFRM tunnels when one underlay dies (issue 9).

The scenario of tests/lab/test_bgp_lab.py: two isthmusd appliances, two tunnels between them
over two underlays, BGP over both, ECMP, DPD `interval: 1s, timeout: 3s`. A pings B's LAN every
50 ms; the underlay of the tunnel carrying the pings is cut. Printed per round: seconds from
the cut to the first answered ping, and the daemons' timeline (peer dead, FIB change); then the
median and the spread. The underlay is restored and the tunnels and ECMP are let settle between
rounds. Anchor: DPD's timeout (3 s), the time any implementation that waits for DPD needs at
least; BGP's own hold timer (9 s here) is what the anchors (strongSwan, libreswan, VyOS, the
clouds) wait for.

    python3 tests/bench/lab_bgp_failover.py [ROUNDS]     (inside the lab: make bench)
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.appliances import wait_for  # noqa: E402
from tests.lab.test_bgp_lab import cut_and_time, devs, bgp_route, diagnostics, two_regions, wait_quiet  # noqa: E402

DPD_TIMEOUT = 3.0
HOLD_TIME = 9.0


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    figures = []
    with two_regions() as (apps, (a, b), (la, _lb)):
        try:
            for app in apps.values():
                for t in ("t1", "t2"):
                    app.wait_tunnel_up(t)
            for i in range(rounds):
                wait_quiet(apps, a, b)
                print(f"-- round {i + 1}/{rounds}")
                failover, wan, _dev, other = cut_and_time(apps, a, b, la)
                figures.append(failover)
                print(f"round {i + 1}: failover {failover:.2f} s")
                wait_for("A: the route only through the other tunnel",
                         lambda o=other: devs(bgp_route(a, "10.2.0.0/16")) == {o}, 30, 0.5)
                b.run(f"ip link set {wan} up")
        except Exception:
            print(diagnostics(apps, (a, b)))
            raise
    med = statistics.median(figures)
    print(f"failover (underlay cut -> first ping answered, DPD 1s/3s, {len(figures)} rounds): "
          f"median {med:.2f} s, min {min(figures):.2f} s, max {max(figures):.2f} s; "
          f"ratio to the DPD timeout {med / DPD_TIMEOUT:.2f}x (goal <= 3 s), "
          f"to the BGP hold time {med / HOLD_TIME:.2f}x")


if __name__ == "__main__":
    main()
