"""IKEv2 message codec (RFC 7296 §3).

Parsing is strict: every length field is checked against what actually follows, reserved
structure is validated, and a malformed message raises :class:`ParseError` with a reason (and,
where the RFC names one, the error notify to answer with). The codec never raises anything else
for bad input, except that decrypt_message raises crypto's IntegrityError for an SK payload that
does not verify and AuthenticParseError (a ParseError) for one that verified but is malformed:
the engine acts only on the latter (RFC 7296 §2.21) and never lets either escape.

The SK payload (§3.14) is composed here and protected by a cipher object supplied by the caller
(crypto.SkCipher): the codec lays out header | SK generic header | IV | ciphertext | ICV, passes
the associated data, and pads the plaintext as §3.14 requires.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, Sequence

from appliance.ike.constants import ExchangeType, NotifyType, PayloadType, ProtocolId
from appliance.ike.crypto import IntegrityError
from appliance.ike.proposals import Proposal, Transform

IKE_HEADER_LEN = 28
GENERIC_HEADER_LEN = 4
IKE_MAJOR_VERSION = 2

FLAG_INITIATOR = 0x08
FLAG_VERSION = 0x10
FLAG_RESPONSE = 0x20

# Transform attribute type "Key Length" (§3.3.5), the only attribute RFC 7296 defines.
ATTR_KEY_LENGTH = 14
_AF_TV = 0x8000


class ParseError(Exception):
    """A received message (or payload) is malformed.

    `notify` is the error notify type to answer with when the RFC names one (INVALID_SYNTAX by
    default, UNSUPPORTED_CRITICAL_PAYLOAD with `notify_data` = the payload type for §2.5,
    INVALID_MAJOR_VERSION for a newer major version).
    """

    def __init__(self, reason: str, notify: int = NotifyType.INVALID_SYNTAX,
                 notify_data: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.notify = notify
        self.notify_data = notify_data


class AuthenticParseError(ParseError):
    """Raised by :func:`decrypt_message` only once the SK payload's integrity check has
    verified: the message is authentic but its plaintext is malformed. Only this may be
    answered with an error notify (a request, §2.21.2) or end an exchange (a response); any
    failure before the ICV verified raises crypto's IntegrityError and must change nothing
    (§2.21, §3.10.1: INVALID_SYNTAX only after the checksum verified)."""


class SkProtector(Protocol):
    """What the codec needs from crypto.SkCipher (RFC 7296 §3.14, RFC 5282)."""

    block_size: int
    iv_size: int
    icv_size: int

    def encrypt(self, plaintext_with_pad: bytes, aad: bytes, iv: bytes) -> bytes: ...

    def decrypt(self, iv_ct_icv: bytes, aad: bytes) -> bytes: ...


# --------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------


class Payload:
    """Base for payloads. Subclasses set PAYLOAD_TYPE and implement body()/from_body()."""

    PAYLOAD_TYPE: ClassVar[int] = 0

    @property
    def payload_type(self) -> int:
        return self.PAYLOAD_TYPE

    @property
    def critical(self) -> bool:
        # §3.2: the critical bit MUST be zero for payload types defined in RFC 7296.
        return False

    def body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def from_body(cls, body: bytes) -> "Payload":
        raise NotImplementedError


def _encode_transform(t: Transform, last: bool) -> bytes:
    # Transforms are immutable: their encoding (with "last" = 0) is kept on the object.
    wire = t.__dict__.get("_wire")
    if wire is None:
        wire = t.__dict__["_wire"] = _transform_wire(t)
    return wire if last else b"\x03" + wire[1:]


def _transform_wire(t: Transform) -> bytes:
    last = True
    attrs = b""
    if t.key_length is not None:
        attrs += struct.pack("!HH", _AF_TV | ATTR_KEY_LENGTH, t.key_length)
    for atype, value in t.extra_attributes:
        if atype & _AF_TV:
            if len(value) != 2:
                raise ValueError("TV attribute value must be 2 octets")
            attrs += struct.pack("!H", atype) + value
        else:
            attrs += struct.pack("!HH", atype, len(value)) + value
    return struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attrs), t.type, 0, t.id) + attrs


def _decode_transform(ttype: int, tid: int, data: bytes) -> Transform:
    if not data:
        return Transform.plain(ttype, tid)
    if len(data) == 4 and data[0] == 0x80 and data[1] == ATTR_KEY_LENGTH:   # TV Key Length only
        return Transform.plain(ttype, tid, (data[2] << 8) | data[3])
    key_length: int | None = None
    others: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise ParseError("truncated transform attribute")
        (raw_type,) = struct.unpack_from("!H", data, pos)
        if raw_type & _AF_TV:
            value = data[pos + 2:pos + 4]
            pos += 4
            if raw_type & 0x7FFF == ATTR_KEY_LENGTH:
                if key_length is not None:
                    raise ParseError("duplicate Key Length attribute")
                key_length = struct.unpack("!H", value)[0]
            else:
                others.append((raw_type, value))
        else:
            (vlen,) = struct.unpack_from("!H", data, pos + 2)
            if pos + 4 + vlen > len(data):
                raise ParseError("transform attribute length overruns the transform")
            if raw_type == ATTR_KEY_LENGTH:
                # §3.3.5: Key Length is only valid in TV format.
                raise ParseError("Key Length attribute must use the TV format")
            others.append((raw_type, data[pos + 4:pos + 4 + vlen]))
            pos += 4 + vlen
    return Transform(ttype, tid, key_length, tuple(others))


def _encode_proposal(p: Proposal, last: bool) -> bytes:
    if len(p.transforms) > 255:
        raise ValueError("too many transforms in one proposal")
    tbody = b"".join(_encode_transform(t, i == len(p.transforms) - 1)
                     for i, t in enumerate(p.transforms))
    length = 8 + len(p.spi) + len(tbody)
    return struct.pack("!BBHBBBB", 0 if last else 2, 0, length, p.number, p.protocol,
                       len(p.spi), len(p.transforms)) + p.spi + tbody


def _check_spi_size(protocol_id: int, size: int, where: str) -> None:
    if protocol_id == ProtocolId.IKE:
        if size not in (0, 8):
            raise ParseError(f"{where}: IKE SPI size {size}, must be 0 or 8")
    elif protocol_id in (ProtocolId.ESP, ProtocolId.AH):
        if size != 4:
            raise ParseError(f"{where}: ESP/AH SPI size {size}, must be 4")


@dataclass(slots=True)
class SA(Payload):
    """Security Association payload (§3.3)."""

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.SA
    proposals: list[Proposal] = field(default_factory=list)

    def body(self) -> bytes:
        return b"".join(_encode_proposal(p, i == len(self.proposals) - 1)
                        for i, p in enumerate(self.proposals))

    @classmethod
    def from_body(cls, body: bytes) -> "SA":
        proposals: list[Proposal] = []
        pos = 0
        last = False
        if not body:
            raise ParseError("SA payload without proposals")
        while pos < len(body):
            if last:
                raise ParseError("data after the last proposal")
            if len(body) - pos < 8:
                raise ParseError("truncated proposal substructure")
            more, _res, plen, num, proto, spi_size, ntrans = struct.unpack_from("!BBHBBBB", body, pos)
            if more not in (0, 2):
                raise ParseError(f"proposal 'last' field is {more}, must be 0 or 2")
            if plen < 8 + spi_size or pos + plen > len(body):
                raise ParseError("proposal length inconsistent with the SA payload")
            expected = (proposals[-1].number + 1) if proposals else 1
            if num != expected and not (not proposals and more == 0 and num >= 1):
                # §3.3.1: the first proposal is number 1, each next one is one more; a lone
                # proposal may be a response's, which keeps the number of the one selected.
                raise ParseError(f"proposal number {num} out of sequence, expected {expected}")
            _check_spi_size(proto, spi_size, "proposal")
            spi = body[pos + 8:pos + 8 + spi_size]
            transforms: list[Transform] = []
            tpos = pos + 8 + spi_size
            end = pos + plen
            tlast = False
            while tpos < end:
                if tlast:
                    raise ParseError("data after the last transform")
                if end - tpos < 8:
                    raise ParseError("truncated transform substructure")
                tmore, _r1, tlen, ttype, _r2, tid = struct.unpack_from("!BBHBBH", body, tpos)
                if tmore not in (0, 3):
                    raise ParseError(f"transform 'last' field is {tmore}, must be 0 or 3")
                if tlen < 8 or tpos + tlen > end:
                    raise ParseError("transform length inconsistent with the proposal")
                transforms.append(_decode_transform(ttype, tid, body[tpos + 8:tpos + tlen]))
                tlast = tmore == 0
                tpos += tlen
            if len(transforms) != ntrans:
                raise ParseError(f"proposal says {ntrans} transforms, has {len(transforms)}")
            if not tlast:
                raise ParseError("last transform not marked as last")
            # a ProtocolId when known; else kept as a number (selection refuses what it does not know)
            protocol = ProtocolId._value2member_map_.get(proto, proto)
            proposals.append(Proposal(protocol, tuple(transforms), num, spi))
            last = more == 0
            pos = end
        if not last:
            raise ParseError("last proposal not marked as last")
        return cls(proposals)


@dataclass(slots=True)
class KE(Payload):
    """Key Exchange payload (§3.4)."""

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.KE
    dh_group: int = 0
    data: bytes = b""

    def body(self) -> bytes:
        return struct.pack("!HH", self.dh_group, 0) + self.data

    @classmethod
    def from_body(cls, body: bytes) -> "KE":
        if len(body) < 5:
            raise ParseError("KE payload too short")
        group, _res = struct.unpack_from("!HH", body)
        return cls(group, body[4:])


@dataclass(slots=True)
class _Identification(Payload):
    """IDi / IDr payload (§3.5)."""

    id_type: int = 0
    data: bytes = b""

    def body(self) -> bytes:
        return struct.pack("!B3x", self.id_type) + self.data

    @classmethod
    def from_body(cls, body: bytes):
        if len(body) < 5:
            raise ParseError("identification payload too short")
        return cls(body[0], body[4:])


@dataclass(slots=True)
class IDi(_Identification):
    PAYLOAD_TYPE: ClassVar[int] = PayloadType.IDi


@dataclass(slots=True)
class IDr(_Identification):
    PAYLOAD_TYPE: ClassVar[int] = PayloadType.IDr


@dataclass(slots=True)
class CERT(Payload):
    """Certificate payload (§3.6)."""

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.CERT
    encoding: int = 0
    data: bytes = b""

    def body(self) -> bytes:
        return bytes([self.encoding]) + self.data

    @classmethod
    def from_body(cls, body: bytes) -> "CERT":
        if len(body) < 1:
            raise ParseError("CERT payload too short")
        return cls(body[0], body[1:])


@dataclass(slots=True)
class CERTREQ(Payload):
    """Certificate Request payload (§3.7)."""

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.CERTREQ
    encoding: int = 0
    data: bytes = b""

    def body(self) -> bytes:
        return bytes([self.encoding]) + self.data

    @classmethod
    def from_body(cls, body: bytes) -> "CERTREQ":
        if len(body) < 1:
            raise ParseError("CERTREQ payload too short")
        return cls(body[0], body[1:])


@dataclass(slots=True)
class AUTH(Payload):
    """Authentication payload (§3.8)."""

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.AUTH
    method: int = 0
    data: bytes = field(default=b"", repr=False)

    def body(self) -> bytes:
        return struct.pack("!B3x", self.method) + self.data

    @classmethod
    def from_body(cls, body: bytes) -> "AUTH":
        if len(body) < 5:
            raise ParseError("AUTH payload too short")
        return cls(body[0], body[4:])


NONCE_MIN = 16
NONCE_MAX = 256


@dataclass(slots=True)
class Nonce(Payload):
    """Nonce payload (§3.9): 16..256 octets."""

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.NONCE
    data: bytes = b""

    def body(self) -> bytes:
        return self.data

    @classmethod
    def from_body(cls, body: bytes) -> "Nonce":
        if not NONCE_MIN <= len(body) <= NONCE_MAX:
            raise ParseError(f"nonce of {len(body)} octets, must be {NONCE_MIN}..{NONCE_MAX}")
        return cls(body)


@dataclass(slots=True)
class Notify(Payload):
    """Notify payload (§3.10)."""

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.NOTIFY
    notify_type: int = 0
    protocol_id: int = 0
    spi: bytes = b""
    data: bytes = b""

    def body(self) -> bytes:
        return struct.pack("!BBH", self.protocol_id, len(self.spi), self.notify_type) + self.spi + self.data

    @classmethod
    def from_body(cls, body: bytes) -> "Notify":
        if len(body) < 4:
            raise ParseError("Notify payload too short")
        proto, spi_size, ntype = struct.unpack_from("!BBH", body)
        if 4 + spi_size > len(body):
            raise ParseError("Notify SPI size overruns the payload")
        if proto == 0 and spi_size not in (0,):
            # §3.10: SPI size MUST be zero when there is no protocol (some notifies such as
            # INVALID_SELECTORS carry one); accept 4 and 8 too but check they fit (done above).
            if spi_size not in (4, 8):
                raise ParseError(f"Notify SPI size {spi_size} without a protocol")
        return cls(ntype, proto, body[4:4 + spi_size], body[4 + spi_size:])

    @property
    def is_error(self) -> bool:
        return self.notify_type < 16384


@dataclass(slots=True)
class Delete(Payload):
    """Delete payload (§3.11). For the IKE SA: protocol IKE, no SPIs."""

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.DELETE
    protocol_id: int = 0
    spis: list[bytes] = field(default_factory=list)

    def body(self) -> bytes:
        size = 0 if self.protocol_id == ProtocolId.IKE else 4
        for s in self.spis:
            if len(s) != size:
                raise ValueError("Delete SPI of the wrong size")
        return struct.pack("!BBH", self.protocol_id, size, len(self.spis)) + b"".join(self.spis)

    @classmethod
    def from_body(cls, body: bytes) -> "Delete":
        if len(body) < 4:
            raise ParseError("Delete payload too short")
        proto, size, num = struct.unpack_from("!BBH", body)
        if proto == ProtocolId.IKE:
            if size != 0 or num != 0 or len(body) != 4:
                raise ParseError("Delete of the IKE SA must carry no SPIs")
            return cls(proto, [])
        if proto not in (ProtocolId.ESP, ProtocolId.AH):
            raise ParseError(f"Delete for unknown protocol {proto}")
        if size != 4:
            raise ParseError(f"Delete SPI size {size}, must be 4 for ESP/AH")
        if len(body) != 4 + size * num:
            raise ParseError("Delete payload length does not match its SPI count")
        return cls(proto, [body[4 + i * size:4 + (i + 1) * size] for i in range(num)])


@dataclass(slots=True)
class VendorID(Payload):
    """Vendor ID payload (§3.12)."""

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.VENDOR_ID
    data: bytes = b""

    def body(self) -> bytes:
        return self.data

    @classmethod
    def from_body(cls, body: bytes) -> "VendorID":
        if not body:
            raise ParseError("empty Vendor ID payload")
        return cls(body)


TS_IPV4_ADDR_RANGE = 7
TS_IPV6_ADDR_RANGE = 8


@dataclass(frozen=True, slots=True)
class TrafficSelector:
    """One traffic selector (§3.13.1): an address range, a port range, an IP protocol."""

    ts_type: int
    start_addr: bytes
    end_addr: bytes
    ip_protocol: int = 0
    start_port: int = 0
    end_port: int = 65535

    @classmethod
    def any(cls, version: int) -> "TrafficSelector":
        """0.0.0.0/0 or ::/0, all protocols and ports (the route-based selector)."""
        if version == 4:
            return cls(TS_IPV4_ADDR_RANGE, bytes(4), b"\xff" * 4)
        return cls(TS_IPV6_ADDR_RANGE, bytes(16), b"\xff" * 16)

    def encode(self) -> bytes:
        length = 8 + 2 * len(self.start_addr)
        return struct.pack("!BBHHH", self.ts_type, self.ip_protocol, length, self.start_port,
                           self.end_port) + self.start_addr + self.end_addr

    def __str__(self) -> str:
        a = ipaddress.ip_address(self.start_addr)
        b = ipaddress.ip_address(self.end_addr)
        nets = list(ipaddress.summarize_address_range(a, b)) if a <= b else []
        addr = str(nets[0]) if len(nets) == 1 else f"{a}-{b}"
        if self.ip_protocol == 0 and (self.start_port, self.end_port) == (0, 65535):
            return addr
        return f"{addr}[{self.ip_protocol}/{self.start_port}-{self.end_port}]"


@dataclass(slots=True)
class _TrafficSelectors(Payload):
    """TSi / TSr payload (§3.13)."""

    selectors: list[TrafficSelector] = field(default_factory=list)

    def body(self) -> bytes:
        return struct.pack("!B3x", len(self.selectors)) + b"".join(s.encode() for s in self.selectors)

    @classmethod
    def from_body(cls, body: bytes):
        if len(body) < 4:
            raise ParseError("TS payload too short")
        count = body[0]
        if count == 0:
            raise ParseError("TS payload with no traffic selectors")
        pos = 4
        out: list[TrafficSelector] = []
        for _ in range(count):
            if len(body) - pos < 8:
                raise ParseError("truncated traffic selector")
            ts_type, proto, slen, sport, eport = struct.unpack_from("!BBHHH", body, pos)
            if ts_type == TS_IPV4_ADDR_RANGE:
                alen = 4
            elif ts_type == TS_IPV6_ADDR_RANGE:
                alen = 16
            else:
                raise ParseError(f"unsupported traffic selector type {ts_type}")
            if slen != 8 + 2 * alen or pos + slen > len(body):
                raise ParseError("traffic selector length wrong for its type")
            start = body[pos + 8:pos + 8 + alen]
            end = body[pos + 8 + alen:pos + 8 + 2 * alen]
            out.append(TrafficSelector(ts_type, start, end, proto, sport, eport))
            pos += slen
        if pos != len(body):
            raise ParseError("data after the last traffic selector")
        return cls(out)


@dataclass(slots=True)
class TSi(_TrafficSelectors):
    PAYLOAD_TYPE: ClassVar[int] = PayloadType.TSi


@dataclass(slots=True)
class TSr(_TrafficSelectors):
    PAYLOAD_TYPE: ClassVar[int] = PayloadType.TSr


@dataclass(slots=True)
class Unknown(Payload):
    """A payload type this codec does not interpret (kept verbatim, with its critical bit)."""

    type_code: int = 0
    is_critical: bool = False
    data: bytes = b""

    @property
    def payload_type(self) -> int:
        return self.type_code

    @property
    def critical(self) -> bool:
        return self.is_critical

    def body(self) -> bytes:
        return self.data


@dataclass(slots=True)
class Encrypted(Payload):
    """An SK payload (§3.14) as received, before decryption.

    `first_inner` is the Next Payload field of the SK payload (the type of the first inner
    payload); `aad_end` and `body_start` are offsets into the raw message.
    """

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.SK
    first_inner: int = 0
    body_start: int = 0


@dataclass(slots=True)
class EncryptedFragment(Encrypted):
    """An Encrypted Fragment payload (SKF, RFC 7383 §2.5) as received: `first_inner` is the
    first inner payload's type in fragment 1 (zero in the others); `body_start` is the IV's
    offset (everything before it, Fragment Number and Total Fragments included, is the AAD)."""

    PAYLOAD_TYPE: ClassVar[int] = PayloadType.SKF
    fragment_number: int = 0
    total_fragments: int = 0


_KNOWN: dict[int, type[Payload]] = {cls.PAYLOAD_TYPE: cls for cls in (
    SA, KE, IDi, IDr, CERT, CERTREQ, AUTH, Nonce, Notify, Delete, VendorID, TSi, TSr)}

# Payload types we recognise but do not interpret (so their critical bit is ignored, §2.5).
_RECOGNISED_OPAQUE = {PayloadType.CP, PayloadType.EAP}


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Header:
    """The IKE header (§3.1)."""

    spi_i: bytes
    spi_r: bytes
    next_payload: int
    major_version: int
    minor_version: int
    exchange_type: int
    flags: int
    message_id: int
    length: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)

    @property
    def is_initiator(self) -> bool:
        return bool(self.flags & FLAG_INITIATOR)


@dataclass(slots=True)
class Message:
    """An IKE message. With `encrypted`, `payloads` travel inside an SK payload."""

    spi_i: bytes
    spi_r: bytes
    exchange_type: int
    message_id: int
    is_response: bool
    is_initiator: bool
    payloads: list[Payload] = field(default_factory=list)
    encrypted: bool = False
    minor_version: int = 0
    #: a received protected message's SK plaintext, the inner payload chain without padding
    #: (RFC 9242 §3.3.2 IntAuth_*_P); not part of eq or repr
    inner: bytes = field(default=b"", compare=False, repr=False)

    # -- convenience accessors ---------------------------------------------------------------
    def get(self, cls: type[Payload]):
        for p in self.payloads:
            if type(p) is cls:
                return p
        return None

    def get_all(self, cls: type[Payload]) -> list:
        return [p for p in self.payloads if type(p) is cls]

    def notify(self, notify_type: int) -> Notify | None:
        for p in self.payloads:
            if isinstance(p, Notify) and p.notify_type == notify_type:
                return p
        return None

    def notifies(self) -> list[Notify]:
        return [p for p in self.payloads if isinstance(p, Notify)]

    def error_notify(self) -> Notify | None:
        for p in self.payloads:
            if isinstance(p, Notify) and p.is_error:
                return p
        return None

    def flags(self) -> int:
        return (FLAG_RESPONSE if self.is_response else 0) | (FLAG_INITIATOR if self.is_initiator else 0)

    def summary(self) -> str:
        """strongSwan-like one-line description, e.g. `IKE_AUTH request 1 [ IDi AUTH SA ]`."""
        names = []
        for p in self.payloads:
            if isinstance(p, Notify):
                names.append(f"N({_enum_name(NotifyType, p.notify_type)})")
            else:
                names.append(_enum_name(PayloadType, p.payload_type))
        inner = " ".join(names)
        if self.encrypted:
            inner = f"SK{{{inner}}}"
        kind = "response" if self.is_response else "request"
        return f"{_enum_name(ExchangeType, self.exchange_type)} {kind} {self.message_id} [ {inner} ]"


def _enum_name(enum: type, value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)


def _encode_chain(payloads: Sequence[Payload], next_after: int = 0) -> tuple[int, bytes]:
    """Encode a payload chain; return (type of the first payload, bytes)."""
    out = []
    types = [p.payload_type for p in payloads]
    types.append(next_after)
    pack = _GENERIC.pack
    for i, p in enumerate(payloads):
        body = p.body()
        length = GENERIC_HEADER_LEN + len(body)
        if length > 0xFFFF:
            raise ValueError(f"payload {types[i]} too long")
        out.append(pack(types[i + 1], 0x80 if p.critical else 0, length))
        out.append(body)
    return types[0], b"".join(out)


_GENERIC = struct.Struct("!BBH")


def _header(msg: Message, next_payload: int, length: int) -> bytes:
    if len(msg.spi_i) != 8 or len(msg.spi_r) != 8:
        raise ValueError("IKE SPIs must be 8 octets")
    return (msg.spi_i + msg.spi_r + struct.pack("!BBBBII", next_payload,
                                                 (IKE_MAJOR_VERSION << 4) | msg.minor_version,
                                                 msg.exchange_type, msg.flags(), msg.message_id,
                                                 length))


def sk_pad(plaintext: bytes, block_size: int) -> bytes:
    """Append §3.14 padding: pad bytes then a Pad Length octet, to a multiple of block_size."""
    bs = max(block_size, 1)
    pad_len = (-(len(plaintext) + 1)) % bs
    return plaintext + bytes(pad_len) + bytes([pad_len])


def encode_message(msg: Message, cipher: SkProtector | None = None, iv: bytes | None = None) -> bytes:
    """Encode `msg`. With `msg.encrypted`, protect the payloads in an SK payload with `cipher`."""
    if not msg.encrypted:
        first, chain = _encode_chain(msg.payloads)
        return _header(msg, first, IKE_HEADER_LEN + len(chain)) + chain
    if cipher is None or iv is None:
        raise ValueError("an encrypted message needs a cipher and an IV")
    if len(iv) != cipher.iv_size:
        raise ValueError("IV of the wrong size for the cipher")
    first, chain = _encode_chain(msg.payloads)
    padded = sk_pad(chain, cipher.block_size)
    sk_len = GENERIC_HEADER_LEN + cipher.iv_size + len(padded) + cipher.icv_size
    total = IKE_HEADER_LEN + sk_len
    aad = _header(msg, PayloadType.SK, total) + struct.pack("!BBH", first, 0, sk_len)
    protected = cipher.encrypt(padded, aad, iv)
    if len(protected) != cipher.iv_size + len(padded) + cipher.icv_size:
        raise ValueError("cipher produced an unexpected length")
    return aad + protected


def datagram_summary(data: bytes) -> str:
    """A one-line description of a received datagram for an error log line, from its header
    only (nothing is decrypted, no key material): e.g. `IKE_AUTH request 1, SPIs
    0123456789abcdef_i 0000000000000000_r, 312 octets`."""
    if len(data) < IKE_HEADER_LEN:
        return f"datagram of {len(data)} octets (no IKE header)"
    xchg, flags = data[18], data[19]
    mid = int.from_bytes(data[20:24], "big")
    kind = "response" if flags & FLAG_RESPONSE else "request"
    return (f"{_enum_name(ExchangeType, xchg)} {kind} {mid}, SPIs {data[0:8].hex()}_i "
            f"{data[8:16].hex()}_r, {len(data)} octets")


def parse_header(data: bytes) -> Header:
    """Parse and check the IKE header (§3.1) against the datagram length."""
    if len(data) < IKE_HEADER_LEN:
        raise ParseError(f"datagram of {len(data)} octets is shorter than the IKE header")
    spi_i = data[0:8]
    spi_r = data[8:16]
    nxt, ver, xchg, flags, mid, length = struct.unpack_from("!BBBBII", data, 16)
    major, minor = ver >> 4, ver & 0x0F
    hdr = Header(spi_i, spi_r, nxt, major, minor, xchg, flags, mid, length)
    if major > IKE_MAJOR_VERSION:
        raise ParseError(f"IKE major version {major} not supported", NotifyType.INVALID_MAJOR_VERSION,
                         bytes([IKE_MAJOR_VERSION << 4]))
    if major < IKE_MAJOR_VERSION:
        raise ParseError(f"IKE major version {major} (IKEv1?) not supported")
    if length != len(data):
        raise ParseError(f"IKE header length {length} but datagram has {len(data)} octets")
    return hdr


def _parse_chain(data: bytes, pos: int, end: int, first: int, *,
                 allow_sk: bool) -> tuple[list[Payload], Encrypted | None]:
    payloads: list[Payload] = []
    nxt = first
    while nxt != 0:
        if pos + GENERIC_HEADER_LEN > end:
            raise ParseError(f"truncated generic payload header (payload type {nxt})")
        this = nxt
        nxt, flags, plen = struct.unpack_from("!BBH", data, pos)
        critical = bool(flags & 0x80)
        if plen < GENERIC_HEADER_LEN or pos + plen > end:
            raise ParseError(f"payload type {this} length {plen} overruns the message")
        body = data[pos + GENERIC_HEADER_LEN:pos + plen]
        if this == PayloadType.SK or this == PayloadType.SKF:
            if not allow_sk:
                raise ParseError(f"{PayloadType(this).name} payload inside an SK payload")
            if pos + plen != end:
                raise ParseError(f"{PayloadType(this).name} payload is not the last payload")
            if this == PayloadType.SKF:
                # RFC 7383 §2.5: Fragment Number and Total Fragments precede the IV; checked
                # (and authenticated) by appliance.ike.fragmentation
                if plen < GENERIC_HEADER_LEN + 4:
                    raise ParseError("SKF payload too short for Fragment Number and Total Fragments")
                num, total = struct.unpack_from("!HH", data, pos + GENERIC_HEADER_LEN)
                return payloads, EncryptedFragment(first_inner=nxt, body_start=pos + GENERIC_HEADER_LEN + 4,
                                                   fragment_number=num, total_fragments=total)
            return payloads, Encrypted(first_inner=nxt, body_start=pos + GENERIC_HEADER_LEN)
        cls = _KNOWN.get(this)
        if cls is not None:
            payloads.append(cls.from_body(body))
        elif this in _RECOGNISED_OPAQUE:
            payloads.append(Unknown(this, False, body))
        else:
            if critical:
                raise ParseError(f"unsupported critical payload type {this}",
                                 NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes([this & 0xFF]))
            payloads.append(Unknown(this, False, body))
        pos += plen
    if pos != end:
        raise ParseError(f"{end - pos} octets after the last payload")
    return payloads, None


def parse_message(data: bytes, hdr: Header | None = None) -> tuple[Message, Encrypted | None]:
    """Parse an IKE message. If it carries an SK payload, the returned Encrypted locates it;
    the message's payloads are then those before SK (normally none): call decrypt_message().
    `hdr` is this very datagram's header if the caller has parsed it already."""
    if hdr is None:
        hdr = parse_header(data)
    payloads, enc = _parse_chain(data, IKE_HEADER_LEN, len(data), hdr.next_payload, allow_sk=True)
    msg = Message(hdr.spi_i, hdr.spi_r, hdr.exchange_type, hdr.message_id, hdr.is_response,
                  hdr.is_initiator, payloads, encrypted=enc is not None, minor_version=hdr.minor_version)
    return msg, enc


