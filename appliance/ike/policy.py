"""What one tunnel asks of the IKE engine: plain dataclasses the config layer fills in.

`TunnelConfig` is the engine's whole view of a tunnel; the YAML model (appliance/config)
maps onto it. Lifetimes follow the config model: an SA lives `*_lifetime` seconds and is
rekeyed `*_rekey_margin` seconds before that, minus a random extra of up to
`rekey_jitter` x margin so two peers rarely rekey at once (strongSwan's rand_time idea).
Defaults: IKE SA 24 h, Child SA 1 h, margin 9 min.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from appliance.ike.constants import IdType
from appliance.ike.proposals import Proposal, parse_proposals

if TYPE_CHECKING:
    from appliance.ike.certificates import CertCredentials

DpdAction = Literal["clear", "restart", "hold", "none"]


class PolicyError(ValueError):
    """A tunnel setting the engine cannot use; the message says which and what is allowed."""


@dataclass(frozen=True, eq=False)
class Identity:
    """An IKE identity (RFC 7296 §3.5): ID Type and Identification Data. Two DNs are equal
    when their attributes and values are, whatever string types encode them."""

    id_type: int
    data: bytes

    def _key(self) -> tuple:
        if self.id_type == IdType.ID_DER_ASN1_DN:
            try:
                return (self.id_type, dn_rdns(self.data))
            except ValueError:
                pass
        if self.id_type in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
            return (self.id_type, self.data.lower())   # DNS names are case-insensitive
        return (self.id_type, self.data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @classmethod
    def parse(cls, text: str) -> "Identity":
        """strongSwan-style identity text.

        `192.0.2.1` / `2001:db8::1` → ID_IPV4_ADDR / ID_IPV6_ADDR; `C=CH, O=Org, CN=gw` →
        ID_DER_ASN1_DN; `user@example.net` → ID_RFC822_ADDR; `gw.example.net` or `@gw` →
        ID_FQDN. A prefix forces the type: `fqdn:`, `email:`/`rfc822:`, `ipv4:`, `ipv6:`,
        `dn:`.
        """
        t = text.strip()
        if not t:
            raise PolicyError("empty identity; give an FQDN, an e-mail address, an IP "
                              "address or a DN")
        prefix, _, rest = t.partition(":")
        forced = prefix.lower()
        if rest and forced in ("fqdn", "email", "rfc822", "ipv4", "ipv6", "dn", "keyid"):
            if forced == "keyid":
                # strongSwan: keyid:#hex for binary key IDs, keyid:text otherwise
                if rest.startswith("#"):
                    try:
                        return cls(IdType.ID_KEY_ID, bytes.fromhex(rest[1:]))
                    except ValueError:
                        raise PolicyError(f"identity {text!r}: bad hex after keyid:#") from None
                return cls(IdType.ID_KEY_ID, rest.encode())
            if forced == "fqdn":
                return cls(IdType.ID_FQDN, rest.encode())
            if forced in ("email", "rfc822"):
                return cls(IdType.ID_RFC822_ADDR, rest.encode())
            if forced in ("ipv4", "ipv6"):
                try:
                    ip = ipaddress.ip_address(rest)
                except ValueError:
                    raise PolicyError(f"identity {text!r}: {rest!r} is not an IP address") from None
                if (ip.version == 4) != (forced == "ipv4"):
                    raise PolicyError(f"identity {text!r}: address family does not match {forced}")
                return cls.parse(rest)
            return cls(IdType.ID_DER_ASN1_DN, _dn_der(rest, text))
        try:
            ip = ipaddress.ip_address(t)
        except ValueError:
            pass
        else:
            return cls(IdType.ID_IPV4_ADDR if ip.version == 4 else IdType.ID_IPV6_ADDR, ip.packed)
        if "=" in t:
            return cls(IdType.ID_DER_ASN1_DN, _dn_der(t, text))
        if t.startswith("@"):
            return cls(IdType.ID_FQDN, t[1:].encode())
        if "@" in t:
            return cls(IdType.ID_RFC822_ADDR, t.encode())
        return cls(IdType.ID_FQDN, t.encode())

    @classmethod
    def from_config(cls, kind: str, value: str) -> "Identity":
        """From the config model's (kind, value): kind is ipv4, ipv6, fqdn, rfc822, keyid or dn."""
        prefix = {"ipv4": "ipv4", "ipv6": "ipv6", "fqdn": "fqdn", "rfc822": "rfc822",
                  "keyid": "keyid", "dn": "dn"}.get(kind)
        if prefix is None:
            raise PolicyError(f"identity kind {kind!r}: use ipv4, ipv6, fqdn, rfc822, keyid or dn")
        return cls.parse(f"{prefix}:{value}")

    def __str__(self) -> str:
        # a peer's identity reaches log lines before it is authenticated: escape it there
        return printable(self._text())

    def _text(self) -> str:
        if self.id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR) and len(self.data) in (4, 16):
            return str(ipaddress.ip_address(self.data))
        if self.id_type in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
            return self.data.decode("utf-8", "replace")
        if self.id_type == IdType.ID_DER_ASN1_DN:
            return _dn_text(self.data)
        if self.id_type == IdType.ID_KEY_ID:
            return "keyid:#" + self.data.hex()
        return f"{self.id_type}:{self.data.hex()}"


