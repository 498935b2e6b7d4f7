"""The appliance's nftables table: TCP MSS clamping on each tunnel interface.

Isthmus owns one table, ``inet isthmus``, and nothing else in the ruleset. Its only chain hooks
``forward`` at the mangle priority and clamps the MSS option of TCP SYNs (and SYN-ACKs) crossing a
tunnel interface, in both directions, to what fits the tunnel's inner MTU:

    oifname "xfrm-b" meta nfproto ipv4 tcp flags syn / syn,rst
        tcp option maxseg size > 1406 tcp option maxseg size set 1406

At start-up (and to recover) the table is rewritten whole, in one ``nft -f`` transaction (create
it, delete it, define it again): the kernel swaps old for new atomically, so no SYN ever sees a
half-written table. Each rule's comment names its tunnel (``isthmus:<tunnel> out|in``), which is
how :func:`read_clamps` finds what an earlier run left behind.

After that, :class:`ClampTable` changes one tunnel's four rules at a time (issue 13: rewriting the
table for every Child SA cost time in proportion to the number of tunnels): one transaction
deletes the tunnel's old rules by handle and adds the new ones. The handles come from the kernel
itself: a NETLINK_NETFILTER socket subscribed to the nf_tables notification group sees every
committed NEWRULE with its handle and comment (what ``nft monitor`` reads). ``nft --echo`` would
print them too, but to print it loads the whole ruleset first, which again grows with the tunnels.
Whenever the handles of a tunnel are not known for sure (a lost notification, a failed
transaction, someone else editing our table) the next change rewrites the table whole.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import os
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass
from typing import Iterable, Mapping

FAMILY = "inet"
TABLE = "isthmus"
CHAIN = "mss_clamp"
COMMENT_PREFIX = "isthmus:"


class NftError(RuntimeError):
    """nft refused the ruleset or could not run; the message carries nft's own words."""


@dataclass(frozen=True)
class MssClamp:
    """Clamp TCP MSS on `ifname` (both directions) to `mss4` (IPv4) and `mss6` (IPv6)."""

    tunnel: str
    ifname: str
    mss4: int
    mss6: int


def _rules(c: MssClamp, chain_ref: str | None = None) -> list[str]:
    """The four rules of one tunnel (out/in x IPv4/IPv6), as rule text or, with `chain_ref`
    (``inet isthmus mss_clamp``), as ``add rule`` commands."""
    out = []
    for direction, match in (("out", "oifname"), ("in", "iifname")):
        for proto, mss in (("ipv4", c.mss4), ("ipv6", c.mss6)):
            rule = (f'{match} "{c.ifname}" meta nfproto {proto} tcp flags syn / syn,rst '
                    f"tcp option maxseg size > {mss} tcp option maxseg size set {mss} "
                    f'comment "{COMMENT_PREFIX}{c.tunnel} {direction}"')
            out.append(f"add rule {chain_ref} {rule}" if chain_ref else rule)
    return out


def render(clamps: Iterable[MssClamp]) -> str:
    """The whole table as one nft script that replaces any previous version atomically."""
    lines = [
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        f"\tchain {CHAIN} {{",
        "\t\ttype filter hook forward priority mangle; policy accept;",
    ]
    for c in sorted(clamps, key=lambda c: (c.ifname, c.tunnel)):
        lines += [f"\t\t{r}" for r in _rules(c)]
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


def _netns_prefix(netns: str | None) -> list[str]:
    if netns is None:
        return []
    path = netns if "/" in netns else f"/var/run/netns/{netns}"
    return ["nsenter", f"--net={path}", "--"]


