"""Creating Child SAs (RFC 7296 §1.3.1, §2.9, §2.17): the first one inside IKE_AUTH and new
ones with CREATE_CHILD_SA. The negotiation pieces here (proposal, traffic selectors, optional
PFS key exchange, KEYMAT) are shared with child_rekey.

Also routes CREATE_CHILD_SA requests: an SA payload for protocol IKE is an IKE SA rekey
(ike_rekey), a REKEY_SA notify a Child SA rekey (child_rekey), anything else a new Child SA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from appliance.ike import events as ev
from appliance.ike.child import (
    ChildSa,
    covered,
    esp_proposals_with_spi,
    narrow,
    pfs_group,
    selectors_for,
    strip_dh,
)
from appliance.ike.constants import ExchangeType, NotifyType, ProtocolId, TransformType
from appliance.ike.crypto import (
    CryptoError,
    InvalidKeyExchange,
    KeyExchange,
    child_keymat_for,
    min_nonce_len,
)
from appliance.ike.ike_init import _group_name as group_name
from appliance.ike.ike_init import offered_groups
from appliance.ike.message import KE, SA, TSi, TSr, Message, Nonce, Notify, Payload, TrafficSelector
from appliance.ike.proposals import Proposal, accepts_selection, select_proposal
from appliance.ike.sa import Exchange, IkeSa

log = logging.getLogger("isthmus.ike")

NONCE_LEN = 32


class ChildError(Exception):
    """Negotiation of a Child SA failed; `notify` is the error to send (responder) or that was
    received (initiator)."""

    def __init__(self, notify: int, reason: str, data: bytes = b"") -> None:
        super().__init__(reason)
        self.notify = notify
        self.reason = reason
        self.data = data


@dataclass
class ChildRequest:
    """Our half of a Child SA negotiation as initiator."""

    spi_in: bytes
    proposals: list[Proposal]
    ts_i: list[TrafficSelector]
    ts_r: list[TrafficSelector]
    nonce: bytes = b""
    ke: KeyExchange | None = field(default=None, repr=False)

    def payloads(self, *, in_auth: bool) -> list[Payload]:
        out: list[Payload] = [SA(self.proposals)]
        if not in_auth:
            out.append(Nonce(self.nonce))
            if self.ke is not None:
                out.append(KE(int(self.ke.dh_id), self.ke.public_bytes))
        out += [TSi(self.ts_i), TSr(self.ts_r)]
        return out


def new_request(sa: IkeSa, *, in_auth: bool, group: int | None = None,
                ts_i: list[TrafficSelector] | None = None,
                ts_r: list[TrafficSelector] | None = None) -> ChildRequest:
    """Build our offer; `group` asks for PFS with that key exchange method (not in IKE_AUTH)."""
    cfg = sa.config
    if cfg is None:
        raise ChildError(NotifyType.NO_PROPOSAL_CHOSEN, "no tunnel selected for this IKE SA")
    spi = sa.engine.new_child_spi()
    props = esp_proposals_with_spi(cfg.esp_proposals, spi, with_dh=not in_auth)
    if not in_auth and group is not None:
        # Put the group we send a KE for first in each proposal offering it (§1.3: the KEi
        # group must be in every... at least one proposal, and is the one we prefer).
        props = [_prefer_group(p, group) for p in props]
    elif not in_auth:
        props = [strip_dh(p) for p in props]
    req = ChildRequest(spi, props, ts_i or selectors_for(cfg.local_nets),
                       ts_r or selectors_for(cfg.remote_nets))
    if not in_auth:
        req.nonce = sa.random(NONCE_LEN)
        if group is not None:
            req.ke = KeyExchange.generate(group, sa.random)
    return req


def _prefer_group(p: Proposal, group: int) -> Proposal:
    dh = [t for t in p.transforms if t.type == TransformType.DH]
    if not dh:
        return p
    rest = [t for t in p.transforms if t.type != TransformType.DH]
    dh.sort(key=lambda t: 0 if int(t.id) == group else 1)
    return Proposal(p.protocol, tuple(rest + dh), p.number, p.spi)


def wanted_pfs_group(sa: IkeSa) -> int | None:
    cfg = sa.config
    if cfg is None or not cfg.esp_proposals:
        return None
    return pfs_group(cfg.esp_proposals[0])


def child_times(sa: IkeSa, now: float) -> tuple[float, float]:
    cfg = sa.config
    if cfg is None:
        raise ChildError(NotifyType.NO_PROPOSAL_CHOSEN, "no tunnel selected for this IKE SA")
    return (sa.rekey_time(now, cfg.child_lifetime, cfg.child_rekey_margin),
            now + cfg.child_lifetime)


def complete_initiator(sa: IkeSa, msg: Message, req: ChildRequest, ni: bytes, nr: bytes | None,
                       now: float, *, replaces: ChildSa | None = None) -> ChildSa:
    """Check the responder's answer to our Child SA request and build the ChildSa (not yet
    installed). `nr` is None for CREATE_CHILD_SA (taken from the response's Nonce)."""
    err = msg.error_notify()
    if err is not None:
        raise ChildError(err.notify_type, f"peer answered {_nname(err.notify_type)}", err.data)
    sa_p, tsi, tsr = msg.get(SA), msg.get(TSi), msg.get(TSr)
    if sa_p is None or tsi is None or tsr is None or len(sa_p.proposals) != 1:
        raise ChildError(NotifyType.INVALID_SYNTAX, "Child SA response lacks SA, TSi or TSr")
    chosen = sa_p.proposals[0]
    if chosen.protocol != ProtocolId.ESP or len(chosen.spi) != 4:
        raise ChildError(NotifyType.INVALID_SYNTAX, "Child SA response with a non-ESP proposal")
    if accepts_selection(req.proposals, chosen) is None:
        raise ChildError(NotifyType.NO_PROPOSAL_CHOSEN, "peer chose an ESP proposal we did not offer")
    if not covered(tsi.selectors, req.ts_i) or not covered(tsr.selectors, req.ts_r):
        raise ChildError(NotifyType.TS_UNACCEPTABLE, "peer's traffic selectors are not within ours")
    g_ir = None
    if nr is None:
        nonce = msg.get(Nonce)
        if nonce is None:
            raise ChildError(NotifyType.INVALID_SYNTAX, "CREATE_CHILD_SA response without Nonce")
        nr = nonce.data
        _check_nonce(sa, nr)
        group = pfs_group(chosen)
        ke = msg.get(KE)
        if group is not None:
            if req.ke is None or ke is None or ke.dh_group != group or int(req.ke.dh_id) != group:
                raise ChildError(NotifyType.INVALID_SYNTAX, "PFS key exchange does not match the proposal")
            try:
                g_ir = req.ke.shared_secret(ke.data)
            except InvalidKeyExchange as e:
                raise ChildError(NotifyType.INVALID_SYNTAX, f"invalid KE payload: {e}") from None
        elif ke is not None:
            raise ChildError(NotifyType.INVALID_SYNTAX, "KE payload without a key exchange in the proposal")
    if sa.keys is None:
        raise ChildError(NotifyType.INVALID_SYNTAX, "the IKE SA has no keys")
    try:
        keys = child_keymat_for(sa.prf_id, sa.keys.SK_d, ni, nr, g_ir, chosen)
    except CryptoError as e:
        raise ChildError(NotifyType.NO_PROPOSAL_CHOSEN, f"cannot use the ESP proposal: {e}") from None
    rekey_at, expire_at = child_times(sa, now)
    return ChildSa(spi_in=req.spi_in, spi_out=chosen.spi, proposal=chosen, keys=keys,
                   we_initiated=True, nonce_i=ni, nonce_r=nr, ts_i=tsi.selectors,
                   ts_r=tsr.selectors, created_at=now, rekey_at=rekey_at, expire_at=expire_at,
                   replaces=replaces)


def negotiate_responder(sa: IkeSa, msg: Message, now: float, *, in_auth: bool,
                        replaces: ChildSa | None = None) -> tuple[list[Payload], ChildSa]:
    """Answer a Child SA request (IKE_AUTH or CREATE_CHILD_SA). Raises ChildError."""
    cfg = sa.config
    if cfg is None or sa.keys is None:
        raise ChildError(NotifyType.NO_PROPOSAL_CHOSEN, "the IKE SA is not authenticated yet")
    sa_p, tsi, tsr = msg.get(SA), msg.get(TSi), msg.get(TSr)
    if sa_p is None or tsi is None or tsr is None:
        raise ChildError(NotifyType.INVALID_SYNTAX, "Child SA request lacks SA, TSi or TSr")
    theirs = sa_p.proposals
    ours = list(cfg.esp_proposals)
    if in_auth:
        theirs = [strip_dh(p) for p in theirs]
        ours = [strip_dh(p) for p in ours]
    chosen = select_proposal(ours, theirs)
    if chosen is None or len(chosen.spi) != 4:
        raise ChildError(NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable ESP proposal")
    # traffic selectors: TSi is the initiator's (the peer's) side, TSr ours (§2.9)
    if replaces is not None:
        # §2.8: a rekeyed Child SA keeps its traffic selectors
        mine_r = replaces.ts_r if not replaces.we_initiated else replaces.ts_i
        mine_i = replaces.ts_i if not replaces.we_initiated else replaces.ts_r
        n_i = narrow(tsi.selectors, _nets_of(mine_i)) or narrow(tsi.selectors, cfg.remote_nets)
        n_r = narrow(tsr.selectors, _nets_of(mine_r)) or narrow(tsr.selectors, cfg.local_nets)
    else:
        n_i = narrow(tsi.selectors, cfg.remote_nets)
        n_r = narrow(tsr.selectors, cfg.local_nets)
    if not n_i or not n_r:
        raise ChildError(NotifyType.TS_UNACCEPTABLE,
                         f"traffic selectors {', '.join(map(str, tsi.selectors))} === "
                         f"{', '.join(map(str, tsr.selectors))} are outside this tunnel's "
                         f"{', '.join(cfg.remote_ts)} === {', '.join(cfg.local_ts)}")
    reply: list[Payload] = []
    g_ir = None
    if in_auth:
        ni, nr = sa.nonce_i, sa.nonce_r
        ke_out = None
    else:
        nonce = msg.get(Nonce)
        if nonce is None:
            raise ChildError(NotifyType.INVALID_SYNTAX, "CREATE_CHILD_SA request without Nonce")
        _check_nonce(sa, nonce.data)
        ni, nr = nonce.data, sa.random(NONCE_LEN)
        group = pfs_group(chosen)
        ke = msg.get(KE)
        ke_out = None
        if group is not None:
            if ke is None or ke.dh_group != group:
                raise ChildError(NotifyType.INVALID_KE_PAYLOAD, "KE group differs from the selected one",
                                 group.to_bytes(2, "big"))
            try:
                ke_out = KeyExchange.generate(group, sa.random)
                g_ir = ke_out.shared_secret(ke.data)
            except InvalidKeyExchange as e:
                raise ChildError(NotifyType.INVALID_SYNTAX, f"invalid KE payload: {e}") from None
    spi_in = sa.engine.new_child_spi()
    try:
        keys = child_keymat_for(sa.prf_id, sa.keys.SK_d, ni, nr, g_ir, chosen)
    except CryptoError as e:
        sa.engine.release_child_spi(spi_in)
        raise ChildError(NotifyType.NO_PROPOSAL_CHOSEN, f"cannot use the ESP proposal: {e}") from None
    reply_prop = Proposal(ProtocolId.ESP, chosen.transforms, chosen.number, spi_in)
    reply.append(SA([reply_prop]))
    if not in_auth:
        reply.append(Nonce(nr))
        if ke_out is not None:
            reply.append(KE(int(ke_out.dh_id), ke_out.public_bytes))
    reply += [TSi(n_i), TSr(n_r)]
    rekey_at, expire_at = child_times(sa, now)
    child = ChildSa(spi_in=spi_in, spi_out=chosen.spi, proposal=reply_prop, keys=keys,
                    we_initiated=False, nonce_i=ni, nonce_r=nr, ts_i=n_i, ts_r=n_r,
                    created_at=now, rekey_at=rekey_at, expire_at=expire_at, replaces=replaces)
    return reply, child


def _check_nonce(sa: IkeSa, nonce: bytes) -> None:
    """§2.10: at least half the key size of the IKE SA's PRF."""
    need = min_nonce_len(sa.prf_id)
    if len(nonce) < need:
        raise ChildError(NotifyType.INVALID_SYNTAX, f"nonce of {len(nonce)} octets, the PRF needs "
                         f"at least {need} (RFC 7296 §2.10)")


def retry_group(req: ChildRequest, e: ChildError) -> int | None:
    """The group an INVALID_KE_PAYLOAD answer asks for, if we may retry with it: one that our
    request offered (RFC 7296 §1.3: the KEi group must be in the proposals) and not the one we
    sent already. Anything else fails the exchange."""
    if len(e.data) != 2:
        return None
    group = int.from_bytes(e.data, "big")
    if group not in offered_groups(req.proposals):
        return None
    if req.ke is not None and int(req.ke.dh_id) == group:
        return None
    return group


def invalid_ke_reason(req: ChildRequest, e: ChildError) -> str:
    asked = int.from_bytes(e.data, "big") if len(e.data) == 2 else None
    offered = ", ".join(group_name(g) for g in offered_groups(req.proposals)) or "none"
    what = group_name(asked) if asked is not None else "an unreadable group"
    return (f"peer answered INVALID_KE_PAYLOAD asking for key exchange method {what}, which we "
            f"did not offer or sent already (offered: {offered})")


def _nets_of(sels: list[TrafficSelector]):
    import ipaddress

    out = []
    for s in sels:
        a, b = ipaddress.ip_address(s.start_addr), ipaddress.ip_address(s.end_addr)
        if a <= b:
            out.extend(ipaddress.summarize_address_range(a, b))
    return tuple(out)


def _nname(n: int) -> str:
    try:
        return NotifyType(n).name
    except ValueError:
        return str(n)


# --------------------------------------------------------------------------- CREATE_CHILD_SA


class CreateChild(Exchange):
    """A new Child SA for a tunnel that has none (§1.3.1)."""

    exchange_type = ExchangeType.CREATE_CHILD_SA
    name = "CREATE_CHILD_SA"

    def __init__(self, group: int | None = None, retries: int = 0) -> None:
        self.group = group
        self.retries = retries
        self.req: ChildRequest | None = None

    def build(self, sa: IkeSa, now: float):
        if sa.closing or sa.children_in_use() or sa.config is None:
            return None
        group = self.group if self.group is not None else wanted_pfs_group(sa)
        self.req = new_request(sa, in_auth=False, group=group)
        return self.req.payloads(in_auth=False)

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        req = self.req
        if req is None:    # never built: nothing of ours to complete
            return
        try:
            child = complete_initiator(sa, msg, req, req.nonce, None, now)
        except ChildError as e:
            sa.engine.release_child_spi(req.spi_in)
            if e.notify == NotifyType.INVALID_KE_PAYLOAD:
                group = retry_group(req, e)
                if group is None:
                    e = ChildError(e.notify, invalid_ke_reason(req, e))
                elif self.retries < 2:
                    sa.queue_exchange(CreateChild(group, self.retries + 1), now, front=True)
                    return
            sa.engine.emit(ev.ChildSaFailed(sa.tunnel, f"creating the Child SA failed: {e.reason}"))
            sa.engine.child_failed(sa, now, temporary=e.notify == NotifyType.TEMPORARY_FAILURE)
            return
        sa.install_child(child, outbound=True)
        sa.engine.child_created(sa, child, now)


def start_new_child(sa: IkeSa, now: float) -> None:
    if not sa.has_queued(lambda e: isinstance(e, CreateChild)):
        sa.queue_exchange(CreateChild(), now)


def respond(sa: IkeSa, msg: Message, now: float) -> list[Payload]:
    """A CREATE_CHILD_SA request from the peer."""
    from appliance.ike import child_rekey, ike_rekey

    sa_p = msg.get(SA)
    if sa_p is not None and sa_p.proposals and sa_p.proposals[0].protocol == ProtocolId.IKE:
        return ike_rekey.respond(sa, msg, now)
    rekey = msg.notify(NotifyType.REKEY_SA)
    if rekey is not None:
        return child_rekey.respond(sa, msg, rekey, now)
    # a new Child SA
    if sa.closing or ike_rekey.rekeying(sa):
        return [Notify(NotifyType.TEMPORARY_FAILURE)]   # §2.25.2
    try:
        reply, child = negotiate_responder(sa, msg, now, in_auth=False)
    except ChildError as e:
        log.info("%s: refusing new Child SA: %s", sa, e.reason)
        sa.engine.emit(ev.ChildSaFailed(sa.tunnel, f"refused the peer's Child SA: {e.reason}"))
        return [Notify(e.notify, data=e.data)]
    sa.install_child(child, outbound=True)
    sa.engine.child_created(sa, child, now)
    return reply
