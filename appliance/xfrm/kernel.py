"""Typed XFRM operations: SAs and policies in, SAs and policies out.

:class:`Xfrm` turns :class:`SaSpec` / :class:`PolicySpec` into XFRM netlink messages
(:mod:`appliance.xfrm.messages`) and kernel answers into :class:`SaState` / :class:`PolicyState`.
What is read back never carries keys: the kernel returns them to a privileged reader, and this
module drops them while decoding.

Every SA and policy Isthmus installs carries an ``XFRMA_IF_ID`` in the owned range
(:data:`appliance.xfrm.model.IF_ID_MIN`-:data:`~appliance.xfrm.model.IF_ID_MAX`); that is the mark
:meth:`Xfrm.flush_ours` and reconciliation go by. XFRM_MSG_FLUSHSA / FLUSHPOLICY are never sent:
they would remove every SA of the namespace, ours or not.

SAs are tunnel mode with an AF_UNSPEC selector (``XFRM_STATE_AF_UNSPEC``): one SA pair carries
both IPv4 and IPv6 inner traffic, whatever the outer family. The replay state is always given as
``XFRMA_REPLAY_ESN_VAL`` (bitmap mode, or ESN mode with ``XFRM_STATE_ESN``), which allows windows
beyond 32 packets and lets an SA be re-created with the sequence numbers it had (MOBIKE).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL

from appliance.xfrm import messages as m
from appliance.xfrm.model import IF_ID_MAX, IF_ID_MIN, EspAlgorithms, IPAddress, Lifetime, SaKeys
from appliance.xfrm.netlink import NetlinkError, Request, XfrmSocket

AF_BY_VERSION = {4: socket.AF_INET, 6: socket.AF_INET6}
DIRECTIONS = {"in": m.XFRM_POLICY_IN, "out": m.XFRM_POLICY_OUT, "fwd": m.XFRM_POLICY_FWD}
DIRECTION_NAMES = {v: k for k, v in DIRECTIONS.items()}


def addr_bytes(addr: IPAddress) -> bytes:
    """xfrm_address_t: the address in network order, zero-padded to 16 bytes."""
    return addr.packed.ljust(16, b"\0")


def addr_from(raw: bytes, family: int) -> IPAddress:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(bytes(raw[:4]))
    if family == socket.AF_INET6:
        return ipaddress.IPv6Address(bytes(raw[:16]))
    raise ValueError(f"unknown address family {family}")


def _limit(v: int | None) -> int:
    return m.XFRM_INF if v is None else v


def _unlimit(v: int) -> int | None:
    return None if v == m.XFRM_INF else v


def _cstr(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class ReplayState:
    """Sequence numbers and replay bitmap of an SA (struct xfrm_replay_state_esn)."""

    oseq: int = 0
    seq: int = 0
    oseq_hi: int = 0
    seq_hi: int = 0
    replay_window: int = 0
    bitmap: tuple[int, ...] = ()

    @property
    def outbound_seq(self) -> int:
        """The last sequence number sent (64 bits with ESN)."""
        return (self.oseq_hi << 32) | self.oseq

    @property
    def inbound_seq(self) -> int:
        """The highest sequence number received (64 bits with ESN)."""
        return (self.seq_hi << 32) | self.seq


@dataclass(frozen=True)
class LifetimeCurrent:
    """struct xfrm_lifetime_cur: what an SA has carried, and when it was added / last used."""

    bytes: int = 0
    packets: int = 0
    add_time: int = 0
    use_time: int = 0


@dataclass(frozen=True)
class SaSpec:
    """One ESP SA to install (tunnel mode)."""

    src: IPAddress
    dst: IPAddress
    spi: int
    algorithms: EspAlgorithms
    keys: SaKeys
    if_id: int
    reqid: int
    outbound: bool
    encap: tuple[int, int] | None = None     # (source port, destination port) of ESP-in-UDP
    esn: bool = False
    replay_window: int = 64
    lifetime: Lifetime = field(default_factory=Lifetime)
    replay: ReplayState | None = None         # initial replay state (re-creating an SA)
    current: LifetimeCurrent | None = None    # initial counters and add time (re-creating an SA)

    @property
    def family(self) -> int:
        return AF_BY_VERSION[self.dst.version]

    def describe(self) -> str:
        direction = "outbound" if self.outbound else "inbound"
        return f"{direction} SA {self.spi:#010x} {self.src} -> {self.dst}"


@dataclass(frozen=True)
class SaState:
    """An SA as the kernel reports it (no keys)."""

    src: IPAddress
    dst: IPAddress
    spi: int
    proto: int
    reqid: int
    if_id: int
    mode: int
    flags: int
    encryption: str | None
    integrity: str | None
    icv_bits: int | None
    encap: tuple[int, int, int] | None          # (type, sport, dport)
    lifetime: Lifetime
    current: LifetimeCurrent
    replay: ReplayState
    replay_errors: int                          # stats.replay: packets dropped as replays
    integrity_failures: int                     # stats.integrity_failed

    @property
    def esn(self) -> bool:
        return bool(self.flags & m.XFRM_STATE_ESN)

    @property
    def ours(self) -> bool:
        return IF_ID_MIN <= self.if_id <= IF_ID_MAX


@dataclass(frozen=True)
class PolicySpec:
    """A policy: traffic between `selector` networks, in `direction`, through ESP in tunnel mode
    between `tmpl_src` and `tmpl_dst`, for the XFRM interface with `if_id`."""

    direction: str
    selector: ipaddress.IPv4Network | ipaddress.IPv6Network
    if_id: int
    reqid: int
    tmpl_src: IPAddress
    tmpl_dst: IPAddress
    priority: int = 0

    def describe(self) -> str:
        return (f"{self.direction} policy {self.selector} if_id {self.if_id:#x} "
                f"(tunnel {self.tmpl_src} -> {self.tmpl_dst})")


@dataclass(frozen=True)
class PolicyState:
    direction: str
    src: ipaddress.IPv4Network | ipaddress.IPv6Network
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    if_id: int
    priority: int
    index: int
    action: int
    templates: tuple[tuple[IPAddress | None, IPAddress | None, int, int], ...]  # (src, dst, reqid, mode)

    @property
    def ours(self) -> bool:
        return IF_ID_MIN <= self.if_id <= IF_ID_MAX

    @property
    def family(self) -> int:
        return AF_BY_VERSION[self.src.version]


# --- message builders (pure) ----------------------------------------------------------------------


def sa_message(spec: SaSpec) -> m.xfrm_usersa_info:
    """XFRM_MSG_NEWSA / UPDSA body for `spec`."""
    msg = m.xfrm_usersa_info()
    msg["sel_daddr"] = msg["sel_saddr"] = bytes(16)
    msg["sel_family"] = socket.AF_UNSPEC
    msg["id_daddr"] = addr_bytes(spec.dst)
    msg["id_spi"] = spec.spi
    msg["id_proto"] = m.IPPROTO_ESP
    msg["saddr"] = addr_bytes(spec.src)
    lt = spec.lifetime
    for name, v in (("soft_byte_limit", lt.soft_bytes), ("hard_byte_limit", lt.hard_bytes),
                    ("soft_packet_limit", lt.soft_packets), ("hard_packet_limit", lt.hard_packets),
                    ("soft_add_expires_seconds", lt.soft_seconds), ("hard_add_expires_seconds", lt.hard_seconds)):
        msg[f"lft_{name}"] = _limit(v)
    # "use" expiry counts from the first packet; unused here (0 = none).
    msg["lft_soft_use_expires_seconds"] = msg["lft_hard_use_expires_seconds"] = 0
    if lt.soft_seconds is None:
        msg["lft_soft_add_expires_seconds"] = 0
    if lt.hard_seconds is None:
        msg["lft_hard_add_expires_seconds"] = 0
    msg["reqid"] = spec.reqid
    msg["family"] = spec.family
    msg["mode"] = m.XFRM_MODE_TUNNEL
    msg["replay_window"] = 0  # the window travels in XFRMA_REPLAY_ESN_VAL
    msg["flags"] = m.XFRM_STATE_AF_UNSPEC | (m.XFRM_STATE_ESN if spec.esn else 0)
    attrs: list = []
    alg = spec.algorithms
    key = spec.keys
    if alg.aead:
        attrs.append(["XFRMA_ALG_AEAD", {"alg_name": alg.encryption.encode(), "alg_key_len": len(key.encryption) * 8,
                                         "alg_icv_len": alg.icv_bits, "alg_key": key.encryption}])
    else:
        attrs.append(["XFRMA_ALG_CRYPT", {"alg_name": alg.encryption.encode(),
                                          "alg_key_len": len(key.encryption) * 8, "alg_key": key.encryption}])
        attrs.append(["XFRMA_ALG_AUTH_TRUNC", {"alg_name": (alg.integrity or "").encode(),
                                               "alg_key_len": len(key.integrity) * 8,
                                               "alg_trunc_len": alg.icv_bits, "alg_key": key.integrity}])
    if spec.encap is not None:
        attrs.append(["XFRMA_ENCAP", {"encap_type": m.UDP_ENCAP_ESPINUDP, "encap_sport": spec.encap[0],
                                      "encap_dport": spec.encap[1], "encap_oa": bytes(16)}])
    if spec.replay_window or spec.esn:
        r = spec.replay or ReplayState()
        words = (spec.replay_window + 31) // 32
        bitmap = list(r.bitmap[:words]) + [0] * (words - len(r.bitmap[:words]))
        if spec.outbound:
            # the kernel wants no receive state on an SA that only sends
            replay = {"bmp_len": words, "oseq": r.oseq, "oseq_hi": r.oseq_hi, "seq": 0, "seq_hi": 0,
                      "replay_window": spec.replay_window, "bmp": [0] * words}
        else:
            replay = {"bmp_len": words, "oseq": 0, "oseq_hi": 0, "seq": r.seq, "seq_hi": r.seq_hi,
                      "replay_window": spec.replay_window, "bmp": bitmap}
        attrs.append(["XFRMA_REPLAY_ESN_VAL", replay])
    if spec.current is not None:
        c = spec.current
        attrs.append(["XFRMA_LTIME_VAL", {"bytes": c.bytes, "packets": c.packets, "add_time": c.add_time,
                                          "use_time": c.use_time}])
    attrs.append(["XFRMA_IF_ID", spec.if_id])
    msg["attrs"] = attrs
    return msg


_LFT_CFG = struct.Struct("=8Q")
_SA_TAIL = struct.Struct("=IIIIIHBBB7x")               # stats (3), seq, reqid, family, mode, replay_window, flags
_ALGO = struct.Struct("=64sI")                         # struct xfrm_algo
_ALGO2 = struct.Struct("=64sII")                       # struct xfrm_algo_auth / xfrm_algo_aead
_LFT_CUR = struct.Struct("=4Q")
_XFRMA_ALG_CRYPT, _XFRMA_ENCAP, _XFRMA_LTIME_VAL, _XFRMA_ALG_AEAD = 2, 4, 9, 18
_XFRMA_ALG_AUTH_TRUNC, _XFRMA_REPLAY_ESN_VAL = 20, 23


def _nla(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, atype) + payload + b"\0" * (-n % 4)


def sa_body(spec: SaSpec) -> bytes:
    """The bytes sa_message(spec) encodes to (after the netlink header), built with struct: two
    SAs go in per Child SA and pyroute2's generic encoder cost more than the kernel's work
    (issue 13). tests/unit/test_xfrm_messages.py checks both agree."""
    lt = spec.lifetime
    body = [bytes(56),                                   # selector: AF_UNSPEC, all zero
            addr_bytes(spec.dst), spec.spi.to_bytes(4, "big"), bytes((m.IPPROTO_ESP, 0, 0, 0)),
            addr_bytes(spec.src),
            _LFT_CFG.pack(_limit(lt.soft_bytes), _limit(lt.hard_bytes), _limit(lt.soft_packets),
                          _limit(lt.hard_packets), lt.soft_seconds or 0, lt.hard_seconds or 0, 0, 0),
            bytes(32),
            _SA_TAIL.pack(0, 0, 0, 0, spec.reqid, spec.family, m.XFRM_MODE_TUNNEL, 0,
                          m.XFRM_STATE_AF_UNSPEC | (m.XFRM_STATE_ESN if spec.esn else 0))]
    alg, key = spec.algorithms, spec.keys
    if alg.aead:
        body.append(_nla(_XFRMA_ALG_AEAD, _ALGO2.pack(alg.encryption.encode(), len(key.encryption) * 8,
                                                      alg.icv_bits) + key.encryption))
    else:
        body.append(_nla(_XFRMA_ALG_CRYPT, _ALGO.pack(alg.encryption.encode(), len(key.encryption) * 8)
                         + key.encryption))
        body.append(_nla(_XFRMA_ALG_AUTH_TRUNC, _ALGO2.pack((alg.integrity or "").encode(),
                                                            len(key.integrity) * 8, alg.icv_bits) + key.integrity))
    if spec.encap is not None:
        body.append(_nla(_XFRMA_ENCAP, struct.pack("=H", m.UDP_ENCAP_ESPINUDP)
                         + struct.pack(">HH", spec.encap[0], spec.encap[1]) + bytes(18)))
    if spec.replay_window or spec.esn:
        r = spec.replay or ReplayState()
        words = (spec.replay_window + 31) // 32
        if spec.outbound:
            head = (words, r.oseq, 0, r.oseq_hi, 0, spec.replay_window)
            bitmap = [0] * words
        else:
            head = (words, 0, r.seq, 0, r.seq_hi, spec.replay_window)
            bitmap = list(r.bitmap[:words]) + [0] * (words - len(r.bitmap[:words]))
        body.append(_nla(_XFRMA_REPLAY_ESN_VAL, struct.pack(f"=6I{words}I", *head, *bitmap)))
    if spec.current is not None:
        c = spec.current
        body.append(_nla(_XFRMA_LTIME_VAL, _LFT_CUR.pack(c.bytes, c.packets, c.add_time, c.use_time)))
    body.append(struct.pack("=HHI", 8, _XFRMA_IF_ID, spec.if_id))
    return b"".join(body)


def sa_id_message(dst: IPAddress, spi: int) -> m.xfrm_usersa_id:
    msg = m.xfrm_usersa_id()
    msg["daddr"] = addr_bytes(dst)
    msg["spi"] = spi
    msg["family"] = AF_BY_VERSION[dst.version]
    msg["proto"] = m.IPPROTO_ESP
    return msg


def _selector_into(msg, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    msg["sel_daddr"] = msg["sel_saddr"] = addr_bytes(net.network_address)
    msg["sel_prefixlen_d"] = msg["sel_prefixlen_s"] = net.prefixlen
    msg["sel_family"] = AF_BY_VERSION[net.version]


def policy_message(spec: PolicySpec) -> m.xfrm_userpolicy_info:
    """XFRM_MSG_NEWPOLICY / UPDPOLICY body for `spec`."""
    msg = m.xfrm_userpolicy_info()
    _selector_into(msg, spec.selector)
    # no limits: XFRM_INF for byte and packet counts, but 0 for times (the kernel adds a time
    # limit to the add/use time, so XFRM_INF there would overflow and expire the policy at once)
    for n in m.LIFETIME_CFG_NAMES:
        msg[f"lft_{n}"] = 0 if n.endswith("_seconds") else m.XFRM_INF
    msg["priority"] = spec.priority
    msg["dir"] = DIRECTIONS[spec.direction]
    msg["action"] = m.XFRM_POLICY_ALLOW
    msg["share"] = m.XFRM_SHARE_ANY
    tmpl = {
        "id_daddr": addr_bytes(spec.tmpl_dst),
        "id_spi": 0,
        "id_proto": m.IPPROTO_ESP,
        "family": AF_BY_VERSION[spec.tmpl_dst.version],
        "saddr": addr_bytes(spec.tmpl_src),
        "reqid": spec.reqid,
        "mode": m.XFRM_MODE_TUNNEL,
        "share": m.XFRM_SHARE_ANY,
        "optional": 0,
        "aalgos": 0xFFFFFFFF,
        "ealgos": 0xFFFFFFFF,
        "calgos": 0xFFFFFFFF,
    }
    msg["attrs"] = [["XFRMA_TMPL", {"templates": [tmpl]}], ["XFRMA_IF_ID", spec.if_id]]
    return msg


_SELECTOR = struct.Struct("=16s16sHHHHHBBBxxxiI")      # struct xfrm_selector (56)
_POLICY_REST = struct.Struct("=8Q4QIIBBBB4x")          # lifetime cfg, cur, priority, index, dir, action, flags, share
_TMPL = struct.Struct("=16sIB3xH2x16sIBBBxIII")        # struct xfrm_user_tmpl (64)
_XFRMA_TMPL, _XFRMA_IF_ID = 5, 31


def policy_body(spec: PolicySpec) -> bytes:
    """The bytes policy_message(spec) encodes to (after the netlink header), built with struct:
    six policies go in per Child SA and pyroute2's generic encoder cost more than the kernel's
    work (issue 13). tests/unit/test_xfrm_messages.py checks both agree."""
    net = spec.selector
    a = addr_bytes(net.network_address)
    sel = _SELECTOR.pack(a, a, 0, 0, 0, 0, AF_BY_VERSION[net.version], net.prefixlen, net.prefixlen, 0, 0, 0)
    rest = _POLICY_REST.pack(m.XFRM_INF, m.XFRM_INF, m.XFRM_INF, m.XFRM_INF, 0, 0, 0, 0, 0, 0, 0, 0,
                             spec.priority, 0, DIRECTIONS[spec.direction], m.XFRM_POLICY_ALLOW, 0, m.XFRM_SHARE_ANY)
    tmpl = _TMPL.pack(addr_bytes(spec.tmpl_dst), 0, m.IPPROTO_ESP, AF_BY_VERSION[spec.tmpl_dst.version],
                      addr_bytes(spec.tmpl_src), spec.reqid, m.XFRM_MODE_TUNNEL, m.XFRM_SHARE_ANY, 0,
                      0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    return (sel + rest + struct.pack("=HH", 4 + len(tmpl), _XFRMA_TMPL) + tmpl
            + struct.pack("=HHI", 8, _XFRMA_IF_ID, spec.if_id))


def policy_id_message(direction: str, selector: ipaddress.IPv4Network | ipaddress.IPv6Network,
                      if_id: int, dst_selector: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
                      ) -> m.xfrm_userpolicy_id:
    """XFRM_MSG_DELPOLICY / GETPOLICY body: policies are found by selector, direction and if_id."""
    msg = m.xfrm_userpolicy_id()
    _selector_into(msg, selector)
    if dst_selector is not None:
        msg["sel_daddr"] = addr_bytes(dst_selector.network_address)
        msg["sel_prefixlen_d"] = dst_selector.prefixlen
    msg["dir"] = DIRECTIONS[direction]
    msg["index"] = 0
    msg["attrs"] = [["XFRMA_IF_ID", if_id]]
    return msg


# --- decoders -------------------------------------------------------------------------------------


def decode_sa(msg) -> SaState:
    """SaState from an xfrm_usersa_info message (or the embedded state of an EXPIRE)."""
    family = msg["family"]
    dst = addr_from(msg["id_daddr"], family)
    src = addr_from(msg["saddr"], family)
    encryption = integrity = None
    icv = None
    encap = None
    replay = None
    if_id = 0
    for name, value in msg["attrs"]:
        if name == "XFRMA_ALG_AEAD":
            encryption, icv = _cstr(value["alg_name"]), value["alg_icv_len"]
        elif name == "XFRMA_ALG_CRYPT":
            encryption = _cstr(value["alg_name"])
        elif name == "XFRMA_ALG_AUTH_TRUNC":
            integrity, icv = _cstr(value["alg_name"]), value["alg_trunc_len"]
        elif name == "XFRMA_ALG_AUTH" and integrity is None:
            integrity = _cstr(value["alg_name"])
        elif name == "XFRMA_ENCAP":
            encap = (value["encap_type"], value["encap_sport"], value["encap_dport"])
        elif name == "XFRMA_REPLAY_ESN_VAL":
            replay = ReplayState(oseq=value["oseq"], seq=value["seq"], oseq_hi=value["oseq_hi"],
                                 seq_hi=value["seq_hi"], replay_window=value["replay_window"],
                                 bitmap=tuple(value.get("bmp") or ()))
        elif name == "XFRMA_REPLAY_VAL" and replay is None:
            replay = ReplayState(oseq=value["oseq"], seq=value["seq"], replay_window=msg["replay_window"],
                                 bitmap=(value["bitmap"],))
        elif name == "XFRMA_IF_ID":
            if_id = value
    lifetime = Lifetime(
        soft_bytes=_unlimit(msg["lft_soft_byte_limit"]), hard_bytes=_unlimit(msg["lft_hard_byte_limit"]),
        soft_packets=_unlimit(msg["lft_soft_packet_limit"]), hard_packets=_unlimit(msg["lft_hard_packet_limit"]),
        soft_seconds=msg["lft_soft_add_expires_seconds"] or None,
        hard_seconds=msg["lft_hard_add_expires_seconds"] or None)
    current = LifetimeCurrent(bytes=msg["curlft_bytes"], packets=msg["curlft_packets"],
                              add_time=msg["curlft_add_time"], use_time=msg["curlft_use_time"])
    return SaState(src=src, dst=dst, spi=msg["id_spi"], proto=msg["id_proto"], reqid=msg["reqid"], if_id=if_id,
                   mode=msg["mode"], flags=msg["flags"], encryption=encryption, integrity=integrity, icv_bits=icv,
                   encap=encap, lifetime=lifetime, current=current,
                   replay=replay or ReplayState(replay_window=msg["replay_window"]),
                   replay_errors=msg["stats_replay"], integrity_failures=msg["stats_integrity_failed"])


def decode_policy(msg) -> PolicyState:
    family = msg["sel_family"]
    src = ipaddress.ip_network((addr_from(msg["sel_saddr"], family), msg["sel_prefixlen_s"]), strict=False)
    dst = ipaddress.ip_network((addr_from(msg["sel_daddr"], family), msg["sel_prefixlen_d"]), strict=False)
    if_id = 0
    templates: list = []
    for name, value in msg["attrs"]:
        if name == "XFRMA_IF_ID":
            if_id = value
        elif name == "XFRMA_TMPL":
            for t in value["templates"]:
                tf = t["family"]
                try:
                    tsrc, tdst = addr_from(t["saddr"], tf), addr_from(t["id_daddr"], tf)
                except ValueError:
                    tsrc = tdst = None
                templates.append((tsrc, tdst, t["reqid"], t["mode"]))
    return PolicyState(direction=DIRECTION_NAMES.get(msg["dir"], str(msg["dir"])), src=src, dst=dst, if_id=if_id,
                       priority=msg["priority"], index=msg["index"], action=msg["action"],
                       templates=tuple(templates))


# --- the operations -------------------------------------------------------------------------------


def _absent(e: NetlinkError) -> bool:
    return e.code in (errno.ENOENT, errno.ESRCH)


class Xfrm:
    """XFRM SAs and policies of one network namespace."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self.sock = XfrmSocket(netns)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Xfrm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # requests, for batches
    @staticmethod
    def add_sa_request(spec: SaSpec, update: bool = False) -> Request:
        if update:
            return Request(sa_body(spec), m.XFRM_MSG_UPDSA, 0, f"updating the {spec.describe()}")
        return Request(sa_body(spec), m.XFRM_MSG_NEWSA, NLM_F_CREATE | NLM_F_EXCL, f"adding the {spec.describe()}")

    @staticmethod
    def delete_sa_request(dst: IPAddress, spi: int) -> Request:
        return Request(sa_id_message(dst, spi), m.XFRM_MSG_DELSA, 0, f"deleting SA {spi:#010x} to {dst}")

    @staticmethod
    def add_policy_request(spec: PolicySpec, update: bool = False) -> Request:
        if update:
            return Request(policy_body(spec), m.XFRM_MSG_UPDPOLICY, 0, f"updating the {spec.describe()}")
        return Request(policy_body(spec), m.XFRM_MSG_NEWPOLICY, NLM_F_CREATE | NLM_F_EXCL,
                       f"adding the {spec.describe()}")

    @staticmethod
    def delete_policy_request(direction: str, selector, if_id: int, dst_selector=None) -> Request:
        return Request(policy_id_message(direction, selector, if_id, dst_selector), m.XFRM_MSG_DELPOLICY, 0,
                       f"deleting the {direction} policy {selector} if_id {if_id:#x}")

    def run(self, request: Request) -> None:
        self.sock.request(request.msg, request.msg_type, request.flags, request.what)

    def batch(self, requests: Sequence[Request]) -> list[NetlinkError | None]:
        return self.sock.batch(requests)

    # SAs
    def add_sa(self, spec: SaSpec, update: bool = False) -> None:
        self.run(self.add_sa_request(spec, update))

    def delete_sa(self, dst: IPAddress, spi: int, missing_ok: bool = False) -> bool:
        try:
            self.run(self.delete_sa_request(dst, spi))
        except NetlinkError as e:
            if missing_ok and _absent(e):
                return False
            raise
        return True

    def get_sa(self, dst: IPAddress, spi: int) -> SaState | None:
        try:
            replies = self.sock.get(sa_id_message(dst, spi), m.XFRM_MSG_GETSA, f"reading SA {spi:#010x} to {dst}")
        except NetlinkError as e:
            if _absent(e):
                return None
            raise
        for r in replies:
            if r["header"]["type"] in (m.XFRM_MSG_NEWSA, m.XFRM_MSG_UPDSA):
                return decode_sa(r)
        return None

    def dump_sas(self) -> list[SaState]:
        replies = self.sock.dump(m.xfrm_usersa_id(), m.XFRM_MSG_GETSA, "listing SAs")
        return [decode_sa(r) for r in replies if r["header"]["type"] == m.XFRM_MSG_NEWSA]

    # policies
    def add_policy(self, spec: PolicySpec, update: bool = False) -> None:
        self.run(self.add_policy_request(spec, update))

    def delete_policy(self, direction: str, selector, if_id: int, missing_ok: bool = False) -> bool:
        try:
            self.run(self.delete_policy_request(direction, selector, if_id))
        except NetlinkError as e:
            if missing_ok and _absent(e):
                return False
            raise
        return True

    def dump_policies(self) -> list[PolicyState]:
        replies = self.sock.dump(m.xfrm_userpolicy_id(), m.XFRM_MSG_GETPOLICY, "listing policies")
        return [decode_policy(r) for r in replies if r["header"]["type"] == m.XFRM_MSG_NEWPOLICY]

    # ours only
    def flush_ours(self, if_ids: Iterable[int] | None = None) -> tuple[int, int]:
        """Delete every SA and policy whose if_id is in the owned range (or in `if_ids`), and
        nothing else. Returns (SAs deleted, policies deleted)."""
        wanted = set(if_ids) if if_ids is not None else None

        def mine(if_id: int) -> bool:
            return (if_id in wanted) if wanted is not None else IF_ID_MIN <= if_id <= IF_ID_MAX

        reqs = [self.delete_sa_request(s.dst, s.spi) for s in self.dump_sas() if mine(s.if_id)]
        sa_errors = self.batch(reqs)
        preqs = [self.delete_policy_request(p.direction, p.src, p.if_id, p.dst)
                 for p in self.dump_policies() if mine(p.if_id)]
        pol_errors = self.batch(preqs)
        for e in sa_errors + pol_errors:
            if e is not None and not _absent(e):
                raise e
        return (sum(e is None for e in sa_errors), sum(e is None for e in pol_errors))
