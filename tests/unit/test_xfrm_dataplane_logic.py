"""Pure parts of the Dataplane: how a Child SA becomes two SAs and six policies, the sequence
number jump of a moved SA, and how a failed transaction is undone and reported."""

from __future__ import annotations

import ipaddress
import os

import pytest

from appliance.xfrm import ChildSa, DataplaneError, Endpoints, EspAlgorithms, SaKeys, TunnelInterface, UdpEncap
from appliance.xfrm.dataplane import OSEQ_MARGIN, _advance, _policy_specs, _spec, _Transaction, _Tunnel
from appliance.xfrm.kernel import ReplayState
from appliance.xfrm.netlink import NetlinkError, Request

IP = ipaddress.ip_address


@pytest.fixture
def tunnel():
    return _Tunnel(TunnelInterface("to-b", "xfrm-b"), index=5)


def child(**kw):
    base = dict(spi_in=0xAAAA0001, spi_out=0xBBBB0001, algorithms=EspAlgorithms.from_proposal("aes128gcm16"),
                keys_in=SaKeys(b"\x01" * 20), keys_out=SaKeys(b"\x02" * 20),
                endpoints=Endpoints("192.0.2.1", "192.0.2.2", UdpEncap(4500, 31000)))
    base.update(kw)
    return ChildSa(**base)


def test_a_child_sa_is_two_sas_facing_each_other(tunnel):
    c = child()
    inb, out = _spec(tunnel, c, outbound=False), _spec(tunnel, c, outbound=True)
    assert (inb.src, inb.dst, inb.spi, inb.keys, inb.encap) == (IP("192.0.2.2"), IP("192.0.2.1"), c.spi_in,
                                                                 c.keys_in, (31000, 4500))
    assert (out.src, out.dst, out.spi, out.keys, out.encap) == (IP("192.0.2.1"), IP("192.0.2.2"), c.spi_out,
                                                                 c.keys_out, (4500, 31000))
    assert inb.if_id == out.if_id == inb.reqid == out.reqid == tunnel.iface.if_id
    moved = _spec(tunnel, c, outbound=True, endpoints=Endpoints("192.0.2.11", "192.0.2.2"))
    assert (moved.src, moved.encap) == (IP("192.0.2.11"), None)


def test_six_policies_point_the_right_way(tunnel):
    specs = _policy_specs(tunnel, Endpoints("2001:db8::1", "2001:db8::2"))
    got = sorted((s.direction, str(s.selector), str(s.tmpl_src), str(s.tmpl_dst)) for s in specs)
    assert got == sorted([(d, sel, *(("2001:db8::1", "2001:db8::2") if d == "out" else ("2001:db8::2", "2001:db8::1")))
                          for d in ("out", "in", "fwd") for sel in ("0.0.0.0/0", "::/0")])
    assert {s.if_id for s in specs} == {tunnel.iface.if_id}


def test_moved_outbound_sa_jumps_its_sequence_number():
    r = ReplayState(oseq=1000, replay_window=64)
    assert _advance(r, OSEQ_MARGIN, esn=False, spi=1).oseq == 1000 + OSEQ_MARGIN
    near_end = ReplayState(oseq=0xFFFFFFFF - 10)
    with pytest.raises(NetlinkError, match="too close to the end of its space: rekey it instead"):
        _advance(near_end, OSEQ_MARGIN, esn=False, spi=1)
    esn = _advance(near_end, OSEQ_MARGIN, esn=True, spi=1)
    assert (esn.oseq_hi, esn.oseq) == (1, OSEQ_MARGIN - 11) and esn.outbound_seq == near_end.outbound_seq + OSEQ_MARGIN


def test_failed_transaction_undoes_in_reverse_and_reports():
    done = []
    tx = _Transaction("to-b", "installing Child SA 0x00000101/0x00000102")
    tx.added("the inbound SA 0x00000101", lambda: done.append("in"))
    tx.added("the outbound SA 0x00000102", lambda: done.append("out"))

    def broken():
        raise NetlinkError(1, "removing the policies")

    tx.added("the out policy ::/0", broken)
    err = tx.failed(NetlinkError(17, "adding the outbound SA 0x00000102 192.0.2.1 -> 192.0.2.2"))
    assert done == ["out", "in"]
    assert isinstance(err, DataplaneError) and err.code == 17
    assert err.undone == ("the outbound SA 0x00000102", "the inbound SA 0x00000101")
    assert str(err) == (
        "tunnel 'to-b': installing Child SA 0x00000101/0x00000102 failed: adding the outbound SA 0x00000102 "
        "192.0.2.1 -> 192.0.2.2: File exists (EEXIST) - an SA with this SPI and destination already exists "
        "(duplicate SPI) (rolled back: the outbound SA 0x00000102; the inbound SA 0x00000101) (ROLLBACK "
        "INCOMPLETE, not undone: the out policy ::/0 (removing the policies: Operation not permitted (EPERM)))")


def test_requests_do_not_show_their_keys(tunnel):
    from appliance.xfrm.kernel import Xfrm
    c = child(keys_out=SaKeys(bytes.fromhex("c0ffee" * 6) + b"\x00\x00"))
    req = Xfrm.add_sa_request(_spec(tunnel, c, outbound=True))
    assert isinstance(req, Request)
    assert "c0ffee" not in repr(req) and "\\xc0" not in repr(req)
    assert "c0ffee" not in repr(_spec(tunnel, c, outbound=True))
