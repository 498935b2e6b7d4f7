"""The pinned ExaBGP (requirements.lock) peers with the routers users run: BIRD 2 and FRR.

ExaBGP in one namespace, the router (tests/peers harnesses) in another, a veth between them; each side announces a
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
from tests.peers.bird import Bird
from tests.peers.daemon import BgpNeighbor
from tests.peers.frr import Frr

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

def start_router(kind: str, ns: Netns, workdir: Path):
    """BIRD or FRR bgpd (tests/peers) peering with ExaBGP at 10.99.0.1 and announcing 10.2.0.0/16."""
    common = dict(router_id="10.99.0.2", local_as=65002, announce=["10.2.0.0/16"],
                  neighbors=[BgpNeighbor("10.99.0.1", 65001, local_address="10.99.0.2", hold_time=9)])
    router = (Bird if kind == "bird" else Frr)(workdir / kind, ns.name, **common)
    router.start()
    learned = (lambda: router.learned(0)) if kind == "bird" else (lambda: router.learned_from("10.99.0.1"))
    return router, learned


@pytest.mark.parametrize("router", ["bird", "frr"])
def test_exabgp_exchanges_routes_with(router, tmp_path):
    with Netns("exa") as a, Netns(router) as b:
        veth_pair(a, "xa", b, "xb")
        a.run("ip addr add 10.99.0.1/30 dev xa")
        b.run("ip addr add 10.99.0.2/30 dev xb")
        peer, learned = start_router(router, b, tmp_path)
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
            peer.close()
