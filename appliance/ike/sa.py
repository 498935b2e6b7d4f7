"""One IKE SA: message windows, retransmission, timers, Child SA bookkeeping (RFC 7296 §2.1-2.4).

The exchanges themselves live in their own modules (ike_init, ike_auth, child_create,
child_rekey, ike_rekey, informational, liveness); an IkeSa runs one *initiator* exchange at a time
(window size 1, §2.3) from its queue and answers the peer's requests in message-ID order,
keeping the last response to answer a retransmitted request (§2.1).

Sans-IO: the owning IkeEngine hands datagrams and `now` in; this object calls back into the
engine to send datagrams and report events.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from appliance.ike import events as ev
from appliance.ike import fragmentation
from appliance.ike.child import ChildSa, ChildState
from appliance.ike.constants import ExchangeType, ProtocolId
from appliance.ike.crypto import CryptoError, IkeKeys, IntegrityError, SkCipher
from appliance.ike.message import (
    AuthenticParseError,
    EncryptedFragment,
    Header,
    Message,
    Notify,
    ParseError,
    Payload,
    decrypt_message,
    encode_message,
    parse_message,
)
from appliance.ike.policy import TunnelConfig
from appliance.ike.proposals import Proposal, format_proposal

if TYPE_CHECKING:
    from appliance.ike.engine import IkeEngine

log = logging.getLogger("isthmus.ike")

Endpoint = tuple[str, int]


class _Summary:
    """Formats a message summary only if the log record is emitted."""

    __slots__ = ("msg",)

    def __init__(self, msg: Message) -> None:
        self.msg = msg

    def __str__(self) -> str:
        return self.msg.summary()


class IkeState(enum.Enum):
    CONNECTING = "connecting"    # IKE_SA_INIT / IKE_AUTH under way
    ESTABLISHED = "established"
    REKEYED = "rekeyed"          # replaced by a newer IKE SA (§2.18); waiting for its DELETE
    DELETING = "deleting"        # we sent a DELETE for it
    DEAD = "dead"


class Exchange:
    """The initiator half of one exchange (strongSwan's task idea). Subclasses build the
    request's payloads and process the response."""

    exchange_type: int = ExchangeType.INFORMATIONAL
    name: str = "exchange"
    encrypted: bool = True
    #: Give up after this many seconds even if retransmissions remain (DPD timeout).
    give_up_after: float | None = None
    #: The response may move the SA to where it came from (§2.23); MOBIKE's exchanges set
    #: their addresses themselves (mobike.py).
    implicit_address_update = True

    def build(self, sa: "IkeSa", now: float) -> list[Payload] | None:
        """Payloads of the request, or None when there is nothing to do any more."""
        raise NotImplementedError

    def on_response(self, sa: "IkeSa", msg: Message, now: float) -> None:
        raise NotImplementedError

    def on_give_up(self, sa: "IkeSa", now: float) -> None:
        sa.peer_unreachable(now, f"no response to {self.name} after retransmissions")

    def sent(self, sa: "IkeSa", datagram: bytes) -> None:
        """Called with the encoded request once it is first sent."""

    def retransmit_delays(self, schedule: list[float]) -> list[float]:
        """The retransmission delays of this request (RetransmitConfig.schedule by default)."""
        return schedule


@dataclass
class _Pending:
    exchange: Exchange
    message_id: int
    datagram: bytes
    first_sent: float
    next_at: float
    retransmits: int = 0
    deadline: float | None = None
    more: tuple[bytes, ...] = ()     # further SKF fragments, sent after `datagram` (RFC 7383)


@dataclass
class _CachedResponse:
    message_id: int
    datagram: bytes
    src: Endpoint
    dst: Endpoint
    more: tuple[bytes, ...] = ()     # further SKF fragments, sent after `datagram` (RFC 7383)


class IkeSa:
    """State of one IKE SA. Created by the engine (initiator) or by ike_init (responder)."""

    # Attributes whose initial value is shared (immutable) are class attributes: an instance
    # gets its own value when it is first assigned. Saves setting ~35 attributes per new SA.
    established_at: float | None = None
    half_open_deadline: float | None = None
    half_open_key: tuple | None = None

    # negotiated
    proposal: Proposal | None = None
    prf_id: int = 0
    keys: IkeKeys | None = None
    cipher_out: SkCipher | None = None
    cipher_in: SkCipher | None = None
    nonce_i = b""
    nonce_r = b""
    init_request = b""      # RealMessage1 (§2.15)
    init_response = b""     # RealMessage2
    nat_local = False       # we are behind a NAT
    nat_remote = False      # the peer is behind a NAT
    nat_fake = False        # nat_traversal force: UDP encapsulation without a NAT (natd.py)
    last_sent = 0.0         # when we last sent the peer an IKE message (or ESP, traffic_sent)
    keepalives_sent = 0     # NAT keepalives (RFC 3948 §2.3)
    remote_id_text = ""
    sent_initial_contact = False
    # certificate authentication (signature_auth, certificates)
    peer_hash_algorithms: tuple[int, ...] | None = None   # SIGNATURE_HASH_ALGORITHMS, RFC 7427 §4
    peer_certreq: frozenset[bytes] | None = None          # CA key hashes the peer asked for
    peer_cert_not_after: float | None = None              # UNIX time
    peer_cert_subject = ""
    peer_cert_chain: tuple = ()                           # validated chain (revocation re-checks)
    # IKE fragmentation (RFC 7383, fragmentation.py)
    frag_ours = False       # we announced IKEV2_FRAGMENTATION_SUPPORTED
    frag_peer = False       # the peer did
    reassembly: "fragmentation.Reassembly | None" = None
    # IKE_INTERMEDIATE (RFC 9242) and additional key exchanges (RFC 9370): intermediate.py
    intermediate_ours = False   # we announced INTERMEDIATE_EXCHANGE_SUPPORTED
    intermediate_peer = False   # the peer did
    addke_todo: tuple[int, ...] = ()    # additional key exchange methods still to run
    addke_done: tuple[int, ...] = ()    # those done (status)
    intermediate_count = 0      # IKE_INTERMEDIATE exchanges completed
    int_auth_i = b""            # IntAuth_i(n), IntAuth_r(n) chains (§3.3.2)
    int_auth_r = b""
    cipher_in_prev: SkCipher | None = None   # responder: key of a retransmitted request
    followup: "object | None" = None    # a peer's IKE SA rekey awaiting IKE_FOLLOWUP_KE (additional_ke)
    # MOBIKE (RFC 4555, mobike.py)
    mobike_ours = False     # we sent MOBIKE_SUPPORTED in IKE_AUTH
    mobike_peer = False     # the peer did
    peer_additional: tuple[str, ...] = ()   # the peer's ADDITIONAL_IP4/IP6_ADDRESS
    mobike_moves = 0        # address updates completed (UPDATE_SA_ADDRESSES answered)
    original_initiator: bool | None = None   # after an IKE SA rekey: we initiated the first one

    # message windows (§2.3)
    my_mid = 0
    peer_mid = 0
    pending: "_Pending | None" = None
    last_response: "_CachedResponse | None" = None

    # lifetimes
    rekey_at: float | None = None
    expire_at: float | None = None
    rekey_retry_at: float | None = None
    delete_deadline: float | None = None

    # IKE SA rekeying (§2.18, collisions §2.8.2)
    rekeyed_to: "IkeSa | None" = None     # the SA that replaced this one
    rekey_replaces: "IkeSa | None" = None  # this SA replaced that one
    peer_rekey: "IkeSa | None" = None     # new SA from a rekey the peer initiated
    redundant = False                     # lost a rekey collision; being deleted
    duplicate = False                     # a second IKE SA of the tunnel; being deleted
    rekey_nonces: tuple[bytes, bytes] = (b"", b"")   # (Ni, Nr) of the rekey exchange

    def __init__(self, engine: "IkeEngine", *, initiator: bool, config: TunnelConfig | None,
                 candidates: list[TunnelConfig], local: Endpoint, remote: Endpoint,
                 spi_i: bytes, spi_r: bytes, now: float) -> None:
        self.engine = engine
        self.initiator = initiator          # original initiator of *this* IKE SA
        self.config = config                # responders learn it in IKE_AUTH
        self.candidates = candidates
        self.registered = 0             # the engine's registration order
        self.local = local
        self.remote = remote
        self.spi_i = spi_i
        self.spi_r = spi_r
        self.state = IkeState.CONNECTING
        self.created_at = now
        self.last_heard = now
        self.queue: list[Exchange] = []
        self.children: list[ChildSa] = []
        self._after_response: list[Callable[[float], None]] = []

    # ------------------------------------------------------------------ identity helpers
    @property
    def tunnel(self) -> str:
        if self.config is not None:
            return self.config.name
        return self.candidates[0].name if self.candidates else "?"

    @property
    def my_spi(self) -> bytes:
        return self.spi_i if self.initiator else self.spi_r

    @property
    def peer_spi(self) -> bytes:
        return self.spi_r if self.initiator else self.spi_i

    @property
    def udp_encap(self) -> bool:
        return self.nat_local or self.nat_remote or self.nat_fake

    @property
    def mobike(self) -> bool:
        """Both sides announced MOBIKE_SUPPORTED (RFC 4555 §3.2)."""
        return self.mobike_ours and self.mobike_peer

    @property
    def established(self) -> bool:
        return self.state == IkeState.ESTABLISHED

    @property
    def alive(self) -> bool:
        return self.state != IkeState.DEAD

    @property
    def closing(self) -> bool:
        """Being deleted or replaced: no new work is accepted on it (§2.25.2)."""
        return (self.state != IkeState.ESTABLISHED or self.duplicate or self.redundant
                or self.rekeyed_to is not None)

    def __repr__(self) -> str:
        return (f"IkeSa({self.tunnel} {self.spi_i.hex()}_i {self.spi_r.hex()}_r "
                f"{'I' if self.initiator else 'R'} {self.state.value})")

    def random(self, n: int) -> bytes:
        return self.engine.random(n)

    def rekey_time(self, now: float, lifetime: float, margin: float) -> float:
        """When to rekey an SA created at `now`: `margin` before its end, minus a random part
        of up to rekey_jitter x margin (so both peers rarely start at once)."""
        cfg = self.config
        frac = cfg.rekey_jitter if cfg is not None else 1.0
        r = int.from_bytes(self.random(4), "big") / 2**32
        return now + lifetime - margin * (1.0 + frac * r)

    # ------------------------------------------------------------------ keys
    def set_keys(self, proposal: Proposal, keys: IkeKeys) -> None:
        from appliance.ike.crypto import IkeSuite, sk_ciphers

        self.proposal = proposal
        suite = proposal.derived("ike_suite", IkeSuite.from_proposal)
        self.prf_id = suite.prf
        self.keys = keys
        c_i, c_r = sk_ciphers(suite, keys)
        self.cipher_out, self.cipher_in = (c_i, c_r) if self.initiator else (c_r, c_i)

    @property
    def proposal_text(self) -> str:
        return format_proposal(self.proposal) if self.proposal is not None else "?"

    # ------------------------------------------------------------------ sending
    def _encode(self, msg: Message) -> bytes:
        if not msg.encrypted:
            return encode_message(msg)
        if self.cipher_out is None:   # kick() and the responders only encrypt once keyed
            raise ValueError(f"{self}: no keys to protect {msg.summary()}")
        return encode_message(msg, self.cipher_out, self.random(self.cipher_out.iv_size))

    def _encode_datagrams(self, msg: Message) -> list[bytes]:
        """The datagrams carrying `msg`: one, or its SKF fragments (RFC 7383 §2.5)."""
        return fragmentation.encode(self, msg, self._encode(msg))

    def _send(self, data: bytes, src: Endpoint | None = None, dst: Endpoint | None = None) -> None:
        self.engine.send(data, src or self.local, dst or self.remote)

    def queue_exchange(self, exchange: Exchange, now: float, *, front: bool = False) -> None:
        if front:
            self.queue.insert(0, exchange)
        else:
            self.queue.append(exchange)
        self.kick(now)

    def has_queued(self, pred: Callable[[Exchange], bool]) -> bool:
        if self.pending is not None and pred(self.pending.exchange):
            return True
        return any(pred(e) for e in self.queue)

    def kick(self, now: float) -> None:
        """Start the next queued exchange if the window is free (§2.3: window size 1)."""
        while self.pending is None and self.queue and self.state != IkeState.DEAD:
            ex = self.queue.pop(0)
            if self.cipher_out is None and ex.encrypted:
                self.queue.insert(0, ex)
                return
            payloads = ex.build(self, now)
            if payloads is None:
                continue
            msg = Message(self.spi_i, self.spi_r, ex.exchange_type, self.my_mid, False,
                          self.initiator, payloads, encrypted=ex.encrypted)
            data, *more = self._encode_datagrams(msg)
            log.debug("%s: sending %s", self, _Summary(msg))
            first_wait = ex.retransmit_delays(self._retransmit_cfg().schedule())[0]
            deadline = now + ex.give_up_after if ex.give_up_after is not None else None
            self.pending = _Pending(ex, self.my_mid, data, now, now + first_wait, 0, deadline,
                                    tuple(more))
            self.my_mid = (self.my_mid + 1) & 0xFFFFFFFF
            ex.sent(self, data)
            self.last_sent = now
            self._send(data)
            for d in more:
                self._send(d)

    def _retransmit_cfg(self):
        from appliance.ike.policy import RetransmitConfig

        cfg = self.config or (self.candidates[0] if self.candidates else None)
        return cfg.retransmit if cfg is not None else RetransmitConfig()

    def send_response(self, request: Message, payloads: list[Payload], src: Endpoint,
                      dst: Endpoint, *, encrypted: bool = True) -> bytes:
        """Answer `request` (received from `src` on `dst`): §2.11, reply to where it came from.
        Returns the datagram sent."""
        msg = Message(self.spi_i, self.spi_r, request.exchange_type, request.message_id, True,
                      self.initiator, payloads, encrypted=encrypted)
        data, *more = self._encode_datagrams(msg)
        log.debug("%s: sending %s", self, _Summary(msg))
        self.last_response = _CachedResponse(request.message_id, data, dst, src, tuple(more))
        self.engine.send(data, dst, src)
        for d in more:
            self.engine.send(d, dst, src)
        return data

    # ------------------------------------------------------------------ receiving
    def receive(self, data: bytes, hdr: Header, src: Endpoint, dst: Endpoint, now: float) -> None:
        """A datagram the engine routed to this IKE SA."""
        if self.state == IkeState.DEAD:
            return
        if hdr.exchange_type == ExchangeType.IKE_SA_INIT:
            from appliance.ike import ike_init

            ike_init.receive(self, data, hdr, src, dst, now)
            return
        if self.cipher_in is None:
            return
        if hdr.is_initiator == self.initiator:
            return  # a message claiming our own role: reflected or misrouted
        try:
            outer, enc = parse_message(data, hdr)
        except ParseError as e:
            log.info("%s: dropping malformed message: %s", self, e.reason)
            return
        if enc is None:
            log.info("%s: dropping unprotected %s", self, outer.summary())
            return
        if hdr.is_response:
            if self.pending is None or hdr.message_id != self.pending.message_id:
                log.debug("%s: dropping response %d without a request", self, hdr.message_id)
                return
            if hdr.exchange_type != self.pending.exchange.exchange_type:
                # §1.2: a response is of its request's exchange type; another one answers
                # nothing we asked (the header is covered by the ICV, so not even the peer's)
                log.info("%s: dropping %s response %d to our %s request", self,
                         _exchange_name(hdr.exchange_type), hdr.message_id,
                         _exchange_name(self.pending.exchange.exchange_type))
                return
        else:
            if not self._request_in_window(hdr.message_id):
                return
        try:
            if isinstance(enc, EncryptedFragment):
                msg = fragmentation.receive(self, data, hdr, outer, enc, now)
                if msg is None:
                    return   # stored, or dropped; nothing else changes
            else:
                cipher_in = self.cipher_in
                if (self.cipher_in_prev is not None and not hdr.is_response
                        and hdr.message_id != self.peer_mid):
                    cipher_in = self.cipher_in_prev   # keys updated since (intermediate.py)
                msg = decrypt_message(data, outer, enc, cipher_in)
                if self.reassembly is not None:   # a whole message: its set is not needed
                    fragmentation.forget(self, hdr)
        except AuthenticParseError as e:
            # The ICV verified but the plaintext is malformed: a new request gets the error
            # notify (§2.21.2), a response fails its exchange.
            log.info("%s: malformed protected message %d: %s", self, hdr.message_id, e.reason)
            if hdr.is_response:
                self._heard(src, dst, now)
                self._finish_pending(outer, now, failed=True)
                return
            if self._answer_retransmit(hdr.message_id, src, dst):
                return
            if self._refused_before_auth(outer, now):
                return
            self._heard(src, dst, now)
            self.peer_mid = (self.peer_mid + 1) & 0xFFFFFFFF
            self.send_response(outer, [Notify(e.notify, data=e.notify_data)], src, dst)
            if self.in_initial_exchanges and not self.initiator:
                # the one IKE_AUTH request this SA could take was unusable (strongSwan too
                # drops the IKE SA after answering INVALID_SYNTAX)
                self.fail(now, f"malformed IKE_AUTH request: {e.reason}")
            return
        except (IntegrityError, CryptoError, ParseError):
            # Not verified (too short for IV and ICV, wrong ICV): anyone can send that. Drop
            # it without a trace in the SA's state (§2.21): no answer, no message ID, no
            # liveness, no address change.
            log.info("%s: dropping message %d that fails its integrity check", self, hdr.message_id)
            return
        # Authentic from here on; a retransmitted request changes nothing either.
        from appliance.ike import mobike

        if hdr.is_response:
            if self.pending is not None and not self.pending.exchange.implicit_address_update:
                self.last_heard = now
            else:
                self._heard(src, dst, now)
            log.debug("%s: received %s", self, _Summary(msg))
            self._finish_pending(msg, now)
        else:
            if self._answer_retransmit(hdr.message_id, src, dst):
                return
            log.debug("%s: received %s", self, _Summary(msg))
            if self._refused_before_auth(msg, now):
                return
            if not self._request_type_known(msg):
                # not a request we can answer: dropped without using up its message ID, so the
                # peer's next genuine request (same ID) is not taken for a retransmission
                log.info("%s: ignoring request %d of %s: not an exchange answered here", self, msg.message_id,
                         _exchange_name(msg.exchange_type))
                return
            if mobike.is_update(msg):
                self.last_heard = now   # the addresses change in mobike.respond, not implicitly
            else:
                self._heard(src, dst, now)
            self.peer_mid = (self.peer_mid + 1) & 0xFFFFFFFF
            self.cipher_in_prev = None
            self._dispatch_request(msg, src, dst, now)
        self.engine.after_activity(self, now)

    def _request_type_known(self, msg: Message) -> bool:
        """The exchange types _dispatch_request answers (IKE_INTERMEDIATE only before IKE_AUTH)."""
        t = msg.exchange_type
        if t == ExchangeType.IKE_INTERMEDIATE:
            return self.in_initial_exchanges
        return t in (ExchangeType.IKE_AUTH, ExchangeType.CREATE_CHILD_SA, ExchangeType.IKE_FOLLOWUP_KE,
                     ExchangeType.INFORMATIONAL)

    @property
    def in_initial_exchanges(self) -> bool:
        """IKE_SA_INIT done, IKE_AUTH not yet (an SA made by a rekey inherits its
        authentication and is never in this state)."""
        return self.established_at is None and self.rekey_replaces is None

    def _refused_before_auth(self, msg: Message, now: float) -> bool:
        """§1.2, §1.3, §2.25.2: until IKE_AUTH has completed, the only request there can be is
        the initiator's IKE_AUTH. The initiator ignores any request (as strongSwan does); a
        responder drops the half-open SA of a peer that sends anything else (strongSwan:
        "received CREATE_CHILD_SA request for unestablished IKE_SA, rejected"), without an
        answer, so no message ID is used up."""
        if not self.in_initial_exchanges:
            return False
        if not self.initiator and msg.exchange_type in (ExchangeType.IKE_AUTH,
                                                        ExchangeType.IKE_INTERMEDIATE):
            return False    # IKE_INTERMEDIATE: RFC 9242 (intermediate.respond checks the rest)
        what = f"{_exchange_name(msg.exchange_type)} request {msg.message_id}"
        if self.initiator:
            log.info("%s: ignoring %s before IKE_AUTH completed", self, what)
        else:
            log.info("%s: %s before IKE_AUTH; dropping the half-open IKE SA", self, what)
            self.fail(now, f"peer sent a {what} before IKE_AUTH (refused, RFC 7296 §1.2)")
        return True

    def _heard(self, src: Endpoint, dst: Endpoint, now: float) -> None:
        """A new message (not a retransmission) whose ICV verified: the peer is alive, and it
        may have moved (§2.23)."""
        self.last_heard = now
        self._peer_moved(src, dst)

    def _request_in_window(self, mid: int) -> bool:
        if mid == self.peer_mid:
            return True
        if self.last_response is not None and mid == self.last_response.message_id:
            return True  # retransmission: answered after the integrity check
        log.debug("%s: dropping request %d outside the window (expect %d)", self, mid, self.peer_mid)
        return False

    def _answer_retransmit(self, mid: int, src: Endpoint, dst: Endpoint) -> bool:
        cached = self.last_response
        if cached is not None and mid == cached.message_id and mid != self.peer_mid:
            log.debug("%s: retransmitting response %d", self, mid)
            self.engine.send(cached.datagram, dst, src)
            for d in cached.more:
                self.engine.send(d, dst, src)
            return True
        return False

    def _peer_moved(self, src: Endpoint, dst: Endpoint) -> None:
        """§2.23 dynamic address update, only for a new message whose ICV verified (a replay
        must not move us; IkeSa.receive sees to both). A peer behind a NAT is followed to its
        new mapping - unless we are behind a NAT too: the side behind a NAT never moves (a
        single packet could redirect it). During IKE_AUTH the peer may change ports on its
        address (the float to port 4500 after NAT detection, strongSwan does it)."""
        if src == self.remote and dst == self.local:
            return
        if self.nat_remote and not self.nat_local:
            if self.mobike and src[0] != self.remote[0]:
                # RFC 4555 §3.8: with MOBIKE an address changes only by UPDATE_SA_ADDRESSES (and
                # its return routability check, mobike.py); a NAT rebinding's new port is followed
                log.debug("%s: message from %s:%d; MOBIKE: the SA stays with %s:%d", self, *src, *self.remote)
                return
        elif not (self.in_initial_exchanges and src[0] == self.remote[0]):
            log.debug("%s: message from %s:%d to %s:%d; the SA stays with %s:%d", self, *src, *dst,
                      *self.remote)
            return
        if src != self.remote:
            log.debug("%s: peer now at %s:%d", self, *src)
            self.remote = src
        if dst != self.local:
            self.local = dst
        if any(c.alive for c in self.children):
            # RFC 3948 / §2.23: the Child SAs' ESP-in-UDP follows the new mapping, in place
            log.info("%s: peer moved to %s:%d; Child SAs follow (no rekey)", self, *self.remote)
            self.engine.emit(ev.IkeSaAddressesUpdated(
                tunnel=self.tunnel, spi_i=self.spi_i, spi_r=self.spi_r, local=self.local,
                remote=self.remote, udp_encap=self.udp_encap))

    def _finish_pending(self, msg: Message, now: float, failed: bool = False) -> None:
        p = self.pending
        if p is None:
            return
        self.pending = None
        if failed:
            p.exchange.on_give_up(self, now)
        else:
            p.exchange.on_response(self, msg, now)
        self.kick(now)

    def _dispatch_request(self, msg: Message, src: Endpoint, dst: Endpoint, now: float) -> None:
        from appliance.ike import additional_ke, child_create, ike_auth, informational, intermediate, mobike

        if msg.exchange_type == ExchangeType.IKE_AUTH:
            payloads = ike_auth.respond(self, msg, src, dst, now)
        elif msg.exchange_type == ExchangeType.IKE_INTERMEDIATE and self.in_initial_exchanges:
            payloads = intermediate.respond(self, msg, now)
        elif msg.exchange_type == ExchangeType.CREATE_CHILD_SA:
            payloads = child_create.respond(self, msg, now)
        elif msg.exchange_type == ExchangeType.IKE_FOLLOWUP_KE:
            payloads = additional_ke.respond_followup(self, msg, now)    # RFC 9370 §2.2.4
        elif msg.exchange_type == ExchangeType.INFORMATIONAL:
            if mobike.handles(msg):   # RFC 4555: UPDATE_SA_ADDRESSES, COOKIE2, ADDITIONAL_*
                payloads = mobike.respond(self, msg, src, dst, now)
            else:
                payloads = informational.respond(self, msg, now)
        else:
            log.info("%s: ignoring request of unknown exchange type %d", self, msg.exchange_type)
            return
        if payloads is None:
            return
        self.send_response(msg, payloads, src, dst)
        self.last_sent = now
        for hook in self._after_response:
            hook(now)
        self._after_response.clear()

    def after_response(self, fn: Callable[[float], None]) -> None:
        """Run `fn` once the response to the request being handled has been sent (used when
        handling a request deletes this very SA)."""
        self._after_response.append(fn)

    # ------------------------------------------------------------------ timers
    def next_timer(self) -> float | None:
        if self.state == IkeState.DEAD:
            return None
        times: list[float] = []
        p = self.pending
        if p is not None:
            times.append(p.next_at)
            if p.deadline is not None:
                times.append(p.deadline)
        for t in (self.half_open_deadline, self.delete_deadline,
                  fragmentation.next_timer(self) if self.reassembly is not None else None):
            if t is not None:
                times.append(t)
        # the rest is only acted on while established (handle_timer mirrors this)
        if self.state == IkeState.ESTABLISHED:
            for t in (self.rekey_at, self.expire_at, self.rekey_retry_at, self._dpd_due(),
                      self._keepalive_due()):
                if t is not None:
                    times.append(t)
            for c in self.children:
                if not c.alive:
                    continue
                times.append(c.expire_at)
                if c.state == ChildState.INSTALLED and not c.redundant:
                    times.append(c.rekey_at)
                    if c.rekey_retry_at is not None:
                        times.append(c.rekey_retry_at)
                if c.delete_at is not None:
                    times.append(c.delete_at)
        return min(times) if times else None

    def _keepalive_due(self) -> float | None:
        """RFC 3948 §2.3 / §2.23: the side behind a NAT keeps its mapping with NAT keepalives
        when it sent the peer nothing (IKE, or ESP the driver reported) for `nat_keepalive` s."""
        cfg = self.config
        if cfg is None or not self.nat_local or cfg.nat_keepalive <= 0:
            return None
        return self.last_sent + cfg.nat_keepalive

    def _dpd_due(self) -> float | None:
        cfg = self.config
        if cfg is None or cfg.dpd.interval <= 0:
            return None
        if self.pending is not None or self.queue:
            return None  # any exchange under way checks liveness already
        return self.last_heard + cfg.dpd.interval

    def handle_timer(self, now: float) -> None:
        if self.state == IkeState.DEAD:
            return
        p = self.pending
        if p is not None:
            if p.deadline is not None and now >= p.deadline:
                self.pending = None
                p.exchange.on_give_up(self, now)
                if self.state == IkeState.DEAD:
                    return
                self.kick(now)
            elif now >= p.next_at:
                sched = p.exchange.retransmit_delays(self._retransmit_cfg().schedule())
                if p.retransmits >= len(sched) - 1:
                    self.pending = None
                    p.exchange.on_give_up(self, now)
                    if self.state == IkeState.DEAD:
                        return
                    self.kick(now)
                else:
                    p.retransmits += 1
                    p.next_at = now + sched[p.retransmits]
                    log.debug("%s: retransmit %d of request %d", self, p.retransmits, p.message_id)
                    self.last_sent = now
                    self._send(p.datagram)
                    for d in p.more:
                        self._send(d)
        if self.reassembly is not None:
            fragmentation.expire(self, now)
        if self.half_open_deadline is not None and now >= self.half_open_deadline:
            self.half_open_deadline = None
            if self.state == IkeState.CONNECTING:
                self.fail(now, "half-open IKE SA expired: IKE_AUTH did not complete in time"
                          + fragmentation.half_open_hint(self))
                return
        if self.delete_deadline is not None and now >= self.delete_deadline:
            from appliance.ike import informational

            self.delete_deadline = None
            informational.delete_ike_sa(self, now, "replaced IKE SA not deleted by the peer")
            if self.state == IkeState.DEAD:
                return
        if self.state == IkeState.ESTABLISHED:
            from appliance.ike import ike_rekey, informational, liveness

            if self.expire_at is not None and now >= self.expire_at:
                self.expire_at = None
                informational.delete_ike_sa(self, now, "IKE SA lifetime expired")
                return
            if self.rekey_at is not None and now >= self.rekey_at:
                self.rekey_at = None
                ike_rekey.start(self, now)
            if self.rekey_retry_at is not None and now >= self.rekey_retry_at:
                self.rekey_retry_at = None
                ike_rekey.start(self, now)
            d = self._dpd_due()
            if d is not None and now >= d:
                liveness.start(self, now)
            k = self._keepalive_due()
            if k is not None and now >= k:
                self.last_sent = now
                self.keepalives_sent += 1
                self.engine.send_keepalive(self.local, self.remote)
            self._child_timers(now)

    def _child_timers(self, now: float) -> None:
        from appliance.ike import child_rekey, informational

        for c in list(self.children):
            if not c.alive:
                continue
            if now >= c.expire_at:
                c.expire_at = float("inf")
                informational.delete_child(self, c, now, "Child SA lifetime expired")
                continue
            if c.delete_at is not None and now >= c.delete_at:
                c.delete_at = None
                if c.state != ChildState.DELETING:
                    informational.delete_child(self, c, now, "replaced Child SA not deleted by the peer")
                continue
            if c.state == ChildState.INSTALLED and not c.redundant:
                if now >= c.rekey_at:
                    c.rekey_at = c.expire_at  # not again until it expires (or a retry is set)
                    child_rekey.start(self, c, now)
                elif c.rekey_retry_at is not None and now >= c.rekey_retry_at:
                    c.rekey_retry_at = None
                    child_rekey.start(self, c, now)

    # ------------------------------------------------------------------ lifecycle
    def establish(self, now: float) -> None:
        """IKE_AUTH done: the SA is up (§1.2)."""
        cfg = self.config
        if cfg is None:   # ike_auth selects the tunnel first
            self.fail(now, "IKE_AUTH completed without a tunnel")
            return
        self.state = IkeState.ESTABLISHED
        self.established_at = now
        self.half_open_deadline = None
        self.rekey_at = self.rekey_time(now, cfg.ike_lifetime, cfg.ike_rekey_margin)
        self.expire_at = now + cfg.ike_lifetime
        self.engine.emit(ev.IkeSaUp(self.tunnel, self.spi_i, self.spi_r, self.initiator,
                                    self.local, self.remote, str(cfg.local_id),
                                    self.remote_id_text, self.proposal_text))
        self.engine.on_established(self, now)

    def schedule_lifetimes_after_rekey(self, now: float) -> None:
        cfg = self.config
        if cfg is None:   # a rekey copies the config of an established SA
            return
        self.rekey_at = self.rekey_time(now, cfg.ike_lifetime, cfg.ike_rekey_margin)
        self.expire_at = now + cfg.ike_lifetime

    def fail(self, now: float, reason: str, *, auth: bool = False) -> None:
        """The SA never came up."""
        if self.state == IkeState.DEAD:
            return
        if self.redundant or self.rekey_replaces is not None:
            self._remove(now, reason, peer_dead=False, failed=False, quiet=True)
            return
        if auth:
            self.engine.emit(ev.AuthFailed(self.tunnel, reason))
        else:
            self.engine.emit(ev.IkeSaFailed(self.tunnel, reason))
        self._remove(now, reason, peer_dead=False, failed=True, quiet=True)

    def die(self, now: float, reason: str, *, peer_dead: bool = False) -> None:
        """The SA (and its Child SAs) are gone."""
        if self.state == IkeState.DEAD:
            return
        if self.established_at is None:
            self.fail(now, reason)
            return
        quiet = self.redundant or self.rekeyed_to is not None
        self._remove(now, reason, peer_dead=peer_dead, failed=False, quiet=quiet)

    def _remove(self, now: float, reason: str, *, peer_dead: bool, failed: bool, quiet: bool) -> None:
        for c in list(self.children):
            if c.alive:
                self.remove_child(c, reason)
        self.state = IkeState.DEAD
        self.pending = None
        self.queue.clear()
        if not quiet:
            self.engine.emit(ev.IkeSaDown(self.tunnel, self.spi_i, self.spi_r, reason))
        log.info("%s: removed: %s", self, reason)
        self.engine.on_removed(self, now, reason, peer_dead=peer_dead, failed=failed)

    def peer_unreachable(self, now: float, reason: str) -> None:
        """Retransmissions exhausted or liveness timeout (§2.4)."""
        if self.state == IkeState.DEAD:
            return
        if (self.established_at is not None and self.rekeyed_to is None and not self.redundant
                and self.state != IkeState.DELETING):
            action = self.config.dpd.action if self.config else "clear"
            self.engine.emit(ev.PeerDead(self.tunnel, self.spi_i, self.spi_r, action))
            self._remove(now, reason, peer_dead=True, failed=False, quiet=False)
        else:
            self.die(now, reason)

    # ------------------------------------------------------------------ Child SAs
    def child_by_spi_in(self, spi: bytes) -> ChildSa | None:
        for c in self.children:
            if c.spi_in == spi and c.alive:
                return c
        return None

    def child_by_spi_out(self, spi: bytes) -> ChildSa | None:
        for c in self.children:
            if c.spi_out == spi and c.alive:
                return c
        return None

    def children_in_use(self) -> list[ChildSa]:
        return [c for c in self.children if c.alive and c.in_use]

    def install_child(self, child: ChildSa, *, outbound: bool) -> None:
        cfg = self.config
        if cfg is None:   # Child SAs are negotiated only with a tunnel selected
            log.warning("%s: Child SA %s not installed: no tunnel", self, child.describe())
            self.engine.release_child_spi(child.spi_in)
            return
        child.outbound_installed = outbound
        self.children.append(child)
        enc_in, int_in, enc_out, int_out = child.keys_in_out()
        encr = child.encr()
        replaces = None
        if child.replaces is not None:
            replaces = (child.replaces.spi_in_int, child.replaces.spi_out_int)
        self.engine.emit(ev.ChildSaInstalled(
            tunnel=self.tunnel, spi_in=child.spi_in_int, spi_out=child.spi_out_int,
            protocol=ProtocolId.ESP, encr_id=int(encr.id), encr_key_bits=encr.key_length,
            integ_id=child.integ_id(), esn=child.esn(), local_addr=self.local[0],
            remote_addr=self.remote[0], local_port=self.local[1], remote_port=self.remote[1],
            udp_encap=self.udp_encap, if_id=cfg.if_id,
            lifetime_soft=child.rekey_at - child.created_at,
            lifetime_hard=child.expire_at - child.created_at, outbound=outbound,
            replaces=replaces, encr_key_in=enc_in, encr_key_out=enc_out, integ_key_in=int_in,
            integ_key_out=int_out))
        log.info("%s: Child SA %s installed%s", self, child.describe(),
                 "" if outbound else " (inbound only)")

    def activate_outbound(self, child: ChildSa) -> None:
        if child.alive and not child.outbound_installed:
            child.outbound_installed = True
            self.engine.emit(ev.ChildSaOutboundInstalled(self.tunnel, child.spi_in_int, child.spi_out_int))
            log.info("%s: Child SA %s outbound installed", self, child.describe())

    def deactivate_outbound(self, child: ChildSa) -> None:
        if child.alive and child.outbound_installed:
            child.outbound_installed = False
            self.engine.emit(ev.ChildSaOutboundRemoved(self.tunnel, child.spi_in_int, child.spi_out_int))

    def remove_child(self, child: ChildSa, reason: str) -> None:
        if not child.alive:
            return
        succ = child.rekeyed_by
        if succ is not None and succ.alive and not succ.redundant:
            # make-before-break: the replacement sends before the old pair goes
            self.activate_outbound(succ)
        child.state = ChildState.DELETED
        if child in self.children:
            self.children.remove(child)
        self.engine.emit(ev.ChildSaDeleted(self.tunnel, child.spi_in_int, child.spi_out_int, reason))
        log.info("%s: Child SA %s deleted: %s", self, child.describe(), reason)
        self.engine.after_child_removed(self, child)


def _exchange_name(x: int) -> str:
    try:
        return ExchangeType(x).name
    except ValueError:
        return f"exchange type {x}"


__all__ = ["Endpoint", "Exchange", "IkeSa", "IkeState"]
