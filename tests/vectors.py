"""Helpers to read conformance vectors: pcap files, IKE datagrams and strongSwan charon logs.

Reusable by every IKE test (crypto, codec, engine). Nothing here depends on appliance code, so
the vectors stay an independent oracle:

* :func:`read_pcap` - a small classic-pcap reader (Ethernet / Linux cooked / raw IP, IPv4 and
  IPv6, UDP only). No scapy.
* :func:`ike_datagrams` - the IKE messages of a pcap, with the RFC 3948 non-ESP marker stripped
  from port-4500 datagrams (ESP packets and NAT-keepalives are skipped); :func:`udp_4500_kind`
  tells the three apart, :func:`natt_keepalives` lists the keepalives.
* :func:`ike_header`, :func:`walk_payloads`, :func:`sk_payload` - a minimal RFC 7296 §3.1/§3.2
  walker over generic payload headers (NOT the codec: appliance/ike/message.py is that).
* :func:`read_charon_log` - every hex dump a charon log printed at level 4
  (``label => N bytes @ 0x...`` followed by offset/hex/ascii lines), in order.
* :data:`STRONGSWAN_PSK_X25519` - the shared strongSwan conversation, copied into
  tests/data/strongswan/shared-psk-x25519-aes256gcm/ (see its README).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Vectors live in the repository, so the tests read nothing outside the checkout.
VECTORS_DIR = Path(__file__).resolve().parent / "data" / "strongswan"

# --------------------------------------------------------------------------- pcap
_LINKTYPE_ETHERNET = 1
_LINKTYPE_RAW = 101
_LINKTYPE_LINUX_SLL = 113
_LINKTYPE_IPV4 = 228
_LINKTYPE_IPV6 = 229
_LINKTYPE_LINUX_SLL2 = 276


@dataclass(frozen=True)
class UdpDatagram:
    """One UDP datagram from a capture. Addresses are strings, ports ints, ``ts`` seconds."""

    index: int
    ts: float
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def read_pcap(path: str | Path) -> list[UdpDatagram]:
    """Every UDP datagram of a classic libpcap file (not pcapng), in capture order.
    Non-UDP packets and IP fragments other than the first are skipped."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: too short for a pcap file")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    elif magic == b"\x0a\x0d\x0d\x0a":
        raise ValueError(f"{path}: pcapng is not supported, write classic pcap (tcpdump -w)")
    else:
        raise ValueError(f"{path}: not a pcap file (magic {magic.hex()})")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    out: list[UdpDatagram] = []
    off = 24
    n = 0
    while off + 16 <= len(data):
        sec, frac, caplen, _origlen = struct.unpack(endian + "IIII", data[off:off + 16])
        off += 16
        frame = data[off:off + caplen]
        off += caplen
        if len(frame) != caplen:
            raise ValueError(f"{path}: truncated packet record at offset {off - caplen - 16}")
        ts = sec + frac / (1e9 if nano else 1e6)
        ip = _strip_link(frame, linktype)
        if ip is None:
            continue
        udp = _udp_from_ip(ip)
        if udp is None:
            continue
        src, dst, sport, dport, payload = udp
        out.append(UdpDatagram(n, ts, src, sport, dst, dport, payload))
        n += 1
    return out


def _strip_link(frame: bytes, linktype: int) -> bytes | None:
    if linktype == _LINKTYPE_ETHERNET:
        off, ethertype = 14, int.from_bytes(frame[12:14], "big")
        while ethertype in (0x8100, 0x88A8):  # VLAN tags
            ethertype = int.from_bytes(frame[off + 2:off + 4], "big")
            off += 4
    elif linktype == _LINKTYPE_LINUX_SLL:
        off, ethertype = 16, int.from_bytes(frame[14:16], "big")
    elif linktype == _LINKTYPE_LINUX_SLL2:
        off, ethertype = 20, int.from_bytes(frame[0:2], "big")
    elif linktype in (_LINKTYPE_RAW, _LINKTYPE_IPV4, _LINKTYPE_IPV6):
        return frame
    else:
        raise ValueError(f"unsupported pcap link type {linktype}")
    if ethertype not in (0x0800, 0x86DD):
        return None
    return frame[off:]


