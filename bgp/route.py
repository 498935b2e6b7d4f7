"""The route as the route manager sees it: one path to one prefix, with its BGP attributes.

Pure data (frozen dataclasses, no I/O). ``bgp/exabgp.py`` builds these from ExaBGP's JSON;
``bgp/policy.py`` and ``bgp/rib.py`` only read and copy them (``dataclasses.replace``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from netaddr import IPAddress, IPNetwork


class Origin(IntEnum):          # RFC 4271 ORIGIN; lower is preferred
    IGP = 0
    EGP = 1
    INCOMPLETE = 2


Community = tuple[int, int]                 # (asn16, value16), e.g. (65001, 100)
LargeCommunity = tuple[int, int, int]       # RFC 8092 (global administrator, data 1, data 2)

# RFC 1997 well-known communities.
NO_EXPORT: Community = (0xFFFF, 0xFF01)
NO_ADVERTISE: Community = (0xFFFF, 0xFF02)
NO_EXPORT_SUBCONFED: Community = (0xFFFF, 0xFF03)


@dataclass(frozen=True)
class Route:
    prefix: IPNetwork               # normalised (.cidr)
    next_hop: IPAddress
    neighbor: str                   # tunnel name the route came from; "" for our own (bgp.announce)
    as_path: tuple[int, ...] = ()   # AS_SEQUENCE flattened, leftmost = neighbor's AS (AS_SET members appended)
    origin: Origin = Origin.IGP
    med: int | None = None
    local_pref: int | None = None   # None = not set (the default, 100, is applied by best path)
    communities: tuple[Community, ...] = ()
    large_communities: tuple[LargeCommunity, ...] = ()
    peer_as: int = 0                # AS of the neighbor it came from (0 for our own)
    peer_router_id: IPAddress | None = None
    ebgp: bool = True
