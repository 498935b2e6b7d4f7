"""IKE_AUTH with pre-shared keys or certificates (RFC 7296 §1.2, §2.15) and the first Child SA.

PSK: AUTH = prf(prf(PSK, "Key Pad for IKEv2"), <SignedOctets>) where the initiator signs
RealMessage1 | Nr | prf(SK_pi, IDi') and the responder RealMessage2 | Ni | prf(SK_pr, IDr').
Certificates: the same SignedOctets signed (signature_auth, RFC 7427), with CERT / CERTREQ and
the peer's chain, revocation and ID checked (certificates).
Identities: ID_IPV4_ADDR, ID_IPV6_ADDR, ID_FQDN, ID_RFC822_ADDR, ID_DER_ASN1_DN (policy.Identity).
"""

from __future__ import annotations

import datetime as dt
import logging

from appliance.ike import child_create, fragmentation, intermediate, mobike, signature_auth
from appliance.ike import events as ev
from appliance.ike.child_create import ChildError, ChildRequest
from appliance.ike.constants import AuthMethod, ExchangeType, NotifyType, ProtocolId
from appliance.ike.crypto import psk_auth, psk_auth_matches, signed_octets
from appliance.ike.certificates import CertError
from appliance.ike.message import AUTH, CERT, CERTREQ, Delete, IDi, IDr, Message, Notify, Payload
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
    octets += intermediate.int_auth(sa)     # RFC 9242 §3.3.2 (empty without IKE_INTERMEDIATE)
    return psk_auth(sa.prf_id, psk, octets)


def _auth_ok(sa: IkeSa, psk: bytes, *, of_initiator: bool, id_body: bytes, received: bytes) -> bool:
    keys = sa.keys
    if keys is None:
        return False
    if of_initiator:
        octets = signed_octets(sa.prf_id, sa.init_request, sa.nonce_r, keys.SK_pi, id_body)
    else:
        octets = signed_octets(sa.prf_id, sa.init_response, sa.nonce_i, keys.SK_pr, id_body)
    octets += intermediate.int_auth(sa)     # RFC 9242 §3.3.2 (empty without IKE_INTERMEDIATE)
    return psk_auth_matches(sa.prf_id, psk, octets, received)


def _octets(sa: IkeSa, *, of_initiator: bool, id_body: bytes) -> bytes:
    keys = sa.keys
    if keys is None:   # IKE_AUTH runs on an SA with keys
        raise ValueError("IKE SA without keys has no signed octets")
    if of_initiator:
        octets = signed_octets(sa.prf_id, sa.init_request, sa.nonce_r, keys.SK_pi, id_body)
    else:
        octets = signed_octets(sa.prf_id, sa.init_response, sa.nonce_i, keys.SK_pr, id_body)
    return octets + intermediate.int_auth(sa)     # RFC 9242 §3.3.2


def _own_auth(sa: IkeSa, cfg, *, as_initiator: bool, id_body: bytes) -> list[Payload]:
    """CERT payloads and AUTH for our side; raises signature_auth.SignatureError."""
    if cfg.cert is None:
        return [AUTH(AuthMethod.SHARED_KEY_MIC, _auth_value(sa, cfg.psk, as_initiator=as_initiator,
                                                            id_body=id_body))]
    octets = _octets(sa, of_initiator=as_initiator, id_body=id_body)
    method, data = signature_auth.sign(cfg.cert.private_key, sa.peer_hash_algorithms, octets)
    return [*cfg.cert.cert_payloads(sa.peer_certreq), AUTH(method, data)]


MAX_CERTREQ_CAS = 64     # CA key hashes kept from the peer's CERTREQ payloads


def note_certreq(sa: IkeSa, msg: Message) -> None:
    """Remember the CAs the peer asked for (CERTREQ, §3.7: SHA-1 key hashes)."""
    reqs = [r for r in msg.get_all(CERTREQ) if r.encoding == 4]
    if reqs:
        ids = set(sa.peer_certreq or ())
        for r in reqs:
            for i in range(0, len(r.data) - 19, 20):
                if len(ids) < MAX_CERTREQ_CAS:
                    ids.add(r.data[i:i + 20])
        sa.peer_certreq = frozenset(ids)


