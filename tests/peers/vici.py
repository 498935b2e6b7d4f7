"""A small client for strongSwan's VICI protocol (the control socket of charon).

Written from the protocol description in strongSwan's `src/libcharon/plugins/vici/README.md`:

- transport: every packet is a 32-bit big-endian length followed by that many bytes;
- packet: one type byte, then (for named types) a 1-byte name length and the name, then a message;
- message: a sequence of elements (section start/end, key=value, list start/item/end); values are
  byte strings with a 16-bit length, names have an 8-bit length.

Only what the test harness needs: commands, streamed commands (a command whose results arrive as
events, e.g. `list-sas` → `list-sa`), and a background event listener.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

# Packet types.
CMD_REQUEST = 0
CMD_RESPONSE = 1
CMD_UNKNOWN = 2
EVENT_REGISTER = 3
EVENT_UNREGISTER = 4
EVENT_CONFIRM = 5
EVENT_UNKNOWN = 6
EVENT = 7
_NAMED = {CMD_REQUEST, EVENT_REGISTER, EVENT_UNREGISTER, EVENT}

# Message element types.
SECTION_START = 1
SECTION_END = 2
KEY_VALUE = 3
LIST_START = 4
LIST_ITEM = 5
LIST_END = 6


class ViciError(Exception):
    """A protocol violation, an unknown command/event, or a closed socket."""


def _value(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, bool):
        return b"yes" if v else b"no"
    return str(v).encode()


def _name(n: str) -> bytes:
    b = n.encode()
    if len(b) > 255:
        raise ViciError(f"vici name longer than 255 bytes: {n[:40]!r}...")
    return bytes([len(b)]) + b


def _blob(b: bytes) -> bytes:
    if len(b) > 0xFFFF:
        raise ViciError(f"vici value longer than 65535 bytes ({len(b)})")
    return struct.pack("!H", len(b)) + b


def encode_message(msg: Mapping[str, Any]) -> bytes:
    """Encode a dict: nested dicts become sections, lists/tuples become lists, the rest values."""
    out = bytearray()
    for k, v in msg.items():
        if v is None:
            continue
        if isinstance(v, Mapping):
            out += bytes([SECTION_START]) + _name(k) + encode_message(v) + bytes([SECTION_END])
        elif isinstance(v, (list, tuple)):
            out += bytes([LIST_START]) + _name(k)
            for item in v:
                out += bytes([LIST_ITEM]) + _blob(_value(item))
            out += bytes([LIST_END])
        else:
            out += bytes([KEY_VALUE]) + _name(k) + _blob(_value(v))
    return bytes(out)


def _text(b: bytes) -> str | bytes:
    try:
        return b.decode()
    except UnicodeDecodeError:
        return b


def decode_message(data: bytes) -> dict[str, Any]:
    """Decode a message into nested dicts; values are str (bytes if not UTF-8), lists are lists."""
    root: dict[str, Any] = {}
    stack = [root]
    cur_list: list | None = None
    pos = 0

    def need(n: int) -> None:
        if pos + n > len(data):
            raise ViciError(f"truncated vici message at offset {pos} (need {n} bytes, have {len(data) - pos})")

    def read_name() -> str:
        nonlocal pos
        need(1)
        n = data[pos]
        need(1 + n)
        name = data[pos + 1:pos + 1 + n].decode()
        pos += 1 + n
        return name

    def read_blob() -> bytes:
        nonlocal pos
        need(2)
        (n,) = struct.unpack_from("!H", data, pos)
        need(2 + n)
        b = data[pos + 2:pos + 2 + n]
        pos += 2 + n
        return b

    while pos < len(data):
        t = data[pos]
        pos += 1
        if cur_list is not None and t not in (LIST_ITEM, LIST_END):
            raise ViciError(f"vici element type {t} inside a list at offset {pos - 1}")
        if t == SECTION_START:
            name = read_name()
            sub: dict[str, Any] = {}
            stack[-1][name] = sub
            stack.append(sub)
        elif t == SECTION_END:
            if len(stack) == 1:
                raise ViciError(f"unbalanced vici section end at offset {pos - 1}")
            stack.pop()
        elif t == KEY_VALUE:
            name = read_name()
            stack[-1][name] = _text(read_blob())
        elif t == LIST_START:
            name = read_name()
            cur_list = []
            stack[-1][name] = cur_list
        elif t == LIST_ITEM:
            if cur_list is None:
                raise ViciError(f"vici list item outside a list at offset {pos - 1}")
            cur_list.append(_text(read_blob()))
        elif t == LIST_END:
            if cur_list is None:
                raise ViciError(f"vici list end outside a list at offset {pos - 1}")
            cur_list = None
        else:
            raise ViciError(f"unknown vici element type {t} at offset {pos - 1}")
    if len(stack) != 1 or cur_list is not None:
        raise ViciError("vici message ends inside a section or list")
    return root


def encode_packet(ptype: int, name: str | None = None, msg: Mapping[str, Any] | None = None) -> bytes:
    body = bytes([ptype])
    if ptype in _NAMED:
        body += _name(name or "")
    if msg:
        body += encode_message(msg)
    return struct.pack("!I", len(body)) + body


def decode_packet(body: bytes) -> tuple[int, str | None, dict[str, Any]]:
    if not body:
        raise ViciError("empty vici packet")
    ptype = body[0]
    pos = 1
    name = None
    if ptype in _NAMED:
        if len(body) < 2 or len(body) < 2 + body[1]:
            raise ViciError("truncated vici packet name")
        name = body[2:2 + body[1]].decode()
        pos = 2 + body[1]
    return ptype, name, decode_message(body[pos:])


class _Conn:
    """One stream connection to the vici socket, reading whole packets."""

    def __init__(self, path: str, timeout: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise

    def send(self, ptype: int, name: str | None = None, msg: Mapping[str, Any] | None = None) -> None:
        self.sock.sendall(encode_packet(ptype, name, msg))

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ViciError("vici socket closed by charon")
            buf += chunk
        return bytes(buf)

    def recv(self) -> tuple[int, str | None, dict[str, Any]]:
        (n,) = struct.unpack("!I", self._exact(4))
        return decode_packet(self._exact(n))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Session:
    """Sequential commands over one connection (vici allows one active command per connection)."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout
        self._conn = _Conn(path, timeout)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _register(self, event: str, register: bool = True) -> None:
        self._conn.send(EVENT_REGISTER if register else EVENT_UNREGISTER, event)
        while True:
            ptype, _, _ = self._conn.recv()
            if ptype == EVENT_CONFIRM:
                return
            if ptype == EVENT_UNKNOWN:
                raise ViciError(f"charon does not know the vici event {event!r}")
            if ptype == EVENT:
                continue  # a late event of the stream we are leaving
            raise ViciError(f"unexpected vici packet type {ptype} while (un)registering {event!r}")

    def request(self, command: str, msg: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send a command and return its response message."""
        return self.streamed(command, msg, None)[0]

    def streamed(self, command: str, msg: Mapping[str, Any] | None, event: str | None,
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A command whose results arrive as `event` packets before the response."""
        with self._lock:
            if event:
                self._register(event)
            events: list[dict[str, Any]] = []
            try:
                self._conn.send(CMD_REQUEST, command, msg)
                while True:
                    ptype, name, body = self._conn.recv()
                    if ptype == CMD_RESPONSE:
                        return body, events
                    if ptype == CMD_UNKNOWN:
                        raise ViciError(f"charon does not know the vici command {command!r}")
                    if ptype == EVENT and name == event:
                        events.append(body)
                        continue
                    raise ViciError(f"unexpected vici packet type {ptype} ({name}) during {command!r}")
            finally:
                if event:
                    self._register(event, register=False)


@dataclass
class Event:
    name: str
    body: dict[str, Any]
    at: float  # time.monotonic() when received


@dataclass
class EventListener:
    """Collects named events from charon on a background thread; tests wait on them."""

    path: str
    names: Iterable[str]
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = list(self.names)
        self._cond = threading.Condition()
        self._conn = _Conn(self.path, timeout=10.0)
        for n in self.names:
            self._conn.send(EVENT_REGISTER, n)
            ptype, _, _ = self._conn.recv()
            if ptype != EVENT_CONFIRM:
                self._conn.close()
                raise ViciError(f"charon refused to register the vici event {n!r} (packet type {ptype})")
        self._conn.sock.settimeout(None)
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"vici-events {self.path}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                ptype, name, body = self._conn.recv()
                if ptype == EVENT and name is not None:
                    with self._cond:
                        self.events.append(Event(name, body, time.monotonic()))
                        self._cond.notify_all()
        except BaseException as e:  # socket closed when charon stops, or by close()
            with self._cond:
                if not self._closed:
                    self.error = e
                self._cond.notify_all()

    def wait(self, pred: Callable[[Event], bool], timeout: float, since: int = 0) -> Event | None:
        """The first event at index >= `since` for which pred holds, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            i = since
            while True:
                while i < len(self.events):
                    if pred(self.events[i]):
                        return self.events[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.error is not None):
                    return None
                self._cond.wait(left)

    def mark(self) -> int:
        """An index to pass as `since` so that only later events count."""
        with self._cond:
            return len(self.events)

    def close(self) -> None:
        self._closed = True
        try:
            self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()
        self._thread.join(timeout=5)