def printable(text: str) -> str:
    """Peer-controlled text made safe for a log line: every character that is not printable
    (control characters such as newline or ESC, NUL, line separators, bidi overrides) becomes
    "?", as strongSwan prints them; so a peer cannot forge or garble log lines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


def _dn_der(dn: str, original: str) -> bytes:
    """strongSwan writes DNs most-significant RDN first ("C=CH, O=Org, CN=gw"); RFC 4514
    strings are the other way round."""
    from cryptography import x509

    parts = [p.strip() for p in re.split(r"(?<!\\),", dn) if p.strip()]
    try:
        name = x509.Name.from_rfc4514_string(",".join(reversed(parts)))
        return name.public_bytes()
    except Exception as e:  # cryptography raises ValueError and friends
        raise PolicyError(f"identity {original!r} is not a distinguished name: {e}") from None


_DN_NAMES = {"2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O",
             "2.5.4.11": "OU", "2.5.4.5": "serialNumber", "1.2.840.113549.1.9.1": "E",
             "0.9.2342.19200300.100.1.25": "DC", "2.5.4.4": "SN", "2.5.4.42": "G"}


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """Top-level DER TLVs of `data` (definite lengths only); raises ValueError."""
    out = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise ValueError("truncated DER")
        tag, ln = data[pos], data[pos + 1]
        pos += 2
        if ln & 0x80:
            n = ln & 0x7F
            if n == 0 or n > 4 or pos + n > len(data):
                raise ValueError("bad DER length")
            ln = int.from_bytes(data[pos:pos + n], "big")
            pos += n
        if pos + ln > len(data):
            raise ValueError("DER value overruns")
        out.append((tag, data[pos:pos + ln]))
        pos += ln
    return out


def _oid(b: bytes) -> str:
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


def dn_rdns(der: bytes) -> tuple[tuple[str, str], ...]:
    """The (attribute, value) pairs of a DER Name, most significant first; raises ValueError."""
    (top,) = _der_items(der)
    if top[0] != 0x30:
        raise ValueError("a Name is a SEQUENCE")
    out = []
    for tag, rdn in _der_items(top[1]):
        if tag != 0x31:
            raise ValueError("an RDN is a SET")
        for t2, atv in _der_items(rdn):
            items = _der_items(atv)
            if t2 != 0x30 or len(items) != 2 or items[0][0] != 0x06:
                raise ValueError("bad AttributeTypeAndValue")
            oid = _oid(items[0][1])
            value = items[1][1].decode("utf-16-be" if items[1][0] == 0x1E else "utf-8", "replace")
            out.append((_DN_NAMES.get(oid, oid), value))
    return tuple(out)


def _dn_text(der: bytes) -> str:
    """strongSwan-style text ("C=CH, O=Org, CN=gw") of a DER Name, or its hex if unreadable."""
    try:
        return ", ".join(f"{k}={v}" for k, v in dn_rdns(der))
    except ValueError:
        return "dn:#" + der.hex()


@dataclass(frozen=True)
class DpdConfig:
    """Liveness checks (RFC 7296 §2.4): after `interval` seconds without hearing from the
    peer, send an empty INFORMATIONAL request; if nothing answers within `timeout` seconds the
    peer is dead and `action` follows: restart (drop the SAs and initiate again), clear or none
    (drop the SAs, no automatic re-initiation), hold (drop the SAs and wait for the peer or an
    explicit connect; the daemon may keep the interface). The engine treats clear, none and
    hold alike; the distinction is the daemon's."""

    interval: float = 30.0
    timeout: float = 150.0
    action: DpdAction = "restart"

    def __post_init__(self) -> None:
        if self.interval < 0 or self.timeout <= 0:
            raise PolicyError("dpd interval must be >= 0 (0 disables) and timeout > 0 seconds")
        if self.action not in ("clear", "restart", "hold", "none"):
            raise PolicyError(f"dpd action {self.action!r}: use restart, clear, hold or none")


