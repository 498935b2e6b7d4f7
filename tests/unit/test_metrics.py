"""Prometheus text exposition (format 0.0.4): rendered output parsed back with a parser written
from the format's grammar, and the HTTP endpoint over a real socket on 127.0.0.1."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import threading
import urllib.error
import urllib.request

import pytest

from appliance import __version__
from appliance.metrics import (CONTENT_TYPE, Counter, IsthmusMetrics, MetricsServer, Registry, escape_label_value,
                               format_value, parse_listen)

# ----------------------------------------------------------------------------- a parser from the spec
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
VALUE = r"[+-]?(?:Inf|NaN|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+\.)"
SAMPLE = re.compile(rf"({NAME})(?:\{{(.*)\}})? ({VALUE})(?: (-?[0-9]+))?\Z")
LABEL_PAIR = re.compile(rf'({LABEL})="((?:[^"\\\n]|\\[\\"n])*)"(,|\Z)')


def unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"\\": "\\", '"': '"', "n": "\n"}[m.group(1)], s)


def parse_exposition(text: str) -> dict:
    """{family: {"help", "type", "samples": {(name, ((label, value), ...)): float}}}.

    Enforces: every line ends in LF; HELP/TYPE at most once per family and TYPE before its
    samples; a family's samples are contiguous; no duplicate series; label names unique."""
    assert text == "" or text.endswith("\n"), "the last line must end with a line feed"
    families: dict = {}
    current = None
    closed: set = set()
    for line in text[:-1].split("\n") if text else []:
        if line.startswith("#"):
            m = re.match(rf"# (HELP|TYPE) ({NAME}) ?(.*)\Z", line)
            if not m:
                continue  # a plain comment
            kind, name, rest = m.groups()
            fam = families.setdefault(name, {"help": None, "type": None, "samples": {}})
            assert name not in closed, f"{name}: metadata after its samples ended"
            if kind == "HELP":
                assert fam["help"] is None, f"second HELP for {name}"
                assert re.fullmatch(r"(?:[^\\\n]|\\[\\n])*", rest), "bad escape in HELP"
                fam["help"] = re.sub(r"\\(.)", lambda mm: {"\\": "\\", "n": "\n"}[mm.group(1)], rest)
            else:
                assert fam["type"] is None and not fam["samples"], f"TYPE for {name} twice or after samples"
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), rest
                fam["type"] = rest
            if current is not None and current != name:
                closed.add(current)
            current = name
            continue
        assert line.strip(), "blank line"
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels_text, value, _ts = m.groups()
        labels = []
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = LABEL_PAIR.match(labels_text, pos)
                assert lm, f"bad label set at {labels_text[pos:]!r}"
                labels.append((lm.group(1), unescape(lm.group(2))))
                pos = lm.end()
        assert len({k for k, _ in labels}) == len(labels), "duplicate label name"
        fam_name = name
        if fam_name not in families:
            fam_name = re.sub(r"_(bucket|sum|count)\Z", "", name)
        fam = families.setdefault(fam_name, {"help": None, "type": None, "samples": {}})
        assert fam_name not in closed, f"samples of {fam_name} not contiguous"
        if current is not None and current != fam_name:
            closed.add(current)
        current = fam_name
        key = (name, tuple(sorted(labels)))
        assert key not in fam["samples"], f"duplicate series {key}"
        fam["samples"][key] = float(value.replace("Inf", "inf").replace("NaN", "nan"))
    return families


def sample(fams: dict, name: str, **labels) -> float:
    return fams[name]["samples"][(name, tuple(sorted(labels.items())))]


# ----------------------------------------------------------------------------- registry and format
def test_render_parses_back():
    r = Registry()
    c = r.counter("x_requests_total", "Requests.", ["method"])
    g = r.gauge("x_temp", "Temperature\nin C, with a back\\slash.")
    u = r.counter("x_plain_total", "Never touched.")
    empty = r.gauge("x_labelled_empty", "No series yet.", ["a"])
    c.inc(method="get")
    c.inc(2.5, method="get")
    c.inc(method="post")
    g.set(-3.25)
    fams = parse_exposition(r.render())
    assert fams["x_requests_total"]["type"] == "counter"
    assert sample(fams, "x_requests_total", method="get") == 3.5
    assert sample(fams, "x_requests_total", method="post") == 1
    assert fams["x_temp"]["help"] == "Temperature\nin C, with a back\\slash."
    assert sample(fams, "x_temp") == -3.25
    assert sample(fams, "x_plain_total") == 0  # unlabelled: exported as 0 from the start
    assert fams["x_labelled_empty"]["samples"] == {} and fams["x_labelled_empty"]["type"] == "gauge"
    assert u.get() is None and empty.get(a="z") is None


@pytest.mark.parametrize("value", ['plain', 'back\\slash', 'quo"te', 'new\nline', '\\n literal', 'ünï ☃',
                                   '', '"\\"\n', 'a,b=c}{'])