def _udp_from_ip(ip: bytes) -> tuple[str, str, int, int, bytes] | None:
    import ipaddress

    version = ip[0] >> 4
    if version == 4:
        ihl = (ip[0] & 0x0F) * 4
        total = int.from_bytes(ip[2:4], "big")
        frag = int.from_bytes(ip[6:8], "big")
        if ip[9] != 17 or frag & 0x1FFF:
            return None
        src = str(ipaddress.IPv4Address(ip[12:16]))
        dst = str(ipaddress.IPv4Address(ip[16:20]))
        l4 = ip[ihl:total]  # a first fragment gives what it has; ulen below will not fit
    elif version == 6:
        nxt = ip[6]
        plen = int.from_bytes(ip[4:6], "big")
        src = str(ipaddress.IPv6Address(ip[8:24]))
        dst = str(ipaddress.IPv6Address(ip[24:40]))
        l4 = ip[40:40 + plen]
        # skip hop-by-hop, routing, destination options extension headers
        while nxt in (0, 43, 60):
            nxt, hlen = l4[0], (l4[1] + 1) * 8
            l4 = l4[hlen:]
        if nxt != 17:
            return None
    else:
        return None
    sport, dport, ulen = struct.unpack("!HHH", l4[:6])
    return src, dst, sport, dport, l4[8:ulen]


# --------------------------------------------------------------------------- IKE datagrams
@dataclass(frozen=True)
class IkeHeader:
    """The fixed IKE header (RFC 7296 §3.1)."""

    spi_i: bytes
    spi_r: bytes
    next_payload: int
    version: int
    exchange: int
    flags: int
    message_id: int
    length: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & 0x20)

    @property
    def from_initiator(self) -> bool:
        """The I flag: set in messages sent by the original initiator of the IKE SA."""
        return bool(self.flags & 0x08)


def ike_header(msg: bytes) -> IkeHeader:
    if len(msg) < 28:
        raise ValueError(f"IKE message of {len(msg)} octets is shorter than the 28-octet header")
    spi_i, spi_r = msg[:8], msg[8:16]
    nxt, ver, exch, flags = msg[16], msg[17], msg[18], msg[19]
    mid, length = struct.unpack("!II", msg[20:28])
    return IkeHeader(spi_i, spi_r, nxt, ver, exch, flags, mid, length)


@dataclass(frozen=True)
class IkeDatagram:
    """An IKE message from a capture: ``message`` starts at the IKE header."""

    udp: UdpDatagram
    message: bytes
    header: IkeHeader

    @property
    def natt(self) -> bool:
        return self.udp.sport == 4500 or self.udp.dport == 4500


NON_ESP_MARKER = b"\x00\x00\x00\x00"


def udp_4500_kind(payload: bytes) -> str:
    """What a UDP datagram on port 4500 carries (RFC 3948 §2.1-§2.3): "keepalive" (the one
    octet 0xFF), "ike" (the 4-octet non-ESP marker, then an IKE header) or "esp" (ESP in UDP:
    the first four octets are the SPI, never zero)."""
    if payload == b"\xff":
        return "keepalive"
    if len(payload) >= 4 and payload[:4] == NON_ESP_MARKER:
        return "ike"
    if len(payload) >= 8:     # SPI + sequence number at least (RFC 4303 §2)
        return "esp"
    raise ValueError(f"{len(payload)}-octet UDP 4500 datagram is neither a keepalive, IKE nor ESP")


def _on_4500(d: UdpDatagram) -> bool:
    return 4500 in (d.sport, d.dport)


def ike_datagrams(path: str | Path) -> list[IkeDatagram]:
    """The IKE messages of a capture on UDP 500/4500 (RFC 3948 §2.2 non-ESP marker removed;
    NAT keepalives and ESP-in-UDP on 4500 are skipped)."""
    out = []
    for d in read_pcap(path):
        if 500 not in (d.sport, d.dport) and not _on_4500(d):
            continue
        p = d.payload
        if _on_4500(d):
            if udp_4500_kind(p) != "ike":
                continue
            p = p[len(NON_ESP_MARKER):]
        out.append(IkeDatagram(d, p, ike_header(p)))
    return out


