"""What the CLI prints: whitelisted views of the daemon's answers, as tables or stable JSON.

The CLI never prints a field it does not know. Each view below names the fields it shows, their
kind (how they are coerced and rendered) and, for tables, the column title. Anything else the
daemon sends is dropped — so a field that should never have been sent (key material) cannot
reach the terminal or a script. JSON output always has every key of the view, ``null`` when the
daemon did not send it, in the order listed here (docs/control.md is the reference).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# --------------------------------------------------------------------------- kinds
STR, INT, BOOL, SPI4, SPI8, BYTES, PKTS, DURATION, STRLIST, INTLIST, TIME = (
    "str", "int", "bool", "spi4", "spi8", "bytes", "packets", "duration", "strlist", "intlist", "time")

_HEX = re.compile(r"(?:0x)?([0-9a-fA-F]{1,16})\Z")


@dataclass(frozen=True)
class Field:
    key: str
    kind: str
    title: str | None = None  # None: not a table column (JSON only)


@dataclass(frozen=True)
class Nested:
    key: str
    view: tuple[Field | Nested, ...]


View = tuple["Field | Nested", ...]


def coerce(kind: str, value: Any) -> Any:
    """A JSON-safe value of ``kind`` from what the daemon sent, or None when it does not fit."""
    if value is None:
        return None
    if kind in (STR, TIME):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return None
    if kind in (INT, BYTES, PKTS):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return None
    if kind == DURATION:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            return value
        return None
    if kind == BOOL:
        return value if isinstance(value, bool) else None
    if kind in (SPI4, SPI8):
        size = 4 if kind == SPI4 else 8
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << (8 * size):
            return f"0x{value:0{size * 2}x}"
        if isinstance(value, str):
            m = _HEX.match(value.strip())
            if m and len(m.group(1)) <= size * 2:
                return f"0x{int(m.group(1), 16):0{size * 2}x}"
        return None
    if kind == STRLIST:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [coerce(STR, v) for v in value if coerce(STR, v) is not None]
        return None
    if kind == INTLIST:
        if isinstance(value, list):
            return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        return None
    raise ValueError(f"unknown field kind {kind}")


def project(obj: Any, view: Sequence[Field | Nested]) -> dict[str, Any]:
    """The whitelisted, coerced fields of ``obj`` (every key of the view present)."""
    src = obj if isinstance(obj, Mapping) else {}
    out: dict[str, Any] = {}
    for f in view:
        if isinstance(f, Nested):
            sub = src.get(f.key)
            out[f.key] = project(sub, f.view) if isinstance(sub, Mapping) else None
        else:
            out[f.key] = coerce(f.kind, src.get(f.key))
    return out


def project_list(items: Any, view: Sequence[Field | Nested]) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        return []
    return [project(i, view) for i in items if isinstance(i, Mapping)]


# --------------------------------------------------------------------------- human rendering
_UNPRINTABLE = re.compile(r"[^\S ]|[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """Text safe for a terminal: control characters (escape sequences, CR, tabs...) and
    bidirectional overrides shown as ``\\xNN``/``\\uNNNN``, never interpreted."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def human_bytes(n: int) -> str:
    """1023 B, 1.0 KiB, 1.5 MiB, 3.2 GiB (IEC units)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_packets(n: int) -> str:
    return f"{n:,} pkt" + ("" if n == 1 else "s")


def human_duration(seconds: float) -> str:
    """45s, 12m 03s, 1h 02m, 3d 04h."""
    s = int(seconds)
    if s < 0:
        return "-" + human_duration(-seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h:02d}h"


def cell(kind: str, value: Any) -> str:
    """One table cell from a coerced value."""
    if value is None:
        return "-"
    if kind == BOOL:
        return "yes" if value else "no"
    if kind == BYTES:
        return human_bytes(value)
    if kind == PKTS:
        return human_packets(value)
    if kind == DURATION:
        return human_duration(value)
    if kind in (STRLIST, INTLIST):
        return clean(", ".join(str(v) for v in value)) if value else "-"
    return clean(str(value))


Column = tuple[str, Callable[[Mapping[str, Any]], str]]


def columns(view: Sequence[Field | Nested]) -> list[Column]:
    """The titled fields of a view as table columns."""
    return [(f.title, (lambda r, f=f: cell(f.kind, r.get(f.key))))
            for f in view if isinstance(f, Field) and f.title]


def table(rows: Sequence[Mapping[str, Any]], cols: Sequence[Column]) -> str:
    """Rows (already projected) as an aligned text table."""
    grid = [[title for title, _ in cols]]
    for r in rows:
        grid.append([fn(r) for _, fn in cols])
    widths = [max(len(row[i]) for row in grid) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in grid)


def traffic(row: Mapping[str, Any], direction: str) -> str:
    """``1.5 MiB (1,024 pkts)`` from bytes_<dir>/packets_<dir> of a projected row."""
    b, p = row.get(f"bytes_{direction}"), row.get(f"packets_{direction}")
    if b is None and p is None:
        return "-"
    text = human_bytes(b) if b is not None else "?"
    return f"{text} ({human_packets(p)})" if p is not None else text


def to_json(obj: Any) -> str:
    """Pretty JSON for one answer."""
    return json.dumps(obj, indent=2, ensure_ascii=False)


def to_json_line(obj: Any) -> str:
    """Compact JSON on one line (event streams)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- the views
