"""Prometheus metrics: a small registry and the text exposition format 0.0.4 over HTTP.

No client library: the registry holds counters and gauges with labels, renders them in the text
format (https://prometheus.io/docs/instrumenting/exposition_formats/, "Text-based format"), and
:class:`MetricsServer` serves ``GET /metrics`` on a local TCP port (default 127.0.0.1:9477).

What the daemon uses::

    registry = Registry()
    m = IsthmusMetrics(registry)                 # every family the appliance exports
    m.rekeys.inc(tunnel="to-b", kind="child")
    m.set_sa_states(ike={"established": 1}, child={"installed": 2}, half_open=0)
    m.set_sa_traffic("to-b", spi_in=0xc1a2b3c4, spi_out=0x0000abcd, bytes_in=..., ...)
    m.forget_sa("to-b", 0xc1a2b3c4, 0x0000abcd)  # when the Child SA is gone
    registry.add_collector(refresh_counters)     # sync or async, run before every scrape
    server = MetricsServer(registry, "127.0.0.1", 9477)
    await server.start(); ...; await server.close()

Labels never carry key material: values are tunnel names, SPIs (``0x`` + hex), states.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Union

from appliance import __version__
from appliance.control import format_spi

log = logging.getLogger("isthmus.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_LISTEN = ("127.0.0.1", 9477)
METRICS_PATH = "/metrics"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_RESERVED_LABELS = {"amount", "value"}  # the keyword arguments of inc()/set()

Number = Union[int, float]
Collector = Callable[[], Union[None, Awaitable[None]]]


def escape_label_value(value: str) -> str:
    """Label value escaping of the text format: backslash, double quote and line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP docstring escaping of the text format: backslash and line feed."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: Number) -> str:
    """A sample value: Go ParseFloat syntax, with ``+Inf``, ``-Inf`` and ``NaN``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class MetricFamily:
    """One metric name with its HELP, TYPE and labelled series."""

    type = "untyped"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = (), *,
                 hidden_until_set: bool = False) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        labelnames = tuple(labelnames)
        for ln in labelnames:
            if not _LABEL_NAME.match(ln) or ln.startswith("__") or ln in _RESERVED_LABELS:
                raise ValueError(f"invalid label name {ln!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for {name}")
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self.hidden_until_set = hidden_until_set
        self._series: dict[tuple[str, ...], Number] = {}

    def _key(self, labels: Mapping[str, object]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}")
        key = []
        for ln in self.labelnames:
            v = labels[ln]
            if isinstance(v, bool) or not isinstance(v, (str, int, ipaddress.IPv4Address, ipaddress.IPv6Address)):
                raise TypeError(f"label {ln} of {self.name} must be a string, got {type(v).__name__}")
            key.append(str(v))
        return tuple(key)

    def get(self, **labels: object) -> Number | None:
        """The current value of a series, or None."""
        return self._series.get(self._key(labels))

    def remove(self, **labels: object) -> None:
        """Forget one series (e.g. an SA that is gone)."""
        self._series.pop(self._key(labels), None)

    def remove_matching(self, **labels: object) -> int:
        """Forget every series whose labels include ``labels``; return how many."""
        idx = {self.labelnames.index(k): str(v) for k, v in labels.items()}
        gone = [k for k in self._series if all(k[i] == v for i, v in idx.items())]
        for k in gone:
            del self._series[k]
        return len(gone)

    def clear(self) -> None:
        self._series.clear()

    def series(self) -> list[tuple[dict[str, str], Number]]:
        return [(dict(zip(self.labelnames, k)), v) for k, v in sorted(self._series.items())]

    @property
    def exported(self) -> bool:
        return bool(self._series) or not self.hidden_until_set

    def render(self) -> str:
        if not self.exported:
            return ""
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.type}"]
        items = sorted(self._series.items())
        if not items and not self.labelnames:
            items = [((), 0)]
        for key, value in items:
            if key:
                labels = ",".join(f'{ln}="{escape_label_value(v)}"' for ln, v in zip(self.labelnames, key))
                lines.append(f"{self.name}{{{labels}}} {format_value(value)}")
            else:
                lines.append(f"{self.name} {format_value(value)}")
        return "\n".join(lines) + "\n"


def _check_number(value: object) -> Number:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric values are numbers, got {type(value).__name__}")
    return value


class Counter(MetricFamily):
    """Only goes up. ``set_total`` mirrors a counter kept elsewhere (the kernel's SA counters)."""

    type = "counter"

    def inc(self, amount: Number = 1, **labels: object) -> None:
        _check_number(amount)
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (inc by {amount})")
        key = self._key(labels)
        self._series[key] = self._series.get(key, 0) + amount

    def set_total(self, value: Number, **labels: object) -> None:
        _check_number(value)
        if value < 0:
            raise ValueError(f"{self.name}: a counter cannot be negative")
        self._series[self._key(labels)] = value


class Gauge(MetricFamily):
    type = "gauge"

    def set(self, value: Number, **labels: object) -> None:
        self._series[self._key(labels)] = _check_number(value)

    def inc(self, amount: Number = 1, **labels: object) -> None:
        _check_number(amount)
        key = self._key(labels)
        self._series[key] = self._series.get(key, 0) + amount

    def dec(self, amount: Number = 1, **labels: object) -> None:
        self.inc(-_check_number(amount), **labels)


class Registry:
    """The metric families of one process, rendered in registration order."""

    def __init__(self) -> None:
        self._families: dict[str, MetricFamily] = {}
        self._collectors: list[Collector] = []

    def register(self, family: MetricFamily) -> MetricFamily:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} is already registered")
        self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labelnames: Iterable[str] = (), *,
                hidden_until_set: bool = False) -> Counter:
        c = Counter(name, help, labelnames, hidden_until_set=hidden_until_set)
        self.register(c)
        return c

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = (), *,
              hidden_until_set: bool = False) -> Gauge:
        g = Gauge(name, help, labelnames, hidden_until_set=hidden_until_set)
        self.register(g)
        return g

    def get(self, name: str) -> MetricFamily:
        return self._families[name]

    def add_collector(self, fn: Collector) -> None:
        """``fn()`` (or ``await fn()``) runs before every scrape to refresh values."""
        self._collectors.append(fn)

    async def collect(self) -> None:
        """Run the collectors; one that fails is logged and the scrape goes on."""
        for fn in self._collectors:
            try:
                r = fn()
                if inspect.isawaitable(r):
                    await r
            except Exception:
                log.exception("metrics collector %s failed", getattr(fn, "__qualname__", fn))

    def render(self) -> str:
        return "".join(f.render() for f in self._families.values())


