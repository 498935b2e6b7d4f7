"""What the data plane is told: plain dataclasses the daemon fills in from config and IKE results.

Nothing here knows IKE. The daemon maps a negotiated Child SA (RFC 7296 §1.3, §2.17) onto a
:class:`ChildSa`: kernel algorithm names, the KEYMAT split into the two directions' keys, the SPIs,
the outer addresses and the NAT-T encapsulation. Config maps onto :class:`TunnelInterface`.

Every dataclass validates itself when built, so a bad value fails here with a message that names
the field and lists what is allowed, before anything reaches the kernel.

Keys (:class:`SaKeys`) never appear in a repr, str, log line or error message.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]


class DataplaneInputError(ValueError):
    """A value handed to the data plane is invalid; the message says which and what is allowed."""


# --- algorithms ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cipher:
    """An ESP encryption transform as the kernel's crypto API names it."""

    name: str
    aead: bool
    key_bits: tuple[int, ...]      # allowed cipher key sizes, salt excluded
    salt_bytes: int                # KEYMAT bytes appended to the key as salt (RFC 4106 §8.1, RFC 7634 §2)
    iv_bytes: int                  # explicit IV carried in every ESP packet
    block_bytes: int               # the cipher's block size as crypto_aead_blocksize() reports it
    icv_bits: tuple[int, ...] = ()  # AEAD: allowed ICV lengths, first = default
    rfc: str = ""


@dataclass(frozen=True)
class Integrity:
    """An ESP integrity transform (HMAC) with its RFC truncation."""

    name: str
    key_bytes: int
    trunc_bits: int
    rfc: str = ""


CIPHERS: dict[str, Cipher] = {c.name: c for c in (
    Cipher("rfc4106(gcm(aes))", aead=True, key_bits=(128, 192, 256), salt_bytes=4, iv_bytes=8, block_bytes=1,
           icv_bits=(128, 96, 64), rfc="RFC 4106"),
    Cipher("rfc7539esp(chacha20,poly1305)", aead=True, key_bits=(256,), salt_bytes=4, iv_bytes=8, block_bytes=1,
           icv_bits=(128,), rfc="RFC 7634"),
    Cipher("cbc(aes)", aead=False, key_bits=(128, 192, 256), salt_bytes=0, iv_bytes=16, block_bytes=16,
           rfc="RFC 3602"),
)}

INTEGRITY: dict[str, Integrity] = {i.name: i for i in (
    Integrity("hmac(sha256)", key_bytes=32, trunc_bits=128, rfc="RFC 4868"),
    Integrity("hmac(sha384)", key_bytes=48, trunc_bits=192, rfc="RFC 4868"),
    Integrity("hmac(sha512)", key_bytes=64, trunc_bits=256, rfc="RFC 4868"),
)}

# strongSwan's proposal spelling (what operators write) -> (cipher, key bits, ICV bits, integrity)
_PROPOSALS: dict[str, tuple[str, int, int | None, str | None]] = {
    "aes128gcm16": ("rfc4106(gcm(aes))", 128, 128, None),
    "aes192gcm16": ("rfc4106(gcm(aes))", 192, 128, None),
    "aes256gcm16": ("rfc4106(gcm(aes))", 256, 128, None),
    "aes128gcm12": ("rfc4106(gcm(aes))", 128, 96, None),
    "aes256gcm12": ("rfc4106(gcm(aes))", 256, 96, None),
    "aes128gcm8": ("rfc4106(gcm(aes))", 128, 64, None),
    "aes256gcm8": ("rfc4106(gcm(aes))", 256, 64, None),
    "chacha20poly1305": ("rfc7539esp(chacha20,poly1305)", 256, 128, None),
}
for _bits in (128, 192, 256):
    for _h in ("256", "384", "512"):
        _PROPOSALS[f"aes{_bits}-sha{_h}"] = ("cbc(aes)", _bits, None, f"hmac(sha{_h})")


def _choices(names) -> str:
    return ", ".join(sorted(names))