def _check_peer(sa: IkeSa, cfg, msg: Message, peer: Identity, auth: AUTH, *, of_initiator: bool,
                id_body: bytes, now: float) -> str | None:
    """None when the peer's AUTH (and, with certificates, its chain and ID) is good, else the
    reason it is not."""
    if cfg.cert is None:
        if auth.method != AuthMethod.SHARED_KEY_MIC:
            return f"peer {peer} authenticates with method {_aname(auth.method)}; tunnel {cfg.name} uses a pre-shared key"
        if not _auth_ok(sa, cfg.psk, of_initiator=of_initiator, id_body=id_body, received=auth.data):
            return f"AUTH payload of peer {peer} does not verify with the pre-shared key of tunnel {cfg.name}"
        return None
    if auth.method == AuthMethod.SHARED_KEY_MIC:
        return f"peer {peer} authenticates with a pre-shared key; tunnel {cfg.name} uses certificates"
    when = dt.datetime.fromtimestamp(sa.engine.now_wall(now), dt.timezone.utc)
    try:
        ee, chain = cfg.cert.validate_peer(msg.get_all(CERT), peer, when, sa.engine.fetched_crls())
    except CertError as e:
        return f"certificate of peer {peer} refused ({e.code}): {e.reason}"
    try:
        scheme = signature_auth.verify(ee.public_key(), auth.method, auth.data,
                                       _octets(sa, of_initiator=of_initiator, id_body=id_body))
    except signature_auth.SignatureError as e:
        return f"AUTH of peer {peer} refused: {e.reason}"
    # only a peer that proved its key gets its chain kept and its CRL URLs fetched
    sa.peer_cert_chain = tuple(chain)
    sa.engine.want_crls(chain)
    sa.peer_cert_not_after = ee.not_valid_after_utc.timestamp()
    sa.peer_cert_subject = ee.subject.rfc4514_string()
    log.info("%s: peer %s authenticated with %s (%s), certificate \"%s\"", sa, str(peer),
             _aname(auth.method), str(scheme), sa.peer_cert_subject)
    return None


class IkeAuth(Exchange):
    exchange_type = ExchangeType.IKE_AUTH
    name = "IKE_AUTH"

    def __init__(self) -> None:
        self.req: ChildRequest | None = None
        self.size = 0          # octets of the request's first datagram

    def sent(self, sa: IkeSa, datagram: bytes) -> None:
        self.size = len(datagram)

    def on_give_up(self, sa: IkeSa, now: float) -> None:
        sa.peer_unreachable(now, f"no response to {self.name} after retransmissions"
                            + fragmentation.unanswered_hint(sa, self.size))

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
        try:
            own = _own_auth(sa, cfg, as_initiator=True, id_body=idi.body())
        except signature_auth.SignatureError as e:
            reason = f"cannot authenticate to the peer: {e.reason}"
            sa.fail(now, reason, auth=True)
            return None
        payloads += own[:-1]
        if cfg.cert is not None:
            payloads.append(cfg.cert.certreq())
        payloads.append(own[-1])
        self.req = child_create.new_request(sa, in_auth=True)
        payloads += self.req.payloads(in_auth=True)
        payloads += mobike.auth_payloads(sa, request=True)   # RFC 4555 §3.2
        return payloads

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        cfg = sa.config
        if cfg is None or self.req is None:   # never built: nothing of ours to complete
            sa.fail(now, "IKE_AUTH response to a request we did not build")
            return
        if msg.notify(NotifyType.AUTHENTICATION_FAILED) is not None:
            sa.engine.release_child_spi(self.req.spi_in)
            sa.fail(now, f"peer refused our authentication as {cfg.local_id} "
                         "(AUTHENTICATION_FAILED): check the "
                         + ("pre-shared key" if cfg.cert is None else "certificates, CAs and CRLs")
                         + " and the local and remote identities on both sides", auth=True)
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
        if cfg.cert is None and auth.method != AuthMethod.SHARED_KEY_MIC:
            sa.engine.release_child_spi(self.req.spi_in)
            sa.fail(now, f"peer authenticates with method {_aname(auth.method)}; this tunnel uses a "
                         "pre-shared key", auth=True)
            return
        if cfg.cert is None and not _auth_ok(sa, cfg.psk, of_initiator=False, id_body=idr.body(),
                                             received=auth.data):
            sa.engine.release_child_spi(self.req.spi_in)
            sa.fail(now, f"AUTH payload of peer {peer} does not verify with the configured "
                         "pre-shared key", auth=True)
            return
        if cfg.cert is not None:
            why = _check_peer(sa, cfg, msg, peer, auth, of_initiator=False, id_body=idr.body(), now=now)
            if why is not None:
                sa.engine.release_child_spi(self.req.spi_in)
                _tell_responder(sa)
                sa.fail(now, why, auth=True)
                return
        sa.remote_id_text = str(peer)
        mobike.note_peer(sa, msg)
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


