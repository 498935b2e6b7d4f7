"""Test certificates for certificate-authenticated tunnels (RFC 7296 §3.6 CERT, §2.15 AUTH with
signatures): a self-signed CA and end-entity certificates whose subjectAltName carries the IKE ID.

Made with `cryptography` so no extra tool (strongSwan's `pki`) is needed. ECDSA P-256 keys are
small and fast; end entities get a dNSName SAN for FQDN IDs, an iPAddress SAN for address IDs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Credential:
    """A certificate and its private key, PEM-encoded."""

    name: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Isthmus tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    """A CA that issues end-entity certificates for IKE IDs."""

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
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, ike_id: str) -> Credential:
        """An end-entity certificate for `ike_id` (an FQDN or an IP address)."""
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(ike_id))
        except ValueError:
            san = x509.DNSName(ike_id)
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(ike_id)).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Credential(ike_id, cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))

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
