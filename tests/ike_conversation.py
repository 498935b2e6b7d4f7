"""A recorded IKEv2 conversation replayed through our crypto (appliance.ike.crypto).

Given a :class:`tests.vectors.StrongswanVector`, :class:`Conversation` derives the keys of every
IKE SA in it (the first from IKE_SA_INIT, then each IKE SA rekey found in the decrypted
CREATE_CHILD_SA exchanges, RFC 7296 §2.18) from the shared secrets strongSwan logged and the
nonces and SPIs on the wire, decrypts every SK payload, and lists every Child SA creating
exchange with its nonces, KE payloads and SPIs. Engine/codec tests can use ``plain`` (the
decrypted inner payloads of each message) and ``padded`` (with padding, for byte-exact
re-encryption).

Only the generic-header walker of tests/vectors.py is used to find payloads, not our codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.ike import crypto
from appliance.ike.constants import ExchangeType, NotifyType, PayloadType, ProtocolId
from appliance.ike.crypto import IkeKeys, IkeSuite, SkCipher
from appliance.ike.proposals import Proposal, parse_proposal
from tests.vectors import (
    IkeDatagram,
    LogDump,
    Payload,
    StrongswanVector,
    dumps,
    iter_sa_proposals,
    message_payloads,
    sk_payload,
    walk_payloads,
)


def body_of(payloads: list[Payload], ptype: int) -> bytes:
    found = [p.body for p in payloads if p.type == ptype]
    if len(found) != 1:
        raise AssertionError(f"expected one payload {ptype}, found {len(found)}")
    return found[0]


def maybe_body(payloads: list[Payload], ptype: int) -> bytes | None:
    found = [p.body for p in payloads if p.type == ptype]
    return found[0] if found else None


def notify_data(payloads: list[Payload], ntype: int) -> list[bytes]:
    out = []
    for p in payloads:
        if p.type == PayloadType.NOTIFY and int.from_bytes(p.body[2:4], "big") == ntype:
            out.append(p.body[4 + p.body[1]:])
    return out


@dataclass(repr=False)
class IkeSaState:
    """One IKE SA of the conversation, as we derived it."""

    spi_i: bytes
    spi_r: bytes
    skeyseed: bytes
    keys: IkeKeys
    ciphers: tuple[SkCipher, SkCipher]
    Ni: bytes
    Nr: bytes
    g_ir: bytes


@dataclass(repr=False)
class ChildExchange:
    """An exchange that created a Child SA (IKE_AUTH or CREATE_CHILD_SA), with what KEYMAT
    needs: the IKE SA it ran on, nonces, KE data (PFS) and the two ESP SPIs."""

    request: int  # index into Conversation.msgs
    response: int
    ike_sa: IkeSaState
    Ni: bytes
    Nr: bytes
    ke_i: bytes | None
    ke_r: bytes | None
    spi_i: bytes  # in the request's SA payload (the exchange initiator's inbound SPI)
    spi_r: bytes
    rekey: bool


@dataclass(repr=False)
class Conversation:
    vector: StrongswanVector
    msgs: list[IkeDatagram] = field(init=False)
    logs: dict[str, list[LogDump]] = field(init=False)
    suite: IkeSuite = field(init=False)
    esp: Proposal = field(init=False)
    ike_sas: list[IkeSaState] = field(init=False, default_factory=list)
    plain: dict[int, bytes] = field(init=False, default_factory=dict)
    padded: dict[int, bytes] = field(init=False, default_factory=dict)
    inner: dict[int, list[Payload]] = field(init=False, default_factory=dict)
    children: list[ChildExchange] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        v = self.vector
        self.msgs = v.datagrams()
        self.logs = {role: v.log(role) for role in v.logs}
        self.suite = IkeSuite.from_proposal(parse_proposal(v.ike_proposal, "ike"))
        self.esp = parse_proposal(v.esp_proposal, "esp")
        g_all = dumps(self.logs["initiator"], "shared Diffie Hellman secret")
        init_req, init_resp = self.msgs[0], self.msgs[1]
        if init_req.header.exchange != ExchangeType.IKE_SA_INIT:
            raise AssertionError("the capture does not start with IKE_SA_INIT")
        Ni = body_of(message_payloads(init_req.message), PayloadType.NONCE)
        Nr = body_of(message_payloads(init_resp.message), PayloadType.NONCE)
        h = init_resp.header
        seed, keys = crypto.derive_ike_keys(self.suite, g_all[0], Ni, Nr, h.spi_i, h.spi_r)
        self.ike_sas.append(IkeSaState(h.spi_i, h.spi_r, seed, keys,
                                       crypto.sk_ciphers(self.suite, keys), Ni, Nr, g_all[0]))
        # Decrypt what we can, find IKE rekeys (new keys), repeat until nothing new.
        done_rekeys: set[int] = set()
        while True:
            self._decrypt_all()
            new = [i for i in self._ike_rekeys() if i not in done_rekeys]
            if not new:
                break
            for i in new:
                done_rekeys.add(i)
                self._add_rekeyed_sa(i, g_all[len(self.ike_sas)])
        self._find_children()

    # ------------------------------------------------------------------------------------
    def sa_of(self, d: IkeDatagram) -> IkeSaState | None:
        for sa in self.ike_sas:
            if (sa.spi_i, sa.spi_r) == (d.header.spi_i, d.header.spi_r):
                return sa
        return None

    def cipher_of(self, d: IkeDatagram) -> SkCipher:
        sa = self.sa_of(d)
        assert sa is not None
        return sa.ciphers[0] if d.header.from_initiator else sa.ciphers[1]

    def response_to(self, i: int) -> int:
        req = self.msgs[i].header
        for j in range(i + 1, len(self.msgs)):
            h = self.msgs[j].header
            if (h.is_response and h.message_id == req.message_id and h.exchange == req.exchange
                    and (h.spi_i, h.spi_r) == (req.spi_i, req.spi_r)):
                return j
        raise AssertionError(f"no response to message {i}")

    def _decrypt_all(self) -> None:
        for i, d in enumerate(self.msgs):
            sk = sk_payload(d.message)
            if sk is None or i in self.plain or self.sa_of(d) is None:
                continue
            padded = self.cipher_of(d).decrypt(sk.body, sk.aad)
            self.padded[i] = padded
            self.plain[i] = crypto.unpad_plaintext(padded)
            self.inner[i] = walk_payloads(sk.first_inner, self.plain[i])

    def _ike_rekeys(self) -> list[int]:
        out = []
        for i, d in enumerate(self.msgs):
            if (d.header.exchange == ExchangeType.CREATE_CHILD_SA and not d.header.is_response
                    and i in self.inner):
                sa = maybe_body(self.inner[i], PayloadType.SA)
                if sa is not None and next(iter_sa_proposals(sa))[1] == ProtocolId.IKE:
                    out.append(i)
        return out

    def _add_rekeyed_sa(self, i: int, g_new: bytes) -> None:
        j = self.response_to(i)
        req, resp = self.inner[i], self.inner[j]
        old = self.sa_of(self.msgs[i])
        assert old is not None
        spi_i = next(iter_sa_proposals(body_of(req, PayloadType.SA)))[2]
        spi_r = next(iter_sa_proposals(body_of(resp, PayloadType.SA)))[2]
        Ni, Nr = body_of(req, PayloadType.NONCE), body_of(resp, PayloadType.NONCE)
        seed, keys = crypto.derive_rekeyed_ike_keys(self.suite, old.keys.SK_d, g_new, Ni, Nr,
                                                    spi_i, spi_r)
        self.ike_sas.append(IkeSaState(spi_i, spi_r, seed, keys,
                                       crypto.sk_ciphers(self.suite, keys), Ni, Nr, g_new))

    def _find_children(self) -> None:
        for i, d in enumerate(self.msgs):
            h = d.header
            if h.is_response or i not in self.inner:
                continue
            if h.exchange not in (ExchangeType.IKE_AUTH, ExchangeType.CREATE_CHILD_SA):
                continue
            sa_body = maybe_body(self.inner[i], PayloadType.SA)
            if sa_body is None or next(iter_sa_proposals(sa_body))[1] != ProtocolId.ESP:
                continue
            j = self.response_to(i)
            if maybe_body(self.inner[j], PayloadType.SA) is None:
                continue  # refused
            ike_sa = self.sa_of(d)
            assert ike_sa is not None
            if h.exchange == ExchangeType.IKE_AUTH:
                Ni, Nr, ke_i, ke_r = ike_sa.Ni, ike_sa.Nr, None, None
            else:
                Ni, Nr = body_of(self.inner[i], PayloadType.NONCE), body_of(self.inner[j],
                                                                             PayloadType.NONCE)
                ke_i = maybe_body(self.inner[i], PayloadType.KE)
                ke_r = maybe_body(self.inner[j], PayloadType.KE)
            self.children.append(ChildExchange(
                i, j, ike_sa, Ni, Nr, ke_i, ke_r,
                next(iter_sa_proposals(sa_body))[2],
                next(iter_sa_proposals(body_of(self.inner[j], PayloadType.SA)))[2],
                bool(notify_data(self.inner[i], NotifyType.REKEY_SA))))
