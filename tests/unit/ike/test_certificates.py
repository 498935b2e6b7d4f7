"""Certificate authentication between two engines in the simulated network (RFC 7296 §2.15,
§3.6, §3.7, RFC 7427): each key type, the chain the peer's CA needs, and each refusal with its
reason on the refusing side (revoked, expired, wrong CA, ID not in the certificate)."""

from __future__ import annotations

import random as _random
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography import x509

from appliance.ike import events as ev
from appliance.ike import message as M
from appliance.ike import signature_auth as S
from appliance.ike.certificates import CertCredentials, id_matches, keyid
from appliance.ike.constants import AuthMethod, ExchangeType, HashAlgorithm, NotifyType
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import FragmentationConfig, Identity, PolicyError
from tests.peers.certs import TestPKI
from tests.unit.ike.simnet import A_ADDR, B_ADDR, SimNet, installed_pair_ok, one_ike_sa_each, tunnel

_PKIS: dict[str, TestPKI] = {}


def pki(kind: str = "ecdsa", org: str = "Isthmus tests") -> TestPKI:
    if (kind, org) not in _PKIS:     # RSA key generation is slow: one PKI per kind per run
        _PKIS[(kind, org)] = TestPKI(kind, org)
    return _PKIS[(kind, org)]


def creds(p: TestPKI, cred, *, ca=None, crls=()) -> CertCredentials:
    return CertCredentials.from_pem(cred.bundle_pem, cred.key_pem, ca or [p.root_pem], list(crls))


def engines(a_cert: CertCredentials, b_cert: CertCredentials, *, a_kw=None, b_kw=None, offset=None,
            fragmentation: bool = False):
    """Two engines authenticating with certificates. Fragmentation (RFC 7383) is off unless
    asked for, so that the tests can read whole IKE_AUTH messages off the simulated wire."""
    wall = time.time() - 1000.0 if offset is None else offset     # SimNet starts at now=1000
    frag = FragmentationConfig(enabled=fragmentation)
    a = IkeEngine([tunnel("a", psk=b"", cert=a_cert, **{"fragmentation": frag, **(a_kw or {})})],
                  random=_random.Random(1).randbytes, wall_offset=wall)
    b = IkeEngine([tunnel("b", psk=b"", cert=b_cert, **{"fragmentation": frag, **(b_kw or {})})],
                  random=_random.Random(2).randbytes, wall_offset=wall)
    net = SimNet({A_ADDR: a, B_ADDR: b})
    return a, b, net


def run(a, b, net, seconds=5.0) -> SimNet:
    a.start(net.now)
    b.start(net.now)
    net.run(seconds)
    return net


def of(net, ip, cls):
    return [e for e in net.events[ip] if isinstance(e, cls)]


def auth_messages(net) -> list[tuple[str, M.Message]]:
    return [(src, m) for _t, src, m in net.messages
            if m is not None and m.exchange_type == ExchangeType.IKE_AUTH]


def init_messages(net) -> list[tuple[str, M.Message]]:
    return [(src, m) for _t, src, m in net.messages
            if m is not None and m.exchange_type == ExchangeType.IKE_SA_INIT]


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_certificate_authentication_with_fragmentation(kind):
    """The default (fragmentation on, 1280-octet fragments): a certificate-carrying IKE_AUTH
    larger than a fragment crosses as SKF fragments (RFC 7383) and authenticates."""
    p = pki(kind)
    a, b, net = engines(creds(p, p.issue("a.example.net")), creds(p, p.issue("b.example.net")),
                        fragmentation=True)
    run(a, b, net)
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []
    assert not of(net, A_ADDR, ev.AuthFailed) and not of(net, B_ADDR, ev.AuthFailed)
    fragments = [summary for _t, _src, _dst, summary in net.trace if "IKE_AUTH" in summary and "SKF(" in summary]
    if kind == "rsa":   # a leaf plus an RSA intermediate does not fit in 1280 octets
        assert fragments, "the RSA IKE_AUTH was expected to be fragmented"


