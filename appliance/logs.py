"""Structured logs: one JSON object per line on stdout (journald takes stdout under systemd), or
a human format on a terminal — and no secret, ever.

A JSON line::

    {"time": "2026-11-28T08:27:06.123Z", "level": "info", "logger": "isthmus.ike",
     "message": "IKE SA established", "tunnel": "to-b", "spi_i": "0x1a2b3c4d5e6f7081", "peer": "198.51.100.2"}

Context fields come from ``extra={...}``, from :func:`bind` (a LoggerAdapter carrying fields) and
from :func:`log_context` (fields for everything logged in a block or asyncio task).

The redaction guarantee, in layers (each also applies to the human format):

1. Values of key-holding types — :class:`appliance.config.Secret`, the crypto key holders
   (``IkeKeys``, ``ChildKeys``, ``KeyExchange``) and anything passed to
   :func:`register_secret_type` — render as ``<redacted>``, wherever they appear (message
   arguments, context fields, inside lists/dicts/dataclasses).
2. Context fields whose *name* says secret (``psk``, ``secret``, ``password``, ``private_key``,
   ``SK_*``, ``keymat``, ``skeyseed``, ``*_key``...) render as ``<redacted>`` whatever the value.
3. Raw bytes are never written: ``bytes``/``bytearray``/``memoryview`` render as
   ``<N bytes>``, and a Python bytes literal (``b'...'``) that reached a message text through
   ``str()``/f-strings or a traceback is replaced by ``<bytes>``.
4. Secret values registered with :func:`register_secret` (the daemon registers every PSK it
   loads) are cut out of every string written — raw, hex or base64 — and replaced by
   ``<redacted>``, even when they came in through an f-string.

Integers in fields named ``spi``/``spi_*``/``*_spi`` render as hex (``0x`` + 8 or 16 digits).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import enum
import ipaddress
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any, TextIO

from appliance.control import format_spi, utc_timestamp

REDACTED = "<redacted>"

_secret_types: tuple[type, ...] = ()


def register_secret_type(cls: type) -> None:
    """Instances of ``cls`` render as ``<redacted>`` in every log format."""
    global _secret_types
    if cls not in _secret_types:
        _secret_types = (*_secret_types, cls)


def _register_known_types() -> None:
    from appliance.config.secrets import Secret
    from appliance.ike.crypto import ChildKeys, IkeKeys, KeyExchange
    for cls in (Secret, IkeKeys, ChildKeys, KeyExchange):
        register_secret_type(cls)


_register_known_types()


# Field names that always hide their value (case-insensitive).
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:psk|secret|secrets|password|passwd|passphrase|private|privkey|keymat|skeyseed|credential|"
    r"credentials|token)(?:$|_)|^sk(?:_|$)|(?:^|_)key$|(?:^|_)keys$",
    re.IGNORECASE)
_SPI_NAME = re.compile(r"(?:^|_)spi(?:$|_)", re.IGNORECASE)
# A bytes literal starts where a Python repr can put one: at the start, after whitespace or after
# one of ( [ { = : , — not inside a word such as "xfrm-b" followed by a quote.
_BYTES_LITERAL = re.compile(r"""(?<![^\s(\[{=:,])b(['"])(?:\\.|(?!\1)[^\\\n])*\1""")
_MAX_DEPTH = 6


def is_secret_name(name: str) -> bool:
    """Whether a field of this name is always redacted."""
    return bool(_SECRET_NAME.search(name))


# --------------------------------------------------------------------------- registered secret values
class _Needles:
    """Registered secret values in the textual forms they could take; never shown."""

    MIN_LEN = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._needles: frozenset[str] = frozenset()
        self._ordered: list[str] = []

    def __repr__(self) -> str:
        return f"<{len(self._needles)} registered secret forms>"

    def add(self, value: bytes) -> None:
        forms = {value.hex(), value.hex().upper(), base64.b64encode(value).decode(),
                 base64.urlsafe_b64encode(value).decode().rstrip("=")}
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            forms |= {text, json.dumps(text, ensure_ascii=True)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}
        forms = {f for f in forms if len(f) >= self.MIN_LEN}
        with self._lock:
            # longest first, so a text form is cut before a shorter form that is part of it
            self._needles = frozenset(self._needles | forms)
            self._ordered = sorted(self._needles, key=len, reverse=True)

    def clear(self) -> None:
        with self._lock:
            self._needles = frozenset()
            self._ordered = []

    def scrub(self, text: str) -> str:
        if not self._needles:
            return text
        for needle in self._ordered:
            if needle in text:
                text = text.replace(needle, REDACTED)
        return text


_needles = _Needles()


def register_secret(value: Any) -> None:
    """Cut this secret's raw/hex/base64 forms out of every log line from now on.

    Takes a ``Secret`` (anything with ``reveal()``), bytes or str. The daemon calls this for
    every PSK it loads. Values shorter than 4 characters are not scrubbed (too many false hits)."""
    if hasattr(value, "reveal"):
        value = value.reveal()
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("register_secret takes a Secret, bytes or str")
    _needles.add(bytes(value))


def forget_registered_secrets() -> None:
    """Drop every registered value (tests; a reload re-registers what the new config holds)."""
    _needles.clear()


def scrub(text: str) -> str:
    """Bytes literals and registered secrets cut out of ``text``."""
    return _needles.scrub(_BYTES_LITERAL.sub("<bytes>", text))


# --------------------------------------------------------------------------- value rendering
def safe(value: Any, name: str | None = None, _depth: int = 0) -> Any:
    """A JSON-safe, secret-free rendering of a log value (see the module docstring)."""
    if name is not None and is_secret_name(name):
        return REDACTED
    if _secret_types and isinstance(value, _secret_types):
        return REDACTED
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if name is not None and _SPI_NAME.search(name) and value >= 0:
            return format_spi(value, 4 if value < 1 << 32 else 8)
        if isinstance(value, enum.Enum):
            return value.name
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, enum.Enum):
        return value.name
    if _depth >= _MAX_DEPTH:
        return f"<{type(value).__name__}>"
    if isinstance(value, Mapping):
        return {str(k): safe(v, str(k), _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [safe(v, name, _depth + 1) for v in items]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: (safe(getattr(value, f.name), f.name, _depth + 1) if f.repr else REDACTED)
                for f in dataclasses.fields(value)}
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network,
                          ipaddress.IPv6Network, PurePath)):
        return str(value)
    if isinstance(value, BaseException):
        return _exception_text(value)
    return scrub(str(value))


def _exception_text(exc: BaseException) -> str:
    if any(isinstance(a, (bytes, bytearray, memoryview)) or (_secret_types and isinstance(a, _secret_types))
           for a in exc.args):
        args = ", ".join(str(safe(a)) for a in exc.args)
        return f"{type(exc).__name__}({args})"
    return scrub(f"{type(exc).__name__}: {exc}")


def _arg(value: Any) -> Any:
    """A ``%`` argument of a log message: numbers stay numbers, secrets and bytes do not pass."""
    if _secret_types and isinstance(value, _secret_types):
        return REDACTED
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (int, float, str)) or value is None:
        return value
    if isinstance(value, BaseException):
        return _exception_text(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json.dumps(safe(value), ensure_ascii=False)
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        return json.dumps(safe(value), ensure_ascii=False, default=str)
    return value


def message_of(record: logging.LogRecord) -> str:
    """The record's message with sanitized arguments, scrubbed."""
    msg = record.msg
    if isinstance(msg, (bytes, bytearray, memoryview)) or (_secret_types and isinstance(msg, _secret_types)):
        return str(_arg(msg))
    text = msg if isinstance(msg, str) else str(safe(msg))
    args = record.args
    if args:
        try:
            if isinstance(args, Mapping):
                text = text % {k: _arg(v) for k, v in args.items()}
            else:
                text = text % tuple(_arg(a) for a in args)
        except (TypeError, ValueError, KeyError):
            text = f"{text} (log arguments did not fit the message)"
    return scrub(text)


# --------------------------------------------------------------------------- context
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("isthmus_log_context", default={})

# Attributes every LogRecord has; anything else on a record is a context field from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields to everything logged inside the block (and in tasks created inside it)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class _BoundLogger(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def bind(logger: logging.Logger | str, **fields: Any) -> logging.LoggerAdapter:
    """A logger that adds ``fields`` to every record: ``log = bind("isthmus.ike", tunnel="to-b")``."""
    if isinstance(logger, str):
        logger = logging.getLogger(logger)
    return _BoundLogger(logger, fields)


def context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record's context fields (contextvar fields, then ``extra``), rendered safe."""
    fields: dict[str, Any] = dict(_context.get())
    for k, v in record.__dict__.items():
        if k not in _RECORD_ATTRS and not k.startswith("_"):
            fields[k] = v
    return {k: safe(v, k) for k, v in fields.items()}


# --------------------------------------------------------------------------- formatters
_CORE = ("time", "level", "logger", "message")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339 UTC), level, logger, message, context, exc."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {"time": utc_timestamp(record.created), "level": record.levelname.lower(),
                               "logger": record.name, "message": message_of(record)}
        for k, v in context_of(record).items():
            obj[k if k not in _CORE else f"ctx_{k}"] = v
        if record.exc_info and record.exc_info[1] is not None:
            obj["exc"] = scrub(self.formatException(record.exc_info))
        if record.stack_info:
            obj["stack"] = scrub(self.formatStack(record.stack_info))
        return json.dumps(obj, ensure_ascii=False, default=lambda o: scrub(str(o)))


class HumanFormatter(logging.Formatter):
    """``08:27:06.123 INFO  isthmus.ike: IKE SA established  tunnel=to-b peer=198.51.100.2``."""

    def __init__(self, with_date: bool = False) -> None:
        super().__init__()
        self.with_date = with_date

    def format(self, record: logging.LogRecord) -> str:
        dt = datetime.fromtimestamp(record.created, tz=timezone.utc).astimezone()
        stamp = dt.strftime("%Y-%m-%d %H:%M:%S" if self.with_date else "%H:%M:%S") + f".{dt.microsecond // 1000:03d}"
        line = f"{stamp} {record.levelname:<7} {record.name}: {message_of(record)}"
        ctx = context_of(record)
        if ctx:
            line += "  " + " ".join(f"{k}={_human_value(v)}" for k, v in ctx.items())
        if record.exc_info and record.exc_info[1] is not None:
            line += "\n" + scrub(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + scrub(self.formatStack(record.stack_info))
        return line


def _human_value(v: Any) -> str:
    if isinstance(v, str):
        return v if v and not re.search(r"[\s\"=]", v) else json.dumps(v, ensure_ascii=False)
    return json.dumps(v, ensure_ascii=False, default=str)


# --------------------------------------------------------------------------- setup
_installed: logging.Handler | None = None


class LineBatchingHandler(logging.StreamHandler):
    """A StreamHandler that, inside a running asyncio loop, writes and flushes once at the end of
    the loop's current round of callbacks instead of once per line: a burst of lines (a Child SA
    coming up logs three) is one write(2), not one each, whatever the stream's own buffering
    (issue 13: in the lab guest, with PYTHONUNBUFFERED, every line was a write that cost more
    than formatting it). Anywhere else (other threads, no loop) each line is written and flushed
    at once, as StreamHandler does; so is everything pending at exit (logging's shutdown)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._flush_pending = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except RecursionError:  # pragma: no cover - as logging.StreamHandler
            raise
        except Exception:  # noqa: BLE001
            self.handleError(record)
            return
        loop = None
        aio = sys.modules.get("asyncio")
        if aio is not None and threading.current_thread() is threading.main_thread():
            try:
                loop = aio.get_running_loop()
            except RuntimeError:
                loop = None
        self._lines.append(line)
        if loop is None:
            self.flush()
        elif not self._flush_pending:
            self._flush_pending = True
            try:
                loop.call_soon(self._flush_soon)
            except RuntimeError:   # the loop is closing
                self._flush_pending = False
                self.flush()

    def _flush_soon(self) -> None:
        self._flush_pending = False
        self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self._lines:
                text, self._lines = "".join(self._lines), []
                try:
                    self.stream.write(text)
                except Exception:  # noqa: BLE001 - as logging: a broken stream must not break us
                    pass
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()
        finally:
            self.release()


def setup_logging(level: str | int = "info", fmt: str = "auto", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (default stdout) in ``fmt``: ``json``, ``human`` or
    ``auto`` (human on a terminal, JSON otherwise — journald, files, pipes). Replaces the handler
    a previous call installed; returns the new one."""
    global _installed
    stream = stream if stream is not None else sys.stdout
    if fmt == "auto":
        fmt = "human" if _isatty(stream) and "JOURNAL_STREAM" not in os.environ else "json"
    if fmt not in ("json", "human"):
        raise ValueError(f"log format {fmt!r}; allowed: json, human, auto")
    if isinstance(level, str):
        lvl = logging.getLevelName(level.upper())
        if not isinstance(lvl, int):
            raise ValueError(f"log level {level!r}; allowed: debug, info, warning, error, critical")
        level = lvl
    handler = LineBatchingHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    _installed = handler
    return handler


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


__all__ = ["REDACTED", "HumanFormatter", "JsonFormatter", "LineBatchingHandler", "bind", "forget_registered_secrets", "is_secret_name",
           "log_context", "message_of", "register_secret", "register_secret_type", "safe", "scrub",
           "setup_logging"]
