"""MOBIKE in the engine (RFC 4555), two engines on the SimNet: the initiator's address changes,
UPDATE_SA_ADDRESSES with NAT detection and COOKIE2, the responder's return routability check,
both sides' SAs at the new address with the same SPIs and no new Child SA; forged, broken and
replayed updates change nothing; a peer without MOBIKE gets no update (the SA is re-made)."""

from __future__ import annotations

import random

from appliance.ike import events as ev
from appliance.ike import message as M
from appliance.ike.constants import ExchangeType, NotifyType
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import DpdConfig
from tests.unit.ike.simnet import A_ADDR, B_ADDR, Faults, SimNet, tunnel

T0 = 1000.0
A_NEW = "192.0.2.11"
A_PRIV, A_PUB = "10.0.0.5", "198.51.100.7"
ATTACKER = "203.0.113.66"


def _net(a_kw=None, b_kw=None, faults=None):
    a_kw = {"mobike": True, **(a_kw or {})}
    b_kw = {"mobike": True, **(b_kw or {})}
    a = IkeEngine([tunnel("a", **a_kw)], random=random.Random(1).randbytes)
    b = IkeEngine([tunnel("b", **b_kw)], random=random.Random(2).randbytes)
    net = SimNet({A_ADDR: a, B_ADDR: b}, faults=faults, now=T0)
    a.start(net.now)
    net.run(5)
    assert a.current_sa("to-b") is not None and b.current_sa("to-a") is not None
    return net, a, b


def _events(net, ip, kind):
    return [e for e in net.events[ip] if isinstance(e, kind)]


def _notifies(msg) -> set[int]:
    return {n.notify_type for n in msg.notifies()} if msg is not None else set()


def _requests_with(net, ip_from, notify):
    """Decoded requests sent by `ip_from` carrying `notify`."""
    return [m for _t, src, m in net.messages
            if src == ip_from and m is not None and not m.is_response and notify in _notifies(m)]


def _spis(sa):
    return (sa.spi_i, sa.spi_r, [(c.spi_in, c.spi_out) for c in sa.children if c.alive])


def _move_a(net, a, new=A_NEW, old=A_ADDR):
    net.readdress(old, new)
    return a.local_address_changed("to-b", new, net.now)


# ------------------------------------------------------------------ negotiation


def test_mobike_supported_is_negotiated_in_ike_auth():
    net, a, b = _net()
    auth = [m for _t, _s, m in net.messages if m is not None and m.exchange_type == ExchangeType.IKE_AUTH]
    assert len(auth) == 2
    for m in auth:
        assert {NotifyType.MOBIKE_SUPPORTED, NotifyType.NO_ADDITIONAL_ADDRESSES} <= _notifies(m)
    assert a.current_sa("to-b").mobike and b.current_sa("to-a").mobike


def test_a_responder_without_mobike_does_not_announce_it():
    net, a, b = _net(b_kw={"mobike": False})
    (resp,) = [m for _t, s, m in net.messages
               if m is not None and m.exchange_type == ExchangeType.IKE_AUTH and m.is_response]
    assert NotifyType.MOBIKE_SUPPORTED not in _notifies(resp)
    assert not a.current_sa("to-b").mobike and not b.current_sa("to-a").mobike


# ------------------------------------------------------------------ the move


def test_initiator_address_change_moves_both_sides_in_place():
    net, a, b = _net()
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    before_a, before_b = _spis(sa_a), _spis(sa_b)
    installed = {ip: len(_events(net, ip, ev.ChildSaInstalled)) for ip in (A_ADDR, B_ADDR)}
    assert _move_a(net, a) == "update"
    net.run(5)
    # the update, with NAT detection redone and a COOKIE2, and B's return routability check
    (upd,) = _requests_with(net, A_NEW, NotifyType.UPDATE_SA_ADDRESSES)
    assert {NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.NAT_DETECTION_DESTINATION_IP,
            NotifyType.COOKIE2} <= _notifies(upd)
    (rr,) = _requests_with(net, B_ADDR, NotifyType.COOKIE2)
    assert NotifyType.UPDATE_SA_ADDRESSES not in _notifies(rr)
    (moved_a,) = _events(net, A_NEW, ev.IkeSaAddressesUpdated)
    (moved_b,) = _events(net, B_ADDR, ev.IkeSaAddressesUpdated)
    assert (moved_a.local, moved_a.remote, moved_a.udp_encap) == ((A_NEW, 500), (B_ADDR, 500), False)
    assert (moved_b.local, moved_b.remote, moved_b.udp_encap) == ((B_ADDR, 500), (A_NEW, 500), False)
    # same IKE SA, same Child SA pair, nothing installed or rekeyed
    assert a.current_sa("to-b") is sa_a and b.current_sa("to-a") is sa_b
    assert _spis(sa_a) == before_a and _spis(sa_b) == before_b
    assert [len(_events(net, ip, ev.ChildSaInstalled)) for ip in (A_NEW, B_ADDR)] == \
        [installed[A_ADDR], installed[B_ADDR]]
    for ip in (A_NEW, B_ADDR):
        assert not _events(net, ip, ev.ChildSaRekeyed) and not _events(net, ip, ev.IkeSaRekeyed)
        assert not _events(net, ip, ev.IkeSaDown)
    assert sa_a.local == (A_NEW, 500) and sa_b.remote == (A_NEW, 500)
    # the SA keeps working at the new address: a Child SA rekey from B reaches A there
    b.rekey_child("to-a", net.now)
    net.run(5)
    (i,) = _events(net, B_ADDR, ev.ChildSaInstalled)[installed[B_ADDR]:]
    assert i.remote_addr == A_NEW
    (i,) = _events(net, A_NEW, ev.ChildSaInstalled)[installed[A_ADDR]:]
    assert i.local_addr == A_NEW


