"""What the hybrid post-quantum suite costs: CPU per complete tunnel setup (IKE_SA_INIT,
IKE_INTERMEDIATE per additional key exchange, IKE_AUTH with the first Child SA; both engines
in-process, PSK), for `ke1_mlkem768` and `ke1_mlkem1024`, printed as ratios against the classic
`aes256gcm16-prfsha384-x25519` measured in the same run (the anchor), plus the octets each setup
puts on the wire.

    .venv/bin/python tests/bench/host_ike_hybrid.py [--setups N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
if str(TOP) not in sys.path:
    sys.path.insert(0, str(TOP))

from appliance.ike import events as ev  # noqa: E402
from appliance.ike.engine import IkeEngine  # noqa: E402
from tests.unit.ike.simnet import tunnel  # noqa: E402

CLASSIC = "aes256gcm16-prfsha384-x25519"
SUITES = {"classic (anchor)": CLASSIC, "ke1_mlkem768": CLASSIC + "-ke1_mlkem768",
          "ke1_mlkem1024": CLASSIC + "-ke1_mlkem1024"}


def setup(ike: str, seed: int) -> tuple[float, int]:
    """(CPU seconds, octets sent) for one complete setup between two fresh engines."""
    a = IkeEngine([tunnel("a", ike=ike)], random=random.Random(seed).randbytes)
    b = IkeEngine([tunnel("b", ike=ike)], random=random.Random(seed + 1).randbytes)
    octets = 0
    t0 = time.process_time()
    a.start(0.0)
    up = False
    for _ in range(20):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for d in src.datagrams_to_send():
                octets += len(d.data)
                dst.receive_datagram(d.data, d.src, d.dst, 0.0)
                moved = True
        while (e := a.next_event()) is not None:
            up = up or isinstance(e, ev.ChildSaInstalled)
        while b.next_event() is not None:
            pass
        if not moved:
            break
    cpu = time.process_time() - t0
    if not up:
        raise SystemExit(f"{ike}: the tunnel did not come up")
    return cpu, octets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setups", type=int, default=200)
    args = ap.parse_args()
    results = {}
    for rnd in range(args.setups):          # interleaved, so load changes hit every suite alike
        for name, ike in SUITES.items():
            cpu, octets = setup(ike, rnd * 10)
            r = results.setdefault(name, [0.0, 0])
            r[0] += cpu
            r[1] = octets
    anchor = results["classic (anchor)"][0]
    print(f"IKE setups, both engines in-process, {args.setups} each (CPU time ratio vs the anchor)")
    for name, (cpu, octets) in results.items():
        print(f"  {name:18} {cpu / anchor:5.2f}x   {octets:5d} octets on the wire per setup")


if __name__ == "__main__":
    main()
