"""Test certificates for certificate-authenticated tunnels (RFC 7296 §3.6 CERT, RFC 7427 AUTH):
made with `cryptography` by the tests themselves (no strongSwan `pki`, nothing checked in).

- `TestPKI(kind)`: root CA -> intermediate CA -> end entities, for kind "ecdsa" (P-256),
  "ecdsa384", "rsa" (RSA-2048, the CAs sign with PKCS#1 v1.5 SHA-256), "rsa4096" (the same with
  RSA-4096 keys: big chains, for fragmentation), "rsapss" (the CAs sign with RSASSA-PSS) or "ed25519" (Ed25519 end entities under ECDSA CAs: cryptography's verifier
  does not accept Ed25519-signed certificates). `pki.issue("a.example.net")` gives a Credential
  whose SAN carries the IKE ID (dNSName, iPAddress, rfc822Name); `expired=True`, `san=` and
  `not_before/not_after` make the broken ones; `pki.revoke(cred)` + `pki.crl_pem()` a CRL of the
  intermediate listing it.
- `TestCA`: the older one-level CA (a self-signed CA and its end entities).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID


@dataclass
class Credential:
    """A certificate (PEM, followed by the intermediates to send, if any) and its private key."""

    name: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    cert: x509.Certificate | None = field(default=None, repr=False)
    chain_pem: bytes = b""          # intermediates after the end entity

    @property
    def bundle_pem(self) -> bytes:
        """The end-entity certificate followed by the intermediates (what `certificate:` holds)."""
        return self.cert_pem + self.chain_pem


def _name(cn: str, org: str = "Isthmus tests") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


_CA_USAGE = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)
_EE_USAGE = x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)


def _general_name(ike_id: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(ike_id))
    except ValueError:
        pass
    if "@" in ike_id:
        return x509.RFC822Name(ike_id)
    return x509.DNSName(ike_id)


class TestPKI:
    """root -> intermediate -> end entities (see the module docstring)."""

    __test__ = False

    def __init__(self, kind: str = "ecdsa", org: str = "Isthmus tests", *, root_of: "TestPKI | None" = None,
                 intermediate_cn: str | None = None) -> None:
        self.kind = kind
        self.org = org
        now = dt.datetime.now(dt.timezone.utc)
        if root_of is not None:          # another intermediate under the same root
            self.root_key, self.root = root_of.root_key, root_of.root
        else:
            self.root_key = self._ca_key()
            self.root = self._build(_name(f"{org} root CA ({kind})", org), self.root_key.public_key(), None,
                                    self.root_key, ca=True, path_len=1, not_before=now - dt.timedelta(days=2),
                                    not_after=now + dt.timedelta(days=60))
        self.inter_key = self._ca_key()
        cn = intermediate_cn or f"{org} intermediate CA ({kind})"
        self.intermediate = self._build(_name(cn, org), self.inter_key.public_key(),
                                        self.root, self.root_key, ca=True, path_len=0,
                                        not_before=now - dt.timedelta(days=2), not_after=now + dt.timedelta(days=45))
        self.revoked: list[tuple[int, dt.datetime]] = []

    # ------------------------------------------------------------------ keys and signing
    def _ca_key(self):
        if self.kind == "ecdsa384":
            return ec.generate_private_key(ec.SECP384R1())
        if self.kind in ("rsa", "rsapss"):
            return rsa.generate_private_key(65537, 2048)
        if self.kind == "rsa4096":
            return rsa.generate_private_key(65537, 4096)
        return ec.generate_private_key(ec.SECP256R1())

    def _ee_key(self):
        if self.kind == "ed25519":
            return ed25519.Ed25519PrivateKey.generate()
        return self._ca_key()

    def _sign_args(self, signing_key) -> dict:
        if isinstance(signing_key, rsa.RSAPrivateKey):
            if self.kind == "rsapss":
                return {"algorithm": hashes.SHA256(),
                        "rsa_padding": padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)}
            return {"algorithm": hashes.SHA256()}
        if isinstance(signing_key, ec.EllipticCurvePrivateKey) and signing_key.curve.name == "secp384r1":
            return {"algorithm": hashes.SHA384()}
        return {"algorithm": hashes.SHA256()}

    def _build(self, subject: x509.Name, public_key, issuer: x509.Certificate | None, signing_key, *, ca: bool,
               path_len: int | None = None, not_before: dt.datetime, not_after: dt.datetime,
               sans: list[x509.GeneralName] | None = None, cdp: str | None = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject)
             .issuer_name(issuer.subject if issuer is not None else subject)
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(not_before).not_valid_after(not_after)
             .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len if ca else None), critical=True)
             .add_extension(_CA_USAGE if ca else _EE_USAGE, critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                            critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if cdp:
            b = b.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                [x509.UniformResourceIdentifier(cdp)], None, None, None)]), critical=False)
        return b.sign(signing_key, **self._sign_args(signing_key))

    def sibling(self, cn: str) -> "TestPKI":
        """A second intermediate CA `cn` under the same root (its own end entities and CRL)."""
        return TestPKI(self.kind, self.org, root_of=self, intermediate_cn=cn)

    # ------------------------------------------------------------------ what tests use
    @property
    def root_pem(self) -> bytes:
        return _pem(self.root)

    @property
    def intermediate_pem(self) -> bytes:
        return _pem(self.intermediate)

    def issue(self, ike_id: str, *, san: str | list[str] | None = None, expired: bool = False,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              cn: str | None = None, cdp: str | None = None) -> Credential:
        """An end-entity certificate for `ike_id` (its SAN: `san` when given, else the ID),
        issued by the intermediate; `cdp`: a CRL distribution point URL."""
        key = self._ee_key()
        now = dt.datetime.now(dt.timezone.utc)
        if expired:
            not_before, not_after = now - dt.timedelta(days=20), now - dt.timedelta(days=1)
        names = [san] if isinstance(san, str) else (san if san is not None else [ike_id])
        cert = self._build(_name(cn or ike_id, self.org), key.public_key(), self.intermediate, self.inter_key,
                           ca=False, not_before=not_before or now - dt.timedelta(days=1),
                           not_after=not_after or now + dt.timedelta(days=30),
                           sans=[_general_name(n) for n in names], cdp=cdp)
        return Credential(ike_id, _pem(cert), _pem_key(key), cert, _pem(self.intermediate))

    def revoke(self, cred: Credential) -> None:
        assert cred.cert is not None
        self.revoked.append((cred.cert.serial_number, dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)))

    def crl(self) -> x509.CertificateRevocationList:
        """The intermediate's CRL listing what `revoke` was given."""
        now = dt.datetime.now(dt.timezone.utc)
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.intermediate.subject)
             .last_update(now - dt.timedelta(hours=1)).next_update(now + dt.timedelta(days=7))
             .add_extension(x509.CRLNumber(len(self.revoked) + 1), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.inter_key.public_key()),
                            critical=False))
        for serial, when in self.revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
                .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False).build())
        return b.sign(self.inter_key, **self._sign_args(self.inter_key))

    def crl_pem(self) -> bytes:
        return self.crl().public_bytes(serialization.Encoding.PEM)

    def crl_der(self) -> bytes:
        return self.crl().public_bytes(serialization.Encoding.DER)

    def write_strongswan(self, swanctl_dir: Path, cred: Credential | None, stem: str = "me",
                         crl: bool = False) -> str | None:
        """The root into x509ca/ (the only trust anchor: strongSwan's CERTREQ names it, so the
        peer must send its intermediate), the intermediate into x509/ (untrusted, for building
        and sending strongSwan's own chain), our credential into x509/ + private/, and
        optionally the CRL into x509crl/. Returns the certificate file name for `local.certs`."""
        (swanctl_dir / "x509ca").mkdir(parents=True, exist_ok=True)
        (swanctl_dir / "x509").mkdir(parents=True, exist_ok=True)
        (swanctl_dir / "x509ca" / f"{stem}-root.pem").write_bytes(self.root_pem)
        (swanctl_dir / "x509" / f"{stem}-intermediate.pem").write_bytes(self.intermediate_pem)
        if crl:
            (swanctl_dir / "x509crl").mkdir(parents=True, exist_ok=True)
            (swanctl_dir / "x509crl" / f"{stem}.crl").write_bytes(self.crl_pem())
        if cred is None:
            return None
        return write_credential(swanctl_dir, cred, stem)


