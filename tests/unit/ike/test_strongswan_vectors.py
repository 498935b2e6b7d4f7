"""Conformance with a real strongSwan 5.9.8 conversation (/work/shared/vectors/, see its README).

From the logged X25519 shared secrets and the nonces/SPIs found in the capture we derive
SKEYSEED and every SK_* (first IKE SA and the rekeyed one) and compare them with both daemons'
logs; we decrypt every SK payload of the capture with our SkCipher (and re-encrypt it to the
same bytes); we check both PSK AUTH payloads (RFC 7296 §2.15) and the NAT detection hashes.

strongSwan's log does not print Child SA keys (the CHD group was not at level 4), so the Child
SA KEYMAT of this conversation is derived here but compared only for shape; the KEYMAT values are
checked against a real kernel in the lab vector (see tests/lab/ if present).
"""

from __future__ import annotations

import ipaddress

import pytest

from appliance.ike import crypto
from appliance.ike.constants import (
    AuthMethod,
    DhId,
    ExchangeType,
    NotifyType,
    PayloadType,
    ProtocolId,
)
from appliance.ike.crypto import IkeSuite, SkCipher
from appliance.ike.proposals import parse_proposal
from tests.vectors import (
    STRONGSWAN_PSK_X25519 as V,
    dumps,
    iter_sa_proposals,
    message_payloads,
    sk_payload,
    walk_payloads,
)

pytestmark = pytest.mark.skipif(not V.available(), reason=f"vector not present: {V.pcap}")

SUITE = IkeSuite.from_proposal(parse_proposal(V.ike_proposal, "ike"))
KEY_LABELS = ("SKEYSEED", "Sk_d secret", "Sk_ei secret", "Sk_er secret", "Sk_pi secret",
              "Sk_pr secret")


def body_of(payloads, ptype):
    found = [p.body for p in payloads if p.type == ptype]
    assert len(found) == 1, f"expected one payload {ptype}, found {len(found)}"
    return found[0]


def notify_data(payloads, ntype):
    out = []
    for p in payloads:
        if p.type == PayloadType.NOTIFY:
            spi_size = p.body[1]
            if int.from_bytes(p.body[2:4], "big") == ntype:
                out.append(p.body[4 + spi_size:])
    return out


class Conversation:
    """Everything the tests need, derived once."""

    def __init__(self) -> None:
        self.msgs = V.datagrams()
        self.log_a = V.log("initiator")
        self.log_s = V.log("responder")
        init_req, init_resp = self.msgs[0], self.msgs[1]
        assert init_req.header.exchange == ExchangeType.IKE_SA_INIT
        self.req_payloads = message_payloads(init_req.message)
        self.resp_payloads = message_payloads(init_resp.message)
        self.Ni = body_of(self.req_payloads, PayloadType.NONCE)
        self.Nr = body_of(self.resp_payloads, PayloadType.NONCE)
        self.SPIi, self.SPIr = init_resp.header.spi_i, init_resp.header.spi_r
        self.g_ir = dumps(self.log_a, "shared Diffie Hellman secret")[0]
        self.skeyseed, self.keys = crypto.derive_ike_keys(
            SUITE, self.g_ir, self.Ni, self.Nr, self.SPIi, self.SPIr)
        self.ciphers = {(self.SPIi, self.SPIr): crypto.sk_ciphers(SUITE, self.keys)}
        self.plain: dict[int, bytes] = {}
        self.inner: dict[int, list] = {}
        self._decrypt_all()
        self._rekey()
        self._decrypt_all()

    def _decrypt_all(self) -> None:
        for i, d in enumerate(self.msgs):
            sk = sk_payload(d.message)
            key = (d.header.spi_i, d.header.spi_r)
            if sk is None or i in self.plain or key not in self.ciphers:
                continue
            c_i, c_r = self.ciphers[key]
            cipher = c_i if d.header.from_initiator else c_r
            pt = crypto.unpad_plaintext(cipher.decrypt(sk.body, sk.aad))
            self.plain[i] = pt
            self.inner[i] = walk_payloads(sk.first_inner, pt)

    def _rekey(self) -> None:
        """Find the CREATE_CHILD_SA exchange that rekeys the IKE SA (SA proposal protocol IKE)."""
        self.ike_rekey = None
        for i, d in enumerate(self.msgs):
            if d.header.exchange != ExchangeType.CREATE_CHILD_SA or d.header.is_response:
                continue
            req = self.inner[i]
            props = list(iter_sa_proposals(body_of(req, PayloadType.SA)))
            if props[0][1] != ProtocolId.IKE:
                continue
            j = next(k for k, r in enumerate(self.msgs) if r.header.is_response
                     and r.header.message_id == d.header.message_id
                     and r.header.exchange == ExchangeType.CREATE_CHILD_SA)
            resp = self.inner[j]
            new_i = props[0][2]
            new_r = list(iter_sa_proposals(body_of(resp, PayloadType.SA)))[0][2]
            ni, nr = body_of(req, PayloadType.NONCE), body_of(resp, PayloadType.NONCE)
            g_new = dumps(self.log_a, "shared Diffie Hellman secret")[1]
            seed, keys = crypto.derive_rekeyed_ike_keys(SUITE, self.keys.SK_d, g_new, ni, nr,
                                                        new_i, new_r)
            self.ike_rekey = dict(req=i, resp=j, SPIi=new_i, SPIr=new_r, Ni=ni, Nr=nr,
                                  g_ir=g_new, skeyseed=seed, keys=keys,
                                  ke_i=body_of(req, PayloadType.KE),
                                  ke_r=body_of(resp, PayloadType.KE))
            self.ciphers[(new_i, new_r)] = crypto.sk_ciphers(SUITE, keys)