class IsthmusMetrics:
    """The appliance's metric families (names documented in docs/control.md#metrics)."""

    def __init__(self, registry: Registry) -> None:
        r = registry
        self.registry = registry
        self.build_info = r.gauge("isthmus_build_info", "Isthmus version; always 1.", ["version"])
        self.build_info.set(1, version=__version__)
        self.ike_sas = r.gauge("isthmus_ike_sas", "IKE SAs by state.", ["state"])
        self.child_sas = r.gauge("isthmus_child_sas", "Child SAs by state.", ["state"])
        self.half_open_ike_sas = r.gauge(
            "isthmus_half_open_ike_sas", "IKE SAs past IKE_SA_INIT but not yet authenticated (RFC 7296 §2.6).")
        self.cookies_required = r.gauge(
            "isthmus_ike_cookies_required",
            "1 while IKE_SA_INIT requests must carry a COOKIE (RFC 7296 §2.6: cookie_threshold half-open SAs), "
            "else 0.")
        self.unauthenticated = r.counter(
            "isthmus_ike_unauthenticated_requests_total",
            "Unauthenticated requests answered or dropped by DoS protection (action: cookie_sent, refused_per_source, "
            "refused_global, invalid_ike_spi_sent, invalid_ike_spi_limited).", ["action"])
        self.tunnel_up = r.gauge("isthmus_tunnel_up", "1 if the tunnel has an installed Child SA, else 0.",
                                 ["tunnel"])
        self.sa_bytes = r.counter("isthmus_child_sa_bytes_total", "Bytes carried by a Child SA (kernel XFRM counters).",
                                  ["tunnel", "spi", "direction"])
        self.sa_packets = r.counter("isthmus_child_sa_packets_total",
                                    "Packets carried by a Child SA (kernel XFRM counters).",
                                    ["tunnel", "spi", "direction"])
        self.rekeys = r.counter("isthmus_rekeys_total", "Completed rekeys (kind: ike or child).", ["tunnel", "kind"])
        self.dpd_failures = r.counter("isthmus_dpd_failures_total",
                                      "Peers declared dead by liveness checks (RFC 7296 §2.4).", ["tunnel"])
        self.auth_failures = r.counter(
            "isthmus_auth_failures_total",
            "IKE_AUTH failures, either side (tunnel is empty when the peer matched no tunnel).", ["tunnel"])
        self.cert_days_left = r.gauge(
            "isthmus_certificate_days_left",
            "Whole days until a tunnel's certificate expires (side: local = ours, peer = the peer's on the "
            "current IKE SA); negative once expired.", ["tunnel", "side"], hidden_until_set=True)
        # Route manager: defined now, exported once the route manager sets them.
        bgp = ["tunnel", "peer"]
        self.bgp_session_up = r.gauge("isthmus_bgp_session_up", "1 if the BGP session is Established.", bgp,
                                      hidden_until_set=True)
        self.bgp_prefixes_received = r.gauge("isthmus_bgp_prefixes_received", "Prefixes received from the peer.",
                                             bgp, hidden_until_set=True)
        self.bgp_prefixes_accepted = r.gauge("isthmus_bgp_prefixes_accepted",
                                             "Prefixes accepted by the import policy.", bgp, hidden_until_set=True)
        self.bgp_prefixes_advertised = r.gauge("isthmus_bgp_prefixes_advertised", "Prefixes announced to the peer.",
                                               bgp, hidden_until_set=True)
        self.bgp_session_transitions = r.counter("isthmus_bgp_session_transitions_total",
                                                 "BGP session state changes.", bgp, hidden_until_set=True)

    def set_sa_states(self, ike: Mapping[str, int], child: Mapping[str, int], half_open: int) -> None:
        """Replace the by-state gauges (states not given are dropped, not left stale)."""
        self.ike_sas.clear()
        for state, n in ike.items():
            self.ike_sas.set(n, state=state)
        self.child_sas.clear()
        for state, n in child.items():
            self.child_sas.set(n, state=state)
        self.half_open_ike_sas.set(half_open)

    def set_dos(self, counters: Mapping[str, int], cookies_required: bool) -> None:
        """Mirror the IKE engine's DoS protection state (IkeEngine.dos_counters, .cookies_required)."""
        self.cookies_required.set(1 if cookies_required else 0)
        for key, n in counters.items():
            self.unauthenticated.set_total(n, action="cookie_sent" if key == "cookies_sent" else key)

    def set_sa_traffic(self, tunnel: str, *, spi_in: int, spi_out: int, bytes_in: int, bytes_out: int,
                       packets_in: int, packets_out: int) -> None:
        """Mirror one Child SA's kernel counters (inbound SA ``spi_in``, outbound ``spi_out``)."""
        for spi, direction, b, p in ((spi_in, "in", bytes_in, packets_in), (spi_out, "out", bytes_out, packets_out)):
            labels = {"tunnel": tunnel, "spi": format_spi(spi), "direction": direction}
            self.sa_bytes.set_total(b, **labels)
            self.sa_packets.set_total(p, **labels)

    def forget_sa(self, tunnel: str, *spis: int) -> None:
        """Drop a gone Child SA's series."""
        for spi in spis:
            for fam in (self.sa_bytes, self.sa_packets):
                fam.remove_matching(tunnel=tunnel, spi=format_spi(spi))

    def forget_tunnel(self, tunnel: str) -> None:
        """Drop every per-tunnel series (the tunnel was removed from the config)."""
        for fam in self.registry._families.values():
            if "tunnel" in fam.labelnames:
                fam.remove_matching(tunnel=tunnel)


