"""The failure reasons when a large IKE_AUTH is lost on a path that drops IP fragments and IKE
fragmentation (RFC 7383) was not negotiated: they say so, and what to do (issue 10 item 3).
The host counterpart with strongSwan: tests/host/test_fragmentation_certs.py."""

from __future__ import annotations

import pytest

from appliance.ike import events as ev
from tests.unit.ike.simnet import A_ADDR, B_ADDR, Faults
from tests.unit.ike.test_fragmentation import _drops_ip_fragments, _fast_retransmit, _frag, _kw, _net


def _failures(net, ip):
    return [e.reason for e in net.events[ip] if isinstance(e, ev.IkeSaFailed)]


@pytest.mark.parametrize("off", ["a", "b"])
def test_the_reason_names_ike_fragmentation_when_the_whole_ike_auth_was_lost(off):
    kw_off = _kw(_frag(enabled=False), retransmit=_fast_retransmit(), half_open_timeout=5)
    kw_on = _kw(retransmit=_fast_retransmit(), half_open_timeout=5)
    a_kw, b_kw = (kw_off, kw_on) if off == "a" else (kw_on, kw_off)
    net = _net(a_kw, b_kw, Faults(drop=_drops_ip_fragments))
    net.run(60)
    (a_reason, *_) = _failures(net, A_ADDR)
    assert a_reason.startswith("no response to IKE_AUTH after retransmissions (it went as one ")
    assert ("IKE fragmentation (RFC 7383) is off here" if off == "a"
            else "IKE fragmentation (RFC 7383) is not supported by the peer") in a_reason
    b_reasons = _failures(net, B_ADDR)      # the responder's half-open SA for it expired
    assert b_reasons and all(r.startswith("half-open IKE SA expired") for r in b_reasons)
    # B only hints at fragmentation when it is B that has it off and A asked for it
    assert all(("supports IKE fragmentation" in r) == (off == "b") for r in b_reasons)


def test_no_hint_when_the_message_was_small_or_fragmented():
    # a path dropping everything after IKE_SA_INIT: the IKE_AUTH (small, whole) is lost for
    # another reason, and the reason does not blame fragmentation
    def drop(d, n):
        return n >= 2
    net = _net({"retransmit": _fast_retransmit()}, {"retransmit": _fast_retransmit()}, Faults(drop=drop))
    net.run(60)
    (reason, *_) = _failures(net, A_ADDR)
    assert reason == "no response to IKE_AUTH after retransmissions"