def test_the_responder_moves_its_child_sas_only_after_the_return_routability_check():
    # every return routability request of B is lost: B's IKE SA follows the authenticated update,
    # its Child SAs do not (they would send to an address that never answered)
    def drop(d, _n):
        if d.src[0] != B_ADDR or M.parse_header(d.data).is_response:
            return False
        return d.dst[0] == A_NEW
    net, a, b = _net(b_kw={"dpd": DpdConfig(interval=0, timeout=30, action="clear")})
    net.faults.drop = drop
    _move_a(net, a)
    net.run(3)
    assert b.current_sa("to-a").remote == (A_NEW, 500)
    assert _events(net, A_NEW, ev.IkeSaAddressesUpdated)          # A got its answer
    assert _events(net, B_ADDR, ev.IkeSaAddressesUpdated) == []    # B waits for the check
    net.faults.drop = None
    net.run(30)   # the check's retransmission gets through
    (moved_b,) = _events(net, B_ADDR, ev.IkeSaAddressesUpdated)
    assert moved_b.remote == (A_NEW, 500)


def test_moving_behind_a_nat_floats_to_4500_and_encapsulates():
    net, a, b = _net(b_kw={"remote_addr": None})
    net.nat.update({(A_PRIV, 500): (A_PUB, 40500), (A_PRIV, 4500): (A_PUB, 41500)})
    net._unnat = {v: k for k, v in net.nat.items()}
    assert _move_a(net, a, A_PRIV) == "update"
    net.run(10)
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    assert (sa_a.nat_local, sa_a.nat_remote) == (True, False)
    assert (sa_b.nat_local, sa_b.nat_remote) == (False, True)
    last_a = _events(net, A_PRIV, ev.IkeSaAddressesUpdated)[-1]
    last_b = _events(net, B_ADDR, ev.IkeSaAddressesUpdated)[-1]
    assert (last_a.local, last_a.remote, last_a.udp_encap) == ((A_PRIV, 4500), (B_ADDR, 4500), True)
    assert (last_b.local, last_b.remote, last_b.udp_encap) == ((B_ADDR, 4500), (A_PUB, 41500), True)
    assert len(_events(net, B_ADDR, ev.ChildSaInstalled)) == 1


def test_a_second_move_while_the_first_update_is_in_flight_ends_at_the_last_address():
    net, a, b = _net(faults=Faults(base_delay=0.2))
    _move_a(net, a)
    net.run(0.1)
    assert _move_a(net, a, "192.0.2.12", A_NEW) == "update"
    net.run(20)
    assert a.current_sa("to-b").local == ("192.0.2.12", 500)
    assert b.current_sa("to-a").remote == ("192.0.2.12", 500)
    assert _events(net, B_ADDR, ev.IkeSaAddressesUpdated)[-1].remote == ("192.0.2.12", 500)
    assert _events(net, "192.0.2.12", ev.IkeSaAddressesUpdated)[-1].local == ("192.0.2.12", 500)


def test_mobike_survives_an_ike_sa_rekey():
    net, a, b = _net()
    a.rekey_ike("to-b", net.now)
    net.run(5)
    assert _events(net, A_ADDR, ev.IkeSaRekeyed)
    assert a.current_sa("to-b").mobike and b.current_sa("to-a").mobike
    assert _move_a(net, a) == "update"
    net.run(5)
    assert b.current_sa("to-a").remote == (A_NEW, 500)
    assert _events(net, B_ADDR, ev.IkeSaAddressesUpdated)


