"""Acceptance: a rekey under continuous traffic loses no packet; MOBIKE moves a live tunnel to new
addresses (and onto UDP) keeping its counters and sequence numbers, and a failed move is rolled
back; the kernel's soft and hard EXPIRE and its ACQUIRE reach the daemon as tunnel events."""

from __future__ import annotations

import re
import select
import subprocess
import time

import pytest

from appliance.xfrm import ChildSaExpire, DataplaneError, Endpoints, Lifetime, TunnelAcquire, UdpEncap
from appliance.xfrm.dataplane import OSEQ_MARGIN
from tests.lab.xfrm_env import (
    A_IF,
    A_TUNNEL,
    B_TUNNEL,
    INNER4,
    WAN4,
    WAN4_MOVED,
    Lab,
    child_pair,
    link,
    ping,
    xfrm_policies,
    xfrm_states,
)


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    yield lab
    lab.close()


def test_rekey_under_continuous_traffic_loses_nothing(lab):
    ca, cb = child_pair("aes256gcm16", esn=True, replay_window=128)
    lab.up(ca, cb)
    try:
        na, nb = child_pair("aes256gcm16", esn=True, replay_window=128)
        pinger = subprocess.Popen(["ip", "netns", "exec", lab.a.name, "ping", "-n", "-q", "-c", "1000", "-i", "0.005",
                                   "-W", "2", INNER4[1]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # wait until the old Child SA has carried a good part of the pings
            deadline = time.monotonic() + 60
            while lab.dpa.counters(A_TUNNEL)[0].outbound.packets < 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            # The order IKE gives (RFC 7296 §2.8): the responder installs the new inbound SA when it
            # answers CREATE_CHILD_SA, the initiator installs both and switches, the responder
            # switches its outbound side; then each side deletes the old Child SA.
            lab.dpb.rekey(B_TUNNEL, nb, outbound=False)
            lab.dpa.rekey(A_TUNNEL, na)
            lab.dpb.activate_outbound(B_TUNNEL, nb.spi_in)
            time.sleep(0.5)
            mid = {c.spi_in: c for c in lab.dpa.counters(A_TUNNEL)}
            lab.dpa.retire(A_TUNNEL, ca.spi_in)
            lab.dpb.retire(B_TUNNEL, cb.spi_in)
            out, _ = pinger.communicate(timeout=180)
        finally:
            if pinger.poll() is None:
                pinger.kill()
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m and (m.group(1), m.group(2)) == ("1000", "1000"), out
        # both Child SAs carried a share of the same stream
        assert mid[ca.spi_in].inbound.packets >= 150, mid
        assert mid[na.spi_in].outbound.packets > 0 and mid[na.spi_in].inbound.packets > 0, mid
        assert mid[ca.spi_in].outbound is None  # withdrawn by the rekey
        final = lab.dpa.counters(A_TUNNEL)
        assert [c.spi_in for c in final] == [na.spi_in]
        assert final[0].outbound.packets + mid[ca.spi_in].inbound.packets >= 1000
        assert {s["spi"] for s in xfrm_states(lab.a)} == {na.spi_in, na.spi_out}
        assert {s["spi"] for s in xfrm_states(lab.b)} == {nb.spi_in, nb.spi_out}
        assert all("esn" in s["flags"] for s in xfrm_states(lab.a))
        assert lab.dpa.status(A_TUNNEL).outbound == na.spi_in
    finally:
        lab.down()


def test_mobike_moves_the_tunnel_with_its_state(lab):
    ca, cb = child_pair("aes128gcm16")
    lab.up(ca, cb)
    try:
        assert ping(lab.a, INNER4[1], count=20, interval=0.02).received == 20
        before_a, before_b = lab.dpa.counters(A_TUNNEL)[0], lab.dpb.counters(B_TUNNEL)[0]
        # A's address changes and a NAT appears: both sides move to the new path, over UDP 4500
        lab.reset_probe()
        lab.dpa.update_endpoints(A_TUNNEL, Endpoints(WAN4_MOVED, WAN4[1], UdpEncap()))
        lab.dpb.update_endpoints(B_TUNNEL, Endpoints(WAN4[1], WAN4_MOVED, UdpEncap()))
        states = {s["spi"]: s for s in xfrm_states(lab.a)}
        assert (states[ca.spi_out]["src"], states[ca.spi_out]["dst"]) == (WAN4_MOVED, WAN4[1])
        assert (states[ca.spi_in]["src"], states[ca.spi_in]["dst"]) == (WAN4[1], WAN4_MOVED)
        assert states[ca.spi_out]["encap"] == ("espinudp", 4500, 4500)
        tmpls = {p["tmpl"] for p in xfrm_policies(lab.a) if p["if_id"] == lab.iface_a.if_id}
        assert tmpls == {(WAN4_MOVED, WAN4[1]), (WAN4[1], WAN4_MOVED)}
        assert link(lab.a, A_IF)["mtu"] == 1438  # UDP encapsulation costs 8 bytes

        assert ping(lab.a, INNER4[1], count=10, interval=0.02).received == 10
        after_a, after_b = lab.dpa.counters(A_TUNNEL)[0], lab.dpb.counters(B_TUNNEL)[0]
        # counters carried over, the outbound sequence jumped ahead, the peer accepted it all
        assert after_a.outbound.packets >= before_a.outbound.packets + 10
        assert after_a.outbound.bytes > before_a.outbound.bytes
        assert after_a.outbound.add_time == before_a.outbound.add_time
        assert after_a.outbound.seq >= before_a.outbound.seq + OSEQ_MARGIN + 10
        assert after_b.inbound.seq == after_a.outbound.seq
        assert after_b.inbound.replay_errors == 0 and after_b.inbound.integrity_failures == 0
        assert lab.probe_counters()["natt"] >= 10
    finally:
        lab.down()


def test_failed_move_is_rolled_back(lab):
    ca, cb = child_pair("aes128gcm16")
    lab.up(ca, cb)
    foreign = (f"ip xfrm state add src {WAN4[1]} dst {WAN4_MOVED} proto esp spi {ca.spi_in:#x} mode tunnel "
               f"aead 'rfc4106(gcm(aes))' 0x{'77' * 20} 128 if_id 7")
    lab.a.run(foreign)  # someone else holds the SPI at the new address
    try:
        before = sorted((s["src"], s["dst"], s["spi"]) for s in xfrm_states(lab.a))
        with pytest.raises(DataplaneError) as e:
            lab.dpa.update_endpoints(A_TUNNEL, Endpoints(WAN4_MOVED, WAN4[1]))
        text = str(e.value)
        assert "tunnel 'to-b'" in text and "EEXIST" in text and "rolled back" in text, text
        assert sorted((s["src"], s["dst"], s["spi"]) for s in xfrm_states(lab.a)) == before
        tmpls = {p["tmpl"] for p in xfrm_policies(lab.a) if p["if_id"] == lab.iface_a.if_id}
        assert tmpls == {(WAN4[0], WAN4[1]), (WAN4[1], WAN4[0])}
        # the restored inbound SA kept its replay state: traffic still flows both ways
        assert ping(lab.a, INNER4[1], count=5, interval=0.02).received == 5
        assert lab.dpa.counters(A_TUNNEL)[0].inbound.replay_errors == 0
    finally:
        lab.a.run(f"ip xfrm state del src {WAN4[1]} dst {WAN4_MOVED} proto esp spi {ca.spi_in:#x}", check=False)
        lab.down()


def _collect(events, want, timeout=20.0):
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not want(got):
        select.select([events], [], [], 0.2)
        got.extend(events.read())
    return got


def test_expire_and_acquire_events(lab):
    events = lab.dpa.events()
    try:
        ca, cb = child_pair("aes128gcm16", lifetime_a=Lifetime(soft_packets=4, hard_packets=8))
        lab.up(ca, cb)
        try:
            ping(lab.a, INNER4[1], count=12, interval=0.05, wait=1)

            def done(got):
                return any(isinstance(e, ChildSaExpire) and e.hard and e.outbound for e in got) and \
                    any(isinstance(e, TunnelAcquire) for e in got)

            got = _collect(events, done)
            expires = [e for e in got if isinstance(e, ChildSaExpire)]
            out = [e for e in expires if e.outbound]
            assert [e.hard for e in out] == [False, True], got
            assert all(e.tunnel == A_TUNNEL and e.spi == ca.spi_out and e.spi_in == ca.spi_in for e in out)
            assert out[0].packets >= 4 and out[1].packets >= 8
            acquires = [e for e in got if isinstance(e, TunnelAcquire)]
            assert acquires and acquires[0].tunnel == A_TUNNEL
            assert (str(acquires[0].local), str(acquires[0].remote)) == WAN4
            # the hard expiry removed the outbound SA from the kernel
            assert lab.dpa.counters(A_TUNNEL)[0].outbound is None
        finally:
            lab.down()
    finally:
        events.close()


def test_sa_update_lookup_and_time_limits(lab):
    """The low-level operations on their own: NEWSA with time limits, GETSA by id (no key comes
    back), UPDSA changing the NAT-T port, the kernel's soft and hard EXPIRE after 1 and 3 s."""
    import dataclasses
    import ipaddress

    from appliance.xfrm import EspAlgorithms, SaKeys
    from appliance.xfrm.kernel import SaSpec, decode_sa
    from appliance.xfrm.messages import XFRM_MSG_EXPIRE, XFRMNLGRP_EXPIRE
    from appliance.xfrm.model import IF_ID_MIN
    from appliance.xfrm.netlink import XfrmEventSocket

    x = lab.dpa.xfrm
    key = SaKeys(bytes.fromhex("5a" * 36))
    spec = SaSpec(src=ipaddress.ip_address(WAN4[0]), dst=ipaddress.ip_address("198.51.100.9"), spi=0x7001,
                  algorithms=EspAlgorithms.from_proposal("aes256gcm16"), keys=key, if_id=IF_ID_MIN + 0x77, reqid=9,
                  outbound=True, encap=(4500, 4500), lifetime=Lifetime(soft_seconds=1, hard_seconds=3))
    events = XfrmEventSocket([XFRMNLGRP_EXPIRE], lab.a.name)
    try:
        x.add_sa(spec)
        st = x.get_sa(spec.dst, spec.spi)
        assert (st.encryption, st.icv_bits, st.encap, st.if_id, st.reqid) == (
            "rfc4106(gcm(aes))", 128, (2, 4500, 4500), IF_ID_MIN + 0x77, 9)
        assert (st.lifetime.soft_seconds, st.lifetime.hard_seconds) == (1, 3) and st.ours
        assert "5a5a" not in repr(st)
        x.add_sa(dataclasses.replace(spec, encap=(4500, 31000)), update=True)
        assert {s["spi"]: s["encap"] for s in xfrm_states(lab.a)}[0x7001] == ("espinudp", 4500, 31000)
        assert 0x7001 in {s.spi for s in x.dump_sas()}
        hard = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(h for h, _ in hard):
            select.select([events], [], [], 0.5)
            hard += [(bool(msg["hard"]), decode_sa(msg).spi) for msg in events.read()
                     if msg["header"]["type"] == XFRM_MSG_EXPIRE]
        assert hard == [(False, 0x7001), (True, 0x7001)], hard
        assert x.get_sa(spec.dst, spec.spi) is None
    finally:
        events.close()
        x.delete_sa(spec.dst, spec.spi, missing_ok=True)
