"""Fetching CRLs from the distribution points of peers' certificates (RFC 5280 §4.2.1.13), for
the sans-IO IKE engine: the engine notes the URLs of every chain it validates
(`IkeEngine.take_crl_urls`), `isthmusd` fetches them here in a worker thread and hands the CRLs
back (`IkeEngine.add_crl`), which revokes running IKE SAs and refuses later authentications.

Bounded: one fetch takes at most `timeout` seconds in all (connect + every read, checked against
a deadline) and `max_bytes` of body; only http:// and https:// URLs; a CRL is cached until its
nextUpdate (at least `min_refresh`, at most `max_refresh` seconds), a failure for `retry_after`
seconds, and the cache holds at most `max_entries` URLs. A body that is not a PEM or DER CRL is a
failure. Nothing here decides trust: the engine checks each CRL's signature against the issuer
in the validated chain.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from cryptography import x509

log = logging.getLogger("isthmus.crl")


@dataclass
class _Entry:
    crl: x509.CertificateRevocationList | None
    expires: float          # time.monotonic() after which it is fetched again
    error: str | None = None


class CrlFetcher:
    """A small cache of fetched CRLs by URL. `get(url)` blocks for at most `timeout` seconds
    (call it from a worker thread); thread-safe."""

    def __init__(self, *, timeout: float = 5.0, max_bytes: int = 1 << 20, min_refresh: float = 300.0,
                 max_refresh: float = 86400.0, retry_after: float = 300.0, max_entries: int = 128,
                 clock: Callable[[], float] = time.monotonic,
                 opener: Callable[..., object] | None = None) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.min_refresh = min_refresh
        self.max_refresh = max_refresh
        self.retry_after = retry_after
        self.max_entries = max_entries
        self.clock = clock
        self._open = opener or urllib.request.build_opener(urllib.request.HTTPRedirectHandler()).open
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.fetches = 0        # network fetches made (tests, metrics)

    def cached(self, url: str) -> _Entry | None:
        with self._lock:
            e = self._cache.get(url)
            if e is not None and self.clock() < e.expires:
                return e
        return None

    def get(self, url: str) -> x509.CertificateRevocationList | None:
        """The CRL at `url` (cached), or None when it cannot be had now (the reason is logged)."""
        e = self.cached(url)
        if e is not None:
            return e.crl
        try:
            crl = self._fetch(url)
        except _FetchError as exc:
            log.warning("CRL %s not fetched: %s", url, exc.reason)
            self._store(url, _Entry(None, self.clock() + self.retry_after, exc.reason))
            return None
        nu = crl.next_update_utc
        left = (nu - dt.datetime.now(dt.timezone.utc)).total_seconds() if nu is not None else self.max_refresh
        self._store(url, _Entry(crl, self.clock() + min(self.max_refresh, max(self.min_refresh, left))))
        log.info("CRL %s fetched: issuer %s, %d revoked", url, crl.issuer.rfc4514_string(), len(crl))
        return crl

    def _store(self, url: str, e: _Entry) -> None:
        with self._lock:
            self._cache[url] = e
            self._cache.move_to_end(url)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)

    def _fetch(self, url: str) -> x509.CertificateRevocationList:
        if not url.lower().startswith(("http://", "https://")):
            raise _FetchError("only http:// and https:// distribution points are fetched")
        self.fetches += 1
        deadline = self.clock() + self.timeout
        try:
            resp = self._open(urllib.request.Request(url, headers={"User-Agent": "isthmus-crl"}),
                              timeout=self.timeout)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise _FetchError(f"cannot open: {getattr(e, 'reason', e)}") from None
        try:
            status = getattr(resp, "status", 200)
            if status != 200:
                raise _FetchError(f"HTTP status {status}")
            body = bytearray()
            while True:
                left = deadline - self.clock()
                if left <= 0:
                    raise _FetchError(f"took longer than {self.timeout:g} s")
                sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
                if sock is not None:
                    sock.settimeout(max(0.01, left))
                want = min(65536, self.max_bytes + 1 - len(body))
                read1 = getattr(resp, "read1", None)     # returns what has arrived, not `want`
                chunk = read1(want) if read1 is not None else resp.read(want)
                if not chunk:
                    break
                body += chunk
                if len(body) > self.max_bytes:
                    raise _FetchError(f"larger than {self.max_bytes} bytes")
        except TimeoutError:
            raise _FetchError(f"took longer than {self.timeout:g} s") from None
        except (OSError, ValueError) as e:
            raise _FetchError(f"read failed: {e}") from None
        finally:
            try:
                resp.close()
            except OSError:
                pass
        data = bytes(body)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_crl(data)
            return x509.load_der_x509_crl(data)
        except ValueError:
            raise _FetchError("the answer is not a PEM or DER X.509 CRL") from None


class _FetchError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