@dataclass(frozen=True)
class FragmentationConfig:
    """IKE fragmentation (RFC 7383), as strongSwan's `fragmentation = yes` by default.

    `enabled`: announce IKEV2_FRAGMENTATION_SUPPORTED in IKE_SA_INIT and, when the peer does
    too, send a protected message (IKE_AUTH and later) that would exceed the fragment size as
    Encrypted Fragment payloads; False: announce nothing and never fragment (a peer's fragments
    are then dropped: support was not announced). A responder announces per its first candidate
    tunnel (the tunnel is known only in IKE_AUTH) and sends fragments per the chosen one.
    `size_ipv4` / `size_ipv6`: the largest IP datagram (IP and UDP headers and the non-ESP
    marker included) a fragment may make, per address family of the SA. RFC 7383 §2.5.1
    suggests 576 (IPv4) and 1280 (IPv6) when nothing is known about the path; strongSwan's
    charon.fragment_size default is 1280 for both, and so is ours. Reassembly limits (§2.6):
    at most `max_fragments` fragments and `max_message` octets of reassembled plaintext per
    message, a half-finished set dropped after `reassembly_timeout` seconds. Anyone can open a
    half-open IKE SA and so knows its keys: `max_message` (16 KiB, more than a 3-level RSA-4096
    chain; strongSwan's charon.max_packet is 10000) times the half-open cap bounds what
    fragments can hold before any authentication."""

    enabled: bool = True
    size_ipv4: int = 1280
    size_ipv6: int = 1280
    max_fragments: int = 64
    max_message: int = 16384
    reassembly_timeout: float = 30.0

    #: smallest fragment size: room for the IP/UDP/IKE/SKF headers, an IV, an ICV and content
    MIN_SIZE = 256

    def __post_init__(self) -> None:
        for what, v in (("size_ipv4", self.size_ipv4), ("size_ipv6", self.size_ipv6)):
            if not isinstance(v, int) or not self.MIN_SIZE <= v <= 65535:
                raise PolicyError(f"fragmentation {what} {v!r}: allowed {self.MIN_SIZE}..65535 "
                                  "octets (the whole IP datagram)")
        if not 1 <= self.max_fragments <= 65535:
            raise PolicyError("fragmentation max_fragments: allowed 1..65535")
        if not 1 <= self.max_message <= 16 * 65535:
            raise PolicyError("fragmentation max_message: allowed 1..1048560 octets")
        if self.reassembly_timeout <= 0:
            raise PolicyError("fragmentation reassembly_timeout must be > 0 seconds")

    def size_for(self, address: str) -> int:
        """The fragment size for an SA whose peer is at `address`."""
        return self.size_ipv6 if ":" in address else self.size_ipv4


@dataclass(frozen=True)
class RetransmitConfig:
    """Request retransmission (RFC 7296 §2.1): first after `timeout` s, then multiplied by
    `base` each time; after `tries` retransmissions and one more wait, give up."""

    timeout: float = 4.0
    base: float = 1.8
    tries: int = 5

    def schedule(self) -> list[float]:
        """Delays (relative to the previous send) of each retransmission, then the give-up wait."""
        return [self.timeout * self.base ** n for n in range(self.tries + 1)]


