"""Liveness checks / dead peer detection (RFC 7296 §2.4).

After `dpd.interval` seconds without an authenticated message from the peer, an empty
INFORMATIONAL request is sent; it is retransmitted as any request, and if no answer comes
within `dpd.timeout` seconds the peer is dead: the engine reports PeerDead and applies the
tunnel's action (clear | restart | hold). The engine sees no ESP traffic, so "idle" means no
IKE message from the peer (the daemon may report inbound traffic with IkeEngine.traffic_seen).
"""

from __future__ import annotations

from appliance.ike.constants import ExchangeType
from appliance.ike.message import Message
from appliance.ike.sa import Exchange, IkeSa, IkeState


class Liveness(Exchange):
    exchange_type = ExchangeType.INFORMATIONAL
    name = "INFORMATIONAL (liveness check)"

    def __init__(self, timeout: float) -> None:
        self.give_up_after = timeout

    def build(self, sa: IkeSa, now: float):
        if sa.state != IkeState.ESTABLISHED:
            return None
        return []

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        pass  # IkeSa.receive noted the peer is alive

    def on_give_up(self, sa: IkeSa, now: float) -> None:
        sa.peer_unreachable(now, "peer did not answer the liveness check (DPD timeout)")


def start(sa: IkeSa, now: float) -> None:
    cfg = sa.config
    if cfg is not None and sa.pending is None and not sa.queue:
        sa.queue_exchange(Liveness(cfg.dpd.timeout), now)
