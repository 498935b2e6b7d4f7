"""isthmusd with a bgp: section, on the host: it starts ExaBGP as its child (with the relay as
ExaBGP's API process), `isthmus show bgp` / `show routes` / `status` show the neighbors (idle:
the host kernel cannot install the Child SA, so the tunnel never comes up here - the sessions
themselves are proved in test_route_manager*.py and in the lab), the metrics carry the BGP
families, and SIGTERM takes ExaBGP down with the daemon."""

from __future__ import annotations

import os
import signal

import pytest

from tests.appliances import Appliance, wait_for
from tests.netns import Netns

pytestmark = pytest.mark.host

CONFIG = """appliance: {name: region-a, router_id: 10.255.0.1}
tunnels:
  to-b:
    remote: 192.0.2.2
    local: 192.0.2.1
    auth: {psk_file: secrets/t.psk}
    start: false
    interface: {name: xfrm-b, address: 169.254.21.1/30}
    bgp: {peer_as: 65002, peer_address: 169.254.21.2, hold_time: 3, import: from-b, export: to-b}
bgp:
  asn: 65001
  announce: [10.1.0.0/16]
  policies:
    from-b: {prefixes: [{prefix: 10.2.0.0/16, le: 24}]}
    to-b: {prefixes: [{prefix: 10.1.0.0/16}]}
"""


def children(pid: int) -> list[tuple[int, str]]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append((int(d), cmd))
    return out


def test_isthmusd_runs_exabgp_and_shows_bgp(tmp_path):
    with Netns("rmd") as ns:
        ns.run("ip link add wan type veth peer name wan2 && ip link set wan up && ip addr add 192.0.2.1/24 dev wan")
        a = Appliance("A", ns.name, tmp_path / "a", metrics_port=9488)
        a.write_psk("t.psk", "host-test-psk-7c1f0e9a2b")
        a.write_config(CONFIG)
        try:
            a.start()
            exa = wait_for("ExaBGP running as isthmusd's child",
                           lambda: [c for c in children(a.pid) if "exabgp" in c[1]], 30)
            bgp = wait_for("the relay connected", lambda: (lambda b: b if b["speaker"]["connected"] else None)(
                a.cli_json("show", "bgp")), 30)
            assert bgp["asn"] == 65001 and bgp["router_id"] == "10.255.0.1"
            (n,) = bgp["neighbors"]
            assert (n["tunnel"], n["peer_address"], n["peer_as"], n["state"]) == \
                ("to-b", "169.254.21.2", 65002, "idle (tunnel down)")
            human = a.cli("show", "bgp").stdout
            assert "local AS 65001" in human and "to-b" in human and "idle (tunnel down)" in human
            assert a.cli_json("status")["bgp"] == {"sessions": 1, "established": 0}
            assert a.cli_json("show", "routes")["routes"] == []
            assert 'isthmus_bgp_session_up{tunnel="to-b",peer="169.254.21.2"} 0' in a.metrics()
            conf = (a.run_dir / "bgp" / "exabgp.conf").read_text()
            assert "neighbor" not in conf.split("}", 1)[1]        # no Child SA: no neighbor configured
            assert a.stop(signal.SIGTERM) == 0
            for pid, _ in exa:
                wait_for("ExaBGP gone", lambda: not os.path.exists(f"/proc/{pid}") or
                         open(f"/proc/{pid}/stat").read().split()[2] == "Z", 10)
        finally:
            a.kill()