# --------------------------------------------------------------------------- HTTP
def parse_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` / ``[V6]:PORT`` / ``PORT`` (on 127.0.0.1) / ``off``; None for off.

    Raises ValueError with what is allowed."""
    t = text.strip()
    if t.lower() in ("off", "no", "false", "none"):
        return None
    host, port = DEFAULT_LISTEN[0], t
    if t.startswith("["):
        end = t.find("]")
        if end < 0 or t[end + 1:end + 2] != ":":
            raise ValueError(f"metrics listen address {text!r}: expected [IPV6]:PORT")
        host, port = t[1:end], t[end + 2:]
    elif ":" in t:
        host, port = t.rsplit(":", 1)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"metrics listen address {text!r}: {host!r} is not an IP address; "
                         "allowed: IP:PORT, [IPV6]:PORT, PORT or off") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics listen address {text!r}: port must be 1-65535")
    return host, int(port)


_STATUS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}


class MetricsServer:
    """``GET /metrics`` (and ``HEAD``) on a TCP address; 404 for other paths, 405 for other
    methods, 400 for what is not HTTP/1.x. Requests are bounded (``max_request`` bytes of request
    line + headers, ``timeout`` seconds to send them, ``max_connections`` at once); bodies are not
    read. Every response closes the connection."""

    def __init__(self, registry: Registry, host: str = DEFAULT_LISTEN[0], port: int = DEFAULT_LISTEN[1], *,
                 max_request: int = 8192, timeout: float = 5.0, max_connections: int = 16) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.max_request = max_request
        self.timeout = timeout
        self.max_connections = max_connections
        self._server: asyncio.AbstractServer | None = None
        self._active = 0
        self.scrapes = 0

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.requested_port,
                                                  limit=self.max_request + 1, reuse_address=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            if self._active > self.max_connections:
                await self._respond(writer, 503, b"too many connections\n")
                return
            try:
                head = await asyncio.wait_for(self._read_head(reader), self.timeout)
            except asyncio.TimeoutError:
                await self._respond(writer, 408, b"request timeout\n")
                return
            except asyncio.LimitOverrunError:
                await self._respond(writer, 431, b"request too large\n")
                return
            except asyncio.IncompleteReadError:
                return  # the client went away
            status, body, head_only = await self._handle(head)
            await self._respond(writer, status, body, head_only=head_only,
                                content_type=CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8")
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes:
        """Request line and headers, up to the blank line, at most ``max_request`` bytes."""
        head = b""
        while True:
            line = await reader.readuntil(b"\n")
            head += line
            if len(head) > self.max_request:
                raise asyncio.LimitOverrunError("request head too large", len(head))
            if line in (b"\r\n", b"\n"):
                return head

    async def _handle(self, head: bytes) -> tuple[int, bytes, bool]:
        try:
            request_line = head.split(b"\n", 1)[0].decode("ascii").rstrip("\r")
        except UnicodeDecodeError:
            return 400, b"bad request\n", False
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"bad request\n", False
        method, target, version = parts
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            return 505, b"HTTP/1.0 or HTTP/1.1 only\n", False
        if method not in ("GET", "HEAD"):
            return 405, b"GET or HEAD only\n", False
        path = target.split("?", 1)[0]
        if path != METRICS_PATH:
            return 404, b"not found; metrics are at /metrics\n", method == "HEAD"
        await self.registry.collect()
        self.scrapes += 1
        return 200, self.registry.render().encode(), method == "HEAD"

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, *, head_only: bool = False,
                       content_type: str = "text/plain; charset=utf-8") -> None:
        headers = [f"HTTP/1.1 {status} {_STATUS[status]}", f"Content-Type: {content_type}",
                   f"Content-Length: {len(body)}", "Connection: close"]
        if status == 405:
            headers.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + (b"" if head_only else body))
        await writer.drain()
