"""Proposals: strongSwan-spelled proposal strings, the security policy, proposal selection.

A :class:`Proposal` has the shape of one Proposal substructure of an SA payload (RFC 7296 §3.3.1):
protocol, proposal number, SPI and a list of :class:`Transform` (§3.3.2) of several Transform
Types, several transforms of one type being alternatives in the proposer's order of preference.
The codec builds SA payloads from these objects and parses SA payloads back into them.

Text form (what users write in the configuration, as strongSwan spells it)::

    aes256gcm16-prfsha384-x25519          IKE, AEAD
    aes256-sha256-modp3072                IKE, AES-CBC + HMAC-SHA2-256-128 (PRF derived: prfsha256)
    aes256gcm16  aes128-sha256-ecp256  aes256gcm16-esn      ESP (optional PFS group, ESN)
    aes256gcm16-prfsha384-x25519-ke1_mlkem768             IKE, hybrid: an additional key
                                          exchange (RFC 9370) ADDKE1 = ML-KEM-768; ke1..ke7,
                                          keN_none makes that one optional (strongSwan 6)

Policy (RFC 8247 guidance, issue 4): DES, 3DES, MD5, SHA-1 (as PRF or integrity), NULL
encryption and MODP groups below 2048 bits are refused in configuration (:class:`ProposalError`
"weak algorithm ... refused") and never selected from a peer's offer (so the peer gets
NO_PROPOSAL_CHOSEN). Algorithms that are not weak but that this implementation does not
implement are refused the same way with "not supported".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from appliance.ike.constants import (
    DhId,
    EncrId,
    EsnId,
    IntegId,
    PrfId,
    ProtocolId,
    TransformType,
)

Kind = Literal["ike", "esp"]

DEFAULT_IKE_PROPOSAL = "aes256gcm16-prfsha384-x25519"
DEFAULT_ESP_PROPOSAL = "aes256gcm16"

_ENUM_OF_TYPE: dict[int, type] = {
    TransformType.ENCR: EncrId,
    TransformType.PRF: PrfId,
    TransformType.INTEG: IntegId,
    TransformType.DH: DhId,
    TransformType.ESN: EsnId,
    # RFC 9370: Additional Key Exchange 1..7 take Transform Type 4's IDs
    **{tt: DhId for tt in range(TransformType.ADDKE1, TransformType.ADDKE7 + 1)},
}

#: Additional Key Exchange transform types (RFC 9370 §2.2.1), in the order they are run.
ADDKE_TYPES = tuple(TransformType(tt) for tt in range(TransformType.ADDKE1, TransformType.ADDKE7 + 1))
_ADDKE_SET = frozenset(ADDKE_TYPES)
#: Key exchange methods allowed as an additional key exchange: the classic groups and ML-KEM
#: (draft-ietf-ipsecme-ikev2-mlkem; cryptography's mlkem module). ML-KEM only here, never in
#: IKE_SA_INIT (a 1184/1568-octet KE payload there would need IP fragmentation).
SUPPORTED_MLKEM = frozenset({DhId.ML_KEM_768, DhId.ML_KEM_1024})

#: Transform types this implementation understands (RFC 7296 §3.3.6: a proposal with any other
#: type is unacceptable).
KNOWN_TRANSFORM_TYPES = frozenset(_ENUM_OF_TYPE)
# value -> enum member maps, for turning codec integers into members without Enum.__call__
_TYPE_MEMBER = TransformType._value2member_map_
_ID_MEMBERS: dict[int, dict] = {tt: enum._value2member_map_ for tt, enum in _ENUM_OF_TYPE.items()}

#: Combined-mode (AEAD) ciphers: no INTEG transform (or only NONE) with these (RFC 7296 §3.3).
AEAD_ENCR = frozenset(
    {
        EncrId.AES_CCM_8, EncrId.AES_CCM_12, EncrId.AES_CCM_16,
        EncrId.AES_GCM_8, EncrId.AES_GCM_12, EncrId.AES_GCM_16,
        EncrId.CAMELLIA_CCM_8, EncrId.CAMELLIA_CCM_12, EncrId.CAMELLIA_CCM_16,
        EncrId.CHACHA20_POLY1305, EncrId.AES_CCM_8_IIV, EncrId.AES_GCM_16_IIV,
        EncrId.CHACHA20_POLY1305_IIV, EncrId.NULL_AUTH_AES_GMAC,
    }
)

# --- what we implement (crypto.py implements exactly these; a unit test keeps them in step) ---
#: encryption: id -> allowed key lengths in bits (None: the transform carries no Key Length).
SUPPORTED_ENCR: dict[EncrId, frozenset[int | None]] = {
    EncrId.AES_CBC: frozenset({128, 192, 256}),
    EncrId.AES_GCM_16: frozenset({128, 192, 256}),
    EncrId.CHACHA20_POLY1305: frozenset({None}),  # RFC 7634 §2: no Key Length attribute
}
SUPPORTED_PRF = frozenset({PrfId.HMAC_SHA2_256, PrfId.HMAC_SHA2_384, PrfId.HMAC_SHA2_512})
SUPPORTED_INTEG = frozenset(
    {IntegId.HMAC_SHA2_256_128, IntegId.HMAC_SHA2_384_192, IntegId.HMAC_SHA2_512_256}
)
SUPPORTED_DH = frozenset(
    {
        DhId.MODP_2048, DhId.MODP_3072, DhId.MODP_4096, DhId.MODP_6144, DhId.MODP_8192,
        DhId.ECP_256, DhId.ECP_384, DhId.ECP_521, DhId.CURVE25519, DhId.CURVE448,
    }
)
SUPPORTED_ESN = frozenset({EsnId.NO_ESN, EsnId.ESN})

# --- what the policy refuses as weak (RFC 8247 §2/§3 MUST NOT / SHOULD NOT) ---
WEAK_ENCR = frozenset(
    {EncrId.DES_IV64, EncrId.DES, EncrId.TRIPLE_DES, EncrId.DES_IV32, EncrId.NULL,
     EncrId.RC5, EncrId.IDEA, EncrId.CAST, EncrId.BLOWFISH, EncrId.THREE_IDEA}
)
WEAK_PRF = frozenset({PrfId.HMAC_MD5, PrfId.HMAC_SHA1, PrfId.HMAC_TIGER})
WEAK_INTEG = frozenset(
    {IntegId.HMAC_MD5_96, IntegId.HMAC_SHA1_96, IntegId.DES_MAC, IntegId.KPDK_MD5,
     IntegId.HMAC_MD5_128, IntegId.HMAC_SHA1_160}
)
WEAK_DH = frozenset(
    {DhId.MODP_768, DhId.MODP_1024, DhId.MODP_1536, DhId.MODP_1024_160, DhId.ECP_192}
)


class ProposalError(ValueError):
    """A proposal string is wrong. ``str()`` says which token, why, and what is allowed."""

    def __init__(self, text: str, reason: str, token: str | None = None) -> None:
        self.text = text
        self.reason = reason
        self.token = token
        super().__init__(f"invalid proposal {text!r}: {reason}")


@dataclass(frozen=True)
class Transform:
    """One Transform substructure (RFC 7296 §3.3.2).

    ``key_length`` is the Key Length attribute in bits (§3.3.5) or None when absent.
    ``extra_attributes`` holds any other attributes (type, raw value) the codec found; we
    understand none, so such a transform is never selected (§3.3.6).
    """

    type: int
    id: int
    key_length: int | None = None
    extra_attributes: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        # Show registry names when the values are known (the codec may hand us raw ints).
        members = _ID_MEMBERS.get(self.type)
        if members is not None:
            object.__setattr__(self, "type", _TYPE_MEMBER[self.type])
            member = members.get(self.id)
            if member is not None:
                object.__setattr__(self, "id", member)

    @classmethod
    def plain(cls, ttype: int, tid: int, key_length: int | None = None) -> "Transform":
        """A transform without extra attributes; equal ones are one shared (frozen) object."""
        key = (ttype, tid, key_length)
        t = _PLAIN.get(key)
        if t is None:
            t = cls(ttype, tid, key_length)
            if len(_PLAIN) < _PLAIN_MAX:   # the codec calls this with values from the wire
                _PLAIN[key] = t
        return t

    def __str__(self) -> str:
        return transform_token(self)


_PLAIN: dict[tuple[int, int, int | None], Transform] = {}
_PLAIN_MAX = 2048


def _group_by_type(transforms: tuple[Transform, ...]) -> dict[int, tuple[Transform, ...]]:
    out: dict[int, tuple[Transform, ...]] = {}
    for t in transforms:
        prev = out.get(t.type)
        out[t.type] = (t,) if prev is None else prev + (t,)
    return out


@dataclass(frozen=True)
class Proposal:
    """One Proposal substructure (RFC 7296 §3.3.1).

    ``number`` is the Proposal Num, ``spi`` the SPI field (empty for the IKE SA in IKE_SA_INIT,
    8 octets when rekeying an IKE SA, 4 octets for ESP). They do not take part in the strings.
    """

    protocol: ProtocolId
    transforms: tuple[Transform, ...]
    number: int = 1
    spi: bytes = field(default=b"")

    def of_type(self, ttype: TransformType) -> tuple[Transform, ...]:
        by_type = self.__dict__.get("_by_type")
        if by_type is None:
            by_type = self._derive("_by_type", _group_by_type(self.transforms))
        return by_type.get(ttype, ())

    # Derived data, computed once per (immutable) proposal and kept in the instance __dict__
    # (not fields: they take no part in eq, hash or repr).
    def _derive(self, name: str, value):
        self.__dict__[name] = value
        return value

    def derived(self, name: str, compute):
        """`compute(self)`, computed once for this (immutable) proposal. For data other
        modules derive from a proposal (e.g. crypto's IKE suite); `name` must be unique."""
        key = "_d_" + name
        try:
            return self.__dict__[key]
        except KeyError:
            return self._derive(key, compute(self))

    @property
    def effective_sets(self) -> dict[int, frozenset[Transform]]:
        """Per Transform Type: the transforms without attributes, RFC 7296 defaults for absent
        optional types included (what selection compares the peer's transforms with)."""
        sets = self.__dict__.get("_effective_sets")
        if sets is None:
            sets = self._derive("_effective_sets", {tt: frozenset(_bare(t) for t in _effective(self, tt))
                                                    for tt in _SELECTION_ORDER})
        return sets

    @property
    def without_dh(self) -> "Proposal":
        """This proposal without key exchange transforms (the first Child SA, §1.2)."""
        p = self.__dict__.get("_without_dh")
        if p is None:
            p = self._derive("_without_dh", Proposal(self.protocol, tuple(
                t for t in self.transforms if t.type != TransformType.DH), self.number, self.spi))
        return p

    @property
    def encr(self) -> tuple[Transform, ...]:
        return self.of_type(TransformType.ENCR)

    @property
    def prf(self) -> tuple[Transform, ...]:
        return self.of_type(TransformType.PRF)

    @property
    def integ(self) -> tuple[Transform, ...]:
        return self.of_type(TransformType.INTEG)

    @property
    def dh(self) -> tuple[Transform, ...]:
        return self.of_type(TransformType.DH)

    @property
    def esn(self) -> tuple[Transform, ...]:
        return self.of_type(TransformType.ESN)

    def only(self, ttype: TransformType) -> Transform | None:
        """The single transform of ``ttype`` of a *selected* proposal, or None if absent."""
        ts = self.of_type(ttype)
        if len(ts) > 1:
            raise ValueError(f"proposal has {len(ts)} {ttype.name} transforms, expected one")
        return ts[0] if ts else None

    @property
    def is_aead(self) -> bool:
        return any(t.id in AEAD_ENCR for t in self.encr)

    def with_spi(self, spi: bytes, number: int | None = None) -> "Proposal":
        return replace(self, spi=spi, number=self.number if number is None else number)

    def __str__(self) -> str:
        return format_proposal(self)


# --------------------------------------------------------------------------- token tables
# strongSwan keyword -> transform; the first keyword listed for a transform is the canonical
# spelling used by format_proposal.
_TOKENS: dict[str, Transform] = {}
_CANONICAL: dict[tuple[int, int, int | None], str] = {}


def _tok(names: Sequence[str], ttype: TransformType, tid: int, keylen: int | None = None) -> None:
    t = Transform(ttype, tid, keylen)
    for n in names:
        _TOKENS[n] = t
    _CANONICAL.setdefault((ttype, tid, keylen), names[0])


def _build_tables() -> None:
    E, P, I, D, S = (TransformType.ENCR, TransformType.PRF, TransformType.INTEG,
                     TransformType.DH, TransformType.ESN)
    for bits in (128, 192, 256):
        _tok([f"aes{bits}"] + (["aes"] if bits == 128 else []), E, EncrId.AES_CBC, bits)
        _tok([f"aes{bits}ctr"], E, EncrId.AES_CTR, bits)
        for icv, eid in ((16, EncrId.AES_GCM_16), (12, EncrId.AES_GCM_12), (8, EncrId.AES_GCM_8)):
            names = [f"aes{bits}gcm{icv}", f"aes{bits}gcm{icv * 8}"]
            if icv == 16:
                names.append(f"aes{bits}gcm")
            _tok(names, E, eid, bits)
        for icv, eid in ((16, EncrId.AES_CCM_16), (12, EncrId.AES_CCM_12), (8, EncrId.AES_CCM_8)):
            names = [f"aes{bits}ccm{icv}", f"aes{bits}ccm{icv * 8}"]
            if icv == 16:
                names.append(f"aes{bits}ccm")
            _tok(names, E, eid, bits)
        _tok([f"aes{bits}gmac"], E, EncrId.NULL_AUTH_AES_GMAC, bits)
        _tok([f"camellia{bits}"] + (["camellia"] if bits == 128 else []), E,
             EncrId.CAMELLIA_CBC, bits)
        _tok([f"camellia{bits}ctr"], E, EncrId.CAMELLIA_CTR, bits)
    _tok(["chacha20poly1305"], E, EncrId.CHACHA20_POLY1305)
    _tok(["3des"], E, EncrId.TRIPLE_DES)
    _tok(["des"], E, EncrId.DES)
    _tok(["cast128"], E, EncrId.CAST, 128)
    _tok(["blowfish128", "blowfish"], E, EncrId.BLOWFISH, 128)
    _tok(["blowfish192"], E, EncrId.BLOWFISH, 192)
    _tok(["blowfish256"], E, EncrId.BLOWFISH, 256)
    _tok(["null"], E, EncrId.NULL)

    _tok(["sha256", "sha2_256"], I, IntegId.HMAC_SHA2_256_128)
    _tok(["sha384", "sha2_384"], I, IntegId.HMAC_SHA2_384_192)
    _tok(["sha512", "sha2_512"], I, IntegId.HMAC_SHA2_512_256)
    _tok(["sha1", "sha"], I, IntegId.HMAC_SHA1_96)
    _tok(["sha1_160"], I, IntegId.HMAC_SHA1_160)
    _tok(["md5"], I, IntegId.HMAC_MD5_96)
    _tok(["md5_128"], I, IntegId.HMAC_MD5_128)
    _tok(["aesxcbc"], I, IntegId.AES_XCBC_96)
    _tok(["aescmac"], I, IntegId.AES_CMAC_96)

    _tok(["prfsha256"], P, PrfId.HMAC_SHA2_256)
    _tok(["prfsha384"], P, PrfId.HMAC_SHA2_384)
    _tok(["prfsha512"], P, PrfId.HMAC_SHA2_512)
    _tok(["prfsha1"], P, PrfId.HMAC_SHA1)
    _tok(["prfmd5"], P, PrfId.HMAC_MD5)
    _tok(["prfaesxcbc"], P, PrfId.AES128_XCBC)
    _tok(["prfaescmac"], P, PrfId.AES128_CMAC)

    _tok(["x25519", "curve25519"], D, DhId.CURVE25519)
    _tok(["x448", "curve448"], D, DhId.CURVE448)
    for name, gid in (("ecp256", DhId.ECP_256), ("ecp384", DhId.ECP_384),
                      ("ecp521", DhId.ECP_521), ("ecp192", DhId.ECP_192),
                      ("ecp224", DhId.ECP_224), ("ecp224bp", DhId.BRAINPOOL_P224),
                      ("ecp256bp", DhId.BRAINPOOL_P256), ("ecp384bp", DhId.BRAINPOOL_P384),
                      ("ecp512bp", DhId.BRAINPOOL_P512),
                      ("modp2048", DhId.MODP_2048), ("modp3072", DhId.MODP_3072),
                      ("modp4096", DhId.MODP_4096), ("modp6144", DhId.MODP_6144),
                      ("modp8192", DhId.MODP_8192), ("modp768", DhId.MODP_768),
                      ("modp1024", DhId.MODP_1024), ("modp1536", DhId.MODP_1536),
                      ("modp1024s160", DhId.MODP_1024_160), ("modp2048s224", DhId.MODP_2048_224),
                      ("modp2048s256", DhId.MODP_2048_256),
                      ("mlkem512", DhId.ML_KEM_512), ("mlkem768", DhId.ML_KEM_768),
                      ("mlkem1024", DhId.ML_KEM_1024)):
        _tok([name], D, gid)

    _tok(["esn"], S, EsnId.ESN)
    _tok(["noesn"], S, EsnId.NO_ESN)

    # RFC 9370 additional key exchanges, strongSwan 6's spelling: ke1_mlkem768, ke2_x25519,
    # ke1_none (that additional key exchange optional)
    main_ke = [(n, t) for n, t in list(_TOKENS.items()) if t.type == D]
    for i, tt in enumerate(ADDKE_TYPES, 1):
        _tok([f"ke{i}_none"], tt, DhId.NONE)
        for name, t in main_ke:
            _tok([f"ke{i}_{name}"], tt, t.id)


_build_tables()

_KIND_WORD = {TransformType.ENCR: "encryption", TransformType.PRF: "PRF",
              TransformType.INTEG: "integrity", TransformType.DH: "key exchange",
              TransformType.ESN: "ESN",
              **{tt: f"additional key exchange {i} (ke{i}_)" for i, tt in enumerate(ADDKE_TYPES, 1)}}


def _bare(t: Transform) -> Transform:
    return t if not t.extra_attributes else Transform.plain(t.type, t.id, t.key_length)


def transform_token(t: Transform) -> str:
    """strongSwan keyword for a transform, or a descriptive fallback for unknown ones."""
    name = _CANONICAL.get((t.type, t.id, t.key_length))
    if name is not None and not t.extra_attributes:
        return name
    tname = TransformType(t.type).name if t.type in KNOWN_TRANSFORM_TYPES else f"type{int(t.type)}"
    idname = t.id.name if hasattr(t.id, "name") else str(int(t.id))
    kl = f"_{t.key_length}" if t.key_length is not None else ""
    return f"{tname}:{idname}{kl}"


def refusal(t: Transform, protocol: ProtocolId = ProtocolId.IKE) -> str | None:
    """Why policy or implementation refuses this transform (None: acceptable).

    Returns "weak" or "unsupported" as the first word of the reason.
    """
    if t.extra_attributes:
        return _refusal(t, protocol)
    key = (t.type, t.id, t.key_length, protocol)
    try:
        return _REFUSALS[key]
    except KeyError:
        why = _refusal(t, protocol)
        if len(_REFUSALS) < 4096:   # the verdict depends only on the key's values; bounded
            _REFUSALS[key] = why
        return why


_REFUSALS: dict[tuple, str | None] = {}


def _refusal(t: Transform, protocol: ProtocolId) -> str | None:
    if t.type not in KNOWN_TRANSFORM_TYPES:
        return f"unsupported transform type {int(t.type)}"
    if t.extra_attributes:
        return "unsupported transform attribute(s) " + ", ".join(
            str(a) for a, _ in t.extra_attributes
        )
    ttype = TransformType(t.type)
    weak = {TransformType.ENCR: WEAK_ENCR, TransformType.PRF: WEAK_PRF,
            TransformType.INTEG: WEAK_INTEG, TransformType.DH: WEAK_DH,
            **{tt: WEAK_DH for tt in ADDKE_TYPES}}.get(ttype, frozenset())
    if t.id in weak:
        return "weak"
    if ttype == TransformType.ENCR:
        lens = SUPPORTED_ENCR.get(t.id)  # type: ignore[call-overload]
        if lens is None or t.key_length not in lens:
            return "unsupported"
        return None
    if ttype == TransformType.PRF:
        return None if t.id in SUPPORTED_PRF and t.key_length is None else "unsupported"
    if ttype == TransformType.INTEG:
        if t.id == IntegId.NONE:
            return None
        return None if t.id in SUPPORTED_INTEG and t.key_length is None else "unsupported"
    if ttype == TransformType.DH:
        if t.id == DhId.NONE:
            return None
        return None if t.id in SUPPORTED_DH and t.key_length is None else "unsupported"
    if ttype == TransformType.ESN:
        if protocol == ProtocolId.IKE:
            return "unsupported (ESN is for ESP/AH only)"
        return None if t.id in SUPPORTED_ESN else "unsupported"
    if ttype in _ADDKE_SET:
        if t.id == DhId.NONE:
            return None
        if protocol != ProtocolId.IKE:
            return ("unsupported (additional key exchanges for Child SAs need IKE_FOLLOWUP_KE, "
                    "RFC 9370 §2.2.3, not implemented)")
        ok = t.id in SUPPORTED_DH or t.id in SUPPORTED_MLKEM
        return None if ok and t.key_length is None else "unsupported"
    return "unsupported"  # pragma: no cover


def allowed_tokens(ttype: TransformType, kind: Kind) -> list[str]:
    """Canonical keywords of ``ttype`` that the policy accepts, in table order."""
    out: list[str] = []
    proto = ProtocolId.IKE if kind == "ike" else ProtocolId.ESP
    for (tt, tid, kl), name in _CANONICAL.items():
        if tt == ttype and refusal(Transform(tt, tid, kl), proto) is None:
            out.append(name)
    return out


def _allowed_summary(kind: Kind) -> str:
    types = [TransformType.ENCR, TransformType.INTEG, TransformType.PRF, TransformType.DH]
    if kind == "esp":
        types = [TransformType.ENCR, TransformType.INTEG, TransformType.DH, TransformType.ESN]
    out = "; ".join(f"{_KIND_WORD[t]}: {', '.join(allowed_tokens(t, kind))}" for t in types)
    if kind == "ike":
        out += ("; additional key exchanges (RFC 9370): keN_<key exchange> for N = 1..7, e.g. "
                "ke1_mlkem768, ke1_mlkem1024, ke2_x25519, or keN_none to make one optional")
    return out


# --------------------------------------------------------------------------- parsing
_INTEG_TO_PRF = {
    IntegId.HMAC_SHA2_256_128: PrfId.HMAC_SHA2_256,
    IntegId.HMAC_SHA2_384_192: PrfId.HMAC_SHA2_384,
    IntegId.HMAC_SHA2_512_256: PrfId.HMAC_SHA2_512,
}


_PARSED: dict[tuple[str, str], Proposal] = {}


def parse_proposal(text: str, kind: Kind) -> Proposal:
    """Parse one strongSwan-spelled proposal (``aes256gcm16-prfsha384-x25519``); the same text
    twice gives the same (immutable) Proposal, parsed once (1,000 tunnels spell a few).

    ``kind`` is "ike" (IKE SA: ENCR, PRF, INTEG unless AEAD, and a key exchange method) or
    "esp" (Child SA: ENCR, INTEG unless AEAD, optional key exchange method for PFS, ESN; no
    PRF). For a non-AEAD IKE proposal without PRF the PRF is derived from the integrity
    algorithm, as strongSwan does. Raises :class:`ProposalError`.
    """
    key = (text, kind)
    p = _PARSED.get(key)
    if p is None:
        p = _parse_proposal(text, kind)
        if len(_PARSED) < 1024:
            _PARSED[key] = p
    return p


def _parse_proposal(text: str, kind: Kind) -> Proposal:
    if kind not in ("ike", "esp"):
        raise ValueError(f"kind must be 'ike' or 'esp', not {kind!r}")
    proto = ProtocolId.IKE if kind == "ike" else ProtocolId.ESP
    words = text.strip().lower().split("-") if text.strip() else []
    if not words or any(w == "" for w in words):
        raise ProposalError(text, "empty algorithm name; write algorithms joined by '-', "
                                  f"e.g. {DEFAULT_IKE_PROPOSAL if kind == 'ike' else DEFAULT_ESP_PROPOSAL!r}")
    transforms: list[Transform] = []
    for w in words:
        t = _TOKENS.get(w)
        if t is None:
            raise ProposalError(text, f"unknown algorithm {w!r}; allowed in {kind.upper()} "
                                      f"proposals: {_allowed_summary(kind)}", w)
        ttype = TransformType(t.type)
        what = f"{_KIND_WORD[ttype]} {t.id.name}" + (f" {t.key_length}-bit" if t.key_length else "")
        if ttype == TransformType.DH and t.id in SUPPORTED_MLKEM:
            raise ProposalError(text, f"{w!r}: ML-KEM is supported as an additional key exchange "
                                      f"(RFC 9370), not as the {'IKE_SA_INIT' if kind == 'ike' else 'PFS'} "
                                      f"key exchange; write it as ke1_{w} after a classic group, "
                                      f"e.g. {DEFAULT_IKE_PROPOSAL}-ke1_{w}"
                                      + (" (in IKE proposals: Child SAs with ML-KEM are not "
                                         "supported)" if kind == "esp" else ""), w)
        if kind == "esp" and ttype in _ADDKE_SET:
            raise ProposalError(text, f"{w!r}: additional key exchanges for Child SAs "
                                      "(IKE_FOLLOWUP_KE, RFC 9370 §2.2.3) are not supported; use "
                                      f"{w} in the IKE proposals (the Child SA keys come from the "
                                      "IKE SA's SK_d, which the additional key exchange feeds)", w)
        if kind == "ike" and ttype == TransformType.ESN:
            raise ProposalError(text, f"{w!r}: ESN is not allowed in IKE proposals (ESP only)", w)
        if kind == "esp" and ttype == TransformType.PRF:
            raise ProposalError(text, f"{w!r}: a PRF is not allowed in ESP proposals; the Child "
                                      "SA keys come from the IKE SA's PRF", w)
        why = refusal(t, proto)
        if why is not None:
            allowed = ", ".join(allowed_tokens(ttype, kind))
            word = "weak algorithm" if why == "weak" else "algorithm"
            verdict = "refused by policy" if why == "weak" else "not supported"
            raise ProposalError(text, f"{word} {w!r} ({what}) {verdict}; allowed "
                                      f"{_KIND_WORD[ttype]} algorithms: {allowed}", w)
        if t not in transforms:  # repeated keywords are harmless, keep the first
            transforms.append(t)

    encr = [t for t in transforms if t.type == TransformType.ENCR]
    integ = [t for t in transforms if t.type == TransformType.INTEG]
    prf = [t for t in transforms if t.type == TransformType.PRF]
    dh = [t for t in transforms if t.type == TransformType.DH]
    esn = [t for t in transforms if t.type == TransformType.ESN]
    if not encr:
        raise ProposalError(text, "no encryption algorithm; allowed: "
                                  + ", ".join(allowed_tokens(TransformType.ENCR, kind)))
    aead = [t for t in encr if t.id in AEAD_ENCR]
    if aead and len(aead) != len(encr):
        raise ProposalError(text, "AEAD (" + ", ".join(map(transform_token, aead)) + ") and non-AEAD ("
                            + ", ".join(transform_token(t) for t in encr if t not in aead)
                            + ") encryption cannot share a proposal (RFC 7296 §3.3); "
                              "write them as separate proposals")
    if aead and integ:
        raise ProposalError(text, "integrity algorithm " + ", ".join(map(transform_token, integ))
                            + " not allowed with AEAD encryption " + aead[0].__str__()
                            + " (it authenticates itself)")
    if not aead and not integ:
        raise ProposalError(text, "non-AEAD encryption needs an integrity algorithm; allowed: "
                            + ", ".join(allowed_tokens(TransformType.INTEG, kind)))
    if kind == "ike":
        if not prf:
            if aead:
                raise ProposalError(text, "AEAD IKE proposals need an explicit PRF; allowed: "
                                    + ", ".join(allowed_tokens(TransformType.PRF, kind)))
            for t in integ:
                p = Transform(TransformType.PRF, _INTEG_TO_PRF[t.id])
                if p not in prf:
                    prf.append(p)
        if not dh:
            raise ProposalError(text, "IKE proposals need a key exchange method; allowed: "
                                + ", ".join(allowed_tokens(TransformType.DH, kind)))
        addke = sorted((t for t in transforms if t.type in _ADDKE_SET), key=lambda t: int(t.type))
        ordered = encr + integ + prf + dh + addke
    else:
        if not esn:
            esn = [Transform(TransformType.ESN, EsnId.NO_ESN)]
        ordered = encr + integ + dh + esn
    return Proposal(proto, tuple(ordered))


def parse_proposals(text: str | Iterable[str], kind: Kind) -> list[Proposal]:
    """Parse a comma-separated list (or an iterable) of proposals, numbered from 1 (§3.3.1)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [s.strip() for s in items]
    if not items or any(not s for s in items):
        raise ProposalError(text if isinstance(text, str) else ",".join(items),
                            "empty proposal in list")
    return [replace(parse_proposal(s, kind), number=i) for i, s in enumerate(items, 1)]


def format_proposal(p: Proposal) -> str:
    """The strongSwan spelling of a proposal; ``parse_proposal(format_proposal(p))`` gives ``p``
    back for proposals that parse_proposal produces. NO_ESN alone is implied and left out."""
    return p.derived("text", _format_proposal)


def _format_proposal(p: Proposal) -> str:
    order = [TransformType.ENCR, TransformType.INTEG, TransformType.PRF, TransformType.DH,
             *ADDKE_TYPES, TransformType.ESN]
    words: list[str] = []
    for tt in order:
        ts = p.of_type(tt)
        if tt == TransformType.ESN and [t.id for t in ts] == [EsnId.NO_ESN]:
            continue
        words.extend(transform_token(t) for t in ts)
    words.extend(transform_token(t) for t in p.transforms if t.type not in order)
    return "-".join(words)


# --------------------------------------------------------------------------- selection
def _effective(p: Proposal, tt: TransformType) -> tuple[Transform, ...]:
    """Transforms of ``tt``, with RFC 7296 defaults for an absent optional type."""
    ts = p.of_type(tt)
    if ts:
        return ts
    if tt == TransformType.INTEG:
        return (Transform.plain(tt, IntegId.NONE),)
    if tt == TransformType.DH and p.protocol != ProtocolId.IKE:
        return (Transform.plain(tt, DhId.NONE),)
    if tt == TransformType.ESN and p.protocol in (ProtocolId.ESP, ProtocolId.AH):
        return (Transform.plain(tt, EsnId.NO_ESN),)
    if tt in _ADDKE_SET:
        return (Transform.plain(tt, DhId.NONE),)   # RFC 9370 §2.2.1: absent = NONE
    return ()


_SELECTION_ORDER = (TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH,
                    TransformType.ESN, *ADDKE_TYPES)


def _match(ours: Proposal, theirs: Proposal) -> Proposal | None:
    if ours.protocol != theirs.protocol:
        return None
    if any(t.type not in KNOWN_TRANSFORM_TYPES for t in theirs.transforms):
        return None  # RFC 7296 §3.3.6: unknown transform type -> proposal unacceptable
    chosen: list[Transform] = []
    mine_sets = ours.effective_sets
    for tt in _SELECTION_ORDER:
        mine = mine_sets[tt]
        cand = _effective(theirs, tt)
        if not mine and not cand:
            continue
        pick = None
        for t in cand:
            if not t.extra_attributes and t in mine and refusal(t, theirs.protocol) is None:
                pick = t
                break
        if pick is None:
            return None
        if pick in theirs.transforms:  # echo only what they sent, not implied defaults
            chosen.append(pick)
    result = Proposal(theirs.protocol, tuple(chosen), theirs.number, theirs.spi)
    if not _structurally_valid(result):
        return None
    return result


def _structurally_valid(p: Proposal) -> bool:
    encr = p.encr
    if len(encr) != 1:
        return False
    aead = encr[0].id in AEAD_ENCR
    integ = [t for t in p.integ if t.id != IntegId.NONE]
    if aead and integ:
        return False
    if not aead and not integ:
        return False
    if p.protocol == ProtocolId.IKE:
        dh = p.dh
        if len(p.prf) != 1 or len(dh) != 1 or dh[0].id == DhId.NONE:
            return False
    elif p.prf:
        return False
    return all(len(p.of_type(tt)) <= 1 for tt in ADDKE_TYPES)


def additional_kes(p: Proposal) -> list[tuple[TransformType, int]]:
    """The additional key exchanges of a *selected* proposal, in the order RFC 9370 §2.2.2 runs
    them (ADDKE1 first), NONE left out: [(transform type, key exchange method)]."""
    out = []
    for tt in ADDKE_TYPES:
        t = p.only(tt)
        if t is not None and t.id != DhId.NONE:
            out.append((tt, int(t.id)))
    return out


def has_additional_ke(proposals: Iterable[Proposal]) -> bool:
    """Whether any proposal offers an additional key exchange other than NONE."""
    return any(t.type in _ADDKE_SET and t.id != DhId.NONE for p in proposals for t in p.transforms)


def initiator_offer(proposals: Sequence[Proposal]) -> list[Proposal]:
    """What an initiator offers in IKE_SA_INIT: the proposals, then, for each whose additional
    key exchanges are all optional (``keN_none``), the same proposal without them. A responder
    that does not know Transform Types 6..12 refuses a proposal containing them (RFC 7296
    §3.3.6; strongSwan 5.9 does), so only the copy lets it choose the classic suite the policy
    allows; a responder that knows them picks the hybrid proposal first."""
    out = list(proposals)
    for p in proposals:
        types = {t.type for t in p.transforms if t.type in _ADDKE_SET}
        if types and all(any(t.type == tt and t.id == DhId.NONE for t in p.transforms) for tt in types):
            q = Proposal(p.protocol, tuple(t for t in p.transforms if t.type not in _ADDKE_SET),
                         p.number, p.spi)
            if all(q.transforms != o.transforms for o in out):
                out.append(q)
    return out


def offer_without_intermediate(theirs: Sequence[Proposal]) -> list[Proposal]:
    """A peer that did not announce IKE_INTERMEDIATE cannot run additional key exchanges
    (RFC 9370 §2.2.1): of its offer, keep the proposals where every additional key exchange
    type it lists allows NONE, without the other transforms of those types."""
    out: list[Proposal] = []
    for p in theirs:
        types = {t.type for t in p.transforms if t.type in _ADDKE_SET}
        if not types:
            out.append(p)
            continue
        if all(any(t.type == tt and t.id == DhId.NONE for t in p.transforms) for tt in types):
            out.append(Proposal(p.protocol, tuple(t for t in p.transforms if t.type not in _ADDKE_SET
                                                  or t.id == DhId.NONE), p.number, p.spi))
    return out


#: Bounds on a peer's offer, checked before selection: a larger offer is refused (NO_PROPOSAL_
#: CHOSEN) without being looked at. Real offers are far smaller (strongSwan's default IKE offer
#: is two proposals of ~20 transforms; Windows sends ~10 proposals of 4).
MAX_OFFER_PROPOSALS = 32
MAX_OFFER_TRANSFORMS = 256          # in all proposals together
# only offers this small, of known transform types without attributes, are memoised
_MEMO_MAX_PROPOSALS = 16
_MEMO_MAX_TRANSFORMS = 64


def offer_size(theirs: Sequence[Proposal]) -> tuple[int, int]:
    """(proposals, transforms in all) of an offer, for bounds and log lines."""
    return len(theirs), sum(len(p.transforms) for p in theirs)


def contains(ours: Sequence[Proposal], chosen: Proposal) -> bool:
    """Whether a selected proposal (one transform per type) is one that ``ours`` accept."""
    return any(_match(o, chosen) is not None for o in ours)


def select_proposal(ours: Sequence[Proposal], theirs: Sequence[Proposal]) -> Proposal | None:
    """Responder side of RFC 7296 §2.7: the first of ``theirs`` acceptable to any of ``ours``.

    Within a proposal, for each Transform Type the peer's first (most preferred) transform
    that we also offer and that passes policy is chosen. The result has one transform per type
    and keeps the peer's proposal ``number`` and ``spi`` (the engine puts its own SPI in the
    reply with :meth:`Proposal.with_spi`). None means NO_PROPOSAL_CHOSEN.

    The outcome depends only on the proposals' protocols, transforms and numbers (the SPI is
    copied), so it is remembered for offers seen before (most peers send the same offer every
    time); an equal result for an equal SPI is the very same (immutable) object. Only small
    offers of known transform types without attributes are remembered, and an offer over
    MAX_OFFER_PROPOSALS / MAX_OFFER_TRANSFORMS is refused unseen (None).
    """
    n, total = offer_size(theirs)
    if n > MAX_OFFER_PROPOSALS or total > MAX_OFFER_TRANSFORMS:
        return None
    if (n <= _MEMO_MAX_PROPOSALS and total <= _MEMO_MAX_TRANSFORMS
            and all(t.type in KNOWN_TRANSFORM_TYPES and not t.extra_attributes
                    for p in theirs for t in p.transforms)):
        key = (tuple(ours), tuple((t.protocol, t.transforms, t.number) for t in theirs))
        memo = _SELECTIONS.get(key)
        if memo is None:
            memo = _select(ours, theirs)
            if len(_SELECTIONS) >= _SELECTIONS_MAX:   # offers come from the wire: stay bounded
                _SELECTIONS.clear()
            _SELECTIONS[key] = memo
    else:
        memo = _select(ours, theirs)    # an unusual offer (unknown types, attributes): not kept
    index, chosen = memo
    if chosen is None:
        return None
    spi = theirs[index].spi
    return chosen if chosen.spi == spi else Proposal(chosen.protocol, chosen.transforms, chosen.number, spi)


_SELECTIONS: dict[tuple, tuple[int, Proposal | None]] = {}
_SELECTIONS_MAX = 512


def _select(ours: Sequence[Proposal], theirs: Sequence[Proposal]) -> tuple[int, Proposal | None]:
    for i, t in enumerate(theirs):
        for o in ours:
            m = _match(o, t)
            if m is not None:
                return i, m
    return -1, None


def accepts_selection(offered: Sequence[Proposal], chosen: Proposal) -> Proposal | None:
    """Initiator side of §2.7: check the responder's reply.

    ``chosen`` must carry the number of one of the ``offered`` proposals and exactly one
    transform of each type that proposal has, each one offered there (absent optional types
    count as their RFC 7296 default: INTEG NONE, DH NONE and NO_ESN for ESP) and acceptable to
    policy. Returns that offered proposal, or None (the reply is invalid).
    """
    if any(t.type not in KNOWN_TRANSFORM_TYPES for t in chosen.transforms):
        return None
    for o in offered:
        if o.number != chosen.number or o.protocol != chosen.protocol:
            continue
        mine_sets = o.effective_sets
        for tt in _SELECTION_ORDER:
            mine = mine_sets[tt]
            got = _effective(chosen, tt)
            if not mine and not got:
                continue
            if len(got) != 1 or _bare(got[0]) not in mine or got[0].extra_attributes:
                return None
            if refusal(got[0], o.protocol) is not None:
                return None
        return o if _structurally_valid(chosen) else None
    return None


__all__ = [
    "ADDKE_TYPES",
    "AEAD_ENCR",
    "additional_kes",
    "has_additional_ke",
    "initiator_offer",
    "offer_without_intermediate",
    "DEFAULT_ESP_PROPOSAL",
    "DEFAULT_IKE_PROPOSAL",
    "Kind",
    "Proposal",
    "ProposalError",
    "Transform",
    "accepts_selection",
    "allowed_tokens",
    "contains",
    "format_proposal",
    "parse_proposal",
    "parse_proposals",
    "refusal",
    "select_proposal",
    "transform_token",
]