@dataclass(frozen=True)
class EspAlgorithms:
    """The negotiated ESP transform of a Child SA, without keys.

    encryption: kernel name, one of :data:`CIPHERS`. key_bits: the cipher key size (salt
    excluded; None = any size the cipher allows, judged from the key). integrity: kernel name
    from :data:`INTEGRITY`, required with ``cbc(aes)`` and forbidden with an AEAD. icv_bits: the
    AEAD ICV length (default 128) or the HMAC truncation (default: the RFC's, e.g. 128 for
    hmac(sha256), RFC 4868 §2.3).
    """

    encryption: str
    key_bits: int | None = None
    integrity: str | None = None
    icv_bits: int | None = None

    def __post_init__(self) -> None:
        cipher = CIPHERS.get(self.encryption)
        if cipher is None:
            raise DataplaneInputError(
                f"unknown ESP encryption algorithm {self.encryption!r}: allowed {_choices(CIPHERS)}")
        if self.key_bits is not None and self.key_bits not in cipher.key_bits:
            raise DataplaneInputError(
                f"{self.encryption} does not take a {self.key_bits}-bit key: allowed "
                f"{', '.join(map(str, cipher.key_bits))}")
        if cipher.aead:
            if self.integrity is not None:
                raise DataplaneInputError(
                    f"{self.encryption} is an AEAD: it has its own integrity, so integrity must be None "
                    f"(got {self.integrity!r})")
            icv = self.icv_bits if self.icv_bits is not None else cipher.icv_bits[0]
            if icv not in cipher.icv_bits:
                raise DataplaneInputError(
                    f"{self.encryption} does not take a {icv}-bit ICV: allowed "
                    f"{', '.join(map(str, cipher.icv_bits))}")
            object.__setattr__(self, "icv_bits", icv)
        else:
            if self.integrity is None:
                raise DataplaneInputError(
                    f"{self.encryption} needs an integrity algorithm: allowed {_choices(INTEGRITY)}")
            integ = INTEGRITY.get(self.integrity)
            if integ is None:
                raise DataplaneInputError(
                    f"unknown ESP integrity algorithm {self.integrity!r}: allowed {_choices(INTEGRITY)}")
            trunc = self.icv_bits if self.icv_bits is not None else integ.trunc_bits
            if trunc % 8 or not 96 <= trunc <= integ.key_bytes * 8:
                raise DataplaneInputError(
                    f"{self.integrity} truncation of {trunc} bits is not allowed: use {integ.trunc_bits} "
                    f"({integ.rfc}) or another multiple of 8 between 96 and {integ.key_bytes * 8}")
            object.__setattr__(self, "icv_bits", trunc)

    @classmethod
    def from_proposal(cls, name: str) -> "EspAlgorithms":
        """From strongSwan's spelling of an ESP proposal, e.g. ``aes256gcm16`` or ``aes128-sha256``."""
        try:
            enc, bits, icv, integ = _PROPOSALS[name.lower()]
        except KeyError:
            raise DataplaneInputError(
                f"unknown ESP proposal {name!r}: allowed {_choices(_PROPOSALS)}") from None
        return cls(encryption=enc, key_bits=bits, integrity=integ, icv_bits=icv)

    @property
    def cipher(self) -> Cipher:
        return CIPHERS[self.encryption]

    @property
    def aead(self) -> bool:
        return self.cipher.aead

    @property
    def icv_bytes(self) -> int:
        assert self.icv_bits is not None
        return self.icv_bits // 8

    def check_keys(self, keys: "SaKeys", where: str) -> None:
        """Raise DataplaneInputError unless `keys` fit this transform (lengths only)."""
        cipher = self.cipher
        sizes = [b // 8 + cipher.salt_bytes for b in ((self.key_bits,) if self.key_bits else cipher.key_bits)]
        if len(keys.encryption) not in sizes:
            salt = f" (key + {cipher.salt_bytes}-byte salt, {cipher.rfc})" if cipher.salt_bytes else ""
            raise DataplaneInputError(
                f"{where}: {self.encryption} key is {len(keys.encryption)} bytes: it must be "
                f"{' or '.join(map(str, sizes))} bytes{salt}")
        if cipher.aead:
            if keys.integrity:
                raise DataplaneInputError(f"{where}: {self.encryption} is an AEAD: the integrity key must be empty")
        else:
            integ = INTEGRITY[self.integrity or ""]
            if len(keys.integrity) != integ.key_bytes:
                raise DataplaneInputError(
                    f"{where}: {self.integrity} key is {len(keys.integrity)} bytes: it must be "
                    f"{integ.key_bytes} bytes ({integ.rfc})")


@dataclass(frozen=True, repr=False)
class SaKeys:
    """The keys of one SA direction (RFC 7296 §2.17: SK_ei/SK_ai or SK_er/SK_ar from KEYMAT).

    encryption: the cipher key; for an AEAD the salt follows it (RFC 4106 §8.1, RFC 7634 §2).
    integrity: the HMAC key (empty for an AEAD). Never shown: repr and str say only the lengths.
    """

    encryption: bytes = field(repr=False)
    integrity: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "encryption", bytes(self.encryption))
        object.__setattr__(self, "integrity", bytes(self.integrity))

    def __repr__(self) -> str:
        return f"SaKeys(encryption=<{len(self.encryption)} bytes>, integrity=<{len(self.integrity)} bytes>)"

    __str__ = __repr__


