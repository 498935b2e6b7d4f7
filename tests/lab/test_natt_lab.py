"""NAT traversal on a real IPsec kernel (issue 10, "NAT:"): region A's isthmusd sits behind a
namespace doing nftables masquerade (tests/peers/nat.py), region B's in front; LAN hosts behind
both.

    lan-a 10.1.0.10 -- region-a 10.0.0.1 -- NAT 10.0.0.254 / 192.0.2.254 -- region-b 192.0.2.2 -- lan-b 10.2.0.10

LAN pings cross a UDP-encapsulated Child SA (XFRM state `encap espinudp`, B sending to A's
public mapping), the XFRM interfaces carry the encapsulated MTU (8 bytes below plain ESP) with the
MSS clamp to match, and a NAT rebinding (new port range, conntrack flushed) under pings is
followed by B's kernel SAs in place: same SPIs, no rekey. iproute2, nft and conntrack netlink are
the observers.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.appliances import Appliance, wait_for
from tests.lab.daemon_env import tunnel_yaml
from tests.netns import Netns, veth_pair
from tests.peers.nat import INSIDE4, OUTSIDE4, PUBLIC, natted_namespaces

pytestmark = pytest.mark.lab

PSK = "natlab_" + secrets.token_hex(12)
A = dict(tunnel="to-b", remote=OUTSIDE4, local=INSIDE4, local_id="a.example.net", remote_id="b.example.net",
         start="true", ifname="xfrm-b", inside="169.254.31.1/30", routes="[10.2.0.0/16]")
B = dict(tunnel="to-a", remote=PUBLIC, local=OUTSIDE4, local_id="b.example.net", remote_id="a.example.net",
         start="false", ifname="xfrm-a", inside="169.254.31.2/30", routes="[10.1.0.0/16]")
# plain ESP with AES-GCM over a 1500-byte IPv4 underlay: 1446; in UDP: 1438 (RFC 3948, 8 octets)
MTU_PLAIN, MTU_NATT = 1446, 1438


def _encaps(ns: Netns) -> dict[int, tuple[str, str, int, int]]:
    """{spi: (src, dst, encap sport, encap dport)} from `ip xfrm state`."""
    out = ns.run("ip xfrm state").stdout
    states = {}
    for block in re.split(r"\n(?=src )", out.strip()):
        m = re.search(r"src (\S+) dst (\S+)\s+proto esp spi (0x[0-9a-f]+)", block)
        if not m:
            continue
        e = re.search(r"encap type espinudp sport (\d+) dport (\d+)", block)
        assert e, f"an SA without UDP encapsulation:\n{block}"
        states[int(m.group(3), 16)] = (m.group(1), m.group(2), int(e.group(1)), int(e.group(2)))
    return states


def _mtu(ns: Netns, ifname: str) -> int:
    return json.loads(ns.run(f"ip -j link show {ifname}").stdout)[0]["mtu"]


def _ping(lan: Netns, dst: str, count: int, interval: float = 0.1) -> subprocess.CompletedProcess:
    return lan.run(f"ping -c {count} -i {interval} -W 2 {dst}", check=False, timeout=120)


@pytest.fixture
def natted_regions():
    tmp = Path(tempfile.mkdtemp(prefix="isthmus-natlab-"))
    with natted_namespaces("nl") as (inside, nat, outside), Netns("lan-a") as lan_a, Netns("lan-b") as lan_b:
        apps = {}
        for key, side, lan, gw, host, cfg in (("a", inside, lan_a, "10.1.0.1", "10.1.0.10", A),
                                              ("b", outside, lan_b, "10.2.0.1", "10.2.0.10", B)):
            side.ns.run("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 "
                        "net.ipv4.conf.default.rp_filter=0")
            veth_pair(side.ns, "lan", lan, "eth0")
            side.ns.run(f"ip addr add {gw}/24 dev lan")
            lan.run(f"ip addr add {host}/24 dev eth0 && ip route add default via {gw}")
            app = Appliance(key.upper(), side.ns.name, tmp / key)
            app.write_psk("t1.psk", PSK)
            app.write_config(f"appliance: {{name: natlab-{key}}}\ntunnels:\n"
                             + tunnel_yaml(cfg, "secrets/t1.psk", "    nat_keepalive: 2s\n"))
            apps[key] = app
        try:
            apps["b"].start(wait=False)
            apps["a"].start(wait=False)
            for app in apps.values():
                app.wait_ready()
            yield inside, nat, outside, lan_a, lan_b, apps["a"], apps["b"]
        finally:
            for app in apps.values():
                try:
                    app.stop(timeout=30)
                except Exception:  # noqa: BLE001
                    app.kill()


def test_lan_traffic_crosses_a_udp_encapsulated_child_sa_through_the_nat(natted_regions):
    inside, nat, outside, lan_a, lan_b, a, b = natted_regions
    a.wait_tunnel_up("to-b")
    b.wait_tunnel_up("to-a")
    ca, cb = a.installed_child("to-b"), b.installed_child("to-a")
    spi_a_in, spi_a_out = int(ca["spi_in"], 16), int(ca["spi_out"], 16)
    assert (ca["spi_in"], ca["spi_out"]) == (cb["spi_out"], cb["spi_in"])
    public_port = nat.public_port(4500)
    assert public_port is not None and 20000 <= public_port <= 20099, nat.mappings()

    # ESP in UDP in both kernels: A between its own 4500s, B towards A's public mapping
    sa_a, sa_b = _encaps(inside.ns), _encaps(outside.ns)
    assert sa_a == {spi_a_out: (INSIDE4, OUTSIDE4, 4500, 4500), spi_a_in: (OUTSIDE4, INSIDE4, 4500, 4500)}
    assert sa_b == {spi_a_in: (OUTSIDE4, PUBLIC, 4500, public_port), spi_a_out: (PUBLIC, OUTSIDE4, public_port, 4500)}

    # the interfaces' MTU is the encapsulated one, and the MSS clamp follows it
    assert _mtu(inside.ns, "xfrm-b") == _mtu(outside.ns, "xfrm-a") == MTU_NATT == MTU_PLAIN - 8
    for side in (inside, outside):
        clamp = side.ns.run("nft list table inet isthmus").stdout
        assert f"tcp option maxseg size set {MTU_NATT - 40}" in clamp, clamp     # IPv4: MTU - 40

    # LAN to LAN, both ways, through the NAT; a full-size packet (DF) fits the encapsulated MTU
    r = _ping(lan_a, "10.2.0.10", 20, 0.05)
    assert r.returncode == 0, r.stdout + r.stderr + a.log_tail()
    r = _ping(lan_b, "10.1.0.10", 10, 0.05)
    assert r.returncode == 0, r.stdout
    r = lan_a.run(f"ping -c 3 -i 0.1 -W 2 -M do -s {MTU_NATT - 28} 10.2.0.10", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    _, packets_before = _sa_counters(outside.ns, spi_a_out)

    # a rebinding under pings: A's next packets leave from a new public port; B's kernel SAs follow
    pinger = subprocess.Popen(["ip", "netns", "exec", lan_a.name, "ping", "-i", "0.1", "-W", "1", "10.2.0.10"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1)
        t0 = time.monotonic()
        nat.rebind(30000, 30099)
        new_port = wait_for("B's SAs on A's new mapping",
                            lambda: (p := _encaps(outside.ns).get(spi_a_in, (0, 0, 0, 0))[3]) >= 30000 and p,
                            timeout=30, interval=0.2, log_of=b)
        moved_after = time.monotonic() - t0
        assert new_port == nat.public_port(4500)
        time.sleep(2)
    finally:
        pinger.send_signal(signal.SIGINT)   # ping prints its statistics on SIGINT
        out, _ = pinger.communicate(timeout=10)
    stats = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    print(f"NAT rebinding followed by B's kernel SAs {moved_after:.1f} s after the flush "
          f"(pings every 0.1 s: {stats.group(2) if stats else '?'} of {stats.group(1) if stats else '?'} answered)")
    assert _encaps(outside.ns) == {spi_a_in: (OUTSIDE4, PUBLIC, 4500, new_port),
                                   spi_a_out: (PUBLIC, OUTSIDE4, new_port, 4500)}
    assert _encaps(inside.ns) == sa_a            # the side behind the NAT stays as it was
    # same SPIs on both sides: no rekey, no new Child SA
    assert (a.installed_child("to-b")["spi_in"], b.installed_child("to-a")["spi_in"]) == (ca["spi_in"], cb["spi_in"])
    assert len(a.sas("to-b")["child_sas"]) == len(b.sas("to-a")["child_sas"]) == 1
    # the moved inbound SA kept its counters, and traffic flows again both ways
    r = _ping(lan_a, "10.2.0.10", 10, 0.05)
    assert r.returncode == 0, out + r.stdout + b.log_tail()
    assert _sa_counters(outside.ns, spi_a_out)[1] >= packets_before + 10
    r = _ping(lan_b, "10.1.0.10", 5, 0.05)
    assert r.returncode == 0, r.stdout
    log_b = b.log_text()
    assert "Child SAs moved to" in log_b and "IKE SA rekeyed" not in log_b and "tunnel to-a rekeyed" not in log_b
    assert _mtu(outside.ns, "xfrm-a") == MTU_NATT


def _sa_counters(ns: Netns, spi: int) -> tuple[int, int]:
    out = ns.run("ip -s xfrm state").stdout
    for block in re.split(r"\n(?=src )", out):
        if re.search(rf"spi {spi:#010x}\b", block):
            m = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", block)
            return int(m.group(1)), int(m.group(2))
    raise AssertionError(f"no SA {spi:#010x}:\n{out}")