VERSION: View = (Field("version", STR), Field("protocol", INT), Field("pid", INT))

STATUS: View = (
    Field("name", STR), Field("version", STR), Field("pid", INT), Field("uptime", DURATION),
    Field("config", STR),
    Nested("tunnels", (Field("configured", INT), Field("up", INT))),
    Nested("sas", (Field("ike", INT), Field("child", INT), Field("half_open", INT))),
    Nested("bgp", (Field("sessions", INT), Field("established", INT))),
)

TUNNEL: View = (
    Field("name", STR, "TUNNEL"), Field("state", STR, "STATE"), Field("remote", STR, "REMOTE"),
    Field("remote_id", STR, "REMOTE ID"), Field("local", STR), Field("local_id", STR),
    Field("interface", STR, "INTERFACE"), Field("start", BOOL), Field("ike_sas", INT),
    Field("child_sas", INT, "CHILD SAS"), Field("established", DURATION, "UP FOR"),
    Field("cert_days_left", INT, "CERT DAYS"), Field("peer_cert_days_left", INT, "PEER CERT DAYS"),
    Field("last_error", STR),
    Field("bytes_in", BYTES), Field("packets_in", PKTS), Field("bytes_out", BYTES), Field("packets_out", PKTS),
)

IKE_SA: View = (
    Field("tunnel", STR, "TUNNEL"), Field("state", STR, "STATE"), Field("role", STR, "ROLE"),
    Field("local", STR, "LOCAL"), Field("remote", STR, "REMOTE"), Field("local_id", STR),
    Field("remote_id", STR, "REMOTE ID"), Field("spi_i", SPI8, "SPI I"), Field("spi_r", SPI8, "SPI R"),
    Field("proposal", STR, "PROPOSAL"), Field("nat", STR, "NAT"), Field("age", DURATION, "AGE"),
    Field("rekey_in", DURATION, "REKEY IN"),
)

CHILD_SA: View = (
    Field("tunnel", STR, "TUNNEL"), Field("state", STR, "STATE"), Field("spi_in", SPI4, "SPI IN"),
    Field("spi_out", SPI4, "SPI OUT"), Field("proposal", STR, "PROPOSAL"), Field("interface", STR, "INTERFACE"),
    Field("if_id", INT), Field("encap", BOOL), Field("ts_local", STRLIST), Field("ts_remote", STRLIST),
    Field("age", DURATION, "AGE"), Field("rekey_in", DURATION, "REKEY IN"),
    Field("bytes_in", BYTES), Field("packets_in", PKTS), Field("bytes_out", BYTES), Field("packets_out", PKTS),
)

