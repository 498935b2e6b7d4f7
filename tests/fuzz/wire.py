"""Byte-level IKE helpers for building hostile datagrams (RFC 7296 §3.1, §3.2, §3.14).

Independent of the codec under test where it matters: chains are walked and written here, only
the SK cipher of a live SA is borrowed to protect forged plaintexts."""

from __future__ import annotations

import struct
from dataclasses import dataclass

HDR = 28
SK = 46
FLAG_I = 0x08
FLAG_V = 0x10
FLAG_R = 0x20


@dataclass
class Raw:
    """One payload of a chain: type, flags octet, body (the generic header is rebuilt)."""

    type: int
    flags: int
    body: bytes
    length: int | None = None     # a lie for the Payload Length field, else the true length


def header(spi_i: bytes, spi_r: bytes, next_payload: int, exchange: int, flags: int, mid: int,
           length: int, version: int = 0x20) -> bytes:
    return spi_i + spi_r + struct.pack("!BBBBII", next_payload, version, exchange, flags,
                                       mid & 0xFFFFFFFF, length & 0xFFFFFFFF)


def walk(first: int, data: bytes, start: int = 0) -> tuple[list[Raw], bytes]:
    """The payloads of a chain as far as they walk, and whatever trails the walk (an SK
    payload's body stays inside its Raw)."""
    out: list[Raw] = []
    t, off = first, start
    while t != 0 and off + 4 <= len(data):
        nxt, flags, plen = struct.unpack_from("!BBH", data, off)
        if plen < 4 or off + plen > len(data):
            break
        out.append(Raw(t, flags, data[off + 4:off + plen]))
        off += plen
        if t == SK:
            break
        t = nxt
    return out, data[off:]


def chain(payloads: list[Raw], last_next: int = 0, links: list[int] | None = None) -> tuple[int, bytes]:
    """Encode a chain; `links` overrides each payload's Next Payload field (a lie)."""
    parts = []
    for i, p in enumerate(payloads):
        nxt = links[i] if links is not None else (payloads[i + 1].type if i + 1 < len(payloads) else last_next)
        length = p.length if p.length is not None else 4 + len(p.body)
        parts.append(struct.pack("!BBH", nxt & 0xFF, p.flags & 0xFF, length & 0xFFFF) + p.body)
    return (payloads[0].type if payloads else 0), b"".join(parts)


def split(data: bytes) -> tuple[bytes, list[Raw], bytes]:
    """(IKE header, top-level payloads, trailing octets) of a datagram of at least 28 octets."""
    return data[:HDR], *walk(data[16], data, HDR)


def fix_length(data: bytes) -> bytes:
    """Set the header's Length field to the datagram's length."""
    return data[:24] + struct.pack("!I", len(data) & 0xFFFFFFFF) + data[28:] if len(data) >= HDR else data


def protect(cipher, hdr_fields: dict, first_inner: int, inner: bytes, iv: bytes,
            pad: bytes | None = None) -> bytes:
    """An SK-protected message with `inner` as plaintext (pad: Padding + Pad Length octets,
    default the minimal valid padding), encrypted and authenticated with `cipher` (a live
    SA's SkCipher), so the receiver's integrity check verifies."""
    if pad is None:
        bs = max(cipher.block_size, 1)
        n = (-(len(inner) + 1)) % bs
        pad = bytes(n) + bytes([n])
    else:
        bs = max(cipher.block_size, 1)
        extra = (-(len(inner) + len(pad))) % bs
        pad = bytes(extra) + pad     # keep the block size; the Pad Length octet stays last
    plaintext = inner + pad
    sk_len = 4 + cipher.iv_size + len(plaintext) + cipher.icv_size
    total = HDR + sk_len
    aad = header(hdr_fields["spi_i"], hdr_fields["spi_r"], SK, hdr_fields["exchange"],
                 hdr_fields["flags"], hdr_fields["mid"], total) + struct.pack("!BBH", first_inner, 0, sk_len)
    return aad + cipher.encrypt(plaintext, aad, iv)
