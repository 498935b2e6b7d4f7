"""Hybrid post-quantum IKE SAs (RFC 9242 IKE_INTERMEDIATE, RFC 9370 additional key exchanges,
ML-KEM-768/1024) between two engines on the SimNet: the hybrid proposal agreed and the Child SA
up, the ML-KEM secret in SKEYSEED (recomputed here from the wire and the injected randomness),
policy (hybrid required / optional against a classic-only peer), rekeys, bad KE data, a lost
IKE_INTERMEDIATE response."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem

from appliance.ike import events as ev
from appliance.ike import message as M
from appliance.ike.constants import DhId, ExchangeType, NotifyType
from appliance.ike.crypto import prf_plus
from appliance.ike.engine import IkeEngine
from appliance.ike.intermediate import IkeIntermediate
from tests.unit.ike.simnet import (A_ADDR, B_ADDR, Faults, SimNet, installed_pair_ok,
                                   one_ike_sa_each, tunnel)

HYBRID = "aes256gcm16-prfsha384-x25519-ke1_mlkem768"
HYBRID_1024 = "aes256gcm16-prfsha384-x25519-ke1_mlkem1024"
CLASSIC = "aes256gcm16-prfsha384-x25519"
T0 = 1000.0


def _net(a_ike, b_ike, *, seed=1, faults=None, a_kw=None, b_kw=None, random_a=None):
    ra = random_a or random.Random(seed).randbytes
    a = IkeEngine([tunnel("a", ike=a_ike, **(a_kw or {}))], random=ra)
    b = IkeEngine([tunnel("b", ike=b_ike, **(b_kw or {}))], random=random.Random(seed + 1000).randbytes)
    net = SimNet({A_ADDR: a, B_ADDR: b}, faults=faults, now=T0)
    return net, a, b


def _up(net, a, run=20.0):
    a.start(net.now)
    net.run(run)


def _of(net, ip, kind):
    return [e for e in net.events[ip] if isinstance(e, kind)]


def _exchanges(net):
    return [s for _t, _f, _to, s in net.trace]


# ------------------------------------------------------------------ agreement


@pytest.mark.parametrize("proposal, methods", [
    (HYBRID, (DhId.ML_KEM_768,)),
    (HYBRID_1024, (DhId.ML_KEM_1024,)),
    ("aes256gcm16-prfsha384-x25519-ke1_ecp384-ke2_mlkem768", (DhId.ECP_384, DhId.ML_KEM_768)),
])
def test_two_engines_agree_the_hybrid_proposal_and_the_child_sa_comes_up(proposal, methods):
    net, a, b = _net(proposal, proposal)
    _up(net, a)
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    for ip in (A_ADDR, B_ADDR):
        (up,) = _of(net, ip, ev.IkeSaUp)
        assert up.proposal == proposal
    trace = _exchanges(net)
    assert "N(INTERMEDIATE_EXCHANGE_SUPPORTED)" in trace[0] and "N(INTERMEDIATE_EXCHANGE_SUPPORTED)" in trace[1]
    n = len(methods)
    for mid in range(1, n + 1):
        assert any(s.startswith(f"IKE_INTERMEDIATE request {mid} ") for s in trace), trace
        assert any(s.startswith(f"IKE_INTERMEDIATE response {mid} ") for s in trace), trace
    assert any(s.startswith(f"IKE_AUTH request {n + 1} ") for s in trace), trace
    for e in (a, b):
        (sa,) = e.sas()
        assert sa.addke_done == tuple(methods) and sa.addke_todo == ()
        assert len(sa.int_auth_i) == 48 and len(sa.int_auth_r) == 48   # prfsha384 chains


def test_mlkem1024_intermediate_is_fragmented_on_a_1280_octet_path():
    # the 1568-octet encapsulation key does not fit 1280 octets: RFC 7383 carries it (RFC 9242 §3)
    too_big = []
    net, a, b = _net(HYBRID_1024, HYBRID_1024, faults=Faults(
        drop=lambda d, n: too_big.append(len(d.data)) or len(d.data) + 28 > 1280))
    _up(net, a)
    assert installed_pair_ok(net) == []
    assert any("IKE_INTERMEDIATE request 1 [ SKF(" in s for s in _exchanges(net))


# ------------------------------------------------------------------ the ML-KEM secret in SKEYSEED


class _Recording:
    """The engine's injected random source, remembering every draw."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.draws: list[bytes] = []

    def __call__(self, n):
        b = self.rng.randbytes(n)
        self.draws.append(b)
        return b