def test_the_original_initiator_still_decides_after_the_responder_rekeyed_the_ike_sa():
    # RFC 4555 §3.1: "initiator" is who initiated the first IKE SA, whoever rekeyed since
    net, a, b = _net()
    b.rekey_ike("to-a", net.now)
    net.run(5)
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    assert not sa_a.initiator and sa_b.initiator       # the rekeyed SA was initiated by B
    assert _move_a(net, a) == "update"
    net.run(5)
    assert sa_b.remote == (A_NEW, 500) and _events(net, B_ADDR, ev.IkeSaAddressesUpdated)
    assert b.local_address_changed("to-a", "192.0.2.22", net.now) == "responder"


def test_a_move_while_an_ike_sa_rekey_is_in_flight_is_sent_on_the_new_ike_sa():
    net, a, b = _net(faults=Faults(base_delay=0.2))
    a.rekey_ike("to-b", net.now)
    net.run(0.05)                      # the rekey request is on its way
    assert _move_a(net, a) == "update"
    net.run(20)
    assert _events(net, A_NEW, ev.IkeSaRekeyed) and _events(net, B_ADDR, ev.IkeSaRekeyed)
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    assert sa_a.local == (A_NEW, 500) and sa_b.remote == (A_NEW, 500)
    assert _events(net, B_ADDR, ev.IkeSaAddressesUpdated)[-1].remote == (A_NEW, 500)
    assert (sa_b.spi_i, sa_b.spi_r) == (_events(net, B_ADDR, ev.IkeSaAddressesUpdated)[-1].spi_i,
                                        _events(net, B_ADDR, ev.IkeSaAddressesUpdated)[-1].spi_r)


def test_the_responder_sends_nothing_when_its_own_address_changes():
    net, a, b = _net()
    n = len(net.delivered)
    assert b.local_address_changed("to-a", "192.0.2.22", net.now) == "responder"
    net.run(5)
    assert len(net.delivered) == n


# ------------------------------------------------------------------ what must not move B


def _hold_update(net):
    """Drop A's UPDATE_SA_ADDRESSES requests (the first time each) and keep them."""
    held = []

    def drop(d, _n):
        if d.src[0] != A_NEW:
            return False
        h = M.parse_header(d.data)
        if h.is_response or h.exchange_type != ExchangeType.INFORMATIONAL:
            return False
        if not held:
            held.append(d)
            return True
        return False
    net.faults.drop = drop
    return held


def test_a_forged_or_broken_update_changes_nothing():
    net, a, b = _net()
    sa_b = b.current_sa("to-a")
    held = _hold_update(net)
    _move_a(net, a)
    net.run(0.5)
    (genuine,) = held
    before = (sa_b.remote, sa_b.local, sa_b.peer_mid, sa_b.last_heard)
    # 1. the genuine datagram with its ICV broken, from the attacker's address and from A's new one
    broken = genuine.data[:-1] + bytes([genuine.data[-1] ^ 1])
    for src in ((ATTACKER, 500), (A_NEW, 500)):
        b.receive_datagram(broken, src, (B_ADDR, 500), net.now)
    # 2. an UPDATE_SA_ADDRESSES protected with keys that are not the SA's
    from appliance.ike.crypto import IkeSuite, sk_ciphers
    fake = type(sa_b.keys)(*[bytes(len(getattr(sa_b.keys, f))) for f in sa_b.keys._FIELDS])
    c_i, _c_r = sk_ciphers(sa_b.proposal.derived("ike_suite", IkeSuite.from_proposal), fake)
    msg = M.Message(sa_b.spi_i, sa_b.spi_r, ExchangeType.INFORMATIONAL, sa_b.peer_mid, False, True,
                    [M.Notify(NotifyType.UPDATE_SA_ADDRESSES)], encrypted=True)
    b.receive_datagram(M.encode_message(msg, c_i, bytes(c_i.iv_size)), (ATTACKER, 500), (B_ADDR, 500), net.now)
    # 3. an unprotected one
    plain = M.Message(sa_b.spi_i, sa_b.spi_r, ExchangeType.INFORMATIONAL, sa_b.peer_mid, False, True,
                      [M.Notify(NotifyType.UPDATE_SA_ADDRESSES)])
    b.receive_datagram(M.encode_message(plain), (ATTACKER, 500), (B_ADDR, 500), net.now)
    net.run(0.05)
    assert (sa_b.remote, sa_b.local, sa_b.peer_mid, sa_b.last_heard) == before
    assert _events(net, B_ADDR, ev.IkeSaAddressesUpdated) == []
    assert not any(d.dst[0] == ATTACKER for _t, d in net.delivered)
    # the genuine update (retransmitted by A) still moves B
    net.run(10)
    assert sa_b.remote == (A_NEW, 500) and _events(net, B_ADDR, ev.IkeSaAddressesUpdated)


