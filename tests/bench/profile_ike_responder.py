"""CPU cost of our IKE responder in-process: IKE_SA_INIT + IKE_AUTH (first Child SA) per setup.

Not a benchmark `make bench` runs (it has no anchor); a tool for finding where the responder's
time goes. Our own initiator engine produces N IKE_SA_INIT requests (PSK,
`aes256gcm16-prfsha384-x25519`, ESP `aes256gcm16`), the responder engine answers them, the
initiator turns the answers into IKE_AUTH requests, and the responder answers those. Only the
responder's calls are timed (receive_datagram + datagrams_to_send + draining events, as the
runner does per datagram).

    .venv/bin/python tests/bench/profile_ike_responder.py [--setups N] [--profile] [--repeat R]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
if str(TOP) not in sys.path:
    sys.path.insert(0, str(TOP))

from appliance.ike import events as ev  # noqa: E402
from appliance.ike.engine import IkeEngine  # noqa: E402
from appliance.ike.policy import DosProtection, DpdConfig, Identity, TunnelConfig  # noqa: E402
from appliance.ike.proposals import parse_proposals  # noqa: E402

INI = ("198.51.100.1", 500)
RESP = ("198.51.100.2", 500)
PSK = b"bench-Secret-0123456789abcdef"
IKE = tuple(parse_proposals(["aes256gcm16-prfsha384-x25519"], "ike"))
ESP = tuple(parse_proposals(["aes256gcm16"], "esp"))


def _cfg(name: str, *, initiator: bool) -> TunnelConfig:
    lid, rid = ("ini.bench.example", "resp.bench.example")
    if not initiator:
        lid, rid = rid, lid
    return TunnelConfig(name=name, local_addr=(INI if initiator else RESP)[0],
                        remote_addr=(RESP if initiator else INI)[0], local_id=Identity.parse(lid),
                        remote_id=Identity.parse(rid), psk=PSK, ike_proposals=IKE, esp_proposals=ESP,
                        if_id=42, start=False, unique=False,
                        dpd=DpdConfig(interval=0, timeout=30, action="clear"))


def _drain(engine: IkeEngine) -> int:
    n = 0
    while engine.next_event() is not None:
        n += 1
    return n


def requests(n: int) -> tuple[list[bytes], IkeEngine]:
    """n IKE_SA_INIT requests from n initiator SAs (each its own tunnel, all alike)."""
    ini = IkeEngine([_cfg(f"t{i}", initiator=True) for i in range(n)], random=os.urandom)
    for i in range(n):
        ini.connect(f"t{i}", 0.0)
    return [d.data for d in ini.datagrams_to_send()], ini


def _other(i: int) -> TunnelConfig:
    """A tunnel of the responder to some other peer that it keeps up itself (start=True)."""
    return TunnelConfig(name=f"other{i}", local_addr=RESP[0], remote_addr=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                        local_id=Identity.parse("resp.bench.example"), remote_id=Identity.parse(f"peer{i}.example"),
                        psk=PSK, ike_proposals=IKE, esp_proposals=ESP, if_id=42, start=True,
                        dpd=DpdConfig(interval=0, timeout=30, action="clear"))


def run(n: int, profiler: cProfile.Profile | None, gcc: "GcClock | None" = None,
        others: int = 0) -> tuple[float, float, int]:
    """Seconds of responder CPU for n IKE_SA_INITs, for n IKE_AUTHs, and Child SAs installed."""
    inits, ini = requests(n)
    resp = IkeEngine([_cfg("bench", initiator=False)] + [_other(i) for i in range(others)], random=os.urandom,
                     dos=DosProtection(half_open_max=None, half_open_per_source=None, cookie_threshold=None))
    resp.start(0.0)
    resp.datagrams_to_send()   # the other tunnels' IKE_SA_INITs go nowhere
    answers: list[bytes] = []
    now = 1.0
    gc.freeze()   # the initiator's objects are not the responder's to collect
    t0 = time.process_time()
    if gcc:
        gcc.on = True
    if profiler:
        profiler.enable()
    for data in inits:
        resp.receive_datagram(data, INI, RESP, now)
        answers.extend(d.data for d in resp.datagrams_to_send())
        _drain(resp)
        resp.get_timer()
    if profiler:
        profiler.disable()
    if gcc:
        gcc.on = False
    t_init = time.process_time() - t0
    gc.unfreeze()
    for data in answers:
        ini.receive_datagram(data, RESP, INI, now)
    auths = [d.data for d in ini.datagrams_to_send()]
    installed = 0
    gc.freeze()
    t0 = time.process_time()
    if gcc:
        gcc.on = True
    if profiler:
        profiler.enable()
    for data in auths:
        resp.receive_datagram(data, INI, RESP, now)
        resp.datagrams_to_send()
        while (e := resp.next_event()) is not None:
            installed += isinstance(e, ev.ChildSaInstalled)
        resp.get_timer()
    if profiler:
        profiler.disable()
    if gcc:
        gcc.on = False
    t_auth = time.process_time() - t0
    gc.unfreeze()
    return t_init, t_auth, installed


class GcClock:
    """CPU time spent in the cyclic garbage collector while `on` (gc.callbacks)."""

    def __init__(self) -> None:
        self.on = False
        self.seconds = 0.0
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.process_time()
        elif self.on:
            self.seconds += time.process_time() - self._t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="cProfile the responder calls")
    p.add_argument("--other-tunnels", type=int, default=0,
                   help="the responder also has this many tunnels to other peers (start=True)")
    p.add_argument("--sort", default="tottime")
    p.add_argument("--limit", type=int, default=40)
    a = p.parse_args(argv)
    prof = cProfile.Profile() if a.profile else None
    per_init, per_auth, per_gc = [], [], []
    gcc = GcClock()
    for _ in range(a.repeat):
        gcc.seconds = 0.0
        t_init, t_auth, installed = run(a.setups, prof, gcc, a.other_tunnels)
        per_gc.append(gcc.seconds / a.setups * 1e6)
        if installed != a.setups:
            raise SystemExit(f"only {installed} of {a.setups} Child SAs installed")
        per_init.append(t_init / a.setups * 1e6)
        per_auth.append(t_auth / a.setups * 1e6)
    mi, ma = statistics.median(per_init), statistics.median(per_auth)
    best = min(i + a_ for i, a_ in zip(per_init, per_auth))
    print(f"responder CPU per setup ({a.setups} setups x {a.repeat}, median; best total {best:.0f} us"
          + (f"; {a.other_tunnels} other tunnels" if a.other_tunnels else "") + "): "
          f"IKE_SA_INIT {mi:.0f} us, "
          f"IKE_AUTH {ma:.0f} us, total {mi + ma:.0f} us -> {1e6 / (mi + ma):.0f} setups/s on one core; "
          f"of which cyclic GC {statistics.median(per_gc):.0f} us"
          + (" (under cProfile)" if prof else ""))
    if prof:
        pstats.Stats(prof).sort_stats(a.sort).print_stats(a.limit)
        if os.environ.get("ISTHMUS_PROFILE_CALLERS"):
            pstats.Stats(prof).print_callers(os.environ["ISTHMUS_PROFILE_CALLERS"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
