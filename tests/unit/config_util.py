"""Helpers for the config tests: write a config and its secret files into a temporary directory."""

from __future__ import annotations

import datetime
import os
import textwrap
from pathlib import Path

from appliance.config import ConfigError, Issue, load_config

PSK = "Qm7.vT2_xK9pL4wZ8nR3"   # valid for AWS too (letters, digits, '.', '_')


def write_psk(directory: Path, name: str = "to-b.psk", value: str = PSK, mode: int = 0o600) -> Path:
    (directory / "secrets").mkdir(exist_ok=True)
    path = directory / "secrets" / name
    path.write_text(value + "\n")
    os.chmod(path, mode)
    return path


def write_config(directory: Path, text: str, name: str = "isthmus.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def issues_of(path: Path, **kwargs) -> list[Issue]:
    try:
        load_config(path, **kwargs)
    except ConfigError as exc:
        assert exc.issues, "ConfigError without issues"
        return exc.issues
    raise AssertionError(f"{path} was accepted")


def one_issue(path: Path, **kwargs) -> Issue:
    issues = issues_of(path, **kwargs)
    assert len(issues) == 1, "\n".join(map(str, issues))
    return issues[0]


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first line containing ``needle``."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def tunnel(body: str, name: str = "to-b", psk_file: str = "secrets/to-b.psk") -> str:
    """A config with one tunnel; ``body`` adds/overrides keys (indented 4 under the tunnel)."""
    base = f"""\
tunnels:
  {name}:
    remote: 198.51.100.2
    auth: {{psk_file: {psk_file}}}
"""
    extra = textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n" if body.strip() else ""
    return base + extra


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a certificate for a.example.net signed by it and the certificate's key (chmod 600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("Isthmus test CA")).issuer_name(name("Isthmus test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("a.example.net")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
    (directory / "certs").mkdir(exist_ok=True)
    (directory / "private").mkdir(exist_ok=True)
    paths = {"ca": directory / "certs" / "ca.pem", "certificate": directory / "certs" / "a.pem",
             "key": directory / "private" / "a.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["certificate"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    os.chmod(paths["key"], 0o600)
    return paths
