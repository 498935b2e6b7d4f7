"""Multiple key exchanges in IKEv2 (RFC 9370): hybrid post-quantum IKE SAs.

A proposal lists, besides the IKE_SA_INIT key exchange (Transform Type 4), up to seven
Additional Key Exchange transforms (types 6..12, ADDKE1..ADDKE7; ``ke1_mlkem768`` in the
configuration, strongSwan 6's spelling; ``keN_none`` makes one optional). The responder selects
one method of each type (proposals.select_proposal); every selected method other than NONE is
then run, in type order, in its own IKE_INTERMEDIATE exchange (RFC 9242, intermediate.py)
before IKE_AUTH: KEi(n) in the request, KEr(n) in the response (§2.2.2).

After the n-th one both sides update the IKE SA's keys (§2.2.2):

    SKEYSEED(n) = prf(SK_d(n-1), SK(n) | Ni | Nr)
    {SK_d(n) | SK_ai(n) | SK_ar(n) | SK_ei(n) | SK_er(n) | SK_pi(n) | SK_pr(n)}
        = prf+(SKEYSEED(n), Ni | Nr | SPIi | SPIr)

with the IKE_SA_INIT nonces and SPIs; SK(n) is the shared secret of the n-th exchange. The
request of exchange n is protected with the keys of n-1, its response too; exchange n+1 and
IKE_AUTH use the new ones.

ML-KEM (FIPS 203, draft-ietf-ipsecme-ikev2-mlkem): the initiator sends its encapsulation key
(1184 octets for ML-KEM-768, 1568 for ML-KEM-1024), the responder the ciphertext (1088 / 1568);
SK(n) is the 32-octet shared secret. Classic groups may be additional key exchanges too
(``ke1_ecp384``): KE payloads and g^ir as in IKE_SA_INIT.

IKE SA rekey (§2.2.4): the CREATE_CHILD_SA offers the tunnel's proposals (ike_rekey); when the
selected one has additional key exchanges, the response carries N(ADDITIONAL_KEY_EXCHANGE) with
a link (8 random octets of the responder's), and one IKE_FOLLOWUP_KE exchange per additional
key exchange follows on the old IKE SA: {KEi(n), N(ADDITIONAL_KEY_EXCHANGE)(link)} ->
{KEr(n)[, N(ADDITIONAL_KEY_EXCHANGE)(next link)]}. The new IKE SA exists (and a collision is
resolved, ike_rekey) only after the last one, with

    SKEYSEED = prf(SK_d (old), SK(0) | SK(1) | ... | SK(n) | Ni | Nr)

(SK(0) the CREATE_CHILD_SA's g^ir, its nonces). A link the responder does not hold is answered
STATE_NOT_FOUND, bad KE data INVALID_SYNTAX (the pending rekey is dropped); the initiator then
treats the rekey as failed and retries later, as for any refused rekey.

Not done: additional key exchanges for Child SAs (IKE_FOLLOWUP_KE after a Child SA's
CREATE_CHILD_SA, §2.2.3): ESP proposals with ``keN_`` are refused in configuration.
"""

from __future__ import annotations

import logging

from appliance.ike.constants import DhId, ExchangeType, NotifyType
from appliance.ike.crypto import (
    CryptoError,
    InvalidKeyExchange,
    KeyExchange,
    MlKem,
    RandomSource,
    derive_additional_ike_keys,
    derive_rekeyed_ike_keys,
    is_kem,
    mlkem_encapsulate,
)
from appliance.ike.message import KE, Message, Notify, Payload
from appliance.ike.proposals import Proposal, additional_kes
from appliance.ike.sa import Exchange, IkeSa

log = logging.getLogger("isthmus.ike")

LINK_LEN = 8            # our ADDITIONAL_KEY_EXCHANGE link data
MAX_LINK_LEN = 64       # the peer's, accepted


def method_name(method: int) -> str:
    try:
        return DhId(method).name
    except ValueError:
        return str(method)


def negotiated(proposal: Proposal) -> tuple[int, ...]:
    """Key exchange methods of the selected proposal's additional key exchanges, in order."""
    return tuple(m for _tt, m in additional_kes(proposal))


def initiator_share(method: int, random: RandomSource) -> KeyExchange | MlKem:
    """Our KEi(n): an ML-KEM key pair (encapsulation key sent) or a DH key pair."""
    if is_kem(method):
        return MlKem.generate(method, random)
    return KeyExchange.generate(method, random)