@pytest.mark.parametrize("kind,scheme", [
    ("ecdsa", "ECDSA-SHA256"), ("ecdsa384", "ECDSA-SHA384"), ("rsa", "RSA-PSS-SHA256"),
    ("rsapss", "RSA-PSS-SHA256"), ("ed25519", "Ed25519"),
])
def test_certificate_authentication_each_key_type(kind, scheme):
    p = pki(kind)
    a, b, net = engines(creds(p, p.issue("a.example.net")), creds(p, p.issue("b.example.net")))
    run(a, b, net)
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []
    assert not of(net, A_ADDR, ev.AuthFailed) and not of(net, B_ADDR, ev.AuthFailed)
    # IKE_SA_INIT: both announce their hashes (RFC 7427 §4); the responder asks for our CA
    inits = init_messages(net)
    for _src, m in inits:
        hs = S.peer_hashes(m.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS))
        assert hs is not None and HashAlgorithm.SHA2_256 in hs and HashAlgorithm.IDENTITY in hs
    resp = [m for _s, m in inits if m.is_response][0]
    (creq,) = resp.get_all(M.CERTREQ)
    assert creq.encoding == 4 and creq.data == keyid(p.root)
    # IKE_AUTH: method 14, leaf + intermediate (the peer only trusts the root), CERTREQ from I
    auths = auth_messages(net)
    assert len(auths) == 2
    for src, m in auths:
        a_p = m.get(M.AUTH)
        assert a_p.method == AuthMethod.DIGITAL_SIGNATURE
        n = a_p.data[0]
        assert str(S.parse_alg_id(a_p.data[1:1 + n])) == scheme
        certs = [x509.load_der_x509_certificate(c.data) for c in m.get_all(M.CERT)]
        assert [c.subject for c in certs] == [certs[0].subject, p.intermediate.subject]
        own = "a.example.net" if src == A_ADDR else "b.example.net"
        assert certs[0].subject.rfc4514_string() == f"CN={own},O=Isthmus tests"
    req = [m for _s, m in auths if not m.is_response][0]
    assert req.get(M.CERTREQ).data == keyid(p.root)
    # both sides know the other's certificate expiry
    for e in (a, b):
        sa = e.sas()[0]
        assert sa.peer_cert_not_after is not None
        left = (sa.peer_cert_not_after - time.time()) / 86400
        assert 29 < left < 30.1


def test_only_the_chain_the_peers_ca_needs_is_sent():
    """B trusts the intermediate itself: its CERTREQ names it, so A sends its end entity only;
    A trusts the root only, so B sends end entity + intermediate."""
    p = pki("ecdsa")
    a, b, net = engines(creds(p, p.issue("a.example.net")),
                        creds(p, p.issue("b.example.net"), ca=[p.intermediate_pem]))
    run(a, b, net)
    assert one_ike_sa_each(net) == []
    for src, m in auth_messages(net):
        n = len(m.get_all(M.CERT))
        assert n == (1 if src == A_ADDR else 2), (src, n)


def _refusal(a_cert, b_cert, refuser, a_kw=None, b_kw=None, offset=None):
    a, b, net = engines(a_cert, b_cert, a_kw=a_kw, b_kw=b_kw, offset=offset)
    run(a, b, net, 3.0)
    other = A_ADDR if refuser == B_ADDR else B_ADDR
    fails = of(net, refuser, ev.AuthFailed)
    assert fails, net.events
    assert not of(net, refuser, ev.ChildSaInstalled)
    if refuser == A_ADDR:   # the responder had installed its pair; it is removed again
        assert len(of(net, B_ADDR, ev.ChildSaDeleted)) == len(of(net, B_ADDR, ev.ChildSaInstalled))
    # the other side learns it was refused (the responder from the initiator's INFORMATIONAL,
    # §2.21.2) and keeps no SA
    assert any("AUTHENTICATION_FAILED" in f.reason for f in of(net, other, ev.AuthFailed))
    assert a.sas() == [] and b.sas() == []
    return fails[0].reason


