"""Our initiator engine fed strongSwan's real answers (recorded conversations, tests/vectors.py).

strongSwan A initiated these conversations; we replay A's part with our engine: wherever A used
its own randomness (SPIs, nonces, key exchange) the engine's request is made to carry A's values,
then strongSwan's responses go through IkeEngine.receive_datagram. The engine must accept them:
verify strongSwan's AUTH with our §2.15 octets, derive the Child SA keys (§2.17) that charon
logged, rekey the Child SA (with PFS where recorded) and the IKE SA (§2.18), delete.

A's ephemeral private keys are not recorded, only the shared secrets charon logged, so the key
exchange objects in A's requests are stand-ins returning the logged g^ir for strongSwan's public
value: the one place this test does not run our own code.
"""

from __future__ import annotations

import random

import pytest

from appliance.ike import ike_auth, ike_rekey
from appliance.ike import message as M
from appliance.ike.child_create import ChildRequest
from appliance.ike.child_rekey import ChildRekey
from appliance.ike.constants import DhId
from appliance.ike.engine import IkeEngine
from appliance.ike.ike_init import IkeSaInit
from appliance.ike.policy import DpdConfig, Identity, TunnelConfig
from appliance.ike.proposals import parse_proposals
from appliance.ike.sa import IkeSa, _Pending
from tests.vectors import STRONGSWAN_PSK_X25519, dumps, logged_child_keys, recorded_vectors

VECTORS = [STRONGSWAN_PSK_X25519] + recorded_vectors()


class LoggedKe:
    """Stand-in for crypto.KeyExchange with A's public value and the g^ir charon logged."""

    def __init__(self, dh_id: int, public: bytes, peer_public: bytes, secret: bytes) -> None:
        self.dh_id = DhId(dh_id)
        self.public_bytes = public
        self._peer = peer_public
        self._secret = secret

    def shared_secret(self, peer_public: bytes) -> bytes:
        assert peer_public == self._peer, "not strongSwan's recorded KE payload"
        return self._secret


class Replay:
    def __init__(self, vector) -> None:
        self.v = vector
        self.grams = vector.datagrams()
        self.log = vector.log("initiator")
        self.engine: IkeEngine | None = None
        self.events: list = []
        self.sent: list = []      # what our engine sent (engine.Datagram)
        self._plain: dict[int, M.Message] = {}

    def msg(self, i: int) -> M.Message:
        """Datagram i, decrypted with whatever SA of our engine holds its keys."""
        if i not in self._plain:
            data = self.grams[i].message
            m, enc = M.parse_message(data)
            if enc is not None:
                sa = next(s for s in self.engine._sas.values() if s.spi_i == m.spi_i)
                keys = sa.keys
                from appliance.ike.crypto import sk_ciphers

                c_i, c_r = sk_ciphers(sa.proposal, keys)
                m = M.decrypt_message(data, m, enc, c_i if m.is_initiator else c_r)
            self._plain[i] = m
        return self._plain[i]

    def feed(self, i: int, now: float) -> None:
        """Datagram i as A received it (behind a NAT: at its inside endpoint)."""
        src, dst = self.v.initiator_view(self.grams[i])
        self.engine.receive_datagram(self.grams[i].message, src, dst, now)
        self.sent += self.engine.datagrams_to_send()
        while (e := self.engine.next_event()) is not None:
            self.events.append(e)


def _own_credentials(v):
    """For a certificate vector: our credential (a throwaway one: the IKE_AUTH request is made
    A's below, so only its CAs matter) trusting the recorded root, with the recorded
    intermediate (both strongSwans sent only their end entity)."""
    from tests.peers.certs import TestPKI

    from appliance.ike.certificates import CertCredentials

    own = TestPKI("ecdsa", "throwaway")
    cred = own.issue(v.initiator_id.decode())
    return CertCredentials.from_pem(cred.cert_pem + (v.directory / "intermediate.pem").read_bytes(), cred.key_pem,
                                    [(v.directory / "ca.pem").read_bytes()])


