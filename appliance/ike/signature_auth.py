"""Digital signature authentication: RFC 7427 (auth method 14), SIGNATURE_HASH_ALGORITHMS
(RFC 7427 §4), and the older fixed methods for peers without it: RSA PKCS#1 v1.5 with SHA-1
(method 1, RFC 7296 §3.8) and ECDSA (methods 9/10/11, RFC 4754).

What is signed is RFC 7296 §2.15's SignedOctets (crypto.signed_octets), exactly as for a PSK:
RealMessage1 | NonceRData | prf(SK_pi, IDi') for the initiator, RealMessage2 | NonceIData |
prf(SK_pr, IDr') for the responder.

Method 14's Authentication Data is (RFC 7427 §3):

    | ASN.1 Length (1 octet) | AlgorithmIdentifier (DER) | Signature Value |

We sign with ECDSA (P-256/P-384/P-521, hash matching the curve when the peer allows it),
Ed25519 (RFC 8420: the "Identity" hash), RSASSA-PSS (MGF1 with the same hash, salt = hash
length) or, for peers without RFC 7427, method 1 / 9 / 10 / 11. We verify those plus
sha{256,384,512}WithRSAEncryption (strongSwan's default for RSA keys under method 14).
SHA-1 is only accepted where the method itself fixes it (method 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from appliance.ike.constants import AuthMethod, HashAlgorithm, NotifyType
from appliance.ike.message import Notify

#: What we announce in SIGNATURE_HASH_ALGORITHMS and accept in method 14 (RFC 8247 §4: no SHA-1).
OUR_HASHES: tuple[int, ...] = (HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512,
                               HashAlgorithm.IDENTITY)


class SignatureError(Exception):
    """A signature cannot be made or does not verify; `reason` says why (no secret in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- SIGNATURE_HASH_ALGORITHMS
def hash_notify() -> Notify:
    """Our SIGNATURE_HASH_ALGORITHMS notify (RFC 7427 §4), sent in IKE_SA_INIT."""
    return Notify(NotifyType.SIGNATURE_HASH_ALGORITHMS,
                  data=b"".join(int(h).to_bytes(2, "big") for h in OUR_HASHES))


def peer_hashes(notify: Notify | None) -> tuple[int, ...] | None:
    """The peer's announced hash algorithms, or None when it sent no notify (no RFC 7427)."""
    if notify is None:
        return None
    d = notify.data
    return tuple(int.from_bytes(d[i:i + 2], "big") for i in range(0, len(d) - 1, 2))


# --------------------------------------------------------------------------- minimal DER
def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        ln = bytes([n])
    else:
        b = n.to_bytes((n.bit_length() + 7) // 8, "big")
        ln = bytes([0x80 | len(b)]) + b
    return bytes([tag]) + ln + body


def _oid_der(dotted: str) -> bytes:
    parts = [int(x) for x in dotted.split(".")]
    out = bytearray([parts[0] * 40 + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _read(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """(tag, value, next position) of the DER TLV at `pos`; raises ValueError."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, ln = data[pos], data[pos + 1]
    pos += 2
    if ln & 0x80:
        n = ln & 0x7F
        if n == 0 or n > 3 or pos + n > len(data):
            raise ValueError("bad DER length")
        ln = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + ln > len(data):
        raise ValueError("DER value overruns")
    return tag, data[pos:pos + ln], pos + ln


def _items(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        tag, val, pos = _read(data, pos)
        out.append((tag, val))
    return out


_NULL = b"\x05\x00"
OID_ECDSA = {"sha256": "1.2.840.10045.4.3.2", "sha384": "1.2.840.10045.4.3.3", "sha512": "1.2.840.10045.4.3.4"}
OID_RSA_PKCS1 = {"sha256": "1.2.840.113549.1.1.11", "sha384": "1.2.840.113549.1.1.12",
                 "sha512": "1.2.840.113549.1.1.13"}
OID_RSA_PSS = "1.2.840.113549.1.1.10"
OID_MGF1 = "1.2.840.113549.1.1.8"
OID_ED25519 = "1.3.101.112"
OID_ED448 = "1.3.101.113"
OID_HASH = {"sha256": "2.16.840.1.101.3.4.2.1", "sha384": "2.16.840.1.101.3.4.2.2",
            "sha512": "2.16.840.1.101.3.4.2.3", "sha1": "1.3.14.3.2.26"}
_HASH_OF_OID = {v: k for k, v in OID_HASH.items()}
_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
_IKE_HASH = {"sha256": HashAlgorithm.SHA2_256, "sha384": HashAlgorithm.SHA2_384,
             "sha512": HashAlgorithm.SHA2_512}
_HASH_LEN = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


def _alg_id(oid: str, params: bytes | None = None) -> bytes:
    return _tlv(0x30, _oid_der(oid) + (params if params is not None else b""))


def _hash_alg_id(h: str) -> bytes:
    return _alg_id(OID_HASH[h], _NULL)


def pss_alg_id(h: str) -> bytes:
    """RSASSA-PSS AlgorithmIdentifier (RFC 4055 §3.1) with hash `h`, MGF1(`h`), salt = hash length."""
    params = (_tlv(0xA0, _hash_alg_id(h)) + _tlv(0xA1, _alg_id(OID_MGF1, _hash_alg_id(h)))
              + _tlv(0xA2, _tlv(0x02, bytes([_HASH_LEN[h]]))))
    return _alg_id(OID_RSA_PSS, _tlv(0x30, params))


@dataclass(frozen=True)
class Scheme:
    """A signature scheme: kind ecdsa | rsa_pkcs1 | rsa_pss | ed25519 | ed448, its hash
    (None for EdDSA) and PSS salt length."""

    kind: str
    hash: str | None
    salt: int = 0

    def __str__(self) -> str:
        if self.kind in ("ed25519", "ed448"):
            return self.kind.capitalize()
        return f"{self.kind.replace('_', '-').upper()}-{(self.hash or '').upper()}"


def parse_alg_id(der: bytes) -> Scheme:
    """The scheme of an RFC 7427 AlgorithmIdentifier; raises SignatureError for what we refuse."""
    try:
        tag, body, end = _read(der)
        if tag != 0x30 or end != len(der):
            raise ValueError("not a SEQUENCE")
        items = _items(body)
        if not items or items[0][0] != 0x06:
            raise ValueError("no OID")
        oid = _oid_text(items[0][1])
        params = items[1] if len(items) > 1 else None
    except ValueError as e:
        raise SignatureError(f"malformed signature AlgorithmIdentifier ({e})") from None
    for h, o in OID_ECDSA.items():
        if oid == o:
            return Scheme("ecdsa", h)
    for h, o in OID_RSA_PKCS1.items():
        if oid == o:
            return Scheme("rsa_pkcs1", h)
    if oid == OID_ED25519:
        return Scheme("ed25519", None)
    if oid == OID_ED448:
        return Scheme("ed448", None)
    if oid == OID_RSA_PSS:
        return _pss_params(params)
    raise SignatureError(f"signature algorithm {oid} is not one we accept (ECDSA, Ed25519, "
                         "RSASSA-PSS or RSA PKCS#1 v1.5 with SHA-2)")


def _pss_params(params: tuple[int, bytes] | None) -> Scheme:
    # RFC 4055 defaults are SHA-1 / MGF1-SHA-1 / salt 20: SHA-1 is refused (RFC 8247)
    h, mgf_h, salt = "sha1", "sha1", 20
    try:
        if params is None or params[0] != 0x30:
            raise ValueError("RSASSA-PSS without parameters")
        for tag, val in _items(params[1]):
            if tag == 0xA0:
                h = _hash_of(val)
            elif tag == 0xA1:
                (t, mgf), = _items(val)
                parts = _items(mgf)
                if _oid_text(parts[0][1]) != OID_MGF1 or len(parts) != 2:
                    raise ValueError("mask generation function is not MGF1")
                mgf_h = _hash_of(_tlv(0x30, parts[1][1]) if parts[1][0] == 0x30 else b"")
            elif tag == 0xA2:
                (t, v), = _items(val)
                salt = int.from_bytes(v, "big")
            elif tag == 0xA3:
                (t, v), = _items(val)
                if int.from_bytes(v, "big") != 1:
                    raise ValueError("trailer field is not 1")
    except (ValueError, IndexError) as e:
        raise SignatureError(f"malformed RSASSA-PSS parameters ({e})") from None
    if h == "sha1" or mgf_h != h:
        raise SignatureError(f"RSASSA-PSS with hash {h.upper()} and MGF1-{mgf_h.upper()}: "
                             "only SHA-256/384/512 with MGF1 of the same hash are accepted")
    if salt > 512:
        raise SignatureError("RSASSA-PSS salt length out of range")
    return Scheme("rsa_pss", h, salt)


def _hash_of(alg_der: bytes) -> str:
    tag, body, _ = _read(alg_der)
    items = _items(body)
    oid = _oid_text(items[0][1])
    h = _HASH_OF_OID.get(oid)
    if h is None:
        raise ValueError(f"hash {oid} unknown")
    return h


def _oid_text(b: bytes) -> str:
    if not b:
        raise ValueError("empty OID")
    parts = [b[0] // 40, b[0] % 40]
    v = 0
    for x in b[1:]:
        v = (v << 7) | (x & 0x7F)
        if not x & 0x80:
            parts.append(v)
            v = 0
    return ".".join(map(str, parts))


def alg_id(s: Scheme) -> bytes:
    if s.kind == "ecdsa":
        return _alg_id(OID_ECDSA[s.hash or ""])
    if s.kind == "rsa_pkcs1":
        return _alg_id(OID_RSA_PKCS1[s.hash or ""], _NULL)
    if s.kind == "rsa_pss":
        return pss_alg_id(s.hash or "")
    if s.kind == "ed25519":
        return _alg_id(OID_ED25519)
    return _alg_id(OID_ED448)


# --------------------------------------------------------------------------- choosing
_CURVE_HASH = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}
_RFC4754 = {"secp256r1": (AuthMethod.ECDSA_SHA256_P256, "sha256", 32),
            "secp384r1": (AuthMethod.ECDSA_SHA384_P384, "sha384", 48),
            "secp521r1": (AuthMethod.ECDSA_SHA512_P521, "sha512", 66)}


def key_kind(key) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA-{key.key_size}"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "Ed25519"
    if isinstance(key, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return "Ed448"
    return type(key).__name__


def choose(key, peer: tuple[int, ...] | None) -> tuple[int, Scheme]:
    """(auth method, scheme) for signing with `key` given the peer's SIGNATURE_HASH_ALGORITHMS
    (None: the peer did not send it, so no RFC 7427). Raises SignatureError."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curve = key.curve.name
        if peer is None:
            if curve not in _RFC4754:
                raise SignatureError(f"ECDSA curve {curve} has no RFC 4754 method and the peer "
                                     "does not support RFC 7427")
            method, h, _ = _RFC4754[curve]
            return method, Scheme("ecdsa", h)
        pref = [_CURVE_HASH.get(curve, "sha256"), "sha256", "sha384", "sha512"]
        return AuthMethod.DIGITAL_SIGNATURE, Scheme("ecdsa", _pick(pref, peer, "ECDSA"))
    if isinstance(key, rsa.RSAPrivateKey):
        if peer is None:
            return AuthMethod.RSA_DIGITAL_SIGNATURE, Scheme("rsa_pkcs1", "sha1")
        h = _pick(["sha256", "sha384", "sha512"], peer, "RSASSA-PSS")
        return AuthMethod.DIGITAL_SIGNATURE, Scheme("rsa_pss", h, _HASH_LEN[h])
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        name = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "ed448"
        if peer is None or HashAlgorithm.IDENTITY not in peer:
            raise SignatureError(f"{name.capitalize()} needs RFC 7427 with the Identity hash "
                                 "(RFC 8420), which the peer did not announce")
        return AuthMethod.DIGITAL_SIGNATURE, Scheme(name, None)
    raise SignatureError(f"cannot sign with a {key_kind(key)} key")


def _pick(pref: list[str], peer: tuple[int, ...], what: str) -> str:
    for h in pref:
        if _IKE_HASH[h] in peer:
            return h
    raise SignatureError(f"the peer's SIGNATURE_HASH_ALGORITHMS ({_hash_names(peer)}) offer no "
                         f"hash we use for {what} (SHA2-256/384/512)")


def _hash_names(hs: tuple[int, ...]) -> str:
    out = []
    for h in hs:
        try:
            out.append(HashAlgorithm(h).name)
        except ValueError:
            out.append(str(h))
    return ", ".join(out) or "none"


# --------------------------------------------------------------------------- sign / verify
def sign(key, peer: tuple[int, ...] | None, octets: bytes) -> tuple[int, bytes]:
    """(auth method, Authentication Data) signing `octets` (RFC 7296 §2.15 SignedOctets)."""
    method, s = choose(key, peer)
    sig = _sign(key, s, octets)
    if method == AuthMethod.DIGITAL_SIGNATURE:
        a = alg_id(s)
        return method, bytes([len(a)]) + a + sig
    if method in (AuthMethod.ECDSA_SHA256_P256, AuthMethod.ECDSA_SHA384_P384, AuthMethod.ECDSA_SHA512_P521):
        r, s_ = decode_dss_signature(sig)
        n = _RFC4754[key.curve.name][2]
        return method, r.to_bytes(n, "big") + s_.to_bytes(n, "big")
    return method, sig


def _sign(key, s: Scheme, data: bytes) -> bytes:
    if s.kind == "ecdsa":
        return key.sign(data, ec.ECDSA(_HASHES[s.hash]()))
    if s.kind == "rsa_pkcs1":
        return key.sign(data, padding.PKCS1v15(), _HASHES[s.hash]())
    if s.kind == "rsa_pss":
        h = _HASHES[s.hash]()
        return key.sign(data, padding.PSS(mgf=padding.MGF1(h), salt_length=s.salt), h)
    return key.sign(data)


def verify(public_key, method: int, auth_data: bytes, octets: bytes) -> Scheme:
    """Check the peer's AUTH (method `method`, Authentication Data `auth_data`) over `octets`
    with `public_key` (from its certificate). Returns the scheme; raises SignatureError."""
    if method == AuthMethod.DIGITAL_SIGNATURE:
        if not auth_data:
            raise SignatureError("empty RFC 7427 Authentication Data")
        n = auth_data[0]
        if 1 + n > len(auth_data):
            raise SignatureError("RFC 7427 AlgorithmIdentifier length overruns the AUTH payload")
        s = parse_alg_id(auth_data[1:1 + n])
        sig = auth_data[1 + n:]
    elif method == AuthMethod.RSA_DIGITAL_SIGNATURE:
        s, sig = Scheme("rsa_pkcs1", "sha1"), auth_data
    elif method in (AuthMethod.ECDSA_SHA256_P256, AuthMethod.ECDSA_SHA384_P384, AuthMethod.ECDSA_SHA512_P521):
        curve, h, n = next((c, h, n) for c, (m, h, n) in _RFC4754.items() if m == method)
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != curve:
            raise SignatureError(f"auth method {AuthMethod(method).name} needs an ECDSA {curve} "
                                 f"key; the peer's certificate has a {key_kind(public_key)} key")
        if len(auth_data) != 2 * n:
            raise SignatureError(f"{AuthMethod(method).name} signature of {len(auth_data)} octets, "
                                 f"expected {2 * n}")
        s = Scheme("ecdsa", h)
        sig = encode_dss_signature(int.from_bytes(auth_data[:n], "big"), int.from_bytes(auth_data[n:], "big"))
    else:
        raise SignatureError(f"auth method {_method_name(method)} is not a signature method we accept")
    _check_key(public_key, s)
    try:
        if s.kind == "ecdsa":
            public_key.verify(sig, octets, ec.ECDSA(_HASHES[s.hash]()))
        elif s.kind == "rsa_pkcs1":
            public_key.verify(sig, octets, padding.PKCS1v15(), _HASHES[s.hash]())
        elif s.kind == "rsa_pss":
            h = _HASHES[s.hash]()
            public_key.verify(sig, octets, padding.PSS(mgf=padding.MGF1(h), salt_length=s.salt), h)
        else:
            public_key.verify(sig, octets)
    except InvalidSignature:
        raise SignatureError(f"{s} signature in the AUTH payload does not verify with the key of "
                             "the peer's certificate") from None
    except ValueError as e:
        raise SignatureError(f"{s} signature is malformed ({e})") from None
    return s


def _check_key(key, s: Scheme) -> None:
    ok = {"ecdsa": ec.EllipticCurvePublicKey, "rsa_pkcs1": rsa.RSAPublicKey, "rsa_pss": rsa.RSAPublicKey,
          "ed25519": ed25519.Ed25519PublicKey, "ed448": ed448.Ed448PublicKey}[s.kind]
    if not isinstance(key, ok):
        raise SignatureError(f"the peer signed with {s} but its certificate holds a {key_kind(key)} key")


def _method_name(m: int) -> str:
    try:
        return AuthMethod(m).name
    except ValueError:
        return str(m)