def _keys_after_init_and_final(seed=1, proposal=HYBRID):
    rec = _Recording(seed)
    net, a, b = _net(proposal, proposal, random_a=rec)
    a.start(net.now)
    # until A has sent its IKE_INTERMEDIATE request: A's keys are then those of IKE_SA_INIT
    net.run_until(lambda: a.sas() and a.sas()[0].pending is not None
                  and isinstance(a.sas()[0].pending.exchange, IkeIntermediate))
    sa = a.sas()[0]
    keys0 = sa.keys
    net.run(20)
    assert installed_pair_ok(net) == []
    return net, a, sa, rec, keys0


def test_the_mlkem_shared_secret_is_mixed_into_skeyseed_rfc9370():
    net, a, sa, rec, keys0 = _keys_after_init_and_final()
    # the initiator's ML-KEM key pair comes from its one 64-octet draw (FIPS 203 seed d | z)
    (seed,) = [d for d in rec.draws if len(d) == 64]
    dk = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
    req = [m for _t, src, m in net.messages if m is not None and src == A_ADDR
           and m.exchange_type == ExchangeType.IKE_INTERMEDIATE]
    resp = [m for _t, src, m in net.messages if m is not None and src == B_ADDR
            and m.exchange_type == ExchangeType.IKE_INTERMEDIATE]
    (ke_i,), (ke_r,) = req[0].get_all(M.KE), resp[0].get_all(M.KE)
    assert ke_i.dh_group == ke_r.dh_group == DhId.ML_KEM_768
    assert ke_i.data == dk.public_key().public_bytes_raw() and len(ke_r.data) == 1088
    ss = dk.decapsulate(ke_r.data)
    # SKEYSEED(1) = prf(SK_d(0), SK(1) | Ni | Nr); prf+(SKEYSEED(1), Ni | Nr | SPIi | SPIr)
    skeyseed = hmac.new(keys0.SK_d, ss + sa.nonce_i + sa.nonce_r, hashlib.sha384).digest()
    km = prf_plus(sa.prf_id, skeyseed, sa.nonce_i + sa.nonce_r + sa.spi_i + sa.spi_r, 48 * 3 + 36 * 2)
    assert sa.keys.SK_d == km[:48]
    assert (sa.keys.SK_ei, sa.keys.SK_er) == (km[48:84], km[84:120])
    assert (sa.keys.SK_pi, sa.keys.SK_pr) == (km[120:168], km[168:216])
    assert sa.keys.SK_d != keys0.SK_d


def test_keys_change_when_only_the_mlkem_share_changes():
    # Same seeds: same SPIs, nonces, X25519 shares and ML-KEM key pair in both runs. Only the
    # responder's ML-KEM encapsulation differs (its randomness is OpenSSL's): the IKE_SA_INIT
    # keys are equal, every key after the additional key exchange differs, and so do the
    # Child SA keys.
    net1, _a1, sa1, _r1, k01 = _keys_after_init_and_final(seed=7)
    net2, _a2, sa2, _r2, k02 = _keys_after_init_and_final(seed=7)
    assert (sa1.spi_i, sa1.spi_r, sa1.nonce_i, sa1.nonce_r) == (sa2.spi_i, sa2.spi_r, sa2.nonce_i, sa2.nonce_r)
    assert (k01.SK_d, k01.SK_ei, k01.SK_pi) == (k02.SK_d, k02.SK_ei, k02.SK_pi)
    for f in ("SK_d", "SK_ai", "SK_ar", "SK_ei", "SK_er", "SK_pi", "SK_pr"):
        if getattr(k01, f):
            assert getattr(sa1.keys, f) != getattr(sa2.keys, f), f
    (c1,) = net1.planes[A_ADDR].inbound.values()
    (c2,) = net2.planes[A_ADDR].inbound.values()
    assert c1.encr_key != c2.encr_key


