"""Mutations of whole datagrams: bit flips, truncation, extension, header lies, payload-chain
surgery (Next Payload links, lengths, duplicated / removed / reordered / inserted payloads),
SK payload surgery. Each takes a random.Random and returns the new octets and a short
description (part of a failure's report)."""

from __future__ import annotations

import random
import struct

from tests.fuzz import wire
from tests.fuzz.wire import HDR, SK, Raw

INTERESTING8 = (0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 46, 53)
INTERESTING32 = (0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
PAYLOAD_TYPES = tuple(range(33, 55)) + (0, 1, 32, 55, 127, 128, 255)
EXCHANGES = (34, 35, 36, 37, 0, 1, 33, 38, 43, 44, 127, 255)


class Target:
    """What a header lie aims at: an IKE SA of the receiver (or nothing)."""

    def __init__(self, spi_i: bytes, spi_r: bytes, peer_is_initiator: bool, peer_mid: int,
                 my_mid: int, pending: int | None) -> None:
        self.spi_i, self.spi_r = spi_i, spi_r
        self.peer_is_initiator = peer_is_initiator
        self.peer_mid, self.my_mid, self.pending = peer_mid, my_mid, pending

    def request_mid(self, rng: random.Random) -> int:
        return rng.choice((self.peer_mid, self.peer_mid, self.peer_mid, self.peer_mid - 1,
                           self.peer_mid + 1, self.peer_mid + 2, 0, rng.getrandbits(32))) & 0xFFFFFFFF

    def response_mid(self, rng: random.Random) -> int:
        base = self.pending if self.pending is not None else self.my_mid - 1
        return rng.choice((base, base, base, base - 1, base + 1, self.my_mid, 0,
                           rng.getrandbits(32))) & 0xFFFFFFFF


def retarget(rng: random.Random, d: bytes, t: Target) -> tuple[bytes, str]:
    """Rewrite SPIs, flags and message ID so the datagram reaches the target SA's checks."""
    if len(d) < HDR:
        return d, "retarget(short)"
    response = bool(d[19] & wire.FLAG_R) if rng.random() < 0.8 else rng.random() < 0.5
    flags = (wire.FLAG_I if t.peer_is_initiator else 0) | (wire.FLAG_R if response else 0)
    mid = t.response_mid(rng) if response else t.request_mid(rng)
    out = t.spi_i + t.spi_r + d[16:19] + bytes([flags]) + struct.pack("!I", mid) + d[24:]
    return out, f"retarget({'resp' if response else 'req'} mid {mid})"


def bitflip(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    if not d:
        return d, "bitflip(empty)"
    b = bytearray(d)
    n = rng.choice((1, 1, 1, 2, 3, 8))
    where = rng.random()
    pos = []
    for _ in range(n):
        if where < 0.3:
            i = rng.randrange(min(len(b), HDR))
        elif where < 0.5:
            i = len(b) - 1 - rng.randrange(min(len(b), 48))
        else:
            i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        pos.append(i)
    return bytes(b), f"bitflip{pos}"


def setbytes(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    if not d:
        return d, "setbytes(empty)"
    b = bytearray(d)
    i = rng.randrange(len(b))
    v = rng.choice(INTERESTING8) if rng.random() < 0.7 else rng.getrandbits(8)
    b[i] = v
    return bytes(b), f"set[{i}]={v}"


def truncate(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    n = rng.choice((rng.randrange(len(d) + 1), max(0, len(d) - rng.randrange(1, 40)),
                    rng.randrange(min(len(d), HDR + 8) + 1)))
    out = d[:n]
    fix = rng.random() < 0.6
    return (wire.fix_length(out) if fix else out), f"truncate({n}{',fixlen' if fix else ''})"


def extend(rng: random.Random, d: bytes) -> tuple[bytes, str]:
    k = rng.choice((1, 2, 3, 4, 8, 16, rng.randrange(1, 300)))
    tail = bytes(k) if rng.random() < 0.4 else rng.randbytes(k)
    out = d + tail
    fix = rng.random() < 0.6
    return (wire.fix_length(out) if fix else out), f"extend({k}{',fixlen' if fix else ''})"


def header_lie(rng: random.Random, d: bytes, t: Target | None = None) -> tuple[bytes, str]:
    if len(d) < HDR:
        d = d + bytes(HDR - len(d))
    b = bytearray(d)
    what = rng.choice(("spi_i", "spi_r", "next", "version", "exchange", "flags", "mid", "length"))
    if what in ("spi_i", "spi_r"):
        off = 0 if what == "spi_i" else 8
        choice = rng.random()
        if choice < 0.3:
            v = bytes(8)
        elif choice < 0.5:
            v = bytes(d[8:16] if what == "spi_i" else d[0:8])       # the other one
        elif choice < 0.7 and t is not None:
            v = t.spi_i if rng.random() < 0.5 else t.spi_r
        else:
            v = rng.randbytes(8)
        b[off:off + 8] = v
        desc = f"{what}={v.hex()}"
    elif what == "next":
        b[16] = rng.choice(PAYLOAD_TYPES)
        desc = f"next={b[16]}"
    elif what == "version":
        b[17] = rng.choice((0x10, 0x21, 0x2F, 0x30, 0x00, 0xFF, 0x20))
        desc = f"version={b[17]:#x}"
    elif what == "exchange":
        b[18] = rng.choice(EXCHANGES)
        desc = f"exchange={b[18]}"
    elif what == "flags":
        b[19] = rng.choice((b[19] ^ wire.FLAG_I, b[19] ^ wire.FLAG_R, b[19] ^ wire.FLAG_V,
                            b[19] | 0x07, b[19] | 0xC0, rng.getrandbits(8)))
        desc = f"flags={b[19]:#x}"
    elif what == "mid":
        mid = struct.unpack_from("!I", b, 20)[0]
        v = rng.choice((mid + 1, mid - 1, mid + 2, rng.choice(INTERESTING32), rng.getrandbits(32))) & 0xFFFFFFFF
        struct.pack_into("!I", b, 20, v)
        desc = f"mid={v}"
    else:
        ln = len(d)
        v = rng.choice((ln + 1, ln - 1, 0, HDR, HDR - 1, ln + 4, ln * 2, rng.choice(INTERESTING32))) & 0xFFFFFFFF
        struct.pack_into("!I", b, 24, v)
        desc = f"length={v}"
    return bytes(b), "lie:" + desc


def _random_payload(rng: random.Random) -> Raw:
    t = rng.choice(PAYLOAD_TYPES)
    return Raw(t, rng.choice((0, 0, 0x80, rng.getrandbits(8))), rng.randbytes(rng.choice((0, 1, 3, 4, 8, 16, 40, 300))))


def surgery(rng: random.Random, payloads: list[Raw], donors: list[Raw]) -> tuple[list[Raw], list[int] | None, str]:
    """One operation on a payload chain; returns (payloads, Next Payload lies or None, desc)."""
    ps = [Raw(p.type, p.flags, p.body, p.length) for p in payloads]
    op = rng.choice(("link", "length", "dup", "remove", "swap", "critical", "insert", "donor",
                     "body", "shuffle"))
    links = None
    if not ps:
        ps.append(_random_payload(rng))
        return ps, None, "surgery:insert-into-empty"
    i = rng.randrange(len(ps))
    if op == "link":
        links = [ps[j + 1].type if j + 1 < len(ps) else 0 for j in range(len(ps))]
        links[i] = rng.choice(PAYLOAD_TYPES)
        desc = f"link[{i}]={links[i]}"
    elif op == "length":
        true = 4 + len(ps[i].body)
        ps[i].length = rng.choice((0, 1, 3, 4, true - 1, true + 1, true + 4, 0xFFFF, rng.getrandbits(16)))
        desc = f"length[{i}]={ps[i].length}"
    elif op == "dup":
        ps.insert(i, Raw(ps[i].type, ps[i].flags, ps[i].body))
        desc = f"dup[{i}]"
    elif op == "remove":
        del ps[i]
        desc = f"remove[{i}]"
    elif op == "swap":
        j = rng.randrange(len(ps))
        ps[i], ps[j] = ps[j], ps[i]
        desc = f"swap[{i},{j}]"
    elif op == "critical":
        ps[i].flags ^= 0x80 if rng.random() < 0.7 else rng.getrandbits(7)
        desc = f"flags[{i}]={ps[i].flags:#x}"
    elif op == "insert":
        ps.insert(rng.randrange(len(ps) + 1), _random_payload(rng))
        desc = "insert-random"
    elif op == "donor" and donors:
        p = rng.choice(donors)
        ps.insert(rng.randrange(len(ps) + 1), Raw(p.type, p.flags, p.body))
        desc = f"insert-donor(type {p.type})"
    elif op == "body":
        b = bytearray(ps[i].body)
        if b:
            k = rng.randrange(len(b))
            if rng.random() < 0.5:
                b[k] ^= 1 << rng.randrange(8)
            else:
                del b[k:k + rng.randrange(1, 9)]
        else:
            b = bytearray(rng.randbytes(rng.randrange(1, 9)))
        ps[i].body = bytes(b)
        desc = f"body[{i}]"
    else:
        rng.shuffle(ps)
        desc = "shuffle"
    return ps, links, "surgery:" + desc


def chain_surgery(rng: random.Random, d: bytes, donors: list[Raw]) -> tuple[bytes, str]:
    if len(d) < HDR:
        return d, "surgery(short)"
    hdr, ps, trail = wire.split(d)
    new, links, desc = surgery(rng, ps, donors)
    first, body = wire.chain(new, links=links)
    if rng.random() < 0.1:
        body += trail
    out = bytes([*hdr[:16], first]) + hdr[17:] + body if new else hdr[:16] + b"\x00" + hdr[17:]
    if rng.random() < 0.85:
        out = wire.fix_length(out)
    return out, desc


def sk_surgery(rng: random.Random, d: bytes, iv_icv: int = 24) -> tuple[bytes, str]:
    """Shorten / replace / re-type the SK payload, with its length fields fixed so the
    datagram passes the header and chain checks and reaches the SK handling (issue 12 #1)."""
    if len(d) < HDR:
        return d, "sk(short)"
    hdr, ps, _trail = wire.split(d)
    if not ps or ps[-1].type != SK:
        return d, "sk(none)"
    sk = ps[-1]
    op = rng.choice(("short", "short", "random", "first", "empty"))
    first_inner = None
    if op == "short":
        k = rng.randrange(iv_icv + 3)
        sk = Raw(SK, sk.flags, sk.body[:k])
        desc = f"sk-body[:{k}]"
    elif op == "empty":
        sk = Raw(SK, sk.flags, b"")
        desc = "sk-empty"
    elif op == "random":
        sk = Raw(SK, sk.flags, rng.randbytes(rng.choice((1, 8, 16, 24, 25, 40, 100, len(sk.body)))))
        desc = f"sk-random({len(sk.body)})"
    else:
        first_inner = rng.choice(PAYLOAD_TYPES)
        desc = f"sk-first={first_inner}"
    links = [p.type for p in ps[1:]] + [first_inner if first_inner is not None else _sk_next(d)]
    first, body = wire.chain(ps[:-1] + [sk], links=links)
    out = bytes([*hdr[:16], first]) + hdr[17:] + body
    return wire.fix_length(out), desc


def _sk_next(d: bytes) -> int:
    """The SK payload's Next Payload (type of the first inner payload) in datagram `d`."""
    _hdr, ps, _ = wire.split(d)
    off = HDR
    for p in ps[:-1]:
        off += 4 + len(p.body)
    return d[off] if off < len(d) else 0


MUTATORS = (bitflip, setbytes, truncate, extend, header_lie, chain_surgery, sk_surgery)


def mutate(rng: random.Random, d: bytes, donors: list[Raw], target: Target | None,
           iv_icv: int = 24) -> tuple[bytes, list[str]]:
    """1..4 stacked mutations (the first often a retarget onto the receiver's SA)."""
    steps = []
    if target is not None and rng.random() < 0.6:
        d, s = retarget(rng, d, target)
        steps.append(s)
    n = 1
    while n < 4 and rng.random() < 0.35:
        n += 1
    for _ in range(n):
        m = rng.choice(MUTATORS)
        if m is header_lie:
            d, s = m(rng, d, target)
        elif m is chain_surgery:
            d, s = m(rng, d, donors)
        elif m is sk_surgery:
            d, s = m(rng, d, iv_icv)
        else:
            d, s = m(rng, d)
        steps.append(s)
    return d, steps
