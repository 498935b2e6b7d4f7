"""Events the IKE engine reports to its driver (the daemon): small frozen dataclasses.

The data plane needs four of them: ChildSaInstalled (add the inbound SA and, when `outbound`
is true, the outbound SA), ChildSaOutboundInstalled (now add the outbound SA of a pair
reported earlier with `outbound=False`), ChildSaOutboundRemoved (stop sending on a pair whose
DELETE is under way) and ChildSaDeleted (remove whatever is left of a pair).
Make-before-break (RFC 7296 §2.8): on a Child SA rekey the new pair is always reported before
the old pair is deleted, and the tunnel's `if_id` stays the same.

Key material is carried in fields with repr=False; no event's repr shows a key or a PSK.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class IkeSaUp:
    """An IKE SA finished IKE_AUTH (not a rekey: that is IkeSaRekeyed)."""

    tunnel: str
    spi_i: bytes
    spi_r: bytes
    initiator: bool
    local: Endpoint
    remote: Endpoint
    local_id: str
    remote_id: str
    proposal: str


@dataclass(frozen=True)
class IkeSaRekeyed:
    """The IKE SA was replaced by a new one (RFC 7296 §2.18); the Child SAs moved over."""

    tunnel: str
    old_spi_i: bytes
    old_spi_r: bytes
    new_spi_i: bytes
    new_spi_r: bytes
    proposal: str


@dataclass(frozen=True)
class IkeSaAddressesUpdated:
    """The peer's address or port changed (a NAT rebinding, RFC 7296 §2.23, seen on an
    authenticated message): the tunnel's Child SAs now run between `local` and `remote`
    ((address, port) pairs; ESP in UDP between those ports when `udp_encap`). The data plane
    moves its SAs in place; nothing is rekeyed."""

    tunnel: str
    spi_i: bytes
    spi_r: bytes
    local: Endpoint
    remote: Endpoint
    udp_encap: bool


@dataclass(frozen=True)
class IkeSaDown:
    """An established IKE SA is gone (deleted by either side, expired, or the peer is dead).
    Its Child SAs were reported deleted before this event."""

    tunnel: str
    spi_i: bytes
    spi_r: bytes
    reason: str


@dataclass(frozen=True)
class IkeSaFailed:
    """An IKE SA could not be established (no proposal chosen, timeout, half-open expiry, ...)."""

    tunnel: str
    reason: str


@dataclass(frozen=True)
class AuthFailed:
    """Authentication failed (ours refused by the peer, or the peer's AUTH wrong). The reason
    names what failed and never contains a secret."""

    tunnel: str
    reason: str


@dataclass(frozen=True)
class ChildSaInstalled:
    """A Child SA pair exists: everything the data plane needs to install it.

    SPIs are 32-bit integers as the kernel takes them. `encr_key_*` include the AEAD salt where
    the transform has one (AES-GCM: key + 4-octet salt, RFC 4106 §8.1; ChaCha20-Poly1305 32+4,
    RFC 7634). `integ_id` is None for AEAD transforms. Addresses are the outer (tunnel)
    addresses; with `udp_encap` ESP travels in UDP between `local_port` and `remote_port`
    (RFC 3948). When `outbound` is false only the inbound SA may be installed now: the outbound
    one follows with ChildSaOutboundInstalled (the responder of a rekey waits for the old SA's
    DELETE before it sends on the new one). `replaces` names the pair this one rekeys.
    """

    tunnel: str
    spi_in: int
    spi_out: int
    protocol: int
    encr_id: int
    encr_key_bits: int | None
    integ_id: int | None
    esn: bool
    local_addr: str
    remote_addr: str
    local_port: int
    remote_port: int
    udp_encap: bool
    if_id: int
    lifetime_soft: float
    lifetime_hard: float
    outbound: bool
    replaces: tuple[int, int] | None = None
    encr_key_in: bytes = field(default=b"", repr=False)
    encr_key_out: bytes = field(default=b"", repr=False)
    integ_key_in: bytes = field(default=b"", repr=False)
    integ_key_out: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class ChildSaOutboundInstalled:
    """Install now the outbound SA of the pair reported earlier with `outbound=False`."""

    tunnel: str
    spi_in: int
    spi_out: int


@dataclass(frozen=True)
class ChildSaOutboundRemoved:
    """Stop sending on this pair now (we sent its DELETE); its inbound SA stays until
    ChildSaDeleted, for packets the peer sent before it processed the DELETE."""

    tunnel: str
    spi_in: int
    spi_out: int


@dataclass(frozen=True)
class ChildSaRekeyed:
    """The pair (old_spi_in, old_spi_out) was rekeyed by (new_spi_in, new_spi_out). The new
    pair was reported by ChildSaInstalled first; the old pair's ChildSaDeleted follows."""

    tunnel: str
    old_spi_in: int
    old_spi_out: int
    new_spi_in: int
    new_spi_out: int


@dataclass(frozen=True)
class ChildSaDeleted:
    """Remove both SAs of this pair."""

    tunnel: str
    spi_in: int
    spi_out: int
    reason: str


@dataclass(frozen=True)
class ChildSaFailed:
    """A Child SA could not be created or rekeyed (e.g. TS_UNACCEPTABLE, NO_PROPOSAL_CHOSEN)."""

    tunnel: str
    reason: str


@dataclass(frozen=True)
class PeerDead:
    """The liveness check (DPD, RFC 7296 §2.4) went unanswered; `action` is what follows
    (clear | restart | hold)."""

    tunnel: str
    spi_i: bytes
    spi_r: bytes
    action: str


Event = (IkeSaUp | IkeSaRekeyed | IkeSaAddressesUpdated | IkeSaDown | IkeSaFailed | AuthFailed | ChildSaInstalled
         | ChildSaOutboundInstalled | ChildSaOutboundRemoved | ChildSaRekeyed | ChildSaDeleted | ChildSaFailed | PeerDead)