@dataclass(frozen=True)
class DosProtection:
    """Limits on what unauthenticated IKE_SA_INIT requests may cost a responder (engine-wide;
    RFC 7296 §2.6, strongSwan's charon.cookie_threshold / block_threshold /
    init_limit_half_open). A half-open IKE SA is a responder SA whose IKE_AUTH has not
    completed. Requests over a limit are dropped before any key exchange is computed.

    `half_open_max`: half-open SAs in all (None: no cap). `half_open_per_source`: half-open SAs
    from one source address (None: no cap). `cookie_threshold`: from this many half-open SAs
    on, an IKE_SA_INIT must carry a valid COOKIE (§2.6) or is answered with one and no state
    (0: always, None: never). Cookies are verified without state from a secret replaced every
    `cookie_secret_lifetime` seconds (the previous one is still accepted). `max_init_request`:
    a larger IKE_SA_INIT request (octets) is dropped, which bounds what a half-open SA keeps
    (the request is RealMessage1 of the AUTH computation, §2.15). `invalid_ike_spi_rate`:
    encrypted requests for unknown IKE SPIs answered with INVALID_IKE_SPI (§1.5) per second,
    engine-wide (None: never answered)."""

    half_open_max: int | None = 1000
    half_open_per_source: int | None = 10
    cookie_threshold: int | None = 30
    cookie_secret_lifetime: float = 120.0
    max_init_request: int = 10000
    invalid_ike_spi_rate: float | None = 10.0

    def __post_init__(self) -> None:
        for name in ("half_open_max", "half_open_per_source", "cookie_threshold"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise PolicyError(f"dos protection: {name} must be a whole number >= 0 or None")
        if not self.cookie_secret_lifetime > 0:
            raise PolicyError("dos protection: cookie_secret_lifetime must be > 0 seconds")
        if not isinstance(self.max_init_request, int) or self.max_init_request < 1000:
            raise PolicyError("dos protection: max_init_request must be at least 1000 octets")
        r = self.invalid_ike_spi_rate
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0):
            raise PolicyError("dos protection: invalid_ike_spi_rate must be > 0 per second or None")


