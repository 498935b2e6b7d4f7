"""Child SA state (RFC 7296 §1.3, §2.17) and traffic selector narrowing (§2.9)."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from appliance.ike.constants import DhId, EsnId, IntegId, ProtocolId, TransformType
from appliance.ike.crypto import ChildKeys
from appliance.ike.message import TS_IPV4_ADDR_RANGE, TS_IPV6_ADDR_RANGE, TrafficSelector
from appliance.ike.proposals import Proposal, Transform


class ChildState(enum.Enum):
    INSTALLED = "installed"    # in use
    REKEYING = "rekeying"      # we sent a CREATE_CHILD_SA to rekey it
    REKEYED = "rekeyed"        # replaced; waiting for its DELETE exchange
    DELETING = "deleting"      # we sent a DELETE for it
    DELETED = "deleted"


@dataclass(eq=False)
class ChildSa:
    """One ESP SA pair. `spi_in` is the SPI we chose (the peer sends to it), `spi_out` the
    peer's. The nonces are those of the exchange that created the pair (IKE_SA_INIT's for the
    first Child SA), kept to resolve rekey collisions (§2.8.1)."""

    spi_in: bytes
    spi_out: bytes
    proposal: Proposal
    keys: ChildKeys = field(repr=False)
    we_initiated: bool
    nonce_i: bytes = field(repr=False)
    nonce_r: bytes = field(repr=False)
    ts_i: list[TrafficSelector]
    ts_r: list[TrafficSelector]
    created_at: float
    rekey_at: float
    expire_at: float
    state: ChildState = ChildState.INSTALLED
    outbound_installed: bool = True
    # The pair that replaced this one in a rekey the *peer* initiated (we answered it; its
    # outbound SA waits for this pair's DELETE, RFC 7296 §2.8).
    rekeyed_by: "ChildSa | None" = None
    # The pair this one replaces, if it was created by a rekey.
    replaces: "ChildSa | None" = None
    # Set when a rekey collision (§2.8.1) made this pair redundant: it is being deleted.
    redundant: bool = False
    rekey_retry_at: float | None = None
    # Delete it ourselves at this time if the peer has not (a pair the peer should delete
    # after a rekey or a collision, RFC 7296 §2.8/§2.8.1).
    delete_at: float | None = None

    @property
    def spi_in_int(self) -> int:
        return int.from_bytes(self.spi_in, "big")

    @property
    def spi_out_int(self) -> int:
        return int.from_bytes(self.spi_out, "big")

    @property
    def alive(self) -> bool:
        return self.state != ChildState.DELETED

    @property
    def in_use(self) -> bool:
        """Counts as the tunnel's Child SA (not replaced, not being deleted)."""
        return self.state in (ChildState.INSTALLED, ChildState.REKEYING) and not self.redundant

    def lowest_nonce(self) -> bytes:
        return min(self.nonce_i, self.nonce_r)

    def encr(self) -> Transform:
        t = self.proposal.only(TransformType.ENCR)
        if t is None:   # child_keymat_for refuses such a proposal before any ChildSa exists
            raise ValueError(f"Child SA proposal {self.proposal} has no encryption transform")
        return t

    def integ_id(self) -> int | None:
        t = self.proposal.only(TransformType.INTEG)
        return None if t is None or t.id == IntegId.NONE else int(t.id)

    def esn(self) -> bool:
        t = self.proposal.only(TransformType.ESN)
        return t is not None and t.id == EsnId.ESN

    def keys_in_out(self) -> tuple[bytes, bytes, bytes, bytes]:
        """(encr_in, integ_in, encr_out, integ_out)."""
        k = self.keys
        if self.we_initiated:
            return k.er, k.ar, k.ei, k.ai
        return k.ei, k.ai, k.er, k.ar

    def describe(self) -> str:
        return f"{self.spi_in.hex()}_i {self.spi_out.hex()}_o"