def natt_keepalives(path: str | Path) -> list[UdpDatagram]:
    """The NAT keepalives (RFC 3948 §2.3) of a capture."""
    return [d for d in read_pcap(path) if _on_4500(d) and udp_4500_kind(d.payload) == "keepalive"]


@dataclass(frozen=True)
class Payload:
    """A payload found by the generic-header walk: ``body`` excludes the 4-octet header;
    ``offset`` is where the generic header starts in the walked buffer."""

    type: int
    critical: bool
    body: bytes
    offset: int
    next_type: int


SK = 46
SKF = 53


def walk_payloads(first_type: int, data: bytes, base: int = 0) -> list[Payload]:
    """Walk a chain of generic payload headers (RFC 7296 §3.2) starting with ``first_type``.
    An SK/SKF payload ends the walk (its body runs to the end of the message, §3.14)."""
    out: list[Payload] = []
    t = first_type
    off = 0
    while t != 0:
        if off + 4 > len(data):
            raise ValueError(f"payload chain truncated at offset {base + off}")
        nxt, flags = data[off], data[off + 1]
        plen = int.from_bytes(data[off + 2:off + 4], "big")
        if plen < 4 or off + plen > len(data):
            raise ValueError(f"payload type {t} at offset {base + off} has bad length {plen}")
        out.append(Payload(t, bool(flags & 0x80), data[off + 4:off + plen], base + off, nxt))
        off += plen
        if t in (SK, SKF):
            if off != len(data):
                raise ValueError("octets after the SK payload")
            return out
        t = nxt
    if off != len(data):
        raise ValueError(f"{len(data) - off} octets after the last payload")
    return out


def message_payloads(msg: bytes) -> list[Payload]:
    """The top-level payloads of an IKE message (header length checked)."""
    h = ike_header(msg)
    if h.length != len(msg):
        raise ValueError(f"IKE header length {h.length} != datagram length {len(msg)}")
    return walk_payloads(h.next_payload, msg[28:], 28)


@dataclass(frozen=True)
class SkPayload:
    """The SK payload of a message: ``aad`` is the message up to and including the SK generic
    header (RFC 5282 §5.1), ``body`` is IV | ciphertext | ICV, ``first_inner`` the type of the
    first payload inside."""

    aad: bytes
    body: bytes
    first_inner: int


def sk_payload(msg: bytes) -> SkPayload | None:
    ps = message_payloads(msg)
    last = ps[-1]
    if last.type != SK:
        return None
    return SkPayload(msg[:last.offset + 4], last.body, last.next_type)


# --------------------------------------------------------------------------- charon logs
@dataclass(frozen=True)
class LogDump:
    """One hex dump of a charon log: ``label`` is the text before ``=>``."""

    line: int
    thread: int
    group: str
    label: str
    data: bytes
    ike_sa: str = ""  # "<conn|unique id>" of filelog lines, e.g. "p|1"


# Both charon's default format ("06[IKE] text") and the filelog format with a time stamp and
# the IKE SA ("08:26:27.541 11[IKE] <p|1> text") are understood.
_HEAD = re.compile(r"^(?:[\d:.]+ )?(\d+)\[(\w+)\] (?:<([^>]*)> )?(.*?) => (\d+) bytes"
                   r" @ (?:0x)?[0-9a-fA-F]+\s*$")
_ROW = re.compile(r"^(?:[\d:.]+ )?(\d+)\[(\w+)\] (?:<[^>]*> )?\s*(\d+): ((?:[0-9A-F]{2} ?){1,16})")