def test_label_value_escaping_round_trip(value):
    r = Registry()
    g = r.gauge("x_g", "g", ["v", "w"])
    g.set(1, v=value, w="x")
    text = r.render()
    sample_lines = [ln for ln in text.split("\n") if ln.startswith("x_g{")]
    assert len(sample_lines) == 1  # a newline in a value never splits the line
    assert sample(parse_exposition(text), "x_g", v=value, w="x") == 1


def test_escape_functions():
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


@pytest.mark.parametrize("value, text", [(0, "0"), (7, "7"), (2 ** 64, "18446744073709551616"), (1.5, "1.5"),
                                         (3.0, "3"), (1e20, "1e+20"), (-0.001, "-0.001"),
                                         (math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN")])
def test_values(value, text):
    assert format_value(value) == text
    r = Registry()
    r.gauge("x_v", "v").set(value)
    got = sample(parse_exposition(r.render()), "x_v")
    assert (math.isnan(got) and math.isnan(value)) or got == float(value)


def test_hidden_until_set():
    r = Registry()
    m = IsthmusMetrics(r)
    fams = parse_exposition(r.render())
    assert not any(n.startswith("isthmus_bgp_") for n in fams)
    m.bgp_session_up.set(1, tunnel="to-b", peer="169.254.21.2")
    fams = parse_exposition(r.render())
    assert sample(fams, "isthmus_bgp_session_up", tunnel="to-b", peer="169.254.21.2") == 1
    assert "isthmus_bgp_prefixes_received" not in fams
    m.bgp_session_up.clear()
    assert "isthmus_bgp_session_up" not in parse_exposition(r.render())


def test_misuse_is_refused():
    r = Registry()
    c = r.counter("x_total", "c", ["tunnel"])
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, tunnel="a")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(spi="1")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc()
    with pytest.raises(TypeError):
        c.inc(tunnel=b"raw")  # bytes never become a label
    with pytest.raises(TypeError):
        c.inc("1", tunnel="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        r.gauge("x_total", "again")
    for bad in ("1abc", "a-b", "", "a b"):
        with pytest.raises(ValueError, match="metric name"):
            Counter(bad, "h")
    for bad in ("__x", "1a", "a-b", "value", "amount"):
        with pytest.raises(ValueError, match="label name"):
            Counter("ok", "h", [bad])


def test_isthmus_families():
    r = Registry()
    m = IsthmusMetrics(r)
    m.set_sa_states(ike={"established": 2, "connecting": 1}, child={"installed": 3}, half_open=1)
    m.set_sa_states(ike={"established": 2}, child={"installed": 2}, half_open=0)  # stale states dropped
    m.set_sa_traffic("to-b", spi_in=0xC1A2B3C4, spi_out=0xABCD, bytes_in=1500, bytes_out=900,
                     packets_in=12, packets_out=9)
    m.set_sa_traffic("to-c", spi_in=1, spi_out=2, bytes_in=0, bytes_out=0, packets_in=0, packets_out=0)
    m.rekeys.inc(tunnel="to-b", kind="child")
    m.rekeys.inc(tunnel="to-b", kind="ike")
    m.dpd_failures.inc(tunnel="to-c")
    m.auth_failures.inc(tunnel="")
    m.tunnel_up.set(1, tunnel="to-b")
    m.set_dos({"cookies_sent": 7, "refused_global": 2, "invalid_ike_spi_sent": 0}, True)
    fams = parse_exposition(r.render())
    assert sample(fams, "isthmus_ike_cookies_required") == 1
    assert sample(fams, "isthmus_ike_unauthenticated_requests_total", action="cookie_sent") == 7
    assert sample(fams, "isthmus_ike_unauthenticated_requests_total", action="refused_global") == 2
    assert sample(fams, "isthmus_build_info", version=__version__) == 1
    assert fams["isthmus_ike_sas"]["samples"] == {("isthmus_ike_sas", (("state", "established"),)): 2}
    assert sample(fams, "isthmus_child_sas", state="installed") == 2
    assert sample(fams, "isthmus_half_open_ike_sas") == 0
    assert sample(fams, "isthmus_child_sa_bytes_total", tunnel="to-b", spi="0xc1a2b3c4", direction="in") == 1500
    assert sample(fams, "isthmus_child_sa_packets_total", tunnel="to-b", spi="0x0000abcd", direction="out") == 9
    assert sample(fams, "isthmus_rekeys_total", tunnel="to-b", kind="ike") == 1
    assert sample(fams, "isthmus_dpd_failures_total", tunnel="to-c") == 1
    assert sample(fams, "isthmus_auth_failures_total", tunnel="") == 1
    for name in ("isthmus_child_sa_bytes_total", "isthmus_rekeys_total", "isthmus_dpd_failures_total",
                 "isthmus_auth_failures_total"):
        assert fams[name]["type"] == "counter" and fams[name]["help"]
    m.forget_sa("to-b", 0xC1A2B3C4, 0xABCD)
    fams = parse_exposition(r.render())
    assert {dict(k[1])["tunnel"] for k in fams["isthmus_child_sa_bytes_total"]["samples"]} == {"to-c"}
    m.forget_tunnel("to-c")
    fams = parse_exposition(r.render())
    assert fams["isthmus_child_sa_bytes_total"]["samples"] == {}
    assert fams["isthmus_dpd_failures_total"]["samples"] == {}
    assert sample(fams, "isthmus_rekeys_total", tunnel="to-b", kind="child") == 1


def test_parse_listen():
    assert parse_listen("127.0.0.1:9477") == ("127.0.0.1", 9477)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    assert parse_listen("9100") == ("127.0.0.1", 9100)
    assert parse_listen("off") is None
    for bad in ("localhost:9477", "1.2.3.4:0", "1.2.3.4:x", "[::1]9100", "1.2.3.4:70000"):
        with pytest.raises(ValueError, match="allowed|port|IPV6"):
            parse_listen(bad)


# ----------------------------------------------------------------------------- HTTP over a real socket
class Served:
    def __init__(self, registry: Registry, **kw):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = MetricsServer(registry, "127.0.0.1", 0, **kw)

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        self.port = self.server.port
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def raw(self, data: bytes, shut: bool = True) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out


@pytest.fixture
def metrics_http():
    r = Registry()
    m = IsthmusMetrics(r)
    calls = []

    async def refresh():
        calls.append(1)
        m.set_sa_traffic("to-b", spi_in=0x11, spi_out=0x22, bytes_in=100 * len(calls), bytes_out=0,
                         packets_in=len(calls), packets_out=0)

    def broken():
        raise RuntimeError("collector bug")
    r.add_collector(refresh)
    r.add_collector(broken)
    with Served(r, timeout=0.5, max_request=2048) as s:
        s.calls = calls
        yield s


def test_http_get_metrics(metrics_http):
    url = f"http://127.0.0.1:{metrics_http.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE
        body = resp.read().decode()
    fams = parse_exposition(body)
    assert sample(fams, "isthmus_child_sa_bytes_total", tunnel="to-b", spi="0x00000011", direction="in") == 100
    with urllib.request.urlopen(url + "?x=1", timeout=10) as resp:  # collectors run on every scrape
        fams = parse_exposition(resp.read().decode())
    assert sample(fams, "isthmus_child_sa_bytes_total", tunnel="to-b", spi="0x00000011", direction="in") == 200
    assert metrics_http.server.scrapes == 2


def test_http_errors(metrics_http):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_http.port}/", timeout=10)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{metrics_http.port}/metrics",
                                                      data=b"x", method="POST"), timeout=10)
    assert e.value.code == 405 and e.value.headers["Allow"] == "GET, HEAD"
    head = metrics_http.raw(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")  # headers only
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) > 100
    assert metrics_http.raw(b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert metrics_http.raw(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert metrics_http.raw(b"GET /metrics HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    big = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 4000 + b"\r\n\r\n"
    assert metrics_http.raw(big).startswith(b"HTTP/1.1 431 ")
    many = b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 400 + b"\r\n"
    assert metrics_http.raw(many).startswith(b"HTTP/1.1 431 ")
    assert metrics_http.raw(b"GET /metrics HTTP/1.1\r\n", shut=False).startswith(b"HTTP/1.1 408 ")  # never finishes
    assert metrics_http.raw(b"GET /metr") == b""  # client gave up: nothing to answer
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_http.port}/metrics", timeout=10) as resp:
        assert resp.status == 200  # still serving after all of the above


@pytest.mark.parametrize("text", [
    'x{a="b"} 1',                                 # no final line feed
    'x{a="b\nc"} 1\n',                            # raw newline in a label value
    'x{a="b"c"} 1\n',                             # unescaped quote
    'x{a="b\\q"} 1\n',                            # unknown escape
    'x{a="1",a="2"} 1\n',                         # duplicate label
    'x 1\nx 2\n',                                 # duplicate series
    'x{a="1"} 1\ny 1\nx{a="2"} 1\n',              # family not contiguous
    'x 1\n# TYPE x gauge\n',                      # TYPE after samples
    '# TYPE x gauge\n# TYPE x counter\nx 1\n',    # TYPE twice
    '# HELP x a \\t b\nx 1\n',                    # bad HELP escape
    'x one\n',                                    # not a number
    '1x 1\n',                                     # bad name
])
def test_the_test_parser_rejects_malformed_text(text):
    """The parser above is what the format tests rely on: it must catch each violation."""
    with pytest.raises(AssertionError):
        parse_exposition(text)
