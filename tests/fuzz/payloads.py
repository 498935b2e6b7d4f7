"""Hostile but well-formed payloads (and chains of them) for forged plaintexts: what an
authenticated-but-hostile peer, or an attacker holding an unauthenticated SA's keys, can send."""

from __future__ import annotations

import random
import struct

from appliance.ike import message as M
from appliance.ike.constants import DhId, EncrId, IntegId, NotifyType, PrfId, ProtocolId, TransformType
from appliance.ike.proposals import Proposal, Transform
from tests.fuzz.wire import Raw

T = TransformType
GROUPS = (DhId.CURVE25519, DhId.CURVE448, DhId.ECP_256, DhId.ECP_384, DhId.ECP_521,
          DhId.MODP_2048, 0, 1, 5, 24, 99, 0xFFFF, DhId.ML_KEM_768, DhId.ML_KEM_1024)
NOTIFIES = tuple(int(n) for n in NotifyType) + (8, 12, 16, 100, 8191, 16383, 40959, 40960, 65535)


def _ke_len(group: int, rng: random.Random) -> int:
    return {DhId.CURVE25519: 32, DhId.CURVE448: 56, DhId.ECP_256: 64, DhId.ECP_384: 96,
            DhId.ECP_521: 132, DhId.MODP_2048: 256,
            # ML-KEM (RFC 9370 additional key exchanges): encapsulation key / ciphertext
            DhId.ML_KEM_768: rng.choice((1184, 1088)), DhId.ML_KEM_1024: 1568}.get(group, 32)


def transform(rng: random.Random, protocol: int) -> Transform:
    r = rng.random()
    if r < 0.3:
        return Transform.plain(T.ENCR, rng.choice((EncrId.AES_GCM_16, EncrId.AES_CBC, EncrId.CHACHA20_POLY1305, 3, 99)),
                               rng.choice((128, 256, None, 192, 0, 1)))
    if r < 0.45:
        return Transform.plain(T.PRF, rng.choice((PrfId.HMAC_SHA2_256, PrfId.HMAC_SHA2_384, PrfId.HMAC_SHA2_512, 1, 99)))
    if r < 0.6:
        return Transform.plain(T.INTEG, rng.choice((IntegId.HMAC_SHA2_256_128, IntegId.NONE, 2, 99)))
    if r < 0.8:
        return Transform.plain(T.DH, rng.choice(GROUPS))
    if r < 0.9:
        return Transform.plain(T.ESN, rng.choice((0, 1, 2)))
    return Transform(rng.choice((1, 2, 3, 4, 5, 6, 0, 200)), rng.randrange(1, 40), None,
                     ((rng.choice((1, 0x800E, 0x8001, 0x7FFF)), rng.randbytes(2)),) if rng.random() < 0.5 else ())


def proposals(rng: random.Random, ctx: "Ctx") -> list[Proposal]:
    out = []
    for n in range(rng.choice((1, 1, 1, 2, 3))):
        proto = rng.choice((ProtocolId.ESP, ProtocolId.ESP, ProtocolId.IKE, ProtocolId.AH))
        if rng.random() < 0.5 and ctx.good_proposals.get(proto):
            base = rng.choice(ctx.good_proposals[proto])
            ts = list(base.transforms)
            if rng.random() < 0.3 and ts:
                ts[rng.randrange(len(ts))] = transform(rng, proto)
            if rng.random() < 0.2:
                ts.append(transform(rng, proto))
        else:
            ts = [transform(rng, proto) for _ in range(rng.choice((0, 1, 2, 3, 4, 6)))]
        spi_len = {ProtocolId.IKE: rng.choice((8, 8, 0)), ProtocolId.ESP: 4, ProtocolId.AH: 4}[proto]
        out.append(Proposal(proto, tuple(ts), n + 1, rng.randbytes(spi_len)))
    return out


class Ctx:
    """What the generator may borrow from the receiving SA to look plausible."""

    def __init__(self, child_spis: list[bytes], good_proposals: dict[int, list[Proposal]],
                 ids: list[bytes]) -> None:
        self.child_spis = child_spis          # SPIs of live Child SAs (either direction)
        self.good_proposals = good_proposals  # protocol -> acceptable proposals
        self.ids = ids


def spi(rng: random.Random, ctx: Ctx) -> bytes:
    if ctx.child_spis and rng.random() < 0.7:
        return rng.choice(ctx.child_spis)
    return rng.randbytes(4)


