"""The IKE_INTERMEDIATE exchange (RFC 9242), here carrying RFC 9370's additional key exchanges.

Negotiation (§3.1): the initiator sends INTERMEDIATE_EXCHANGE_SUPPORTED in IKE_SA_INIT when one
of its tunnel's IKE proposals has an additional key exchange; the responder answers with it
whenever the request had it. A responder never selects an additional key exchange (other than
NONE) for an initiator that did not announce it (proposals.offer_without_intermediate), and an
initiator refuses a response that selects one without announcing it.

Exchanges (§3.2): after IKE_SA_INIT, one IKE_INTERMEDIATE exchange per additional key exchange
(message IDs 1..n, IKE_AUTH then n+1), protected with the keys of the previous key state
(additional_ke.py updates them after each). Until IKE_AUTH completes the responder accepts only
IKE_INTERMEDIATE (while additional key exchanges remain) and IKE_AUTH (once none remains);
anything else drops the half-open SA (ike_auth, IkeSa._refused_before_auth).

Authentication (§3.3.2): each side keeps the chains

    IntAuth_i(n) = prf(SK_pi(n), IntAuth_i(n-1) | IntAuth_i(n)_A | IntAuth_i(n)_P)
    IntAuth_r(n) = prf(SK_pr(n), IntAuth_r(n-1) | IntAuth_r(n)_A | IntAuth_r(n)_P)

over the requests (i) and responses (r), SK_p*(n) being the keys that protect exchange n; A is
the IKE header and the SK payload header with their Length fields as if the SK payload held
only the plaintext (no IV, padding or ICV - so fragmentation makes no difference), P the inner
payloads. IKE_AUTH then signs / MACs (ike_auth)

    InitiatorSignedOctets = RealMessage1 | NonceRData | MACedIDForI | IntAuth
    ResponderSignedOctets = RealMessage2 | NonceIData | MACedIDForR | IntAuth
    IntAuth = IntAuth_i(N) | IntAuth_r(N) | IKE_AUTH_MID

(empty without IKE_INTERMEDIATE: plain RFC 7296). MACedIDFor* use the final SK_p*.

Errors: a KE payload missing, of another method than the one negotiated for this exchange, of
the wrong length or refused by the method's checks (ML-KEM's modulus check) is answered
INVALID_SYNTAX and the half-open SA dropped (draft-ietf-ipsecme-ikev2-mlkem: the responder
refuses a bad encapsulation key; there is no INVALID_KE_PAYLOAD round trip here, the method was
negotiated in IKE_SA_INIT); an initiator given a bad response fails the SA with the reason.
A retransmitted IKE_INTERMEDIATE request (our response was lost) is still protected with the
keys before the update: the responder keeps the previous inbound key for it
(`IkeSa.cipher_in_prev`) and answers from its cache; the next new request drops that key.
"""

from __future__ import annotations

import logging
import struct

from appliance.ike import additional_ke
from appliance.ike.constants import ExchangeType, NotifyType, PayloadType
from appliance.ike.crypto import CryptoError, InvalidKeyExchange, KeyExchange, MlKem, prf
from appliance.ike.message import KE, Message, Notify, Payload, _encode_chain, _header
from appliance.ike.proposals import has_additional_ke
from appliance.ike.sa import Exchange, IkeSa

log = logging.getLogger("isthmus.ike")

_IKE_HEADER_LEN = 28
_GENERIC_HEADER_LEN = 4


# --------------------------------------------------------------------------- negotiation
def request_notifies(sa: IkeSa) -> list[Notify]:
    """INTERMEDIATE_EXCHANGE_SUPPORTED for our IKE_SA_INIT request, when a proposal of the
    tunnel has an additional key exchange."""
    cfg = sa.config
    if cfg is None or not has_additional_ke(cfg.ike_proposals):
        return []
    sa.intermediate_ours = True
    return [Notify(NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED)]


def peer_announced(msg: Message) -> bool:
    return msg.notify(NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED) is not None