@pytest.fixture(scope="module")
def conv() -> Conversation:
    return Conversation()


def logged_keys(log, n):
    return [dumps(log, label)[n] for label in KEY_LABELS]


def test_capture_is_the_documented_conversation(conv):
    exch = [(d.header.exchange, d.header.is_response) for d in conv.msgs]
    assert len(conv.msgs) == 14
    assert exch[:4] == [(34, False), (34, True), (35, False), (35, True)]
    assert [e for e, _ in exch].count(ExchangeType.CREATE_CHILD_SA) == 4  # child + IKE rekey
    for d in conv.msgs:
        assert d.header.version == 0x20 and d.header.length == len(d.message)
    # IKE_SA_INIT goes to port 500, the rest floats to 4500 with the non-ESP marker
    assert [d.natt for d in conv.msgs] == [False, False] + [True] * 12


def test_ke_payloads_are_x25519(conv):
    for ps in (conv.req_payloads, conv.resp_payloads):
        ke = body_of(ps, PayloadType.KE)
        assert int.from_bytes(ke[:2], "big") == DhId.CURVE25519 and len(ke) == 4 + 32
    assert conv.g_ir == dumps(conv.log_s, "shared Diffie Hellman secret")[0]


def test_skeyseed_and_sk_keys_match_both_logs(conv):
    k = conv.keys
    ours = [conv.skeyseed, k.SK_d, k.SK_ei, k.SK_er, k.SK_pi, k.SK_pr]
    assert ours == logged_keys(conv.log_a, 0)
    assert ours == logged_keys(conv.log_s, 0)
    assert k.SK_ai == k.SK_ar == b""  # AEAD: no integrity keys


def test_nat_detection_hashes(conv):
    # the logged inputs/outputs of strongSwan's NAT-D computation
    for chunk, digest in zip(dumps(conv.log_a, "natd_chunk"), dumps(conv.log_a, "natd_hash")):
        assert crypto.nat_detection_hash(chunk[:8], chunk[8:16], chunk[16:-2],
                                         int.from_bytes(chunk[-2:], "big")) == digest
    # and the notifies on the wire, from the addresses of the capture (SPIr is zero in the
    # request, RFC 7296 §2.23)
    for d, ps in ((conv.msgs[0], conv.req_payloads), (conv.msgs[1], conv.resp_payloads)):
        h = d.header
        src = ipaddress.ip_address(d.udp.src).packed
        dst = ipaddress.ip_address(d.udp.dst).packed
        assert notify_data(ps, NotifyType.NAT_DETECTION_SOURCE_IP) == [
            crypto.nat_detection_hash(h.spi_i, h.spi_r, src, d.udp.sport)]
        assert notify_data(ps, NotifyType.NAT_DETECTION_DESTINATION_IP) == [
            crypto.nat_detection_hash(h.spi_i, h.spi_r, dst, d.udp.dport)]


def test_every_sk_payload_decrypts_and_matches_the_logged_plaintext(conv):
    encrypted = [i for i, d in enumerate(conv.msgs) if sk_payload(d.message) is not None]
    assert len(encrypted) == 12 and sorted(conv.plain) == encrypted
    logged = set(dumps(conv.log_a, "plain")) | set(dumps(conv.log_s, "plain"))
    for i in encrypted:
        assert conv.plain[i] in logged, f"message {i} decrypted to something strongSwan never had"


def test_reencryption_gives_the_same_bytes(conv):
    """With strongSwan's IV, our encryption reproduces each SK payload byte for byte."""
    for i, pt in conv.plain.items():
        d = conv.msgs[i]
        sk = sk_payload(d.message)
        c_i, c_r = conv.ciphers[(d.header.spi_i, d.header.spi_r)]
        cipher = c_i if d.header.from_initiator else c_r
        padded = cipher.pad(pt)  # strongSwan pads AEAD with the Pad Length octet only
        assert cipher.sk_payload_len(len(pt)) == len(sk.body) + 4
        assert cipher.encrypt(padded, sk.aad, sk.body[:cipher.iv_size]) == sk.body


