"""Benchmark (lab): install and remove N Child SAs - each 2 ESP SAs + 2 policies + 1 XFRM
interface - with our code and with `ip -batch` doing the same objects, in the same run.

A warm-up round (ip -batch, not counted) runs first. Ours is measured two ways: one request per object, which is what Dataplane.install does, and with
the SAs and policies of all Child SAs pipelined through Xfrm.batch (interfaces are created one by
one through pyroute2.IPRoute either way). Each method runs twice, alternating with ip -batch, and
the better round counts. Printed: seconds per method and the ratio ours / ip -batch (below 1 =
faster than iproute2). Both methods are checked to have made exactly the same kernel objects.

    python3 tests/bench/lab_xfrm.py [N]        (inside the lab: make bench)
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from appliance.xfrm.kernel import PolicySpec, SaSpec, Xfrm  # noqa: E402
from appliance.xfrm.link import Links  # noqa: E402
from appliance.xfrm.model import IF_ID_MIN, EspAlgorithms, SaKeys, TunnelInterface  # noqa: E402

NS = "isthmus-bench"
LOCAL = ipaddress.ip_address("192.0.2.1")
GCM = EspAlgorithms("rfc4106(gcm(aes))", key_bits=128)
ANY4 = ipaddress.ip_network("0.0.0.0/0")


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


def remote(i: int) -> ipaddress.IPv4Address:
    return ipaddress.ip_address(f"198.51.{100 + i // 250}.{1 + i % 250}")


class Plan:
    """The N Child SAs: names, if_ids, SPIs, keys (fresh for every round)."""

    def __init__(self, n: int, round_: int):
        self.n = n
        self.items = []
        for i in range(n):
            base = 0x100000 + (round_ << 16) + 2 * i
            self.items.append(dict(ifname=f"xb{i}", if_id=IF_ID_MIN + 0x100 + i, remote=remote(i),
                                   spi_in=base, spi_out=base + 1, key_in=os.urandom(20), key_out=os.urandom(20)))

    def ip_links_add(self) -> str:
        return "".join(f"link add {t['ifname']} type xfrm if_id {t['if_id']}\n" for t in self.items)

    def ip_links_del(self) -> str:
        return "".join(f"link del {t['ifname']}\n" for t in self.items)

    def ip_xfrm_add(self) -> str:
        lines = []
        for t in self.items:
            r, x = t["remote"], t["if_id"]
            lines += [
                f"xfrm state add src {r} dst {LOCAL} proto esp spi {t['spi_in']} reqid {x} mode tunnel "
                f"aead rfc4106(gcm(aes)) 0x{t['key_in'].hex()} 128 if_id {x} flag af-unspec replay-window 0",
                f"xfrm state add src {LOCAL} dst {r} proto esp spi {t['spi_out']} reqid {x} mode tunnel "
                f"aead rfc4106(gcm(aes)) 0x{t['key_out'].hex()} 128 if_id {x} flag af-unspec replay-window 0",
                f"xfrm policy add dir out src 0.0.0.0/0 dst 0.0.0.0/0 if_id {x} "
                f"tmpl src {LOCAL} dst {r} proto esp reqid {x} mode tunnel",
                f"xfrm policy add dir in src 0.0.0.0/0 dst 0.0.0.0/0 if_id {x} "
                f"tmpl src {r} dst {LOCAL} proto esp reqid {x} mode tunnel",
            ]
        return "\n".join(lines) + "\n"

    def ip_xfrm_del(self) -> str:
        lines = []
        for t in self.items:
            r, x = t["remote"], t["if_id"]
            lines += [
                f"xfrm state delete src {r} dst {LOCAL} proto esp spi {t['spi_in']}",
                f"xfrm state delete src {LOCAL} dst {r} proto esp spi {t['spi_out']}",
                f"xfrm policy delete dir out src 0.0.0.0/0 dst 0.0.0.0/0 if_id {x}",
                f"xfrm policy delete dir in src 0.0.0.0/0 dst 0.0.0.0/0 if_id {x}",
            ]
        return "\n".join(lines) + "\n"

    def sa_specs(self, t: dict) -> tuple[SaSpec, SaSpec]:
        common = dict(algorithms=GCM, if_id=t["if_id"], reqid=t["if_id"], replay_window=0)
        return (SaSpec(src=t["remote"], dst=LOCAL, spi=t["spi_in"], keys=SaKeys(t["key_in"]), outbound=False, **common),
                SaSpec(src=LOCAL, dst=t["remote"], spi=t["spi_out"], keys=SaKeys(t["key_out"]), outbound=True, **common))

    def policy_specs(self, t: dict) -> tuple[PolicySpec, PolicySpec]:
        x, r = t["if_id"], t["remote"]
        return (PolicySpec("out", ANY4, x, x, LOCAL, r), PolicySpec("in", ANY4, x, x, r, LOCAL))


def count_objects() -> tuple[int, int, int]:
    states = sh(f"ip -n {NS} xfrm state count").split()[-1]
    pols = re.search(r"SPD IN\s+(\d+) OUT\s+(\d+) FWD\s+(\d+)", sh(f"ip -n {NS} xfrm policy count"))
    links = sh(f"ip -n {NS} -o link show type xfrm").count("\n")
    return int(states), sum(int(g) for g in pols.groups()), links


# Each run returns the seconds of four phases: interfaces in, SAs+policies in, SAs+policies out,
# interfaces out (the same objects, in the same order, for every method).
PHASES = ("links in", "xfrm in", "xfrm out", "links out")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_ip(plan: Plan) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        files = {}
        for name, text in (("la", plan.ip_links_add()), ("xa", plan.ip_xfrm_add()), ("xd", plan.ip_xfrm_del()),
                           ("ld", plan.ip_links_del())):
            files[name] = os.path.join(d, name)
            with open(files[name], "w") as f:
                f.write(text)
        out = [_timed(lambda: sh(f"ip -n {NS} -batch {files['la']}")),
               _timed(lambda: sh(f"ip -n {NS} -batch {files['xa']}"))]
        assert count_objects() == (2 * plan.n, 2 * plan.n, plan.n), count_objects()
        out += [_timed(lambda: sh(f"ip -n {NS} -batch {files['xd']}")),
                _timed(lambda: sh(f"ip -n {NS} -batch {files['ld']}"))]
        assert count_objects() == (0, 0, 0), count_objects()
    return out


def run_ours(plan: Plan, batched: bool) -> list[float]:
    x = Xfrm(NS)
    links = Links(NS)
    created: list[int] = []
    try:
        def links_in() -> None:
            for t in plan.items:
                created.append(links.create(TunnelInterface(t["ifname"], t["ifname"], if_id=t["if_id"])).index)

        def xfrm_in() -> None:
            if batched:
                reqs = []
                for t in plan.items:
                    reqs += [x.add_sa_request(s) for s in plan.sa_specs(t)]
                    reqs += [x.add_policy_request(p) for p in plan.policy_specs(t)]
                errors = [e for e in x.batch(reqs) if e is not None]
                assert not errors, errors[:3]
            else:
                for t in plan.items:
                    for s in plan.sa_specs(t):
                        x.add_sa(s)
                    for p in plan.policy_specs(t):
                        x.add_policy(p)

        def xfrm_out() -> None:
            if batched:
                reqs = []
                for t in plan.items:
                    reqs += [x.delete_sa_request(s.dst, s.spi) for s in plan.sa_specs(t)]
                    reqs += [x.delete_policy_request(p.direction, p.selector, p.if_id) for p in plan.policy_specs(t)]
                errors = [e for e in x.batch(reqs) if e is not None]
                assert not errors, errors[:3]
            else:
                for t in plan.items:
                    for s in plan.sa_specs(t):
                        x.delete_sa(s.dst, s.spi)
                    for p in plan.policy_specs(t):
                        x.delete_policy(p.direction, p.selector, p.if_id)

        def links_out() -> None:
            for index in created:
                links.delete(index)

        out = [_timed(links_in), _timed(xfrm_in)]
        assert count_objects() == (2 * plan.n, 2 * plan.n, plan.n), count_objects()
        out += [_timed(xfrm_out), _timed(links_out)]
        assert count_objects() == (0, 0, 0), count_objects()
    finally:
        x.close()
        links.close()
    return out


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh(f"ip netns add {NS} && ip -n {NS} link set lo up && ip -n {NS} link add wan type dummy && "
       f"ip -n {NS} link set wan up && ip -n {NS} addr add {LOCAL}/24 dev wan")
    try:
        # A fresh namespace makes its first few hundred SAs slow for any client (the kernel grows
        # its SA and policy hash tables): one unmeasured round first, so every method meets the same
        # warm kernel.
        warm = run_ip(Plan(n, 9))
        print(f"  warm-up  ip -batch          {sum(warm):7.2f} s", flush=True)
        methods = ("ip -batch", "ours, per object", "ours, batched")
        best: dict[str, list[float]] = {}
        for round_ in range(2):
            for name in methods:
                plan = Plan(n, round_)
                got = run_ip(plan) if name == "ip -batch" else run_ours(plan, batched=name.endswith("batched"))
                best[name] = [min(a, b) for a, b in zip(best[name], got)] if name in best else got
                print(f"  round {round_ + 1}  {name:18s} " + "  ".join(f"{p} {v:6.2f} s" for p, v in zip(PHASES, got)),
                      flush=True)
        ref = best["ip -batch"]
        print(f"\n{n} Child SAs (2 SAs + 2 policies + 1 XFRM interface each), best of 2 rounds per phase; "
              f"ratio = ours / ip -batch in this run (below 1 = faster than iproute2):")
        print(f"  {'method':18s} {'install':>9s} {'ratio':>7s} {'remove':>9s} {'ratio':>7s}   "
              f"{'SAs+policies in':>15s} {'ratio':>6s} {'out':>7s} {'ratio':>6s}   {'interfaces in':>13s} {'ratio':>6s}")
        for name in methods:
            li, xi, xo, lo = best[name]
            ins, rem = li + xi, xo + lo
            print(f"  {name:18s} {ins:8.2f}s {ins / (ref[0] + ref[1]):6.2f}x {rem:8.2f}s {rem / (ref[2] + ref[3]):6.2f}x   "
                  f"{xi:14.2f}s {xi / ref[1]:5.2f}x {xo:6.2f}s {xo / ref[2]:5.2f}x   {li:12.2f}s {li / ref[0]:5.2f}x")
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
