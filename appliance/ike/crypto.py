"""IKEv2 cryptography: PRF, prf+, key derivation, SK payload protection, key exchange.

Everything here is pure computation (sans-IO). Randomness comes from the caller as a
``random(n) -> bytes`` callable, IVs are passed in, so tests are deterministic.

RFC map:
  prf / prf+ ........................ RFC 7296 §2.13, RFC 4868 (HMAC-SHA2 PRFs)
  SKEYSEED, SK_* ..................... RFC 7296 §2.14; rekeyed IKE SA §2.18
  Child SA KEYMAT .................... RFC 7296 §2.17; AES-GCM salt RFC 4106 §8.1 / RFC 5282 §7;
                                       ChaCha20-Poly1305 salt RFC 7634 §2/§4
  SK payload ......................... RFC 7296 §3.14; AEAD in IKE RFC 5282 §3/§5; RFC 7634 §3-4
  PSK AUTH ........................... RFC 7296 §2.15
  key exchange ....................... RFC 3526 (MODP), RFC 5903 §7 (ECP encoding),
                                       RFC 8031 (Curve25519/448), RFC 6989 (public value checks);
                                       ML-KEM-768/1024 (FIPS 203, draft-ietf-ipsecme-ikev2-mlkem)
  additional key exchanges ........... RFC 9370 §2.2.2 (SKEYSEED(n) from SK_d(n-1))
  NAT detection hash ................. RFC 7296 §2.23

Secrets never appear in ``repr``/``str`` of objects here, nor in exception messages.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x448, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from appliance.ike.constants import DhId, EncrId, IntegId, PrfId, TransformType

if TYPE_CHECKING:
    from appliance.ike.proposals import Proposal

RandomSource = Callable[[int], bytes]


# --------------------------------------------------------------------------- errors
class CryptoError(Exception):
    """Base of all errors raised here. Messages name algorithms, never key material."""


class UnsupportedAlgorithm(CryptoError):
    """The algorithm (or key length) is not implemented or refused by policy."""


class IntegrityError(CryptoError):
    """An SK payload failed its integrity check (bad ICV / AEAD tag) or has bad padding."""


class InvalidKeyExchange(CryptoError):
    """A peer's KE public value failed the RFC 6989 / RFC 8031 checks or had the wrong size."""


def _name(enum_value: int, enum: type) -> str:
    try:
        return enum(enum_value).name
    except ValueError:
        return f"{enum.__name__}({int(enum_value)})"


# --------------------------------------------------------------------------- PRF
_PRF_HASH: dict[PrfId, str] = {
    PrfId.HMAC_SHA2_256: "sha256",
    PrfId.HMAC_SHA2_384: "sha384",
    PrfId.HMAC_SHA2_512: "sha512",
}
_HASH_LEN = {"sha256": 32, "sha384": 48, "sha512": 64}


def _prf_hash(prf_id: int) -> str:
    try:
        return _PRF_HASH[prf_id]  # type: ignore[index]
    except KeyError:
        raise UnsupportedAlgorithm(f"PRF {_name(prf_id, PrfId)} is not supported; "
                                   "supported: " + ", ".join(p.name for p in _PRF_HASH)) from None


def prf(prf_id: int, key: bytes, data: bytes) -> bytes:
    """prf(K, S) for an HMAC-SHA2 PRF (RFC 4868 §2.1.2: the full, untruncated HMAC output)."""
    return hmac.digest(key, data, _prf_hash(prf_id))


def prf_output_len(prf_id: int) -> int:
    """Output length of the PRF in octets."""
    return _HASH_LEN[_prf_hash(prf_id)]


def prf_key_len(prf_id: int) -> int:
    """Preferred key length of the PRF (RFC 4868 §2.1.2: equal to the output length); this is
    the length of SK_d, SK_pi and SK_pr (RFC 7296 §2.14)."""
    return prf_output_len(prf_id)