class _LibNftables:
    """libnftables (the library the nft command is made of), called in-process through ctypes:
    the same script text as ``nft -f -``, without starting a program for every Child SA (a
    fork and exec of nft cost more CPU than the whole IKE exchange in the lab guest, issue 13).
    Used for the daemon's own namespace; another namespace (tests, benchmarks) goes through
    ``nsenter ... nft``. One context per thread that uses it."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("nftables") or "libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self.lib = lib
        self._local = threading.local()

    def _ctx(self) -> int:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self.lib.nft_ctx_new(0)
            if not ctx:
                raise NftError("nft: libnftables could not make a context")
            self.lib.nft_ctx_buffer_output(ctx)
            self.lib.nft_ctx_buffer_error(ctx)
            self._local.ctx = ctx
        return ctx

    def run(self, script: str) -> str:
        ctx = self._ctx()
        rc = self.lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = (self.lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (self.lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError("nft: " + (err.strip() or f"libnftables returned {rc}"))
        return out


_LIB: _LibNftables | None = None
_LIB_TRIED = False


def _library() -> _LibNftables | None:
    global _LIB, _LIB_TRIED
    if not _LIB_TRIED:
        _LIB_TRIED = True
        try:
            _LIB = _LibNftables()
        except (OSError, AttributeError):   # no libnftables: the nft program does the same
            _LIB = None
    return _LIB


def _nft(args: list[str], netns: str | None, stdin: str | None = None) -> str:
    if netns is None and args == ["-f", "-"] and stdin is not None and (lib := _library()) is not None:
        return lib.run(stdin)
    argv = _netns_prefix(netns) + ["nft", *args]
    try:
        r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as e:
        raise NftError(f"cannot run {argv[0]}: {e}") from None
    except subprocess.TimeoutExpired:
        raise NftError(f"nft {' '.join(args)} did not finish in 30 s") from None
    if r.returncode != 0:
        raise NftError("nft: " + ((r.stderr or r.stdout).strip() or f"exited with status {r.returncode}"))
    return r.stdout


def apply(clamps: Iterable[MssClamp], netns: str | None = None) -> None:
    """Replace the table with one that clamps exactly `clamps`."""
    _nft(["-f", "-"], netns, stdin=render(clamps))


def remove(netns: str | None = None) -> None:
    """Delete the table (nothing else) if it exists."""
    _nft(["-f", "-"], netns, stdin=f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")


def read_clamps(netns: str | None = None) -> list[MssClamp] | None:
    """The clamps the table holds now (None: there is no table)."""
    try:
        out = _nft(["-j", "list", "table", FAMILY, TABLE], netns)
    except NftError as e:
        if "No such file" in str(e) or "does not exist" in str(e):
            return None
        raise
    return parse_clamps(json.loads(out))


def parse_clamps(doc: dict) -> list[MssClamp]:
    """Clamps from ``nft -j list table inet isthmus`` output (rules with our comment)."""
    found: dict[tuple[str, str], dict] = {}
    for item in doc.get("nftables", []):
        rule = item.get("rule")
        if not rule or not str(rule.get("comment", "")).startswith(COMMENT_PREFIX):
            continue
        tunnel = rule["comment"][len(COMMENT_PREFIX):].rsplit(" ", 1)[0]
        ifname = proto = None
        mss = None
        for e in rule.get("expr", []):
            match = e.get("match")
            if match:
                key = match.get("left", {}).get("meta", {}).get("key") if isinstance(match.get("left"), dict) else None
                if key in ("oifname", "iifname"):
                    ifname = match.get("right")
                elif key == "nfproto":
                    proto = match.get("right")
            mangle = e.get("mangle")
            if mangle:
                mss = mangle.get("value")
        if ifname and proto and mss:
            entry = found.setdefault((tunnel, ifname), {})
            entry[proto] = int(mss)
    return [MssClamp(tunnel=t, ifname=i, mss4=v.get("ipv4", 0), mss6=v.get("ipv6", 0))
            for (t, i), v in sorted(found.items())]


# nf_tables notifications (linux/netfilter/nfnetlink.h, nf_tables.h, libnftnl's udata.h)
NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
_NFT_MSG_NEWRULE = (10 << 8) | 6          # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE
_NFTA_RULE_TABLE, _NFTA_RULE_CHAIN, _NFTA_RULE_HANDLE, _NFTA_RULE_USERDATA = 1, 2, 3, 7
_UDATA_RULE_COMMENT = 0
_NFPROTO_INET = 1
_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP = 270, 1


def parse_rule_notifications(data: bytes) -> list[tuple[int, str]]:
    """(handle, comment) of each NEWRULE of our table in a datagram of nf_tables notifications."""
    out = []
    offset = 0
    while offset + 20 <= len(data):
        length, mtype = struct.unpack_from("IH", data, offset)
        if length < 16:
            break
        end = offset + length
        if mtype == _NFT_MSG_NEWRULE and data[offset + 16] == _NFPROTO_INET:
            table = chain = comment = None
            handle = None
            a = offset + 20
            while a + 4 <= end:
                alen, atype = struct.unpack_from("HH", data, a)
                if alen < 4:
                    break
                val = data[a + 4:a + alen]
                atype &= 0x3FFF
                if atype == _NFTA_RULE_TABLE:
                    table = val.split(b"\0", 1)[0].decode(errors="replace")
                elif atype == _NFTA_RULE_CHAIN:
                    chain = val.split(b"\0", 1)[0].decode(errors="replace")
                elif atype == _NFTA_RULE_HANDLE and len(val) == 8:
                    (handle,) = struct.unpack(">Q", val)
                elif atype == _NFTA_RULE_USERDATA:
                    u = 0
                    while u + 2 <= len(val):
                        utype, ulen = val[u], val[u + 1]
                        if utype == _UDATA_RULE_COMMENT:
                            comment = val[u + 2:u + 2 + ulen].split(b"\0", 1)[0].decode(errors="replace")
                        u += 2 + ulen
                a += (alen + 3) & ~3
            if table == TABLE and chain == CHAIN and handle is not None and comment:
                out.append((handle, comment))
        offset += (length + 3) & ~3
    return out


# One tunnel's rules as nf_tables netlink messages (linux/netfilter/nf_tables.h), sent as one
# batch (one transaction) on our own NETLINK_NETFILTER socket: what libnftables does for the
# script `_rules()` renders, without parsing the script and loading its cache each time (issue 13:
# libnftables cost ~20 ms of the data plane thread per Child SA in the lab guest).
# tests/host/test_xfrm_host.py checks that the kernel lists these rules exactly as nft's own.
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_CREATE, _NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
_NLMSG_ERROR = 2
_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END, _NFNL_SUBSYS_NFTABLES = 16, 17, 10
_NFT_MSG_DELRULE = (10 << 8) | 8
_NLA_F_NESTED = 0x8000
_NFTA_RULE_EXPRESSIONS = 4
_NFTA_LIST_ELEM, _NFTA_EXPR_NAME, _NFTA_EXPR_DATA, _NFTA_DATA_VALUE = 1, 1, 2, 1
_NFT_REG_1 = 1
_META_IIFNAME, _META_OIFNAME, _META_NFPROTO, _META_L4PROTO = 6, 7, 15, 16
_CMP_EQ, _CMP_GT = 0, 4
_PAYLOAD_TRANSPORT = 2
_TCPOPT_MAXSEG, _EXTHDR_OP_TCPOPT = 2, 1
_NFPROTO = {"ipv4": 2, "ipv6": 10}


def _nla(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, atype) + payload + b"\0" * (-n % 4)


def _nest(atype: int, *parts: bytes) -> bytes:
    return _nla(atype | _NLA_F_NESTED, b"".join(parts))


def _be32(atype: int, v: int) -> bytes:
    return _nla(atype, struct.pack(">I", v))


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(_NFTA_LIST_ELEM, _nla(_NFTA_EXPR_NAME, name.encode() + b"\0"), _nest(_NFTA_EXPR_DATA, *attrs))


def _cmp(op: int, value: bytes) -> bytes:
    return _expr("cmp", _be32(1, _NFT_REG_1), _be32(2, op), _nest(3, _nla(_NFTA_DATA_VALUE, value)))


def _meta(key: int) -> bytes:
    return _expr("meta", _be32(2, key), _be32(1, _NFT_REG_1))


def _maxseg(write: bool) -> bytes:
    return _expr("exthdr", _be32(7 if write else 1, _NFT_REG_1), _nla(2, bytes((_TCPOPT_MAXSEG,))),
                 _be32(3, 2), _be32(4, 2), _be32(6, _EXTHDR_OP_TCPOPT))


def _nfgen(family: int, res_id: int = 0) -> bytes:
    return struct.pack("=BB", family, 0) + struct.pack(">H", res_id)


def _table_chain() -> bytes:
    return _nla(1, TABLE.encode() + b"\0") + _nla(2, CHAIN.encode() + b"\0")


@functools.lru_cache(maxsize=None)
def _fixed(what: str) -> bytes:
    """The expressions every rule shares, encoded once (a tunnel's install is four rules of 13
    expressions: encoding them all each time cost more than libnftables did)."""
    return {
        "out": _meta(_META_OIFNAME), "in": _meta(_META_IIFNAME),
        "ipv4": _meta(_META_NFPROTO) + _cmp(_CMP_EQ, bytes((_NFPROTO["ipv4"],))),
        "ipv6": _meta(_META_NFPROTO) + _cmp(_CMP_EQ, bytes((_NFPROTO["ipv6"],))),
        "syn": (_meta(_META_L4PROTO) + _cmp(_CMP_EQ, bytes((socket.IPPROTO_TCP,)))
                + _expr("payload", _be32(1, _NFT_REG_1), _be32(2, _PAYLOAD_TRANSPORT), _be32(3, 13), _be32(4, 1))
                + _expr("bitwise", _be32(1, _NFT_REG_1), _be32(2, _NFT_REG_1), _be32(3, 1),
                        _nest(4, _nla(_NFTA_DATA_VALUE, b"\x06")), _nest(5, _nla(_NFTA_DATA_VALUE, b"\x00")))
                + _cmp(_CMP_EQ, b"\x02") + _maxseg(False)),
        "write": _maxseg(True),
        "head": _nfgen(_NFPROTO_INET) + _table_chain(),
    }[what]


def rule_messages(c: MssClamp) -> list[tuple[int, int, bytes]]:
    """(type, flags, body) of the NEWRULE messages of one tunnel, the rules `_rules(c)` describes,
    in the same order."""
    out = []
    name = _cmp(_CMP_EQ, c.ifname.encode().ljust(16, b"\0"))
    clamp = {}
    for mss in {c.mss4, c.mss6}:
        v = struct.pack(">H", mss)
        clamp[mss] = (_cmp(_CMP_GT, v) + _expr("immediate", _be32(1, _NFT_REG_1), _nest(2, _nla(_NFTA_DATA_VALUE, v)))
                      + _fixed("write"))
    for direction in ("out", "in"):
        for proto, mss in (("ipv4", c.mss4), ("ipv6", c.mss6)):
            exprs = _fixed(direction) + name + _fixed(proto) + _fixed("syn") + clamp[mss]
            comment = f"{COMMENT_PREFIX}{c.tunnel} {direction}".encode() + b"\0"
            body = (_fixed("head") + _nla(_NFTA_RULE_EXPRESSIONS | _NLA_F_NESTED, exprs)
                    + _nla(_NFTA_RULE_USERDATA, bytes((_UDATA_RULE_COMMENT, len(comment))) + comment))
            out.append((_NFT_MSG_NEWRULE, _NLM_F_CREATE | _NLM_F_APPEND, body))
    return out


def delete_rule_message(handle: int) -> tuple[int, int, bytes]:
    return _NFT_MSG_DELRULE, 0, _nfgen(_NFPROTO_INET) + _table_chain() + _nla(_NFTA_RULE_HANDLE, struct.pack(">Q", handle))


class NftNetlink:
    """A NETLINK_NETFILTER socket sending nf_tables batches: all messages or none (one
    transaction), each acknowledged. Used from one thread."""

    def __init__(self, netns: str | None = None):
        from appliance.xfrm.netlink import open_netlink_socket
        self.sock = open_netlink_socket(NETLINK_NETFILTER, netns)
        self.sock.bind((0, 0))
        self.sock.settimeout(5.0)
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def transaction(self, messages: list[tuple[int, int, bytes]]) -> None:
        """Send `messages` as one batch; raises NftError with the kernel's reason if it refused
        (then nothing of it was applied)."""
        if not messages:
            return
        parts, pending = [], set()

        def msg(mtype: int, flags: int, body: bytes) -> int:
            self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
            parts.append(struct.pack("=IHHII", 16 + len(body), mtype, flags | _NLM_F_REQUEST, self._seq, 0) + body)
            return self._seq
        msg(_NFNL_MSG_BATCH_BEGIN, 0, _nfgen(socket.AF_UNSPEC, _NFNL_SUBSYS_NFTABLES))
        for mtype, flags, body in messages:
            pending.add(msg(mtype, flags | _NLM_F_ACK, body))
        msg(_NFNL_MSG_BATCH_END, 0, _nfgen(socket.AF_UNSPEC, _NFNL_SUBSYS_NFTABLES))
        try:
            self.sock.sendall(b"".join(parts))
        except OSError as e:
            raise NftError(f"nft: sending an nf_tables transaction: {e}") from None
        first_error: int | None = None
        while pending:
            try:
                data = self.sock.recv(1 << 16)
            except (TimeoutError, socket.timeout):
                if first_error is not None:
                    break           # an aborted batch may not answer every message
                self.sock.settimeout(5.0)
                raise NftError("nft: no answer from the kernel to an nf_tables transaction in 5 s") from None
            except OSError as e:
                self.sock.settimeout(5.0)
                raise NftError(f"nft: reading the answer to an nf_tables transaction: {e}") from None
            off = 0
            while off + 16 <= len(data):
                length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    break
                if mtype == _NLMSG_ERROR and seq in pending and off + 20 <= len(data):
                    pending.discard(seq)
                    (code,) = struct.unpack_from("=i", data, off + 16)
                    if code < 0 and first_error is None:
                        first_error = -code
                        self.sock.settimeout(0.2)
                off += (length + 3) & ~3
        self.sock.settimeout(5.0)
        if first_error is not None:
            raise NftError(f"nft: the kernel refused the transaction: {os.strerror(first_error)} "
                           f"({errno.errorcode.get(first_error, first_error)})")


class ClampTable:
    """Our table in one network namespace, changed one tunnel at a time (see the module text).

    ``sync(old, new)`` makes the table go from clamping `old` to clamping `new` (tunnel name ->
    MssClamp), touching only the tunnels whose clamp differs. Used from one thread."""

    def __init__(self, netns: str | None = None):
        from appliance.xfrm.netlink import open_netlink_socket
        self.netns = netns
        self._handles: dict[str, list[int]] = {}     # tunnel -> handles of its four rules
        self._known = False                          # the table is exactly what we last wrote
        self._sock: socket.socket | None = None
        try:
            self._sock = open_netlink_socket(NETLINK_NETFILTER, netns)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock.bind((0, 0))
            self._sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            self._sock.setblocking(False)
        except OSError:
            # without notifications every change is a whole rewrite (as before issue 13)
            if self._sock is not None:
                self._sock.close()
            self._sock = None
        self._nl: NftNetlink | None = None
        if self._sock is not None:
            try:
                self._nl = NftNetlink(netns)
            except OSError:         # then the changes go through nft scripts
                self._nl = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def _drain(self) -> dict[str, list[int]] | None:
        """Handles of the rules added since the last drain, by tunnel; None: some were lost."""
        found: dict[str, list[int]] = {}
        if self._sock is None:
            return None
        lost = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    lost = True
                    continue
                raise
            for handle, comment in parse_rule_notifications(data):
                if comment.startswith(COMMENT_PREFIX):
                    found.setdefault(comment[len(COMMENT_PREFIX):].rsplit(" ", 1)[0], []).append(handle)
        return None if lost else found

    def reset(self, clamps: Iterable[MssClamp]) -> None:
        """Rewrite the whole table to clamp exactly `clamps`."""
        clamps = list(clamps)
        self._known = False
        self._drain()                 # whatever happened before is of no interest now
        apply(clamps, self.netns)
        added = self._drain()
        self._handles = {}
        if added is not None and all(len(added.get(c.tunnel, ())) == 4 for c in clamps) and \
                len(added) == len(clamps):
            self._handles = added
            self._known = True

    def sync(self, old: Mapping[str, MssClamp], new: Mapping[str, MssClamp],
             among: Iterable[str] | None = None) -> None:
        """`among`: the only tunnels that can differ, when the caller knows (a Child SA's
        install touches one): then nothing walks all the tunnels."""
        keys = set(old) | set(new) if among is None else set(among)
        changed = [t for t in keys if old.get(t) != new.get(t)]
        if not changed:
            return
        if not self._known or any(t in old and len(self._handles.get(t, ())) != 4 for t in changed):
            self.reset(new.values())
            return
        ref = f"{FAMILY} {TABLE} {CHAIN}"
        lines, messages = [], []
        for t in sorted(changed):
            if t in old:
                lines += [f"delete rule {ref} handle {h}" for h in self._handles[t]]
                messages += [delete_rule_message(h) for h in self._handles[t]]
            if t in new:
                lines += _rules(new[t], ref)
                messages += rule_messages(new[t])
        self._drain()
        try:
            if self._nl is not None:
                self._nl.transaction(messages)
            else:
                _nft(["-f", "-"], self.netns, stdin="\n".join(lines) + "\n")
        except NftError:
            # the transaction was aborted as a whole: nothing changed, but the table may not be
            # what we think (that may be why it failed): the next change rewrites it whole
            self._known = False
            self._drain()
            raise
        added = self._drain()
        if added is None:
            self._known = False
            return
        for t in changed:
            self._handles.pop(t, None)
            if t in new:
                if len(added.get(t, ())) != 4:
                    self._known = False
                    return
                self._handles[t] = added[t]

    def forget(self) -> None:
        """The table was removed: the next change writes it whole."""
        self._handles = {}
        self._known = False