# --- addresses, lifetimes, the Child SA --------------------------------------------------------


@dataclass(frozen=True)
class UdpEncap:
    """ESP in UDP for NAT traversal (RFC 3948): ports on this side and the peer's."""

    local_port: int = 4500
    remote_port: int = 4500

    def __post_init__(self) -> None:
        for name in ("local_port", "remote_port"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 1 <= v <= 65535:
                raise DataplaneInputError(f"UDP encapsulation {name} {v!r} is not a port (1-65535)")


@dataclass(frozen=True)
class Endpoints:
    """The outer (underlay) addresses of a Child SA, and its NAT-T encapsulation if any."""

    local: IPAddress
    remote: IPAddress
    encap: UdpEncap | None = None

    def __post_init__(self) -> None:
        for name in ("local", "remote"):
            v = getattr(self, name)
            try:
                object.__setattr__(self, name, ipaddress.ip_address(v))
            except ValueError:
                raise DataplaneInputError(f"endpoint {name} address {v!r} is not an IP address") from None
        if self.local.version != self.remote.version:
            raise DataplaneInputError(
                f"endpoints {self.local} and {self.remote} are of different IP versions: both must be IPv4 or IPv6")

    @property
    def version(self) -> int:
        return self.local.version


@dataclass(frozen=True)
class Lifetime:
    """Kernel-enforced SA limits (RFC 4301 §4.4.2.1): soft ones raise an EXPIRE event so the
    daemon rekeys, hard ones delete the SA. None = no limit."""

    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_packets: int | None = None
    hard_packets: int | None = None
    soft_seconds: int | None = None
    hard_seconds: int | None = None

    def __post_init__(self) -> None:
        for kind in ("bytes", "packets", "seconds"):
            soft, hard = getattr(self, f"soft_{kind}"), getattr(self, f"hard_{kind}")
            for name, v in ((f"soft_{kind}", soft), (f"hard_{kind}", hard)):
                if v is not None and (not isinstance(v, int) or v <= 0):
                    raise DataplaneInputError(f"lifetime {name} must be a positive integer or None, not {v!r}")
            if soft is not None and hard is not None and soft > hard:
                raise DataplaneInputError(f"lifetime soft_{kind} ({soft}) is above hard_{kind} ({hard})")


def _check_spi(name: str, spi: int) -> None:
    # RFC 4303 §2.1: SPIs 1-255 are reserved by IANA, 0 is for local use only.
    if not isinstance(spi, int) or not 256 <= spi <= 0xFFFFFFFF:
        raise DataplaneInputError(f"{name} {spi!r} is not a valid ESP SPI (256 to 0xffffffff, RFC 4303 §2.1)")


@dataclass(frozen=True)
class ChildSa:
    """One Child SA: a pair of ESP SAs in tunnel mode.

    spi_in: the SPI this side chose (the peer sends with it). spi_out: the peer's SPI.
    keys_in: keys of the peer -> us direction; keys_out: us -> peer (RFC 7296 §2.17: the
    initiator's outbound keys are SK_ei/SK_ai, the responder's are SK_er/SK_ar).
    esn: extended sequence numbers (RFC 4303 §2.2.1). replay_window: in packets, 0 turns replay
    protection off (not allowed with ESN).
    """

    spi_in: int
    spi_out: int
    algorithms: EspAlgorithms
    keys_in: SaKeys
    keys_out: SaKeys
    endpoints: Endpoints
    esn: bool = False
    replay_window: int = 64
    lifetime: Lifetime = field(default_factory=Lifetime)

    def __post_init__(self) -> None:
        _check_spi("spi_in", self.spi_in)
        _check_spi("spi_out", self.spi_out)
        if not isinstance(self.algorithms, EspAlgorithms):
            raise DataplaneInputError(f"algorithms must be an EspAlgorithms, not {type(self.algorithms).__name__}")
        self.algorithms.check_keys(self.keys_in, f"inbound SA {self.spi_in:#010x}")
        self.algorithms.check_keys(self.keys_out, f"outbound SA {self.spi_out:#010x}")
        if not isinstance(self.replay_window, int) or not 0 <= self.replay_window <= 4096:
            raise DataplaneInputError(f"replay_window {self.replay_window!r} must be 0-4096 packets")
        if self.esn and self.replay_window == 0:
            raise DataplaneInputError("ESN needs a replay window: replay_window must be 1-4096 with esn=True")


# --- the tunnel's interface ---------------------------------------------------------------------

#: The if_id values Isthmus owns. XFRM interfaces, SAs and policies with an if_id in this range are
#: ours: reconciliation adopts or removes them and never touches anything outside it.
IF_ID_MIN = 0x49000000
IF_ID_MAX = 0x49FFFFFF

_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


def derive_if_id(tunnel: str) -> int:
    """The default if_id of a tunnel: a function of its name only, so it survives restarts and
    rekeys without any state (24 bits of SHA-256 of the name inside the owned range)."""
    h = int.from_bytes(hashlib.sha256(tunnel.encode()).digest()[:4], "big")
    return IF_ID_MIN + h % (IF_ID_MAX - IF_ID_MIN + 1)


def check_unique_if_ids(tunnels: "list[TunnelInterface]") -> None:
    """Raise if two tunnels share an if_id or an interface name (a derived collision is possible,
    if unlikely: the fix is an explicit if_id in one tunnel's config)."""
    by_id: dict[int, str] = {}
    by_name: dict[str, str] = {}
    for t in tunnels:
        if t.if_id in by_id:
            raise DataplaneInputError(
                f"tunnels {by_id[t.if_id]!r} and {t.tunnel!r} both have if_id {t.if_id:#x}: set interface.if_id "
                f"for one of them (allowed {IF_ID_MIN:#x}-{IF_ID_MAX:#x})")
        if t.ifname in by_name:
            raise DataplaneInputError(
                f"tunnels {by_name[t.ifname]!r} and {t.tunnel!r} both use interface name {t.ifname!r}")
        by_id[t.if_id] = t.tunnel
        by_name[t.ifname] = t.tunnel


@dataclass(frozen=True)
class TunnelInterface:
    """A tunnel's XFRM interface, from config.

    tunnel: the tunnel's name (config key). ifname: the interface name (Linux: at most 15
    characters). if_id: kept for the tunnel's life; default :func:`derive_if_id`. addresses: the
    link addresses for BGP (e.g. a /30 in 169.254.0.0/16 and a /126). underlay: optional device
    the interface is tied to (``ip link ... type xfrm dev``). mtu / mss: overrides of the values
    the tunnel hook computes (None = computed; ``mss`` is the IPv4 MSS, IPv6 gets ``mss - 20``).
    """

    tunnel: str
    ifname: str
    if_id: int | None = None
    addresses: tuple[IPInterface, ...] = ()
    underlay: str | None = None
    mtu: int | None = None
    mss: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tunnel, str) or not self.tunnel or len(self.tunnel) > 64 \
                or any(c.isspace() or c in "\"'\\" for c in self.tunnel):
            raise DataplaneInputError(
                f"tunnel name {self.tunnel!r} is not allowed: 1-64 characters, no spaces or quotes")
        if not _IFNAME.match(self.ifname or ""):
            raise DataplaneInputError(
                f"tunnel {self.tunnel!r}: interface name {self.ifname!r} is not allowed: 1-15 characters "
                f"from A-Z a-z 0-9 _ . - (not starting with . _ -)")
        if self.if_id is None:
            object.__setattr__(self, "if_id", derive_if_id(self.tunnel))
        if not isinstance(self.if_id, int) or not IF_ID_MIN <= self.if_id <= IF_ID_MAX:
            raise DataplaneInputError(
                f"tunnel {self.tunnel!r}: if_id {self.if_id!r} is outside the range Isthmus owns "
                f"({IF_ID_MIN:#x}-{IF_ID_MAX:#x})")
        addrs = []
        for a in self.addresses:
            try:
                addrs.append(ipaddress.ip_interface(a))
            except ValueError:
                raise DataplaneInputError(
                    f"tunnel {self.tunnel!r}: interface address {a!r} is not an address/prefix") from None
        object.__setattr__(self, "addresses", tuple(addrs))
        has_v6 = any(a.version == 6 for a in addrs)
        if self.mtu is not None:
            low = 1280 if has_v6 else 576
            if not isinstance(self.mtu, int) or not low <= self.mtu <= 65535:
                raise DataplaneInputError(
                    f"tunnel {self.tunnel!r}: mtu {self.mtu!r} must be {low}-65535"
                    + (" (IPv6 needs at least 1280)" if has_v6 else ""))
        if self.mss is not None and (not isinstance(self.mss, int) or not 536 <= self.mss <= 65495):
            raise DataplaneInputError(f"tunnel {self.tunnel!r}: mss {self.mss!r} must be 536-65495")
