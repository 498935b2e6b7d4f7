"""IKE_SA_INIT (RFC 7296 §1.2, §2.6, §2.7, §2.10, §2.14, §2.23).

Initiator: SA, KEi, Ni, NAT detection; retries with the group the responder asks for in
INVALID_KE_PAYLOAD (§1.2) and with a COOKIE it is given (§2.6). Responder: selects a proposal,
answers INVALID_KE_PAYLOAD statelessly when the KE group differs from the selected one, and
only then creates the half-open IKE SA. Above a number of half-open SAs it asks for a COOKIE
(stateless, §2.6) and it caps half-open SAs per source and in all (`IkeEngine.admit_half_open`),
all before any key exchange is computed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from appliance.ike import fragmentation, intermediate, natd, signature_auth
from appliance.ike.constants import CertEncoding, DhId, ExchangeType, NotifyType, ProtocolId, TransformType
from appliance.ike.crypto import (
    CryptoError,
    InvalidKeyExchange,
    KeyExchange,
    derive_ike_keys,
    min_nonce_len,
)
from appliance.ike.message import (
    CERTREQ,
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
from appliance.ike.proposals import (
    Proposal,
    accepts_selection,
    contains,
    format_proposal,
    initiator_offer,
    offer_size,
    offer_without_intermediate,
    select_proposal,
)
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

    def __init__(self, group: int, cookie: bytes = b"", retries: int = 0, *,
                 ke: KeyExchange | None = None, nonce: bytes = b"") -> None:
        self.group = group
        self.cookie = cookie
        self.retries = retries
        self.ke = ke            # kept across a COOKIE retry (§2.6: all other payloads unchanged)
        self.nonce = nonce
        self.ignored = ""       # the last unauthenticated answer we ignored (§2.21.1)

    def build(self, sa: IkeSa, now: float):
        cfg = sa.config
        if cfg is None:
            return None
        if self.ke is None or int(self.ke.dh_id) != self.group:
            self.ke = KeyExchange.generate(self.group, sa.random)
        if not self.nonce:
            self.nonce = sa.random(NONCE_LEN)
        sa.nonce_i = self.nonce
        payloads: list = []
        if self.cookie:
            payloads.append(Notify(NotifyType.COOKIE, data=self.cookie))  # §2.6: first payload
        payloads += [SA(numbered(initiator_offer(cfg.ike_proposals))), KE(self.group, self.ke.public_bytes),
                     Nonce(self.nonce)]
        payloads += natd.our_payloads(sa, ZERO_SPI, sa.local, sa.remote)
        if cfg.cert is not None:
            payloads.append(signature_auth.hash_notify())   # RFC 7427 §4
        payloads += fragmentation.request_notifies(sa)   # RFC 7383 §2.3
        payloads += intermediate.request_notifies(sa)    # RFC 9242 §3.1
        return payloads

    def sent(self, sa: IkeSa, datagram: bytes) -> None:
        sa.init_request = datagram  # RealMessage1 for AUTH (§2.15)

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:  # pragma: no cover
        raise AssertionError("IKE_SA_INIT responses are handled by receive()")

    def on_give_up(self, sa: IkeSa, now: float) -> None:
        if self.ignored:
            sa.fail(now, f"{self.ignored} (an unauthenticated answer, ignored while waiting for a "
                         "valid one: none came before the retransmissions ran out)")
        else:
            super().on_give_up(sa, now)


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
    why = _process_response(sa, ex, msg, data, src, dst, now)
    if why is not None:
        # §2.21.1: nothing protects this message; anyone may have sent it. Keep waiting for a
        # valid answer (the retransmission timer runs on) and report this one if none comes.
        if why != ex.ignored:   # once per kind of answer, not per (possibly flooded) datagram
            log.info("%s: ignoring unauthenticated IKE_SA_INIT response: %s", sa, why)
        ex.ignored = why
        return
    sa.kick(now)


def _retry(sa: IkeSa, ex: IkeSaInit, now: float, *, group: int | None = None,
           cookie: bytes | None = None) -> None:
    sa.pending = None
    sa.my_mid = 0
    if group is None or group == ex.group:
        nxt = IkeSaInit(ex.group, ex.cookie if cookie is None else cookie, ex.retries + 1,
                        ke=ex.ke, nonce=ex.nonce)
    else:
        nxt = IkeSaInit(group, ex.cookie if cookie is None else cookie, ex.retries + 1, nonce=ex.nonce)
    sa.queue_exchange(nxt, now, front=True)


def _process_response(sa: IkeSa, ex: IkeSaInit, msg: Message, raw: bytes, src: Endpoint,
                      dst: Endpoint, now: float) -> str | None:
    """Act on an IKE_SA_INIT response: None when acted on (retried, failed or IKE_AUTH under
    way), else why it is ignored. Only COOKIE, INVALID_KE_PAYLOAD (for a group we offer) and
    INVALID_MAJOR_VERSION act at once; anything else must prove itself with a usable answer."""
    cfg = sa.config
    if cfg is None or ex.ke is None:
        return "no IKE_SA_INIT of ours to answer"
    cookie = msg.notify(NotifyType.COOKIE)
    if cookie is not None and msg.get(SA) is None:
        if not 1 <= len(cookie.data) <= 64:
            return f"a COOKIE of {len(cookie.data)} octets (RFC 7296 §2.6: 1 to 64)"
        if ex.retries >= MAX_INIT_RETRIES:
            return "responder asks for a cookie again, after too many round trips"
        log.info("%s: responder asks for a cookie", sa)
        _retry(sa, ex, now, cookie=cookie.data)
        return None
    ke_err = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
    if ke_err is not None:
        group = int.from_bytes(ke_err.data, "big") if len(ke_err.data) == 2 else 0
        if group == ex.group:
            return f"INVALID_KE_PAYLOAD for {_group_name(group)}, the group we sent (a stale answer)"
        if group not in offered_groups(cfg.ike_proposals):
            return (f"peer asks for key exchange method {_group_name(group)}, which our IKE "
                    f"proposals ({_props(cfg.ike_proposals)}) do not offer")
        if ex.retries >= MAX_INIT_RETRIES:
            return "INVALID_KE_PAYLOAD again, after too many round trips"
        log.info("%s: peer prefers %s, retrying", sa, _group_name(group))
        _retry(sa, ex, now, group=group)
        return None
    err = msg.error_notify()
    if err is not None:
        if err.notify_type == NotifyType.INVALID_MAJOR_VERSION:
            sa.pending = None
            sa.fail(now, "peer does not speak IKEv2 (INVALID_MAJOR_VERSION)")
            return None
        if err.notify_type == NotifyType.NO_PROPOSAL_CHOSEN:
            return f"peer accepted none of our IKE proposals ({_props(cfg.ike_proposals)}): NO_PROPOSAL_CHOSEN"
        return f"peer refused IKE_SA_INIT with {_notify_name(err.notify_type)}"
    sa_p, ke_p, nonce = msg.get(SA), msg.get(KE), msg.get(Nonce)
    if sa_p is None or ke_p is None or nonce is None or len(sa_p.proposals) != 1 or msg.spi_r == ZERO_SPI:
        return "malformed IKE_SA_INIT response (missing SA, KE, Nonce or responder SPI)"
    chosen = sa_p.proposals[0]
    if accepts_selection(numbered(initiator_offer(cfg.ike_proposals)), chosen) is None or chosen.spi:
        return f"peer chose an IKE proposal we did not offer: {_short(format_proposal(chosen))}"
    if ke_p.dh_group != selected_group(chosen) or ke_p.dh_group != ex.group:
        return "peer's KE payload does not match the selected key exchange method"
    short = nonce_too_short(chosen, nonce.data)
    if short is not None:
        return f"malformed IKE_SA_INIT response: {short}"
    try:
        g_ir = ex.ke.shared_secret(ke_p.data)
    except InvalidKeyExchange as e:
        return f"peer's KE payload is invalid: {e}"
    try:
        _skeyseed, keys = derive_ike_keys(chosen, g_ir, sa.nonce_i, nonce.data, sa.spi_i, msg.spi_r)
    except CryptoError as e:
        return f"cannot use the selected IKE proposal: {e}"
    sa.pending = None
    sa.spi_r = msg.spi_r
    sa.nonce_r = nonce.data
    try:
        sa.set_keys(chosen, keys)
    except CryptoError as e:
        sa.fail(now, f"cannot use the selected IKE proposal: {e}")
        return None
    sa.init_response = raw
    sa.peer_hash_algorithms = signature_auth.peer_hashes(msg.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS))
    from appliance.ike import ike_auth
    ike_auth.note_certreq(sa, msg)
    fragmentation.initiator_response(sa, msg)
    why = intermediate.after_init(sa, msg)   # RFC 9242 §3.1, RFC 9370 §2.2.1
    if why is not None:
        sa.fail(now, why)
        return None
    natd.apply(sa, msg, dst, src)
    sa.engine.register_peer_spi(sa)
    if sa.udp_encap and sa.local[1] != 4500:
        # §2.23: with a NAT in the path, continue on port 4500 (UDP encapsulation)
        sa.local = (sa.local[0], 4500)
        sa.remote = (sa.remote[0], 4500)
    intermediate.start(sa, now)   # IKE_INTERMEDIATE per additional key exchange, then IKE_AUTH
    return None


def _short(text: str, limit: int = 200) -> str:
    """Text from the wire in a log line or reason: bounded."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# --------------------------------------------------------------------------- responder