def _config(v) -> TunnelConfig:
    return TunnelConfig(name="p", local_addr=v.initiator_addr, remote_addr=v.responder_addr,
                        local_id=Identity.parse(v.initiator_id.decode()),
                        remote_id=Identity.parse(v.responder_id.decode()), psk=v.psk, if_id=42,
                        cert=_own_credentials(v) if v.auth == "pubkey" else None,
                        ike_proposals=tuple(parse_proposals(v.ike_proposal, "ike")),
                        esp_proposals=tuple(parse_proposals(v.esp_proposal, "esp")),
                        dpd=DpdConfig(interval=0), start=True)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.directory.name)
def test_our_initiator_accepts_strongswans_answers(vector):
    r = Replay(vector)
    cfg = _config(vector)
    now = 100.0
    # certificates are checked at the recording's wall-clock time
    r.engine = engine = IkeEngine([cfg], random=random.Random(5).randbytes, wall_offset=vector.recorded_at - now)
    d0 = M.parse_message(r.grams[0].message)[0]
    d1 = M.parse_message(r.grams[1].message)[0]
    g_ir = dumps(r.log, "shared Diffie Hellman secret")

    # IKE_SA_INIT: our SA, carrying A's SPI, nonce, KE and request octets (RealMessage1)
    local, remote = vector.initiator_view(r.grams[0])    # A's own endpoints, as it sent it
    assert (local[0], remote[0]) == (vector.initiator_addr, vector.responder_addr)
    sa = IkeSa(engine, initiator=True, config=cfg, candidates=[cfg], local=local, remote=remote,
               spi_i=d0.spi_i, spi_r=bytes(8), now=now)
    engine.register(sa)
    ex = IkeSaInit(d0.get(M.KE).dh_group)
    ex.ke = LoggedKe(d0.get(M.KE).dh_group, d0.get(M.KE).data, d1.get(M.KE).data, g_ir[0])
    sa.nonce_i = d0.get(M.Nonce).data
    sa.init_request = r.grams[0].message
    sa.pending = _Pending(ex, 0, r.grams[0].message, now, now + 4)
    sa.my_mid = 1
    r.feed(1, now)
    assert sa.spi_r == d1.spi_r and sa.nonce_r == d1.get(M.Nonce).data
    # our key derivation agrees with charon's
    for name, label in (("SK_d", "Sk_d secret"), ("SK_ei", "Sk_ei secret"), ("SK_er", "Sk_er secret"),
                        ("SK_pi", "Sk_pi secret"), ("SK_pr", "Sk_pr secret")):
        assert getattr(sa.keys, name) == dumps(r.log, label)[0], name
    assert isinstance(sa.pending.exchange, ike_auth.IkeAuth)
    # NAT detection (§2.23): the recorded vectors' kernel-libipsec fakes strongSwan's SOURCE
    # hash, so we see a NAT at its end (not in the shared vector, recorded with the kernel's
    # XFRM); at ours only behind the natt-* vector's NAT (its DESTINATION hash names our public
    # endpoint). With a NAT anywhere IKE_AUTH floats to 4500 (§2.23)
    libipsec = vector is not STRONGSWAN_PSK_X25519
    assert (sa.nat_local, sa.nat_remote) == (vector.nat is not None, libipsec)
    port = 4500 if libipsec else 500
    assert [(g.src, g.dst) for g in r.sent] == [((local[0], port), (remote[0], port))]
    if vector.nat is not None:   # ... where A's IKE_AUTH left from: the NAT mapped it to its 4500 mapping
        assert vector.initiator_view(r.grams[2]) == ((local[0], 4500), (remote[0], 4500))

    # IKE_AUTH: the pending request is made A's (its Child SA offer); strongSwan's answer in
    d2 = r.msg(2)
    req = ChildRequest(d2.get(M.SA).proposals[0].spi, d2.get(M.SA).proposals, d2.get(M.TSi).selectors,
                       d2.get(M.TSr).selectors)
    sa.pending.exchange.req = req
    # strongSwan's initiator AUTH verifies with our responder-side check as well
    idi = d2.get(M.IDi)
    if vector.auth == "psk":
        assert ike_auth._auth_ok(sa, vector.psk, of_initiator=True, id_body=idi.body(),
                                 received=d2.get(M.AUTH).data)
    else:
        # ... and its signature with the RFC 7427 check and A's certificate
        from cryptography import x509

        from appliance.ike import signature_auth

        a_cert = x509.load_pem_x509_certificate((vector.directory / "cert-A.pem").read_bytes())
        a = d2.get(M.AUTH)
        signature_auth.verify(a_cert.public_key(), a.method, a.data,
                              ike_auth._octets(sa, of_initiator=True, id_body=idi.body()))
        # IKE_SA_INIT gave us strongSwan's hashes and its CERTREQ (root + intermediate)
        assert sa.peer_hash_algorithms is not None and 2 in sa.peer_hash_algorithms
        assert sa.peer_certreq is not None and len(sa.peer_certreq) == 2
    r.feed(3, now + 1)
    kinds = [type(e).__name__ for e in r.events]
    assert kinds == ["IkeSaUp", "ChildSaInstalled"], (kinds, r.events)
    if vector.auth == "pubkey":   # strongSwan's CERT + RFC 7427 AUTH passed our validation
        assert sa.peer_cert_subject == "CN=b.example.net,O=Isthmus tests" and sa.peer_cert_chain
    first = r.events[1]
    # behind a NAT (faked or not) the Child SA is ESP in UDP between the floated ports (RFC 3948)
    # (the shared vector's strongSwan floated without a NAT: its answers come from 4500 there)
    assert (first.udp_encap, first.local_port, first.remote_port) == (libipsec, 4500, 4500)
    assert (first.local_addr, first.remote_addr) == (local[0], remote[0])
    child_keys = logged_child_keys(r.log)
    if child_keys:
        k = child_keys[0]
        assert (first.encr_key_out, first.encr_key_in) == (k.ei, k.er)
        assert (first.integ_key_out, first.integ_key_in) == (k.ai, k.ar)
    d3 = r.msg(3)
    assert first.spi_out == int.from_bytes(d3.get(M.SA).proposals[0].spi, "big")
    assert first.spi_in == int.from_bytes(req.spi_in, "big")

    # Child SA rekey (PFS where the vector has it)
    d4, d5 = r.msg(4), r.msg(5)
    (child,) = sa.children
    sa.queue_exchange(ChildRekey(child), now + 2)
    ex = sa.pending.exchange
    assert isinstance(ex, ChildRekey) and sa.pending.message_id == d4.message_id
    ke4 = d4.get(M.KE)
    dh = dumps(r.log, "DH secret")
    ex.req = ChildRequest(d4.get(M.SA).proposals[0].spi, d4.get(M.SA).proposals, d4.get(M.TSi).selectors,
                          d4.get(M.TSr).selectors, d4.get(M.Nonce).data,
                          LoggedKe(ke4.dh_group, ke4.data, d5.get(M.KE).data, dh[0]) if ke4 else None)
    r.events.clear()
    r.feed(5, now + 2)
    kinds = [type(e).__name__ for e in r.events]
    assert kinds == ["ChildSaInstalled", "ChildSaRekeyed", "ChildSaOutboundRemoved"], kinds
    if child_keys:
        k = child_keys[1]
        assert k.dh == (dh[0] if ke4 else None)
        assert (r.events[0].encr_key_out, r.events[0].encr_key_in) == (k.ei, k.er)
    # our DELETE of the old pair went out as message 3, like A's; strongSwan's answer completes it
    assert sa.pending is not None and sa.pending.message_id == r.msg(6).message_id
    r.events.clear()
    r.feed(7, now + 3)
    assert [type(e).__name__ for e in r.events] == ["ChildSaDeleted"]
    assert r.events[0].spi_in == first.spi_in

    if vector is not STRONGSWAN_PSK_X25519:
        return   # in the recorded vectors strongSwan's responder rekeys the IKE SA next

    # IKE SA rekey (§2.18), from A as well in this vector
    d8, d9 = r.msg(8), r.msg(9)
    ike_rekey.start(sa, now + 4)
    ex = sa.pending.exchange
    assert isinstance(ex, ike_rekey.IkeRekey) and sa.pending.message_id == d8.message_id
    ex.spi = d8.get(M.SA).proposals[0].spi
    ex.ni = d8.get(M.Nonce).data
    ex.offered = d8.get(M.SA).proposals
    ex.ke = LoggedKe(d8.get(M.KE).dh_group, d8.get(M.KE).data, d9.get(M.KE).data, g_ir[1])
    r.events.clear()
    r.feed(9, now + 4)
    assert [type(e).__name__ for e in r.events] == ["IkeSaRekeyed"]
    new = sa.rekeyed_to
    assert new is not None and (new.spi_i, new.spi_r) == (d8.get(M.SA).proposals[0].spi,
                                                          d9.get(M.SA).proposals[0].spi)
    assert new.keys.SK_d == dumps(r.log, "Sk_d secret")[1]
    assert new.keys.SK_ei == dumps(r.log, "Sk_ei secret")[1]
    assert len(new.children) == 1 and not sa.children
    # our DELETE of the old IKE SA is message 5 like A's; strongSwan's answer retires it quietly
    assert sa.pending.message_id == r.msg(10).message_id
    r.events.clear()
    r.feed(11, now + 5)
    assert r.events == [] and not sa.alive
    # terminate: DELETE on the new IKE SA (message 0 of its own window), strongSwan answers
    engine.terminate("p", now + 6)
    assert new.pending is not None and new.pending.message_id == r.msg(12).message_id == 0
    r.feed(13, now + 6)
    assert [type(e).__name__ for e in r.events] == ["ChildSaDeleted", "IkeSaDown"]
    assert engine.sas() == []


