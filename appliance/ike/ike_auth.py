"""IKE_AUTH with pre-shared keys (RFC 7296 §1.2, §2.15) and the first Child SA.

AUTH = prf(prf(PSK, "Key Pad for IKEv2"), <SignedOctets>) where the initiator signs
RealMessage1 | Nr | prf(SK_pi, IDi') and the responder RealMessage2 | Ni | prf(SK_pr, IDr').
Identities: ID_IPV4_ADDR, ID_IPV6_ADDR, ID_FQDN, ID_RFC822_ADDR, ID_DER_ASN1_DN (policy.Identity).
"""

from __future__ import annotations

import logging

from appliance.ike import child_create
from appliance.ike import events as ev
from appliance.ike.child_create import ChildError, ChildRequest
from appliance.ike.constants import AuthMethod, ExchangeType, NotifyType
from appliance.ike.crypto import psk_auth, psk_auth_matches, signed_octets
from appliance.ike.message import AUTH, IDi, IDr, Message, Notify, Payload
from appliance.ike.policy import Identity
from appliance.ike.sa import Endpoint, Exchange, IkeSa, IkeState

log = logging.getLogger("isthmus.ike")


def _auth_value(sa: IkeSa, psk: bytes, *, as_initiator: bool, id_body: bytes) -> bytes:
    keys = sa.keys
    if keys is None:   # callers check first
        raise ValueError("IKE SA without keys cannot compute AUTH")
    if as_initiator:
        octets = signed_octets(sa.prf_id, sa.init_request, sa.nonce_r, keys.SK_pi, id_body)
    else:
        octets = signed_octets(sa.prf_id, sa.init_response, sa.nonce_i, keys.SK_pr, id_body)
    return psk_auth(sa.prf_id, psk, octets)


def _auth_ok(sa: IkeSa, psk: bytes, *, of_initiator: bool, id_body: bytes, received: bytes) -> bool:
    keys = sa.keys
    if keys is None:
        return False
    if of_initiator:
        octets = signed_octets(sa.prf_id, sa.init_request, sa.nonce_r, keys.SK_pi, id_body)
    else:
        octets = signed_octets(sa.prf_id, sa.init_response, sa.nonce_i, keys.SK_pr, id_body)
    return psk_auth_matches(sa.prf_id, psk, octets, received)


class IkeAuth(Exchange):
    exchange_type = ExchangeType.IKE_AUTH
    name = "IKE_AUTH"

    def __init__(self) -> None:
        self.req: ChildRequest | None = None

    def build(self, sa: IkeSa, now: float):
        cfg = sa.config
        if cfg is None or sa.keys is None:
            return None
        idi = IDi(cfg.local_id.id_type, cfg.local_id.data)
        payloads: list[Payload] = [idi]
        if sa.engine.should_send_initial_contact(sa):
            payloads.append(Notify(NotifyType.INITIAL_CONTACT))
            sa.sent_initial_contact = True
        if cfg.remote_id is not None:
            payloads.append(IDr(cfg.remote_id.id_type, cfg.remote_id.data))
        payloads.append(AUTH(AuthMethod.SHARED_KEY_MIC,
                             _auth_value(sa, cfg.psk, as_initiator=True, id_body=idi.body())))
        self.req = child_create.new_request(sa, in_auth=True)
        payloads += self.req.payloads(in_auth=True)
        return payloads

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        cfg = sa.config
        if cfg is None or self.req is None:   # never built: nothing of ours to complete
            sa.fail(now, "IKE_AUTH response to a request we did not build")
            return
        if msg.notify(NotifyType.AUTHENTICATION_FAILED) is not None:
            sa.engine.release_child_spi(self.req.spi_in)
            sa.fail(now, f"peer refused our authentication as {cfg.local_id} "
                         "(AUTHENTICATION_FAILED): check the pre-shared key and the local and "
                         "remote identities on both sides", auth=True)
            return
        idr, auth = msg.get(IDr), msg.get(AUTH)
        if idr is None or auth is None:
            err = msg.error_notify()
            sa.engine.release_child_spi(self.req.spi_in)
            why = (f"peer answered {child_create._nname(err.notify_type)}" if err is not None
                   else "response lacks IDr or AUTH")
            sa.fail(now, f"IKE_AUTH failed: {why}")
            return
        peer = Identity(idr.id_type, idr.data)
        if cfg.remote_id is not None and peer != cfg.remote_id:
            sa.engine.release_child_spi(self.req.spi_in)
            sa.fail(now, f"peer identified itself as {peer}, this tunnel expects {cfg.remote_id}",
                    auth=True)
            return
        if auth.method != AuthMethod.SHARED_KEY_MIC:
            sa.engine.release_child_spi(self.req.spi_in)
            sa.fail(now, f"peer authenticates with method {_aname(auth.method)}; this tunnel uses a "
                         "pre-shared key", auth=True)
            return
        if not _auth_ok(sa, cfg.psk, of_initiator=False, id_body=idr.body(), received=auth.data):
            sa.engine.release_child_spi(self.req.spi_in)
            sa.fail(now, f"AUTH payload of peer {peer} does not verify with the configured "
                         "pre-shared key", auth=True)
            return
        sa.remote_id_text = str(peer)
        sa.establish(now)
        try:
            child = child_create.complete_initiator(sa, msg, self.req, sa.nonce_i, sa.nonce_r, now)
        except ChildError as e:
            sa.engine.release_child_spi(self.req.spi_in)
            sa.engine.emit(ev.ChildSaFailed(sa.tunnel, f"first Child SA not created: {e.reason}"))
            sa.engine.child_failed(sa, now, temporary=False)
            return
        sa.install_child(child, outbound=True)
        sa.engine.child_created(sa, child, now)


