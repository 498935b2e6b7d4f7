"""Certificates in IKEv2: CERT and CERTREQ payloads (RFC 7296 §3.6, §3.7), the peer's chain
validated against our trust anchors, CRLs, and the peer's ID against its certificate
(RFC 4945 §3.1, §5.1.3.6).

- CERT: "X.509 Certificate - Signature" (encoding 4), one DER certificate per payload: our
  end-entity certificate first, then the intermediates the peer's CA needs.
- CERTREQ: encoding 4, the concatenated SHA-1 hashes of the SubjectPublicKeyInfo of each CA
  we trust (§3.7). The peer's CERTREQ tells us where to stop sending our chain: we send the
  intermediates up to (not including) the first one issued by a CA the peer named; without a
  CERTREQ, or naming no CA of ours, we send all of them.
- Validation: cryptography's X.509 verifier (`x509.verification`, webpki rules for CA
  certificates; no EKU or other end-entity extension requirement, as RFC 4945 §5.1.3.12 asks),
  at the wall-clock time the engine is given; then every certificate of the built chain (but
  the anchor) is looked up in the configured CRLs of its issuer.
- Identity: ID_FQDN / ID_RFC822_ADDR / ID_IPV4_ADDR / ID_IPV6_ADDR must be a subjectAltName
  dNSName / rfc822Name / iPAddress of the end-entity certificate; ID_DER_ASN1_DN its subject
  (or a directoryName SAN).

Sans-IO: nothing here reads a file or a clock; `CertCredentials.from_pem` takes bytes, the time
is a parameter. cryptography's verifier refuses Ed25519 *issuing* keys (its webpki algorithm
set), so an Ed25519 end entity needs an ECDSA or RSA CA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from appliance.ike.constants import CertEncoding, IdType
from appliance.ike.message import CERT, CERTREQ
from appliance.ike.policy import Identity, PolicyError

MAX_PEER_CERTS = 8        # CERT payloads we look at (end entity + intermediates)
MAX_CHAIN_DEPTH = 6

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class CertError(Exception):
    """The peer's certificate is refused. `code` is one of: revoked, expired, not-yet-valid,
    untrusted (wrong CA / bad chain), id-mismatch, malformed, missing; `reason` is the text for
    the log and the tunnel's state (no secret in it)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def keyid(cert: x509.Certificate) -> bytes:
    """SHA-1 of the certificate's SubjectPublicKeyInfo: how CERTREQ names a CA (§3.7)."""
    return hashlib.sha1(cert.public_key().public_bytes(*_SPKI)).digest()


def describe(cert: x509.Certificate) -> str:
    return f'"{cert.subject.rfc4514_string()}"'