def test_a_replayed_update_from_another_address_does_not_move_the_sa():
    net, a, b = _net()
    sa_b = b.current_sa("to-a")
    _move_a(net, a)
    net.run(5)
    assert sa_b.remote == (A_NEW, 500)
    (upd,) = [d for _t, d in net.delivered if d.src[0] == A_NEW
              and M.parse_header(d.data).exchange_type == ExchangeType.INFORMATIONAL
              and not M.parse_header(d.data).is_response][:1]
    moves = len(_events(net, B_ADDR, ev.IkeSaAddressesUpdated))
    b.receive_datagram(upd.data, (ATTACKER, 500), (B_ADDR, 500), net.now)
    net.run(5)
    assert sa_b.remote == (A_NEW, 500)
    assert len(_events(net, B_ADDR, ev.IkeSaAddressesUpdated)) == moves


def test_an_update_on_an_sa_without_mobike_is_answered_and_ignored():
    # B does not do MOBIKE; a (misbehaving) A sends UPDATE_SA_ADDRESSES anyway
    net, a, b = _net(b_kw={"mobike": False})
    sa_a, sa_b = a.current_sa("to-b"), b.current_sa("to-a")
    from appliance.ike.mobike import UpdateSaAddresses
    sa_a.mobike_peer = True              # A believes B does MOBIKE
    net.readdress(A_ADDR, A_NEW)
    sa_a.local = (A_NEW, 500)
    sa_a.queue_exchange(UpdateSaAddresses(), net.now)
    net.run(5)
    assert sa_b.remote == (A_ADDR, 500)
    assert _events(net, B_ADDR, ev.IkeSaAddressesUpdated) == []


# ------------------------------------------------------------------ a peer without MOBIKE


def test_without_mobike_no_update_is_sent_and_the_tunnel_is_made_again_from_the_new_address():
    net, a, b = _net(b_kw={"mobike": False, "remote_addr": None})
    old_a = a.current_sa("to-b")
    assert _move_a(net, a) == "no-mobike"
    net.run(30)
    assert _requests_with(net, A_NEW, NotifyType.UPDATE_SA_ADDRESSES) == []
    assert _events(net, A_NEW, ev.IkeSaAddressesUpdated) == []
    assert _events(net, B_ADDR, ev.IkeSaAddressesUpdated) == []
    new_a, new_b = a.current_sa("to-b"), b.current_sa("to-a")
    assert new_a is not None and new_a is not old_a and new_a.local == (A_NEW, 500)
    assert new_b is not None and new_b.remote == (A_NEW, 500)
    assert a.local_address("to-b") == A_NEW


def test_with_mobike_an_implicit_update_follows_a_new_port_but_never_a_new_address():
    # RFC 4555 §3.8: with MOBIKE the address changes by UPDATE_SA_ADDRESSES only; a NAT rebinding
    # (same public address, another port) is still followed as RFC 7296 §2.23 says
    dpd = DpdConfig(interval=30, timeout=60, action="restart")
    a = IkeEngine([tunnel("a", local_addr=A_PRIV, mobike=True, dpd=dpd)], random=random.Random(1).randbytes)
    b = IkeEngine([tunnel("b", remote_addr=None, mobike=True)], random=random.Random(2).randbytes)
    net = SimNet({A_PRIV: a, B_ADDR: b}, now=T0,
                 nat={(A_PRIV, 500): (A_PUB, 40500), (A_PRIV, 4500): (A_PUB, 41500)})
    a.start(net.now)
    net.run(5)
    sa_b = b.current_sa("to-a")
    assert sa_b.mobike and sa_b.nat_remote and sa_b.remote == (A_PUB, 41500)
    net.rebind((A_PRIV, 4500), (A_PUB, 52000))          # new port: followed on the next message
    a.rekey_child("to-b", net.now)
    net.run(5)
    assert sa_b.remote == (A_PUB, 52000)
    n = len(_events(net, B_ADDR, ev.IkeSaAddressesUpdated))
    assert n == 1
    net.rebind((A_PRIV, 4500), ("198.51.100.99", 52000))  # another public address: not followed
    a.rekey_child("to-b", net.now)
    net.run(5)
    assert sa_b.remote == (A_PUB, 52000) and len(_events(net, B_ADDR, ev.IkeSaAddressesUpdated)) == n


def test_ike_sa_init_to_our_new_address_finds_the_tunnel_even_if_one_came_there_before_the_move():
    # The responder's offer per address pair (issue 13) depends on the tunnel's local address:
    # a request that reached the new address before rtnetlink told us (no tunnel then) must not
    # leave that answer cached once the address is ours.
    b = IkeEngine([tunnel("b", mobike=True)], random=random.Random(2).randbytes)
    new = ("192.0.2.22", 500)
    assert b.responder_offer(new, (A_ADDR, 500)).candidates == []
    assert b.local_address_changed("to-a", new[0], T0) == "no-sa"
    assert [c.name for c in b.responder_offer(new, (A_ADDR, 500)).candidates] == ["to-a"]
    assert b.responder_offer((B_ADDR, 500), (A_ADDR, 500)).candidates == []