ROUTE: View = (
    Field("prefix", STR, "PREFIX"), Field("next_hop", STR, "NEXT HOP"), Field("interface", STR, "INTERFACE"),
    Field("tunnel", STR, "TUNNEL"), Field("source", STR, "SOURCE"), Field("as_path", INTLIST, "AS PATH"),
    Field("installed", BOOL, "INSTALLED"), Field("active", BOOL, "ACTIVE"), Field("best", BOOL),
    Field("reason", STR, "WHY"),
    Field("local_pref", INT), Field("med", INT), Field("origin", STR), Field("dampening", STR),
)

BGP: View = (Field("asn", INT), Field("router_id", STR), Field("fib_routes", INT),
             Nested("speaker", (Field("running", BOOL), Field("connected", BOOL), Field("restarts", INT),
                                Field("pending_acks", INT))))

BGP_NEIGHBOR: View = (
    Field("tunnel", STR, "TUNNEL"), Field("peer_address", STR, "PEER"), Field("peer_as", INT, "AS"),
    Field("state", STR, "STATE"), Field("uptime", DURATION, "UP FOR"),
    Field("prefixes_received", INT, "RECEIVED"), Field("prefixes_accepted", INT, "ACCEPTED"),
    Field("prefixes_filtered", INT, "FILTERED"), Field("prefixes_advertised", INT, "ADVERTISED"),
    Field("hold_time", INT, "HOLD"), Field("last_error", STR, "LAST ERROR"),
    Field("local_address", STR), Field("configured_hold_time", INT), Field("import", STR), Field("export", STR),
)

OPERATION: View = (Field("tunnel", STR), Field("state", STR), Field("message", STR))

RELOAD: View = (Field("added", STRLIST), Field("removed", STRLIST), Field("changed", STRLIST),
                Field("unchanged", STRLIST))

CONFIG_ISSUE: View = (Field("file", STR), Field("line", INT), Field("path", STR), Field("tunnel", STR),
                      Field("message", STR))

#: Event fields the CLI shows; ``type``, ``time``, ``tunnel`` first (docs/control.md lists the
#: event types). Unknown fields are dropped like everywhere else.
EVENT: View = (
    Field("type", STR), Field("time", TIME), Field("tunnel", STR), Field("state", STR), Field("kind", STR),
    Field("role", STR), Field("reason", STR), Field("message", STR), Field("local", STR), Field("remote", STR),
    Field("remote_id", STR), Field("spi_i", SPI8), Field("spi_r", SPI8), Field("old_spi_i", SPI8),
    Field("old_spi_r", SPI8), Field("spi_in", SPI4), Field("spi_out", SPI4), Field("old_spi_in", SPI4),
    Field("old_spi_out", SPI4), Field("proposal", STR), Field("interface", STR), Field("peer_address", STR),
    Field("peer_as", INT), Field("prefix", STR), Field("count", INT), Field("added", STRLIST),
    Field("removed", STRLIST), Field("changed", STRLIST), Field("action", STR),
    Field("limit", INT), Field("delay", INT), Field("stale_routes", INT), Field("restarts", INT),
)


def event_json(ev: Any) -> dict[str, Any]:
    """An event for ``events --json``: the known fields that are present (events differ in shape)."""
    full = project(ev, EVENT)
    keep = {"type", "time", "tunnel"}
    return {k: v for k, v in full.items() if k in keep or v is not None}


def event_line(ev: Any) -> str:
    """``2026-11-28T08:27:06.123Z  child_sa_up  to-b  spi_in=0xc1a2b3c4 spi_out=0x0000abcd``."""
    e = event_json(ev)
    kinds = {f.key: f.kind for f in EVENT if isinstance(f, Field)}
    head = f"{cell(TIME, e.get('time'))}  {cell(STR, e.get('type')):<16} {cell(STR, e.get('tunnel'))}"
    rest = []
    for k, v in e.items():
        if k in ("type", "time", "tunnel"):
            continue
        text = cell(kinds[k], v)
        rest.append(f"{k}={json.dumps(text, ensure_ascii=False) if re.search(r'[ =]', text) else text}")
    return head + ("  " + " ".join(rest) if rest else "")
