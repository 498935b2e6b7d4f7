"""Certificate authentication against strongSwan 5.9.8 (issue 10, item 1): a test PKI made here
(root -> intermediate -> end entity, ECDSA P-256 and RSA-2048), each side initiating, RSA
without RFC 7427 (strongSwan's signature_authentication = no: auth method 1 both ways), and a
revoked / expired / wrong-CA / wrong-ID certificate refused with the right reason, whichever
side presents it.

Both sides trust the root only; each end entity comes from its own intermediate CA under it,
so each side must send its intermediate: strongSwan's CERTREQ names the root and its own
intermediate, not ours (RFC 7296 §3.7).
"""

from __future__ import annotations

import re

import pytest

from tests.host.ikerunner_proc import EngineProc, tunnel_json
from tests.peers.certs import TestPKI
from tests.peers.fixtures import ns_pair, strongswan_factory  # noqa: F401
from tests.peers.strongswan import Child, Conn

_PKI: dict[str, TestPKI] = {}


def pki(kind: str, org: str = "Isthmus tests") -> TestPKI:
    if (kind, org) not in _PKI:
        _PKI[(kind, org)] = TestPKI(kind, org)
    return _PKI[(kind, org)]


def pki_sibling(kind: str) -> TestPKI:
    """Another intermediate under pki(kind)'s root: where our end entities come from."""
    if (kind, "sibling") not in _PKI:
        _PKI[(kind, "sibling")] = pki(kind).sibling(f"second intermediate CA ({kind})")
    return _PKI[(kind, "sibling")]


def sw_conn(side_sw, side_us, cert="me.pem", **kw) -> Conn:
    args = dict(local_addrs=[side_sw.addr4], remote_addrs=[side_us.addr4], local_id="b.example.net",
                remote_id="a.example.net", auth="pubkey", cert=cert, proposals=["aes256gcm16-prfsha384-x25519"],
                children=[Child(esp_proposals=["aes256gcm16"])])
    args.update(kw)
    return Conn(**args)


def sw_setup(sw, p: TestPKI, cred, *, crl: bool = False, trust: TestPKI | None = None) -> None:
    """strongSwan's credential from `p`, trusting `trust`'s root (default: the same PKI)."""
    p.write_strongswan(sw.swanctl_dir, cred, "me")
    if trust is not None and trust is not p:
        (sw.swanctl_dir / "x509ca" / "me-root.pem").write_bytes(trust.root_pem)
    if crl:
        (sw.swanctl_dir / "x509crl" / "peer.crl").write_bytes((trust or p).crl_pem())


def ours(tmp_path, side_us, side_sw, p: TestPKI, cred, *, start: bool, trust: TestPKI | None = None,
         crl: bool = False, **kw) -> EngineProc:
    d = tmp_path / "ours-files"
    d.mkdir(parents=True, exist_ok=True)
    (d / "cert.pem").write_bytes(cred.bundle_pem)
    (d / "key.pem").write_bytes(cred.key_pem)
    (d / "key.pem").chmod(0o600)
    (d / "ca.pem").write_bytes((trust or p).root_pem)
    cert = {"certificate": str(d / "cert.pem"), "key": str(d / "key.pem"), "ca": [str(d / "ca.pem")]}
    if crl:
        (d / "peer.crl").write_bytes((trust or p).crl_der())
        cert["crl"] = [str(d / "peer.crl")]
    t = tunnel_json(side_us, side_sw, "to-b", local_id="a.example.net", remote_id="b.example.net", psk=b"",
                    cert=cert, start=start, ike_proposals=["aes256gcm16-prfsha384-x25519"],
                    esp_proposals=["aes256gcm16"], **kw)
    return EngineProc(tmp_path / "ours", side_us, [t])


def our_log(us: EngineProc) -> str:
    return us.stderr_path.read_text(errors="replace")


