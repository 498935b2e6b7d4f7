"""ExaBGP 5 as the route manager's BGP speaker: its configuration, its JSON API, its commands.

Pure functions, no I/O (the process and the pipe are :mod:`bgp.speaker`'s):

* :func:`neighbors_for` and :func:`render_config` turn the validated config into ExaBGP's
  configuration file: one ``neighbor`` per tunnel with a ``bgp:`` block (only for the tunnels
  the caller says are up), on the tunnel's inside addresses, IPv4 unicast and - with
  ``interface.address6`` - IPv6 unicast, hold time (ExaBGP sends keepalives every hold/3),
  graceful restart, route refresh, and one API process (the relay, :mod:`bgp.relay`) that gets
  parsed updates, state changes, notifications, negotiated parameters and End-of-RIB markers
  as JSON.
* :func:`parse_line` turns one line ExaBGP wrote into an :class:`ApiMessage` (or ``None`` for
  lines that mean nothing to us). It never raises: a truncated line, an unknown message type,
  a broken attribute is logged and skipped; the routes of an update whose AS path is
  longer than :data:`MAX_AS_PATH` are logged and treated as withdrawn (RFC 7606).
* :func:`announce_command` / :func:`withdraw_command` format API commands.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from netaddr import AddrFormatError, IPAddress, IPNetwork

from bgp.route import Origin, Route

log = logging.getLogger("isthmus.bgp.exabgp")

API_PROCESS = "isthmus"
MIN_HOLD_TIME = 3                 # RFC 4271 §4.2: 0 or at least 3 seconds
MAX_AS_PATH = 1000                # an update with a longer path is ignored (logged): a 4096-byte UPDATE holds < 1000 4-byte ASNs
MAX_LINE = 1 << 24                # a line longer than this is not parsed (logged)


# ====================================================================== configuration
@dataclass(frozen=True)
class NeighborSpec:
    """One ExaBGP neighbor (one tunnel's BGP session)."""

    tunnel: str
    peer_address: IPAddress
    local_address: IPAddress
    local_as: int
    peer_as: int
    router_id: IPAddress
    hold_time: int
    families: tuple[str, ...]                 # "ipv4 unicast" or "ipv6 unicast"
    graceful_restart: int = 0                 # RFC 4724 restart time advertised, 0 = not advertised
    passive: bool = False

    @property
    def ebgp(self) -> bool:
        return self.local_as != self.peer_as


class NeighborError(ValueError):
    """A tunnel's bgp block cannot be turned into an ExaBGP neighbor (the message says why)."""


def neighbor_for(tunnel: Any, asn: int, router_id: IPAddress) -> list[NeighborSpec]:
    """The neighbors of one tunnel (appliance.config.model.Tunnel with a ``bgp`` block): the
    session on ``peer_address`` (IPv4 unicast over interface.address, or IPv6 unicast over
    address6), plus, with ``peer_address6``, an IPv6 unicast session over address6."""
    b = tunnel.bgp
    if b is None:
        raise NeighborError(f"tunnel {tunnel.name} has no bgp block")
    iface = tunnel.interface
    a4 = IPAddress(str(iface.address.ip)) if iface.address is not None else None
    a6 = IPAddress(str(iface.address6.ip)) if iface.address6 is not None else None
    hold = int(b.hold_time)
    if hold != 0 and hold < MIN_HOLD_TIME:
        hold = MIN_HOLD_TIME
    common = dict(tunnel=tunnel.name, local_as=asn, peer_as=int(b.peer_as), router_id=router_id, hold_time=hold,
                  graceful_restart=int(getattr(b, "graceful_restart", 0) or 0),
                  passive=bool(getattr(b, "passive", False)))
    out = []
    peers = [IPAddress(str(b.peer_address))]
    if getattr(b, "peer_address6", None) is not None:
        peers.append(IPAddress(str(b.peer_address6)))
    for peer in peers:
        local = a4 if peer.version == 4 else a6
        if local is None:
            raise NeighborError(f"tunnel {tunnel.name}: BGP peer {peer} is IPv{peer.version} but the interface has "
                                f"no {'address' if peer.version == 4 else 'address6'}")
        out.append(NeighborSpec(peer_address=peer, local_address=local,
                                families=(f"ipv{peer.version} unicast",), **common))
    return out


def router_id_of(config: Any) -> IPAddress:
    """bgp.router_id, else appliance.router_id, else the first tunnel's inside IPv4 address."""
    rid = config.bgp.router_id if config.bgp is not None else None
    rid = rid or config.appliance.router_id
    if rid is None:
        for t in config.tunnels.values():
            if t.bgp is not None and t.interface.address is not None:
                rid = t.interface.address.ip
                break
    if rid is None:
        raise NeighborError("no BGP router id: set bgp.router_id or appliance.router_id")
    return IPAddress(str(rid))


def neighbors_for(config: Any, tunnels: Iterable[str] | None = None) -> dict[str, list[NeighborSpec]]:
    """tunnel name -> its neighbors, for every tunnel with a bgp block (or only those in `tunnels`).
    Tunnels whose block cannot be rendered are logged and left out (the others still work)."""
    if config.bgp is None:
        return {}
    rid = router_id_of(config)
    wanted = None if tunnels is None else set(tunnels)
    out = {}
    for name, t in config.tunnels.items():
        if t.bgp is None or (wanted is not None and name not in wanted):
            continue
        try:
            out[name] = neighbor_for(t, config.bgp.asn, rid)
        except NeighborError as e:
            log.error("%s", e, extra={"tunnel": name})
    return out


def render_config(neighbors: Sequence[NeighborSpec], relay_argv: Sequence[str]) -> str:
    """ExaBGP's configuration file: the API process and one block per neighbor."""
    run = " ".join(_quote_arg(a) for a in relay_argv)
    lines = [
        "# generated by isthmusd (bgp/exabgp.py); do not edit - rewritten on every change",
        f"process {API_PROCESS} {{",
        f"    run {run};",
        "    encoder json;",
        "}",
    ]
    for n in sorted(neighbors, key=lambda n: (n.tunnel, n.peer_address.version)):
        lines += [
            f"neighbor {n.peer_address} {{",
            f"    description \"{n.tunnel}\";",
            f"    router-id {n.router_id};",
            f"    local-address {n.local_address};",
            f"    local-as {n.local_as};",
            f"    peer-as {n.peer_as};",
            f"    hold-time {n.hold_time};",
            "    group-updates true;",
            "    adj-rib-out true;",        # route refresh needs it (ExaBGP turns it on anyway)
            "    family {",
            *(f"        {f};" for f in n.families),
            "    }",
            "    capability {",
            "        asn4 enable;",
            "        route-refresh enable;",
            *([f"        graceful-restart {n.graceful_restart};"] if n.graceful_restart else []),
            "    }",
            *(["    passive true;"] if n.passive else []),
            "    api {",
            f"        processes [ {API_PROCESS} ];",
            "        neighbor-changes;",
            "        negotiated;",
            "        receive { parsed; update; notification; refresh; open; }",
            "    }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _quote_arg(a: str) -> str:
    if not a or any(c in a for c in " ;{}\"'\t\n"):
        raise NeighborError(f"cannot pass {a!r} to ExaBGP's run line (spaces, quotes or ; in a path)")
    return a


def exabgp_env(log_file: str | None = None) -> dict[str, str]:
    """Environment settings for ``exabgp server`` (LAB.md: it must not drop to nobody, or it loses
    its API process). It listens on every address (peers connect to us too: two appliances both
    only dialling out would never meet), never forks, and has no CLI pipes."""
    env = {
        "exabgp_daemon_user": "root",
        "exabgp_daemon_daemonize": "false",
        "exabgp_daemon_drop": "false",
        "exabgp_api_cli": "false",
        "exabgp_api_ack": "true",
        "exabgp_api_respawn": "true",
        "exabgp_api_terminate": "false",
        "exabgp_tcp_bind": "0.0.0.0 ::",
        "exabgp_log_level": "INFO",
        "exabgp_log_packets": "false",
        "exabgp_log_routes": "false",
        "exabgp_log_parser": "false",
    }
    if log_file:
        env["exabgp_log_destination"] = log_file
    return env


# ====================================================================== commands
def announce_command(peer: IPAddress, route: Route, next_hop: IPAddress | str | None = None) -> str:
    """``neighbor PEER announce route ...`` for one of our announcements, after export policy:
    its AS_PATH is sent as is (ExaBGP adds nothing to a path it is given; the policy put our AS
    first), its next hop is the route's (our inside address) or ``self``."""
    if next_hop is None:
        next_hop = route.next_hop if route.next_hop is not None else "self"
    parts = [f"neighbor {peer} announce route {route.prefix.cidr}", f"next-hop {next_hop}",
             f"origin {route.origin.name.lower()}"]
    if route.as_path:
        parts.append("as-path [ " + " ".join(str(a) for a in route.as_path) + " ]")
    if route.med is not None:
        parts.append(f"med {route.med}")
    if route.local_pref is not None:
        parts.append(f"local-preference {route.local_pref}")
    if route.communities:
        parts.append("community [ " + " ".join(f"{a}:{v}" for a, v in route.communities) + " ]")
    if route.large_communities:
        parts.append("large-community [ " + " ".join(f"{a}:{b}:{c}" for a, b, c in route.large_communities) + " ]")
    return " ".join(parts)


def withdraw_command(peer: IPAddress, prefix: IPNetwork) -> str:
    return f"neighbor {peer} withdraw route {prefix.cidr}"


def teardown_command(peer: IPAddress, subcode: int = 2) -> str:
    """Cease NOTIFICATION (RFC 4486 subcode 2 = administrative shutdown) and reconnect."""
    return f"neighbor {peer} teardown {subcode}"


# ====================================================================== API messages
@dataclass(frozen=True)
class ApiMessage:
    """One thing ExaBGP told us. kind: ack | state | update | eor | notification | negotiated |
    refresh | shutdown."""

    kind: str
    peer: IPAddress | None = None
    local: IPAddress | None = None
    peer_as: int | None = None
    state: str | None = None              # state: up | down | connected
    reason: str = ""
    ok: bool = True                       # ack: done (True) or error (False)
    announced: tuple[Route, ...] = ()
    withdrawn: tuple[IPNetwork, ...] = ()
    family: str | None = None             # eor: "ipv4 unicast"
    hold_time: int | None = None          # negotiated / open
    router_id: IPAddress | None = None    # open
    notification: dict = field(default_factory=dict)
    direction: str | None = None


class HugeAsPath(ValueError):
    """An AS_PATH longer than MAX_AS_PATH: the update is not used."""


class ParseStats:
    """Counts of what parse_line skipped (for metrics and tests)."""

    def __init__(self) -> None:
        self.malformed = 0
        self.unknown = 0
        self.huge_as_paths = 0


STATS = ParseStats()


def parse_line(line: str | bytes, neighbor_name: Any = None) -> ApiMessage | None:
    """One line from ExaBGP -> ApiMessage, or None (nothing for us, or bad input: logged).

    `neighbor_name(peer_address) -> str` names the route's neighbor (the tunnel); "" if None."""
    try:
        return _parse_line(line, neighbor_name)
    except Exception as e:  # noqa: BLE001 - no input from ExaBGP's side may stop the route manager
        STATS.malformed += 1
        log.warning("ExaBGP API: cannot use a line (%s: %s): %s", type(e).__name__, e, _excerpt(line))
        return None


def _excerpt(line: str | bytes, n: int = 200) -> str:
    s = line if isinstance(line, str) else line.decode("utf-8", "replace")
    return repr(s[:n] + ("..." if len(s) > n else ""))


def _parse_line(line: str | bytes, neighbor_name: Any) -> ApiMessage | None:
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    if len(line) > MAX_LINE:
        STATS.malformed += 1
        log.warning("ExaBGP API: a %d-byte line ignored (longer than %d)", len(line), MAX_LINE)
        return None
    text = line.strip()
    if not text:
        return None
    if text in ("done", "error"):
        return ApiMessage("ack", ok=text == "done")
    if not text.startswith("{"):
        STATS.unknown += 1
        log.info("ExaBGP API: ignored a non-JSON line: %s", _excerpt(text))
        return None
    try:
        msg = json.loads(text)
    except ValueError as e:
        STATS.malformed += 1
        log.warning("ExaBGP API: malformed JSON ignored (%s): %s", e, _excerpt(text))
        return None
    if not isinstance(msg, dict):
        STATS.malformed += 1
        log.warning("ExaBGP API: JSON that is not an object ignored: %s", _excerpt(text))
        return None
    mtype = msg.get("type")
    if mtype == "notification" and "neighbor" not in msg:
        return ApiMessage("shutdown", reason=str(msg.get("notification", "")))
    nb = msg.get("neighbor")
    if not isinstance(nb, dict):
        STATS.unknown += 1
        log.info("ExaBGP API: ignored a %r message without a neighbor", mtype)
        return None
    addr = nb.get("address") or {}
    peer = _ip(addr.get("peer"))
    local = _ip(addr.get("local"))
    asn = nb.get("asn") or {}
    peer_as = _int(asn.get("peer"))
    local_as = _int(asn.get("local"))
    base = dict(peer=peer, local=local, peer_as=peer_as, direction=nb.get("direction"))
    if mtype == "state":
        state = nb.get("state")
        if state not in ("up", "down", "connected"):
            STATS.unknown += 1
            log.info("ExaBGP API: unknown neighbor state %r ignored", state)
            return None
        return ApiMessage("state", state=state, reason=str(nb.get("reason") or ""), **base)
    if mtype == "negotiated":
        neg = nb.get("negotiated") or {}
        return ApiMessage("negotiated", hold_time=_int(neg.get("hold_time")), **base)
    if mtype == "notification":
        n = nb.get("notification") or {}
        return ApiMessage("notification", notification={k: n.get(k) for k in ("code", "subcode", "message")},
                          **base)
    if mtype == "open":
        o = nb.get("open") or {}
        return ApiMessage("open", router_id=_ip(o.get("router_id")), hold_time=_int(o.get("hold_time")), **base)
    if mtype == "refresh":
        return ApiMessage("refresh", **base)
    if mtype != "update":
        STATS.unknown += 1
        log.info("ExaBGP API: ignored a message of type %r", mtype)
        return None
    if peer is None:
        raise ValueError("update without a peer address")
    message = nb.get("message") or {}
    if "eor" in message:
        eor = message.get("eor") or {}
        return ApiMessage("eor", family=f"{eor.get('afi')} {eor.get('safi')}", **base)
    update = message.get("update") or {}
    name = neighbor_name(peer) if neighbor_name is not None else ""
    attrs = update.get("attribute") or {}
    ebgp = peer_as is None or local_as is None or peer_as != local_as
    treat_as_withdraw = False
    try:
        common = _attributes(attrs, name, peer_as or 0, ebgp)
    except HugeAsPath as e:
        STATS.huge_as_paths += 1
        log.warning("ExaBGP API: an update from %s with an AS_PATH of %d ASNs (more than %d): its routes are "
                    "treated as withdrawn (RFC 7606)", peer, e.args[0], MAX_AS_PATH)
        treat_as_withdraw, common = True, {}
    announced: list[Route] = []
    withdrawn: list[IPNetwork] = []
    for family, by_nh in (update.get("announce") or {}).items():
        if not _unicast(family) or not isinstance(by_nh, dict):
            continue
        for nh, nlris in by_nh.items():
            next_hop = _ip(nh) or peer
            # one Route built per next hop; each prefix is a copy of it (Route.__init__ of a
            # frozen dataclass is the expensive part of a 100k-prefix feed)
            template = None if treat_as_withdraw else Route(prefix=_NO_PREFIX, next_hop=next_hop, **common)
            for nlri in nlris or ():
                p = _nlri(nlri)
                if p is not None and template is None:
                    withdrawn.append(p)
                elif p is not None:
                    r = _new(Route)
                    d = r.__dict__
                    d.update(template.__dict__)
                    d["prefix"] = p
                    announced.append(r)
    for family, nlris in (update.get("withdraw") or {}).items():
        if not _unicast(family) or not isinstance(nlris, list):
            continue
        for nlri in nlris:
            p = _nlri(nlri)
            if p is not None:
                withdrawn.append(p)
    return ApiMessage("update", announced=tuple(announced), withdrawn=tuple(withdrawn), **base)


def _unicast(family: str) -> bool:
    if family in ("ipv4 unicast", "ipv6 unicast"):
        return True
    STATS.unknown += 1
    log.debug("ExaBGP API: family %r ignored", family)
    return False


def _ip(v: Any) -> IPAddress | None:
    if not isinstance(v, str):
        return None
    try:
        return IPAddress(v)
    except (AddrFormatError, ValueError, TypeError):
        return None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


_new = object.__new__
_NO_PREFIX = IPNetwork("0.0.0.0/0")
_inet_pton = socket.inet_pton


def _nlri(n: Any) -> IPNetwork | None:
    text = n.get("nlri") if isinstance(n, dict) else n
    if not isinstance(text, str):
        STATS.malformed += 1
        log.warning("ExaBGP API: NLRI %s ignored", _excerpt(str(n)))
        return None
    # IPv4 "a.b.c.d/len", the bulk of any feed: parsed strictly (inet_pton) and built from
    # (int, length), several times faster than netaddr's text parser; anything else goes to it
    addr, slash, plen = text.partition("/")
    if slash and "." in addr and plen.isdigit() and len(plen) <= 2:
        try:
            value = int.from_bytes(_inet_pton(socket.AF_INET, addr), "big")
        except OSError:
            value = None
        n_ = int(plen)
        if value is not None and n_ <= 32:
            return IPNetwork((value & (0xFFFFFFFF ^ ((1 << (32 - n_)) - 1)), n_), version=4)
    try:
        return IPNetwork(text).cidr
    except (AddrFormatError, ValueError, TypeError):
        STATS.malformed += 1
        log.warning("ExaBGP API: NLRI %s ignored", _excerpt(text))
        return None


_ORIGINS = {"igp": Origin.IGP, "egp": Origin.EGP, "incomplete": Origin.INCOMPLETE}


def _attributes(attrs: dict, name: str, peer_as: int, ebgp: bool) -> dict[str, Any]:
    if not isinstance(attrs, dict):
        attrs = {}
    path: list[int] = []
    ap = attrs.get("as-path")
    segments: list[Any] = []
    if isinstance(ap, dict):        # ExaBGP 5: {"0": {"element": "as-sequence", "value": [..]}, ...}
        segments = [ap[k] for k in sorted(ap, key=lambda k: int(k) if str(k).isdigit() else 0)]
    elif isinstance(ap, list):      # ExaBGP 4: a flat list
        segments = [{"value": ap}]
    for seg in segments:
        values = seg.get("value") if isinstance(seg, dict) else seg
        if not isinstance(values, list):
            continue
        for a in values:
            if isinstance(a, int) and not isinstance(a, bool) and 0 <= a < 1 << 32:
                path.append(a)
        if len(path) > MAX_AS_PATH:
            raise HugeAsPath(len(path))
    comms = tuple((c[0], c[1]) for c in attrs.get("community") or ()
                  if isinstance(c, list) and len(c) == 2 and all(isinstance(x, int) for x in c))
    large = tuple((c[0], c[1], c[2]) for c in attrs.get("large-community") or ()
                  if isinstance(c, list) and len(c) == 3 and all(isinstance(x, int) for x in c))
    origin = _ORIGINS.get(str(attrs.get("origin", "igp")).lower(), Origin.INCOMPLETE)
    return dict(neighbor=name, as_path=tuple(path), origin=origin, med=_int(attrs.get("med")),
                local_pref=_int(attrs.get("local-preference")) if not ebgp else None,
                communities=comms, large_communities=large, peer_as=peer_as, ebgp=ebgp)
