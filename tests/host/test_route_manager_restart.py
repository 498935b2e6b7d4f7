"""ExaBGP SIGKILLed under a 10,000-route table (BIRD 2 announcing): the speaker restarts it, the
kernel FIB is sampled all the while and never empties, and afterwards it holds exactly the
routes BIRD announces - including the change BIRD made while ExaBGP was dead (100 routes gone,
50 new): stale routes are swept at BIRD's End-of-RIB, nothing is flushed first."""

from __future__ import annotations

import ipaddress
import os
import json
import signal
import threading
import time

from tests.host.route_manager_env import Appliance, tunnel_yaml
from tests.host.test_route_manager import config
from tests.peers.bird import Bird, render_bird_conf
from tests.peers.daemon import BgpNeighbor

N = 10_000


def prefixes(start: int, n: int) -> list[str]:
    base = int(ipaddress.IPv4Address("10.64.0.0"))
    return [f"{ipaddress.IPv4Address(base + (i << 8))}/24" for i in range(start, start + n)]


def test_exabgp_sigkill_under_10k_routes(tmp_path):
    pol = ("    from-b: {prefixes: [{prefix: 10.64.0.0/10, le: 24}]}\n"
           "    to-b: {prefixes: [{prefix: 10.1.0.0/16}]}\n")
    text = config(tunnel_yaml("to-b", 1, 65002, imp="from-b", exp="to-b", extra="graceful_restart: 120"), pol)
    first = prefixes(0, N)
    second = first[100:] + prefixes(N, 50)
    with Appliance(tmp_path, text, [("to-b", 1)]) as app:
        p = app.peers["to-b"]
        bird = Bird(tmp_path / "bird", p.name, router_id=p.address, local_as=65002, announce=first,
                    neighbors=[BgpNeighbor(p.app_address, 65001, local_address=p.address, hold_time=3)])
        try:
            bird.start()
            app.start()
            t0 = time.monotonic()
            app.tunnel_up("to-b")
            app.wait(lambda: app.fib_count() == N, 120, f"{N} routes in the FIB", interval=0.5)
            print(f"\n{N} routes from BIRD in the kernel FIB {time.monotonic() - t0:.1f} s after tunnel up")

            samples: list[tuple[float, int]] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append((time.monotonic(), app.fib_count()))
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            time.sleep(0.3)
            conf = render_bird_conf(router_id=p.address, local_as=65002, neighbors=bird.neighbors,
                                    announce=second, log_path=bird.log_path)
            pid = app.mgr.speaker.pid
            killed = time.monotonic()
            app.mgr.speaker.kill_exabgp(signal.SIGKILL)
            (bird.workdir / "bird.conf").write_text(conf)        # BIRD changes its table meanwhile
            bird.birdc("configure")
            app.wait(lambda: app.mgr.speaker.pid not in (None, pid) and app.mgr.speaker.connected, 20,
                     "ExaBGP restarted")
            print(f"ExaBGP restarted {time.monotonic() - killed:.1f} s after SIGKILL")
            want = set(second)
            app.wait(lambda: set(app.fib()) == want, 90, "the FIB == BIRD's new table", interval=0.5)
            done = time.monotonic()
            stop.set()
            sampler.join(5)
            during = [n for t, n in samples if t >= killed]
            print(f"FIB sampled {len(during)} times from the kill to exact ({done - killed:.1f} s): "
                  f"min {min(during)}, max {max(during)} routes")
            assert len(during) >= 5
            assert min(during) >= N - 100            # never emptied: at worst the 100 BIRD dropped are gone
            assert app.mgr.speaker.restarts == 1
            assert app.events_of("bgp_speaker_restarted")
            hops = {h for v in app.fib().values() for h in v}
            assert hops == {("169.254.21.2", "xfrm-b")}
            time.sleep(1)
            assert set(app.fib()) == want
            n = app.neighbor("to-b")
            assert n["state"] == "established" and n["prefixes_accepted"] == len(want), json.dumps(n)
        finally:
            bird.close()


def test_relay_killed_under_a_running_exabgp(tmp_path):
    """The API process (bgp/relay.py) dies while ExaBGP runs: ExaBGP would respawn it, but the
    messages in between are lost, so the speaker restarts ExaBGP instead; the FIB is kept and
    resynchronised (GoBGP sends no End-of-RIB here: the quiet-period sweep ends it)."""
    from tests.peers.gobgp import GoBgp
    pol = ("    from-b: {prefixes: [{prefix: 10.64.0.0/10, le: 24}]}\n"
           "    to-b: {prefixes: [{prefix: 10.1.0.0/16}]}\n")
    text = config(tunnel_yaml("to-b", 1, 65002, imp="from-b", exp="to-b"), pol)
    with Appliance(tmp_path, text, [("to-b", 1)]) as app:
        p = app.peers["to-b"]
        peer = GoBgp(tmp_path / "gobgp", p.name, router_id=p.address, local_as=65002,
                     announce=["10.64.1.0/24", "10.64.2.0/24", "10.64.3.0/24"],
                     neighbors=[BgpNeighbor(p.app_address, 65001, local_address=p.address, hold_time=3)])
        try:
            peer.start()
            app.start()
            app.tunnel_up("to-b")
            want = {f"10.64.{i}.0/24": {("169.254.21.2", "xfrm-b")} for i in (1, 2, 3)}
            app.wait_fib(want)
            exa = app.mgr.speaker.pid
            relays = [int(d) for d in os.listdir("/proc") if d.isdigit() and _ppid(d) == exa
                      and b"relay.py" in _cmdline(d)]
            assert len(relays) == 1
            os.kill(relays[0], signal.SIGKILL)
            peer.delete("10.64.3.0/24")             # while the API is being replaced
            seen = []
            app.wait(lambda: seen.append(len(app.fib())) or (app.mgr.speaker.pid not in (None, exa)
                                                             and app.mgr.speaker.connected), 20, "a new ExaBGP")
            del want["10.64.3.0/24"]
            app.wait_fib(want, timeout=30)
            print(f"\nrelay killed: ExaBGP replaced, FIB sizes seen meanwhile {sorted(set(seen))}")
            assert min(seen) >= 2
        finally:
            peer.close()


def _ppid(pid: str) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _cmdline(pid: str) -> bytes:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""
