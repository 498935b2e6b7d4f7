"""Liveness checks / dead peer detection (RFC 7296 §2.4).

After `dpd.interval` seconds without hearing from the peer, an empty INFORMATIONAL request is
sent. `dpd.timeout` counts from the last time the peer was heard (an authenticated IKE message,
or inbound ESP the daemon reports with IkeEngine.traffic_seen), not from the request: with
`interval: 1s, timeout: 3s` a peer silent since t is dead at t+3, whatever the poll or timer
granularity put the request at. The request is retransmitted inside that window (§2.4: a peer
is declared dead only after retransmissions went unanswered): the usual back-off, each delay
capped at a third of the window, so at least two retransmissions are sent. A window shorter
than MIN_WINDOW (interval close to or above timeout, or a request delayed by another exchange)
is stretched to MIN_WINDOW (or the timeout, if shorter). Then the engine reports PeerDead and
applies the tunnel's action (clear | restart | hold).
"""

from __future__ import annotations

from appliance.ike.constants import ExchangeType
from appliance.ike.message import Message
from appliance.ike.sa import Exchange, IkeSa, IkeState

#: The shortest time a liveness request is given to be answered (seconds).
MIN_WINDOW = 1.0
#: Retransmissions inside the window: each delay is at most window / RETRANSMIT_SLOTS.
RETRANSMIT_SLOTS = 3


class Liveness(Exchange):
    exchange_type = ExchangeType.INFORMATIONAL
    name = "INFORMATIONAL (liveness check)"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.give_up_after = timeout
        self.window = timeout

    def build(self, sa: IkeSa, now: float):
        if sa.state != IkeState.ESTABLISHED:
            return None
        # dead `timeout` s after the peer was last heard (IkeSa.kick adds give_up_after to now)
        self.window = max(sa.last_heard + self.timeout - now, min(self.timeout, MIN_WINDOW))
        self.give_up_after = self.window
        return []

    def retransmit_delays(self, schedule: list[float]) -> list[float]:
        cap = self.window / RETRANSMIT_SLOTS
        # the last entry is the wait before giving up: the window's deadline decides instead
        return [min(d, cap) for d in schedule[:-1]] + [self.window]

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        pass  # IkeSa.receive noted the peer is alive

    def on_give_up(self, sa: IkeSa, now: float) -> None:
        sa.peer_unreachable(now, f"peer not heard for {now - sa.last_heard:.1f} s and no answer to the "
                                 "liveness check (DPD timeout)")


def heard(sa: IkeSa) -> None:
    """The peer was heard outside IKE (inbound ESP) while a liveness request is outstanding:
    its deadline moves to `timeout` after that (the request keeps being retransmitted)."""
    p = sa.pending
    if p is not None and isinstance(p.exchange, Liveness) and p.deadline is not None:
        p.deadline = max(p.deadline, sa.last_heard + p.exchange.timeout)


def start(sa: IkeSa, now: float) -> None:
    cfg = sa.config
    if cfg is not None and sa.pending is None and not sa.queue:
        sa.queue_exchange(Liveness(cfg.dpd.timeout), now)