def test_auth_covers_the_intermediate_exchange():
    # IntAuth (RFC 9242 §3.3.2) is in the AUTH octets: with B's IntAuth_i chain altered (as if
    # the IKE_INTERMEDIATE request had been tampered with), A's AUTH does not verify.
    net, a, b = _net(HYBRID, HYBRID)
    a.start(net.now)
    net.run_until(lambda: b.sas() and b.sas()[0].intermediate_count == 1)
    bsa = b.sas()[0]
    bsa.int_auth_i = bytes(len(bsa.int_auth_i))
    net.run(3)
    assert isinstance(net.events[B_ADDR][0], ev.AuthFailed)
    assert "does not verify" in net.events[B_ADDR][0].reason
    assert isinstance(net.events[A_ADDR][0], ev.AuthFailed)
    assert _of(net, A_ADDR, ev.IkeSaUp) == [] and _of(net, B_ADDR, ev.IkeSaUp) == []
    net.run(30)      # the tunnel re-initiates (start: true): a fresh SA, untouched, comes up
    assert installed_pair_ok(net) == []


# ------------------------------------------------------------------ policy


def test_classic_only_peer_refused_when_every_proposal_requires_the_additional_ke():
    net, a, b = _net(CLASSIC, HYBRID)
    _up(net, a, run=400)
    assert _of(net, A_ADDR, ev.IkeSaUp) == [] and _of(net, B_ADDR, ev.IkeSaUp) == []
    assert any("NO_PROPOSAL_CHOSEN" in f.reason for f in _of(net, A_ADDR, ev.IkeSaFailed))


def test_hybrid_required_initiator_refuses_a_classic_only_responder():
    net, a, b = _net(HYBRID, CLASSIC)
    _up(net, a, run=400)
    assert _of(net, A_ADDR, ev.IkeSaUp) == [] and _of(net, B_ADDR, ev.IkeSaUp) == []
    assert any("NO_PROPOSAL_CHOSEN" in f.reason for f in _of(net, A_ADDR, ev.IkeSaFailed))


@pytest.mark.parametrize("hybrid_side", ["a", "b"])
@pytest.mark.parametrize("optional", [f"{HYBRID},{CLASSIC}", f"{HYBRID}-ke1_none"])
def test_classic_only_peer_connects_when_policy_allows_a_classic_proposal(hybrid_side, optional):
    a_ike, b_ike = (optional, CLASSIC) if hybrid_side == "a" else (CLASSIC, optional)
    net, a, b = _net(a_ike, b_ike)
    _up(net, a)
    assert installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    assert not any("IKE_INTERMEDIATE" in s for s in _exchanges(net))
    assert any(s.startswith("IKE_AUTH request 1 ") for s in _exchanges(net))
    for e in (a, b):
        (sa,) = e.sas()
        assert sa.addke_done == () and sa.intermediate_count == 0


def test_optional_on_both_sides_still_runs_the_additional_ke():
    opt = f"{HYBRID}-ke1_none"
    net, a, b = _net(opt, f"{HYBRID},{CLASSIC}")
    _up(net, a)
    assert installed_pair_ok(net) == []
    assert a.sas()[0].addke_done == (DhId.ML_KEM_768,)


def test_responder_selects_no_additional_ke_for_an_initiator_without_intermediate():
    # A offers ke1_mlkem768 (optional: ke1_none) but does not announce IKE_INTERMEDIATE (as a
    # peer that lists the transform without supporting RFC 9242 would): B must pick NONE.
    net, a, b = _net(f"{HYBRID}-ke1_none", f"{HYBRID}-ke1_none")
    from appliance.ike import intermediate
    orig = intermediate.request_notifies
    intermediate.request_notifies = lambda sa: []
    try:
        _up(net, a)
    finally:
        intermediate.request_notifies = orig
    assert installed_pair_ok(net) == []
    assert not any("IKE_INTERMEDIATE" in s for s in _exchanges(net))
    (up,) = _of(net, A_ADDR, ev.IkeSaUp)
    assert "mlkem" not in up.proposal


# ------------------------------------------------------------------ rekeys


