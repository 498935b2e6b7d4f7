"""Minimal readers for /work/shared/vectors (pcap + charon log hexdumps) used by the engine tests.

The crypto developer's tests/vectors.py does the full job; this is only what the codec tests
need, to be consolidated with it once both are on main.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

VECTORS = Path("/work/shared/vectors/strongswan-5.9.8-psk-x25519-aes256gcm")


@dataclass(frozen=True)
class Datagram:
    src: tuple[str, int]
    dst: tuple[str, int]
    ike: bytes  # the IKE message (non-ESP marker removed)


def read_pcap(path: Path = VECTORS / "ike.pcap") -> list[Datagram]:
    """Ethernet/IPv4/UDP frames from a classic little-endian pcap file."""
    data = path.read_bytes()
    (magic,) = struct.unpack_from("<I", data)
    assert magic == 0xA1B2C3D4, "only classic little-endian pcap"
    pos = 24
    out: list[Datagram] = []
    while pos < len(data):
        _ts, _tu, incl, _orig = struct.unpack_from("<IIII", data, pos)
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        assert struct.unpack_from("!H", frame, 12)[0] == 0x0800
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        assert ip[9] == 17  # UDP
        src = ".".join(map(str, ip[12:16]))
        dst = ".".join(map(str, ip[16:20]))
        sport, dport, ulen = struct.unpack_from("!HHH", ip, ihl)
        payload = ip[ihl + 8:ihl + ulen]
        if sport == 4500 or dport == 4500:
            assert payload[:4] == b"\0\0\0\0", "non-ESP marker expected on port 4500"
            payload = payload[4:]
        out.append(Datagram((src, sport), (dst, dport), payload))
    return out


_DUMP_HEAD = re.compile(r"\] (?P<label>.+?) => (?P<n>\d+) bytes @ ")
_DUMP_LINE = re.compile(r"\]\s+\d+: ((?:[0-9A-F]{2} )+)")


def log_hexdumps(label: str, log: str = "charon-A.log") -> list[bytes]:
    """Every hexdump charon logged under `label` (e.g. 'Sk_ei secret'), in log order."""
    lines = (VECTORS / log).read_text().splitlines()
    out: list[bytes] = []
    i = 0
    while i < len(lines):
        m = _DUMP_HEAD.search(lines[i])
        if m and m.group("label") == label:
            n = int(m.group("n"))
            buf = bytearray()
            j = i + 1
            while len(buf) < n and j < len(lines):
                lm = _DUMP_LINE.search(lines[j])
                if not lm:
                    break
                buf += bytes.fromhex(lm.group(1).replace(" ", ""))
                j += 1
            assert len(buf) == n, f"short hexdump for {label}"
            out.append(bytes(buf))
            i = j
        else:
            i += 1
    return out
