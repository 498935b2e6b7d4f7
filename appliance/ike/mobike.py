"""MOBIKE, IKEv2 mobility (RFC 4555): the IKE SA and its Child SAs move to a new address pair.

- **Negotiation** (§3.2, §4.2.1): with `TunnelConfig.mobike`, IKE_AUTH carries MOBIKE_SUPPORTED
  (and NO_ADDITIONAL_ADDRESSES: we announce no other address of ours) both ways; the SA uses
  MOBIKE when both sides sent it (`IkeSa.mobike`). The peer's ADDITIONAL_IP4/IP6_ADDRESS are
  kept (`IkeSa.peer_additional`, status only: we never move the peer's side ourselves).
- **Initiator** (§3.5): only the original initiator decides the addresses. When the driver
  reports that our address towards the peer changed (`IkeEngine.local_address_changed`), the SA
  sends from the new address at once (a request in flight is retransmitted from there) and
  queues an INFORMATIONAL with UPDATE_SA_ADDRESSES, NAT detection redone for the new path
  (§3.5: NAT_DETECTION_*_IP hashed with the IKE SA's SPIs) and COOKIE2 (§3.6). Only the
  authenticated response carrying the same COOKIE2 moves the Child SAs: NAT state taken from
  the response's NAT detection, port 4500 if a NAT appeared, `IkeSaAddressesUpdated` emitted.
  No rekey, no new Child SA, same SPIs.
- **Responder** (§3.5, §3.6): only an authenticated UPDATE_SA_ADDRESSES request (the ICV has
  verified: IkeSa.receive) changes the IKE SA's addresses - to where that request came from and
  arrived - and only on an SA that negotiated MOBIKE and that the peer initiated. The answer
  carries our NAT detection and echoes COOKIE2. The Child SAs follow after a return routability
  check (§3.6): an INFORMATIONAL with a fresh COOKIE2 to the new address; its authenticated
  answer with the same cookie emits `IkeSaAddressesUpdated`. A port change alone (a NAT
  rebinding) needs no check. NO_NATS_ALLOWED (§3.9) with a NAT on the path is answered
  UNACCEPTABLE_ADDRESSES and nothing moves.
- Every INFORMATIONAL request with COOKIE2 gets it back in the answer (§3.6).
- **Without MOBIKE** (the peer did not announce it, or `mobike: false`): the IKE SA cannot move.
  The engine deletes it (the DELETE leaves from the new address: a peer answers where a request
  came from, §2.11) and the tunnel is initiated again from the new address (reconnect_delay).

Sans-IO like the rest of the engine: the driver learns address changes (netlink, in the daemon)
and hands them in.
"""

from __future__ import annotations

import ipaddress
import logging

from appliance.ike import events as ev
from appliance.ike import natd
from appliance.ike.constants import ExchangeType, NotifyType
from appliance.ike.message import Message, Notify, Payload
from appliance.ike.sa import Endpoint, Exchange, IkeSa, IkeState

log = logging.getLogger("isthmus.ike")

COOKIE2_SIZE = 16           # RFC 4555 §3.6: 8..64 octets
COOKIE2_MIN, COOKIE2_MAX = 8, 64
MAX_ADDITIONAL = 16         # ADDITIONAL_*_ADDRESS kept from the peer
MAX_COOKIE_MISMATCH = 3     # UPDATE_SA_ADDRESSES retried after a response with a wrong COOKIE2

_MOBIKE_NOTIFIES = frozenset({NotifyType.UPDATE_SA_ADDRESSES, NotifyType.COOKIE2,
                              NotifyType.ADDITIONAL_IP4_ADDRESS, NotifyType.ADDITIONAL_IP6_ADDRESS,
                              NotifyType.NO_ADDITIONAL_ADDRESSES})


# ------------------------------------------------------------------ IKE_AUTH (§3.2, §4.2.1)


