"""Acceptance: two regions, a Dataplane in each fed matching keys, carry ping and TCP across their
XFRM interfaces for every transform the appliance negotiates, over IPv4 and IPv6 underlays, with
and without ESP-in-UDP; the counters read back equal the traffic; the interface MTU is the one the
kernel itself derives; nothing crosses the underlay in clear; `down` leaves nothing behind.

One pair of namespaces serves all 16 cases (one guest boot for the module).
"""

from __future__ import annotations

import pytest

from tests.lab.xfrm_env import (
    A_IF,
    A_TUNNEL,
    B_IF,
    INNER4,
    INNER6,
    WAN4,
    WAN6,
    Lab,
    child_pair,
    clamp_rules,
    kernel_pmtu,
    link,
    ping,
    tcp_retransmitted_segments,
    tcp_transfer,
    xfrm_policies,
    xfrm_states,
)

PROPOSALS = {
    "aes128gcm16": "rfc4106(gcm(aes))",
    "aes256gcm16": "rfc4106(gcm(aes))",
    "chacha20poly1305": "rfc7539esp(chacha20,poly1305)",
    "aes128-sha256": "cbc(aes)",
}

# Inner MTU on a 1500-byte underlay, worked out by hand from esp4/esp6 (header: ESP 8 + IV + outer
# IP [+ UDP 8]; payload aligned to the block (4 for the AEADs, 16 for CBC); ICV 16; 2 trailer bytes).
EXPECTED_MTU = {
    # (AEAD with 8-byte IV?, outer, udp): mtu
    (True, 4, False): 1446, (True, 4, True): 1438, (True, 6, False): 1426, (True, 6, True): 1418,
    (False, 4, False): 1438, (False, 4, True): 1422, (False, 6, False): 1406, (False, 6, True): 1406,
}

CASES = [pytest.param(p, outer, encap, id=f"{p}-ipv{outer}{'-udp' if encap else ''}")
         for p in PROPOSALS for outer in (4, 6) for encap in (False, True)]


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    yield lab
    lab.close()


@pytest.mark.parametrize("proposal,outer,encap", CASES)
def test_tunnel_carries_traffic(lab, proposal, outer, encap):
    ca, cb = child_pair(proposal, outer, encap)
    wan = WAN4 if outer == 4 else WAN6
    if_id = lab.iface_a.if_id
    lab.reset_probe()
    lab.up(ca, cb)
    try:
        # The kernel holds what we meant, as iproute2 sees it.
        sas = {s["spi"]: s for s in xfrm_states(lab.a)}
        assert set(sas) == {ca.spi_in, ca.spi_out}
        out, inb = sas[ca.spi_out], sas[ca.spi_in]
        assert (out["src"], out["dst"], inb["src"], inb["dst"]) == (wan[0], wan[1], wan[1], wan[0])
        assert out["alg"] == inb["alg"] == PROPOSALS[proposal]
        assert out["if_id"] == inb["if_id"] == if_id
        assert "af-unspec" in out["flags"]
        assert out["encap"] == (("espinudp", 4500, 4500) if encap else None)
        pols = sorted((p["dir"], p["src"], p["tmpl"]) for p in xfrm_policies(lab.a) if p["if_id"] == if_id)
        fwd, back = (wan[0], wan[1]), (wan[1], wan[0])
        assert pols == sorted([(d, sel, fwd if d == "out" else back)
                               for d in ("in", "out", "fwd") for sel in ("0.0.0.0/0", "::/0")])

        # MTU: what we set is what the kernel derives for this SA, and the boundary holds.
        mtu = EXPECTED_MTU[(proposal != "aes128-sha256", outer, encap)]
        assert link(lab.a, A_IF)["mtu"] == mtu and link(lab.b, B_IF)["mtu"] == mtu
        assert link(lab.a, A_IF)["up"] and link(lab.b, B_IF)["up"]
        assert kernel_pmtu(lab.a, A_IF, INNER4[1], mtu) == mtu
        assert ping(lab.a, INNER4[1], count=1, size=mtu - 28, df=True).received == 1
        too_big = ping(lab.a, INNER4[1], count=1, size=mtu - 27, df=True, wait=1)
        assert too_big.received == 0 and str(mtu) in too_big.text, too_big.text

        # Ping, IPv4 and IPv6 inside, counted packet for packet (plus at most a few IPv6
        # link-local packets the kernel itself sends on a new interface).
        a0, b0 = lab.dpa.counters(A_TUNNEL)[0], lab.dpb.counters("to-a")[0]
        assert ping(lab.a, INNER4[1], count=10, size=1000, interval=0.02).received == 10
        assert ping(lab.a, INNER6[1], count=10, size=1000, interval=0.02).received == 10
        a1, b1 = lab.dpa.counters(A_TUNNEL)[0], lab.dpb.counters("to-a")[0]
        icmp_bytes = 10 * (1000 + 8 + 20) + 10 * (1000 + 8 + 40)
        for before, after in ((a0.outbound, a1.outbound), (b0.inbound, b1.inbound),
                              (b0.outbound, b1.outbound), (a0.inbound, a1.inbound)):
            packets, octets = after.packets - before.packets, after.bytes - before.bytes
            assert 20 <= packets <= 26 and icmp_bytes <= octets <= icmp_bytes + 6 * 120, (packets, octets)
        assert a1.outbound.seq >= 20 and b1.inbound.seq == a1.outbound.seq
        assert a1.inbound.replay_errors == 0 and a1.inbound.integrity_failures == 0
        # our reading agrees with iproute2's
        assert {s["spi"]: s["packets"] for s in xfrm_states(lab.a)}[ca.spi_out] - a1.outbound.packets in (0, 1, 2)

        # TCP, both inner families; the SA counts inner bytes (the sender per skb, before GSO).
        retrans0 = tcp_retransmitted_segments(lab.a)
        tcp_transfer(lab.b, INNER4[1], lab.a, 192 * 1024)
        tcp_transfer(lab.b, INNER6[1], lab.a, 64 * 1024, port=5002)
        a2, b2 = lab.dpa.counters(A_TUNNEL)[0], lab.dpb.counters("to-a")[0]
        sent = 256 * 1024
        # Retransmitted segments (a loaded machine delays ACKs) cross the SA again: allow for them.
        resent = (tcp_retransmitted_segments(lab.a) - retrans0) * mtu
        for before, after in ((a1.outbound, a2.outbound), (b1.inbound, b2.inbound)):
            octets = after.bytes - before.bytes
            assert sent <= octets < sent * 1.1 + 8192 + resent, (octets, resent)
        assert b2.inbound.packets - b1.inbound.packets >= sent // mtu

        # On the underlay: ESP (or ESP in UDP) only, no clear text.
        wire = lab.probe_counters()
        assert wire["clear"] == 0, wire
        if encap:
            assert wire["natt"] > 0 and wire["esp"] == 0, wire
        else:
            assert wire["esp"] > 0 and wire["natt"] == 0, wire
    finally:
        lab.down()

    # Down leaves no SA, no policy, no clamp; the interface stays, down.
    assert xfrm_states(lab.a) == [] and xfrm_states(lab.b) == []
    assert [p for p in xfrm_policies(lab.a) if p["if_id"] == if_id] == []
    assert not link(lab.a, A_IF)["up"]
    assert clamp_rules(lab.a) == []