class TestCA:
    """A CA that issues end-entity certificates for IKE IDs (one level)."""

    __test__ = False  # not a pytest test class

    def __init__(self, cn: str = "Isthmus Test CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, ike_id: str) -> Credential:
        """An end-entity certificate for `ike_id` (an FQDN or an IP address)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(ike_id)).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([_general_name(ike_id)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Credential(ike_id, cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert)

    def write_ca(self, swanctl_dir: Path, filename: str = "ca.pem") -> str:
        (swanctl_dir / "x509ca").mkdir(parents=True, exist_ok=True)
        (swanctl_dir / "x509ca" / filename).write_bytes(self.cert_pem)
        return filename


def write_credential(swanctl_dir: Path, cred: Credential, stem: str) -> str:
    """Place a certificate in x509/ and its key in private/ (where `swanctl --load-all` looks);
    returns the certificate's file name for `local.certs`."""
    (swanctl_dir / "x509").mkdir(parents=True, exist_ok=True)
    (swanctl_dir / "private").mkdir(parents=True, exist_ok=True)
    (swanctl_dir / "x509" / f"{stem}.pem").write_bytes(cred.cert_pem)
    keyfile = swanctl_dir / "private" / f"{stem}.pem"
    keyfile.write_bytes(cred.key_pem)
    keyfile.chmod(0o600)
    return f"{stem}.pem"