@pytest.mark.parametrize("side", ["responder", "initiator"])
def test_revoked_certificate_is_refused(side):
    p = pki("ecdsa")
    bad = p.issue("a.example.net" if side == "responder" else "b.example.net")
    p.revoke(bad)
    crl = p.crl_pem()
    good_a, good_b = p.issue("a.example.net"), p.issue("b.example.net")
    if side == "responder":
        reason = _refusal(creds(p, bad), creds(p, good_b, crls=[crl]), B_ADDR)
    else:
        reason = _refusal(creds(p, good_a, crls=[crl]), creds(p, bad), A_ADDR)
    assert "(revoked)" in reason and "keyCompromise" in reason and f"{bad.cert.serial_number:x}" in reason


def test_a_crl_in_der_and_one_of_another_issuer():
    p, q = pki("ecdsa"), pki("ecdsa", "Other org")
    bad = p.issue("a.example.net")
    p.revoke(bad)
    # q's CRL lists nothing of p's: ignored; p's CRL as DER: applies
    reason = _refusal(creds(p, bad), creds(p, p.issue("b.example.net"), crls=[q.crl_pem(), p.crl_der()]), B_ADDR)
    assert "(revoked)" in reason


@pytest.mark.parametrize("side", ["responder", "initiator"])
def test_expired_certificate_is_refused(side):
    p = pki("ecdsa")
    if side == "responder":
        reason = _refusal(creds(p, p.issue("a.example.net", expired=True)), creds(p, p.issue("b.example.net")), B_ADDR)
    else:
        reason = _refusal(creds(p, p.issue("a.example.net")), creds(p, p.issue("b.example.net", expired=True)), A_ADDR)
    assert "(expired)" in reason and "expired on" in reason


def test_validity_follows_the_engines_wall_clock():
    """The same certificates, 40 days later by the wall clock the engine is given: expired."""
    p = pki("ecdsa")
    reason = _refusal(creds(p, p.issue("a.example.net")), creds(p, p.issue("b.example.net")), B_ADDR,
                      offset=time.time() - 1000.0 + 40 * 86400)
    assert "(expired)" in reason


@pytest.mark.parametrize("side", ["responder", "initiator"])
def test_certificate_of_another_ca_is_refused(side):
    p, q = pki("ecdsa"), pki("ecdsa", "Other org")
    if side == "responder":
        reason = _refusal(creds(q, q.issue("a.example.net"), ca=[p.root_pem]), creds(p, p.issue("b.example.net")),
                          B_ADDR)
    else:
        reason = _refusal(creds(p, p.issue("a.example.net")), creds(q, q.issue("b.example.net"), ca=[p.root_pem]),
                          A_ADDR)
    assert "(untrusted)" in reason and "does not chain to a trusted CA" in reason and "Other org" in reason


@pytest.mark.parametrize("side", ["responder", "initiator"])
def test_identity_not_in_the_certificate_is_refused(side):
    p = pki("ecdsa")
    if side == "responder":
        reason = _refusal(creds(p, p.issue("a.example.net", san="x.example.net")),
                          creds(p, p.issue("b.example.net")), B_ADDR)
        assert "a.example.net" in reason
    else:
        reason = _refusal(creds(p, p.issue("a.example.net")),
                          creds(p, p.issue("b.example.net", san="x.example.net")), A_ADDR)
        assert "b.example.net" in reason
    assert "(id-mismatch)" in reason and "x.example.net" in reason


def test_psk_tunnel_refuses_a_certificate_peer_and_vice_versa():
    p = pki("ecdsa")
    a = IkeEngine([tunnel("a", psk=b"", cert=creds(p, p.issue("a.example.net")))],
                  random=_random.Random(1).randbytes, wall_offset=time.time() - 1000)
    b = IkeEngine([tunnel("b")], random=_random.Random(2).randbytes)
    net = SimNet({A_ADDR: a, B_ADDR: b})
    run(a, b, net, 3)
    (f,) = of(net, B_ADDR, ev.AuthFailed)[:1]
    # B sent no SIGNATURE_HASH_ALGORITHMS, so A used RFC 4754's method for its P-256 key
    assert "ECDSA_SHA256_P256" in f.reason and "pre-shared key" in f.reason
    # and a PSK initiator meeting a certificate responder
    a = IkeEngine([tunnel("a")], random=_random.Random(1).randbytes)
    b = IkeEngine([tunnel("b", psk=b"", cert=creds(p, p.issue("b.example.net")))],
                  random=_random.Random(2).randbytes, wall_offset=time.time() - 1000)
    net = SimNet({A_ADDR: a, B_ADDR: b})
    run(a, b, net, 3)
    (f,) = of(net, B_ADDR, ev.AuthFailed)[:1]
    assert "authenticates with a pre-shared key; tunnel to-a uses certificates" in f.reason
    assert "AUTHENTICATION_FAILED" in of(net, A_ADDR, ev.AuthFailed)[0].reason