def test_child_sa_rekey_and_ike_sa_rekey_of_a_hybrid_sa():
    from appliance.ike.policy import FragmentationConfig
    whole = dict(fragmentation=FragmentationConfig(enabled=False))   # to read the payloads here
    net, a, b = _net(HYBRID, HYBRID, a_kw=whole, b_kw=whole)
    _up(net, a)
    old = a.sas()[0]
    a.rekey_child("to-b", net.now)
    net.run(10)
    assert len(_of(net, A_ADDR, ev.ChildSaRekeyed)) == 1 and installed_pair_ok(net) == []
    # IKE SA rekey (RFC 9370 §2.2.4): CREATE_CHILD_SA, then IKE_FOLLOWUP_KE with ML-KEM on the
    # old SA; the new SA runs the hybrid proposal
    n = len(net.trace)
    b.rekey_ike("to-a", net.now)
    net.run(10)
    (rk,) = _of(net, A_ADDR, ev.IkeSaRekeyed)
    assert rk.proposal == HYBRID
    trace = _exchanges(net)[n:]
    assert trace[0].startswith("CREATE_CHILD_SA request") and "SK{SA NONCE KE}" in trace[0]
    assert trace[1].startswith("CREATE_CHILD_SA response") and "N(ADDITIONAL_KEY_EXCHANGE)" in trace[1]
    assert trace[2].startswith("IKE_FOLLOWUP_KE request") and "SK{KE N(ADDITIONAL_KEY_EXCHANGE)}" in trace[2]
    assert trace[3].startswith("IKE_FOLLOWUP_KE response") and "SK{KE}" in trace[3]
    assert trace[4].startswith("INFORMATIONAL request") and "D" in trace[4]   # old SA deleted
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []
    new = a.sas()[0]
    assert new is not old and new.established and new.spi_i != old.spi_i
    a.rekey_child("to-b", net.now)      # the rekeyed SA works
    net.run(10)
    assert len(_of(net, A_ADDR, ev.ChildSaRekeyed)) == 2 and installed_pair_ok(net) == []
    a.rekey_ike("to-b", net.now)        # and rekeys again, from A's side
    net.run(10)
    assert [r.proposal for r in _of(net, A_ADDR, ev.IkeSaRekeyed)] == [HYBRID, HYBRID]
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []


def test_ike_sa_rekey_with_two_additional_key_exchanges_chains_the_links():
    two = "aes256gcm16-prfsha384-x25519-ke1_ecp384-ke2_mlkem1024"
    net, a, b = _net(two, two)
    _up(net, a)
    n = len(net.trace)
    a.rekey_ike("to-b", net.now)
    net.run(10)
    assert [r.proposal for r in _of(net, B_ADDR, ev.IkeSaRekeyed)] == [two]
    trace = _exchanges(net)[n:]
    mids = {s.split()[2] for s in trace if s.startswith("IKE_FOLLOWUP_KE request")}
    assert len(mids) == 2, trace       # ML-KEM-1024's goes as two IKE fragments
    assert any(s.startswith("IKE_FOLLOWUP_KE response") and "N(ADDITIONAL_KEY_EXCHANGE)" in s for s in trace)
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []


def test_rekeyed_keys_change_when_only_the_followup_mlkem_share_changes():
    def rekeyed(seed):
        net, a, b = _net(HYBRID, HYBRID, seed=seed)
        _up(net, a)
        a.rekey_ike("to-b", net.now)
        net.run(10)
        (sa,) = a.sas()
        return sa
    s1, s2 = rekeyed(5), rekeyed(5)
    # equal SPIs and nonces of the rekey, yet other keys: the ML-KEM secret of IKE_FOLLOWUP_KE
    # (and of the first IKE_INTERMEDIATE, via SK_d) is in SKEYSEED
    assert (s1.spi_i, s1.spi_r, s1.nonce_i, s1.nonce_r) == (s2.spi_i, s2.spi_r, s2.nonce_i, s2.nonce_r)
    assert s1.keys.SK_d != s2.keys.SK_d and s1.keys.SK_ei != s2.keys.SK_ei


def test_ike_sa_rekey_collision_with_additional_key_exchanges():
    net, a, b = _net(HYBRID, HYBRID)
    _up(net, a)
    a.rekey_ike("to-b", net.now)
    b.rekey_ike("to-a", net.now)
    net.run(30)
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []
    assert _of(net, A_ADDR, ev.IkeSaDown) == [] and _of(net, A_ADDR, ev.PeerDead) == []
    (sa,) = [s for s in a.sas() if s.established]
    assert sa.proposal_text == HYBRID
    a.rekey_child("to-b", net.now)
    net.run(10)
    assert _of(net, A_ADDR, ev.ChildSaRekeyed) and installed_pair_ok(net) == []


def test_hybrid_optional_tunnel_rekeys_classic_with_a_classic_peer():
    net, a, b = _net(f"{HYBRID},{CLASSIC}", CLASSIC)
    _up(net, a)
    a.rekey_ike("to-b", net.now)
    net.run(10)
    assert [r.proposal for r in _of(net, A_ADDR, ev.IkeSaRekeyed)] == [CLASSIC]
    assert not any("IKE_FOLLOWUP_KE" in s for s in _exchanges(net))


