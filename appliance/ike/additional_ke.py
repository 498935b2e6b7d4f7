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

Not done: additional key exchanges in CREATE_CHILD_SA (IKE_FOLLOWUP_KE, §2.2.3, §2.2.4). An
IKE SA rekey offers and accepts the tunnel's proposals *without* their additional key exchange
transforms (a peer that requires one in a rekey gets NO_PROPOSAL_CHOSEN, and the rekey is
retried like any failed one); the rekeyed SA's SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)
still depends on the ML-KEM secret through SK_d. ESP proposals with ``keN_`` are refused in
configuration.
"""

from __future__ import annotations

from appliance.ike.constants import DhId
from appliance.ike.crypto import (
    InvalidKeyExchange,
    KeyExchange,
    MlKem,
    RandomSource,
    derive_additional_ike_keys,
    is_kem,
    mlkem_encapsulate,
)
from appliance.ike.proposals import Proposal, additional_kes
from appliance.ike.sa import IkeSa


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


__all__ = ["initiator_share", "method_name", "negotiated", "responder_share", "update_keys"]