def min_nonce_len(prf_id: int) -> int:
    """RFC 7296 §2.10: a nonce is at least 128 bits and at least half the key size of the
    negotiated PRF (prfsha512: 32 octets)."""
    try:
        return max(16, prf_key_len(prf_id) // 2)
    except UnsupportedAlgorithm:
        return 16


def prf_plus(prf_id: int, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+ (RFC 7296 §2.13): T1 | T2 | ... with T1 = prf(K, S | 0x01),
    Tn = prf(K, Tn-1 | S | n), truncated to ``length``. At most 255 blocks."""
    h = _prf_hash(prf_id)
    out_len = _HASH_LEN[h]
    if length < 0 or length > 255 * out_len:
        raise CryptoError(f"prf+ with {_name(prf_id, PrfId)} cannot produce {length} octets "
                          f"(at most {255 * out_len})")
    out = bytearray()
    t = b""
    n = 1
    while len(out) < length:
        t = hmac.digest(key, t + seed + bytes((n,)), h)
        out += t
        n += 1
    return bytes(out[:length])


# --------------------------------------------------------------------------- algorithm sizes
_AEAD_SALT = 4  # RFC 5282 §7 (GCM in IKE), RFC 4106 §8.1 (GCM in ESP), RFC 7634 §2/§4
_INTEG: dict[IntegId, tuple[str, int, int]] = {
    # id: (hash, key length, ICV length)  -- RFC 4868 §2.1.1 / §2.3
    IntegId.HMAC_SHA2_256_128: ("sha256", 32, 16),
    IntegId.HMAC_SHA2_384_192: ("sha384", 48, 24),
    IntegId.HMAC_SHA2_512_256: ("sha512", 64, 32),
}
_AES_BITS = frozenset({128, 192, 256})


def is_aead(encr_id: int) -> bool:
    return encr_id in (EncrId.AES_GCM_16, EncrId.CHACHA20_POLY1305)


def encr_key_len(encr_id: int, key_bits: int | None) -> int:
    """Octets of keying material for an encryption transform: SK_ei/SK_er in IKE and the
    ESP encryption key in KEYMAT. AEAD keys include their 4-octet salt (AES-GCM: RFC 5282 §7,
    RFC 4106 §8.1; ChaCha20-Poly1305: 32 + 4, RFC 7634 §2)."""
    if encr_id in (EncrId.AES_CBC, EncrId.AES_GCM_16):
        if key_bits not in _AES_BITS:
            raise UnsupportedAlgorithm(f"{_name(encr_id, EncrId)} key length {key_bits} bits is not "
                                       "supported; use 128, 192 or 256")
        return key_bits // 8 + (_AEAD_SALT if encr_id == EncrId.AES_GCM_16 else 0)
    if encr_id == EncrId.CHACHA20_POLY1305:
        if key_bits not in (None, 256):
            raise UnsupportedAlgorithm("CHACHA20_POLY1305 takes no key length attribute "
                                       "(RFC 7634 §2); its key is 256 bits")
        return 32 + _AEAD_SALT
    raise UnsupportedAlgorithm(f"encryption {_name(encr_id, EncrId)} is not supported; supported: "
                               "AES_CBC, AES_GCM_16, CHACHA20_POLY1305")


def integ_key_len(integ_id: int | None) -> int:
    """Octets of SK_ai/SK_ar (0 for none / AEAD). RFC 4868 §2.1.1: key = hash output length."""
    if integ_id in (None, IntegId.NONE):
        return 0
    return _integ(integ_id)[1]


def integ_icv_len(integ_id: int | None) -> int:
    if integ_id in (None, IntegId.NONE):
        return 0
    return _integ(integ_id)[2]


def _integ(integ_id: int) -> tuple[str, int, int]:
    try:
        return _INTEG[integ_id]  # type: ignore[index]
    except KeyError:
        raise UnsupportedAlgorithm(f"integrity {_name(integ_id, IntegId)} is not supported; "
                                   "supported: " + ", ".join(i.name for i in _INTEG)) from None


# --------------------------------------------------------------------------- key holders
def _hidden_repr(obj: object, fields: tuple[str, ...]) -> str:
    parts = ", ".join(f"{f}=<{len(getattr(obj, f))} bytes>" for f in fields)
    return f"{type(obj).__name__}({parts})"


@dataclass(frozen=True, repr=False)
class IkeKeys:
    """The seven IKE SA keys of RFC 7296 §2.14. repr shows lengths only."""

    SK_d: bytes
    SK_ai: bytes
    SK_ar: bytes
    SK_ei: bytes
    SK_er: bytes
    SK_pi: bytes
    SK_pr: bytes

    _FIELDS = ("SK_d", "SK_ai", "SK_ar", "SK_ei", "SK_er", "SK_pi", "SK_pr")

    def __repr__(self) -> str:
        return _hidden_repr(self, self._FIELDS)

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class ChildKeys:
    """Child SA keys from KEYMAT (RFC 7296 §2.17): ``ei``/``ai`` protect initiator->responder
    traffic, ``er``/``ar`` responder->initiator. AEAD encryption keys include the salt;
    ``ai``/``ar`` are empty for AEAD. repr shows lengths only."""

    ei: bytes
    ai: bytes
    er: bytes
    ar: bytes

    def __repr__(self) -> str:
        return _hidden_repr(self, ("ei", "ai", "er", "ar"))

    __str__ = __repr__


@dataclass(frozen=True)
class IkeSuite:
    """The negotiated IKE SA algorithms (one of each transform type)."""

    encr: EncrId
    encr_key_bits: int | None
    prf: PrfId
    integ: IntegId | None
    dh: DhId

    @classmethod
    def from_proposal(cls, p: "Proposal") -> "IkeSuite":
        """From a *selected* IKE proposal (exactly one transform of each type)."""
        e = p.only(TransformType.ENCR)
        f = p.only(TransformType.PRF)
        i = p.only(TransformType.INTEG)
        d = p.only(TransformType.DH)
        if e is None or f is None or d is None:
            raise CryptoError("an IKE suite needs ENCR, PRF and a key exchange method")
        integ = None if i is None or i.id == IntegId.NONE else IntegId(i.id)
        return cls(EncrId(e.id), e.key_length, PrfId(f.id), integ, DhId(d.id))

    @property
    def sk_e_len(self) -> int:
        return encr_key_len(self.encr, self.encr_key_bits)

    @property
    def sk_a_len(self) -> int:
        return integ_key_len(self.integ)


def _as_suite(suite: "IkeSuite | Proposal") -> IkeSuite:
    return suite if isinstance(suite, IkeSuite) else suite.derived("ike_suite", IkeSuite.from_proposal)


def _split_ike_keys(suite: IkeSuite, skeyseed: bytes, seed: bytes) -> IkeKeys:
    lp = prf_key_len(suite.prf)
    la = suite.sk_a_len
    le = suite.sk_e_len
    if is_aead(suite.encr) and la:
        raise UnsupportedAlgorithm("an AEAD IKE suite has no integrity transform")
    if not is_aead(suite.encr) and not la:
        raise UnsupportedAlgorithm(f"{suite.encr.name} needs an integrity transform")
    km = prf_plus(suite.prf, skeyseed, seed, 3 * lp + 2 * la + 2 * le)
    o = 0
    out = []
    for n in (lp, la, la, le, le, lp, lp):
        out.append(km[o:o + n])
        o += n
    return IkeKeys(*out)


def derive_ike_keys(suite: "IkeSuite | Proposal", g_ir: bytes, Ni: bytes, Nr: bytes,
                    SPIi: bytes, SPIr: bytes) -> tuple[bytes, IkeKeys]:
    """RFC 7296 §2.14: SKEYSEED = prf(Ni | Nr, g^ir);
    {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr).
    Ni and Nr are the nonce payload bodies, SPIi/SPIr the 8-octet IKE SPIs. The HMAC PRFs take
    variable-length keys, so Ni | Nr is used whole as the key. Returns (SKEYSEED, keys)."""
    s = _as_suite(suite)
    _check_spis(SPIi, SPIr)
    skeyseed = prf(s.prf, Ni + Nr, g_ir)
    return skeyseed, _split_ike_keys(s, skeyseed, Ni + Nr + SPIi + SPIr)


def derive_rekeyed_ike_keys(suite: "IkeSuite | Proposal", old_SK_d: bytes, g_ir_new: bytes,
                            Ni: bytes, Nr: bytes, SPIi: bytes, SPIr: bytes, *,
                            old_prf: int | None = None) -> tuple[bytes, IkeKeys]:
    """RFC 7296 §2.18: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr), then the keys as in
    §2.14 with the new SA's PRF, new nonces and the new SPIs. The SKEYSEED prf is the *old*
    IKE SA's PRF (the exchange belongs to the old SA): pass ``old_prf`` when it differs from
    the new suite's PRF."""
    s = _as_suite(suite)
    _check_spis(SPIi, SPIr)
    skeyseed = prf(s.prf if old_prf is None else old_prf, old_SK_d, g_ir_new + Ni + Nr)
    return skeyseed, _split_ike_keys(s, skeyseed, Ni + Nr + SPIi + SPIr)


def _check_spis(SPIi: bytes, SPIr: bytes) -> None:
    if len(SPIi) != 8 or len(SPIr) != 8:
        raise CryptoError("IKE SPIs must be 8 octets each")


def child_keymat(prf_id: int, SK_d: bytes, Ni: bytes, Nr: bytes, g_ir_new: bytes | None,
                 encr_key_len: int, integ_key_len: int) -> ChildKeys:
    """RFC 7296 §2.17: KEYMAT = prf+(SK_d, Ni | Nr), or prf+(SK_d, g^ir (new) | Ni | Nr) with
    PFS; taken as SK_ei | SK_ai | SK_er | SK_ar. Lengths in octets (AEAD salt included in
    ``encr_key_len``; see :func:`encr_key_len`). For the first Child SA (IKE_AUTH) the nonces
    are those of IKE_SA_INIT; for CREATE_CHILD_SA, the nonces of that exchange."""
    km = prf_plus(prf_id, SK_d, (g_ir_new or b"") + Ni + Nr, 2 * (encr_key_len + integ_key_len))
    e, a = encr_key_len, integ_key_len
    return ChildKeys(km[:e], km[e:e + a], km[e + a:2 * e + a], km[2 * e + a:])


def child_keymat_for(prf_id: int, SK_d: bytes, Ni: bytes, Nr: bytes, g_ir_new: bytes | None,
                     esp: "Proposal") -> ChildKeys:
    """:func:`child_keymat` with the key lengths taken from a selected ESP proposal."""
    e = esp.only(TransformType.ENCR)
    if e is None:
        raise CryptoError("an ESP proposal needs an encryption transform")
    i = esp.only(TransformType.INTEG)
    return child_keymat(prf_id, SK_d, Ni, Nr, g_ir_new, encr_key_len(e.id, e.key_length),
                        integ_key_len(None if i is None else i.id))


# --------------------------------------------------------------------------- SK payload
def pad_plaintext(inner: bytes, block_size: int) -> bytes:
    """RFC 7296 §3.14: append Padding (zeros here; any value is allowed) and the Pad Length
    octet so the total is a multiple of ``block_size``."""
    pad = (-(len(inner) + 1)) % block_size
    return inner + bytes(pad) + bytes((pad,))


def unpad_plaintext(plaintext_with_pad: bytes) -> bytes:
    """Strip Padding and Pad Length (§3.14); the Padding's content is not checked (any value
    is allowed). Raises IntegrityError when the Pad Length does not fit."""
    if not plaintext_with_pad:
        raise IntegrityError("SK payload plaintext is empty (no Pad Length octet)")
    pad = plaintext_with_pad[-1]
    if pad + 1 > len(plaintext_with_pad):
        raise IntegrityError(f"SK payload Pad Length {pad} exceeds the decrypted data "
                             f"({len(plaintext_with_pad)} octets)")
    return plaintext_with_pad[:-1 - pad]


class SkCipher:
    """Protection of the Encrypted payload (SK, RFC 7296 §3.14) for one direction.

    Build one per direction: ``SkCipher(encr, key_bits, integ, SK_ei, SK_ai)`` for what the
    initiator sends, with SK_er/SK_ar for what the responder sends.

    ``aad`` is everything of the message before the IV: the IKE header and every payload
    before the SK payload including the SK payload's generic header (RFC 5282 §5.1 for AEAD;
    for CBC + HMAC the checksum covers the same octets plus IV and ciphertext, §3.14). The
    header Length fields must already be final, so use :meth:`sk_payload_len` first.

    * AES-GCM-16 (RFC 5282): key = SK_e[:-4], salt = SK_e[-4:], nonce = salt | 8-octet IV,
      16-octet ICV, block size 1 (only the Pad Length octet).
    * ChaCha20-Poly1305 (RFC 7634 §4): the same shape with a 32-octet key.
    * AES-CBC + HMAC-SHA2 (RFC 3602, RFC 4868): 16-octet IV, block size 16, ICV = truncated
      HMAC(SK_a, aad | IV | ciphertext).
    """

    __slots__ = ("encr", "key_bits", "integ", "block_size", "iv_size", "icv_size",
                 "_aead", "_cbc_key", "_salt", "_mac_key", "_mac_hash")

    def __init__(self, encr_id: int, key_len_bits: int | None, integ_id: int | None,
                 SK_e: bytes, SK_a: bytes = b"") -> None:
        self.encr = EncrId._value2member_map_.get(encr_id, encr_id)
        self.key_bits = key_len_bits
        need = encr_key_len(encr_id, key_len_bits)
        if len(SK_e) != need:
            raise CryptoError(f"{_name(encr_id, EncrId)} needs a {need}-octet SK_e, "
                              f"got {len(SK_e)} octets")
        self._aead: AESGCM | ChaCha20Poly1305 | None = None
        self._cbc_key = b""
        self._mac_key = b""
        self._mac_hash = ""
        if is_aead(encr_id):
            if integ_id not in (None, IntegId.NONE) or SK_a:
                raise UnsupportedAlgorithm(f"{_name(encr_id, EncrId)} is AEAD and takes no "
                                           "integrity transform")
            self.integ = None
            key, self._salt = SK_e[:-_AEAD_SALT], SK_e[-_AEAD_SALT:]
            self._aead = AESGCM(key) if encr_id == EncrId.AES_GCM_16 else ChaCha20Poly1305(key)
            self.block_size, self.iv_size, self.icv_size = 1, 8, 16
        else:
            if integ_id in (None, IntegId.NONE):
                raise UnsupportedAlgorithm(f"{_name(encr_id, EncrId)} needs an integrity "
                                           "transform")
            self.integ = IntegId._value2member_map_.get(integ_id, integ_id)
            h, klen, icv = _integ(integ_id)
            if len(SK_a) != klen:
                raise CryptoError(f"{_name(integ_id, IntegId)} needs a {klen}-octet SK_a, "
                                  f"got {len(SK_a)} octets")
            self._cbc_key, self._salt = SK_e, b""
            self._mac_key, self._mac_hash = SK_a, h
            self.block_size, self.iv_size, self.icv_size = 16, 16, icv

    def __repr__(self) -> str:
        integ = f", {self.integ.name}" if isinstance(self.integ, IntegId) else ""
        kb = f"_{self.key_bits}" if self.key_bits else ""
        return f"SkCipher({_name(self.encr, EncrId)}{kb}{integ})"

    # sizes -------------------------------------------------------------------------
    def pad(self, inner: bytes) -> bytes:
        """Inner payloads + Padding + Pad Length for this cipher's block size (§3.14)."""
        return pad_plaintext(inner, self.block_size)

    def padded_len(self, inner_len: int) -> int:
        return inner_len + 1 + (-(inner_len + 1)) % self.block_size

    def sk_payload_len(self, inner_len: int) -> int:
        """Payload Length of the SK payload (generic header included) for ``inner_len``
        octets of inner payloads."""
        return 4 + self.iv_size + self.padded_len(inner_len) + self.icv_size

    # operations --------------------------------------------------------------------
    def encrypt(self, plaintext_with_pad: bytes, aad: bytes, iv: bytes) -> bytes:
        """Returns IV | ciphertext | ICV, the SK payload body."""
        if len(iv) != self.iv_size:
            raise CryptoError(f"{_name(self.encr, EncrId)} needs a {self.iv_size}-octet IV")
        if len(plaintext_with_pad) % self.block_size:
            raise CryptoError(f"SK plaintext of {len(plaintext_with_pad)} octets is not a multiple "
                              f"of the {self.block_size}-octet block size; pad it first")
        if self._aead is not None:
            return iv + self._aead.encrypt(self._salt + iv, plaintext_with_pad, aad)
        enc = Cipher(algorithms.AES(self._cbc_key), modes.CBC(iv)).encryptor()
        ct = enc.update(plaintext_with_pad) + enc.finalize()
        return iv + ct + self._mac(aad + iv + ct)

    def decrypt(self, iv_ct_icv: bytes, aad: bytes) -> bytes:
        """Checks and decrypts an SK payload body; returns plaintext with Padding and Pad
        Length still attached (use :func:`unpad_plaintext`). Raises IntegrityError."""
        n = len(iv_ct_icv) - self.iv_size - self.icv_size
        if n < 0 or n % self.block_size or (self._aead is None and n == 0):
            raise IntegrityError(f"SK payload body of {len(iv_ct_icv)} octets is malformed for "
                                 f"{_name(self.encr, EncrId)}")
        iv = iv_ct_icv[:self.iv_size]
        if self._aead is not None:
            try:
                return self._aead.decrypt(self._salt + iv, iv_ct_icv[self.iv_size:], aad)
            except InvalidTag:
                raise IntegrityError(f"SK payload failed {_name(self.encr, EncrId)} "
                                     "authentication") from None
        ct = iv_ct_icv[self.iv_size:self.iv_size + n]
        icv = iv_ct_icv[self.iv_size + n:]
        if not hmac.compare_digest(icv, self._mac(aad + iv + ct)):
            raise IntegrityError(f"SK payload failed {_name(self.integ, IntegId)} integrity check")
        dec = Cipher(algorithms.AES(self._cbc_key), modes.CBC(iv)).decryptor()
        return dec.update(ct) + dec.finalize()

    def _mac(self, data: bytes) -> bytes:
        return hmac.digest(self._mac_key, data, self._mac_hash)[:self.icv_size]


def sk_ciphers(suite: "IkeSuite | Proposal", keys: IkeKeys) -> tuple[SkCipher, SkCipher]:
    """(initiator->responder, responder->initiator) SK payload ciphers of an IKE SA."""
    s = _as_suite(suite)
    return (SkCipher(s.encr, s.encr_key_bits, s.integ, keys.SK_ei, keys.SK_ai),
            SkCipher(s.encr, s.encr_key_bits, s.integ, keys.SK_er, keys.SK_ar))


def integ_checksum(integ_id: int, key: bytes, data: bytes) -> bytes:
    """Truncated HMAC-SHA2 integrity checksum (RFC 4868 §2.3)."""
    h, klen, icv = _integ(integ_id)
    if len(key) != klen:
        raise CryptoError(f"{_name(integ_id, IntegId)} needs a {klen}-octet key")
    return hmac.digest(key, data, h)[:icv]


# --------------------------------------------------------------------------- AUTH (§2.15)
KEY_PAD = b"Key Pad for IKEv2"


def signed_octets(prf_id: int, message: bytes, peer_nonce: bytes, SK_p: bytes,
                  id_body: bytes) -> bytes:
    """RFC 7296 §2.15: InitiatorSignedOctets = RealMessage1 | NonceRData | MACedIDForI with
    MACedIDForI = prf(SK_pi, RestOfInitIDPayload) (and symmetrically for the responder:
    RealMessage2 | NonceIData | prf(SK_pr, RestOfRespIDPayload)). ``id_body`` is the ID
    payload without its generic header (ID Type, 3 reserved octets, data)."""
    return message + peer_nonce + prf(prf_id, SK_p, id_body)


def psk_auth(prf_id: int, psk: bytes, octets: bytes) -> bytes:
    """RFC 7296 §2.15: AUTH = prf( prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    return prf(prf_id, prf(prf_id, psk, KEY_PAD), octets)


def psk_auth_matches(prf_id: int, psk: bytes, octets: bytes, received: bytes) -> bool:
    """Constant-time check of a received PSK AUTH value."""
    return hmac.compare_digest(psk_auth(prf_id, psk, octets), received)


# --------------------------------------------------------------------------- NAT-D (§2.23)
def nat_detection_hash(SPIi: bytes, SPIr: bytes, ip: bytes, port: int) -> bytes:
    """RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP | Port) for NAT_DETECTION_*_IP (SHA-1 is what
    the RFC mandates here; it is not used for security). ``ip`` is the packed address (4 or
    16 octets). In IKE_SA_INIT requests SPIr is eight zero octets."""
    return hashlib.sha1(SPIi + SPIr + ip + port.to_bytes(2, "big")).digest()


# --------------------------------------------------------------------------- key exchange
def _rfc3526_prime(bits: int, k: int) -> int:
    """p = 2^n - 2^(n-64) - 1 + 2^64 * ( [2^(n-130) pi] + k ) (RFC 3526 §2-§7, RFC 2409 §6)."""
    return (1 << bits) - (1 << (bits - 64)) - 1 + (1 << 64) * (_floor_pi_times_2_pow(bits - 130) + k)


def _floor_pi_times_2_pow(n: int) -> int:
    """floor(pi * 2^n) with Machin's formula in integer arithmetic (exact for n < 2^20 with
    the guard bits used)."""
    guard = 64
    one = 1 << (n + guard)

    def arctan_inv(x: int) -> int:
        term = one // x
        total = term
        x2 = x * x
        k = 1
        sign = -1
        while term:
            term //= x2
            total += sign * (term // (2 * k + 1))
            sign = -sign
            k += 1
        return total

    return (4 * (4 * arctan_inv(5) - arctan_inv(239))) >> guard


# group: (bits, k of the RFC 3526 formula, private exponent bits: upper end of RFC 3526's
# "exponent size" estimates, rounded up)
_MODP: dict[DhId, tuple[int, int, int]] = {
    DhId.MODP_2048: (2048, 124476, 320),
    DhId.MODP_3072: (3072, 1690314, 400),
    DhId.MODP_4096: (4096, 240904, 480),
    DhId.MODP_6144: (6144, 929484, 540),
    DhId.MODP_8192: (8192, 4743158, 620),
}


@cache
def modp_prime(dh_id: DhId) -> int:
    """The RFC 3526 safe prime of a MODP group (generator 2)."""
    bits, k, _ = _MODP[dh_id]
    return _rfc3526_prime(bits, k)


_ECP: dict[DhId, tuple[type[ec.EllipticCurve], int]] = {
    DhId.ECP_256: (ec.SECP256R1, 32),
    DhId.ECP_384: (ec.SECP384R1, 48),
    DhId.ECP_521: (ec.SECP521R1, 66),
}
# Group orders (FIPS 186-4 D.1.2 / SEC 2), for drawing private scalars uniformly in [1, n-1].
_ECP_ORDER = {
    DhId.ECP_256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    DhId.ECP_384: int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
                      "581A0DB248B0A77AECEC196ACCC52973", 16),
    DhId.ECP_521: int("01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
                      "FFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E9138"
                      "6409", 16),
}
_ECX_LEN = {DhId.CURVE25519: 32, DhId.CURVE448: 56}

SUPPORTED_KE = frozenset(_MODP) | frozenset(_ECP) | frozenset(_ECX_LEN)


def ke_public_len(dh_id: int) -> int:
    """Length of the KE payload's Key Exchange Data for a group (RFC 7296 §3.4, RFC 5903 §7,
    RFC 8031 §3)."""
    if dh_id in _MODP:
        return _MODP[dh_id][0] // 8  # type: ignore[index]
    if dh_id in _ECP:
        return 2 * _ECP[dh_id][1]  # type: ignore[index]
    if dh_id in _ECX_LEN:
        return _ECX_LEN[dh_id]  # type: ignore[index]
    raise UnsupportedAlgorithm(f"key exchange {_name(dh_id, DhId)} is not supported; supported: "
                               + ", ".join(d.name for d in sorted(SUPPORTED_KE)))


class KeyExchange:
    """One side of an ephemeral key exchange.

    ``public_bytes`` is the KE payload data in IKEv2 encoding: MODP y big-endian padded to the
    modulus length (§3.4), ECP x | y (RFC 5903 §7), X25519/X448 raw (RFC 8031 §3).
    ``shared_secret(peer)`` returns g^ir in IKEv2 form: MODP padded, ECP the x coordinate only
    (RFC 5903 §7), X25519/X448 raw (RFC 8031 §2.2). The private value never leaves the object
    and is not shown by repr.
    """

    __slots__ = ("dh_id", "public_bytes", "_priv")

    def __init__(self, dh_id: DhId, public_bytes: bytes, priv: object) -> None:
        self.dh_id = dh_id
        self.public_bytes = public_bytes
        self._priv = priv

    def __repr__(self) -> str:
        return f"KeyExchange({self.dh_id.name}, public={len(self.public_bytes)} bytes)"

    @classmethod
    def generate(cls, dh_id: int, random: RandomSource) -> "KeyExchange":
        """New ephemeral key pair with the private value drawn from ``random``."""
        ke_public_len(dh_id)  # raises UnsupportedAlgorithm
        gid = DhId(dh_id)
        if gid == DhId.CURVE25519:
            k = x25519.X25519PrivateKey.from_private_bytes(_take(random, 32))
            return cls(gid, k.public_key().public_bytes_raw(), k)
        if gid == DhId.CURVE448:
            k4 = x448.X448PrivateKey.from_private_bytes(_take(random, 56))
            return cls(gid, k4.public_key().public_bytes_raw(), k4)
        if gid in _ECP:
            curve, clen = _ECP[gid]
            n = _ECP_ORDER[gid]
            # 64 extra random bits make the bias of the reduction negligible (FIPS 186-4 B.4.1)
            d = int.from_bytes(_take(random, (n.bit_length() + 64 + 7) // 8), "big") % (n - 1) + 1
            kp = ec.derive_private_key(d, curve())
            nums = kp.public_key().public_numbers()
            return cls(gid, nums.x.to_bytes(clen, "big") + nums.y.to_bytes(clen, "big"), kp)
        # MODP
        p = modp_prime(gid)
        bits, _, xbits = _MODP[gid]
        x = int.from_bytes(_take(random, (xbits + 7) // 8), "big") >> ((-xbits) % 8)
        x |= 1 << (xbits - 1)  # full-size exponent, never 0 or 1
        return cls(gid, pow(2, x, p).to_bytes(bits // 8, "big"), x)

    def shared_secret(self, peer_public: bytes) -> bytes:
        """g^ir from the peer's KE data, after the RFC 6989 / RFC 8031 checks. Raises
        InvalidKeyExchange."""
        gid = self.dh_id
        want = ke_public_len(gid)
        if len(peer_public) != want:
            raise InvalidKeyExchange(f"{gid.name} KE data must be {want} octets, got "
                                     f"{len(peer_public)}")
        if gid in _ECX_LEN:
            try:
                if gid == DhId.CURVE25519:
                    z = self._priv.exchange(  # type: ignore[attr-defined]
                        x25519.X25519PublicKey.from_public_bytes(peer_public))
                else:
                    z = self._priv.exchange(  # type: ignore[attr-defined]
                        x448.X448PublicKey.from_public_bytes(peer_public))
            except ValueError:
                z = b""
            if not z or not any(z):
                # RFC 8031 §2.2 / RFC 7748 §6: an all-zero result means a low-order point
                raise InvalidKeyExchange(f"{gid.name} public value is a low-order point "
                                         "(all-zero shared secret)")
            return z
        if gid in _ECP:
            curve, clen = _ECP[gid]
            try:
                # from_encoded_point rejects coordinates >= p and points not on the curve
                # (RFC 6989 §2.3); x | y cannot encode the point at infinity.
                peer = ec.EllipticCurvePublicKey.from_encoded_point(curve(), b"\x04" + peer_public)
                return self._priv.exchange(ec.ECDH(), peer)  # type: ignore[attr-defined]
            except ValueError:
                raise InvalidKeyExchange(f"{gid.name} public value is not a point on the "
                                         "curve (RFC 6989 §2.3)") from None
        p = modp_prime(gid)
        y = int.from_bytes(peer_public, "big")
        # RFC 6989 §2.2: 1 < y < p-1. These groups use safe primes p = 2q + 1, for which the
        # range check is all that is needed (the only small subgroups are {1} and {1, p-1}).
        if not 1 < y < p - 1:
            raise InvalidKeyExchange(f"{gid.name} public value out of range: must satisfy "
                                     "1 < y < p-1 (RFC 6989 §2.2)")
        return pow(y, self._priv, p).to_bytes(want, "big")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- ML-KEM (FIPS 203)
#: method -> (private key class, public key class, encapsulation key length, ciphertext length)
_MLKEM = {
    DhId.ML_KEM_768: (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey, 1184, 1088),
    DhId.ML_KEM_1024: (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey, 1568, 1568),
}
MLKEM_SEED_LEN = 64     # FIPS 203 seed d | z, drawn from the injected random source


class MlKem:
    """The initiator's side of an ML-KEM key exchange (draft-ietf-ipsecme-ikev2-mlkem §2):
    ``public_bytes`` is the encapsulation key it sends (KEi), ``shared_secret(ct)`` decapsulates
    the responder's ciphertext (KEr). Same shape as :class:`KeyExchange`; the decapsulation key
    never leaves the object and repr shows no secret."""

    __slots__ = ("dh_id", "public_bytes", "_priv")

    def __init__(self, dh_id: DhId, public_bytes: bytes, priv: object) -> None:
        self.dh_id = dh_id
        self.public_bytes = public_bytes
        self._priv = priv

    def __repr__(self) -> str:
        return f"MlKem({self.dh_id.name}, public={len(self.public_bytes)} bytes)"

    @classmethod
    def generate(cls, dh_id: int, random: RandomSource) -> "MlKem":
        gid = DhId(dh_id)
        priv_cls = _MLKEM[gid][0]
        k = priv_cls.from_seed_bytes(_take(random, MLKEM_SEED_LEN))
        return cls(gid, k.public_key().public_bytes_raw(), k)

    def shared_secret(self, ciphertext: bytes) -> bytes:
        want = _MLKEM[self.dh_id][3]
        if len(ciphertext) != want:
            raise InvalidKeyExchange(f"{self.dh_id.name} ciphertext must be {want} octets, got "
                                     f"{len(ciphertext)}")
        try:
            return self._priv.decapsulate(ciphertext)  # type: ignore[attr-defined]
        except ValueError:
            raise InvalidKeyExchange(f"{self.dh_id.name} ciphertext refused") from None


def mlkem_encapsulate(dh_id: int, encapsulation_key: bytes) -> tuple[bytes, bytes]:
    """The responder's side: (ciphertext for KEr, shared secret) from the initiator's
    encapsulation key, after the FIPS 203 §7.2 input checks (length, modulus). Raises
    InvalidKeyExchange. The randomness of encapsulation is OpenSSL's (the library takes none)."""
    gid = DhId(dh_id)
    _, pub_cls, ek_len, _ = _MLKEM[gid]
    if len(encapsulation_key) != ek_len:
        raise InvalidKeyExchange(f"{gid.name} encapsulation key must be {ek_len} octets, got "
                                 f"{len(encapsulation_key)}")
    try:
        shared, ciphertext = pub_cls.from_public_bytes(encapsulation_key).encapsulate()
    except ValueError:
        raise InvalidKeyExchange(f"{gid.name} encapsulation key refused (FIPS 203 §7.2 "
                                 "modulus check)") from None
    return ciphertext, shared