def test_a_followup_with_a_stale_link_is_refused_and_the_rekey_retried_later():
    from appliance.ike import additional_ke
    net, a, b = _net(HYBRID, HYBRID)
    _up(net, a)
    orig = additional_ke.IkeFollowupKe.build

    def build_with_a_wrong_link(self, sa, now):
        self.link = b"not-the-link"
        return orig(self, sa, now)

    additional_ke.IkeFollowupKe.build = build_with_a_wrong_link
    try:
        n = len(net.trace)
        a.rekey_ike("to-b", net.now)
        net.run(5)
    finally:
        additional_ke.IkeFollowupKe.build = orig
    trace = _exchanges(net)[n:]
    assert any(s.startswith("IKE_FOLLOWUP_KE response") and "N(STATE_NOT_FOUND)" in s for s in trace)
    assert _of(net, A_ADDR, ev.IkeSaRekeyed) == [] and _of(net, A_ADDR, ev.IkeSaDown) == []
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []
    (sa,) = a.sas()
    assert sa.rekey_retry_at is not None       # retried later, like any refused rekey
    net.run(120)
    assert [r.proposal for r in _of(net, A_ADDR, ev.IkeSaRekeyed)] == [HYBRID]
    assert one_ike_sa_each(net) == []


@pytest.mark.parametrize("ke", [M.KE(DhId.ML_KEM_768, b"\x01" * 1000), M.KE(DhId.CURVE25519, b"\x09" * 32)])
def test_bad_ke_data_in_a_followup_request_is_invalid_syntax_and_drops_the_pending_rekey(ke):
    from appliance.ike import additional_ke
    net, a, b = _net(HYBRID, HYBRID)
    _up(net, a)
    orig = additional_ke.IkeFollowupKe.build

    def build_bad(self, sa, now):
        payloads = orig(self, sa, now)
        return [ke] + payloads[1:]

    additional_ke.IkeFollowupKe.build = build_bad
    try:
        n = len(net.trace)
        a.rekey_ike("to-b", net.now)
        net.run(5)
    finally:
        additional_ke.IkeFollowupKe.build = orig
    trace = _exchanges(net)[n:]
    assert any(s.startswith("IKE_FOLLOWUP_KE response") and "N(INVALID_SYNTAX)" in s for s in trace)
    assert b.sas()[0].followup is None
    assert _of(net, A_ADDR, ev.IkeSaRekeyed) == [] and one_ike_sa_each(net) == []


def test_a_lost_followup_response_is_answered_from_the_cache():
    lost = []

    def drop(d, n):
        h = M.parse_header(d.data)
        if h.exchange_type == ExchangeType.IKE_FOLLOWUP_KE and h.is_response and not lost:
            lost.append(n)
            return True
        return False

    net, a, b = _net(HYBRID, HYBRID, faults=Faults(drop=drop))
    _up(net, a)
    a.rekey_ike("to-b", net.now)
    net.run(30)
    assert lost and [r.proposal for r in _of(net, A_ADDR, ev.IkeSaRekeyed)] == [HYBRID]
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []


# ------------------------------------------------------------------ bad input


def _drive_until_intermediate_request(a, b):
    """Deliver A's and B's datagrams by hand until A's IKE_INTERMEDIATE request is out; returns
    it (not delivered)."""
    a.start(T0)
    for _ in range(10):
        for d in a.datagrams_to_send():
            h = M.parse_header(d.data)
            if h.exchange_type == ExchangeType.IKE_INTERMEDIATE:
                return d
            b.receive_datagram(d.data, d.src, d.dst, T0)
        for d in b.datagrams_to_send():
            a.receive_datagram(d.data, d.src, d.dst, T0)
    raise AssertionError("no IKE_INTERMEDIATE request")


def _events(engine):
    out = []
    while (e := engine.next_event()) is not None:
        out.append(e)
    return out


