"""Informational messages outside of an IKE SA (RFC 7296 §1.5): INVALID_IKE_SPI.

An encrypted IKE request (its first payload SK or SKF, any exchange but IKE_SA_INIT) whose SPI
names no IKE SA of ours (we restarted and lost state, or someone probes) MAY be answered with
an unprotected INVALID_IKE_SPI notify, so the sender learns early that its SA is gone. The
answer is a response: the IKE SPIs, exchange type and Message ID copied from the request, the
Response flag set, the Initiator flag ours (§1.5). Nothing is kept. Responses are never
answered (a message loop, §1.5), nor anything unencrypted.

Anyone can send such requests from forged addresses, so the answers are rate-limited
engine-wide: a token bucket of `DosProtection.invalid_ike_spi_rate` answers per second (burst
the same), None never answers. The rest are dropped silently, as before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from appliance.ike.constants import ExchangeType, NotifyType, PayloadType
from appliance.ike.message import Header, Message, Notify, encode_message

if TYPE_CHECKING:
    from appliance.ike.engine import Endpoint, IkeEngine

log = logging.getLogger("isthmus.ike")

_ENCRYPTED = (PayloadType.SK, PayloadType.SKF)


class RateLimit:
    """A token bucket: `rate` tokens per second, at most `rate` (at least 1) saved up."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.at: float | None = None

    def take(self, rate: float, now: float) -> bool:
        burst = max(1.0, rate)
        if self.at is None:
            self.tokens = burst
        else:
            self.tokens = min(burst, self.tokens + max(0.0, now - self.at) * rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def unknown_spi(engine: "IkeEngine", hdr: Header, src: "Endpoint", dst: "Endpoint", now: float) -> None:
    """A datagram routed to no IKE SA: answer it with INVALID_IKE_SPI if it is an encrypted
    request and the rate limit allows, else drop it (the caller logged it)."""
    if hdr.is_response or hdr.next_payload not in _ENCRYPTED or hdr.exchange_type == ExchangeType.IKE_SA_INIT:
        return
    rate = engine.dos.invalid_ike_spi_rate
    counters = engine.dos_counters
    if rate is None:
        return
    if not engine.invalid_ike_spi_limit.take(rate, now):
        counters["invalid_ike_spi_limited"] += 1
        return
    counters["invalid_ike_spi_sent"] += 1
    msg = Message(hdr.spi_i, hdr.spi_r, hdr.exchange_type, hdr.message_id, True, not hdr.is_initiator,
                  [Notify(NotifyType.INVALID_IKE_SPI)])
    engine.send(encode_message(msg), dst, src)


class LogLimit:
    """Log lines about unauthenticated input that is dropped or refused before any state (an
    IKE_SA_INIT matching no tunnel, malformed, with no acceptable proposal...): anyone can
    send those from forged addresses as fast as the link goes, so at most `rate` lines per
    second (burst the same) get through; the next one that does says how many were left out."""

    def __init__(self, rate: float = 5.0) -> None:
        self.rate = rate
        self.bucket = RateLimit()
        self.left_out = 0

    def info(self, now: float, fmt: str, *args) -> None:
        if not self.bucket.take(self.rate, now):
            self.left_out += 1
            return
        if self.left_out:
            fmt += " (%d similar lines left out)"
            args += (self.left_out,)
            self.left_out = 0
        log.info(fmt, *args)