@pytest.mark.parametrize("kind,swan_scheme,our_scheme", [
    ("ecdsa", "ECDSA_WITH_SHA256_DER", "ECDSA-SHA256"),
    ("rsa", "RSA_EMSA_PSS", "RSA-"),     # strongSwan signs PKCS#1 v1.5 SHA-256 by default, we PSS
    ("ed25519", "ED25519", "Ed25519"),   # Ed25519 end entities (RFC 8420) under ECDSA CAs
])
@pytest.mark.parametrize("initiator", ["ours", "strongswan"])
def test_certificates_with_strongswan(tmp_path, ns_pair, strongswan_factory, kind, swan_scheme, our_scheme,
                                      initiator):
    side_us, side_sw = ns_pair
    p = pki(kind)
    mine = pki_sibling(kind)
    sw = strongswan_factory(side_sw, "sw")
    sw_setup(sw, p, p.issue("b.example.net"))
    sw.load(sw_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, mine, mine.issue("a.example.net"), start=initiator == "ours") as us:
        if initiator == "strongswan":
            sw.initiate("c")
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        up = us.of("IkeSaUp")[0]
        sa = sw.wait_ike_up()
        assert sa.initiator == (initiator == "strongswan") and up["initiator"] == (initiator == "ours")
        assert (up["spi_i"], up["spi_r"]) == (sa.spi_i, sa.spi_r)
        assert up["remote_id"] == "b.example.net" and sa.remote_id == "a.example.net"
        log = sw.log_text()
        # strongSwan verified our signature (RSA: PSS, which we use under RFC 7427) ...
        if kind == "rsa":
            assert re.search(r"authentication of 'a.example.net' with RSA_EMSA_PSS\S* successful", log), log[-3000:]
        else:
            assert f"authentication of 'a.example.net' with {swan_scheme} successful" in log
        # ... with the intermediate we sent (its CERTREQ did not name it)
        assert re.search(r"received cert request for .*root CA", log)
        assert re.search(r'received issuer cert "O=Isthmus tests, CN=second intermediate', log), log[-4000:]
        assert 'using trusted ca certificate "O=Isthmus tests, CN=Isthmus tests root CA' in log
        # and we verified strongSwan's (it sent its intermediate as well)
        m = re.search(r"peer b.example.net authenticated with DIGITAL_SIGNATURE \(([^)]*)\)", our_log(us))
        assert m, our_log(us)[-2000:]
        assert m.group(1) == ("RSA-PKCS1-SHA256" if kind == "rsa" else our_scheme)


def test_rsa_without_rfc7427_uses_method_1_both_ways(tmp_path, ns_pair, strongswan_factory):
    """A peer without SIGNATURE_HASH_ALGORITHMS (strongSwan with signature_authentication = no):
    RSA PKCS#1 v1.5 (auth method 1, RFC 7296 §3.8) in both directions."""
    side_us, side_sw = ns_pair
    p = pki("rsa")
    sw = strongswan_factory(side_sw, "sw", charon={"signature_authentication": False})
    sw_setup(sw, p, p.issue("b.example.net"))
    sw.load(sw_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, p, p.issue("a.example.net"), start=True) as us:
        us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        sw.wait_ike_up()
        assert "authentication of 'a.example.net' with RSA signature successful" in sw.log_text()
        assert "peer b.example.net authenticated with RSA_DIGITAL_SIGNATURE (RSA-PKCS1-SHA1)" in our_log(us)


# --------------------------------------------------------------------------- refusals
def _bad(case: str, p: TestPKI, other: TestPKI, ike_id: str):
    """(credential, its PKI) of a certificate that must be refused for `case`."""
    if case == "revoked":
        c = p.issue(ike_id)
        p.revoke(c)
        return c, p
    if case == "expired":
        return p.issue(ike_id, expired=True), p
    if case == "wrong-ca":
        return other.issue(ike_id), other
    return p.issue(ike_id, san="x.example.net"), p     # wrong-id