@pytest.mark.parametrize("ke, why", [
    (M.KE(DhId.ML_KEM_768, b"\x01" * 1183), "must be 1184 octets"),
    (M.KE(DhId.ML_KEM_768, b"\x01" * 1185), "must be 1184 octets"),
    (M.KE(DhId.ML_KEM_768, b"\xff" * 1184), "refused"),        # FIPS 203 modulus check
    (M.KE(DhId.ML_KEM_1024, b"\x01" * 1568), "ML_KEM_1024 KE payload"),
    (None, "no KE payload"),
])
def test_bad_ke_data_in_the_intermediate_request_is_answered_invalid_syntax(ke, why):
    a, b = IkeEngine([tunnel("a", ike=HYBRID)], random=random.Random(1).randbytes), \
        IkeEngine([tunnel("b", ike=HYBRID)], random=random.Random(2).randbytes)
    genuine = _drive_until_intermediate_request(a, b)
    sa = a.sas()[0]
    payloads = [ke] if ke is not None else [M.Notify(NotifyType.INITIAL_CONTACT)]
    forged = M.Message(sa.spi_i, sa.spi_r, ExchangeType.IKE_INTERMEDIATE, 1, False, True, payloads,
                       encrypted=True)
    b.receive_datagram(sa._encode(forged), genuine.src, genuine.dst, T0)   # with A's real keys
    (resp,) = b.datagrams_to_send()
    msg, enc = M.parse_message(resp.data)
    answer = M.decrypt_message(resp.data, msg, enc, sa.cipher_in)
    assert answer.exchange_type == ExchangeType.IKE_INTERMEDIATE and answer.is_response
    assert [n.notify_type for n in answer.notifies()] == [NotifyType.INVALID_SYNTAX]
    assert b.sas() == []
    (failed,) = [e for e in _events(b) if isinstance(e, ev.IkeSaFailed)]
    assert why in failed.reason
    # A gets the answer: the SA fails with the peer's refusal
    a.receive_datagram(resp.data, resp.src, resp.dst, T0)
    assert any(isinstance(e, ev.IkeSaFailed) and "INVALID_SYNTAX" in e.reason for e in _events(a))


@pytest.mark.parametrize("ke, why", [
    (M.KE(DhId.ML_KEM_768, b"\x01" * 1087), "ciphertext must be 1088 octets"),
    (M.KE(DhId.ML_KEM_768, b"\x01"), "ciphertext must be 1088 octets"),
    (M.KE(DhId.CURVE25519, b"\x09" * 32), "CURVE25519 KE payload"),
])
def test_bad_ke_data_in_the_intermediate_response_fails_the_initiator_cleanly(ke, why):
    a, b = IkeEngine([tunnel("a", ike=HYBRID)], random=random.Random(1).randbytes), \
        IkeEngine([tunnel("b", ike=HYBRID)], random=random.Random(2).randbytes)
    genuine = _drive_until_intermediate_request(a, b)
    (bsa,) = b.sas()
    forged = M.Message(bsa.spi_i, bsa.spi_r, ExchangeType.IKE_INTERMEDIATE, 1, True, False, [ke],
                       encrypted=True)
    a.receive_datagram(bsa._encode(forged), genuine.dst, genuine.src, T0)   # B's real keys
    (failed,) = [e for e in _events(a) if isinstance(e, ev.IkeSaFailed)]
    assert why in failed.reason and a.sas() == []


def test_ike_auth_before_the_additional_ke_is_refused():
    a, b = IkeEngine([tunnel("a", ike=HYBRID)], random=random.Random(1).randbytes), \
        IkeEngine([tunnel("b", ike=HYBRID)], random=random.Random(2).randbytes)
    genuine = _drive_until_intermediate_request(a, b)
    sa = a.sas()[0]
    forged = M.Message(sa.spi_i, sa.spi_r, ExchangeType.IKE_AUTH, 1, False, True,
                       [M.IDi(2, b"a.example.net"), M.AUTH(2, bytes(48))], encrypted=True)
    b.receive_datagram(sa._encode(forged), genuine.src, genuine.dst, T0)
    (resp,) = b.datagrams_to_send()
    msg, enc = M.parse_message(resp.data)
    answer = M.decrypt_message(resp.data, msg, enc, sa.cipher_in)
    assert [n.notify_type for n in answer.notifies()] == [NotifyType.INVALID_SYNTAX]
    assert b.sas() == [] and not any(isinstance(e, ev.IkeSaUp) for e in _events(b))


