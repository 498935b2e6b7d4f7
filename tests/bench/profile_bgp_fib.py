"""Where the route manager's CPU goes while a BIRD peer feeds it N IPv4 prefixes (not run by
`make bench`): the scenario of host_bgp_fib.py with cProfile on the route manager's loop thread
(ExaBGP API lines, parsing, policy, RIB) and on its FIB thread (netlink writes), plus the CPU
time of ExaBGP (its own process) and of this process over the feed.

    PYTHONPATH=. .venv/bin/python tests/bench/profile_bgp_fib.py [N] [--top 30]
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.host_bgp_fib import prefixes, rss_kb, wait_count  # noqa: E402
from tests.host.route_manager_env import Appliance, tunnel_yaml  # noqa: E402
from tests.peers.bird import Bird  # noqa: E402
from tests.peers.daemon import BgpNeighbor  # noqa: E402


def cpu_s(pid: int | str) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 30
    n = int(args[0]) if args else 100_000
    feed = prefixes(n)
    tmp = Path(tempfile.mkdtemp(prefix="isthmus-prof-bgp-"))
    text = ("appliance: {name: bench, router_id: 10.255.0.1}\ntunnels:\n" +
            tunnel_yaml("to-b", 1, 65002, imp="in", exp="out") +
            "bgp:\n  asn: 65001\n  announce: [192.168.0.0/16]\n  policies:\n"
            "    in: {prefixes: [{prefix: 0.0.0.0/0, le: 24}]}\n"
            "    out: {prefixes: [{prefix: 192.168.0.0/16}]}\n")
    loop_prof, fib_prof = cProfile.Profile(), cProfile.Profile()
    with Appliance(tmp / "rm", text, [("to-b", 1)]) as app:
        p = app.peers["to-b"]
        bird = Bird(tmp / "peer", p.name, router_id=p.address, local_as=65002, announce=feed,
                    neighbors=[BgpNeighbor(p.app_address, 65001, local_address=p.address, hold_time=30)])
        bird.start()
        try:
            app.start()
            app.call(loop_prof.enable)
            app.mgr._fibq.submit(fib_prof.enable).result()
            exa = app.mgr.speaker.pid
            c_self, c_exa, rss0 = cpu_s("self"), cpu_s(exa), rss_kb()
            t0 = time.monotonic()
            app.tunnel_up("to-b")
            wait_count(app.ns, "74", n, 900)
            took = time.monotonic() - t0
            app.call(loop_prof.disable)
            app.mgr._fibq.submit(fib_prof.disable).result()
            print(f"{n} prefixes in {took:.1f} s (under cProfile); CPU: this process "
                  f"{cpu_s('self') - c_self:.1f} s, ExaBGP {cpu_s(exa) - c_exa:.1f} s; "
                  f"RSS +{(rss_kb() - rss0) / 1024:.0f} MB")
        finally:
            bird.close()
    for name, prof in (("route manager loop thread", loop_prof), ("FIB thread", fib_prof)):
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("tottime").print_stats(top)
        print(f"==== {name}\n" + out.getvalue())


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    main()