OUR_REASON = {"revoked": "(revoked)", "expired": "(expired)", "wrong-ca": "(untrusted)", "wrong-id": "(id-mismatch)"}
# charon's words when it refuses our certificate
SWAN_REASON = {"revoked": r"certificate was revoked", "expired": r"certificate invalid|not valid|expired",
               "wrong-ca": r"no issuer certificate found|no trusted .* public key found",
               "wrong-id": r"no trusted .* public key found for 'a.example.net'"}


@pytest.mark.parametrize("case", ["revoked", "expired", "wrong-ca", "wrong-id"])
def test_we_refuse_strongswans_bad_certificate(tmp_path, ns_pair, strongswan_factory, case):
    """strongSwan initiates with a bad certificate: our responder refuses it, says why, and
    strongSwan learns AUTHENTICATION_FAILED."""
    side_us, side_sw = ns_pair
    p, other = pki("ecdsa"), pki("ecdsa", "Other org")
    cred, issuer = _bad(case, p, other, "b.example.net")
    sw = strongswan_factory(side_sw, "sw")
    sw_setup(sw, issuer, cred, trust=p)
    sw.load(sw_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, p, p.issue("a.example.net"), start=False, crl=case == "revoked") as us:
        sw.initiate_async("c")
        f = us.wait_event(lambda e: e["event"] == "AuthFailed", 20, what="AuthFailed")
        assert OUR_REASON[case] in f["reason"], f["reason"]
        assert f["reason"] in our_log(us)
        if case == "wrong-id":
            assert "b.example.net" in f["reason"] and "x.example.net" in f["reason"]
        sw.wait_for(lambda sas: not sas or None, 10, "strongSwan gave up")
        assert re.search(r"received AUTHENTICATION_FAILED notify error", sw.log_text())
        assert not us.of("ChildSaInstalled") and not us.of("IkeSaUp")


@pytest.mark.parametrize("case", ["revoked", "expired", "wrong-ca", "wrong-id"])
def test_strongswan_refuses_our_bad_certificate(tmp_path, ns_pair, strongswan_factory, case):
    """We initiate with a bad certificate: strongSwan refuses it (its reason in its log) and our
    AuthFailed says the peer refused us."""
    side_us, side_sw = ns_pair
    p, other = pki("ecdsa"), pki("ecdsa", "Other org")
    cred, issuer = _bad(case, p, other, "a.example.net")
    sw = strongswan_factory(side_sw, "sw")
    sw_setup(sw, p, p.issue("b.example.net"), crl=case == "revoked")
    sw.load(sw_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, issuer, cred, start=True, trust=p) as us:
        f = us.wait_event(lambda e: e["event"] == "AuthFailed", 20, what="AuthFailed")
        assert "AUTHENTICATION_FAILED" in f["reason"] and "certificates" in f["reason"]
        assert re.search(SWAN_REASON[case], sw.log_text()), sw.log_tail(30)
        assert not us.of("ChildSaInstalled")


def test_we_refuse_a_bad_strongswan_responder_and_tell_it(tmp_path, ns_pair, strongswan_factory):
    """We initiate and strongSwan's certificate is revoked: strongSwan already considers the
    IKE SA up when we check its AUTH; our INFORMATIONAL (AUTHENTICATION_FAILED + DELETE,
    RFC 7296 §2.21.2) makes it drop the SA."""
    side_us, side_sw = ns_pair
    p = pki("ecdsa")
    cred, _ = _bad("revoked", p, p, "b.example.net")
    sw = strongswan_factory(side_sw, "sw")
    sw_setup(sw, p, cred)
    sw.load(sw_conn(side_sw, side_us))
    with ours(tmp_path, side_us, side_sw, p, p.issue("a.example.net"), start=True, crl=True) as us:
        f = us.wait_event(lambda e: e["event"] == "AuthFailed", 20, what="AuthFailed")
        assert "(revoked)" in f["reason"]
        sw.wait_no_ike(10)
        assert not us.of("ChildSaInstalled")
