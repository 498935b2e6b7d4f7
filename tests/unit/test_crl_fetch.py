"""The daemon's CRL distribution point fetcher (appliance/crl_fetch.py) against a real HTTP
server on loopback: fetched and cached, bounded in time and size, junk refused, failures cached."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from appliance.crl_fetch import CrlFetcher
from tests.peers.certs import TestPKI


class _Server:
    def __init__(self, routes: dict[str, bytes]) -> None:
        self.routes = routes
        self.hits: dict[str, int] = {}
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                if self.path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        for _ in range(100):       # a trickle: one byte every 0.1 s
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.1)
                    except OSError:
                        pass
                    return
                body = outer.routes.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def pki():
    p = TestPKI("ecdsa")
    p.revoke(p.issue("x.example.net"))
    return p


@pytest.fixture
def server(pki):
    s = _Server({"/i.crl": pki.crl_der(), "/i.pem": pki.crl_pem(), "/junk": b"not a CRL",
                 "/big": b"0" * 5000})
    yield s
    s.close()


def test_fetch_der_and_pem_and_cache(server, pki):
    f = CrlFetcher(timeout=2)
    for path in ("/i.crl", "/i.pem"):
        crl = f.get(server.url(path))
        assert crl is not None and crl.issuer == pki.intermediate.subject and len(crl) == 1
    assert f.get(server.url("/i.crl")) is not None
    assert server.hits["/i.crl"] == 1 and f.fetches == 2      # the second get came from the cache


def test_cache_expires_and_refetches(server):
    t = [0.0]
    f = CrlFetcher(timeout=2, min_refresh=10, max_refresh=10, clock=lambda: t[0])
    f.get(server.url("/i.crl"))
    t[0] = 11.0
    f.get(server.url("/i.crl"))
    assert server.hits["/i.crl"] == 2


def test_junk_missing_too_big_and_unsupported_fail_and_are_cached(server, caplog):
    f = CrlFetcher(timeout=2, max_bytes=1000)
    assert f.get(server.url("/junk")) is None
    assert f.get(server.url("/nothing")) is None
    assert f.get(server.url("/big")) is None
    assert f.get("ldap://ldap.example/cn=crl") is None
    assert f.cached(server.url("/junk")).error == "the answer is not a PEM or DER X.509 CRL"
    assert "larger than 1000 bytes" in f.cached(server.url("/big")).error
    assert "only http://" in f.cached("ldap://ldap.example/cn=crl").error
    assert f.get(server.url("/junk")) is None and server.hits["/junk"] == 1   # failure cached


def test_a_trickling_server_is_cut_off_in_bounded_time(server):
    f = CrlFetcher(timeout=1.0)
    t0 = time.monotonic()
    assert f.get(server.url("/slow")) is None
    took = time.monotonic() - t0
    assert took < 1.6, took
    assert "longer than 1 s" in f.cached(server.url("/slow")).error


def test_unreachable_is_bounded(pki):
    f = CrlFetcher(timeout=0.5)
    t0 = time.monotonic()
    assert f.get("http://127.0.0.1:9/none.crl") is None      # nothing listens on the discard port
    assert time.monotonic() - t0 < 1.0