def _utc(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True, eq=False)
class CertCredentials:
    """Our certificate, its private key (never in a repr), the intermediates we may send, the
    CAs we trust for the peer and the CRLs we check its chain against."""

    certificate: x509.Certificate
    private_key: object = field(repr=False)
    intermediates: tuple[x509.Certificate, ...] = ()
    cas: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()

    def __post_init__(self) -> None:
        if not self.cas:
            raise PolicyError("certificate authentication needs at least one CA certificate")
        pub = self.certificate.public_key().public_bytes(*_SPKI)
        if getattr(self.private_key, "public_key", None) is None or \
                self.private_key.public_key().public_bytes(*_SPKI) != pub:  # type: ignore[attr-defined]
            raise PolicyError(f"the private key does not belong to certificate {describe(self.certificate)}")
        if not isinstance(self.private_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey,
                                             ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
            raise PolicyError("the private key must be ECDSA, RSA, Ed25519 or Ed448")
        object.__setattr__(self, "_store", trust_store(self.cas))
        object.__setattr__(self, "ca_keyids", tuple(keyid(c) for c in self.cas))

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, ca_pems: list[bytes] | tuple[bytes, ...],
                 crls: list[bytes] | tuple[bytes, ...] = ()) -> "CertCredentials":
        """From PEM bytes: `cert_pem` holds our certificate, optionally followed by
        intermediates; each of `ca_pems` one or more CA certificates; `crls` PEM or DER CRLs.
        Raises PolicyError (the message never contains key material)."""
        try:
            chain = x509.load_pem_x509_certificates(cert_pem)
        except ValueError:
            chain = []
        if not chain:
            raise PolicyError("the certificate is not PEM X.509")
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise PolicyError("the private key is not an unencrypted PEM key") from None
        cas: list[x509.Certificate] = []
        for p in ca_pems:
            try:
                cas += x509.load_pem_x509_certificates(p)
            except ValueError:
                raise PolicyError("a CA file is not PEM X.509") from None
        return cls(chain[0], key, tuple(chain[1:]), tuple(cas), tuple(load_crl(c) for c in crls))

    # ------------------------------------------------------------------ what we send
    def not_after(self) -> float:
        """Our certificate's notAfter as a UNIX time."""
        return self.certificate.not_valid_after_utc.timestamp()

    def certreq(self) -> CERTREQ:
        return CERTREQ(CertEncoding.X509_SIGNATURE, b"".join(self.ca_keyids))  # type: ignore[attr-defined]

    def cert_payloads(self, peer_cas: frozenset[bytes] | None) -> list[CERT]:
        """Our end-entity certificate and the intermediates the peer needs (§3.6, §3.7)."""
        out = [CERT(CertEncoding.X509_SIGNATURE, self.certificate.public_bytes(serialization.Encoding.DER))]
        cur = self.certificate
        for _ in range(len(self.intermediates)):
            if peer_cas and _issuer_keyid(cur, self.intermediates, self.cas) & peer_cas:
                break   # the peer trusts cur's issuer
            nxt = next((i for i in self.intermediates if i.subject == cur.issuer and i is not cur), None)
            if nxt is None or nxt.subject == nxt.issuer:
                break
            out.append(CERT(CertEncoding.X509_SIGNATURE, nxt.public_bytes(serialization.Encoding.DER)))
            cur = nxt
        return out

    # ------------------------------------------------------------------ the peer's
    def validate_peer(self, certs: list[CERT], peer_id: Identity, when: dt.datetime,
                      fetched_crls: "tuple[x509.CertificateRevocationList, ...] | list" = ()
                      ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        """The peer's end-entity certificate and the validated chain (end entity first, trust
        anchor last), once its chain, revocation status (configured CRLs, then `fetched_crls`
        from distribution points) and ID check out at `when`. Raises CertError."""
        return validate_chain(self._store, self.cas, tuple(self.crls) + tuple(fetched_crls), certs, peer_id,  # type: ignore[attr-defined]
                              when, known=self.intermediates)


def trust_store(cas: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> Store:
    return Store(list(cas))


def validate_chain(store: Store, cas: tuple[x509.Certificate, ...] | list[x509.Certificate],
                   crls: tuple[x509.CertificateRevocationList, ...], certs: list[CERT], peer_id: Identity,
                   when: dt.datetime, known: tuple[x509.Certificate, ...] | list[x509.Certificate] = ()
                   ) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The peer's end entity and validated chain from its CERT payloads (see
    CertCredentials.validate_peer). `known`: intermediates we hold (those of our own chain),
    also tried when building the peer's chain - a peer whose CERTREQ says we share an
    intermediate sends only its end entity. They are untrusted: the chain must still reach one
    of the CAs in `store`. Raises CertError."""
    ee, inter = parse_cert_payloads(certs)
    presented = list(inter)
    inter = presented + [k for k in known if k not in presented]
    verifier = (PolicyBuilder().store(store).time(when)
                .max_chain_depth(MAX_CHAIN_DEPTH)
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                    ee_policy=ExtensionPolicy.permit_all())
                .build_client_verifier())
    try:
        verified = verifier.verify(ee, inter)
    except VerificationError as e:
        raise _diagnose(ee, inter, tuple(cas), when, str(e)) from None
    chain = list(verified.chain)
    check_revocation(chain, crls)
    if not id_matches(ee, peer_id):
        raise CertError("id-mismatch", f"peer identity {peer_id} is not in its certificate "
                                       f"{describe(ee)} ({_names(ee)})")
    return ee, chain


def check_revocation(chain: list[x509.Certificate] | tuple[x509.Certificate, ...],
                     crls: tuple[x509.CertificateRevocationList, ...]) -> None:
    """Raise CertError("revoked") when a CRL of a certificate's issuer (its signature checked)
    lists that certificate; `chain` is end entity first, each issued by the next."""
    for cert, issuer in zip(chain, chain[1:]):
        for crl in crls:
            if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer.public_key()):
                continue
            r = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if r is not None:
                reason = ""
                try:
                    reason = f", reason {r.extensions.get_extension_for_class(x509.CRLReason).value.reason.value}"
                except x509.ExtensionNotFound:
                    pass
                raise CertError("revoked", f"certificate {describe(cert)} (serial {cert.serial_number:x}) "
                                           f"is revoked by the CRL of {describe(issuer)} since "
                                           f"{_utc(r.revocation_date_utc):%Y-%m-%d %H:%M} UTC{reason}")


MAX_CRL_URLS = 4          # distribution point URLs taken from one certificate


def crl_urls(chain: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> list[str]:
    """http(s) URIs of the CRL distribution points (RFC 5280 §4.2.1.13) of every certificate of
    `chain` but the trust anchor: what the daemon may fetch (the engine does no I/O)."""
    out: list[str] = []
    for cert in list(chain)[:-1]:
        try:
            dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except x509.ExtensionNotFound:
            continue
        n = 0
        for dp in dps:
            for g in dp.full_name or ():
                if isinstance(g, x509.UniformResourceIdentifier) and g.value.lower().startswith(("http://", "https://")):
                    if g.value not in out and n < MAX_CRL_URLS:
                        out.append(g.value)
                        n += 1
    return out


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise PolicyError("a CRL is neither PEM nor DER X.509 CRL") from None


def _issuer_keyid(cert: x509.Certificate, inter: tuple[x509.Certificate, ...],
                  cas: tuple[x509.Certificate, ...]) -> set[bytes]:
    """Key IDs (SHA-1 of the SubjectPublicKeyInfo, as CERTREQ names CAs) of the certificates we
    hold that may have issued `cert` (by name)."""
    return {keyid(c) for c in inter + cas if c.subject == cert.issuer and c is not cert}


def parse_cert_payloads(certs: list[CERT]) -> tuple[x509.Certificate, list[x509.Certificate]]:
    usable = [c for c in certs if c.encoding == CertEncoding.X509_SIGNATURE]
    if not usable:
        other = ", ".join(sorted({_enc_name(c.encoding) for c in certs}))
        raise CertError("missing", "peer sent no X.509 certificate (CERT payload)"
                        + (f"; only {other}" if other else ""))
    parsed = []
    for n, c in enumerate(usable[:MAX_PEER_CERTS]):
        try:
            parsed.append(x509.load_der_x509_certificate(c.data))
        except ValueError:
            raise CertError("malformed", f"CERT payload {n + 1} is not a DER X.509 certificate") from None
    return parsed[0], parsed[1:]


def _enc_name(e: int) -> str:
    try:
        return CertEncoding(e).name
    except ValueError:
        return str(e)


def _diagnose(ee: x509.Certificate, inter: list[x509.Certificate], cas: tuple[x509.Certificate, ...],
              when: dt.datetime, detail: str) -> CertError:
    """A CertError naming the most likely reason the verifier gave up."""
    # the CAs that matter: those named as issuer by the end entity or a presented intermediate
    issuers = {c.issuer for c in [ee] + inter}
    for c in [ee] + inter + [ca for ca in cas if ca.subject in issuers]:
        if when > c.not_valid_after_utc:
            who = "peer certificate" if c is ee else ("CA certificate" if c in cas else "intermediate")
            return CertError("expired", f"{who} {describe(c)} expired on "
                                        f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        if when < c.not_valid_before_utc:
            who = "peer certificate" if c is ee else ("CA certificate" if c in cas else "intermediate")
            return CertError("not-yet-valid", f"{who} {describe(c)} is not valid before "
                                              f"{c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    top = ee
    seen = 0
    while seen < MAX_CHAIN_DEPTH:
        up = next((i for i in inter if i.subject == top.issuer and i is not top), None)
        if up is None:
            break
        top, seen = up, seen + 1
    trusted = ", ".join(describe(c) for c in cas)
    return CertError("untrusted", f"peer certificate {describe(ee)} does not chain to a trusted CA: "
                                  f"issuer {_q(top.issuer)}, trusted {trusted} ({detail})")


def _q(name: x509.Name) -> str:
    return f'"{name.rfc4514_string()}"'


def _sans(cert: x509.Certificate) -> list:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _names(cert: x509.Certificate) -> str:
    parts = [f"subject {_q(cert.subject)}"]
    for g in _sans(cert):
        if isinstance(g, (x509.DNSName, x509.RFC822Name)):
            parts.append(str(g.value))
        elif isinstance(g, x509.IPAddress):
            parts.append(str(g.value))
    return "; ".join(parts)


def id_matches(cert: x509.Certificate, ident: Identity) -> bool:
    """RFC 4945 §3.1: the ID must be in the certificate (SAN, or the subject DN)."""
    t = ident.id_type
    sans = _sans(cert)
    if t == IdType.ID_FQDN:
        want = ident.data.decode("ascii", "replace").lower().rstrip(".")
        return any(isinstance(g, x509.DNSName) and g.value.lower().rstrip(".") == want for g in sans)
    if t == IdType.ID_RFC822_ADDR:
        want = ident.data.decode("ascii", "replace").lower()
        return any(isinstance(g, x509.RFC822Name) and g.value.lower() == want for g in sans)
    if t in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR):
        try:
            want_ip = ipaddress.ip_address(ident.data)
        except ValueError:
            return False
        return any(isinstance(g, x509.IPAddress) and g.value == want_ip for g in sans)
    if t == IdType.ID_DER_ASN1_DN:
        if ident == Identity(IdType.ID_DER_ASN1_DN, cert.subject.public_bytes()):
            return True
        return any(isinstance(g, x509.DirectoryName)
                   and ident == Identity(IdType.ID_DER_ASN1_DN, g.value.public_bytes()) for g in sans)
    return False


def days_left(not_after: float | None, wall_now: float) -> float | None:
    """Days until a certificate's notAfter (negative once expired)."""
    if not_after is None:
        return None
    return (not_after - wall_now) / 86400.0