def test_identity_matching_rules():
    p = pki("ecdsa")
    c = p.issue("gw.example.net", san=["gw.example.net", "192.0.2.7", "ops@example.net"]).cert
    assert id_matches(c, Identity.parse("GW.example.net"))
    assert id_matches(c, Identity.parse("192.0.2.7"))
    assert id_matches(c, Identity.parse("ops@example.net"))
    assert not id_matches(c, Identity.parse("192.0.2.8"))
    assert not id_matches(c, Identity.parse("other.example.net"))
    assert id_matches(c, Identity.parse("O=Isthmus tests, CN=gw.example.net"))
    assert not id_matches(c, Identity.parse("O=Isthmus tests, CN=other"))
    assert not id_matches(c, Identity.parse("keyid:gw"))


def test_credentials_refuse_a_key_of_another_certificate_and_hide_the_key():
    p = pki("ecdsa")
    one, two = p.issue("a.example.net"), p.issue("b.example.net")
    with pytest.raises(PolicyError, match="does not belong"):
        CertCredentials.from_pem(one.cert_pem, two.key_pem, [p.root_pem])
    with pytest.raises(PolicyError, match="at least one CA"):
        CertCredentials.from_pem(one.cert_pem, one.key_pem, [])
    c = creds(p, one)
    key_line = one.key_pem.decode().splitlines()[1]
    t = tunnel("a", psk=b"", cert=c)
    assert key_line not in repr(t) and "private_key" not in repr(c).split("certificate=")[0]
    with pytest.raises(PolicyError, match="not both"):
        tunnel("a", psk=b"x", cert=c)


# ------------------------------------------------------------------ signature schemes


def _key(kind):
    return {"p256": lambda: ec.generate_private_key(ec.SECP256R1()),
            "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
            "rsa": lambda: rsa.generate_private_key(65537, 2048),
            "ed25519": ed25519.Ed25519PrivateKey.generate}[kind]()


@pytest.mark.parametrize("kind,peer,method,scheme", [
    ("p256", None, AuthMethod.ECDSA_SHA256_P256, "ECDSA-SHA256"),            # RFC 4754 for old peers
    ("p384", None, AuthMethod.ECDSA_SHA384_P384, "ECDSA-SHA384"),
    ("rsa", None, AuthMethod.RSA_DIGITAL_SIGNATURE, "RSA-PKCS1-SHA1"),       # method 1
    ("p256", (HashAlgorithm.SHA2_512,), AuthMethod.DIGITAL_SIGNATURE, "ECDSA-SHA512"),
    ("rsa", (HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512), AuthMethod.DIGITAL_SIGNATURE, "RSA-PSS-SHA384"),
    ("ed25519", (HashAlgorithm.IDENTITY,), AuthMethod.DIGITAL_SIGNATURE, "Ed25519"),
])
def test_scheme_follows_the_peers_signature_hash_algorithms(kind, peer, method, scheme):
    key = _key(kind)
    octets = b"signed octets of RFC 7296 section 2.15"
    m, data = S.sign(key, peer, octets)
    assert m == method
    s = S.verify(key.public_key(), m, data, octets)
    assert str(s) == scheme
    with pytest.raises(S.SignatureError, match="does not verify"):
        S.verify(key.public_key(), m, data, octets + b"x")