def read_charon_log(path: str | Path) -> list[LogDump]:
    """All ``label => N bytes @ addr`` dumps with their bytes, in log order."""
    lines = Path(path).read_text(errors="replace").splitlines()
    out: list[LogDump] = []
    i = 0
    while i < len(lines):
        m = _HEAD.match(lines[i])
        if not m:
            i += 1
            continue
        thread, group, ike_sa, label, n = int(m[1]), m[2], m[3] or "", m[4].strip(), int(m[5])
        buf = bytearray()
        j = i + 1
        while len(buf) < n and j < len(lines):
            r = _ROW.match(lines[j])
            if not r or int(r[1]) != thread or int(r[3]) != len(buf):
                break
            buf += bytes.fromhex(r[4][:48].replace(" ", ""))
            j += 1
        if len(buf) != n:
            raise ValueError(f"{path}:{i + 1}: dump {label!r} has {len(buf)} of {n} bytes")
        out.append(LogDump(i + 1, thread, group, label, bytes(buf), ike_sa))
        i = j
    return out


def dumps(log: list[LogDump], label: str) -> list[bytes]:
    """Data of every dump with exactly this label, in order."""
    return [d.data for d in log if d.label == label]


# --------------------------------------------------------------------------- the vectors
Endpoint = tuple[str, int]


@dataclass(frozen=True)
class NatInfo:
    """Both sides of the NAT in front of the initiator of a natt-* vector (vector.json "nat"):
    the initiator's inside address, the NAT's public one and, per inside port, the public port
    the NAT mapped it to (its conntrack table during the recording)."""

    public_addr: str
    inside_addr: str
    mappings: dict[int, int]     # inside port -> public port
    keepalive_interval: float = 0.0
    # per role ("initiator", "responder"): what that charon reported over vici with the Child
    # SA up: local/remote [address, port], nat_local, nat_remote, nat_fake, child_encap
    strongswan_state: dict = field(default_factory=dict)

    def inside(self, ep: Endpoint) -> Endpoint:
        """The initiator's own view of one of its public endpoints (others unchanged)."""
        for inside_port, public_port in self.mappings.items():
            if ep == (self.public_addr, public_port):
                return (self.inside_addr, inside_port)
        return ep

    def public(self, inside_port: int) -> Endpoint:
        return (self.public_addr, self.mappings[inside_port])


@dataclass(frozen=True)
class StrongswanVector:
    """A recorded strongSwan conversation (see the directory's README)."""

    directory: Path
    psk: bytes = field(repr=False)
    initiator_id: bytes  # ID data (FQDN) of the initiator
    responder_id: bytes
    initiator_addr: str
    responder_addr: str
    ike_proposal: str
    esp_proposal: str
    logs: dict[str, str] = field(default_factory=dict)  # role -> file name
    auth: str = "psk"            # or "pubkey": certificates (ca.pem, cert-A.pem, cert-S.pem)
    recorded_at: float = 0.0     # UNIX time of the recording (certificate validity)
    nat: NatInfo | None = None   # natt-* vectors: the initiator is behind this NAT

    @property
    def pcap(self) -> Path:
        return self.directory / "ike.pcap"

    def log(self, role: str) -> list[LogDump]:
        return read_charon_log(self.directory / self.logs[role])

    def datagrams(self) -> list[IkeDatagram]:
        return ike_datagrams(self.pcap)

    def initiator_view(self, d: IkeDatagram) -> tuple[Endpoint, Endpoint]:
        """(source, destination) of a captured datagram as the initiator sent or received it:
        the capture is on the responder's side, so behind a NAT the initiator's public
        endpoint is put back to its inside one."""
        src, dst = (d.udp.src, d.udp.sport), (d.udp.dst, d.udp.dport)
        if self.nat is None:
            return src, dst
        return self.nat.inside(src), self.nat.inside(dst)

    def available(self) -> bool:
        return self.pcap.exists()

    @classmethod
    def from_json(cls, directory: str | Path) -> "StrongswanVector":
        """A vector recorded by tests/record_strongswan_vectors.py (its vector.json)."""
        import json

        d = Path(directory)
        meta = json.loads((d / "vector.json").read_text())
        nat = meta.get("nat")
        return cls(directory=d, psk=meta["psk"].encode(),
                   initiator_id=meta["initiator_id"].encode(),
                   responder_id=meta["responder_id"].encode(),
                   initiator_addr=meta["initiator_addr"], responder_addr=meta["responder_addr"],
                   ike_proposal=meta["ike_proposal"], esp_proposal=meta["esp_proposal"],
                   logs=meta["logs"], auth=meta.get("auth", "psk"),
                   recorded_at=float(meta.get("recorded_at", 0)),
                   nat=None if nat is None else NatInfo(
                       public_addr=nat["public_addr"], inside_addr=nat["initiator_inside_addr"],
                       mappings={m["inside"][1]: m["public"][1] for m in nat["mappings"]},
                       keepalive_interval=float(nat.get("keepalive_interval", 0)),
                       strongswan_state=nat.get("strongswan_state", {})))