def test_sk_payload_tamper_is_detected(conv):
    d = conv.msgs[2]
    sk = sk_payload(d.message)
    c_i, _ = conv.ciphers[(d.header.spi_i, d.header.spi_r)]
    bad = bytearray(sk.body)
    bad[20] ^= 0x80
    with pytest.raises(crypto.IntegrityError):
        c_i.decrypt(bytes(bad), sk.aad)


@pytest.mark.parametrize("role", ["initiator", "responder"])
def test_psk_auth_payloads_rfc7296_2_15(conv, role):
    if role == "initiator":
        inner, first_msg, nonce = conv.inner[2], conv.msgs[0].message, conv.Nr
        id_type, sk_p, octets_idx = PayloadType.IDi, conv.keys.SK_pi, 0
        want_id = V.initiator_id
    else:
        inner, first_msg, nonce = conv.inner[3], conv.msgs[1].message, conv.Ni
        id_type, sk_p, octets_idx = PayloadType.IDr, conv.keys.SK_pr, 1
        want_id = V.responder_id
    id_body = body_of(inner, id_type)
    assert id_body[0] == 2 and id_body[4:] == want_id  # ID_FQDN
    auth = body_of(inner, PayloadType.AUTH)
    assert auth[0] == AuthMethod.SHARED_KEY_MIC
    octets = crypto.signed_octets(SUITE.prf, first_msg, nonce, sk_p, id_body)
    assert octets == dumps(conv.log_a, "octets = message + nonce + prf(Sk_px, IDx')")[octets_idx]
    assert crypto.psk_auth_matches(SUITE.prf, V.psk, octets, auth[4:])
    assert not crypto.psk_auth_matches(SUITE.prf, V.psk + b"!", octets, auth[4:])


def test_rekeyed_ike_sa_keys_match_both_logs_rfc7296_2_18(conv):
    r = conv.ike_rekey
    assert r is not None, "no IKE SA rekey found in the capture"
    k = r["keys"]
    ours = [r["skeyseed"], k.SK_d, k.SK_ei, k.SK_er, k.SK_pi, k.SK_pr]
    assert ours == logged_keys(conv.log_a, 1)
    assert ours == logged_keys(conv.log_s, 1)
    assert r["g_ir"] == dumps(conv.log_s, "shared Diffie Hellman secret")[1]
    for ke in (r["ke_i"], r["ke_r"]):
        assert int.from_bytes(ke[:2], "big") == DhId.CURVE25519
    # the new SA's SPIs are the ones the last exchange (DELETE of the new SA) uses, and those
    # messages decrypt with the new keys
    last = conv.msgs[-1].header
    assert (last.spi_i, last.spi_r) == (r["SPIi"], r["SPIr"])
    assert len(conv.msgs) - 2 in conv.plain and len(conv.msgs) - 1 in conv.plain


def test_child_sa_spis_and_keymat_shape(conv):
    """The first Child SA (KEYMAT from the IKE_SA_INIT nonces) and the rekeyed one (nonces of
    its CREATE_CHILD_SA, no PFS: no KE payload). Keys are not in these logs; the SPIs are."""
    esp = parse_proposal(V.esp_proposal, "esp")
    auth_req, auth_resp = conv.inner[2], conv.inner[3]
    spi_i = list(iter_sa_proposals(body_of(auth_req, PayloadType.SA)))[0][2]
    spi_r = list(iter_sa_proposals(body_of(auth_resp, PayloadType.SA)))[0][2]
    # charon-A: "CHILD_SA c{1} established with SPIs c32fec81_i c7c25006_o"
    assert (spi_i.hex(), spi_r.hex()) == ("c32fec81", "c7c25006")
    first = crypto.child_keymat_for(SUITE.prf, conv.keys.SK_d, conv.Ni, conv.Nr, None, esp)
    assert len(first.ei) == len(first.er) == 36 and first.ai == first.ar == b""
    rekeys = [i for i, d in enumerate(conv.msgs)
              if d.header.exchange == ExchangeType.CREATE_CHILD_SA and not d.header.is_response
              and notify_data(conv.inner[i], NotifyType.REKEY_SA) == [b""]]
    assert len(rekeys) == 1
    req = conv.inner[rekeys[0]]
    resp = conv.inner[rekeys[0] + 1]
    assert not [p for p in req if p.type == PayloadType.KE]  # no PFS
    new_i = list(iter_sa_proposals(body_of(req, PayloadType.SA)))[0][2]
    new_r = list(iter_sa_proposals(body_of(resp, PayloadType.SA)))[0][2]
    assert (new_i.hex(), new_r.hex()) == ("c1a48fd8", "cfd03ca7")
    second = crypto.child_keymat_for(SUITE.prf, conv.keys.SK_d, body_of(req, PayloadType.NONCE),
                                     body_of(resp, PayloadType.NONCE), None, esp)
    assert second.ei != first.ei
