"""Rekeying the IKE SA with CREATE_CHILD_SA (RFC 7296 §1.3.2, §2.18; collisions §2.8.2, §2.25.2).

SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) with the old SA's PRF (with RFC 9370
additional key exchanges, IKE_FOLLOWUP_KE exchanges come first and their secrets follow g^ir:
additional_ke.py); the new IKE SA takes
over every Child SA, its message IDs start at 0, and the initiator of the rekey is the new SA's
original initiator. The rekey initiator then deletes the old IKE SA.

Collision (both sides rekey): each answers the other; the exchange with the lowest of the four
nonces made a redundant IKE SA, which its initiator deletes; the Child SAs move to the survivor,
whose initiator deletes the old IKE SA. Requests to create, rekey or delete Child SAs while we
rekey the IKE SA, and a rekey of the IKE SA while we work on a Child SA, are answered with
TEMPORARY_FAILURE (§2.25.2).
"""

from __future__ import annotations

import logging

from appliance.ike import events as ev
from appliance.ike import fragmentation, mobike
from appliance.ike.constants import ExchangeType, NotifyType, ProtocolId, TransformType
from appliance.ike.crypto import CryptoError, InvalidKeyExchange, KeyExchange, derive_rekeyed_ike_keys
from appliance.ike.ike_init import NONCE_LEN, _group_name, nonce_too_short, numbered, offered_groups, selected_group
from appliance.ike.message import KE, SA, Message, Nonce, Notify, Payload
from appliance.ike.proposals import (
    Proposal,
    accepts_selection,
    additional_kes,
    initiator_offer,
    select_proposal,
)
from appliance.ike.sa import Exchange, IkeSa, IkeState

log = logging.getLogger("isthmus.ike")


def _retry_delay(sa: IkeSa, lo: float, hi: float) -> float:
    return lo + (hi - lo) * int.from_bytes(sa.random(2), "big") / 65536


def _prefer(props: list[Proposal], group: int) -> list[Proposal]:
    out = []
    for p in props:
        dh = [t for t in p.transforms if t.type == TransformType.DH]
        rest = [t for t in p.transforms if t.type != TransformType.DH]
        dh.sort(key=lambda t: 0 if int(t.id) == group else 1)
        out.append(Proposal(p.protocol, tuple(rest + dh), p.number, p.spi))
    return out


