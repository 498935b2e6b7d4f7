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
DEFAULT_NAT_KEEPALIVE = 20   # seconds between NAT keepalives (RFC 3948 §2.3; strongSwan's default)
DEFAULT_DPD_TIMEOUT = 30
DEFAULT_DPD_ACTION = "restart"
DEFAULT_CONFIG_PATH = "/etc/isthmus/isthmus.yaml"
DEFAULT_HOLD_TIME = 30
DEFAULT_MAX_PATHS = 8
DEFAULT_MAX_PREFIX_RESTART_DELAY = 60
DEFAULT_GRACEFUL_RESTART_TIME = 120   # RFC 4724 restart time for graceful_restart: true (FRR's default)

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
    """Certificate authentication (RFC 7427 signatures): our certificate (optionally followed by
    the intermediates to send) + private key, the CA(s) that may sign the peer's chain, and the
    CRLs its chain is checked against. ``key_pem`` never shows in a repr."""

    certificate: Path
    key: Path
    ca: tuple[Path, ...]
    certificate_pem: bytes = field(repr=False)
    key_pem: Secret = field(repr=False)
    ca_pem: tuple[bytes, ...] = field(repr=False)
    crl: tuple[Path, ...] = ()
    crl_data: tuple[bytes, ...] = field(default=(), repr=False)


Auth = PskAuth | CertAuth


@dataclass(frozen=True)
class IkeSettings:
    """IKE SA settings: proposals in our order of preference (RFC 7296 §2.7), as written and parsed."""

    proposal_strings: tuple[str, ...]
    proposals: tuple[Proposal, ...] = field(repr=False, compare=False)  # determined by the strings
    lifetime: int = DEFAULT_IKE_LIFETIME          # seconds; rekey at lifetime - rekey_margin
    rekey_margin: int = DEFAULT_REKEY_MARGIN
    #: IKE fragmentation (RFC 7383), strongSwan's fragmentation=yes by default
    fragmentation: bool = True
    #: largest IP datagram of a fragment (None: the engine's default, 1280)
    fragment_size: int | None = None


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
    """The BGP neighbour reached over this tunnel's interface (route manager, bgp/).

    ``peer_address`` is the session's address (IPv4 in ``interface.address``, or IPv6 in
    ``interface.address6``); ``peer_address6`` adds IPv6 unicast over ``interface.address6``.
    ``graceful_restart`` is the restart time announced (RFC 4724 §3), 0 = off.
    """

    peer_as: int
    peer_address: IPAddress
    hold_time: int = DEFAULT_HOLD_TIME  # 0 (no keepalives) or 3..65535 s (RFC 4271 §4.2)
    import_policy: str | None = None
    export_policy: str | None = None
    peer_address6: IPv6Address | None = None
    graceful_restart: int = 0
    passive: bool = False               # only accept the peer's connection, never open one
    dampening: bool = False             # RFC 2439 with bgp.dampening's parameters

    @property
    def keepalive(self) -> int:
        """KEEPALIVE interval: one third of the hold time (RFC 4271 §10), 0 with hold time 0."""
        return self.hold_time // 3


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
    #: seconds between NAT keepalives from behind a NAT (0: none)
    nat_keepalive: int = DEFAULT_NAT_KEEPALIVE
    line: int = field(default=0, compare=False)  # where the tunnel starts in the file


@dataclass(frozen=True)
class PrefixMatch:
    """A prefix-list entry: ``prefix`` itself, or more specifics with ge <= length <= le."""

    prefix: IPNetwork
    ge: int | None = None
    le: int | None = None
    action: Literal["permit", "deny"] = "permit"


MaxPrefixAction = Literal["restart", "stop", "warn"]


@dataclass(frozen=True)
class MaxPrefix:
    """At most ``limit`` accepted prefixes from the neighbour; beyond it ``action``:
    warn (log, keep everything), stop (refuse the excess, keep the session), restart (session down,
    retried after ``restart_delay`` s)."""

    limit: int
    action: MaxPrefixAction = "restart"
    restart_delay: int = DEFAULT_MAX_PREFIX_RESTART_DELAY


@dataclass(frozen=True)
class AsPathFilter:
    """AS_PATH conditions: refuse a path holding any of ``deny``; with ``contains``, refuse a path
    holding none of them; refuse paths longer than ``max_length`` ASes."""

    contains: tuple[int, ...] = ()
    deny: tuple[int, ...] = ()
    max_length: int | None = None


@dataclass(frozen=True)
class Guards:
    """Import safety checks, all on by default; only an explicit ``false`` (or a longer
    ``max_length``) in a policy's ``guards:`` relaxes one (docs/bgp.md, "Guards")."""

    bogons: bool = True            # refuse martians / special-purpose prefixes
    default_route: bool = True     # refuse 0.0.0.0/0 and ::/0
    max_length: int = 24           # refuse IPv4 prefixes longer than this
    max_length6: int = 48          # refuse IPv6 prefixes longer than this
    own_prefixes: bool = True      # refuse our bgp.announce prefixes (and more specifics) coming back


@dataclass(frozen=True)
class BgpPolicy:
    """Import/export policy; the route manager (bgp/policy.py) applies it, docs/bgp.md.

    Communities are kept as written ('65001:100', '65001:1:2', 'no-export'); bgp/policy.py
    parses them. ``communities`` is the set action (added to the route), the ``match``/``deny``
    lists are conditions. ``prepend`` and ``transit`` apply on export; ``max_prefix`` and
    ``guards`` on import.
    """

    name: str
    prefixes: tuple[PrefixMatch, ...] = ()
    max_prefix: MaxPrefix | None = None
    local_pref: int | None = None
    med: int | None = None
    prepend: int = 0
    communities: tuple[str, ...] = ()
    as_path: AsPathFilter = AsPathFilter()
    match_communities: tuple[str, ...] = ()
    deny_communities: tuple[str, ...] = ()
    remove_communities: tuple[str, ...] = ()
    transit: tuple[str, ...] = ()   # tunnels whose learned routes this export policy re-exports
    guards: Guards = Guards()


@dataclass(frozen=True)
class Dampening:
    """RFC 2439 route flap dampening parameters (FRR's defaults); enabled per tunnel."""

    half_life: int = 15 * 60
    reuse: int = 750
    suppress: int = 2000
    max_suppress: int = 60 * 60


@dataclass(frozen=True)
class BgpSettings:
    asn: int
    router_id: IPv4Address | None
    announce: tuple[IPNetwork, ...] = ()
    policies: dict[str, BgpPolicy] = field(default_factory=dict)
    multipath: bool = True           # ECMP across tunnels when paths are equal (docs/bgp.md)
    max_paths: int = DEFAULT_MAX_PATHS
    dampening: Dampening = Dampening()
    #: A prefix both in a tunnel's static ``routes:`` and learned over BGP: the static route wins
    #: (true, the default) or the BGP route does.
    prefer_static: bool = True


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
