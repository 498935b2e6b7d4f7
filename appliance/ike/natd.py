"""NAT detection (RFC 7296 §2.23): NAT_DETECTION_SOURCE_IP / NAT_DETECTION_DESTINATION_IP.

Each message carries hashes of the sender's view of its own address and port (SOURCE) and of
the receiver's (DESTINATION), computed with the SPIs of that message's IKE header. A receiver
whose own address does not match the DESTINATION hash is behind a NAT; one for which no SOURCE
hash matches where the datagram came from talks to a peer behind a NAT.
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


def payloads(spi_i: bytes, spi_r: bytes, local: Endpoint, remote: Endpoint) -> list[Notify]:
    return [Notify(NotifyType.NAT_DETECTION_SOURCE_IP, data=_hash(spi_i, spi_r, local)),
            Notify(NotifyType.NAT_DETECTION_DESTINATION_IP, data=_hash(spi_i, spi_r, remote))]


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