def responder_share(method: int, peer_data: bytes, random: RandomSource) -> tuple[bytes, bytes]:
    """(our KEr(n) data, SK(n)) for the initiator's KEi(n) data. Raises InvalidKeyExchange for
    data of the wrong length or refused by the method's checks."""
    if is_kem(method):
        return mlkem_encapsulate(method, peer_data)
    ke = KeyExchange.generate(method, random)
    return ke.public_bytes, ke.shared_secret(peer_data)


def update_keys(sa: IkeSa, shared: bytes) -> None:
    """§2.2.2: the IKE SA's keys after an additional key exchange with shared secret SK(n)."""
    if sa.keys is None or sa.proposal is None:   # callers run on a keyed SA
        raise InvalidKeyExchange("additional key exchange on an IKE SA without keys")
    _skeyseed, keys = derive_additional_ike_keys(sa.proposal, sa.keys.SK_d, shared, sa.nonce_i,
                                                 sa.nonce_r, sa.spi_i, sa.spi_r)
    sa.set_keys(sa.proposal, keys)


# --------------------------------------------------------------------------- IKE SA rekey (§2.2.4)
class Followup:
    """Responder: a peer's IKE SA rekey waiting for its IKE_FOLLOWUP_KE exchanges. repr shows
    no secret."""

    __slots__ = ("reply_prop", "spi_i", "ni", "nr", "secrets", "todo", "link")

    def __init__(self, reply_prop: Proposal, spi_i: bytes, ni: bytes, nr: bytes, g_ir: bytes,
                 link: bytes) -> None:
        self.reply_prop, self.spi_i, self.ni, self.nr = reply_prop, spi_i, ni, nr
        self.secrets = [g_ir]
        self.todo = negotiated(reply_prop)
        self.link = link

    def __repr__(self) -> str:
        return f"Followup({len(self.todo)} to do)"


def await_followup(sa: IkeSa, reply_prop: Proposal, spi_i: bytes, ni: bytes, nr: bytes,
                   g_ir: bytes) -> list[Payload]:
    """The peer's CREATE_CHILD_SA selected additional key exchanges: keep its state (one per IKE
    SA: a newer rekey request replaces it) and hand out the link."""
    link = sa.random(LINK_LEN)
    sa.followup = Followup(reply_prop, spi_i, ni, nr, g_ir, link)
    return [Notify(NotifyType.ADDITIONAL_KEY_EXCHANGE, data=link)]


def respond_followup(sa: IkeSa, msg: Message, now: float) -> list[Payload]:
    """An IKE_FOLLOWUP_KE request (established SAs only: IkeSa refuses it before IKE_AUTH)."""
    from appliance.ike import ike_rekey

    f = sa.followup
    n = msg.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
    if f is None or n is None or n.data != f.link or sa.closing or sa.keys is None:
        log.info("%s: IKE_FOLLOWUP_KE for no rekey of ours in progress", sa)
        return [Notify(NotifyType.STATE_NOT_FOUND)]
    method = f.todo[0]
    name = method_name(method)
    ke = msg.get(KE)
    if ke is None or ke.dh_group != method:
        sa.followup = None
        log.info("%s: IKE_FOLLOWUP_KE without the %s KE payload; rekey dropped", sa, name)
        return [Notify(NotifyType.INVALID_SYNTAX)]
    try:
        reply_data, shared = responder_share(method, ke.data, sa.random)
    except (InvalidKeyExchange, CryptoError) as e:
        sa.followup = None
        log.info("%s: IKE_FOLLOWUP_KE: invalid %s KE payload: %s; rekey dropped", sa, name, e)
        return [Notify(NotifyType.INVALID_SYNTAX)]
    f.secrets.append(shared)
    f.todo = f.todo[1:]
    reply: list[Payload] = [KE(method, reply_data)]
    if f.todo:
        f.link = sa.random(LINK_LEN)
        return reply + [Notify(NotifyType.ADDITIONAL_KEY_EXCHANGE, data=f.link)]
    sa.followup = None
    try:
        _s, keys = derive_rekeyed_ike_keys(f.reply_prop, sa.keys.SK_d, b"".join(f.secrets), f.ni,
                                           f.nr, f.spi_i, f.reply_prop.spi, old_prf=sa.prf_id)
    except CryptoError as e:
        log.info("%s: IKE SA rekey unusable: %s", sa, e)
        return [Notify(NotifyType.INVALID_SYNTAX)]
    ike_rekey.respond_done(sa, f.reply_prop, f.spi_i, keys, f.ni, f.nr, now)
    return reply