def auth_payloads(sa: IkeSa, *, request: bool) -> list[Payload]:
    """MOBIKE_SUPPORTED and NO_ADDITIONAL_ADDRESSES for our IKE_AUTH message: in the request when
    the tunnel enables MOBIKE, in the response only when the request had it as well."""
    cfg = sa.config
    if cfg is None or not cfg.mobike or (not request and not sa.mobike_peer):
        return []
    sa.mobike_ours = True
    return [Notify(NotifyType.MOBIKE_SUPPORTED), Notify(NotifyType.NO_ADDITIONAL_ADDRESSES)]


def note_peer(sa: IkeSa, msg: Message) -> None:
    """The peer's IKE_AUTH message: does it support MOBIKE, which other addresses has it."""
    if msg.notify(NotifyType.MOBIKE_SUPPORTED) is not None:
        sa.mobike_peer = True
    _note_additional(sa, msg)


def _note_additional(sa: IkeSa, msg: Message) -> None:
    """ADDITIONAL_IP4/IP6_ADDRESS (§3.4): the full list each time; NO_ADDITIONAL_ADDRESSES clears."""
    addrs: list[str] = []
    seen = False
    for n in msg.notifies():
        if n.notify_type == NotifyType.NO_ADDITIONAL_ADDRESSES:
            seen = True
        elif n.notify_type in (NotifyType.ADDITIONAL_IP4_ADDRESS, NotifyType.ADDITIONAL_IP6_ADDRESS):
            seen = True
            size = 4 if n.notify_type == NotifyType.ADDITIONAL_IP4_ADDRESS else 16
            if len(n.data) == size and len(addrs) < MAX_ADDITIONAL:
                addrs.append(str(ipaddress.ip_address(n.data)))
    if seen:
        sa.peer_additional = tuple(addrs)


def inherit(new: IkeSa, old: IkeSa) -> None:
    """An IKE SA rekey keeps what IKE_AUTH negotiated (§2.18), and who decides the addresses:
    the original initiator, whoever rekeyed (RFC 4555 §3.1)."""
    new.mobike_ours, new.mobike_peer = old.mobike_ours, old.mobike_peer
    new.peer_additional = old.peer_additional
    new.original_initiator = original_initiator(old)


def original_initiator(sa: IkeSa) -> bool:
    """Did we initiate the first IKE SA of this chain of rekeys (RFC 4555 §3.1's "initiator")?"""
    return sa.initiator if sa.original_initiator is None else sa.original_initiator


def adopted(old: IkeSa, new: IkeSa, now: float) -> None:
    """`new` replaced `old` (an IKE SA rekey): an address update the old SA still owed - queued,
    in flight, or a move since `new` was made from it - is sent on the new one."""
    owed = any(isinstance(e, UpdateSaAddresses) for e in old.queue) or (
        old.pending is not None and isinstance(old.pending.exchange, UpdateSaAddresses))
    old.queue = [e for e in old.queue if not isinstance(e, UpdateSaAddresses)]
    if new.local[0] != old.local[0]:
        new.local = (old.local[0], new.local[1])
        owed = True
    if owed and new.mobike and original_initiator(new):
        new.queue_exchange(UpdateSaAddresses(), now, front=True)


# ------------------------------------------------------------------ initiator (§3.5)