def _tell_responder(sa: IkeSa) -> None:
    """§2.21.2: the responder considers the IKE SA up once it answered IKE_AUTH; when we refuse
    its authentication we tell it (AUTHENTICATION_FAILED) and delete the IKE SA in one
    INFORMATIONAL request, sent once (we keep no state to retransmit it: the SA is gone)."""
    msg = Message(sa.spi_i, sa.spi_r, ExchangeType.INFORMATIONAL, sa.my_mid, False, sa.initiator,
                  [Notify(NotifyType.AUTHENTICATION_FAILED), Delete(ProtocolId.IKE, [])], encrypted=True)
    sa._send(sa._encode(msg))


def start(sa: IkeSa, now: float) -> None:
    sa.queue_exchange(IkeAuth(), now, front=True)


def respond(sa: IkeSa, msg: Message, src: Endpoint, dst: Endpoint, now: float) -> list[Payload] | None:
    if (sa.initiator or sa.state != IkeState.CONNECTING or sa.keys is None
            or msg.message_id != intermediate.auth_message_id(sa)):
        return [Notify(NotifyType.INVALID_SYNTAX)]
    if sa.addke_todo:   # RFC 9370 §2.2.2: every negotiated additional key exchange comes first
        reason = (f"peer started IKE_AUTH before the additional key exchanges "
                  + ", ".join(map(intermediate.additional_ke.method_name, sa.addke_todo))
                  + " its proposal selected (refused, RFC 9370)")
        sa.after_response(lambda t: sa.fail(t, reason))
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
    note_certreq(sa, msg)
    why = _check_peer(sa, cfg, msg, peer, auth, of_initiator=True, id_body=idi.body(), now=now)
    if why is not None:
        log.info("%s: %s", sa, why)
        sa.after_response(lambda t: sa.fail(t, why, auth=True))
        return [Notify(NotifyType.AUTHENTICATION_FAILED)]
    sa.remote_id_text = str(peer)
    if msg.notify(NotifyType.INITIAL_CONTACT) is not None:
        sa.engine.initial_contact(sa, now)
    idr = IDr(cfg.local_id.id_type, cfg.local_id.data)
    try:
        reply: list[Payload] = [idr, *_own_auth(sa, cfg, as_initiator=False, id_body=idr.body())]
    except signature_auth.SignatureError as e:
        reason = f"cannot authenticate to peer {peer}: {e.reason}"
        sa.after_response(lambda t: sa.fail(t, reason, auth=True))
        return [Notify(NotifyType.AUTHENTICATION_FAILED)]
    mobike.note_peer(sa, msg)
    reply += mobike.auth_payloads(sa, request=False)   # RFC 4555 §3.2
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