NAT_VECTORS = [v for v in VECTORS if v.nat is not None]


@pytest.mark.parametrize("vector", NAT_VECTORS, ids=lambda v: v.directory.name)
def test_our_responder_sees_strongswan_behind_the_nat(vector):
    """Our engine in S's place, given A's IKE_SA_INIT as it arrived through the NAT (from the
    NAT's public address and the port it gave A's 500): its NAT detection (natd.py) finds S not
    behind a NAT and A behind one, and its answer goes back to that public endpoint with a
    NAT_DETECTION_DESTINATION_IP hash of it (the translated endpoint, as strongSwan's was).
    (From this side a NAT and kernel-libipsec's faked SOURCE hash look the same: A's real
    NAT is proven by S's DESTINATION hash, test_our_initiator_accepts_strongswans_answers.)"""
    from appliance.ike import natd
    from appliance.ike.constants import NotifyType

    nat = vector.nat
    req = vector.datagrams()[0]
    src, dst = (req.udp.src, req.udp.sport), (req.udp.dst, req.udp.dport)
    assert src == nat.public(500) and dst == (vector.responder_addr, 500)
    cfg = TunnelConfig(name="a", local_addr=vector.responder_addr, remote_addr=nat.public_addr,
                       local_id=Identity.parse(vector.responder_id.decode()),
                       remote_id=Identity.parse(vector.initiator_id.decode()), psk=vector.psk, if_id=42,
                       ike_proposals=tuple(parse_proposals(vector.ike_proposal, "ike")),
                       esp_proposals=tuple(parse_proposals(vector.esp_proposal, "esp")),
                       dpd=DpdConfig(interval=0), start=False)
    engine = IkeEngine([cfg], random=random.Random(7).randbytes)
    engine.receive_datagram(req.message, src, dst, 100.0)
    (out,) = engine.datagrams_to_send()
    assert (out.src, out.dst) == (dst, src)
    answer = M.parse_message(out.data)[0]
    assert answer.is_response and answer.spi_i == req.header.spi_i
    (sa,) = engine._half_open.values()
    assert (sa.nat_local, sa.nat_remote) == (False, True)
    (dst_hash,) = [n.data for n in answer.notifies()
                   if n.notify_type == NotifyType.NAT_DETECTION_DESTINATION_IP]
    assert dst_hash == natd.payloads(answer.spi_i, answer.spi_r, dst, src)[1].data
    # which A, at its inside endpoint, finds is not its own: A is behind a NAT
    a_local = vector.initiator_view(req)[0]
    assert natd.check(answer, a_local, dst) == (True, False)