def test_a_lost_intermediate_response_is_retransmitted_from_the_cache():
    lost = []

    def drop(d, n):
        h = M.parse_header(d.data)
        if h.exchange_type == ExchangeType.IKE_INTERMEDIATE and h.is_response and not lost:
            lost.append(n)
            return True
        return False

    net, a, b = _net(HYBRID, HYBRID, faults=Faults(drop=drop))
    _up(net, a, run=30)
    assert lost and installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    reqs = [s for s in _exchanges(net) if s.startswith("IKE_INTERMEDIATE request 1")]
    assert len(reqs) == 2                 # A retransmitted under the old keys; B answered
    assert b.sas()[0].cipher_in_prev is None    # dropped by the next (IKE_AUTH) request


# ------------------------------------------------------------------ proposal strings and offers


def test_proposal_strings_as_strongswan_6_spells_them():
    from appliance.ike.constants import TransformType
    from appliance.ike.proposals import format_proposal, parse_proposal
    p = parse_proposal(HYBRID, "ike")
    assert [(int(t.type), int(t.id)) for t in p.transforms][-2:] == [(4, 31), (6, 36)]
    assert format_proposal(p) == HYBRID
    p = parse_proposal("aes256-sha256-ecp384-ke2_mlkem1024-ke1_x25519-ke1_none", "ike")
    assert [t for t in p.transforms if t.type == TransformType.ADDKE2][0].id == DhId.ML_KEM_1024
    assert format_proposal(p) == "aes256-sha256-prfsha256-ecp384-ke1_x25519-ke1_none-ke2_mlkem1024"


@pytest.mark.parametrize("text, kind, words", [
    ("aes256gcm16-prfsha384-mlkem768", "ike", ["ML-KEM is supported as an additional key exchange",
                                               "ke1_mlkem768"]),
    ("aes256gcm16-prfsha384-x25519-ke1_mlkem512", "ike", ["'ke1_mlkem512'", "not supported",
                                                          "ke1_mlkem768, ke1_mlkem1024"]),
    ("aes256gcm16-prfsha384-x25519-ke1_modp1024", "ike", ["weak algorithm", "refused by policy"]),
    ("aes256gcm16-prfsha384-x25519-ke8_mlkem768", "ike", ["unknown algorithm 'ke8_mlkem768'",
                                                          "keN_<key exchange> for N = 1..7"]),
    ("aes256gcm16-prfsha384-x25519-ke1-mlkem768", "ike", ["unknown algorithm 'ke1'"]),
    ("aes256gcm16-ke1_mlkem768", "esp", ["IKE_FOLLOWUP_KE", "not supported", "IKE proposals"]),
    ("aes256gcm16-mlkem768", "esp", ["not as the PFS key exchange"]),
])
def test_bad_spellings_are_refused_with_a_clear_reason(text, kind, words):
    from appliance.ike.proposals import ProposalError, parse_proposal
    with pytest.raises(ProposalError) as e:
        parse_proposal(text, kind)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_initiator_offer_adds_a_classic_copy_of_an_optional_hybrid_proposal():
    from appliance.ike.proposals import format_proposal, initiator_offer, parse_proposals
    offer = initiator_offer(parse_proposals(f"{HYBRID}-ke1_none", "ike"))
    assert [format_proposal(p) for p in offer] == [f"{HYBRID}-ke1_none", CLASSIC]
    # a required one gets no copy; a classic copy already offered is not repeated
    assert len(initiator_offer(parse_proposals(HYBRID, "ike"))) == 1
    assert len(initiator_offer(parse_proposals(f"{HYBRID}-ke1_none,{CLASSIC}", "ike"))) == 2


def test_a_lost_fragmented_intermediate_response_is_retransmitted_from_the_cache():
    # ML-KEM-1024: request and response are two IKE fragments each; the first copy of the
    # response is lost, A resends both request fragments under the old keys, B answers from
    # its cache (fragment 1 of a request already answered, RFC 7383 §2.6.1)
    lost = []

    def drop(d, n):
        h = M.parse_header(d.data)
        if h.exchange_type == ExchangeType.IKE_INTERMEDIATE and h.is_response and len(lost) < 2:
            lost.append(n)
            return True
        return False

    net, a, b = _net(HYBRID_1024, HYBRID_1024, faults=Faults(drop=drop))
    _up(net, a, run=30)
    assert len(lost) == 2 and installed_pair_ok(net) == [] and one_ike_sa_each(net) == []
    resp = [s for s in _exchanges(net) if s.startswith("IKE_INTERMEDIATE response 1 [ SKF(")]
    assert len(resp) == 2      # the two fragments of the cached response, delivered this time