def test_unusable_peer_hashes_and_wrong_keys_are_clear_errors():
    with pytest.raises(S.SignatureError, match="Identity hash"):
        S.sign(_key("ed25519"), (HashAlgorithm.SHA2_256,), b"x")
    with pytest.raises(S.SignatureError, match="offer no hash"):
        S.sign(_key("p256"), (HashAlgorithm.SHA1,), b"x")
    k = _key("p256")
    m, data = S.sign(k, (HashAlgorithm.SHA2_256,), b"x")
    with pytest.raises(S.SignatureError, match="holds a RSA"):
        S.verify(_key("rsa").public_key(), m, data, b"x")
    with pytest.raises(S.SignatureError, match="not a signature method"):
        S.verify(k.public_key(), AuthMethod.SHARED_KEY_MIC, data, b"x")
    with pytest.raises(S.SignatureError, match="overruns"):
        S.verify(k.public_key(), AuthMethod.DIGITAL_SIGNATURE, b"\xff\x30", b"x")


def test_rsa_pkcs1_under_rfc7427_is_accepted_as_strongswan_sends_it():
    """strongSwan signs with sha256WithRSAEncryption under method 14 unless rsa_pss is set."""
    from cryptography.hazmat.primitives.asymmetric import padding
    key = _key("rsa")
    sig = key.sign(b"octets", padding.PKCS1v15(), hashes.SHA256())
    a = S.alg_id(S.Scheme("rsa_pkcs1", "sha256"))
    assert a.hex() == "300d06092a864886f70d01010b0500"       # RFC 7427 Appendix A.2.2
    assert str(S.verify(key.public_key(), AuthMethod.DIGITAL_SIGNATURE, bytes([len(a)]) + a + sig, b"octets")) \
        == "RSA-PKCS1-SHA256"


def test_rfc7427_algorithm_identifiers():
    # RFC 7427 Appendix A: ecdsa-with-sha256, RSASSA-PSS with SHA-256 (A.4.3 shape)
    assert S.alg_id(S.Scheme("ecdsa", "sha256")).hex() == "300a06082a8648ce3d040302"
    assert S.alg_id(S.Scheme("ed25519", None)).hex() == "300506032b6570"          # RFC 8420
    pss = S.pss_alg_id("sha256")
    # (the shape of Chromium's rsa-pss-sha256 test vector: SEQUENCE 65 { rsassaPss, SEQUENCE 52 {
    #  [0] sha256 NULL, [1] mgf1 sha256 NULL, [2] 32 } })
    assert pss.hex() == ("304106092a864886f70d01010a3034a00f300d06096086480165030402010500a11c301a06092a864886"
                         "f70d010108300d06096086480165030402010500a203020120")
    assert S.parse_alg_id(pss) == S.Scheme("rsa_pss", "sha256", 32)
    # PSS with the SHA-1 defaults is refused
    with pytest.raises(S.SignatureError, match="SHA1"):
        S.parse_alg_id(bytes.fromhex("300d06092a864886f70d01010a3000"))


# ------------------------------------------------------------------ CRL distribution points


def test_distribution_point_crl_revokes_a_running_sa_and_later_attempts():
    """The engine lists the peer chain's CRL distribution points for the daemon to fetch; a CRL
    handed back that revokes the peer deletes the running IKE SA (AuthFailed with the reason)
    and refuses the re-initiation."""
    p = TestPKI("ecdsa", "CDP org")
    bad = p.issue("a.example.net", cdp="http://crl.example.net/intermediate.crl")
    a, b, net = engines(creds(p, bad), creds(p, p.issue("b.example.net")))
    run(a, b, net)
    assert one_ike_sa_each(net) == []
    assert b.take_crl_urls() == ["http://crl.example.net/intermediate.crl"]
    assert b.take_crl_urls() == []
    # a CRL of another issuer changes nothing
    assert b.add_crl(pki("ecdsa", "Other org").crl(), net.now) == []
    p.revoke(bad)
    assert b.add_crl(p.crl(), net.now) == ["to-a"]
    net.run(3)
    (f,) = of(net, B_ADDR, ev.AuthFailed)
    assert "(revoked)" in f.reason and "a.example.net" in f.reason
    assert of(net, A_ADDR, ev.IkeSaDown) and of(net, B_ADDR, ev.IkeSaDown)
    net.run(60)          # A re-initiates (start=True): refused with the fetched CRL
    fails = of(net, B_ADDR, ev.AuthFailed)
    assert len(fails) >= 2 and all("(revoked)" in x.reason for x in fails)
    assert not [s for s in b.sas() if s.established]
    # one CRL kept per issuer
    assert {c.issuer for c in b.fetched_crls()} == {p.intermediate.subject,
                                                    pki("ecdsa", "Other org").intermediate.subject}