# --------------------------------------------------------------------------- proposals


def esp_proposals_with_spi(proposals: tuple[Proposal, ...], spi: bytes, *, with_dh: bool) -> list[Proposal]:
    """Our ESP proposals numbered from 1 with our SPI; without DH transforms for IKE_AUTH
    (the first Child SA takes its keys from the IKE SA, RFC 7296 §1.2)."""
    out = []
    for n, p in enumerate(proposals, 1):
        if not with_dh:
            p = strip_dh(p)
        out.append(Proposal(ProtocolId.ESP, p.transforms, n, spi))
    return out


def strip_dh(p: Proposal) -> Proposal:
    return p.without_dh


def pfs_group(p: Proposal) -> int | None:
    """The key exchange method a (selected or first offered) ESP proposal asks for, if any."""
    for t in p.transforms:
        if t.type == TransformType.DH and t.id != DhId.NONE:
            return int(t.id)
    return None


# --------------------------------------------------------------------------- traffic selectors

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def selectors_for(nets: tuple[Net, ...]) -> list[TrafficSelector]:
    """Traffic selectors covering our configured networks (all protocols and ports)."""
    out = []
    for n in nets:
        t = TS_IPV4_ADDR_RANGE if n.version == 4 else TS_IPV6_ADDR_RANGE
        out.append(TrafficSelector(t, n.network_address.packed, n.broadcast_address.packed))
    return out


def _ranges(nets: tuple[Net, ...]) -> tuple[tuple[int, int, int], ...]:
    """(IP version, first, last address as integers) of each network; kept per tuple object
    (the tunnel configuration's networks are one tuple for the tunnel's life)."""
    hit = _RANGES.get(id(nets))
    if hit is not None and hit[0] is nets:
        return hit[1]
    ranges = tuple((n.version, int(n.network_address), int(n.broadcast_address)) for n in nets)
    if len(_RANGES) >= 1024:
        _RANGES.clear()
    _RANGES[id(nets)] = (nets, ranges)   # holds `nets`, so its id is not reused meanwhile
    return ranges


_RANGES: dict[int, tuple[tuple, tuple[tuple[int, int, int], ...]]] = {}


def narrow(theirs: list[TrafficSelector], ours: tuple[Net, ...]) -> list[TrafficSelector]:
    """Responder narrowing (§2.9): each of their selectors intersected with our networks."""
    out: list[TrafficSelector] = []
    ranges = _ranges(ours)
    for ts in theirs:
        lo = int.from_bytes(ts.start_addr, "big")
        hi = int.from_bytes(ts.end_addr, "big")
        if lo > hi or ts.start_port > ts.end_port:
            continue
        version = 4 if ts.ts_type == TS_IPV4_ADDR_RANGE else 6
        for n_version, nlo, nhi in ranges:
            if n_version != version:
                continue
            a, b = max(lo, nlo), min(hi, nhi)
            if a > b:
                continue
            if a == lo and b == hi:
                sel = ts   # inside our network already (frozen: the same selector will do)
            else:
                size = len(ts.start_addr)
                sel = TrafficSelector(ts.ts_type, a.to_bytes(size, "big"), b.to_bytes(size, "big"),
                                      ts.ip_protocol, ts.start_port, ts.end_port)
            if sel not in out:
                out.append(sel)
    return out


def covered(inner: list[TrafficSelector], outer: list[TrafficSelector]) -> bool:
    """Every selector of `inner` lies inside one of `outer` (initiator's check of a reply)."""
    def inside(a: TrafficSelector, b: TrafficSelector) -> bool:
        return (a.ts_type == b.ts_type
                and b.start_addr <= a.start_addr and a.end_addr <= b.end_addr
                and (b.ip_protocol == 0 or a.ip_protocol == b.ip_protocol)
                and b.start_port <= a.start_port and a.end_port <= b.end_port)
    return bool(inner) and all(any(inside(a, b) for b in outer) for a in inner)