STRONGSWAN_PSK_X25519 = StrongswanVector(
    directory=VECTORS_DIR / "shared-psk-x25519-aes256gcm",
    psk=b"vector-Secret-0123456789",
    initiator_id=b"a.example.net",
    responder_id=b"b.example.net",
    initiator_addr="192.0.2.1",
    responder_addr="192.0.2.2",
    ike_proposal="aes256gcm16-prfsha384-x25519",
    esp_proposal="aes256gcm16",
    logs={"initiator": "charon-A.log", "responder": "charon-S.log"},
)


#: Conversations recorded from two strongSwan daemons (tests/record_strongswan_vectors.py):
#: Child SA keys are logged (CHD level 4), the Child SA and the IKE SA are rekeyed, with PFS.
RECORDED_DIR = VECTORS_DIR


def recorded_vectors() -> list[StrongswanVector]:
    return [StrongswanVector.from_json(p) for p in sorted(RECORDED_DIR.glob("*/vector.json"))
            for p in [p.parent]]


def iter_sa_proposals(sa_body: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(proposal number, protocol id, SPI, transforms octets) of each Proposal substructure in
    an SA payload body (RFC 7296 §3.3.1) - enough for tests to find rekey SPIs."""
    off = 0
    while off < len(sa_body):
        last, _res, plen, num, proto, spi_size, _ntr = struct.unpack(
            "!BBHBBBB", sa_body[off:off + 8])
        spi = sa_body[off + 8:off + 8 + spi_size]
        yield num, proto, spi, sa_body[off + 8 + spi_size:off + plen]
        off += plen
        if last == 0:
            break


@dataclass(frozen=True, repr=False)
class LoggedChildKeys:
    """One Child SA key derivation as charon logged it (CHD level 4): the KEYMAT ``seed``
    ([g^ir |] Ni | Nr), the PFS ``dh`` secret if any, and the four keys."""

    line: int
    ike_sa: str
    seed: bytes
    dh: bytes | None
    ei: bytes
    er: bytes
    ai: bytes
    ar: bytes


_CHILD_LABELS = {"encryption initiator key": "ei", "encryption responder key": "er",
                 "integrity initiator key": "ai", "integrity responder key": "ar"}


def logged_child_keys(log: list[LogDump]) -> list[LoggedChildKeys]:
    """Every Child SA derivation of a charon log with CHD at level 4, in log order. charon logs
    "DH secret" (PFS only), "seed", then the keys, all on one thread."""
    out: list[LoggedChildKeys] = []
    open_: dict[int, dict] = {}
    last_dh: dict[int, bytes] = {}

    def close(th: int) -> None:
        r = open_.pop(th, None)
        if r is not None:
            out.append(LoggedChildKeys(r["line"], r["ike_sa"], r["seed"], r["dh"],
                                       r.get("ei", b""), r.get("er", b""), r.get("ai", b""),
                                       r.get("ar", b"")))

    for d in log:
        if d.group != "CHD":
            continue
        if d.label == "DH secret":
            close(d.thread)
            last_dh[d.thread] = d.data
        elif d.label == "seed":
            close(d.thread)
            open_[d.thread] = {"line": d.line, "ike_sa": d.ike_sa, "seed": d.data,
                               "dh": last_dh.pop(d.thread, None)}
        elif d.label in _CHILD_LABELS and d.thread in open_:
            open_[d.thread][_CHILD_LABELS[d.label]] = d.data
    for th in list(open_):
        close(th)
    return sorted(out, key=lambda r: r.line)