def ts(rng: random.Random) -> bytes:
    if rng.random() < 0.6:
        sels = [M.TrafficSelector.any(4), M.TrafficSelector.any(6)][:rng.choice((1, 2))]
    else:
        sels = []
        for _ in range(rng.choice((1, 2, 3))):
            if rng.random() < 0.5:
                a, b = rng.randbytes(4), rng.randbytes(4)
                sels.append(M.TrafficSelector(7, a, b, rng.choice((0, 6, 17, 255)), rng.getrandbits(16), rng.getrandbits(16)))
            else:
                a, b = rng.randbytes(16), rng.randbytes(16)
                sels.append(M.TrafficSelector(8, a, b, 0, 0, 65535))
    return M.TSi(sels).body()


def payload(rng: random.Random, ctx: Ctx, kind: str | None = None) -> Raw:
    kind = kind or rng.choice(("SA", "KE", "N", "N", "N", "D", "D", "Nonce", "TSi", "TSr", "IDi",
                               "IDr", "AUTH", "CERT", "CERTREQ", "V", "CP", "EAP", "unknown"))
    if kind == "SA":
        return Raw(33, 0, M.SA(proposals(rng, ctx)).body() if rng.random() < 0.95 else b"")
    if kind == "KE":
        g = rng.choice(GROUPS)
        n = _ke_len(g, rng) if rng.random() < 0.7 else rng.choice((0, 1, 31, 33, 64, 300, 1183, 1185, 1087))
        data = rng.randbytes(n) if rng.random() < 0.8 else bytes(n)
        return Raw(34, 0, struct.pack("!HH", g, 0) + data)
    if kind == "Nonce":
        return Raw(40, 0, rng.randbytes(rng.choice((16, 32, 64, 15, 0, 256, 257, 8))))
    if kind == "N":
        nt = rng.choice(NOTIFIES)
        proto = rng.choice((0, 0, ProtocolId.ESP, ProtocolId.IKE, 7))
        s = spi(rng, ctx) if proto == ProtocolId.ESP else (rng.randbytes(8) if proto == ProtocolId.IKE and rng.random() < 0.5 else b"")
        if nt == NotifyType.INVALID_KE_PAYLOAD:
            data = struct.pack("!H", rng.choice(GROUPS))
        elif nt in (NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.NAT_DETECTION_DESTINATION_IP):
            data = rng.randbytes(rng.choice((20, 20, 0, 32)))
        elif nt == NotifyType.COOKIE:
            data = rng.randbytes(rng.choice((1, 8, 64, 65, 0, 300)))
        elif nt == NotifyType.REKEY_SA:
            proto, s, data = ProtocolId.ESP, spi(rng, ctx), b""
        else:
            data = rng.randbytes(rng.choice((0, 0, 2, 4, 16)))
        return Raw(41, 0, struct.pack("!BBH", proto, len(s), nt) + s + data)
    if kind == "D":
        if rng.random() < 0.25:
            return Raw(42, 0, struct.pack("!BBH", ProtocolId.IKE, 0, 0))
        spis = [spi(rng, ctx) for _ in range(rng.choice((1, 1, 2, 0, 5)))]
        proto = rng.choice((ProtocolId.ESP, ProtocolId.ESP, ProtocolId.AH, ProtocolId.IKE, 9))
        return Raw(42, 0, struct.pack("!BBH", proto, 4, len(spis)) + b"".join(spis))
    if kind in ("TSi", "TSr"):
        return Raw(44 if kind == "TSi" else 45, 0, ts(rng))
    if kind in ("IDi", "IDr"):
        data = rng.choice(ctx.ids) if ctx.ids and rng.random() < 0.6 else rng.randbytes(rng.choice((1, 8, 64)))
        if rng.random() < 0.4:
            data = b"evil\n2026-12-02 [INFO] forged line \x1b[31m" + data
        return Raw(35 if kind == "IDi" else 36, 0, struct.pack("!B3x", rng.choice((2, 1, 3, 5, 9, 11, 0, 255))) + data)
    if kind == "AUTH":
        return Raw(39, 0, struct.pack("!B3x", rng.choice((2, 1, 14, 0, 255))) + rng.randbytes(rng.choice((32, 48, 64, 1))))
    if kind in ("CERT", "CERTREQ"):
        return Raw(37 if kind == "CERT" else 38, 0, bytes([rng.choice((4, 1, 12, 0))]) + rng.randbytes(rng.choice((0, 20, 100))))
    if kind == "V":
        return Raw(43, 0, rng.randbytes(rng.choice((16, 1, 40))))
    if kind == "CP":
        return Raw(47, rng.choice((0, 0x80)), bytes([rng.choice((1, 2, 3, 4))]) + bytes(3) + rng.randbytes(rng.choice((0, 4, 8))))
    if kind == "EAP":
        return Raw(48, rng.choice((0, 0x80)), rng.randbytes(rng.choice((4, 5, 20))))
    return Raw(rng.choice((1, 32, 49, 50, 51, 52, 54, 55, 100, 200, 255)), rng.choice((0, 0x80)),
               rng.randbytes(rng.choice((0, 4, 16))))