class IkeRekey(Exchange):
    exchange_type = ExchangeType.CREATE_CHILD_SA
    name = "CREATE_CHILD_SA (IKE SA rekey)"
    ike_rekey_part = True     # rekeying(): this, or one of its IKE_FOLLOWUP_KE (additional_ke)

    def __init__(self, group: int | None = None, retries: int = 0) -> None:
        self.group = group
        self.retries = retries
        self.spi = b""
        self.ni = b""
        self.ke: KeyExchange | None = None
        self.offered: list[Proposal] = []

    def build(self, sa: IkeSa, now: float):
        cfg = sa.config
        if cfg is None or sa.proposal is None or sa.closing or peer_successor(sa) is not None:
            return None
        # with additional key exchanges, IKE_FOLLOWUP_KE exchanges follow (RFC 9370 §2.2.4)
        props = initiator_offer(cfg.ike_proposals)
        groups = offered_groups(props)
        current = selected_group(sa.proposal)
        group = self.group if self.group is not None else (current if current in groups else groups[0])
        self.spi = sa.engine.new_ike_spi()
        self.ke = KeyExchange.generate(group, sa.random)
        self.ni = sa.random(NONCE_LEN)
        self.group = group
        self.offered = _prefer(numbered(props, self.spi), group)
        return [SA(self.offered), Nonce(self.ni), KE(group, self.ke.public_bytes)]

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        try:
            new = self._complete(sa, msg, now)
        except _RekeyFailed as e:
            sa.engine.release_ike_spi(self.spi)
            self._failed(sa, e, now)
            return
        if new is not None:
            self.finish(sa, new, now)

    def finish(self, sa: IkeSa, new: IkeSa, now: float) -> None:
        """Our rekey produced `new` (after its IKE_FOLLOWUP_KE exchanges, if any): collision
        resolution, then the new SA takes over."""
        other = peer_successor(sa)
        if other is not None:
            if min(new.nonce_i, new.nonce_r) < min(other.nonce_i, other.nonce_r):
                log.info("%s: IKE rekey collision lost; deleting our redundant %s", sa, new)
                new.redundant = True
                from appliance.ike import informational

                informational.delete_ike_sa(new, now, "redundant after an IKE SA rekey collision")
                adopt(sa, other, now)
                sa.delete_deadline = now + sa.engine.redundant_grace  # the peer deletes the old SA
                return
            log.info("%s: IKE rekey collision won; the peer deletes its %s", sa, other)
            other.redundant = True
            other.delete_deadline = now + sa.engine.redundant_grace
        adopt(sa, new, now)
        from appliance.ike import informational

        informational.delete_ike_sa(sa, now, "rekeyed")

    def _complete(self, sa: IkeSa, msg: Message, now: float) -> IkeSa | None:
        err = msg.error_notify()
        if err is not None:
            raise _RekeyFailed(err.notify_type, err.data)
        sa_p, nonce, ke = msg.get(SA), msg.get(Nonce), msg.get(KE)
        if sa_p is None or nonce is None or ke is None or len(sa_p.proposals) != 1:
            raise _RekeyFailed(NotifyType.INVALID_SYNTAX)
        chosen = sa_p.proposals[0]
        if (chosen.protocol != ProtocolId.IKE or len(chosen.spi) != 8
                or accepts_selection(self.offered, chosen) is None):
            raise _RekeyFailed(NotifyType.NO_PROPOSAL_CHOSEN)
        if ke.dh_group != selected_group(chosen) or ke.dh_group != self.group or self.ke is None:
            raise _RekeyFailed(NotifyType.INVALID_SYNTAX)
        short = nonce_too_short(chosen, nonce.data)
        if short is not None:
            log.info("%s: IKE rekey response unusable: %s", sa, short)
            raise _RekeyFailed(NotifyType.INVALID_SYNTAX)
        try:
            if sa.keys is None:
                raise _RekeyFailed(NotifyType.INVALID_SYNTAX)
            g_ir = self.ke.shared_secret(ke.data)
            if additional_kes(chosen):
                # RFC 9370 §2.2.4: the additional key exchanges first, on this (old) IKE SA
                from appliance.ike import additional_ke
                additional_ke.start_followup(sa, self, chosen, nonce.data, g_ir, msg, now)
                return None
            _s, keys = derive_rekeyed_ike_keys(chosen, sa.keys.SK_d, g_ir, self.ni, nonce.data,
                                               self.spi, chosen.spi, old_prf=sa.prf_id)
        except (InvalidKeyExchange, CryptoError) as e:
            log.info("%s: IKE rekey response unusable: %s", sa, e)
            raise _RekeyFailed(NotifyType.INVALID_SYNTAX) from None
        return new_sa(sa, initiator=True, spi_i=self.spi, spi_r=chosen.spi, proposal=chosen,
                      keys=keys, ni=self.ni, nr=nonce.data, now=now)

    def failed_followup(self, sa: IkeSa, notify: int, now: float) -> None:
        """One of our IKE_FOLLOWUP_KE exchanges failed: the rekey failed (RFC 9370 §2.2.4)."""
        log.info("%s: IKE SA rekey: IKE_FOLLOWUP_KE failed (%s)", sa, _nname(notify))
        sa.engine.release_ike_spi(self.spi)
        self._failed(sa, _RekeyFailed(notify), now)

    def _failed(self, sa: IkeSa, e: "_RekeyFailed", now: float) -> None:
        other = peer_successor(sa)
        if other is not None:
            # our rekey failed but the peer's succeeded: that one is the rekey
            adopt(sa, other, now)
            sa.delete_deadline = now + sa.engine.redundant_grace
            return
        if e.notify == NotifyType.INVALID_KE_PAYLOAD and len(e.data) == 2 and self.retries < 2:
            group = int.from_bytes(e.data, "big")
            # only a group we offered in this request, and not the one we sent (§1.3)
            if group in offered_groups(self.offered) and group != self.group:
                sa.queue_exchange(IkeRekey(group, self.retries + 1), now, front=True)
                return
            log.info("%s: peer asks for key exchange method %s, which our IKE proposals do not "
                     "offer", sa, _group_name(group))
        if e.notify == NotifyType.TEMPORARY_FAILURE:
            # §2.25: wait, then retry (sooner when the SA would expire first)
            left = (sa.expire_at - now) if sa.expire_at is not None else 60.0
            sa.rekey_retry_at = now + min(_retry_delay(sa, 10.0, 20.0),
                                          _retry_delay(sa, 0.25, 0.5) * max(0.0, left))
            return
        log.info("%s: IKE SA rekey failed (%s); retrying later", sa, _nname(e.notify))
        if sa.expire_at is not None:
            sa.rekey_retry_at = min(now + _retry_delay(sa, 30.0, 60.0), max(now, sa.expire_at - 5.0))


