"""The validated configuration model: what the daemon gets from ``load_config``.

Every object is a frozen dataclass, so two loads of the same file compare equal and a reload
can tell unchanged tunnels (``old.tunnels[n] == new.tunnels[n]``) from changed ones.
Durations are whole seconds (``int``). Secrets are :class:`~appliance.config.secrets.Secret`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path
from typing import Literal

from appliance.config.secrets import Secret
from appliance.ike.policy import DosProtection
from appliance.ike.proposals import Proposal

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

# Defaults from the seed (docs/config.md, DESIGN.md "User-facing contract").
DEFAULT_IKE_PROPOSAL = "aes256gcm16-prfsha384-x25519"
DEFAULT_ESP_PROPOSAL = "aes256gcm16"
DEFAULT_IKE_LIFETIME = 24 * 3600
DEFAULT_ESP_LIFETIME = 3600
DEFAULT_REKEY_MARGIN = 9 * 60          # strongSwan's default margin before expiry
DEFAULT_DPD_INTERVAL = 10
DEFAULT_DPD_TIMEOUT = 30
DEFAULT_DPD_ACTION = "restart"
DEFAULT_CONFIG_PATH = "/etc/isthmus/isthmus.yaml"

NatTraversal = Literal["auto", "force", "off"]
DpdAction = Literal["restart", "clear", "none"]
PeerProfile = Literal["aws", "azure", "gcp"]
IdentityType = Literal["ipv4", "ipv6", "fqdn", "rfc822", "keyid", "dn"]


@dataclass(frozen=True)
class Identity:
    """An IKE identity (ID payload, RFC 7296 §3.5) as written in the config.

    ``kind`` maps to the ID Type: ipv4 -> ID_IPV4_ADDR, ipv6 -> ID_IPV6_ADDR, fqdn -> ID_FQDN,
    rfc822 -> ID_RFC822_ADDR, keyid -> ID_KEY_ID, dn -> ID_DER_ASN1_DN. ``value`` is the text
    (without the ``@`` / ``keyid:`` prefixes).
    """

    kind: IdentityType
    value: str

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PskAuth:
    """Pre-shared key authentication (RFC 7296 §2.15). ``psk`` never shows in a repr."""

    psk_file: Path
    psk: Secret = field(repr=False, compare=True)


@dataclass(frozen=True)
class CertAuth:
    """Certificate authentication: our certificate + private key, and the CA that signs the peer's."""

    certificate: Path
    key: Path
    ca: Path
    certificate_pem: bytes = field(repr=False)
    key_pem: Secret = field(repr=False)
    ca_pem: bytes = field(repr=False)


Auth = PskAuth | CertAuth


@dataclass(frozen=True)
class IkeSettings:
    """IKE SA settings: proposals in our order of preference (RFC 7296 §2.7), as written and parsed."""

    proposal_strings: tuple[str, ...]
    proposals: tuple[Proposal, ...] = field(repr=False, compare=False)  # determined by the strings
    lifetime: int = DEFAULT_IKE_LIFETIME          # seconds; rekey at lifetime - rekey_margin
    rekey_margin: int = DEFAULT_REKEY_MARGIN


@dataclass(frozen=True)
class EspSettings:
    """Child SA (ESP) settings; a KE method in the proposal means PFS on rekey (RFC 7296 §1.3.1)."""

    proposal_strings: tuple[str, ...]
    proposals: tuple[Proposal, ...] = field(repr=False, compare=False)
    lifetime: int = DEFAULT_ESP_LIFETIME
    rekey_margin: int = DEFAULT_REKEY_MARGIN


@dataclass(frozen=True)
class DpdSettings:
    """Liveness check (RFC 7296 §2.4): probe after ``interval`` s idle; dead after ``timeout`` s."""

    interval: int = DEFAULT_DPD_INTERVAL
    timeout: int = DEFAULT_DPD_TIMEOUT
    action: DpdAction = DEFAULT_DPD_ACTION


@dataclass(frozen=True)
class InterfaceSettings:
    """The tunnel's XFRM interface.

    ``mtu`` None means auto (the tunnel hook derives it from the negotiated transform and
    ``outer_mtu``, or the underlay's MTU when ``outer_mtu`` is None).
    """

    name: str
    if_id: int
    address: IPv4Interface | None = None
    address6: IPv6Interface | None = None
    mtu: int | None = None
    outer_mtu: int | None = None


@dataclass(frozen=True)
class TunnelBgp:
    """The BGP neighbour reached over this tunnel's interface (route manager, bgp/)."""

    peer_as: int
    peer_address: IPAddress
    hold_time: int = 30
    import_policy: str | None = None
    export_policy: str | None = None


@dataclass(frozen=True)
class Tunnel:
    """One route-based tunnel: an IKE SA to ``remote`` and its Child SA on an XFRM interface."""

    name: str
    remote: IPAddress
    local: IPAddress | None
    local_id: Identity | None        # None: our IP address as used on the wire
    remote_id: Identity              # default: the remote address
    auth: Auth
    ike: IkeSettings
    esp: EspSettings
    dpd: DpdSettings
    nat_traversal: NatTraversal
    mobike: bool
    start: bool
    interface: InterfaceSettings
    bgp: TunnelBgp | None
    peer_profile: PeerProfile | None
    #: Prefixes reached over this tunnel without BGP: routes on the tunnel's interface while its
    #: Child SA is up, withdrawn the moment it goes down.
    routes: tuple[IPNetwork, ...] = ()
    line: int = field(default=0, compare=False)  # where the tunnel starts in the file


@dataclass(frozen=True)
class PrefixMatch:
    """A prefix-list entry: ``prefix`` itself, or more specifics with ge <= length <= le."""

    prefix: IPNetwork
    ge: int | None = None
    le: int | None = None
    action: Literal["permit", "deny"] = "permit"


@dataclass(frozen=True)
class MaxPrefix:
    limit: int
    action: Literal["restart", "stop", "warn"] = "restart"


@dataclass(frozen=True)
class BgpPolicy:
    """Import/export policy, validated structurally only (the route manager applies it)."""

    name: str
    prefixes: tuple[PrefixMatch, ...] = ()
    max_prefix: MaxPrefix | None = None
    local_pref: int | None = None
    med: int | None = None
    prepend: int = 0
    communities: tuple[str, ...] = ()


@dataclass(frozen=True)
class BgpSettings:
    asn: int
    router_id: IPv4Address | None
    announce: tuple[IPNetwork, ...] = ()
    policies: dict[str, BgpPolicy] = field(default_factory=dict)


@dataclass(frozen=True)
class ApplianceSettings:
    name: str | None = None
    router_id: IPv4Address | None = None
    #: On a clean shutdown (SIGTERM) delete every SA (DELETE to the peers) and remove the kernel
    #: state; false leaves the kernel's SAs carrying traffic until the next start reconciles them.
    delete_on_shutdown: bool = True
    #: What unauthenticated IKE_SA_INIT requests may cost (half-open limits, COOKIEs, §2.6).
    dos_protection: DosProtection = field(default_factory=DosProtection)


@dataclass(frozen=True)
class Config:
    """A whole validated configuration file."""

    path: Path
    appliance: ApplianceSettings
    tunnels: dict[str, Tunnel]
    bgp: BgpSettings | None