#: plausible shapes per (exchange type, response)
TEMPLATES = {
    (34, False): [["SA", "KE", "Nonce", "N", "N"], ["N", "SA", "KE", "Nonce"], ["SA", "KE", "Nonce"]],
    (34, True): [["SA", "KE", "Nonce", "N", "N"], ["N"], ["N", "N"], ["SA", "KE", "Nonce"]],
    (35, False): [["IDi", "AUTH", "SA", "TSi", "TSr"], ["IDi", "IDr", "AUTH", "N", "SA", "TSi", "TSr"],
                  ["IDi", "AUTH"], ["IDi", "CERT", "CERTREQ", "AUTH", "CP", "SA", "TSi", "TSr", "N"]],
    (35, True): [["IDr", "AUTH", "SA", "TSi", "TSr"], ["N"], ["IDr", "AUTH", "N"], ["IDr", "AUTH"]],
    (36, False): [["SA", "Nonce", "TSi", "TSr"], ["N", "SA", "Nonce", "KE", "TSi", "TSr"],
                  ["SA", "Nonce", "KE"], ["N", "SA", "Nonce"]],
    (36, True): [["SA", "Nonce", "TSi", "TSr"], ["N"], ["SA", "Nonce", "KE"], ["SA", "Nonce", "KE", "TSi", "TSr", "N"]],
    (37, False): [[], ["D"], ["D", "D"], ["N"], ["N", "D"], ["CP"]],
    (37, True): [[], ["D"], ["N"], ["D", "N"]],
    # IKE_INTERMEDIATE (RFC 9242) with RFC 9370's additional key exchange
    (43, False): [["KE"], ["KE"], [], ["N"], ["KE", "N"], ["KE", "KE"]],
    (43, True): [["KE"], ["KE"], ["N"], [], ["KE", "N"]],
    # IKE_FOLLOWUP_KE (RFC 9370 §2.2.4): KE and N(ADDITIONAL_KEY_EXCHANGE) link
    (44, False): [["KE", "N"], ["N", "KE"], ["KE"], ["N"], []],
    (44, True): [["KE"], ["KE", "N"], ["N"], []],
}


def chain_for(rng: random.Random, ctx: Ctx, exchange: int, response: bool) -> tuple[list[Raw], str]:
    shapes = TEMPLATES.get((exchange, response))
    if shapes is None or rng.random() < 0.15:
        kinds = [None] * rng.choice((0, 1, 2, 3, 5))
        desc = "random"
    else:
        kinds = list(rng.choice(shapes))
        desc = "+".join(kinds) or "empty"
    ps = [payload(rng, ctx, k) for k in kinds]
    # NOTIFY payloads of a template are given a meaningful type more often than not
    for p in ps:
        if p.type == 41 and rng.random() < 0.5:
            nt = rng.choice((NotifyType.REKEY_SA, NotifyType.INITIAL_CONTACT, NotifyType.USE_TRANSPORT_MODE,
                             NotifyType.INVALID_KE_PAYLOAD, NotifyType.NO_PROPOSAL_CHOSEN,
                             NotifyType.TEMPORARY_FAILURE, NotifyType.AUTHENTICATION_FAILED,
                             NotifyType.INVALID_SYNTAX, NotifyType.COOKIE, NotifyType.CHILD_SA_NOT_FOUND,
                             NotifyType.TS_UNACCEPTABLE, NotifyType.SINGLE_PAIR_REQUIRED,
                             NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.ESP_TFC_PADDING_NOT_SUPPORTED,
                             NotifyType.ADDITIONAL_KEY_EXCHANGE, NotifyType.STATE_NOT_FOUND))
            p.body = p.body[:2] + struct.pack("!H", nt) + p.body[4:]
    return ps, desc