class _RekeyFailed(Exception):
    def __init__(self, notify: int, data: bytes = b"") -> None:
        super().__init__(notify)
        self.notify = notify
        self.data = data


def _nname(n: int) -> str:
    try:
        return NotifyType(n).name
    except ValueError:
        return str(n)


def new_sa(old: IkeSa, *, initiator: bool, spi_i: bytes, spi_r: bytes, proposal: Proposal,
           keys, ni: bytes, nr: bytes, now: float) -> IkeSa:
    new = IkeSa(old.engine, initiator=initiator, config=old.config, candidates=old.candidates,
                local=old.local, remote=old.remote, spi_i=spi_i, spi_r=spi_r, now=now)
    new.set_keys(proposal, keys)
    new.nonce_i, new.nonce_r = ni, nr
    new.nat_local, new.nat_remote, new.nat_fake = old.nat_local, old.nat_remote, old.nat_fake
    new.last_sent = old.last_sent
    fragmentation.inherit(new, old)   # RFC 7383: negotiated in IKE_SA_INIT, kept on rekey
    mobike.inherit(new, old)          # RFC 4555: negotiated in IKE_AUTH, kept on rekey
    new.remote_id_text = old.remote_id_text
    # the authentication carries over (§2.18): the peer's certificate, for revocation and expiry
    new.peer_cert_chain, new.peer_cert_not_after = old.peer_cert_chain, old.peer_cert_not_after
    new.peer_cert_subject = old.peer_cert_subject
    new.rekey_replaces = old
    new.state = IkeState.CONNECTING   # until adopted
    old.engine.register(new)
    return new


def adopt(old: IkeSa, new: IkeSa, now: float) -> None:
    """`new` replaces `old`: it takes the Child SAs and queued Child SA work (§2.18)."""
    from appliance.ike.child_create import CreateChild
    from appliance.ike.child_rekey import ChildRekey
    from appliance.ike.informational import DeleteChild

    if not new.alive or old.rekeyed_to is not None:
        return
    new.state = IkeState.ESTABLISHED
    new.established_at = now
    new.last_heard = now
    new.schedule_lifetimes_after_rekey(now)
    for c in old.children:
        new.children.append(c)
    old.children = []
    moved = [e for e in old.queue if isinstance(e, (CreateChild, ChildRekey, DeleteChild))]
    old.queue = [e for e in old.queue if e not in moved]
    new.queue.extend(moved)
    old.state = IkeState.REKEYED
    old.rekeyed_to = new
    old.peer_rekey = None
    old.rekey_at = old.expire_at = old.rekey_retry_at = None
    old.engine.emit(ev.IkeSaRekeyed(old.tunnel, old.spi_i, old.spi_r, new.spi_i, new.spi_r,
                                    new.proposal_text))
    log.info("%s: rekeyed to %s", old, new)
    old.engine.on_ike_rekeyed(old, new, now)
    mobike.adopted(old, new, now)     # RFC 4555: an address update owed goes on the new SA
    new.kick(now)


def rekeying(sa: IkeSa) -> bool:
    """We have an IKE SA rekey request of our own in flight on this SA (the CREATE_CHILD_SA or
    one of its IKE_FOLLOWUP_KE)."""
    return sa.pending is not None and getattr(sa.pending.exchange, "ike_rekey_part", False)


def peer_successor(sa: IkeSa) -> IkeSa | None:
    p = sa.peer_rekey
    if p is not None and p.alive and not p.redundant:
        return p
    return None