class UpdateSaAddresses(Exchange):
    exchange_type = ExchangeType.INFORMATIONAL
    name = "INFORMATIONAL (UPDATE_SA_ADDRESSES)"
    implicit_address_update = False

    def __init__(self, attempt: int = 1) -> None:
        self.attempt = attempt
        self.cookie = b""
        self.path: tuple[Endpoint, Endpoint] | None = None

    def build(self, sa: IkeSa, now: float):
        if sa.state != IkeState.ESTABLISHED or not sa.mobike:
            return None
        self.cookie = sa.random(COOKIE2_SIZE)
        self.path = (sa.local, sa.remote)
        out: list[Payload] = [Notify(NotifyType.UPDATE_SA_ADDRESSES)]
        out += _natd_payloads(sa, sa.local, sa.remote)
        out += [Notify(NotifyType.NO_ADDITIONAL_ADDRESSES), Notify(NotifyType.COOKIE2, data=self.cookie)]
        log.info("%s: our address is now %s:%d: UPDATE_SA_ADDRESSES", sa, *sa.local)
        return out

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        echoed = msg.notify(NotifyType.COOKIE2)
        if echoed is None or echoed.data != self.cookie:
            # §3.6: a response without our cookie does not answer this request
            log.warning("%s: UPDATE_SA_ADDRESSES response without our COOKIE2; ignored", sa)
            if self.attempt < MAX_COOKIE_MISMATCH:
                sa.queue_exchange(UpdateSaAddresses(self.attempt + 1), now, front=True)
            else:
                sa.peer_unreachable(now, "UPDATE_SA_ADDRESSES answered without our COOKIE2 "
                                         f"{MAX_COOKIE_MISMATCH} times")
            return
        err = msg.error_notify()
        if err is not None:
            what = _nname(err.notify_type)
            log.warning("%s: the peer refused our new address %s (%s)", sa, sa.local[0], what)
            _cannot_move(sa, now, f"the peer refused our new address {sa.local[0]} ({what})")
            return
        if sa.has_queued(lambda e: isinstance(e, UpdateSaAddresses)):
            return   # moved again since this request: the queued one brings the final state
        nat = natd.check(msg, sa.local, sa.remote) if sa.config.nat_traversal != "off" else None
        sa.nat_local, sa.nat_remote = nat if nat is not None else (False, False)
        if sa.udp_encap and sa.local[1] != 4500:
            # RFC 7296 §2.23: a NAT on the new path: IKE and ESP move to port 4500, and the peer
            # learns the NAT's mapping of that port from one more update sent from there
            sa.local, sa.remote = (sa.local[0], 4500), (sa.remote[0], 4500)
            sa.queue_exchange(UpdateSaAddresses(), now, front=True)
        sa.mobike_moves += 1
        moved(sa)


def _cannot_move(sa: IkeSa, now: float, reason: str) -> None:
    from appliance.ike import informational

    informational.delete_ike_sa(sa, now, reason)


def local_address_changed(sa: IkeSa, address: str, now: float) -> str:
    """Our address towards the peer is `address` now. Returns what was done: "update" (an
    UPDATE_SA_ADDRESSES is under way), "unchanged", "no-mobike" (the SA cannot move: it is
    being deleted, the tunnel re-initiates), or "responder" (the peer initiated this SA; it
    decides the addresses, §3.1: nothing is sent)."""
    if address == sa.local[0]:
        return "unchanged"
    if sa.state != IkeState.ESTABLISHED or sa.closing:
        sa.local = (address, sa.local[1])
        return "unchanged"
    if not original_initiator(sa):
        return "responder"
    old = sa.local
    sa.local = (address, sa.local[1])      # everything from now leaves from the new address
    if not sa.mobike:
        log.info("%s: our address moved from %s to %s and the IKE SA does not use MOBIKE "
                 "(the peer did not announce it, or mobike is off): deleting it to start anew",
                 sa, old[0], address)
        _cannot_move(sa, now, f"local address moved from {old[0]} to {address} without MOBIKE")
        return "no-mobike"
    if not any(isinstance(e, UpdateSaAddresses) for e in sa.queue):
        # next, after the exchange in flight (window size 1), which is retransmitted from the
        # new address from now on
        sa.queue_exchange(UpdateSaAddresses(), now, front=True)
    return "update"


# ------------------------------------------------------------------ responder (§3.5, §3.6)


def handles(msg: Message) -> bool:
    """An INFORMATIONAL request with a MOBIKE notify (mobike.respond answers it)."""
    return any(n.notify_type in _MOBIKE_NOTIFIES for n in msg.notifies())


def is_update(msg: Message) -> bool:
    return not msg.is_response and msg.exchange_type == ExchangeType.INFORMATIONAL and \
        msg.notify(NotifyType.UPDATE_SA_ADDRESSES) is not None


def respond(sa: IkeSa, msg: Message, src: Endpoint, dst: Endpoint, now: float) -> list[Payload] | None:
    """Answer an authenticated INFORMATIONAL request carrying MOBIKE notifies (received from
    `src` on `dst`)."""
    from appliance.ike import informational

    extra: list[Payload] = []
    _note_additional(sa, msg)
    if msg.notify(NotifyType.UPDATE_SA_ADDRESSES) is not None:
        extra += _update(sa, msg, src, dst, now)
    cookie = msg.notify(NotifyType.COOKIE2)
    if cookie is not None and COOKIE2_MIN <= len(cookie.data) <= COOKIE2_MAX:
        extra.append(Notify(NotifyType.COOKIE2, data=cookie.data))
    return informational.respond(sa, msg, now) + extra


