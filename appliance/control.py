"""The control socket: how `isthmus` (and scripts) talk to a running `isthmusd`.

Transport: a unix stream socket ``<run_dir>/isthmusd.sock``, mode 0600 in a 0700 directory, so
only root (the daemon's user) can connect. The run directory comes from ``--run-dir``, else
``ISTHMUS_RUN_DIR``, else ``/run/isthmus`` (:func:`resolve_run_dir`).

Protocol: newline-delimited JSON, one object per line, UTF-8.

- request  ``{"id": 7, "method": "sas", "params": {"tunnel": "to-b"}}`` (``params`` optional,
  an object; ``id`` a number, a string or absent/null, echoed back unchanged)
- response ``{"id": 7, "result": ...}`` or
  ``{"id": 7, "error": {"code": "unknown_tunnel", "message": "...", "data": {...}?}}``

Requests on one connection are answered in order. A request line longer than
:data:`MAX_REQUEST_BYTES` is answered with ``too_large`` and the connection is closed; any other
malformed line (not JSON, not an object, bad ``method``/``params``) gets an error response and the
connection stays usable. A handler that raises :class:`ControlError` answers with its code; any
other exception is answered with ``internal`` and logged — the server keeps running.

``subscribe`` (built in, params ``{"types": [...], "tunnels": [...]}`` both optional filters) is
answered with ``{"id": n, "result": {"subscribed": true, "queue": N}}`` and turns the connection
into an event stream: from then on the server writes one event object per line (see
:class:`EventBus`) and ignores anything the client sends. Each subscriber has a bounded queue; a
subscriber that does not keep up loses events, and in their place it receives one marker
``{"type": "dropped", "time": ..., "tunnel": null, "count": N}`` — the daemon never waits for a
subscriber.

The method set, result shapes and error codes are documented in docs/control.md; the daemon
registers the handlers (:class:`ControlServer`), the CLI uses :class:`ControlClient`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import math
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("isthmus.control")

DEFAULT_RUN_DIR = "/run/isthmus"
RUN_DIR_ENV = "ISTHMUS_RUN_DIR"
SOCKET_NAME = "isthmusd.sock"
PROTOCOL_VERSION = 1

#: Longest request line the server reads (bytes, without the newline).
MAX_REQUEST_BYTES = 64 * 1024
#: Longest response / event line the client reads.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: Events a subscriber may have queued before newer ones are dropped.
DEFAULT_SUBSCRIBER_QUEUE = 256

#: Error codes (``error.code``) used by the server itself; handlers add their own
#: (docs/control.md lists them all).
E_BAD_REQUEST = "bad_request"        # not JSON / not an object / bad id, method or params shape
E_TOO_LARGE = "too_large"            # request line longer than MAX_REQUEST_BYTES
E_UNKNOWN_METHOD = "unknown_method"
E_INVALID_PARAMS = "invalid_params"  # params do not fit the method
E_UNKNOWN_TUNNEL = "unknown_tunnel"
E_FAILED = "failed"                  # the operation was tried and failed
E_UNAVAILABLE = "unavailable"        # the feature is not configured / not running (e.g. BGP)
E_INVALID_CONFIG = "invalid_config"  # reload refused: the new config does not validate
E_BUSY = "busy"                      # too many connections
E_INTERNAL = "internal"              # a handler bug; the daemon logged it

SUBSCRIBE = "subscribe"

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def resolve_run_dir(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """``run_dir`` if given, else ``$ISTHMUS_RUN_DIR``, else ``/run/isthmus``."""
    if run_dir:
        return Path(run_dir)
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def socket_path(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """The control socket's path for a run directory (see :func:`resolve_run_dir`)."""
    return resolve_run_dir(run_dir) / SOCKET_NAME


_STAMP_SECOND: list = [None, ""]     # the last whole second formatted, and its text