def test_an_ike_rekey_keeps_the_peer_certificate_for_revocation_and_expiry():
    p = TestPKI("ecdsa", "Rekey org")
    cred = p.issue("a.example.net")
    a, b, net = engines(creds(p, cred), creds(p, p.issue("b.example.net")))
    run(a, b, net)
    old = b.sas()[0]
    a.rekey_ike("to-b", net.now)
    net.run(5)
    assert one_ike_sa_each(net) == []
    new = b.sas()[0]
    assert new is not old and new.peer_cert_not_after == old.peer_cert_not_after is not None
    p.revoke(cred)
    assert b.add_crl(p.crl(), net.now) == ["to-a"]
    net.run(3)
    assert "(revoked)" in of(net, B_ADDR, ev.AuthFailed)[0].reason


def test_an_expired_ca_is_named_only_when_it_is_the_issuer():
    """An unrelated expired CA in our list does not hide the real reason (wrong CA)."""
    import datetime as dt

    p, q = pki("ecdsa"), pki("ecdsa", "Other org")
    old_ca = TestPKI("ecdsa", "Old org")
    expired_root = old_ca._build(old_ca.root.subject, old_ca.root_key.public_key(), None, old_ca.root_key, ca=True,
                                 path_len=1, not_before=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
                                 not_after=dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc))
    from cryptography.hazmat.primitives import serialization as ser
    b_cred = creds(p, p.issue("b.example.net"), ca=[p.root_pem, expired_root.public_bytes(ser.Encoding.PEM)])
    reason = _refusal(creds(q, q.issue("a.example.net"), ca=[p.root_pem]), b_cred, B_ADDR)
    assert "(untrusted)" in reason and "Old org" not in reason.split("trusted")[0]


@pytest.mark.parametrize("lost", [2, 3])     # datagram 2: IKE_AUTH request, 3: its response
def test_a_lost_ike_auth_message_is_retransmitted_and_the_sa_comes_up(lost):
    """Loss of the (large) certificate-carrying IKE_AUTH request or response: the initiator
    retransmits; the responder answers a retransmitted request from its cache, so the signature
    and the chain are checked once and both sides agree."""
    from tests.unit.ike.simnet import Faults

    p = pki("ecdsa")
    wall = time.time() - 1000.0
    off = FragmentationConfig(enabled=False)   # datagram n is message n
    a = IkeEngine([tunnel("a", psk=b"", cert=creds(p, p.issue("a.example.net")), fragmentation=off)],
                  random=_random.Random(1).randbytes, wall_offset=wall)
    b = IkeEngine([tunnel("b", psk=b"", cert=creds(p, p.issue("b.example.net")), fragmentation=off)],
                  random=_random.Random(2).randbytes, wall_offset=wall)
    net = SimNet({A_ADDR: a, B_ADDR: b}, Faults(drop=lambda d, n: n == lost))
    run(a, b, net, 20)
    assert one_ike_sa_each(net) == [] and installed_pair_ok(net) == []
    assert len(of(net, B_ADDR, ev.IkeSaUp)) == 1 and not of(net, B_ADDR, ev.AuthFailed)
    assert len([m for _s, m in auth_messages(net) if not m.is_response]) == 2 - (lost == 2)  # delivered requests


def test_a_certificate_without_its_private_key_is_refused():
    """A peer presenting someone's valid certificate but signing with another key (it does not
    hold the certificate's key): the signature does not verify, whatever the chain."""
    p = pki("ecdsa")
    stolen = creds(p, p.issue("a.example.net"))
    object.__setattr__(stolen, "private_key", ec.generate_private_key(ec.SECP256R1()))
    reason = _refusal(stolen, creds(p, p.issue("b.example.net")), B_ADDR)
    assert "AUTH of peer a.example.net refused" in reason and "does not verify with the key" in reason