def _update(sa: IkeSa, msg: Message, src: Endpoint, dst: Endpoint, now: float) -> list[Payload]:
    if not sa.mobike or original_initiator(sa) or sa.state != IkeState.ESTABLISHED:
        log.info("%s: UPDATE_SA_ADDRESSES ignored: %s", sa,
                 "we initiated this IKE SA (only the initiator moves it, RFC 4555 §3.1)" if original_initiator(sa)
                 else "MOBIKE was not negotiated" if not sa.mobike else "the IKE SA is not established")
        return []
    nat = natd.check(msg, dst, src) if sa.config.nat_traversal != "off" else None
    nat_local, nat_remote = nat if nat is not None else (False, False)
    if msg.notify(NotifyType.NO_NATS_ALLOWED) is not None and (nat_local or nat_remote):
        log.info("%s: UPDATE_SA_ADDRESSES from %s:%d with NO_NATS_ALLOWED through a NAT: refused",
                 sa, *src)
        return [Notify(NotifyType.UNACCEPTABLE_ADDRESSES)]
    old_remote = sa.remote
    sa.local, sa.remote = dst, src
    sa.nat_local, sa.nat_remote = nat_local, nat_remote
    reply = _natd_payloads(sa, dst, src) if nat is not None else []
    log.info("%s: peer moved from %s:%d to %s:%d (UPDATE_SA_ADDRESSES)", sa, *old_remote, *src)
    if src[0] == old_remote[0]:
        moved(sa)      # same address, another port (a NAT rebinding): nothing to check
    else:
        sa.after_response(lambda t: sa.queue_exchange(ReturnRoutability(src), t))
    return reply


class ReturnRoutability(Exchange):
    """§3.6: before the Child SAs' traffic goes to a new address, check the peer answers there
    (an INFORMATIONAL with COOKIE2; only its authenticated answer with the cookie counts)."""

    exchange_type = ExchangeType.INFORMATIONAL
    name = "INFORMATIONAL (return routability check)"
    implicit_address_update = False

    def __init__(self, address: Endpoint) -> None:
        self.address = address
        self.cookie = b""

    def build(self, sa: IkeSa, now: float):
        if sa.state != IkeState.ESTABLISHED or sa.remote != self.address:
            return None    # moved again: a later check covers the current address
        self.cookie = sa.random(COOKIE2_SIZE)
        return [Notify(NotifyType.COOKIE2, data=self.cookie)]

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        echoed = msg.notify(NotifyType.COOKIE2)
        if echoed is None or echoed.data != self.cookie:
            log.warning("%s: return routability check of %s:%d answered without our COOKIE2",
                        sa, *self.address)
            return
        if sa.remote == self.address:
            moved(sa)


# ------------------------------------------------------------------ common


def moved(sa: IkeSa) -> None:
    """The IKE SA's addresses are final: the Child SAs follow, in place."""
    if any(c.alive for c in sa.children):
        log.info("%s: Child SAs move to %s:%d - %s:%d (no rekey)", sa, *sa.local, *sa.remote)
        sa.engine.emit(ev.IkeSaAddressesUpdated(
            tunnel=sa.tunnel, spi_i=sa.spi_i, spi_r=sa.spi_r, local=sa.local, remote=sa.remote,
            udp_encap=sa.udp_encap))


def _natd_payloads(sa: IkeSa, local: Endpoint, remote: Endpoint) -> list[Notify]:
    cfg = sa.config
    mode = cfg.nat_traversal if cfg is not None else "auto"
    if mode == "off":
        return []
    fake = sa.random(20) if mode == "force" else None
    return natd.payloads(sa.spi_i, sa.spi_r, local, remote, fake)


def _nname(n: int) -> str:
    try:
        return NotifyType(n).name
    except ValueError:
        return str(n)
