"""INFORMATIONAL exchanges (RFC 7296 §1.4): deleting Child SAs and the IKE SA, and answering
notifies and liveness checks.

Delete payloads name the SPIs the *sender* receives on (§1.4.1); the answer names ours for the
same pairs. Simultaneous deletes: a request to delete a pair we are deleting ourselves is
answered without a Delete payload for it (§1.4.1, §2.25.1); a request to delete a pair we are
rekeying is answered as usual (§2.25.1) and our rekey carries on (strongSwan #1458).
"""

from __future__ import annotations

import logging

from appliance.ike.child import ChildSa, ChildState
from appliance.ike import events as ev
from appliance.ike.constants import ExchangeType, NotifyType, ProtocolId
from appliance.ike.message import Delete, Message, Payload
from appliance.ike.sa import Exchange, IkeSa, IkeState

log = logging.getLogger("isthmus.ike")


class DeleteChild(Exchange):
    exchange_type = ExchangeType.INFORMATIONAL
    name = "INFORMATIONAL (delete Child SA)"

    def __init__(self, child: ChildSa, reason: str) -> None:
        self.child = child
        self.reason = reason

    def build(self, sa: IkeSa, now: float):
        c = self.child
        if not c.alive or c not in sa.children or sa.state in (IkeState.DELETING, IkeState.DEAD):
            return None
        c.state = ChildState.DELETING
        sa.deactivate_outbound(c)   # stop sending on it; inbound stays until the answer
        return [Delete(ProtocolId.ESP, [c.spi_in])]

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        if self.child.alive:
            sa.remove_child(self.child, self.reason)

    def on_give_up(self, sa: IkeSa, now: float) -> None:
        if self.child.alive:
            sa.remove_child(self.child, self.reason)
        super().on_give_up(sa, now)


def delete_child(sa: IkeSa, child: ChildSa, now: float, reason: str, *, front: bool = False) -> None:
    if sa.has_queued(lambda e: isinstance(e, DeleteChild) and e.child is child):
        return
    sa.queue_exchange(DeleteChild(child, reason), now, front=front)


class DeleteIke(Exchange):
    exchange_type = ExchangeType.INFORMATIONAL
    name = "INFORMATIONAL (delete IKE SA)"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def build(self, sa: IkeSa, now: float):
        if sa.state == IkeState.DEAD:
            return None
        sa.state = IkeState.DELETING
        return [Delete(ProtocolId.IKE, [])]

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        sa.die(now, self.reason)

    def on_give_up(self, sa: IkeSa, now: float) -> None:
        sa.die(now, self.reason + " (the peer did not answer the DELETE)")


def delete_ike_sa(sa: IkeSa, now: float, reason: str) -> None:
    """Delete the IKE SA (and with it its Child SAs) as soon as the window is free."""
    if sa.has_queued(lambda e: isinstance(e, DeleteIke)):
        return
    if sa.cipher_out is None or sa.in_initial_exchanges:
        # §1.2: before IKE_AUTH completes there is no SA to delete in the peer's eyes, and an
        # initiator ignores requests until then (strongSwan does the same): a half-open SA is
        # destroyed here without an INFORMATIONAL; the peer's own timeout clears its half.
        sa.die(now, reason)
        return
    # Other queued work is moot once the IKE SA goes.
    sa.queue = [e for e in sa.queue if isinstance(e, DeleteIke)]
    sa.queue_exchange(DeleteIke(reason), now, front=True)


def respond(sa: IkeSa, msg: Message, now: float) -> list[Payload]:
    deletes = msg.get_all(Delete)
    if msg.notify(NotifyType.AUTHENTICATION_FAILED) is not None and not sa.initiator and msg.message_id == 2:
        # §2.21.2: the initiator refused our IKE_AUTH response (our certificate, say)
        reason = "peer refused our authentication after IKE_AUTH (AUTHENTICATION_FAILED)"
        sa.engine.emit(ev.AuthFailed(sa.tunnel, reason))
        log.info("%s: %s", sa, reason)
        sa.after_response(lambda t: sa.die(t, reason))
        return []
    for d in deletes:
        if d.protocol_id == ProtocolId.IKE:
            _peer_deletes_ike_sa(sa, now)
            return []
    ours: list[bytes] = []
    for d in deletes:
        if d.protocol_id != ProtocolId.ESP:
            continue
        for spi in d.spis:
            c = sa.child_by_spi_out(spi)
            if c is None:
                continue
            if c.state == ChildState.DELETING:
                # simultaneous delete: answer without it (§1.4.1)
                sa.remove_child(c, "deleted by both sides")
                continue
            ours.append(c.spi_in)
            reason = "deleted by the peer (rekeyed)" if c.state == ChildState.REKEYED else "deleted by the peer"
            if c.redundant:
                reason = "redundant (collision)"
            sa.remove_child(c, reason)
    if ours:
        return [Delete(ProtocolId.ESP, ours)]
    return []


def _peer_deletes_ike_sa(sa: IkeSa, now: float) -> None:
    from appliance.ike import ike_rekey

    if sa.state == IkeState.REKEYED or sa.redundant:
        sa.after_response(lambda t: sa.die(t, "deleted by the peer after rekeying"))
        return
    # §2.25.2: a request to close the IKE SA wins over our own rekey or close of it; if the
    # peer's rekey of it succeeded (collision), that new SA carries on.
    successor = ike_rekey.peer_successor(sa)
    if successor is not None:
        ike_rekey.adopt(sa, successor, now)
        sa.after_response(lambda t: sa.die(t, "deleted by the peer after rekeying"))
        return
    sa.after_response(lambda t: sa.die(t, "deleted by the peer"))