def respond_new(engine: "IkeEngine", data: bytes, hdr: Header, src: Endpoint, dst: Endpoint,
                now: float) -> IkeSa | None:
    """A first IKE_SA_INIT request: answer it, creating a half-open SA when it is acceptable.

    What an unauthenticated request may cost is bounded before any key exchange: its size, the
    number of proposals and transforms in its offer, and (the engine's DosProtection) a COOKIE
    above a number of half-open SAs, a cap per source address and a global cap."""
    if hdr.is_response or hdr.message_id != 0 or hdr.spi_r != ZERO_SPI or not hdr.is_initiator:
        return None
    if len(data) > engine.dos.max_init_request:
        log.debug("IKE_SA_INIT from %s:%d of %d octets dropped (over %d)", src[0], src[1], len(data),
                  engine.dos.max_init_request)
        return None
    try:
        msg, enc = parse_message(data, hdr)
    except ParseError as e:
        engine.unauthenticated_log.info(now, "IKE_SA_INIT from %s:%d malformed: %s", src[0], src[1], e.reason)
        if e.notify in (NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,):
            _stateless(engine, hdr, [Notify(e.notify, data=e.notify_data)], src, dst)
        return None
    if enc is not None:
        return None
    offer = engine.responder_offer(dst, src)
    candidates = offer.candidates
    if not candidates:
        engine.unauthenticated_log.info(now, "IKE_SA_INIT from %s:%d to %s:%d matches no tunnel; ignored", *src, *dst)
        return None
    sa_p, ke_p, nonce = msg.get(SA), msg.get(KE), msg.get(Nonce)
    if sa_p is None or ke_p is None or nonce is None:
        _stateless(engine, hdr, [Notify(NotifyType.INVALID_SYNTAX)], src, dst)
        return None
    cookie = msg.notify(NotifyType.COOKIE)
    if not engine.admit_half_open(hdr, cookie.data if cookie is not None else None, nonce.data,
                                  src, dst, now):
        return None    # a COOKIE was asked for, or a half-open limit holds (no DH done)
    peer_offer = sa_p.proposals
    if not intermediate.peer_announced(msg):
        peer_offer = offer_without_intermediate(peer_offer)   # RFC 9370 §2.2.1: no additional KE then
    chosen = select_proposal(offer.proposals, peer_offer)
    if chosen is None or len(chosen.spi) not in (0,):
        n, total = offer_size(sa_p.proposals)
        engine.unauthenticated_log.info(now, "IKE_SA_INIT from %s: no acceptable proposal among %d (%d transforms)",
                                        src[0], n, total)
        _stateless(engine, hdr, [Notify(NotifyType.NO_PROPOSAL_CHOSEN)], src, dst)
        return None
    short = nonce_too_short(chosen, nonce.data)
    if short is not None:
        engine.unauthenticated_log.info(now, "IKE_SA_INIT from %s: %s", src[0], short)
        _stateless(engine, hdr, [Notify(NotifyType.INVALID_SYNTAX)], src, dst)
        return None
    # The SA can end up with only those tunnels whose own proposals contain the chosen one
    # (it is chosen from their union: the peer's identity is not known before IKE_AUTH).
    candidates = offer.accepting(chosen)
    group = selected_group(chosen)
    if ke_p.dh_group != group:
        _stateless(engine, hdr, [Notify(NotifyType.INVALID_KE_PAYLOAD, data=group.to_bytes(2, "big"))],
                   src, dst)
        return None
    try:
        ke = KeyExchange.generate(group, engine.random)
        g_ir = ke.shared_secret(ke_p.data)
    except InvalidKeyExchange as e:
        engine.unauthenticated_log.info(now, "IKE_SA_INIT from %s: invalid KE payload: %s", src[0], e)
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
        engine.unauthenticated_log.info(now, "IKE_SA_INIT from %s: %s", src[0], e)
        _stateless(engine, hdr, [Notify(NotifyType.NO_PROPOSAL_CHOSEN)], src, dst)
        return None
    intermediate.after_init(sa)
    natd.apply(sa, msg, dst, src)
    reply = [SA([chosen]), KE(group, ke.public_bytes), Nonce(sa.nonce_r)]
    if msg.notify(NotifyType.NAT_DETECTION_SOURCE_IP) is not None:
        reply += natd.our_payloads(sa, sa.spi_r, dst, src)   # §2.23: only to a peer that sent them
    sa.peer_hash_algorithms = signature_auth.peer_hashes(msg.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS))
    reply += _cert_payloads(candidates)
    reply += fragmentation.response_notifies(sa, msg)   # RFC 7383 §2.3
    reply += intermediate.response_notifies(sa, msg)    # RFC 9242 §3.1
    sa.init_request = data
    sa.peer_mid = 1
    sa.half_open_deadline = now + candidates[0].half_open_timeout
    engine.register(sa)
    engine.register_half_open(sa)
    sa.init_response = sa.send_response(msg, reply, src, dst, encrypted=False)
    return sa


def send_cookie(engine: "IkeEngine", hdr: Header, cookie: bytes, src: Endpoint, dst: Endpoint) -> None:
    """§2.6: answer an IKE_SA_INIT request with N(COOKIE) only, keeping no state."""
    _stateless(engine, hdr, [Notify(NotifyType.COOKIE, data=cookie)], src, dst)


def _cert_payloads(candidates) -> list:
    """SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4) and a CERTREQ for our CAs (§3.7) when a
    candidate tunnel authenticates with certificates."""
    ids: list[bytes] = []
    for c in candidates:
        if c.cert is not None:
            ids += [k for k in c.cert.ca_keyids if k not in ids]
    if not ids:
        return []
    return [signature_auth.hash_notify(), CERTREQ(CertEncoding.X509_SIGNATURE, b"".join(ids))]


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
