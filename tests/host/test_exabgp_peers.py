"""The pinned ExaBGP (requirements.lock) peers with the routers users run: BIRD 2 and FRR.

ExaBGP in one namespace, the router in another, a veth between them; each side announces a
prefix. Asserted: the session is established, the router learned ExaBGP's prefix, and ExaBGP's API
process received the router's prefix as a JSON update. This is the evidence behind the choice of
the ExaBGP line in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import Netns, veth_pair

EXABGP = Path(sys.executable).parent / "exabgp"

EXA_CONF = """
process watch {{
    run {python} {api_script};
    encoder json;
}}
neighbor 10.99.0.2 {{
    router-id 10.99.0.1;
    local-address 10.99.0.1;
    local-as 65001;
    peer-as 65002;
    hold-time 9;
    family {{ ipv4 unicast; }}
    api {{ processes [ watch ]; receive {{ parsed; update; }} neighbor-changes; }}
    static {{ route 10.1.0.0/16 next-hop self; }}
}}
"""

BIRD_CONF = """
router id 10.99.0.2;
protocol device {}
protocol static { ipv4; route 10.2.0.0/16 unreachable; }
protocol bgp exa {
  local 10.99.0.2 as 65002;
  neighbor 10.99.0.1 as 65001;
  hold time 9;
  ipv4 { import all; export all; };
}
"""

FRR_CONF = """
frr defaults datacenter
hostname frr-b
router bgp 65002
 bgp router-id 10.99.0.2
 no bgp ebgp-requires-policy
 neighbor 10.99.0.1 remote-as 65001
 neighbor 10.99.0.1 timers 3 9
 address-family ipv4 unicast
  network 10.2.0.0/16
 exit-address-family
"""


def start_bird(ns: Netns, d: Path):
    (d / "bird.conf").write_text(BIRD_CONF)
    ns.run(["bird", "-c", str(d / "bird.conf"), "-s", str(d / "bird.ctl"), "-P", str(d / "bird.pid")])

    def learned() -> str:
        return subprocess.run(["birdc", "-s", str(d / "bird.ctl"), "show", "route", "protocol", "exa"],
                              capture_output=True, text=True).stdout

    def stop() -> None:
        subprocess.run(["kill", (d / "bird.pid").read_text().strip()], check=False)

    return learned, stop


def start_frr(ns: Netns, d: Path):
    (d / "frr.conf").write_text(FRR_CONF)
    (d / "vty").mkdir()
    ns.run(["/usr/lib/frr/bgpd", "-d", "-Z", "-S", "-f", str(d / "frr.conf"), "-i", str(d / "bgpd.pid"),
            "--vty_socket", str(d / "vty"), "-l", "10.99.0.2", "--log", f"file:{d / 'bgpd.log'}"])

    def learned() -> str:
        return subprocess.run(["vtysh", "--vty_socket", str(d / "vty"), "-c", "show ip bgp"],
                              capture_output=True, text=True).stdout

    def stop() -> None:
        subprocess.run(["kill", (d / "bgpd.pid").read_text().strip()], check=False)

    return learned, stop


@pytest.mark.parametrize("router", ["bird", "frr"])
def test_exabgp_exchanges_routes_with(router, tmp_path):
    with Netns("exa") as a, Netns(router) as b:
        veth_pair(a, "xa", b, "xb")
        a.run("ip addr add 10.99.0.1/30 dev xa")
        b.run("ip addr add 10.99.0.2/30 dev xb")
        learned, stop = (start_bird if router == "bird" else start_frr)(b, tmp_path)
        api_log = tmp_path / "api.log"
        (tmp_path / "api.py").write_text(
            f"import sys\nwith open({str(api_log)!r}, 'a') as f:\n    for line in sys.stdin:\n        f.write(line); f.flush()\n")
        (tmp_path / "exa.conf").write_text(EXA_CONF.format(python=sys.executable, api_script=tmp_path / "api.py"))
        env = dict(os.environ, exabgp_daemon_user="root", exabgp_daemon_daemonize="false",
                   exabgp_log_destination=str(tmp_path / "exabgp.log"))
        exa = subprocess.Popen(["ip", "netns", "exec", a.name, str(EXABGP), "server", str(tmp_path / "exa.conf")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            got_ours = got_theirs = False
            while time.monotonic() < deadline and not (got_ours and got_theirs):
                time.sleep(0.5)
                got_ours = "10.1.0.0/16" in learned()
                msgs = [json.loads(line) for line in api_log.read_text().splitlines()] if api_log.exists() else []
                got_theirs = any(
                    nlri.get("nlri") == "10.2.0.0/16"
                    for m in msgs if m.get("type") == "update"
                    for nh in m["neighbor"]["message"].get("update", {}).get("announce", {}).get("ipv4 unicast", {}).values()
                    for nlri in nh)
            assert got_ours, f"{router} did not learn ExaBGP's prefix:\n{learned()}"
            assert got_theirs, f"ExaBGP did not receive {router}'s prefix; API saw:\n" + (
                api_log.read_text() if api_log.exists() else "nothing")
        finally:
            exa.terminate()
            try:
                exa.wait(timeout=10)
            except subprocess.TimeoutExpired:
                exa.kill()
            stop()
