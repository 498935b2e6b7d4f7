"""Authentic but nonsensical messages: an established SA is sent well-formed, correctly
encrypted requests and responses with arbitrary payloads (hypothesis). Nothing may escape the
engine, and the tunnel must survive or recover."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from appliance.ike import message as M
from appliance.ike.constants import ExchangeType
from appliance.ike.policy import DpdConfig
from tests.unit.ike.simnet import A_ADDR, B_ADDR, SimNet, installed_pair_ok, make_engines, one_ike_sa_each
from tests.unit.ike.test_message import _payloads


def _up() -> SimNet:
    # with liveness checks, so that a side whose SA the forged message removed is noticed
    dpd = DpdConfig(interval=10, timeout=30, action="restart")
    a, b = make_engines(3, dict(dpd=dpd), dict(dpd=dpd))
    net = SimNet({A_ADDR: a, B_ADDR: b})
    a.start(net.now)
    net.run(2)
    return net


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(ExchangeType.INFORMATIONAL, False, [M.Delete(1, [])], B_ADDR, 1)
@given(st.sampled_from([ExchangeType.IKE_AUTH, ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL, 99]),
       st.booleans(), st.lists(_payloads, max_size=6), st.sampled_from([A_ADDR, B_ADDR]),
       st.integers(0, 4))
def test_authentic_garbage_never_escapes_and_the_tunnel_recovers(xchg, response, payloads, target, mid_delta):
    net = _up()
    receiver = net.engines[target]
    name = "to-b" if target == A_ADDR else "to-a"
    sa = receiver.current_sa(name)
    # forge a message from the peer, protected with the peer's direction keys
    peer_is_initiator = not sa.initiator
    mid = (sa.peer_mid if not response else sa.my_mid) + mid_delta - 1
    msg = M.Message(sa.spi_i, sa.spi_r, xchg, max(mid, 0), response, peer_is_initiator, payloads, encrypted=True)
    data = M.encode_message(msg, sa.cipher_in, bytes(sa.cipher_in.iv_size))
    src = (B_ADDR if target == A_ADDR else A_ADDR, 500)
    receiver.receive_datagram(data, src, (target, 500), net.now)
    net.run(600)
    problems = installed_pair_ok(net) + one_ike_sa_each(net)
    assert problems == [], problems
