"""Rekeying a Child SA with CREATE_CHILD_SA (RFC 7296 §1.3.3, §2.8, collisions §2.8.1, §2.25.1).

Make-before-break: the rekey initiator installs the new pair (both directions) when the
response arrives, then deletes the old pair. The responder installs the new pair's inbound SA
at once but sends on it only when the old pair is deleted (by the peer, which proves the peer
has the new pair; or by us when the peer does not within a grace period), so no packet goes
out on an SA the other side has not installed yet. This holds in collisions too: when the
peer's rekey wins, its new pair's outbound SA waits for the old pair's DELETE.

Collisions (both sides rekey the same pair): each answers the other's request as usual; the
exchange holding the lowest of the four nonces made a redundant pair, which its initiator
deletes, and the initiator of the surviving exchange deletes the old pair (§2.8.1). Field
failures this module is written against (named tests in tests/unit/ike/test_collisions.py):
strongSwan #1896 (collision + lost packet: TEMPORARY_FAILURE then DELETE must still install
the outbound SA), #2477 (our rekey fails with TS_UNACCEPTABLE in a collision: the peer's new
pair must still get its outbound SA), #1458 (the old pair's DELETE processed before our rekey's
response: the new pair must survive).
"""

from __future__ import annotations

import logging

from appliance.ike import events as ev
from appliance.ike.child import ChildSa, ChildState
from appliance.ike.child_create import (
    ChildError,
    ChildRequest,
    complete_initiator,
    invalid_ke_reason,
    negotiate_responder,
    new_request,
    retry_group,
    wanted_pfs_group,
)
from appliance.ike.constants import ExchangeType, NotifyType, ProtocolId
from appliance.ike.message import Message, Notify, Payload
from appliance.ike.sa import Exchange, IkeSa

log = logging.getLogger("isthmus.ike")


def _retry_delay(sa: IkeSa, lo: float, hi: float) -> float:
    r = int.from_bytes(sa.random(2), "big") / 65536
    return lo + (hi - lo) * r


class ChildRekey(Exchange):
    exchange_type = ExchangeType.CREATE_CHILD_SA
    name = "CREATE_CHILD_SA (rekey)"

    def __init__(self, child: ChildSa, group: int | None = None, retries: int = 0) -> None:
        self.child = child
        self.group = group
        self.retries = retries
        self.req: ChildRequest | None = None

    def build(self, sa: IkeSa, now: float):
        old = self.child
        if (sa.closing or sa.config is None or old.state != ChildState.INSTALLED or old.redundant
                or old not in sa.children or (old.rekeyed_by is not None and old.rekeyed_by.alive)):
            return None
        group = self.group if self.group is not None else wanted_pfs_group(sa)
        # §2.8: the new pair keeps the old pair's traffic selectors; TSi is our side here.
        ours, theirs = (old.ts_i, old.ts_r) if old.we_initiated else (old.ts_r, old.ts_i)
        self.req = new_request(sa, in_auth=False, group=group, ts_i=ours, ts_r=theirs)
        old.state = ChildState.REKEYING
        return [Notify(NotifyType.REKEY_SA, ProtocolId.ESP, old.spi_in)] + self.req.payloads(in_auth=False)

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        old = self.child
        req = self.req
        if req is None:    # never built: nothing of ours to complete
            return
        if old.state == ChildState.REKEYING:
            old.state = ChildState.INSTALLED
        try:
            new = complete_initiator(sa, msg, req, req.nonce, None, now, replaces=old)
        except ChildError as e:
            sa.engine.release_child_spi(req.spi_in)
            self._failed(sa, e, now)
            return
        # Success. Even if the old pair is gone already (its DELETE overtook this response,
        # strongSwan #1458), the new pair exists on both sides and is kept.
        sa.install_child(new, outbound=True)
        if old.alive or old.state == ChildState.DELETED:
            sa.engine.emit(ev.ChildSaRekeyed(sa.tunnel, old.spi_in_int, old.spi_out_int,
                                             new.spi_in_int, new.spi_out_int))
        theirs = old.rekeyed_by
        if theirs is not None and theirs.alive and not theirs.redundant:
            # §2.8.1 collision: the exchange with the lowest nonce made the redundant pair
            if min(new.nonce_i, new.nonce_r) < min(theirs.nonce_i, theirs.nonce_r):
                log.info("%s: rekey collision on %s lost; deleting our %s, keeping %s", sa,
                         old.describe(), new.describe(), theirs.describe())
                new.redundant = True
                # theirs gets its outbound SA when the peer deletes the old pair: only then
                # do we know the peer has installed it (it may not have our answer yet)
                if old.alive:
                    old.state = ChildState.REKEYED
                    old.delete_at = now + sa.engine.redundant_grace  # the peer deletes it
                from appliance.ike import informational

                informational.delete_child(sa, new, now, "redundant after a rekey collision", front=True)
                sa.engine.child_created(sa, theirs, now)
                return
            log.info("%s: rekey collision on %s won; peer deletes its %s", sa, old.describe(),
                     theirs.describe())
            theirs.redundant = True
            theirs.delete_at = now + sa.engine.redundant_grace  # unless the peer does first
        if old.alive:
            old.state = ChildState.REKEYED
            from appliance.ike import informational

            informational.delete_child(sa, old, now, "rekeyed", front=True)
        sa.engine.child_created(sa, new, now)

    def _failed(self, sa: IkeSa, e: ChildError, now: float) -> None:
        old = self.child
        theirs = old.rekeyed_by
        peer_won = theirs is not None and theirs.alive and not theirs.redundant
        if e.notify == NotifyType.INVALID_KE_PAYLOAD:
            req = self.req
            group = retry_group(req, e) if req is not None else None
            if group is None:
                if req is not None:
                    e = ChildError(e.notify, invalid_ke_reason(req, e))
            elif self.retries < 2 and old.alive:
                sa.queue_exchange(ChildRekey(old, group, self.retries + 1), now, front=True)
                return
        if peer_won:
            # The peer rekeyed this pair itself (we answered it): that rekey stands and the
            # peer deletes the old pair, which installs the new pair's outbound SA here
            # (#1896, #2477); do not retry our own rekey.
            log.info("%s: our rekey of %s failed (%s) but the peer's rekey %s stands; waiting "
                     "for its DELETE", sa, old.describe(), e.reason, theirs.describe())
            if old.alive:
                old.state = ChildState.REKEYED
            return
        if e.notify == NotifyType.CHILD_SA_NOT_FOUND:
            # §2.25: the peer has no such pair: drop it silently and create one from scratch
            if old.alive:
                sa.remove_child(old, "peer does not know this Child SA (CHILD_SA_NOT_FOUND)")
            return
        if not old.alive:
            return
        if e.notify == NotifyType.TEMPORARY_FAILURE:
            # §2.25: wait, then retry (sooner when the pair would expire first)
            old.rekey_retry_at = now + min(_retry_delay(sa, 10.0, 20.0),
                                           _retry_delay(sa, 0.25, 0.5) * max(0.0, old.expire_at - now))
            return
        sa.engine.emit(ev.ChildSaFailed(sa.tunnel, f"rekeying Child SA {old.describe()} failed: {e.reason}"))
        # retry later, before the pair expires
        old.rekey_retry_at = min(now + _retry_delay(sa, 30.0, 60.0), max(now, old.expire_at - 5.0))