def response_notifies(sa: IkeSa, request: Message) -> list[Notify]:
    """The responder's answer to the announcement (§3.1)."""
    if not peer_announced(request):
        return []
    sa.intermediate_peer = True
    sa.intermediate_ours = True
    return [Notify(NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED)]


def after_init(sa: IkeSa, response: Message | None = None) -> str | None:
    """Note the additional key exchanges the selected proposal (`sa.proposal`) asks for. The
    initiator passes the IKE_SA_INIT response; returns why it cannot be used, or None."""
    todo = additional_ke.negotiated(sa.proposal) if sa.proposal is not None else ()
    if response is not None:
        sa.intermediate_peer = peer_announced(response)
        if todo and not (sa.intermediate_ours and sa.intermediate_peer):
            return ("responder selected additional key exchanges ("
                    + ", ".join(map(additional_ke.method_name, todo))
                    + ") without IKE_INTERMEDIATE (RFC 9370 §2.2.1)")
    sa.addke_todo = todo
    return None


def auth_message_id(sa: IkeSa) -> int:
    """The message ID IKE_AUTH has: after IKE_SA_INIT (0) and the IKE_INTERMEDIATE exchanges."""
    return 1 + sa.intermediate_count


def int_auth(sa: IkeSa) -> bytes:
    """IntAuth for the AUTH payloads (§3.3.2); empty when no IKE_INTERMEDIATE took place."""
    if not sa.intermediate_count:
        return b""
    return sa.int_auth_i + sa.int_auth_r + struct.pack("!I", auth_message_id(sa))


def _chain(sa: IkeSa, key: bytes, prev: bytes, msg: Message, first: int, inner: bytes) -> bytes:
    """prf(SK_p, IntAuth(n-1) | A | P) for one IKE_INTERMEDIATE message."""
    a = (_header(msg, PayloadType.SK, _IKE_HEADER_LEN + _GENERIC_HEADER_LEN + len(inner))
         + struct.pack("!BBH", first, 0, _GENERIC_HEADER_LEN + len(inner)))
    return prf(sa.prf_id, key, prev + a + inner)


def _first_inner(inner: bytes, payloads: list[Payload]) -> int:
    return payloads[0].payload_type if payloads and inner else 0


# --------------------------------------------------------------------------- initiator
class IkeIntermediate(Exchange):
    exchange_type = ExchangeType.IKE_INTERMEDIATE
    name = "IKE_INTERMEDIATE"

    def __init__(self) -> None:
        self.method = 0
        self.share: KeyExchange | MlKem | None = None

    def build(self, sa: IkeSa, now: float):
        if sa.keys is None or not sa.addke_todo or not sa.in_initial_exchanges:
            return None
        self.method = sa.addke_todo[0]
        try:
            self.share = additional_ke.initiator_share(self.method, sa.random)
        except CryptoError as e:
            sa.fail(now, f"IKE_INTERMEDIATE: cannot make a "
                         f"{additional_ke.method_name(self.method)} key share: {e}")
            return None
        payloads: list[Payload] = [KE(self.method, self.share.public_bytes)]
        first, inner = _encode_chain(payloads)
        msg = Message(sa.spi_i, sa.spi_r, self.exchange_type, sa.my_mid, False, sa.initiator,
                      payloads, encrypted=True)
        sa.int_auth_i = _chain(sa, sa.keys.SK_pi, sa.int_auth_i, msg, first, inner)
        return payloads

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        if sa.keys is None or self.share is None:
            sa.fail(now, "IKE_INTERMEDIATE response to a request we did not build")
            return
        name = additional_ke.method_name(self.method)
        err = msg.error_notify()
        if err is not None:
            sa.fail(now, f"peer refused the {name} additional key exchange (IKE_INTERMEDIATE): "
                         f"{_nname(err.notify_type)}")
            return
        ke = msg.get(KE)
        if ke is None or ke.dh_group != self.method:
            got = "no KE payload" if ke is None else f"a {additional_ke.method_name(ke.dh_group)} KE payload"
            sa.fail(now, f"IKE_INTERMEDIATE response has {got}; the {name} additional key "
                         "exchange was negotiated")
            return
        try:
            shared = self.share.shared_secret(ke.data)
        except InvalidKeyExchange as e:
            sa.fail(now, f"IKE_INTERMEDIATE response: invalid {name} KE payload: {e}")
            return
        sa.int_auth_r = _chain(sa, sa.keys.SK_pr, sa.int_auth_r, msg,
                               _first_inner(msg.inner, msg.payloads), msg.inner)
        additional_ke.update_keys(sa, shared)
        _done(sa, self.method)
        log.info("%s: additional key exchange %s done (IKE_INTERMEDIATE %d)", sa, name,
                 msg.message_id)
        start(sa, now)