@functools.lru_cache(maxsize=4096)
def _network(v: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(v, strict=False)


def _nets(values: tuple[str, ...], what: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for v in values:
        try:
            out.append(_network(v) if isinstance(v, str) else ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise PolicyError(f"{what} {v!r} is not a network (e.g. 0.0.0.0/0, ::/0, 10.0.0.0/8)") from None
    return tuple(out)


NAT_TRAVERSAL = ("auto", "force", "off")


@dataclass(frozen=True)
class TunnelConfig:
    """Everything the engine needs for one tunnel (one IKE SA with one route-based Child SA).

    Addresses are IP address strings; `remote_addr=None` accepts the peer from any address
    (responder only). `psk` is the pre-shared key (never shown in repr). Proposals are
    proposals.Proposal lists in preference order; `ike_proposals` carry the key exchange
    method for IKE_SA_INIT, an ESP proposal with a DH transform asks for PFS on rekeys.
    `*_lifetime` is how long an SA lives (its hard lifetime); it is rekeyed `*_rekey_margin`
    seconds before, minus up to `rekey_jitter` x margin at random.
    Traffic selectors default to everything (0.0.0.0/0 and ::/0 both ways): the route-based
    tunnel decides by routing into the XFRM interface with `if_id`.
    """

    name: str
    local_addr: str | None
    remote_addr: str | None
    local_id: Identity
    remote_id: Identity | None
    psk: bytes = field(default=b"", repr=False)
    ike_proposals: tuple[Proposal, ...] = ()
    esp_proposals: tuple[Proposal, ...] = ()
    if_id: int = 0
    start: bool = True
    local_port: int = 500
    remote_port: int = 500
    ike_lifetime: float = 24 * 3600.0
    ike_rekey_margin: float = 540.0
    child_lifetime: float = 3600.0
    child_rekey_margin: float = 540.0
    rekey_jitter: float = 1.0
    dpd: DpdConfig = field(default_factory=DpdConfig)
    retransmit: RetransmitConfig = field(default_factory=RetransmitConfig)
    half_open_timeout: float = 30.0
    reconnect_delay: float = 5.0
    reconnect_max_delay: float = 300.0
    local_ts: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    remote_ts: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    #: One IKE SA per tunnel (duplicates from crossing initiations are resolved, INITIAL_CONTACT
    #: replaces older SAs). False accepts any number of IKE SAs for the tunnel (a responder for
    #: many initiators with the same identity, as strongSwan's unique=never; the benchmark).
    unique: bool = True
    #: Certificate authentication (RFC 7427 signatures, certificates.CertCredentials) instead
    #: of the PSK; None: PSK.
    cert: "CertCredentials | None" = None
    #: IKE fragmentation (RFC 7383): negotiation, fragment sizes, reassembly limits.
    fragmentation: FragmentationConfig = field(default_factory=FragmentationConfig)
    #: NAT traversal (RFC 7296 §2.23, RFC 3948, natd.py): "auto" detects NATs with the
    #: NAT_DETECTION_*_IP notifies and moves to port 4500 with UDP-encapsulated ESP when one is
    #: found; "force" sends a fake NAT_DETECTION_SOURCE_IP hash (strongSwan's encap=yes) so
    #: both sides encapsulate without a NAT; "off" sends no NAT detection and never floats.
    nat_traversal: str = "auto"
    #: Seconds between NAT keepalives (RFC 3948 §2.3) from the side behind a NAT while nothing
    #: else was sent to the peer; 0 sends none.
    nat_keepalive: float = 20.0
    #: MOBIKE (RFC 4555, mobike.py): announce MOBIKE_SUPPORTED in IKE_AUTH; an IKE SA we
    #: initiated then follows our address changes with UPDATE_SA_ADDRESSES (no rekey).
    mobike: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise PolicyError("a tunnel needs a name")
        if self.cert is None and not self.psk:
            raise PolicyError(f"tunnel {self.name}: empty pre-shared key")
        if self.cert is not None and self.psk:
            raise PolicyError(f"tunnel {self.name}: use a pre-shared key or a certificate, not both")
        if not self.ike_proposals:
            object.__setattr__(self, "ike_proposals", tuple(parse_proposals("aes256gcm16-prfsha384-x25519", "ike")))
        if not self.esp_proposals:
            object.__setattr__(self, "esp_proposals", tuple(parse_proposals("aes256gcm16", "esp")))
        if not 0 <= self.rekey_jitter <= 1:
            raise PolicyError(f"tunnel {self.name}: rekey_jitter is a fraction of the margin in [0, 1]")
        for what, life, margin in (("ike", self.ike_lifetime, self.ike_rekey_margin),
                                   ("esp", self.child_lifetime, self.child_rekey_margin)):
            if life <= 0 or margin <= 0 or margin * (1 + self.rekey_jitter) >= life:
                raise PolicyError(f"tunnel {self.name}: {what} lifetime {life:g} s and rekey margin "
                                  f"{margin:g} s: need 0 < margin x (1 + jitter {self.rekey_jitter:g}) "
                                  "< lifetime")
        if not 0 <= self.if_id < 2**32:
            raise PolicyError(f"tunnel {self.name}: if_id must fit 32 bits")
        if self.nat_traversal not in NAT_TRAVERSAL:
            raise PolicyError(f"tunnel {self.name}: nat_traversal {self.nat_traversal!r}: use "
                              f"{', '.join(NAT_TRAVERSAL)}")
        if not (self.nat_keepalive == 0 or 1 <= self.nat_keepalive <= 3600):
            raise PolicyError(f"tunnel {self.name}: nat_keepalive {self.nat_keepalive!r} s: use 0 (none) "
                              "or 1..3600 seconds")
        for a in (self.local_addr, self.remote_addr):
            if a is not None:
                try:
                    ipaddress.ip_address(a)
                except ValueError:
                    raise PolicyError(f"tunnel {self.name}: {a!r} is not an IP address") from None
        if self.start and (self.remote_addr is None or self.local_addr is None):
            raise PolicyError(f"tunnel {self.name}: an initiating tunnel needs local_addr and "
                              "remote_addr (NAT detection hashes the local address)")
        _nets(self.local_ts, f"tunnel {self.name}: local_ts")
        _nets(self.remote_ts, f"tunnel {self.name}: remote_ts")

    @functools.cached_property
    def local_nets(self):
        return _nets(self.local_ts, "local_ts")

    @functools.cached_property
    def remote_nets(self):
        return _nets(self.remote_ts, "remote_ts")
