"""Turn a marked YAML tree into the typed model, collecting every problem on the way.

Each field is read through a converter; a converter raises :class:`Bad` with a message that says
what is allowed, and the validator turns it into an :class:`Issue` at the line of the value.
Validation continues after a problem so that one run reports all of them.
"""

from __future__ import annotations

import dataclasses

import difflib
import re
from collections.abc import Callable, Iterable
import functools
import ipaddress
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path
from typing import Any

from appliance.config import presets as presets_mod
from appliance.config.errors import Issue
from appliance.config.model import (DEFAULT_DPD_ACTION, DEFAULT_DPD_INTERVAL, DEFAULT_DPD_TIMEOUT,
                                    DEFAULT_ESP_LIFETIME, DEFAULT_ESP_PROPOSAL, DEFAULT_GRACEFUL_RESTART_TIME,
                                    DEFAULT_HOLD_TIME, DEFAULT_IKE_LIFETIME, DEFAULT_IKE_PROPOSAL,
                                    DEFAULT_MAX_PATHS, DEFAULT_MAX_PREFIX_RESTART_DELAY, DEFAULT_NAT_KEEPALIVE,
                                    DEFAULT_REKEY_MARGIN,
                                    ApplianceSettings, AsPathFilter, BgpPolicy, BgpSettings, CertAuth, Config,
                                    Dampening, DpdSettings, EspSettings, Guards, Identity, IkeSettings,
                                    InterfaceSettings, MaxPrefix, PrefixMatch, PskAuth, Tunnel, TunnelBgp)
from appliance.config.secrets import SecretFileError, read_secret_file
from appliance.ike.policy import DosProtection
from appliance.config.yamlmarks import DuplicateKey, MarkedMap, MarkedSeq
from appliance.xfrm.model import IF_ID_MAX, IF_ID_MIN, derive_if_id

# Addresses and networks are immutable: a 1,000-tunnel config spells the same few (0.0.0.0/0,
# the peer, our address) a thousand times, and under TCG each parse costs (issue 13, start-up).
ip_address = functools.lru_cache(maxsize=8192)(ipaddress.ip_address)
ip_interface = functools.lru_cache(maxsize=8192)(ipaddress.ip_interface)
ip_network = functools.lru_cache(maxsize=8192)(ipaddress.ip_network)

ProposalParser = Callable[[str, str], Any]

INSIDE_SUPERNET = IPv4Network("169.254.0.0/16")
IFNAMSIZ = 16  # Linux: names up to 15 characters plus NUL
_TUNNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_MISSING = object()

TOP_KEYS = ("appliance", "tunnels", "bgp")
APPLIANCE_KEYS = ("name", "router_id", "delete_on_shutdown", "dos_protection")
DOS_KEYS = ("half_open_max", "half_open_per_source", "cookie_threshold", "max_init_request", "invalid_ike_spi_rate")
TUNNEL_KEYS = ("remote", "local", "local_id", "remote_id", "auth", "ike", "esp", "dpd", "nat_traversal",
               "nat_keepalive", "mobike", "start", "interface", "bgp", "peer_profile", "routes")
AUTH_KEYS = ("psk_file", "certificate", "key", "ca", "crl")
SA_KEYS = ("proposals", "lifetime", "rekey_margin")
IKE_KEYS = SA_KEYS + ("fragmentation", "fragment_size")   # RFC 7383
DPD_KEYS = ("interval", "timeout", "action")
INTERFACE_KEYS = ("name", "if_id", "address", "address6", "mtu", "outer_mtu")
TUNNEL_BGP_KEYS = ("peer_as", "peer_address", "peer_address6", "hold_time", "import", "export",
                   "graceful_restart", "passive", "dampening")
BGP_KEYS = ("asn", "router_id", "announce", "policies", "multipath", "max_paths", "dampening", "prefer_static")
POLICY_KEYS = ("prefixes", "max_prefix", "local_pref", "med", "prepend", "communities", "as_path",
               "match_communities", "deny_communities", "remove_communities", "transit", "guards")
PREFIX_KEYS = ("prefix", "ge", "le", "action")
MAX_PREFIX_KEYS = ("limit", "action", "restart_delay")
AS_PATH_KEYS = ("contains", "deny", "max_length")
GUARD_KEYS = ("bogons", "default_route", "max_length", "max_length6", "own_prefixes")
DAMPENING_KEYS = ("half_life", "reuse", "suppress", "max_suppress")
#: Keys that only mean something in one direction (checked against how tunnels use the policy).
EXPORT_ONLY_POLICY_KEYS = ("prepend", "transit")
IMPORT_ONLY_POLICY_KEYS = ("max_prefix", "guards")
WELL_KNOWN_COMMUNITIES = ("no-export", "no-advertise", "no-export-subconfed", "no-peer", "blackhole",
                          "graceful-shutdown")


class Bad(Exception):
    """A value is not acceptable; the message says what is allowed."""


# ----------------------------------------------------------------------------------------------
# converters (value -> typed value, or raise Bad)