class IkeFollowupKe(Exchange):
    """Initiator: one additional key exchange of our IKE SA rekey, on the old IKE SA."""

    exchange_type = ExchangeType.IKE_FOLLOWUP_KE
    name = "IKE_FOLLOWUP_KE (IKE SA rekey)"
    ike_rekey_part = True

    def __init__(self, rekey, chosen: Proposal, nr: bytes, secrets: list[bytes],
                 todo: tuple[int, ...], link: bytes) -> None:
        self.rekey = rekey          # the ike_rekey.IkeRekey this belongs to
        self.chosen, self.nr, self.secrets, self.todo, self.link = chosen, nr, secrets, todo, link
        self.share: KeyExchange | MlKem | None = None

    def build(self, sa: IkeSa, now: float):
        if sa.closing:
            return None     # deleted or replaced meanwhile: the rekey is moot
        try:
            self.share = initiator_share(self.todo[0], sa.random)
        except CryptoError as e:
            log.info("%s: IKE SA rekey: cannot make a %s share: %s", sa, method_name(self.todo[0]), e)
            return None
        return [KE(self.todo[0], self.share.public_bytes),
                Notify(NotifyType.ADDITIONAL_KEY_EXCHANGE, data=self.link)]

    def on_response(self, sa: IkeSa, msg: Message, now: float) -> None:
        from appliance.ike import ike_rekey

        method = self.todo[0]
        err = msg.error_notify()
        ke = msg.get(KE)
        why: int | None = None
        shared = b""
        if err is not None:
            why = err.notify_type
        elif ke is None or ke.dh_group != method or self.share is None or sa.keys is None:
            why = NotifyType.INVALID_SYNTAX
        else:
            try:
                shared = self.share.shared_secret(ke.data)
            except InvalidKeyExchange as e:
                log.info("%s: IKE_FOLLOWUP_KE response: invalid %s KE payload: %s", sa,
                         method_name(method), e)
                why = NotifyType.INVALID_SYNTAX
        todo = self.todo[1:]
        link = msg.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
        if why is None and todo and (link is None or not 1 <= len(link.data) <= MAX_LINK_LEN):
            why = NotifyType.INVALID_SYNTAX
        if why is not None:
            self.rekey.failed_followup(sa, why, now)
            return
        secrets = self.secrets + [shared]
        if todo:
            sa.queue_exchange(IkeFollowupKe(self.rekey, self.chosen, self.nr, secrets, todo,
                                            link.data), now, front=True)
            return
        r = self.rekey
        try:
            _s, keys = derive_rekeyed_ike_keys(self.chosen, sa.keys.SK_d, b"".join(secrets), r.ni,
                                               self.nr, r.spi, self.chosen.spi, old_prf=sa.prf_id)
        except CryptoError as e:
            log.info("%s: IKE SA rekey unusable: %s", sa, e)
            r.failed_followup(sa, NotifyType.INVALID_SYNTAX, now)
            return
        new = ike_rekey.new_sa(sa, initiator=True, spi_i=r.spi, spi_r=self.chosen.spi,
                               proposal=self.chosen, keys=keys, ni=r.ni, nr=self.nr, now=now)
        r.finish(sa, new, now)


def start_followup(sa: IkeSa, rekey, chosen: Proposal, nr: bytes, g_ir: bytes, msg: Message,
                   now: float) -> None:
    """Our rekey's CREATE_CHILD_SA response selected additional key exchanges."""
    from appliance.ike import ike_rekey

    link = msg.notify(NotifyType.ADDITIONAL_KEY_EXCHANGE)
    if link is None or not 1 <= len(link.data) <= MAX_LINK_LEN:
        raise ike_rekey._RekeyFailed(NotifyType.INVALID_SYNTAX)
    sa.queue_exchange(IkeFollowupKe(rekey, chosen, nr, [g_ir], negotiated(chosen), link.data), now,
                      front=True)


__all__ = ["Followup", "IkeFollowupKe", "await_followup", "initiator_share", "method_name",
           "negotiated", "respond_followup", "responder_share", "start_followup", "update_keys"]
