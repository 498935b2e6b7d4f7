"""NAT detection (RFC 7296 §2.23): NAT_DETECTION_SOURCE_IP / NAT_DETECTION_DESTINATION_IP.

Each message carries hashes of the sender's view of its own address and port (SOURCE) and of
the receiver's (DESTINATION), computed with the SPIs of that message's IKE header. A receiver
whose own address does not match the DESTINATION hash is behind a NAT; one for which no SOURCE
hash matches where the datagram came from talks to a peer behind a NAT.

A tunnel's `nat_traversal` decides what we do with it: "auto" sends and checks the hashes,
"force" sends a random NAT_DETECTION_SOURCE_IP hash (strongSwan's encap=yes, "faking NAT
situation to enforce UDP encapsulation") so the peer sees a NAT in front of us, and both sides
use port 4500 and UDP-encapsulated ESP; "off" sends no NAT detection and ignores the peer's, so
the SA never floats (§2.23: the payloads are optional).
"""

from __future__ import annotations

import functools
import ipaddress

from appliance.ike.constants import NotifyType
from appliance.ike.crypto import nat_detection_hash
from appliance.ike.message import Message, Notify

Endpoint = tuple[str, int]


def _hash(spi_i: bytes, spi_r: bytes, ep: Endpoint) -> bytes:
    return nat_detection_hash(spi_i, spi_r, _packed(ep[0]), ep[1])


@functools.lru_cache(maxsize=4096)
def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def payloads(spi_i: bytes, spi_r: bytes, local: Endpoint, remote: Endpoint,
             fake_source: bytes | None = None) -> list[Notify]:
    """Our NAT_DETECTION_SOURCE_IP and _DESTINATION_IP; `fake_source` (20 random octets)
    replaces the source hash to make the peer see a NAT ("force")."""
    source = fake_source if fake_source is not None else _hash(spi_i, spi_r, local)
    return [Notify(NotifyType.NAT_DETECTION_SOURCE_IP, data=source),
            Notify(NotifyType.NAT_DETECTION_DESTINATION_IP, data=_hash(spi_i, spi_r, remote))]


def mode(config, candidates) -> str:
    """The `nat_traversal` setting that applies: the tunnel's once it is known; before IKE_AUTH
    a responder has only the candidate tunnels for the addresses: "off" when all are off,
    "force" when one forces, else "auto"."""
    if config is not None:
        return config.nat_traversal
    known = getattr(candidates, "nat_mode", None)     # engine.Candidates keeps it
    if known is not None:
        return known
    modes = {c.nat_traversal for c in candidates}
    m = "off" if modes == {"off"} else "force" if "force" in modes else "auto"
    if hasattr(candidates, "nat_mode"):
        candidates.nat_mode = m
    return m


def our_payloads(sa, spi_r: bytes, local: Endpoint, remote: Endpoint) -> list[Notify]:
    """The NAT detection notifies `sa` sends in IKE_SA_INIT (none with nat_traversal off)."""
    m = mode(sa.config, sa.candidates)
    if m == "off":
        return []
    fake = sa.random(20) if m == "force" else None
    return payloads(sa.spi_i, spi_r, local, remote, fake)


def apply(sa, msg: Message, local: Endpoint, remote: Endpoint) -> None:
    """Record on `sa` what the peer's IKE_SA_INIT NAT detection says (nat_local, nat_remote,
    nat_fake), as its `nat_traversal` setting allows."""
    m = mode(sa.config, sa.candidates)
    if m == "off":
        return
    nat = check(msg, local, remote)
    if nat is None:
        return   # the peer does not do NAT-T: nothing to float to, forced or not
    sa.nat_local, sa.nat_remote = nat
    sa.nat_fake = m == "force"


def check(msg: Message, local: Endpoint, remote: Endpoint) -> tuple[bool, bool] | None:
    """(we are behind a NAT, the peer is behind a NAT) from a received message's NAT-D
    notifies (its header SPIs), `local` being where it arrived and `remote` where it came from;
    None when the peer sent no NAT detection (then no NAT is assumed)."""
    notifies = msg.notifies()
    src = [n.data for n in notifies if n.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP]
    dst = [n.data for n in notifies if n.notify_type == NotifyType.NAT_DETECTION_DESTINATION_IP]
    if not src or not dst:
        return None
    nat_remote = _hash(msg.spi_i, msg.spi_r, remote) not in src
    nat_local = _hash(msg.spi_i, msg.spi_r, local) not in dst
    return nat_local, nat_remote