def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise Bad(f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise Bad("must not be empty")
    return value


def to_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Bad(f"expected true or false, got {_type_name(value)}")
    return value


def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Bad(f"expected a whole number {lo}..{hi}, got {_type_name(value)}")
        if not lo <= value <= hi:
            raise Bad(f"{value} is out of range; allowed: {lo}..{hi}")
        return value
    return conv


def to_if_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Bad(f"expected a whole number, got {_type_name(value)}")
    if not IF_ID_MIN <= value <= IF_ID_MAX:
        raise Bad(f"{value:#x} is outside the if_id range Isthmus owns ({IF_ID_MIN:#x}-{IF_ID_MAX:#x}); "
                  "leave it out to derive one from the tunnel name")
    return value


def parse_duration(value: Any) -> int:
    """``24h``, ``30s``, ``1h30m``, ``2d``, or a whole number of seconds -> seconds."""
    if isinstance(value, bool):
        raise Bad("expected a duration like 30s, 10m, 1h30m or 24h, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise Bad("a duration cannot be negative")
        return value
    if not isinstance(value, str):
        raise Bad(f"expected a duration like 30s, 10m, 1h30m or 24h, got {_type_name(value)}")
    text = value.strip().replace(" ", "")
    m = _DURATION.match(text)
    if not text or m is None or not any(m.groups()):
        raise Bad(f"'{value}' is not a duration; write e.g. 30s, 10m, 1h30m, 24h or 2d "
                  f"(units d, h, m, s in that order)")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def duration_range(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        seconds = parse_duration(value)
        if seconds < lo or (hi is not None and seconds > hi):
            allowed = f"at least {_human(lo)}" if hi is None else f"{_human(lo)}..{_human(hi)}"
            raise Bad(f"{_human(seconds)} is out of range; allowed: {allowed}")
        return seconds
    return conv


def _human(seconds: int) -> str:
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def _keepalive_interval(value: Any) -> int:
    """nat_keepalive: 0 (none) or 1s..1h."""
    seconds = parse_duration(value)
    if seconds != 0 and not 1 <= seconds <= 3600:
        raise Bad(f"{_human(seconds)} is out of range; allowed: 0 (no keepalives) or 1s..1h")
    return seconds


def choice(*options: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            value = {True: "on", False: "off"}[value]
        if not isinstance(value, str) or value not in options:
            shown = f"'{value}'" if isinstance(value, (str, int)) else _type_name(value)
            raise Bad(f"{shown} is not allowed; allowed: {', '.join(options)}")
        return value
    return conv


def to_ip(value: Any) -> IPv4Address | IPv6Address:
    if not isinstance(value, str):
        raise Bad(f"expected an IPv4 or IPv6 address, got {_type_name(value)}")
    try:
        return ip_address(value.strip())
    except ValueError:
        raise Bad(f"'{value}' is not an IPv4 or IPv6 address") from None


def to_ipv4(value: Any) -> IPv4Address:
    if not isinstance(value, str):
        raise Bad(f"expected an IPv4 address, got {_type_name(value)}")
    try:
        return IPv4Address(value.strip())
    except ValueError:
        raise Bad(f"'{value}' is not an IPv4 address") from None


def to_network(value: Any) -> IPv4Network | IPv6Network:
    if not isinstance(value, str):
        raise Bad(f"expected a prefix like 10.1.0.0/16, got {_type_name(value)}")
    try:
        return ip_network(value.strip(), strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ip_network(value.strip(), strict=False)
            raise Bad(f"'{value}' has host bits set; did you mean {fixed}?") from None
        raise Bad(f"'{value}' is not a prefix like 10.1.0.0/16 or 2001:db8::/32") from None


def to_inside_v4(value: Any) -> IPv4Interface:
    """An IPv4 address with prefix length (the range rules are in :func:`inside_v4_problems`)."""
    if not isinstance(value, str):
        raise Bad(f"expected an address with prefix length like 169.254.21.1/30, got {_type_name(value)}")
    try:
        iface = ip_interface(value.strip())
    except ValueError:
        raise Bad(f"'{value}' is not an address with prefix length like 169.254.21.1/30") from None
    if not isinstance(iface, IPv4Interface) or "/" not in value:
        raise Bad(f"'{value}': expected an IPv4 address with prefix length like 169.254.21.1/30")
    return iface


def inside_v4_problems(iface: IPv4Interface, range_rules: bool = True) -> list[str]:
    """The tunnel's inside IPv4 address: a /30 or /31 in 169.254.0.0/16 (link-local), a host address.

    ``range_rules`` False leaves prefix length and range to a cloud preset's stricter rules.
    """
    net = iface.network
    problems = []
    if range_rules and net.prefixlen not in (30, 31):
        problems.append(f"inside network {net} is a /{net.prefixlen}; allowed: /30 or /31 in 169.254.0.0/16")
    elif range_rules and not net.subnet_of(INSIDE_SUPERNET):
        problems.append(f"inside network {net} is not in 169.254.0.0/16 (link-local); allowed: /30 or /31 "
                        f"in 169.254.0.0/16")
    if net.prefixlen <= 30 and iface.ip in (net.network_address, net.broadcast_address):
        problems.append(f"{iface.ip} is the network or broadcast address of {net}; use a host address "
                        f"such as {net.network_address + 1}")
    return problems


def to_inside_v6(value: Any) -> IPv6Interface:
    if not isinstance(value, str):
        raise Bad(f"expected an IPv6 address with prefix length like fd00:21::1/126, got {_type_name(value)}")
    try:
        iface = ip_interface(value.strip())
    except ValueError:
        raise Bad(f"'{value}' is not an address with prefix length like fd00:21::1/126") from None
    if not isinstance(iface, IPv6Interface) or "/" not in value:
        raise Bad(f"'{value}': expected an IPv6 address with prefix length like fd00:21::1/126")
    if iface.network.prefixlen != 126:
        raise Bad(f"inside IPv6 network {iface.network} is a /{iface.network.prefixlen}; allowed: /126")
    if iface.ip == iface.network.network_address:
        raise Bad(f"{iface.ip} is the subnet-router anycast address of {iface.network}; use another")
    return iface


def to_ifname(value: Any) -> str:
    name = to_str(value)
    if len(name) >= IFNAMSIZ:
        raise Bad(f"interface name '{name}' has {len(name)} characters; allowed: at most {IFNAMSIZ - 1}")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise Bad(f"interface name '{name}' is not valid; allowed: up to 15 characters without '/', ':' "
                  f"or spaces")
    return name


def to_mtu(value: Any) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Bad(f"expected auto or a number 576..9000, got {_type_name(value)}")
    if not 576 <= value <= 9000:
        raise Bad(f"MTU {value} is out of range; allowed: auto or 576..9000")
    return value


def to_identity(value: Any) -> Identity:
    """IKE identity (RFC 7296 §3.5), strongSwan-style spelling.

    ``198.51.100.1`` / ``2001:db8::1`` -> IP address; ``@host.example`` or ``host.example`` ->
    FQDN; ``user@example.net`` -> RFC 822; ``keyid:...`` -> KEY_ID; ``C=.., O=.., CN=..`` -> DN.
    """
    text = to_str(value).strip()
    try:
        addr = ip_address(text)
        return Identity("ipv4" if addr.version == 4 else "ipv6", str(addr))
    except ValueError:
        pass
    if text.startswith("keyid:"):
        if len(text) == len("keyid:"):
            raise Bad("keyid: needs a value after the colon")
        return Identity("keyid", text[len("keyid:"):])
    if text.startswith("@"):
        if len(text) == 1:
            raise Bad("'@' needs a host name after it")
        return Identity("fqdn", text[1:])
    if "@" in text:
        return Identity("rfc822", text)
    if "=" in text:
        return Identity("dn", text)
    if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?", text):
        return Identity("fqdn", text)
    raise Bad(f"'{text}' is not an identity; allowed: an IP address, a host name (a.example.net or "
              f"@a.example.net), user@domain, keyid:VALUE or a DN like 'C=CH, O=Example, CN=a'")


def to_community(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        raise Bad("write communities as quoted strings, e.g. '65001:100' (unquoted, YAML may read "
                  "them as numbers)")
    text = to_str(value).strip().lower()
    if text in WELL_KNOWN_COMMUNITIES:
        return text
    parts = text.split(":")
    if all(p.isdigit() for p in parts):
        if len(parts) == 2 and all(int(p) <= 0xFFFF for p in parts):
            return text  # RFC 1997
        if len(parts) == 3 and all(int(p) <= 0xFFFFFFFF for p in parts):
            return text  # RFC 8092 large community
    raise Bad(f"'{value}' is not a community; allowed: ASN:VALUE (each 0..65535), "
              f"GLOBAL:LOCAL1:LOCAL2 (each 0..4294967295) or one of {', '.join(WELL_KNOWN_COMMUNITIES)}")


# ----------------------------------------------------------------------------------------------

class Ctx:
    """Collects issues for one file."""

    def __init__(self, file: str, base_dir: Path, secret_owners: frozenset[int],
                 parse_proposal: ProposalParser, proposal_error: type[Exception]) -> None:
        self.file = file
        self.base_dir = base_dir
        self.secret_owners = secret_owners
        self.parse_proposal = parse_proposal
        self.proposal_error = proposal_error
        self.issues: list[Issue] = []
        self.tunnel: str | None = None
        self.partials: list[_Partial] = []   # per tunnel, even invalid ones, for cross-tunnel checks
        self.policy_names: set[str] = set()  # every policy defined, valid or not
        #: per policy: the line of each key written (for checks that depend on how tunnels use it)
        self.policy_lines: dict[str, dict[str, int]] = {}
        #: (tunnel, "import"|"export", policy, line) for every policy reference
        self.policy_uses: list[tuple[str, str, str, int]] = []

    def error(self, line: int, path: str, message: str) -> None:
        self.issues.append(Issue(self.file, line, path, message, self.tunnel))

    # --- structure helpers

    def mapping(self, value: Any, path: str, line: int, example: str = "") -> MarkedMap | None:
        if isinstance(value, MarkedMap):
            return value
        hint = f", e.g. {example}" if example else ""
        self.error(line, path, f"expected a mapping (key: value){hint}, got {_type_name(value)}")
        return None

    def keys(self, m: MarkedMap, path: str, allowed: Iterable[str],
             refused: dict[str, str] | None = None) -> None:
        allowed = tuple(allowed)
        for key in m:
            line = m.key_line(key)
            if refused and key in refused:
                self.error(line, _join(path, key), refused[key])
                continue
            if not isinstance(key, str):
                self.error(line, path, f"keys must be names, got {_type_name(key)}; allowed: {', '.join(allowed)}")
                continue
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                if close:
                    msg = f"unknown key '{key}'; did you mean '{close[0]}'? (allowed: {', '.join(allowed)})"
                else:
                    msg = f"unknown key '{key}'; allowed: {', '.join(allowed)}"
                self.error(line, _join(path, key), msg)

    def field(self, m: MarkedMap, key: str, path: str, conv: Callable[[Any], Any], *,
              default: Any = _MISSING, required: bool = False, missing_line: int | None = None) -> Any:
        """Read ``m[key]`` through ``conv``; on a problem record it and return None."""
        if key not in m or (m[key] is None and not required and default is not _MISSING):
            if required:
                self.error(missing_line if missing_line is not None else m.line, _join(path, key),
                           "is required")
                return None
            return None if default is _MISSING else default
        try:
            return conv(m[key])
        except Bad as exc:
            self.error(m.value_line(key), _join(path, key), str(exc))
            return None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _shown_path(text: str) -> str:
    """A path for a message; a value without '/' might be a secret pasted in the wrong place."""
    return f"'{text}'" if "/" in text else "(the value on this line)"


# ----------------------------------------------------------------------------------------------

def build(data: Any, duplicates: list[DuplicateKey], ctx: Ctx, path: Path) -> Config | None:
    for dup in duplicates:
        ctx.error(dup.line, str(dup.key), f"duplicate key '{dup.key}' (first at line {dup.first_line}); "
                                          f"each key may appear once in a mapping")
    if data is None:
        ctx.error(0, "", "the file is empty; expected a mapping with 'tunnels:' (see isthmus.yaml.example)")
        return None
    top = ctx.mapping(data, "", 1, "tunnels: {...}")
    if top is None:
        return None
    ctx.keys(top, "", TOP_KEYS)

    appliance = _appliance(ctx, top)
    bgp = _bgp(ctx, top, appliance)

    tunnels: dict[str, Tunnel] = {}
    raw_tunnels = top.get("tunnels")
    if raw_tunnels is not None:
        tmap = ctx.mapping(raw_tunnels, "tunnels", top.value_line("tunnels"), "to-b: {remote: ...}")
        if tmap is not None:
            for name, value in tmap.items():
                key_line = tmap.key_line(name)
                if not isinstance(name, str) or not _TUNNEL_NAME.match(name):
                    ctx.error(key_line, f"tunnels.{name}",
                              "tunnel names must start with a letter or digit and use only letters, "
                              "digits, '.', '_' and '-' (at most 64 characters)")
                    continue
                ctx.tunnel = name
                tunnel = _tunnel(ctx, name, value, key_line, bgp)
                ctx.tunnel = None
                if tunnel is not None:
                    tunnels[name] = tunnel
    _cross_tunnel(ctx)
    if bgp is not None:
        _policy_uses(ctx, bgp)
    if ctx.issues:
        ctx.issues.sort(key=lambda i: i.line)   # stable: same-line issues keep their order
        return None
    return Config(path=path, appliance=appliance, tunnels=tunnels, bgp=bgp)


def _appliance(ctx: Ctx, top: MarkedMap) -> ApplianceSettings:
    if top.get("appliance") is None:
        return ApplianceSettings()
    m = ctx.mapping(top["appliance"], "appliance", top.value_line("appliance"), "{name: region-a}")
    if m is None:
        return ApplianceSettings()
    ctx.keys(m, "appliance", APPLIANCE_KEYS)
    return ApplianceSettings(name=ctx.field(m, "name", "appliance", to_str, default=None),
                             router_id=ctx.field(m, "router_id", "appliance", to_ipv4, default=None),
                             delete_on_shutdown=_or(ctx.field(m, "delete_on_shutdown", "appliance", to_bool,
                                                              default=True), True),
                             dos_protection=_dos_protection(ctx, m))


def _limit(lo: int, hi: int) -> Callable[[Any], int | None]:
    """A whole number lo..hi, or `off` (no limit)."""
    def conv(value: Any) -> int | None:
        if value is False or value == "off":     # YAML 1.1 reads an unquoted off as false
            return None
        try:
            return int_range(lo, hi)(value)
        except Bad as exc:
            raise Bad(f"{exc} (or off)") from None
    return conv


def _dos_protection(ctx: Ctx, m: MarkedMap) -> DosProtection:
    default = DosProtection()
    if m.get("dos_protection") is None:
        return default
    if m["dos_protection"] is False or m["dos_protection"] == "off":
        # a load test's set-up (strongSwan's dos_protection = no): no COOKIEs, no half-open caps
        return DosProtection(half_open_max=None, half_open_per_source=None, cookie_threshold=None)
    dm = ctx.mapping(m["dos_protection"], "appliance.dos_protection", m.value_line("dos_protection"),
                     "{half_open_max: 1000, half_open_per_source: 10, cookie_threshold: 30}")
    if dm is None:
        return default
    path = "appliance.dos_protection"
    ctx.keys(dm, path, DOS_KEYS)
    kw: dict[str, Any] = {}
    for key, conv in (("half_open_max", _limit(1, 10_000_000)), ("half_open_per_source", _limit(1, 10_000_000)),
                      ("cookie_threshold", _limit(0, 10_000_000)), ("max_init_request", int_range(1000, 65535)),
                      ("invalid_ike_spi_rate", _limit(1, 1_000_000))):
        if key in dm:
            bad = len(ctx.issues)
            value = ctx.field(dm, key, path, conv)
            if len(ctx.issues) == bad:
                kw[key] = value
    return DosProtection(**kw)


# --- tunnels ---

class _Partial:
    """What cross-tunnel checks need from a tunnel, collected even if the tunnel has problems."""

    def __init__(self, name: str, line: int, seen: "_Seen") -> None:
        self.name = name
        self.line = line
        self.seen = seen
        self.ifname: str | None = None
        self.if_id: int | None = None
        self.networks: list[tuple[Any, str]] = []   # (inside network, field name)
        self.remote: Any = None
        self.remote_id: Identity | None = None
        self.routes: list[tuple[Any, int]] = []     # (prefix, line)
        self.has_bgp = False                        # a bgp: block is written (a BGP neighbour)


class _Seen:
    """Which tunnel fields were written (for presets' 'must be explicit') and on which line."""

    def __init__(self, tunnel_line: int) -> None:
        self.tunnel_line = tunnel_line
        self.explicit: set[str] = set()
        self.lines: dict[str, int] = {}

    def note(self, m: MarkedMap | None, rel: str, keys: Iterable[str]) -> None:
        if m is None:
            return
        for key in keys:
            if key in m and m[key] is not None:
                self.explicit.add(f"{rel}.{key}" if rel else key)
                self.lines[f"{rel}.{key}" if rel else key] = m.value_line(key)
                if isinstance(m[key], MarkedSeq):
                    for i in range(len(m[key])):
                        self.lines[f"{rel}.{key}[{i}]" if rel else f"{key}[{i}]"] = m[key].item_line(i)

    def line(self, rel: str) -> int:
        probe = rel
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
        return self.tunnel_line


def _sub(ctx: Ctx, m: MarkedMap, key: str, path: str, allowed: Iterable[str], example: str,
         required: bool = False, missing_line: int = 0) -> MarkedMap | None:
    if m.get(key) is None:
        if required:
            ctx.error(missing_line or m.line, _join(path, key), f"is required, e.g. {key}: {example}")
        return None
    sub = ctx.mapping(m[key], _join(path, key), m.value_line(key), example)
    if sub is not None:
        ctx.keys(sub, _join(path, key), allowed, refused=_REFUSED.get(key))
    return sub


_REFUSED = {
    "auth": {"psk": "inline 'psk' is refused: secrets must not live in the YAML file; write the key to "
                    "a file only root can read (chmod 600) and reference it with "
                    "psk_file: /etc/isthmus/secrets/<tunnel>.psk"},
}


def _tunnel(ctx: Ctx, name: str, value: Any, key_line: int, bgp: BgpSettings | None) -> Tunnel | None:
    path = f"tunnels.{name}"
    m = ctx.mapping(value, path, key_line, "{remote: 198.51.100.2, auth: {psk_file: ...}}")
    if m is None:
        return None
    ctx.keys(m, path, TUNNEL_KEYS)
    n_before = len(ctx.issues)
    seen = _Seen(key_line)
    seen.note(m, "", TUNNEL_KEYS)

    profile = ctx.field(m, "peer_profile", path, choice(*presets_mod.PRESETS), default=None)
    preset = presets_mod.PRESETS.get(profile) if profile else None
    pdef: dict[str, Any] = preset.defaults if preset else {}

    def dflt(rel: str, general: Any) -> Any:
        return pdef.get(rel, general)

    remote = ctx.field(m, "remote", path, to_ip, required=True, missing_line=key_line)
    local = ctx.field(m, "local", path, to_ip, default=None)
    if remote is not None and local is not None and remote.version != local.version:
        ctx.error(m.value_line("local"), f"{path}.local",
                  f"local {local} and remote {remote} are of different IP versions")
    local_id = ctx.field(m, "local_id", path, to_identity, default=None)
    remote_id = ctx.field(m, "remote_id", path, to_identity, default=None)
    if remote_id is None and "remote_id" not in m and remote is not None:
        remote_id = Identity("ipv4" if remote.version == 4 else "ipv6", str(remote))

    auth = _auth(ctx, m, path, key_line)

    ike_m = _sub(ctx, m, "ike", path, IKE_KEYS, "{proposals: [aes256gcm16-prfsha384-x25519], lifetime: 24h}")
    esp_m = _sub(ctx, m, "esp", path, SA_KEYS, "{proposals: [aes256gcm16], lifetime: 1h}")
    dpd_m = _sub(ctx, m, "dpd", path, DPD_KEYS, "{interval: 10s, timeout: 30s, action: restart}")
    if_m = _sub(ctx, m, "interface", path, INTERFACE_KEYS, "{name: xfrm-b, address: 169.254.21.1/30}")
    seen.note(ike_m, "ike", IKE_KEYS)
    seen.note(esp_m, "esp", SA_KEYS)
    seen.note(dpd_m, "dpd", DPD_KEYS)
    seen.note(if_m, "interface", INTERFACE_KEYS)
    seen.note(m.get("auth") if isinstance(m.get("auth"), MarkedMap) else None, "auth", AUTH_KEYS)

    ike = _sa(ctx, ike_m, f"{path}.ike", "ike", m, dflt("ike.proposals", [DEFAULT_IKE_PROPOSAL]),
              dflt("ike.lifetime", DEFAULT_IKE_LIFETIME), dflt("ike.rekey_margin", DEFAULT_REKEY_MARGIN))
    if ike_m is not None:   # IKE fragmentation (RFC 7383): on by default, size = IP datagram
        frag = ctx.field(ike_m, "fragmentation", f"{path}.ike", to_bool, default=True)
        frag_size = ctx.field(ike_m, "fragment_size", f"{path}.ike", int_range(576, 9000), default=None)
        if ike is not None:
            ike = dataclasses.replace(ike, fragmentation=frag is not False, fragment_size=frag_size)
    esp = _sa(ctx, esp_m, f"{path}.esp", "esp", m, dflt("esp.proposals", [DEFAULT_ESP_PROPOSAL]),
              dflt("esp.lifetime", DEFAULT_ESP_LIFETIME), dflt("esp.rekey_margin", DEFAULT_REKEY_MARGIN))

    dpd = DpdSettings(dflt("dpd.interval", DEFAULT_DPD_INTERVAL), dflt("dpd.timeout", DEFAULT_DPD_TIMEOUT),
                      dflt("dpd.action", DEFAULT_DPD_ACTION))
    if dpd_m is not None:
        dpd = DpdSettings(
            interval=_or(ctx.field(dpd_m, "interval", f"{path}.dpd", duration_range(1, 3600), default=dpd.interval),
                         dpd.interval),
            timeout=_or(ctx.field(dpd_m, "timeout", f"{path}.dpd", duration_range(1, 86400), default=dpd.timeout),
                        dpd.timeout),
            action=_or(ctx.field(dpd_m, "action", f"{path}.dpd", choice("restart", "clear", "none"),
                                 default=dpd.action), dpd.action))

    nat = ctx.field(m, "nat_traversal", path, choice("auto", "force", "off"), default="auto")
    # RFC 3948 §2.3 keepalives from behind a NAT; 0 sends none (strongSwan's keep_alive, 20 s)
    nat_keepalive = ctx.field(m, "nat_keepalive", path, _keepalive_interval, default=DEFAULT_NAT_KEEPALIVE)
    mobike = ctx.field(m, "mobike", path, to_bool, default=True)
    start = ctx.field(m, "start", path, to_bool, default=True)

    interface = _interface(ctx, if_m, m, path, name, key_line, dflt("interface.outer_mtu", None),
                           range_rules=profile != "aws")
    partial = _Partial(name, key_line, seen)
    ctx.partials.append(partial)
    partial.remote, partial.remote_id = remote, remote_id
    if interface is not None:
        partial.ifname, partial.if_id = interface.name, interface.if_id
    elif if_m is not None:
        partial.ifname = _lenient(to_ifname, if_m.get("name"))
        partial.if_id = _lenient(int_range(IF_ID_MIN, IF_ID_MAX), if_m.get("if_id"))
    addr4 = interface.address if interface else _lenient(to_inside_v4, if_m.get("address") if if_m else None)
    addr6 = interface.address6 if interface else _lenient(to_inside_v6, if_m.get("address6") if if_m else None)
    partial.networks = [(a.network, f) for a, f in ((addr4, "address"), (addr6, "address6")) if a is not None]
    partial.has_bgp = m.get("bgp") is not None
    tunnel_bgp = _tunnel_bgp(ctx, m, path, interface, bgp)
    routes = _routes(ctx, m, path, remote)
    partial.routes = list(routes or ())

    # Preset: fields the provider wants spelled out, then its documented limits.
    if preset is not None:
        for rel in preset.required:
            if rel not in seen.explicit:
                ctx.error(seen.line(rel.rsplit(".", 1)[0]) if "." in rel else key_line, f"{path}.{rel}",
                          f"{preset.title} (peer_profile: {preset.name}) needs {rel} written out explicitly; "
                          f"no default is assumed for it")
        addr = if_m.get("address") if if_m is not None else None
        facts = presets_mod.TunnelFacts(
            explicit=seen.explicit,
            ike_proposals=list(ike.proposals) if ike else None,
            esp_proposals=list(esp.proposals) if esp else None,
            ike_lifetime=ike.lifetime if ike else None,
            esp_lifetime=esp.lifetime if esp else None,
            esp_rekey_margin=esp.rekey_margin if esp else None,
            dpd_timeout=dpd.timeout,
            # the preset judges the address even when the general rules refused it
            address=interface.address if interface else _lenient(to_inside_v4, addr),
            address6=interface.address6 if interface else None,
            mtu=interface.mtu if interface else None,
            outer_mtu=interface.outer_mtu if interface else None,
            psk=auth.psk.reveal() if isinstance(auth, PskAuth) else None,
            local_id_kind=local_id.kind if local_id else None,
            local_id_value=local_id.value if local_id else None)
        for rel, message in preset.check(facts):
            ctx.error(seen.line(rel), f"{path}.{rel}", f"{message} (peer_profile: {preset.name})")

    if len(ctx.issues) != n_before:
        return None
    return Tunnel(name=name, remote=remote, local=local, local_id=local_id, remote_id=remote_id, auth=auth,
                  ike=ike, esp=esp, dpd=dpd, nat_traversal=nat, nat_keepalive=nat_keepalive,
                  mobike=mobike, start=start,
                  interface=interface, bgp=tunnel_bgp, peer_profile=profile,
                  routes=tuple(net for net, _ in routes or ()), line=key_line)


def _routes(ctx: Ctx, m: MarkedMap, path: str, remote: Any) -> list[tuple[Any, int]] | None:
    """``routes``: prefixes reached over the tunnel (installed on its interface while its Child SA
    is up). None when there is a problem (already reported)."""
    rpath = f"{path}.routes"
    if m.get("routes") is None:
        return []
    raw = m["routes"]
    if not isinstance(raw, MarkedSeq):
        ctx.error(m.value_line("routes"), rpath, f"expected a list of prefixes, e.g. [10.2.0.0/16], "
                                                 f"got {_type_name(raw)}")
        return None
    out: list[tuple[Any, int]] = []
    ok = True
    for i, item in enumerate(raw):
        line = raw.item_line(i)
        try:
            net = to_network(item)
        except Bad as exc:
            ctx.error(line, f"{rpath}[{i}]", str(exc))
            ok = False
            continue
        if any(net == o for o, _ in out):
            ctx.error(line, f"{rpath}[{i}]", f"{net} is listed twice")
            ok = False
            continue
        if remote is not None and net.version == remote.version and remote in net:
            ctx.error(line, f"{rpath}[{i}]",
                      f"{net} contains the tunnel's remote address {remote}: the tunnel's own IKE and ESP "
                      f"packets would be routed into it; allowed: prefixes that do not contain {remote}")
            ok = False
            continue
        out.append((net, line))
    return out if ok else None


def _lenient(conv: Callable[[Any], Any], value: Any) -> Any:
    try:
        return None if value is None else conv(value)
    except Bad:
        return None


def _or(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def _resolve(ctx: Ctx, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else ctx.base_dir / p


def _auth(ctx: Ctx, m: MarkedMap, path: str, key_line: int) -> PskAuth | CertAuth | None:
    apath = f"{path}.auth"
    am = _sub(ctx, m, "auth", path, AUTH_KEYS, "{psk_file: /etc/isthmus/secrets/<tunnel>.psk}",
              required=True, missing_line=key_line)
    if am is None:
        return None
    has_psk = "psk_file" in am
    cert_keys = [k for k in ("certificate", "key", "ca", "crl") if k in am]
    if has_psk and cert_keys:
        ctx.error(am.line, apath, "use either psk_file or certificate/key/ca, not both")
        return None
    if has_psk:
        text = ctx.field(am, "psk_file", apath, to_str, required=True)
        if text is None:
            return None
        file = _resolve(ctx, text)
        try:
            secret = read_secret_file(file, ctx.secret_owners, "PSK file")
        except SecretFileError as exc:
            msg = str(exc) if "/" in text else str(exc).replace(f"'{file}'", _shown_path(text))
            ctx.error(am.value_line("psk_file"), f"{apath}.psk_file", msg)
            return None
        return PskAuth(psk_file=file, psk=secret)
    if cert_keys:
        missing = [k for k in ("certificate", "key", "ca") if k not in am]
        for k in missing:
            ctx.error(am.line, f"{apath}.{k}", "is required with certificate authentication "
                                              "(certificate, key and ca)")
        if missing:
            return None
        return _cert_auth(ctx, am, apath)
    if "psk" not in am:  # the inline psk was already reported
        ctx.error(am.line, apath, "needs psk_file, or certificate + key + ca")
    return None


def _cert_auth(ctx: Ctx, am: MarkedMap, apath: str) -> CertAuth | None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    texts = {k: ctx.field(am, k, apath, to_str, required=True) for k in ("certificate", "key")}
    cas = _file_list(ctx, am, "ca", apath, required=True)
    crls = _file_list(ctx, am, "crl", apath, required=False)
    if any(v is None for v in texts.values()) or cas is None or crls is None:
        return None
    files = {k: _resolve(ctx, v) for k, v in texts.items()}
    ok = True
    pems: dict[str, bytes] = {}

    def read_certs(f: Path, line: int, where: str, what: str) -> bytes | None:
        try:
            if not f.is_file():
                raise Bad(f"{what} file '{f}' does not exist or is not a regular file")
            data = f.read_bytes()
            if not x509.load_pem_x509_certificates(data):
                raise ValueError
            return data
        except Bad as exc:
            ctx.error(line, where, str(exc))
        except (OSError, ValueError):
            ctx.error(line, where, f"'{f}' is not readable as PEM X.509 certificate(s)")
        return None

    data = read_certs(files["certificate"], am.value_line("certificate"), f"{apath}.certificate", "certificate")
    if data is None:
        ok = False
    else:
        pems["certificate"] = data
    ca_pems: list[bytes] = []
    for f, line, where in cas:
        data = read_certs(f, line, where, "ca")
        if data is None:
            ok = False
        else:
            ca_pems.append(data)
    crl_data: list[bytes] = []
    for f, line, where in crls:
        try:
            raw = f.read_bytes()
            if raw.lstrip().startswith(b"-----BEGIN"):
                x509.load_pem_x509_crl(raw)
            else:
                x509.load_der_x509_crl(raw)
            crl_data.append(raw)
        except OSError as exc:
            ctx.error(line, where, f"CRL file '{f}' cannot be read ({exc.strerror})")
            ok = False
        except ValueError:
            ctx.error(line, where, f"'{f}' is not a PEM or DER X.509 CRL")
            ok = False
    key_pem = None
    try:
        key_pem = read_secret_file(files["key"], ctx.secret_owners, "private key file")
    except SecretFileError as exc:
        ctx.error(am.value_line("key"), f"{apath}.key", str(exc))
        ok = False
    if key_pem is not None:
        try:
            private_key = serialization.load_pem_private_key(key_pem.reveal() + b"\n", password=None)
        except TypeError:
            ctx.error(am.value_line("key"), f"{apath}.key",
                      f"private key '{files['key']}' is encrypted; allowed: an unencrypted PEM key "
                      f"protected by file permissions")
            ok = False
        except ValueError:
            ctx.error(am.value_line("key"), f"{apath}.key",
                      f"'{files['key']}' is not a PEM private key (RSA, ECDSA or Ed25519)")
            ok = False
        else:
            if "certificate" in pems:
                cert = x509.load_pem_x509_certificates(pems["certificate"])[0]
                fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                if cert.public_key().public_bytes(*fmt) != private_key.public_key().public_bytes(*fmt):
                    ctx.error(am.value_line("key"), f"{apath}.key",
                              f"private key '{files['key']}' does not belong to certificate "
                              f"'{files['certificate']}'")
                    ok = False
    if not ok or key_pem is None:
        return None
    return CertAuth(certificate=files["certificate"], key=files["key"], ca=tuple(f for f, _l, _w in cas),
                    certificate_pem=pems["certificate"], key_pem=key_pem, ca_pem=tuple(ca_pems),
                    crl=tuple(f for f, _l, _w in crls), crl_data=tuple(crl_data))


def _file_list(ctx: Ctx, am: MarkedMap, key: str, apath: str, *, required: bool
               ) -> list[tuple[Path, int, str]] | None:
    """``key``: one file name or a list of them, as (path, line, field path); None after an
    error (reported)."""
    raw = am.get(key)
    if raw is None:
        if required:
            ctx.error(am.line, f"{apath}.{key}", f"is required, e.g. {key}: /etc/isthmus/certs/ca.pem")
            return None
        return []
    items: list[tuple[Any, int, str]]
    if isinstance(raw, MarkedSeq):
        items = [(v, raw.item_line(i), f"{apath}.{key}[{i}]") for i, v in enumerate(raw)]
        if not items and required:
            ctx.error(am.value_line(key), f"{apath}.{key}", "needs at least one file")
            return None
    else:
        items = [(raw, am.value_line(key), f"{apath}.{key}")]
    out: list[tuple[Path, int, str]] = []
    ok = True
    for v, line, where in items:
        try:
            text = to_str(v)
        except Bad as exc:
            ctx.error(line, where, str(exc))
            ok = False
            continue
        out.append((_resolve(ctx, text), line, where))
    return out if ok else None


def _sa(ctx: Ctx, sm: MarkedMap | None, path: str, kind: str, parent: MarkedMap, default_proposals: list[str],
        default_lifetime: int, default_margin: int) -> IkeSettings | EspSettings | None:
    cls = IkeSettings if kind == "ike" else EspSettings
    texts = list(default_proposals)
    lines: list[int] = []
    lifetime, margin = default_lifetime, default_margin
    ok = True
    if sm is not None:
        if "proposals" in sm:
            raw = sm["proposals"]
            if not isinstance(raw, MarkedSeq) or not raw:
                ctx.error(sm.value_line("proposals"), f"{path}.proposals",
                          f"expected a non-empty list of proposals, e.g. [{default_proposals[0]}]")
                ok = False
                texts = []
            else:
                texts, lines = [], []
                for i, item in enumerate(raw):
                    if not isinstance(item, str) or not item.strip():
                        ctx.error(raw.item_line(i), f"{path}.proposals[{i}]",
                                  f"expected a proposal string like {default_proposals[0]}, "
                                  f"got {_type_name(item)}")
                        ok = False
                        continue
                    texts.append(item.strip())
                    lines.append(raw.item_line(i))
        lifetime = _or(ctx.field(sm, "lifetime", path, duration_range(60, 7 * 86400), default=lifetime), None)
        margin = _or(ctx.field(sm, "rekey_margin", path, duration_range(0, 86400), default=margin), None)
        if lifetime is None or margin is None:
            ok = False
    line_of = (lambda i: lines[i]) if lines else (lambda i: sm.line if sm is not None else parent.line)
    parsed = []
    for i, text in enumerate(texts):
        try:
            parsed.append(ctx.parse_proposal(text, kind))
        except ctx.proposal_error as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            ctx.error(line_of(i), f"{path}.proposals[{i}]", str(reason))
            ok = False
    if ok and margin >= lifetime:
        ctx.error(sm.value_line("rekey_margin") if sm is not None and "rekey_margin" in sm
                  else (sm.value_line("lifetime") if sm is not None else parent.line),
                  f"{path}.rekey_margin",
                  f"rekey margin {_human(margin)} must be shorter than the lifetime {_human(lifetime)}")
        ok = False
    if not ok:
        return None
    return cls(proposal_strings=tuple(texts), proposals=tuple(parsed), lifetime=lifetime, rekey_margin=margin)


def _interface(ctx: Ctx, im: MarkedMap | None, m: MarkedMap, path: str, tunnel: str, key_line: int,
               default_outer_mtu: int | None, range_rules: bool = True) -> InterfaceSettings | None:
    ipath = f"{path}.interface"
    n = len(ctx.issues)
    if im is None:
        im = MarkedMap(m.key_line("interface") if "interface" in m else key_line)
    default_name = f"xfrm-{tunnel}"
    if "name" in im:
        name = ctx.field(im, "name", ipath, to_ifname)
    else:
        try:
            name = to_ifname(default_name)
        except Bad:
            ctx.error(im.line, f"{ipath}.name", f"is required: the default '{default_name}' is longer than "
                                                f"{IFNAMSIZ - 1} characters")
            name = None
    # The data plane owns one if_id range (reconciliation removes stale objects only there), so an
    # explicit if_id must lie in it; the default is derived from the tunnel name (stable across
    # restarts, rekeys and edits elsewhere in the file).
    if_id = ctx.field(im, "if_id", ipath, to_if_id, default=None)
    if if_id is None and "if_id" not in im:
        if_id = derive_if_id(tunnel)
    address = ctx.field(im, "address", ipath, to_inside_v4, default=None)
    if address is not None:
        for problem in inside_v4_problems(address, range_rules):
            ctx.error(im.value_line("address"), f"{ipath}.address", problem)
    address6 = ctx.field(im, "address6", ipath, to_inside_v6, default=None)
    mtu = ctx.field(im, "mtu", ipath, to_mtu, default=None)
    outer = ctx.field(im, "outer_mtu", ipath, to_mtu, default=default_outer_mtu)
    if address6 is not None and mtu is not None and mtu < 1280:
        ctx.error(im.value_line("mtu"), f"{ipath}.mtu", f"MTU {mtu} is below 1280, the IPv6 minimum "
                                                        f"(RFC 8200 §5), and the tunnel carries IPv6")
    if mtu is not None and outer is not None and mtu >= outer:
        ctx.error(im.value_line("mtu"), f"{ipath}.mtu",
                  f"the tunnel MTU {mtu} must be smaller than outer_mtu {outer} to leave room for ESP")
    if len(ctx.issues) != n or name is None or if_id is None:
        return None
    return InterfaceSettings(name=name, if_id=if_id, address=address, address6=address6, mtu=mtu,
                             outer_mtu=outer)


def _tunnel_bgp(ctx: Ctx, m: MarkedMap, path: str, interface: InterfaceSettings | None,
                bgp: BgpSettings | None) -> TunnelBgp | None:
    bm = _sub(ctx, m, "bgp", path, TUNNEL_BGP_KEYS, "{peer_as: 65002, peer_address: 169.254.21.2}")
    if bm is None:
        return None
    bpath = f"{path}.bgp"
    n = len(ctx.issues)
    peer_as = ctx.field(bm, "peer_as", bpath, int_range(1, 0xFFFFFFFF), required=True)
    peer = ctx.field(bm, "peer_address", bpath, to_ip, required=True)
    peer6 = ctx.field(bm, "peer_address6", bpath, to_ipv6, default=None)
    hold = ctx.field(bm, "hold_time", bpath, _hold_time, default=DEFAULT_HOLD_TIME)
    imp = ctx.field(bm, "import", bpath, to_str, default=None)
    exp = ctx.field(bm, "export", bpath, to_str, default=None)
    graceful = ctx.field(bm, "graceful_restart", bpath, _graceful_restart, default=0)
    passive = ctx.field(bm, "passive", bpath, to_bool, default=False)
    dampening = ctx.field(bm, "dampening", bpath, to_bool, default=False)
    if bgp is None:
        ctx.error(bm.line, bpath, "a tunnel BGP neighbour needs the top-level bgp section (asn: ...)")
    else:
        for key, pol in (("import", imp), ("export", exp)):
            if pol is not None and pol not in ctx.policy_names:
                known = ", ".join(sorted(ctx.policy_names)) or "none defined"
                close = difflib.get_close_matches(pol, sorted(ctx.policy_names), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                ctx.error(bm.value_line(key), f"{bpath}.{key}",
                          f"policy '{pol}' is not defined under bgp.policies{hint} (defined: {known})")
            elif pol is not None and ctx.tunnel is not None:
                ctx.policy_uses.append((ctx.tunnel, key, pol, bm.value_line(key)))
    if peer is not None and interface is not None:
        _peer_address_problems(ctx, bm, "peer_address", bpath, peer, interface)
    if peer6 is not None:
        if peer is not None and peer.version == 6:
            ctx.error(bm.value_line("peer_address6"), f"{bpath}.peer_address6",
                      f"peer_address {peer} is already IPv6; peer_address6 adds an IPv6 session next to an "
                      f"IPv4 peer_address")
        elif interface is not None:
            _peer_address_problems(ctx, bm, "peer_address6", bpath, peer6, interface)
    if len(ctx.issues) != n:
        return None
    return TunnelBgp(peer_as=peer_as, peer_address=peer, hold_time=hold, import_policy=imp, export_policy=exp,
                     peer_address6=peer6, graceful_restart=graceful, passive=passive, dampening=dampening)


def _peer_address_problems(ctx: Ctx, bm: MarkedMap, key: str, bpath: str, peer: Any,
                           interface: InterfaceSettings) -> None:
    own = interface.address if peer.version == 4 else interface.address6
    line = bm.value_line(key)
    if own is None:
        field_name = "address" if peer.version == 4 else "address6"
        ctx.error(line, f"{bpath}.{key}", f"the tunnel interface has no IPv{peer.version} inside address "
                                          f"(interface.{field_name}) for the BGP session")
    elif peer not in own.network:
        ctx.error(line, f"{bpath}.{key}", f"{peer} is not in the tunnel's inside network {own.network}")
    elif peer == own.ip:
        ctx.error(line, f"{bpath}.{key}", f"{peer} is this appliance's own inside address; use the peer's")
    elif own.network.prefixlen in (30, 126) and peer == own.network.network_address:
        ctx.error(line, f"{bpath}.{key}", f"{peer} is the network address of {own.network}")
    elif isinstance(own, IPv4Interface) and own.network.prefixlen == 30 and peer == own.network.broadcast_address:
        ctx.error(line, f"{bpath}.{key}", f"{peer} is the broadcast address of {own.network}")


def to_ipv6(value: Any) -> IPv6Address:
    if not isinstance(value, str):
        raise Bad(f"expected an IPv6 address, got {_type_name(value)}")
    try:
        return IPv6Address(value.strip())
    except ValueError:
        raise Bad(f"'{value}' is not an IPv6 address") from None


def _hold_time(value: Any) -> int:
    seconds = parse_duration(value)
    if seconds != 0 and not 3 <= seconds <= 65535:
        raise Bad(f"hold time {seconds} s is not allowed; allowed: 0 (no keepalives) or 3..65535 s "
                  f"(RFC 4271 §4.2)")
    return seconds


def _graceful_restart(value: Any) -> int:
    """true -> FRR's 120 s restart time, false -> off, or a restart time 1..4095 s (RFC 4724 §3)."""
    if isinstance(value, bool):
        return DEFAULT_GRACEFUL_RESTART_TIME if value else 0
    try:
        seconds = parse_duration(value)
    except Bad:
        shown = repr(value) if isinstance(value, str) else _type_name(value)
        raise Bad(f"expected true, false or a restart time like 120s, got {shown}") from None
    if not 1 <= seconds <= 4095:
        raise Bad(f"restart time {seconds} s is out of range; allowed: true, false or 1..4095 s "
                  f"(a 12-bit field, RFC 4724 §3)")
    return seconds


# --- BGP (top level and policies; the route manager, bgp/, applies them: docs/bgp.md) ---

def _bgp(ctx: Ctx, top: MarkedMap, appliance: ApplianceSettings) -> BgpSettings | None:
    bm = _sub(ctx, top, "bgp", "", BGP_KEYS, "{asn: 65001, announce: [10.1.0.0/16]}")
    if bm is None:
        return None
    asn = ctx.field(bm, "asn", "bgp", _asn, required=True)
    router_id = ctx.field(bm, "router_id", "bgp", to_ipv4, default=None) or appliance.router_id
    if router_id is None and "router_id" not in bm:
        ctx.error(bm.line, "bgp.router_id", "is required (here or as appliance.router_id): "
                                            "an IPv4 address unique to this appliance")
    announce: list[Any] = []
    if bm.get("announce") is not None:
        raw = bm["announce"]
        if not isinstance(raw, MarkedSeq):
            ctx.error(bm.value_line("announce"), "bgp.announce", "expected a list of prefixes, e.g. [10.1.0.0/16]")
        else:
            for i, item in enumerate(raw):
                try:
                    net = to_network(item)
                except Bad as exc:
                    ctx.error(raw.item_line(i), f"bgp.announce[{i}]", str(exc))
                    continue
                if net in announce:
                    ctx.error(raw.item_line(i), f"bgp.announce[{i}]", f"{net} is listed twice")
                    continue
                announce.append(net)
    multipath = _or(ctx.field(bm, "multipath", "bgp", to_bool, default=True), True)
    max_paths = _or(ctx.field(bm, "max_paths", "bgp", int_range(1, 64), default=DEFAULT_MAX_PATHS),
                    DEFAULT_MAX_PATHS)
    prefer_static = _or(ctx.field(bm, "prefer_static", "bgp", to_bool, default=True), True)
    dampening = _dampening(ctx, bm)
    policies: dict[str, BgpPolicy] = {}
    pm = None
    if bm.get("policies") is not None:
        pm = ctx.mapping(bm["policies"], "bgp.policies", bm.value_line("policies"), "{from-b: {...}}")
    if pm is not None:
        for pname, pval in pm.items():
            ppath = f"bgp.policies.{pname}"
            if not isinstance(pname, str) or not _TUNNEL_NAME.match(pname):
                ctx.error(pm.key_line(pname), ppath, "policy names use letters, digits, '.', '_' and '-'")
                continue
            ctx.policy_names.add(pname)
            pol = _policy(ctx, pname, pval, pm.key_line(pname), ppath)
            if pol is not None:
                policies[pname] = pol
    return BgpSettings(asn=asn or 0, router_id=router_id, announce=tuple(announce), policies=policies,
                       multipath=multipath, max_paths=max_paths, dampening=dampening,
                       prefer_static=prefer_static)


def _dampening(ctx: Ctx, bm: MarkedMap) -> Dampening:
    """RFC 2439 parameters with FRR's ranges (half-life 1..45 min, reuse/suppress 1..20000,
    max-suppress 1..255 min) and FRR's defaults."""
    default = Dampening()
    if isinstance(bm.get("dampening"), bool):
        ctx.error(bm.value_line("dampening"), "bgp.dampening",
                  "bgp.dampening holds the parameters ({half_life: 15m, reuse: 750, suppress: 2000, "
                  "max_suppress: 60m}); dampening is switched on per tunnel: tunnels.<name>.bgp.dampening: true")
        return default
    dm = _sub(ctx, bm, "dampening", "bgp", DAMPENING_KEYS,
              "{half_life: 15m, reuse: 750, suppress: 2000, max_suppress: 60m}")
    if dm is None:
        return default
    path = "bgp.dampening"
    n = len(ctx.issues)
    half_life = ctx.field(dm, "half_life", path, duration_range(60, 45 * 60), default=default.half_life)
    reuse = ctx.field(dm, "reuse", path, int_range(1, 20000), default=default.reuse)
    suppress = ctx.field(dm, "suppress", path, int_range(1, 20000), default=default.suppress)
    max_suppress = ctx.field(dm, "max_suppress", path, duration_range(60, 255 * 60), default=default.max_suppress)
    if len(ctx.issues) != n:
        return default
    if reuse >= suppress:
        ctx.error(dm.value_line("reuse") if "reuse" in dm else dm.value_line("suppress"), f"{path}.reuse",
                  f"reuse {reuse} must be below suppress {suppress}: a route is suppressed above suppress "
                  f"and reused once its penalty decays below reuse")
        return default
    if max_suppress < half_life:
        ctx.error(dm.value_line("max_suppress") if "max_suppress" in dm else dm.value_line("half_life"),
                  f"{path}.max_suppress",
                  f"max_suppress {_human(max_suppress)} is shorter than half_life {_human(half_life)}; "
                  f"allowed: at least the half-life")
        return default
    return Dampening(half_life=half_life, reuse=reuse, suppress=suppress, max_suppress=max_suppress)


def _asn(value: Any) -> int:
    asn = int_range(1, 0xFFFFFFFF)(value)
    if asn == 23456:
        raise Bad("23456 is AS_TRANS (RFC 6793), not a real AS number")
    return asn


def _community_list(ctx: Ctx, m: MarkedMap, key: str, ppath: str) -> list[str]:
    out: list[str] = []
    if m.get(key) is None:
        return out
    raw = m[key]
    if not isinstance(raw, MarkedSeq):
        ctx.error(m.value_line(key), f"{ppath}.{key}", "expected a list like ['65001:100']")
        return out
    for i, item in enumerate(raw):
        try:
            out.append(to_community(item))
        except Bad as exc:
            ctx.error(raw.item_line(i), f"{ppath}.{key}[{i}]", str(exc))
    return out


def _asn_list(ctx: Ctx, m: MarkedMap, key: str, path: str) -> list[int]:
    out: list[int] = []
    if m.get(key) is None:
        return out
    raw = m[key]
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw_items, lines = [raw], [m.value_line(key)]
    elif isinstance(raw, MarkedSeq):
        raw_items, lines = list(raw), [raw.item_line(i) for i in range(len(raw))]
    else:
        ctx.error(m.value_line(key), f"{path}.{key}", f"expected a list of AS numbers like [65010], "
                                                      f"got {_type_name(raw)}")
        return out
    for i, item in enumerate(raw_items):
        try:
            out.append(int_range(1, 0xFFFFFFFF)(item))
        except Bad as exc:
            ctx.error(lines[i], f"{path}.{key}[{i}]", str(exc))
    return out


def _policy(ctx: Ctx, name: str, value: Any, line: int, ppath: str) -> BgpPolicy | None:
    m = ctx.mapping(value, ppath, line, "{prefixes: [{prefix: 10.2.0.0/16, le: 24}]}")
    if m is None:
        return None
    ctx.keys(m, ppath, POLICY_KEYS)
    ctx.policy_lines[name] = {k: m.key_line(k) for k in m if isinstance(k, str)}
    n = len(ctx.issues)
    prefixes: list[PrefixMatch] = []
    if m.get("prefixes") is not None:
        raw = m["prefixes"]
        if not isinstance(raw, MarkedSeq):
            ctx.error(m.value_line("prefixes"), f"{ppath}.prefixes",
                      "expected a list like [{prefix: 10.2.0.0/16, le: 24}]")
        else:
            for i, item in enumerate(raw):
                pm = _prefix_match(ctx, item, raw.item_line(i), f"{ppath}.prefixes[{i}]")
                if pm is not None:
                    prefixes.append(pm)
    max_prefix = None
    if m.get("max_prefix") is not None:
        raw = m["max_prefix"]
        if isinstance(raw, int) and not isinstance(raw, bool):
            max_prefix = _or(ctx.field(m, "max_prefix", ppath, lambda v: MaxPrefix(int_range(1, 0xFFFFFFFF)(v))),
                             None)
        else:
            mm = ctx.mapping(raw, f"{ppath}.max_prefix", m.value_line("max_prefix"), "{limit: 1000, action: restart}")
            if mm is not None:
                ctx.keys(mm, f"{ppath}.max_prefix", MAX_PREFIX_KEYS)
                limit = ctx.field(mm, "limit", f"{ppath}.max_prefix", int_range(1, 0xFFFFFFFF), required=True)
                action = ctx.field(mm, "action", f"{ppath}.max_prefix", choice("restart", "stop", "warn"),
                                   default="restart")
                delay = ctx.field(mm, "restart_delay", f"{ppath}.max_prefix", duration_range(1, 86400),
                                  default=DEFAULT_MAX_PREFIX_RESTART_DELAY)
                if "restart_delay" in mm and action is not None and action != "restart":
                    ctx.error(mm.value_line("restart_delay"), f"{ppath}.max_prefix.restart_delay",
                              f"restart_delay applies only with action: restart (this one is {action})")
                if limit is not None and action is not None and delay is not None:
                    max_prefix = MaxPrefix(limit, action, delay)
    local_pref = ctx.field(m, "local_pref", ppath, int_range(0, 0xFFFFFFFF), default=None)
    med = ctx.field(m, "med", ppath, int_range(0, 0xFFFFFFFF), default=None)
    prepend = ctx.field(m, "prepend", ppath, int_range(0, 16), default=0)
    communities = _community_list(ctx, m, "communities", ppath)
    match_communities = _community_list(ctx, m, "match_communities", ppath)
    deny_communities = _community_list(ctx, m, "deny_communities", ppath)
    remove_communities = _community_list(ctx, m, "remove_communities", ppath)
    as_path = AsPathFilter()
    am = _sub(ctx, m, "as_path", ppath, AS_PATH_KEYS, "{deny: [64666], max_length: 10}")
    if am is not None:
        apath = f"{ppath}.as_path"
        as_path = AsPathFilter(contains=tuple(_asn_list(ctx, am, "contains", apath)),
                               deny=tuple(_asn_list(ctx, am, "deny", apath)),
                               max_length=ctx.field(am, "max_length", apath, int_range(1, 255), default=None))
        both = set(as_path.contains) & set(as_path.deny)
        if both:
            ctx.error(am.line, apath, f"AS {min(both)} is both in contains and in deny")
    transit: list[str] = []
    if m.get("transit") is not None:
        raw = m["transit"]
        if not isinstance(raw, MarkedSeq):
            ctx.error(m.value_line("transit"), f"{ppath}.transit",
                      "expected a list of tunnel names whose routes may be re-exported, e.g. [to-b]")
        else:
            for i, item in enumerate(raw):
                try:
                    tname = to_str(item)
                except Bad as exc:
                    ctx.error(raw.item_line(i), f"{ppath}.transit[{i}]", str(exc))
                    continue
                if tname in transit:
                    ctx.error(raw.item_line(i), f"{ppath}.transit[{i}]", f"'{tname}' is listed twice")
                    continue
                transit.append(tname)
                ctx.policy_lines[name][f"transit[{i}]"] = raw.item_line(i)
    guards = Guards()
    gm = _sub(ctx, m, "guards", ppath, GUARD_KEYS, "{default_route: false}")
    if gm is not None:
        gpath = f"{ppath}.guards"
        d = Guards()
        guards = Guards(
            bogons=_or(ctx.field(gm, "bogons", gpath, to_bool, default=d.bogons), d.bogons),
            default_route=_or(ctx.field(gm, "default_route", gpath, to_bool, default=d.default_route),
                              d.default_route),
            max_length=_or(ctx.field(gm, "max_length", gpath, int_range(1, 32), default=d.max_length),
                           d.max_length),
            max_length6=_or(ctx.field(gm, "max_length6", gpath, int_range(1, 128), default=d.max_length6),
                            d.max_length6),
            own_prefixes=_or(ctx.field(gm, "own_prefixes", gpath, to_bool, default=d.own_prefixes),
                             d.own_prefixes))
    if len(ctx.issues) != n:
        return None
    return BgpPolicy(name=name, prefixes=tuple(prefixes), max_prefix=max_prefix, local_pref=local_pref,
                     med=med, prepend=prepend, communities=tuple(communities), as_path=as_path,
                     match_communities=tuple(match_communities), deny_communities=tuple(deny_communities),
                     remove_communities=tuple(remove_communities), transit=tuple(transit), guards=guards)


def _policy_uses(ctx: Ctx, bgp: BgpSettings) -> None:
    """Checks that depend on which tunnels use a policy, and how: direction-only keys, and the
    tunnels named by ``transit``."""
    bgp_tunnels = [t.name for t in ctx.partials if t.has_bgp]
    all_tunnels = [t.name for t in ctx.partials]
    for tname, direction, pname, use_line in ctx.policy_uses:
        lines = ctx.policy_lines.get(pname, {})
        wrong = EXPORT_ONLY_POLICY_KEYS if direction == "import" else IMPORT_ONLY_POLICY_KEYS
        for key in wrong:
            pol = bgp.policies.get(pname)
            if key in lines and pol is not None and getattr(pol, key) not in (0, (), None):
                ctx.tunnel = tname
                other = "export" if direction == "import" else "import"
                ctx.error(lines[key], f"bgp.policies.{pname}.{key}",
                          f"{key} applies to {other} only, but tunnel '{tname}' uses policy '{pname}' as its "
                          f"{direction} policy (line {use_line})")
        if direction == "export" and pname in bgp.policies and tname in bgp.policies[pname].transit:
            ctx.tunnel = tname
            i = bgp.policies[pname].transit.index(tname)
            ctx.error(lines.get(f"transit[{i}]", use_line), f"bgp.policies.{pname}.transit[{i}]",
                      f"tunnel '{tname}' exports with this policy: a route is never sent back to the tunnel "
                      f"it came from; remove '{tname}' from transit")
    ctx.tunnel = None
    for pname, pol in bgp.policies.items():
        lines = ctx.policy_lines.get(pname, {})
        for i, tname in enumerate(pol.transit):
            if tname in bgp_tunnels:
                continue
            line = lines.get(f"transit[{i}]", lines.get("transit", 0))
            if tname in all_tunnels:
                ctx.error(line, f"bgp.policies.{pname}.transit[{i}]",
                          f"tunnel '{tname}' has no bgp: block, so no routes are learned from it")
                continue
            close = difflib.get_close_matches(tname, bgp_tunnels, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(bgp_tunnels) or "none"
            ctx.error(line, f"bgp.policies.{pname}.transit[{i}]",
                      f"no tunnel named '{tname}'{hint} (tunnels with BGP: {known})")


def _prefix_match(ctx: Ctx, item: Any, line: int, path: str) -> PrefixMatch | None:
    if isinstance(item, str):
        try:
            return PrefixMatch(to_network(item))
        except Bad as exc:
            ctx.error(line, path, str(exc))
            return None
    m = ctx.mapping(item, path, line, "{prefix: 10.2.0.0/16, le: 24}")
    if m is None:
        return None
    ctx.keys(m, path, PREFIX_KEYS)
    n = len(ctx.issues)
    net = ctx.field(m, "prefix", path, to_network, required=True)
    maxlen = 32 if net is None or net.version == 4 else 128
    ge = ctx.field(m, "ge", path, int_range(0, maxlen), default=None)
    le = ctx.field(m, "le", path, int_range(0, maxlen), default=None)
    action = ctx.field(m, "action", path, choice("permit", "deny"), default="permit")
    if net is not None:
        if ge is not None and ge < net.prefixlen:
            ctx.error(m.value_line("ge"), f"{path}.ge",
                      f"ge {ge} is shorter than the prefix length /{net.prefixlen}; allowed: "
                      f"{net.prefixlen}..{maxlen}")
        if le is not None and le < max(net.prefixlen, ge or 0):
            ctx.error(m.value_line("le"), f"{path}.le",
                      f"le {le} is shorter than {'ge ' + str(ge) if ge else '/' + str(net.prefixlen)}; "
                      f"allowed: {max(net.prefixlen, ge or 0)}..{maxlen}")
    if len(ctx.issues) != n:
        return None
    return PrefixMatch(prefix=net, ge=ge, le=le, action=action)


# --- across tunnels ---

class _Networks:
    """Networks seen so far, for overlap checks in time proportional to the prefix length, not
    to the number of tunnels (a 1,000-tunnel config, issue 13). Two CIDR networks overlap when
    one contains the other: the earlier networks containing a new one are found among its own
    supernets, those inside it by the supernets every earlier network was filed under."""

    def __init__(self) -> None:
        self._n = 0
        self._exact: dict[tuple[int, int, int], list[tuple[int, Any, Any]]] = {}
        self._under: dict[tuple[int, int, int], list[tuple[int, Any, Any]]] = {}

    @staticmethod
    def _keys(net: Any):
        bits = net.max_prefixlen
        value = int(net.network_address)
        for plen in range(net.prefixlen + 1):
            yield (net.version, plen, value >> (bits - plen))

    def overlapping(self, net: Any) -> list[tuple[Any, Any]]:
        """Earlier (network, owner) pairs overlapping `net`, in the order they were added."""
        found: dict[int, tuple[int, Any, Any]] = {}
        for key in self._keys(net):
            for entry in self._exact.get(key, ()):
                found[entry[0]] = entry
        own = (net.version, net.prefixlen, int(net.network_address) >> (net.max_prefixlen - net.prefixlen))
        for entry in self._under.get(own, ()):
            found[entry[0]] = entry
        return [(e[1], e[2]) for _, e in sorted(found.items())]

    def add(self, net: Any, owner: Any) -> None:
        self._n += 1
        entry = (self._n, net, owner)
        keys = list(self._keys(net))
        self._exact.setdefault(keys[-1], []).append(entry)
        for key in keys[:-1]:
            self._under.setdefault(key, []).append(entry)


def _cross_tunnel(ctx: Ctx) -> None:
    """Interface names, if_ids and inside networks are unique; (remote, remote_id) tells tunnels apart."""
    names: dict[str, _Partial] = {}
    if_ids: dict[int, _Partial] = {}
    nets = _Networks()
    peers: dict[tuple[Any, Any], _Partial] = {}
    routed: dict[Any, _Partial] = {}
    for t in ctx.partials:
        ctx.tunnel = t.name
        path = f"tunnels.{t.name}"
        if t.ifname is not None:
            if t.ifname in names:
                o = names[t.ifname]
                ctx.error(t.seen.line("interface.name"), f"{path}.interface.name",
                          f"interface name '{t.ifname}' is already used by tunnel '{o.name}' (line {o.line}); "
                          f"each tunnel needs its own interface")
            else:
                names[t.ifname] = t
        name_clash = t.ifname is not None and names.get(t.ifname) is not t
        if t.if_id is not None and not (name_clash and "interface.if_id" not in t.seen.explicit):
            if t.if_id in if_ids:
                o = if_ids[t.if_id]
                explicit = "interface.if_id" in t.seen.explicit
                ctx.error(t.seen.line("interface.if_id"), f"{path}.interface.if_id",
                          f"if_id {t.if_id:#x} is already used by tunnel '{o.name}' (line {o.line}); "
                          + ("each tunnel needs its own" if explicit else
                             "the default derived from the interface name collides: set interface.if_id"))
            else:
                if_ids[t.if_id] = t
        for net, field_name in t.networks:
            for other_net, o in nets.overlapping(net):
                ctx.error(t.seen.line(f"interface.{field_name}"), f"{path}.interface.{field_name}",
                          f"inside network {net} overlaps {other_net} of tunnel '{o.name}' (line {o.line})")
        for net, _ in t.networks:
            nets.add(net, t)
        for net, line in t.routes:
            o = routed.get(net)
            if o is not None:
                ctx.error(line, f"{path}.routes",
                          f"{net} is already routed over tunnel '{o.name}' (line {o.line}); a prefix can be "
                          f"routed over one tunnel only")
            else:
                routed[net] = t
        if t.remote is not None and t.remote_id is not None:
            key = (t.remote, t.remote_id)
            if key in peers:
                o = peers[key]
                ctx.error(t.seen.line("remote_id" if "remote_id" in t.seen.explicit else "remote"),
                          f"{path}.remote_id",
                          f"tunnel '{o.name}' (line {o.line}) has the same remote {t.remote} and remote_id "
                          f"{t.remote_id}; the responder could not tell them apart")
            else:
                peers[key] = t
    ctx.tunnel = None