def start(sa: IkeSa, now: float) -> None:
    sa.queue_exchange(IkeAuth(), now, front=True)


def respond(sa: IkeSa, msg: Message, src: Endpoint, dst: Endpoint, now: float) -> list[Payload] | None:
    if sa.initiator or sa.state != IkeState.CONNECTING or msg.message_id != 1 or sa.keys is None:
        return [Notify(NotifyType.INVALID_SYNTAX)]
    idi, auth = msg.get(IDi), msg.get(AUTH)
    if idi is None or auth is None:
        sa.after_response(lambda t: sa.fail(t, "IKE_AUTH request lacks IDi or AUTH"))
        return [Notify(NotifyType.INVALID_SYNTAX)]
    peer = Identity(idi.id_type, idi.data)
    idr_p = msg.get(IDr)
    wanted = Identity(idr_p.id_type, idr_p.data) if idr_p is not None else None
    cfg = sa.engine.select_config(sa, peer, wanted)
    if cfg is None:
        reason = (f"no tunnel accepts peer identity {peer} from {src[0]}"
                  + (f" asking for {wanted}" if wanted is not None else ""))
        sa.after_response(lambda t: sa.fail(t, reason, auth=True))
        return [Notify(NotifyType.AUTHENTICATION_FAILED)]
    old_name = sa.tunnel
    sa.config = cfg
    sa.engine.retag(sa, old_name)
    if auth.method != AuthMethod.SHARED_KEY_MIC:
        reason = f"peer {peer} authenticates with method {_aname(auth.method)}; tunnel {cfg.name} uses a pre-shared key"
        sa.after_response(lambda t: sa.fail(t, reason, auth=True))
        return [Notify(NotifyType.AUTHENTICATION_FAILED)]
    if not _auth_ok(sa, cfg.psk, of_initiator=True, id_body=idi.body(), received=auth.data):
        reason = f"AUTH payload of peer {peer} does not verify with the pre-shared key of tunnel {cfg.name}"
        sa.after_response(lambda t: sa.fail(t, reason, auth=True))
        return [Notify(NotifyType.AUTHENTICATION_FAILED)]
    sa.remote_id_text = str(peer)
    if msg.notify(NotifyType.INITIAL_CONTACT) is not None:
        sa.engine.initial_contact(sa, now)
    idr = IDr(cfg.local_id.id_type, cfg.local_id.data)
    reply: list[Payload] = [idr, AUTH(AuthMethod.SHARED_KEY_MIC,
                                      _auth_value(sa, cfg.psk, as_initiator=False, id_body=idr.body()))]
    sa.establish(now)
    try:
        child_payloads, child = child_create.negotiate_responder(sa, msg, now, in_auth=True)
    except ChildError as e:
        log.info("%s: first Child SA refused: %s", sa, e.reason)
        sa.engine.emit(ev.ChildSaFailed(sa.tunnel, f"refused the peer's first Child SA: {e.reason}"))
        return reply + [Notify(e.notify, data=e.data)]
    sa.install_child(child, outbound=True)
    sa.engine.child_created(sa, child, now)
    return reply + child_payloads


def _aname(m: int) -> str:
    try:
        return AuthMethod(m).name
    except ValueError:
        return str(m)