def start(sa: IkeSa, now: float) -> None:
    if sa.has_queued(lambda e: getattr(e, "ike_rekey_part", False)):
        return
    sa.queue_exchange(IkeRekey(), now)


def respond(sa: IkeSa, msg: Message, now: float) -> list[Payload]:
    from appliance.ike.child_create import CreateChild
    from appliance.ike.child_rekey import ChildRekey
    from appliance.ike.informational import DeleteChild

    cfg = sa.config
    if cfg is None or sa.keys is None:
        return [Notify(NotifyType.INVALID_SYNTAX)]      # not authenticated (IkeSa refuses it earlier)
    if sa.closing or peer_successor(sa) is not None:
        return [Notify(NotifyType.TEMPORARY_FAILURE)]
    if sa.pending is not None and isinstance(sa.pending.exchange, (CreateChild, ChildRekey, DeleteChild)):
        return [Notify(NotifyType.TEMPORARY_FAILURE)]          # §2.25.2
    sa_p, nonce, ke = msg.get(SA), msg.get(Nonce), msg.get(KE)
    if sa_p is None or nonce is None or ke is None:
        return [Notify(NotifyType.INVALID_SYNTAX)]
    chosen = select_proposal(list(cfg.ike_proposals), sa_p.proposals)
    if chosen is None:
        log.info("%s: no acceptable proposal in the peer's IKE SA rekey", sa)
        return [Notify(NotifyType.NO_PROPOSAL_CHOSEN)]
    if len(chosen.spi) != 8:
        return [Notify(NotifyType.INVALID_SYNTAX)]
    short = nonce_too_short(chosen, nonce.data)
    if short is not None:
        log.info("%s: refusing the peer's IKE SA rekey: %s", sa, short)
        return [Notify(NotifyType.INVALID_SYNTAX)]
    group = selected_group(chosen)
    if ke.dh_group != group:
        return [Notify(NotifyType.INVALID_KE_PAYLOAD, data=group.to_bytes(2, "big"))]
    try:
        ke_out = KeyExchange.generate(group, sa.random)
        g_ir = ke_out.shared_secret(ke.data)
        nr = sa.random(NONCE_LEN)
        spi_r = sa.engine.new_ike_spi()
        keys = None
        if not additional_kes(chosen):
            _s, keys = derive_rekeyed_ike_keys(chosen, sa.keys.SK_d, g_ir, nonce.data, nr,
                                               chosen.spi, spi_r, old_prf=sa.prf_id)
    except (InvalidKeyExchange, CryptoError) as e:
        log.info("%s: peer's IKE SA rekey unusable: %s", sa, e)
        return [Notify(NotifyType.INVALID_SYNTAX)]
    reply_prop = Proposal(ProtocolId.IKE, chosen.transforms, chosen.number, spi_r)
    reply: list[Payload] = [SA([reply_prop]), Nonce(nr), KE(group, ke_out.public_bytes)]
    if keys is None:
        # RFC 9370 §2.2.4: the new SA exists once the IKE_FOLLOWUP_KE exchanges are done
        from appliance.ike import additional_ke
        return reply + additional_ke.await_followup(sa, reply_prop, chosen.spi, nonce.data, nr, g_ir)
    respond_done(sa, reply_prop, chosen.spi, keys, nonce.data, nr, now)
    return reply


def respond_done(sa: IkeSa, reply_prop: Proposal, spi_i: bytes, keys, ni: bytes, nr: bytes,
                 now: float) -> None:
    """The peer's rekey of `sa` made these keys: the new SA (SPIs `spi_i`, `reply_prop.spi`),
    adopted now or, in a collision with our own rekey, when our rekey's answer arrives."""
    new = new_sa(sa, initiator=False, spi_i=spi_i, spi_r=reply_prop.spi, proposal=reply_prop,
                 keys=keys, ni=ni, nr=nr, now=now)
    if rekeying(sa):
        sa.peer_rekey = new      # collision: decided when our own rekey's answer arrives
    else:
        adopt(sa, new, now)
        sa.delete_deadline = now + sa.engine.redundant_grace   # the peer deletes the old SA