def utc_timestamp(t: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-28T08:27:06.123Z`` (the datetime module's
    rounding; the date and time of day formatted once per second: every log line and event has
    one, issue 13)."""
    t = time.time() if t is None else t
    frac, whole = math.modf(t)
    us = round(frac * 1e6)
    sec = int(whole)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    elif us < 0:
        sec, us = sec - 1, us + 1_000_000
    cached = _STAMP_SECOND
    if cached[0] != sec:
        cached[1] = datetime.fromtimestamp(sec, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        cached[0] = sec
    return f"{cached[1]}{us // 1000:03d}Z"


def format_spi(spi: int, size: int = 4) -> str:
    """An SPI as the protocol carries it: ``0x`` + hex, 8 digits for ESP (4 octets), 16 for IKE.

    Strings, not numbers: 64-bit IKE SPIs do not survive JSON tools that use doubles (jq)."""
    return f"0x{spi:0{size * 2}x}"


class ControlError(Exception):
    """Raised by a handler to answer with ``{"error": {"code", "message", "data"?}}``.

    ``message`` is shown to the operator: say what was wrong and what is allowed. Never put
    key material in it."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            d["data"] = self.data
        return d


_MISSING: Any = object()


def param(params: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """Fetch ``params[name]`` checked against ``kind``; raise ``invalid_params`` otherwise.

    A helper for handlers: ``tunnel = param(params, "tunnel", str)``."""
    if name not in params or params[name] is None:
        if default is _MISSING:
            raise ControlError(E_INVALID_PARAMS, f"missing parameter '{name}'")
        return default
    value = params[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:  # bool is an int subclass; do not accept it as one
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        allowed = " or ".join(_json_type_name(k) for k in kinds)
        raise ControlError(E_INVALID_PARAMS, f"parameter '{name}' must be {allowed}, "
                                             f"not {_json_type_name(type(value))}")
    return value


def check_params(params: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise ``invalid_params`` naming any parameter not in ``allowed``."""
    allowed = set(allowed)
    extra = sorted(set(params) - allowed)
    if extra:
        names = ", ".join(sorted(allowed)) or "none"
        raise ControlError(E_INVALID_PARAMS, f"unknown parameter{'s' if len(extra) > 1 else ''} "
                                             f"{', '.join(map(repr, extra))}; allowed: {names}")


def unknown_tunnel(name: str, configured: Iterable[str]) -> ControlError:
    """The ``unknown_tunnel`` error every method answers for a name that is not configured."""
    names = ", ".join(sorted(configured)) or "none"
    return ControlError(E_UNKNOWN_TUNNEL, f"no tunnel '{name}'; configured: {names}")


def _json_type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            dict: "an object", type(None): "null"}.get(t, t.__name__)


def _encode(obj: Any) -> bytes:
    """One protocol line. ``allow_nan=False``: NaN is not JSON; bytes/objects raise TypeError."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"


# --------------------------------------------------------------------------- events
@dataclass
class _Dropped:
    count: int


class Subscription:
    """One subscriber's bounded queue of encoded event lines (see :meth:`EventBus.subscribe`).

    When the queue holds ``maxsize`` events, newer events are not queued; a dropped-marker takes
    their place (one marker per run of consecutive drops, so order is kept)."""

    def __init__(self, bus: EventBus, maxsize: int, types: frozenset[str] | None,
                 tunnels: frozenset[str] | None) -> None:
        self._bus = bus
        self.maxsize = maxsize
        self.types = types
        self.tunnels = tunnels
        self._items: collections.deque[bytes | _Dropped] = collections.deque()
        self._events = 0  # events (not markers) in _items
        self._wake = asyncio.Event()
        self.dropped_total = 0
        self.closed = False

    def wants(self, event: Mapping[str, Any]) -> bool:
        if self.types is not None and event.get("type") not in self.types:
            return False
        if self.tunnels is not None and event.get("tunnel") not in self.tunnels:
            return False
        return True

    def _offer(self, line: bytes) -> None:
        if self.closed:
            return
        if self._events >= self.maxsize:
            self.dropped_total += 1
            tail = self._items[-1] if self._items else None
            if isinstance(tail, _Dropped):
                tail.count += 1
            else:
                self._items.append(_Dropped(1))
        else:
            self._items.append(line)
            self._events += 1
        self._wake.set()

    def pending(self) -> int:
        """Events queued (markers not counted)."""
        return self._events

    async def get_line(self) -> bytes:
        """The next encoded event line (ending in a newline); waits for one."""
        while not self._items:
            if self.closed:
                raise EOFError("subscription closed")
            self._wake.clear()
            await self._wake.wait()
        item = self._items.popleft()
        if isinstance(item, _Dropped):
            return _encode({"type": "dropped", "time": utc_timestamp(), "tunnel": None, "count": item.count})
        self._events -= 1
        return item

    async def get(self) -> dict[str, Any]:
        """The next event as a dict (a ``dropped`` marker included)."""
        return json.loads(await self.get_line())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bus._remove(self)
            self._wake.set()


class EventBus:
    """Where the daemon publishes events; subscribers (control connections) get copies.

    ``publish`` is synchronous and never blocks: call it from the event loop's thread (from a
    coroutine or a callback). Every event is an object with at least ``type`` (a snake_case
    name such as ``child_sa_up``), ``time`` (RFC 3339 UTC, added here) and ``tunnel`` (name or
    null); further fields are the event's (docs/control.md lists the event types). Values must be
    JSON types: bytes and key-holding objects are refused with TypeError, so key material cannot
    reach a subscriber by accident.
    """

    def __init__(self, queue_size: int = DEFAULT_SUBSCRIBER_QUEUE,
                 clock: Callable[[], float] = time.time) -> None:
        self.queue_size = queue_size
        self._clock = clock
        self._subs: list[Subscription] = []
        self.published = 0

    def publish(self, type: str, tunnel: str | None = None, **fields: Any) -> dict[str, Any]:
        """Publish ``{"type", "time", "tunnel", **fields}``; return the event."""
        if not isinstance(type, str) or not type:
            raise ValueError("event type must be a non-empty string")
        reserved = {"type", "time", "tunnel"} & set(fields)
        if reserved:
            raise ValueError(f"event fields may not be named {sorted(reserved)}")
        event = {"type": type, "time": utc_timestamp(self._clock()), "tunnel": tunnel, **fields}
        line = _encode(event)  # raises TypeError on bytes, Secret and other non-JSON values
        self.published += 1
        for sub in list(self._subs):
            if sub.wants(event):
                sub._offer(line)
        return event

    def subscribe(self, *, types: Iterable[str] | None = None, tunnels: Iterable[str] | None = None,
                  maxsize: int | None = None) -> Subscription:
        """A new subscription; ``close()`` it when done."""
        sub = Subscription(self, maxsize or self.queue_size,
                           frozenset(types) if types is not None else None,
                           frozenset(tunnels) if tunnels is not None else None)
        self._subs.append(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def _remove(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)


# --------------------------------------------------------------------------- server
class ControlSocketInUse(Exception):
    """Another live daemon answers on the control socket (or the path is not ours to replace)."""


class ControlServer:
    """The daemon's side of the control socket.

    ``handlers`` maps a method name to ``async def handler(params: dict) -> result`` (a JSON
    value). ``subscribe`` is built in and served from ``events``; a handler may not take its name.
    ``version`` has a default (package version, protocol version, pid) that a handler may replace.
    Typical use in the daemon::

        bus = EventBus()
        server = ControlServer(socket_path(run_dir), {"status": status, ...}, events=bus)
        await server.start()          # ControlSocketInUse if another daemon answers
        ...
        bus.publish("child_sa_up", tunnel="to-b", spi_in=format_spi(spi_in), ...)
        ...
        await server.close()
    """

    def __init__(self, path: str | os.PathLike[str], handlers: Mapping[str, Handler], *,
                 events: EventBus | None = None, max_request: int = MAX_REQUEST_BYTES,
                 max_connections: int = 64, idle_timeout: float = 300.0, access: Any = None) -> None:
        if SUBSCRIBE in handlers:
            raise ValueError("'subscribe' is served by ControlServer itself; do not register a handler for it")
        self.path = Path(path)
        self.handlers = {"version": _version, **handlers}
        self.events = events if events is not None else EventBus()
        self.max_request = max_request
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._inode: tuple[int, int] | None = None
        #: appliance.access.AccessPolicy: with one, any local user may connect and the daemon
        #: decides by the peer's credentials (roles); without, the socket is root-only by its modes.
        self.access = access

    # -- life cycle
    async def start(self) -> None:
        """Prepare the run directory, handle a stale socket, bind and listen (mode 0600)."""
        prepare_run_dir(self.path.parent)
        await asyncio.get_running_loop().run_in_executor(None, _clear_stale_socket, self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)  # the socket is born 0600; the 0700 directory covers the rest
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600 if self.access is None else 0o666)
            if self.access is not None:
                os.chmod(self.path.parent, 0o755)  # roles are checked per request (appliance/access.py)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(16)
            sock.setblocking(False)
            # The reader limit is one byte above the request limit, so an over-long line is seen
            # as such and not as a short read.
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=self.max_request + 1)
        except BaseException:
            sock.close()
            self._unlink_own()
            raise
        log.debug("control socket listening", extra={"path": str(self.path)})

    async def close(self) -> None:
        """Stop accepting, end every connection (subscribers included), remove the socket."""
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self._unlink_own()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _unlink_own(self) -> None:
        """Remove the socket file, but only if it is still the one this server bound."""
        if self._inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        self._inode = None

    # -- connections
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            if len(self._conns) > self.max_connections:
                await self._send(writer, {"id": None, "error": {
                    "code": E_BUSY, "message": f"too many control connections (limit {self.max_connections})"}})
                return
            await self._requests(reader, writer, _peer_of(writer))
        except (ConnectionError, asyncio.IncompleteReadError, EOFError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # never let one connection take the server down
            log.exception("control connection failed")
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any = None) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), self.idle_timeout)
            except asyncio.TimeoutError:
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():  # a last request without its newline: still answer it
                    line = exc.partial
                else:
                    return
            except asyncio.LimitOverrunError:
                await self._send(writer, {"id": None, "error": {
                    "code": E_TOO_LARGE,
                    "message": f"request line longer than {self.max_request} bytes; connection closed"}})
                return
            if len(line.rstrip(b"\r\n")) > self.max_request:
                await self._send(writer, {"id": None, "error": {
                    "code": E_TOO_LARGE,
                    "message": f"request line longer than {self.max_request} bytes; connection closed"}})
                return
            if not line.strip():
                continue
            req_id, method, params, err = _parse_request(line)
            if err is not None:
                await self._send(writer, {"id": req_id, "error": err.as_dict()})
                continue
            if peer is None and self.access is not None:
                await self._send(writer, {"id": req_id, "error": {
                    "code": "forbidden", "message": "permission denied: the peer's credentials cannot be read"}})
                continue
            if peer is not None:
                from appliance import access
                try:
                    role = access.authorize(peer, method, self.access)
                except ControlError as exc:
                    access.audit(peer, access.role_of(peer, self.access), method, params, f"refused:{exc.code}")
                    await self._send(writer, {"id": req_id, "error": exc.as_dict()})
                    continue
            if method == SUBSCRIBE:
                if await self._subscribe(req_id, params, reader, writer):
                    return  # the connection was an event stream; it has ended
                continue
            response = await self._dispatch(req_id, method, params)
            if peer is not None:
                access.audit(peer, role, method, params,
                             "ok" if "result" in response else f"error:{response['error']['code']}")
            await self._send(writer, response)
            if reader.at_eof():
                return

    async def _dispatch(self, req_id: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
        handler = self.handlers.get(method)
        if handler is None:
            known = ", ".join(sorted([*self.handlers, SUBSCRIBE]))
            return {"id": req_id, "error": {"code": E_UNKNOWN_METHOD,
                                            "message": f"unknown method '{method}'; known: {known}"}}
        try:
            result = await handler(params)
            response = {"id": req_id, "result": result}
            _encode(response)  # results must be plain JSON (no bytes, no key holders)
            return response
        except ControlError as exc:
            return {"id": req_id, "error": exc.as_dict()}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("control method %s failed", method)
            return {"id": req_id, "error": {"code": E_INTERNAL,
                                            "message": f"internal error in '{method}' ({type(exc).__name__}); "
                                                       "see the daemon's log"}}

    async def _subscribe(self, req_id: Any, params: dict[str, Any], reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bool:
        """Serve an event stream until either side ends it (True); False if the request was
        refused (bad params) and the connection stays a request connection."""
        try:
            check_params(params, {"types", "tunnels"})
            types = _str_list(params, "types")
            tunnels = _str_list(params, "tunnels")
        except ControlError as exc:
            await self._send(writer, {"id": req_id, "error": exc.as_dict()})
            return False
        sub = self.events.subscribe(types=types, tunnels=tunnels)
        try:
            await self._send(writer, {"id": req_id, "result": {"subscribed": True, "queue": sub.maxsize}})

            async def drain_input() -> None:  # notice the client leaving; ignore what it sends
                while await reader.read(4096):
                    pass

            async def pump() -> None:
                while True:
                    writer.write(await sub.get_line())
                    await writer.drain()

            tasks = [asyncio.ensure_future(drain_input()), asyncio.ensure_future(pump())]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        exc = t.exception()
                        if not isinstance(exc, (ConnectionError, EOFError)):
                            raise exc  # type: ignore[misc]
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            sub.close()
        return True

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(_encode(obj))
        await writer.drain()


async def _version(params: dict[str, Any]) -> dict[str, Any]:
    from appliance import __version__
    check_params(params, ())
    return {"version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid()}


def _str_list(params: Mapping[str, Any], name: str) -> list[str] | None:
    value = param(params, name, list, None)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise ControlError(E_INVALID_PARAMS, f"parameter '{name}' must be a list of strings")
    return value


def _parse_request(line: bytes) -> tuple[Any, str, dict[str, Any], ControlError | None]:
    """(id, method, params, error) from one request line."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, "", {}, ControlError(E_BAD_REQUEST, f"request is not valid JSON ({_short(exc)})")
    if not isinstance(obj, dict):
        return None, "", {}, ControlError(E_BAD_REQUEST, "request must be a JSON object "
                                                         '{"id": ..., "method": ..., "params": {...}}')
    req_id = obj.get("id")
    if req_id is not None and (isinstance(req_id, bool) or not isinstance(req_id, (int, str))):
        return None, "", {}, ControlError(E_BAD_REQUEST, "'id' must be a number or a string")
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        return req_id, "", {}, ControlError(E_BAD_REQUEST, "'method' must be a non-empty string")
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return req_id, method, {}, ControlError(E_BAD_REQUEST, "'params' must be a JSON object")
    extra = sorted(set(obj) - {"id", "method", "params"})
    if extra:
        return req_id, method, {}, ControlError(E_BAD_REQUEST, f"unknown request member(s) {extra}; "
                                                               "allowed: id, method, params")
    return req_id, method, params, None


def _peer_of(writer: asyncio.StreamWriter) -> Any:
    """The connecting process's credentials (appliance.access.Peer), None if they cannot be read."""
    from appliance.access import Peer
    sock = writer.get_extra_info("socket")
    try:
        return Peer.of_socket(sock) if sock is not None and sock.family == socket.AF_UNIX else None
    except OSError:
        return None


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------- run dir / stale socket
class RunDirError(Exception):
    """The run directory cannot be used safely."""


def prepare_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Create ``run_dir`` (mode 0700) or tighten an existing one of ours to 0700.

    Refused: a path that is not a directory, a directory owned by another user, or a shared
    directory with the sticky bit (like /tmp) — use a dedicated directory there."""
    path = Path(run_dir)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        raise RunDirError(f"run directory '{path}' cannot be created ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run directory '{path}' is not a directory")
    if st.st_uid != os.geteuid():
        raise RunDirError(f"run directory '{path}' belongs to uid {st.st_uid}, not to this process "
                          f"(uid {os.geteuid()}); use a directory of the daemon's own (--run-dir)")
    if st.st_mode & stat.S_ISVTX:
        raise RunDirError(f"run directory '{path}' is a shared directory (sticky bit); "
                          f"use a dedicated directory such as '{path / 'isthmus'}'")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _clear_stale_socket(path: Path) -> None:
    """Refuse if a live daemon answers on ``path``; remove it if it is a dead socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketInUse(f"'{path}' exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale control socket", extra={"path": str(path)})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise ControlSocketInUse(f"control socket '{path}' cannot be probed ({exc.strerror}); "
                                 "refusing to replace it") from None
    finally:
        probe.close()
    raise ControlSocketInUse(f"another isthmusd is running on '{path}' (it accepted a connection); "
                             "stop it first or use another --run-dir")


# --------------------------------------------------------------------------- client
class ControlClientError(Exception):
    """Base of the client's errors."""


class DaemonUnreachable(ControlClientError):
    """No daemon answers: no socket, a stale one, a timeout, or a broken connection."""


class ControlPermissionError(DaemonUnreachable):
    """The socket exists but this user may not connect (it is root-only)."""


class RemoteError(ControlClientError):
    """The daemon answered with an error object."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.data = data


class ProtocolError(DaemonUnreachable):
    """The daemon's answer is not the protocol (not JSON, wrong id, line too long)."""


class ControlClient:
    """Synchronous client for the CLI and scripts.

    ``call(method, **params)`` returns the result or raises :class:`RemoteError`;
    :class:`DaemonUnreachable` (and its :class:`ControlPermissionError`) when no daemon can be
    talked to. ``events(**filters)`` yields events on a connection of its own until the daemon
    closes it. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *, timeout: float | None = 30.0,
                 path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else socket_path(run_dir)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 1

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise DaemonUnreachable(
                f"isthmusd is not running: no control socket at {self.path} "
                f"(started with another --run-dir? set --run-dir or {RUN_DIR_ENV})") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonUnreachable(
                f"isthmusd is not running: {self.path} is a stale socket (nothing listens on it)") from None
        except PermissionError:
            sock.close()
            raise ControlPermissionError(
                f"permission denied on {self.path}: the control socket is root-only; "
                "run the command as root (e.g. with sudo)") from None
        except socket.timeout:
            sock.close()
            raise DaemonUnreachable(f"isthmusd did not accept a connection on {self.path} "
                                    f"within {timeout:g} s") from None
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise ControlPermissionError(
                    f"permission denied on {self.path}: the control socket is root-only; "
                    "run the command as root (e.g. with sudo)") from None
            raise DaemonUnreachable(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        return sock

    def _readline(self, sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
        """(line without newline, rest of buffer)."""
        while b"\n" not in buf:
            if len(buf) > MAX_RESPONSE_BYTES:
                raise ProtocolError(f"answer from {self.path} longer than {MAX_RESPONSE_BYTES} bytes")
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                raise DaemonUnreachable(f"isthmusd did not answer within {self.timeout:g} s") from None
            except OSError as exc:
                raise DaemonUnreachable(f"connection to isthmusd lost ({exc.strerror or exc})") from None
            if not chunk:
                raise DaemonUnreachable("isthmusd closed the connection")
            buf += chunk
        line, _, rest = buf.partition(b"\n")
        return line, rest

    @staticmethod
    def _decode(line: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(line)
        except ValueError:
            raise ProtocolError("isthmusd sent a line that is not JSON") from None
        if not isinstance(obj, dict):
            raise ProtocolError("isthmusd sent a JSON value that is not an object")
        return obj

    def call(self, method: str, **params: Any) -> Any:
        """Send one request, wait for its response; the result, or :class:`RemoteError`."""
        if self._sock is None:
            self._sock = self._connect(self.timeout)
        req_id = self._next_id
        self._next_id += 1
        try:
            self._sock.sendall(_encode({"id": req_id, "method": method, "params": params}))
        except OSError as exc:
            self.close()
            raise DaemonUnreachable(f"connection to isthmusd lost ({exc.strerror or exc})") from None
        try:
            line, self._buf = self._readline(self._sock, self._buf)
        except DaemonUnreachable:
            self.close()
            raise
        resp = self._decode(line)
        if "error" in resp and resp.get("id") in (req_id, None):
            err = resp["error"] if isinstance(resp["error"], dict) else {}
            raise RemoteError(str(err.get("code", "unknown")), str(err.get("message", "")), err.get("data"))
        if resp.get("id") != req_id or "result" not in resp:
            self.close()
            raise ProtocolError(f"isthmusd answered request {req_id} with id {resp.get('id')!r}")
        return resp["result"]

    def events(self, *, types: Iterable[str] | None = None,
               tunnels: Iterable[str] | None = None) -> EventStream:
        """Subscribe now (errors are raised here), then return an iterator over the events
        (``dropped`` markers included). The iterator blocks between events and ends the stream
        with :class:`DaemonUnreachable` when the daemon closes it; Ctrl-C interrupts it; closing
        the iterator closes the connection."""
        params: dict[str, Any] = {}
        if types is not None:
            params["types"] = list(types)
        if tunnels is not None:
            params["tunnels"] = list(tunnels)
        sock = self._connect(self.timeout)
        try:
            sock.sendall(_encode({"id": 0, "method": SUBSCRIBE, "params": params}))
            line, buf = self._readline(sock, b"")
            resp = self._decode(line)
            if "error" in resp:
                err = resp["error"] if isinstance(resp["error"], dict) else {}
                raise RemoteError(str(err.get("code", "unknown")), str(err.get("message", "")), err.get("data"))
            if not isinstance(resp.get("result"), dict) or not resp["result"].get("subscribed"):
                raise ProtocolError("isthmusd did not confirm the subscription")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)  # events come when they come
        return EventStream(self, sock, buf)


class EventStream:
    """Iterator over a subscription's events; a context manager; ``close()`` ends it."""

    def __init__(self, client: ControlClient, sock: socket.socket, buf: bytes) -> None:
        self._client = client
        self._sock: socket.socket | None = sock
        self._buf = buf

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._sock is None:
            raise StopIteration
        try:
            line, self._buf = self._client._readline(self._sock, self._buf)
        except BaseException:
            self.close()
            raise
        return self._client._decode(line)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
