"""IKE_SA_INIT (RFC 7296 §1.2, §2.6, §2.7, §2.10, §2.14, §2.23).

Initiator: SA, KEi, Ni, NAT detection; retries with the group the responder asks for in
INVALID_KE_PAYLOAD (§1.2) and with a COOKIE it is given (§2.6). Responder: selects a proposal,
answers INVALID_KE_PAYLOAD statelessly when the KE group differs from the selected one, and
only then creates the half-open IKE SA. Sending cookies ourselves under load is a hook for a
later issue (`IkeEngine.cookie_required`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from appliance.ike import natd
from appliance.ike.constants import DhId, ExchangeType, NotifyType, ProtocolId, TransformType
from appliance.ike.crypto import (
    CryptoError,
    InvalidKeyExchange,
    KeyExchange,
    derive_ike_keys,
    min_nonce_len,
)
from appliance.ike.message import (
    KE,
    SA,
    Header,
    Message,
    Nonce,
    Notify,
    ParseError,
    encode_message,
    parse_message,
)
from appliance.ike.proposals import Proposal, accepts_selection, format_proposal, select_proposal
from appliance.ike.sa import Endpoint, Exchange, IkeSa

if TYPE_CHECKING:
    from appliance.ike.engine import IkeEngine

log = logging.getLogger("isthmus.ike")

NONCE_LEN = 32          # ≥ half the key size of every PRF we offer (§2.10)
MAX_INIT_RETRIES = 3    # INVALID_KE_PAYLOAD / COOKIE round trips before giving up
ZERO_SPI = bytes(8)


def numbered(proposals: tuple[Proposal, ...] | list[Proposal], spi: bytes = b"") -> list[Proposal]:
    return [Proposal(ProtocolId.IKE, p.transforms, n, spi) for n, p in enumerate(proposals, 1)]


def offered_groups(proposals: tuple[Proposal, ...] | list[Proposal]) -> list[int]:
    out: list[int] = []
    for p in proposals:
        for t in p.transforms:
            if t.type == TransformType.DH and t.id != DhId.NONE and int(t.id) not in out:
                out.append(int(t.id))
    return out


def selected_group(p: Proposal) -> int:
    t = p.only(TransformType.DH)
    return int(t.id) if t is not None else 0


def selected_prf(p: Proposal) -> int:
    t = p.only(TransformType.PRF)
    return int(t.id) if t is not None else 0


def nonce_too_short(p: Proposal, nonce: bytes) -> str | None:
    """Why `nonce` is too short for the PRF of `p` (§2.10), or None."""
    need = min_nonce_len(selected_prf(p))
    if len(nonce) < need:
        return f"nonce of {len(nonce)} octets, the PRF needs at least {need} (RFC 7296 §2.10)"
    return None


class IkeSaInit(Exchange):
    exchange_type = ExchangeType.IKE_SA_INIT
    name = "IKE_SA_INIT"
    encrypted = False

    def __init__(self, group: int, cookie: bytes = b"", retries: int = 0) -> None:
        self.group = group
        self.cookie = cookie
        self.retries = retries
        self.ke: KeyExchange | None = None

    def build(self, sa: IkeSa, now: float):
        cfg = sa.config
        if cfg is None:
            return None
        self.ke = KeyExchange.generate(self.group, sa.random)
        sa.nonce_i = sa.random(NONCE_LEN)
        payloads: list = []
        if self.cookie:
            payloads.append(Notify(NotifyType.COOKIE, data=self.cookie))  # §2.6: first payload
        payloads += [SA(numbered(cfg.ike_proposals)), KE(self.group, self.ke.public_bytes),
                     Nonce(sa.nonce_i)]
        payloads += natd.payloads(sa.spi_i, ZERO_SPI, sa.local, sa.remote)
        return payloads

    def sent(self, sa: IkeSa, datagram: bytes) -> None:
        sa.init_request = datagram  # RealMessage1 for AUTH (§2.15)

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:  # pragma: no cover
        raise AssertionError("IKE_SA_INIT responses are handled by receive()")


def start(sa: IkeSa, now: float) -> None:
    cfg = sa.config
    groups = offered_groups(cfg.ike_proposals) if cfg is not None else []
    if not groups:
        sa.fail(now, "IKE_SA_INIT: no key exchange method to offer")
        return
    sa.queue_exchange(IkeSaInit(groups[0]), now)


def receive(sa: IkeSa, data: bytes, hdr: Header, src: Endpoint, dst: Endpoint, now: float) -> None:
    """An IKE_SA_INIT message routed to an existing SA: our response's retransmission trigger
    (responder) or the response to our request (initiator)."""
    if not sa.initiator:
        # Retransmitted request: answer from the cache if it is the same request (§2.1).
        if (not hdr.is_response and hdr.message_id == 0 and sa.last_response is not None
                and sa.last_response.message_id == 0 and data == sa.init_request):
            sa.engine.send(sa.last_response.datagram, dst, src)
        return
    p = sa.pending
    if not hdr.is_response or p is None or not isinstance(p.exchange, IkeSaInit) or hdr.message_id != 0:
        return
    try:
        msg, enc = parse_message(data, hdr)
    except ParseError as e:
        log.info("%s: malformed IKE_SA_INIT response: %s", sa, e.reason)
        return
    if enc is not None:
        return
    ex = p.exchange
    ke_err = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
    if ke_err is not None and len(ke_err.data) == 2 and int.from_bytes(ke_err.data, "big") == ex.group:
        return  # a stale answer to an earlier attempt with another group: ignore
    sa.pending = None
    _process_response(sa, ex, msg, data, src, dst, now)
    sa.kick(now)


def _retry(sa: IkeSa, ex: IkeSaInit, now: float, *, group: int | None = None,
           cookie: bytes | None = None) -> None:
    if ex.retries >= MAX_INIT_RETRIES:
        sa.fail(now, "IKE_SA_INIT: too many INVALID_KE_PAYLOAD/COOKIE round trips")
        return
    sa.my_mid = 0
    nxt = IkeSaInit(ex.group if group is None else group,
                    ex.cookie if cookie is None else cookie, ex.retries + 1)
    sa.queue_exchange(nxt, now, front=True)


def _process_response(sa: IkeSa, ex: IkeSaInit, msg: Message, raw: bytes, src: Endpoint,
                      dst: Endpoint, now: float) -> None:
    cfg = sa.config
    if cfg is None or ex.ke is None:
        sa.fail(now, "IKE_SA_INIT response to a request we did not build")
        return
    cookie = msg.notify(NotifyType.COOKIE)
    if cookie is not None and msg.get(SA) is None:
        log.info("%s: responder asks for a cookie", sa)
        _retry(sa, ex, now, cookie=cookie.data)
        return
    ke_err = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
    if ke_err is not None:
        group = int.from_bytes(ke_err.data, "big") if len(ke_err.data) == 2 else 0
        if group not in offered_groups(cfg.ike_proposals):
            sa.fail(now, f"peer asks for key exchange method {_group_name(group)}, which our IKE "
                         f"proposals ({_props(cfg.ike_proposals)}) do not offer")
            return
        log.info("%s: peer prefers %s, retrying", sa, _group_name(group))
        _retry(sa, ex, now, group=group)
        return
    err = msg.error_notify()
    if err is not None:
        if err.notify_type == NotifyType.NO_PROPOSAL_CHOSEN:
            sa.fail(now, f"peer accepted none of our IKE proposals ({_props(cfg.ike_proposals)}): "
                         "NO_PROPOSAL_CHOSEN")
        else:
            sa.fail(now, f"peer refused IKE_SA_INIT with {_notify_name(err.notify_type)}")
        return
    sa_p, ke_p, nonce = msg.get(SA), msg.get(KE), msg.get(Nonce)
    if sa_p is None or ke_p is None or nonce is None or len(sa_p.proposals) != 1 or msg.spi_r == ZERO_SPI:
        sa.fail(now, "malformed IKE_SA_INIT response (missing SA, KE, Nonce or responder SPI)")
        return
    chosen = sa_p.proposals[0]
    if accepts_selection(numbered(cfg.ike_proposals), chosen) is None or chosen.spi:
        sa.fail(now, f"peer chose an IKE proposal we did not offer: {format_proposal(chosen)}")
        return
    if ke_p.dh_group != selected_group(chosen) or ke_p.dh_group != ex.group:
        sa.fail(now, "peer's KE payload does not match the selected key exchange method")
        return
    short = nonce_too_short(chosen, nonce.data)
    if short is not None:
        sa.fail(now, f"malformed IKE_SA_INIT response: {short}")
        return
    try:
        g_ir = ex.ke.shared_secret(ke_p.data)
    except InvalidKeyExchange as e:
        sa.fail(now, f"peer's KE payload is invalid: {e}")
        return
    sa.spi_r = msg.spi_r
    sa.nonce_r = nonce.data
    try:
        _skeyseed, keys = derive_ike_keys(chosen, g_ir, sa.nonce_i, sa.nonce_r, sa.spi_i, sa.spi_r)
        sa.set_keys(chosen, keys)
    except CryptoError as e:
        sa.fail(now, f"cannot use the selected IKE proposal: {e}")
        return
    sa.init_response = raw
    nat = natd.check(msg, dst, src)
    if nat is not None:
        sa.nat_local, sa.nat_remote = nat
    sa.engine.register_peer_spi(sa)
    if sa.udp_encap and sa.local[1] != 4500:
        # §2.23: with a NAT in the path, continue on port 4500 (UDP encapsulation)
        sa.local = (sa.local[0], 4500)
        sa.remote = (sa.remote[0], 4500)
    from appliance.ike import ike_auth

    ike_auth.start(sa, now)


# --------------------------------------------------------------------------- responder


def respond_new(engine: "IkeEngine", data: bytes, hdr: Header, src: Endpoint, dst: Endpoint,
                now: float) -> IkeSa | None:
    """A first IKE_SA_INIT request: answer it, creating a half-open SA when it is acceptable."""
    if hdr.is_response or hdr.message_id != 0 or hdr.spi_r != ZERO_SPI or not hdr.is_initiator:
        return None
    try:
        msg, enc = parse_message(data, hdr)
    except ParseError as e:
        log.info("IKE_SA_INIT from %s:%d malformed: %s", src[0], src[1], e.reason)
        if e.notify in (NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,):
            _stateless(engine, hdr, [Notify(e.notify, data=e.notify_data)], src, dst)
        return None
    if enc is not None:
        return None
    candidates = engine.configs_for(dst, src)
    if not candidates:
        log.info("IKE_SA_INIT from %s:%d to %s:%d matches no tunnel; ignored", *src, *dst)
        return None
    sa_p, ke_p, nonce = msg.get(SA), msg.get(KE), msg.get(Nonce)
    if sa_p is None or ke_p is None or nonce is None:
        _stateless(engine, hdr, [Notify(NotifyType.INVALID_SYNTAX)], src, dst)
        return None
    if engine.cookie_required(src, now):  # pragma: no cover - hook for the COOKIE issue
        return None
    ours: list[Proposal] = []
    for c in candidates:
        ours.extend(c.ike_proposals)
    chosen = select_proposal(ours, sa_p.proposals)
    if chosen is None or len(chosen.spi) not in (0,):
        log.info("IKE_SA_INIT from %s: no acceptable proposal among %s", src[0],
                 ", ".join(format_proposal(p) for p in sa_p.proposals))
        _stateless(engine, hdr, [Notify(NotifyType.NO_PROPOSAL_CHOSEN)], src, dst)
        return None
    short = nonce_too_short(chosen, nonce.data)
    if short is not None:
        log.info("IKE_SA_INIT from %s: %s", src[0], short)
        _stateless(engine, hdr, [Notify(NotifyType.INVALID_SYNTAX)], src, dst)
        return None
    group = selected_group(chosen)
    if ke_p.dh_group != group:
        _stateless(engine, hdr, [Notify(NotifyType.INVALID_KE_PAYLOAD, data=group.to_bytes(2, "big"))],
                   src, dst)
        return None
    try:
        ke = KeyExchange.generate(group, engine.random)
        g_ir = ke.shared_secret(ke_p.data)
    except InvalidKeyExchange as e:
        log.info("IKE_SA_INIT from %s: invalid KE payload: %s", src[0], e)
        _stateless(engine, hdr, [Notify(NotifyType.INVALID_SYNTAX)], src, dst)
        return None
    sa = IkeSa(engine, initiator=False, config=None, candidates=candidates, local=dst, remote=src,
               spi_i=hdr.spi_i, spi_r=engine.new_ike_spi(), now=now)
    sa.nonce_i = nonce.data
    sa.nonce_r = engine.random(NONCE_LEN)
    try:
        _skeyseed, keys = derive_ike_keys(chosen, g_ir, sa.nonce_i, sa.nonce_r, sa.spi_i, sa.spi_r)
        sa.set_keys(chosen, keys)
    except CryptoError as e:
        log.info("IKE_SA_INIT from %s: %s", src[0], e)
        _stateless(engine, hdr, [Notify(NotifyType.NO_PROPOSAL_CHOSEN)], src, dst)
        return None
    nat = natd.check(msg, dst, src)
    if nat is not None:
        sa.nat_local, sa.nat_remote = nat
    reply = [SA([chosen]), KE(group, ke.public_bytes), Nonce(sa.nonce_r)]
    reply += natd.payloads(sa.spi_i, sa.spi_r, dst, src)
    sa.init_request = data
    sa.peer_mid = 1
    sa.half_open_deadline = now + candidates[0].half_open_timeout
    engine.register(sa)
    engine.register_half_open(sa)
    sa.init_response = sa.send_response(msg, reply, src, dst, encrypted=False)
    return sa


def _stateless(engine: "IkeEngine", hdr: Header, payloads: list, src: Endpoint, dst: Endpoint) -> None:
    msg = Message(hdr.spi_i, ZERO_SPI, ExchangeType.IKE_SA_INIT, 0, True, False, payloads)
    engine.send(encode_message(msg), dst, src)


def _group_name(g: int) -> str:
    try:
        return DhId(g).name
    except ValueError:
        return str(g)


def _notify_name(n: int) -> str:
    try:
        return NotifyType(n).name
    except ValueError:
        return str(n)


def _props(ps) -> str:
    return ", ".join(format_proposal(p) for p in ps)