def start(sa: IkeSa, child: ChildSa, now: float) -> None:
    if sa.has_queued(lambda e: isinstance(e, ChildRekey) and e.child is child):
        return
    sa.queue_exchange(ChildRekey(child), now)


def respond(sa: IkeSa, msg: Message, rekey: Notify, now: float) -> list[Payload]:
    """The peer rekeys one of our pairs. REKEY_SA carries the SPI it receives on, our spi_out."""
    from appliance.ike import ike_rekey

    if rekey.protocol_id != ProtocolId.ESP or len(rekey.spi) != 4:
        return [Notify(NotifyType.INVALID_SYNTAX)]
    old = sa.child_by_spi_out(rekey.spi)
    if old is None:
        return [Notify(NotifyType.CHILD_SA_NOT_FOUND, ProtocolId.ESP, rekey.spi)]
    if sa.closing or ike_rekey.rekeying(sa):
        return [Notify(NotifyType.TEMPORARY_FAILURE)]       # §2.25.2
    if (old.state in (ChildState.DELETING, ChildState.REKEYED) or old.redundant
            or (old.rekeyed_by is not None and old.rekeyed_by.alive)):
        return [Notify(NotifyType.TEMPORARY_FAILURE)]       # §2.25.1
    try:
        reply, new = negotiate_responder(sa, msg, now, in_auth=False, replaces=old)
    except ChildError as e:
        log.info("%s: refusing rekey of %s: %s", sa, old.describe(), e.reason)
        sa.engine.emit(ev.ChildSaFailed(sa.tunnel, f"refused the peer's rekey of {old.describe()}: {e.reason}"))
        return [Notify(e.notify, data=e.data)]
    old.rekeyed_by = new
    old.delete_at = now + sa.engine.redundant_grace   # the peer deletes it; if not, we do
    sa.install_child(new, outbound=False)
    sa.engine.emit(ev.ChildSaRekeyed(sa.tunnel, old.spi_in_int, old.spi_out_int,
                                     new.spi_in_int, new.spi_out_int))
    return reply
