"""IKE fragmentation (RFC 7383): IKEV2_FRAGMENTATION_SUPPORTED, Encrypted Fragment payloads (SKF).

Negotiation (§2.3): the initiator announces IKEV2_FRAGMENTATION_SUPPORTED in its IKE_SA_INIT
request when its tunnel enables fragmentation; the responder answers with it only when the
request carried it and its own tunnel enables it. Support is a property of the IKE SA and is
inherited by the IKE SA that rekeys it.

Sending (§2.5): only protected messages (IKE_AUTH and later; never IKE_SA_INIT) are
fragmented, and only when both sides announced support, our tunnel enables it and the
ordinary SK message would make an IP datagram larger than the fragment size of the SA's
address family (IP and UDP headers and the non-ESP marker on port 4500 included, as
strongSwan counts). The payload chain is cut into pieces; each becomes an SKF payload with
its own IV, padding and ICV; the AAD of each is its own IKE header and the SKF header up to
Total Fragments; fragment 1 names the first inner payload, the others carry 0. A request's
retransmission and a cached response resend every fragment (§2.5.3 — the sender keeps the
fragments it sent: no re-encryption on retransmit).

Receiving (§2.6): a fragment is handled only once it passes the message-ID window (a new
request, the cached response's request, the pending request's response); Fragment Number and
Total Fragments are checked; then its ICV is verified and only then does it touch the
reassembly state: a forged fragment is dropped like a forged SK message and never occupies
memory nor resets or completes a set. Per IKE SA there is one half-finished set per direction
(requests, responses), bounded by `FragmentationConfig.max_fragments` and `.max_message`
(plaintext octets) and dropped after `.reassembly_timeout` (engine time `now`; the SA's timer
covers it) or when a fragment of another message ID arrives. Duplicates are ignored. §2.6.1:
a fragment with a larger Total Fragments than the stored set replaces the set (the sender
re-fragmented smaller), one with a smaller Total Fragments is dropped. A fragment of a request
already answered triggers the cached response only when it is fragment 1 (and verified).
A fragment arriving on an SA that did not announce support is dropped.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.ike.constants import ExchangeType, NotifyType, PayloadType
from appliance.ike.message import (
    GENERIC_HEADER_LEN,
    IKE_HEADER_LEN,
    EncryptedFragment,
    Header,
    Message,
    Notify,
    SkProtector,
    _encode_chain,
    _header,
    open_sk,
    parse_inner,
    sk_pad,
)
from appliance.ike.policy import FragmentationConfig

if TYPE_CHECKING:
    from appliance.ike.sa import IkeSa

log = logging.getLogger("isthmus.ike")

SKF_HEADER_LEN = GENERIC_HEADER_LEN + 4      # + Fragment Number, Total Fragments
IP_HEADER_LEN = {4: 20, 6: 40}
UDP_HEADER_LEN = 8
NON_ESP_MARKER_LEN = 4
IKE_PORT = 500
IKE_NATT_PORT = 4500


# ------------------------------------------------------------------------ negotiation (§2.3)

def _config(sa: "IkeSa") -> FragmentationConfig:
    cfg = sa.config or (sa.candidates[0] if sa.candidates else None)
    return cfg.fragmentation if cfg is not None else FragmentationConfig()


def request_notifies(sa: "IkeSa") -> list[Notify]:
    """Initiator: what to add to the IKE_SA_INIT request (and remember that we announced)."""
    if not _config(sa).enabled:
        sa.frag_ours = False
        return []
    sa.frag_ours = True
    return [Notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)]


def initiator_response(sa: "IkeSa", msg: Message) -> None:
    """Initiator: the IKE_SA_INIT response arrived."""
    sa.frag_peer = msg.notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None


def response_notifies(sa: "IkeSa", request: Message) -> list[Notify]:
    """Responder: what to add to the IKE_SA_INIT response."""
    sa.frag_peer = request.notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    sa.frag_ours = sa.frag_peer and _config(sa).enabled
    return [Notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)] if sa.frag_ours else []


def inherit(new: "IkeSa", old: "IkeSa") -> None:
    """An IKE SA rekey (§2.18) keeps what IKE_SA_INIT negotiated."""
    new.frag_ours, new.frag_peer = old.frag_ours, old.frag_peer


# ------------------------------------------------------------------------ sending (§2.5)

def overhead(local: tuple[str, int], remote: tuple[str, int]) -> int:
    """Octets of IP and UDP header (and non-ESP marker) around an IKE message."""
    n = IP_HEADER_LEN[6 if ":" in remote[0] else 4] + UDP_HEADER_LEN
    # the marker is there on port 4500; strongSwan counts it whenever neither port is 500
    if IKE_NATT_PORT in (local[1], remote[1]) or IKE_PORT not in (local[1], remote[1]):
        n += NON_ESP_MARKER_LEN
    return n


def max_message_len(sa: "IkeSa") -> int:
    """The largest IKE message (header included) one datagram of this SA may carry."""
    return _config(sa).size_for(sa.remote[0]) - overhead(sa.local, sa.remote)


def unanswered_hint(sa: "IkeSa", sent_len: int) -> str:
    """Why an IKE_AUTH request may have gone unanswered, for the failure's reason: it went as
    one datagram larger than a fragment, i.e. in IP fragments, which some paths drop (§1)."""
    if sa.frag_ours and sa.frag_peer:
        return ""
    limit = max_message_len(sa)
    if sent_len <= limit:
        return ""
    why = "off here" if not _config(sa).enabled else "not supported by the peer"
    return (f" (it went as one {sent_len}-octet message, larger than {limit}, so in IP fragments: IKE "
            f"fragmentation (RFC 7383) is {why}; a path that drops IP fragments loses it)")


def half_open_hint(sa: "IkeSa") -> str:
    """For a responder whose IKE_AUTH never came: the peer offered fragmentation and we did not."""
    if sa.frag_peer and not sa.frag_ours:
        return (" (the peer supports IKE fragmentation, RFC 7383, but it is off here: a large IKE_AUTH "
                "over a path that drops IP fragments never arrives)")
    return ""


def content_per_fragment(limit: int, cipher: SkProtector) -> int:
    """Inner payload octets one fragment of at most `limit` octets can hold."""
    room = limit - IKE_HEADER_LEN - SKF_HEADER_LEN - cipher.iv_size - cipher.icv_size
    bs = max(cipher.block_size, 1)
    return room - room % bs - 1     # at least one octet of padding: the Pad Length


def encode_fragments(msg: Message, cipher: SkProtector, random, limit: int) -> list[bytes]:
    """`msg` as SKF fragments of at most `limit` octets each (§2.5); `random(n)` gives IVs."""
    first, chain = _encode_chain(msg.payloads)
    per = content_per_fragment(limit, cipher)
    if per < 1:
        raise ValueError(f"fragment size leaves no room for content ({limit} octets)")
    pieces = [chain[i:i + per] for i in range(0, len(chain), per)] or [b""]
    total = len(pieces)
    if total > 0xFFFF:
        raise ValueError("message needs more than 65535 fragments")
    out = []
    for number, piece in enumerate(pieces, 1):
        padded = sk_pad(piece, cipher.block_size)
        skf_len = SKF_HEADER_LEN + cipher.iv_size + len(padded) + cipher.icv_size
        length = IKE_HEADER_LEN + skf_len
        aad = (_header(msg, PayloadType.SKF, length)
               + struct.pack("!BBHHH", first if number == 1 else 0, 0, skf_len, number, total))
        protected = cipher.encrypt(padded, aad, random(cipher.iv_size))
        out.append(aad + protected)
    return out


def encode(sa: "IkeSa", msg: Message, whole: bytes) -> list[bytes]:
    """The datagrams that carry `msg`, whose ordinary encoding is `whole`: `[whole]` unless it
    is to be fragmented."""
    if (not msg.encrypted or msg.exchange_type == ExchangeType.IKE_SA_INIT
            or not (sa.frag_ours and sa.frag_peer) or not _config(sa).enabled
            or sa.cipher_out is None):
        return [whole]
    limit = max_message_len(sa)
    if len(whole) <= limit:
        return [whole]
    frags = encode_fragments(msg, sa.cipher_out, sa.random, limit)
    log.debug("%s: %s of %d octets sent as %d fragments of at most %d octets", sa,
              "response" if msg.is_response else "request", len(whole), len(frags), limit)
    return frags


# ------------------------------------------------------------------------ receiving (§2.6)

@dataclass
class _Partial:
    """A half-finished set: verified, decrypted pieces of one message."""

    message_id: int
    total: int
    started: float
    first_inner: int = 0
    pieces: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembly:
    """Reassembly state of one IKE SA: at most one set per direction."""

    __slots__ = ("request", "response")

    def __init__(self) -> None:
        self.request: _Partial | None = None
        self.response: _Partial | None = None

    def deadline(self, timeout: float) -> float | None:
        times = [p.started + timeout for p in (self.request, self.response) if p is not None]
        return min(times) if times else None

    def octets(self) -> int:
        return sum(p.size for p in (self.request, self.response) if p is not None)


def next_timer(sa: "IkeSa") -> float | None:
    r = sa.reassembly
    return r.deadline(_config(sa).reassembly_timeout) if r is not None else None


def expire(sa: "IkeSa", now: float) -> None:
    """Drop sets older than the reassembly timeout."""
    r = sa.reassembly
    if r is None:
        return
    timeout = _config(sa).reassembly_timeout
    for slot in ("request", "response"):
        p = getattr(r, slot)
        if p is not None and now >= p.started + timeout:
            log.info("%s: %s %d: %d of %d fragments in %g s; discarded", sa, slot, p.message_id,
                     len(p.pieces), p.total, timeout)
            setattr(r, slot, None)
    if r.request is None and r.response is None:
        sa.reassembly = None


def forget(sa: "IkeSa", hdr: Header) -> None:
    """An authentic unfragmented message arrived: a set of the same direction with its
    message ID or an older one will never be needed."""
    r = sa.reassembly
    if r is None:
        return
    slot = "response" if hdr.is_response else "request"
    p = getattr(r, slot)
    if p is not None and (hdr.message_id - p.message_id) & 0xFFFFFFFF < 0x80000000:
        setattr(r, slot, None)
        if r.request is None and r.response is None:
            sa.reassembly = None


def receive(sa: "IkeSa", data: bytes, hdr: Header, outer: Message, enc: EncryptedFragment,
            now: float) -> Message | None:
    """One SKF datagram that passed IkeSa's message-ID window. Returns the whole message once
    the set is complete (`outer` itself, payload-less, for fragment 1 of a request already
    answered, so IkeSa answers it from its cache), else None. Raises crypto.IntegrityError
    for a fragment that does not verify and AuthenticParseError for a complete set whose
    plaintext is malformed, as decrypt_message does."""
    num, total = enc.fragment_number, enc.total_fragments
    what = f"fragment {num}/{total} of {'response' if hdr.is_response else 'request'} {hdr.message_id}"
    cfg = _config(sa)
    if not sa.frag_ours or hdr.exchange_type == ExchangeType.IKE_SA_INIT:
        log.info("%s: dropping %s: fragmentation was not negotiated", sa, what)
        return None
    if num == 0 or total == 0 or num > total:
        log.debug("%s: dropping %s: invalid Fragment Number / Total Fragments", sa, what)
        return None
    if total > cfg.max_fragments:
        log.info("%s: dropping %s: more than %d fragments", sa, what, cfg.max_fragments)
        return None
    old_request = not hdr.is_response and hdr.message_id != sa.peer_mid
    r = sa.reassembly
    slot = "response" if hdr.is_response else "request"
    part = getattr(r, slot) if r is not None and not old_request else None
    if (part is not None and part.message_id == hdr.message_id and part.total == total
            and num in part.pieces and now < part.started + cfg.reassembly_timeout):
        log.debug("%s: duplicate %s ignored", sa, what)
        return None      # nothing would change: not even worth the ICV
    cipher = sa.cipher_in
    if old_request and sa.cipher_in_prev is not None:
        cipher = sa.cipher_in_prev     # keys updated since we answered it (intermediate.py)
    piece = open_sk(data, enc.body_start, cipher)   # IntegrityError unless authentic
    # authentic from here on
    if old_request:
        # §2.6.1: only fragment 1 of a retransmitted request triggers the cached response
        return outer if num == 1 else None
    if r is None:
        r = sa.reassembly = Reassembly()
    if part is not None and (part.message_id != hdr.message_id
                             or now >= part.started + cfg.reassembly_timeout):
        log.debug("%s: discarding the unfinished set of %s %d", sa, slot, part.message_id)
        part = None
    if part is not None and total < part.total:
        log.debug("%s: dropping %s: the set being reassembled has %d fragments", sa, what, part.total)
        return None
    if part is not None and total > part.total:
        log.debug("%s: %s: the peer re-fragmented; starting the set again", sa, what)
        part = None
    if part is None:
        part = _Partial(hdr.message_id, total, now)
        setattr(r, slot, part)
    if num in part.pieces:
        return None
    if part.size + len(piece) > cfg.max_message:
        log.info("%s: %s: reassembled message would exceed %d octets; set discarded", sa, what,
                 cfg.max_message)
        setattr(r, slot, None)
        return None
    part.pieces[num] = piece
    part.size += len(piece)
    if num == 1:
        part.first_inner = enc.first_inner
    if len(part.pieces) < part.total:
        return None
    setattr(r, slot, None)
    if r.request is None and r.response is None:
        sa.reassembly = None
    inner = b"".join(part.pieces[i] for i in range(1, part.total + 1))
    payloads = parse_inner(inner, part.first_inner)   # AuthenticParseError if malformed
    log.debug("%s: %s %d reassembled from %d fragments (%d octets)", sa, slot, hdr.message_id,
              total, len(inner))
    return Message(outer.spi_i, outer.spi_r, outer.exchange_type, outer.message_id,
                   outer.is_response, outer.is_initiator, list(outer.payloads) + payloads,
                   encrypted=True, minor_version=outer.minor_version, inner=inner)