def decrypt_message(data: bytes, msg: Message, enc: Encrypted, cipher: SkProtector) -> Message:
    """Verify and decrypt the SK payload of a parsed message; return the message with the inner
    payloads appended.

    Two kinds of failure, kept apart (RFC 7296 §2.21): IntegrityError when the SK payload does
    not verify - too short to hold its IV and ICV, or a wrong ICV: anyone can send that, it is
    not from the peer; AuthenticParseError when it verified but the plaintext is malformed."""
    inner = open_sk(data, enc.body_start, cipher)
    payloads = parse_inner(inner, enc.first_inner)
    return Message(msg.spi_i, msg.spi_r, msg.exchange_type, msg.message_id, msg.is_response,
                   msg.is_initiator, list(msg.payloads) + payloads, encrypted=True,
                   minor_version=msg.minor_version, inner=inner)


def open_sk(data: bytes, body_start: int, cipher: SkProtector) -> bytes:
    """Verify and decrypt the IV | ciphertext | ICV at `body_start` (everything before it is
    the AAD, §3.14; RFC 7383 §2.5 for SKF) and strip the padding: the inner payload octets.
    IntegrityError unless the ICV verified; AuthenticParseError for bad padding after that."""
    body = data[body_start:]
    if len(body) < cipher.iv_size + cipher.icv_size:
        raise IntegrityError(f"SK payload of {len(body)} octets cannot hold its "
                             f"{cipher.iv_size}-octet IV and {cipher.icv_size}-octet ICV")
    plaintext = cipher.decrypt(body, data[:body_start])   # IntegrityError unless verified
    # authentic from here on
    if not plaintext:
        raise AuthenticParseError("empty SK plaintext (no Pad Length octet)")
    pad_len = plaintext[-1]
    if pad_len + 1 > len(plaintext):
        raise AuthenticParseError("SK pad length exceeds the plaintext")
    return plaintext[:len(plaintext) - pad_len - 1]


def parse_inner(inner: bytes, first: int) -> list[Payload]:
    """The payload chain of authentic plaintext (AuthenticParseError if malformed)."""
    try:
        payloads, _ = _parse_chain(inner, 0, len(inner), first, allow_sk=False)
    except ParseError as e:
        raise AuthenticParseError(e.reason, e.notify, e.notify_data) from None
    return payloads
