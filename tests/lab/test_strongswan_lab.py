"""strongSwan ⟷ strongSwan in the lab guest, where Child SAs go into the real XFRM state
(kernel-netlink), as they will on the appliance. Proves the harness's lab mode: SPIs and keys that
list_sas() reports are the ones in `ip xfrm state`, and they carry traffic over XFRM interfaces.
Template for "our engine vs strongSwan" data-plane tests.
"""

from __future__ import annotations

import re

import pytest

from tests.netns import Netns
from tests.peers.strongswan import Child, Conn, StrongSwan, spis_match
from tests.peers.topology import pair_of_namespaces

PSK = "lab-Secret-0123456789"
IF_ID = 42


def xfrm_states(ns: Netns) -> dict[int, dict]:
    """SPI → {src, dst, key (bytes), if_id, encap} of every ESP state in `ns`."""
    out = ns.run("ip xfrm state").stdout
    states = {}
    for block in re.split(r"\n(?=src )", out.strip()):
        if not block:
            continue
        spi = re.search(r"proto esp spi (0x[0-9a-f]+)", block)
        key = re.search(r"aead \S+ 0x([0-9a-f]+) \d+", block)
        ifid = re.search(r"if_id (0x[0-9a-f]+)", block)
        src, dst = re.match(r"src (\S+) dst (\S+)", block).groups()
        assert spi and key, block
        states[int(spi[1], 16)] = {"src": src, "dst": dst, "key": bytes.fromhex(key[1]),
                                   "if_id": int(ifid[1], 16) if ifid else None, "encap": "encap " in block}
    return states


@pytest.fixture
def lab_pair(tmp_path):
    with pair_of_namespaces("lab") as (sa, sb):
        a = StrongSwan(tmp_path / "A", sa.name, name="A")
        b = StrongSwan(tmp_path / "B", sb.name, name="B")
        assert a.kernel == b.kernel == "netlink"
        try:
            a.start()
            b.start()
            conn = Conn(local_addrs=[sa.addr4], remote_addrs=[sb.addr4], local_id="a.example.net",
                        remote_id="b.example.net", psk=PSK, children=[Child(if_id_in=IF_ID, if_id_out=IF_ID)])
            a.load(conn)
            b.load(conn.mirrored())
            # Route-based VPN: an XFRM interface bound to the Child SA's if_id in each namespace.
            for side, inner in ((sa, "169.254.42.1/30"), (sb, "169.254.42.2/30")):
                side.ns.run(f"ip link add xfrm{IF_ID} type xfrm dev {side.ifname} if_id {IF_ID}")
                side.ns.run(f"ip addr add {inner} dev xfrm{IF_ID}")
                side.ns.run(f"ip link set xfrm{IF_ID} up")
            yield sa, sb, a, b
        finally:
            a.close()
            b.close()


def check_kernel_matches(side_a, side_b, a: StrongSwan, b: StrongSwan):
    sa, sb = a.wait_ike_up(), b.wait_ike_up()
    assert spis_match(sa, sb)
    ca, = sa.installed()
    assert not ca.encap, "no NAT between the namespaces: plain ESP"
    sta, stb = xfrm_states(side_a.ns), xfrm_states(side_b.ns)
    out, inn = sta[ca.spi_out_int], sta[ca.spi_in_int]
    assert (out["src"], out["dst"]) == (side_a.addr4, side_b.addr4)
    assert out["key"] == ca.keys.encr_out and inn["key"] == ca.keys.encr_in
    assert out["if_id"] == inn["if_id"] == IF_ID
    assert stb[ca.spi_out_int]["key"] == ca.keys.encr_out  # same SA at the other end
    return sa, sb


def ping(side, to: str) -> None:
    r = side.ns.run(f"ping -c 3 -i 0.2 -W 2 {to}", check=False)
    assert " 0% packet loss" in r.stdout, r.stdout + r.stderr


def test_child_sa_in_the_kernel_carries_traffic(lab_pair):
    side_a, side_b, a, b = lab_pair
    a.initiate("c")
    check_kernel_matches(side_a, side_b, a, b)
    ping(side_a, "169.254.42.2")
    c, = a.wait_ike_up().installed()
    assert c.bytes_out > 0 and c.bytes_in > 0


def test_rekeys_then_delete_leave_the_kernel_consistent(lab_pair):
    side_a, side_b, a, b = lab_pair
    a.initiate("c")
    sa, _ = check_kernel_matches(side_a, side_b, a, b)
    old = sa.installed()[0]

    m = a.mark()
    b.rekey(child="c")
    a.wait_event("child-rekey", since=m)
    new_a = a.wait_for(lambda s: len(s) == 1 and len(s[0].installed()) == 1
                       and s[0].installed()[0].spi_in != old.spi_in and s[0], what="rekeyed Child SA")
    check_kernel_matches(side_a, side_b, a, b)
    ping(side_a, "169.254.42.2")

    m = b.mark()
    a.rekey(ike="p")
    b.wait_event("ike-rekey", since=m)
    b.wait_for(lambda s: len(s) == 1 and s[0].spi_i != sa.spi_i and s[0].state == "ESTABLISHED",
               what="rekeyed IKE SA")
    a.wait_for(lambda s: len(s) == 1 and s[0].spi_i != sa.spi_i and s[0].state == "ESTABLISHED",
               what="rekeyed IKE SA")
    check_kernel_matches(side_a, side_b, a, b)
    assert a.wait_ike_up().installed()[0].spi_in == new_a.installed()[0].spi_in
    ping(side_b, "169.254.42.1")

    a.terminate(ike="p")
    b.wait_no_ike()
    for side in (side_a, side_b):
        assert xfrm_states(side.ns) == {}, "DELETE must remove every state"