def is_kem(dh_id: int) -> bool:
    return dh_id in _MLKEM


def derive_additional_ike_keys(suite: "IkeSuite | Proposal", prev_SK_d: bytes, shared: bytes,
                               Ni: bytes, Nr: bytes, SPIi: bytes, SPIr: bytes) -> tuple[bytes, IkeKeys]:
    """RFC 9370 §2.2.2: after the n-th additional key exchange,
    SKEYSEED(n) = prf(SK_d(n-1), SK(n) | Ni | Nr) and
    {SK_d(n) | SK_ai(n) | ... | SK_pr(n)} = prf+(SKEYSEED(n), Ni | Nr | SPIi | SPIr),
    with the nonces and SPIs of IKE_SA_INIT. Returns (SKEYSEED(n), keys)."""
    s = _as_suite(suite)
    _check_spis(SPIi, SPIr)
    skeyseed = prf(s.prf, prev_SK_d, shared + Ni + Nr)
    return skeyseed, _split_ike_keys(s, skeyseed, Ni + Nr + SPIi + SPIr)


def _take(random: RandomSource, n: int) -> bytes:
    b = random(n)
    if len(b) != n:
        raise CryptoError(f"random source returned {len(b)} octets, {n} requested")
    return b


__all__ = [
    "ChildKeys",
    "CryptoError",
    "IkeKeys",
    "IkeSuite",
    "IntegrityError",
    "InvalidKeyExchange",
    "KEY_PAD",
    "KeyExchange",
    "MlKem",
    "derive_additional_ike_keys",
    "is_kem",
    "mlkem_encapsulate",
    "RandomSource",
    "SUPPORTED_KE",
    "SkCipher",
    "UnsupportedAlgorithm",
    "child_keymat",
    "child_keymat_for",
    "derive_ike_keys",
    "derive_rekeyed_ike_keys",
    "encr_key_len",
    "integ_checksum",
    "integ_icv_len",
    "integ_key_len",
    "is_aead",
    "ke_public_len",
    "modp_prime",
    "nat_detection_hash",
    "pad_plaintext",
    "prf",
    "prf_key_len",
    "prf_output_len",
    "prf_plus",
    "psk_auth",
    "psk_auth_matches",
    "signed_octets",
    "sk_ciphers",
    "unpad_plaintext",
]