def start(sa: IkeSa, now: float) -> None:
    """After IKE_SA_INIT, and after each IKE_INTERMEDIATE: the next additional key exchange,
    or IKE_AUTH when none remains."""
    if sa.addke_todo:
        sa.queue_exchange(IkeIntermediate(), now, front=True)
        return
    from appliance.ike import ike_auth

    ike_auth.start(sa, now)


def _done(sa: IkeSa, method: int) -> None:
    sa.addke_todo = sa.addke_todo[1:]
    sa.addke_done = sa.addke_done + (method,)
    sa.intermediate_count += 1


# --------------------------------------------------------------------------- responder
def respond(sa: IkeSa, msg: Message, now: float) -> list[Payload] | None:
    """An IKE_INTERMEDIATE request (IkeSa lets one through only before IKE_AUTH)."""
    if sa.initiator or sa.keys is None:
        return [Notify(NotifyType.INVALID_SYNTAX)]
    if not sa.addke_todo:
        reason = ("peer sent IKE_INTERMEDIATE with no additional key exchange left to do"
                  if sa.intermediate_peer else "peer sent IKE_INTERMEDIATE without announcing it")
        return _refuse(sa, reason)
    method = sa.addke_todo[0]
    name = additional_ke.method_name(method)
    ke = msg.get(KE)
    if ke is None or ke.dh_group != method:
        got = "no KE payload" if ke is None else f"a {additional_ke.method_name(ke.dh_group)} KE payload"
        return _refuse(sa, f"IKE_INTERMEDIATE request has {got}; the {name} additional key "
                           "exchange was negotiated")
    try:
        reply_data, shared = additional_ke.responder_share(method, ke.data, sa.random)
    except InvalidKeyExchange as e:
        return _refuse(sa, f"IKE_INTERMEDIATE request: invalid {name} KE payload: {e}")
    except CryptoError as e:
        return _refuse(sa, f"IKE_INTERMEDIATE request: {name}: {e}")
    keys = sa.keys
    sa.int_auth_i = _chain(sa, keys.SK_pi, sa.int_auth_i, msg,
                           _first_inner(msg.inner, msg.payloads), msg.inner)
    reply: list[Payload] = [KE(method, reply_data)]
    first, inner = _encode_chain(reply)
    out = Message(sa.spi_i, sa.spi_r, msg.exchange_type, msg.message_id, True, sa.initiator,
                  reply, encrypted=True)
    sa.int_auth_r = _chain(sa, keys.SK_pr, sa.int_auth_r, out, first, inner)
    _done(sa, method)

    def _update(_now: float) -> None:
        # the response went out under the old keys; what follows uses the new ones
        prev = sa.cipher_in
        additional_ke.update_keys(sa, shared)
        sa.cipher_in_prev = prev
        log.info("%s: additional key exchange %s done (IKE_INTERMEDIATE %d)", sa, name,
                 msg.message_id)

    sa.after_response(_update)
    return reply


def _refuse(sa: IkeSa, reason: str) -> list[Payload]:
    log.info("%s: %s", sa, reason)
    sa.after_response(lambda t: sa.fail(t, reason))
    return [Notify(NotifyType.INVALID_SYNTAX)]


def _nname(n: int) -> str:
    try:
        return NotifyType(n).name
    except ValueError:
        return str(n)


__all__ = ["IkeIntermediate", "after_init", "auth_message_id", "int_auth", "request_notifies",
           "respond", "response_notifies", "start"]
