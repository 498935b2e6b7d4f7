"""A deterministic simulated network for driving IkeEngines in memory, and a model of the data
plane (what the kernel would hold) built only from the engines' events.

Faults come from a `Faults` object: for each datagram in send order it says whether to drop,
duplicate, or delay it (delays reorder). Time is simulated; nothing sleeps.
"""

from __future__ import annotations

import dataclasses
import heapq
import random as _random
from dataclasses import dataclass, field
from typing import Callable

from appliance.ike import events as ev
from appliance.ike.engine import Datagram, IkeEngine
from appliance.ike.policy import DpdConfig, Identity, TunnelConfig
from appliance.ike.proposals import parse_proposals

A_ADDR = "192.0.2.1"
B_ADDR = "192.0.2.2"
PSK = b"simulated-psk-0123456789"


def tunnel(side: str, **kw) -> TunnelConfig:
    """The tunnel between A and B, as seen from `side`."""
    local, remote = (A_ADDR, B_ADDR) if side == "a" else (B_ADDR, A_ADDR)
    lid, rid = ("a.example.net", "b.example.net") if side == "a" else ("b.example.net", "a.example.net")
    args = dict(name="to-" + ("b" if side == "a" else "a"), local_addr=local, remote_addr=remote,
                local_id=Identity.parse(lid), remote_id=Identity.parse(rid), psk=PSK, if_id=42,
                start=side == "a", dpd=DpdConfig(interval=0, timeout=30, action="restart"))
    if "ike" in kw:
        args["ike_proposals"] = tuple(parse_proposals(kw.pop("ike"), "ike"))
    if "esp" in kw:
        args["esp_proposals"] = tuple(parse_proposals(kw.pop("esp"), "esp"))
    for life, margin in (("child_lifetime", "child_rekey_margin"), ("ike_lifetime", "ike_rekey_margin")):
        if life in kw and margin not in kw:
            kw[margin] = kw[life] * 0.1
    args.update(kw)
    return TunnelConfig(**args)


@dataclass
class Sa:
    """One direction of a Child SA as the kernel would have it."""

    spi: int
    encr_key: bytes
    integ_key: bytes
    added: int


class DataPlane:
    """Applies ChildSa* events the way the daemon would drive the kernel."""

    def __init__(self) -> None:
        self.inbound: dict[int, Sa] = {}
        self.outbound: dict[int, Sa] = {}
        self._waiting: dict[int, ev.ChildSaInstalled] = {}
        self._n = 0
        self.errors: list[str] = []

    def apply(self, e: object) -> None:
        if isinstance(e, ev.ChildSaInstalled):
            self._n += 1
            if e.spi_in in self.inbound:
                self.errors.append(f"inbound SPI {e.spi_in:08x} installed twice")
            self.inbound[e.spi_in] = Sa(e.spi_in, e.encr_key_in, e.integ_key_in, self._n)
            if e.outbound:
                self._add_out(e)
            else:
                self._waiting[e.spi_in] = e
        elif isinstance(e, ev.ChildSaOutboundInstalled):
            inst = self._waiting.pop(e.spi_in, None)
            if inst is None:
                self.errors.append(f"outbound for unknown pair {e.spi_in:08x}")
                return
            self._n += 1
            self._add_out(inst)
        elif isinstance(e, ev.ChildSaOutboundRemoved):
            if self.outbound.pop(e.spi_out, None) is None:
                self.errors.append(f"outbound removal of unknown {e.spi_out:08x}")
        elif isinstance(e, ev.ChildSaDeleted):
            if self.inbound.pop(e.spi_in, None) is None:
                self.errors.append(f"delete of unknown inbound {e.spi_in:08x}")
            self.outbound.pop(e.spi_out, None)
            self._waiting.pop(e.spi_in, None)

    def _add_out(self, e: ev.ChildSaInstalled) -> None:
        if e.spi_out in self.outbound:
            self.errors.append(f"outbound SPI {e.spi_out:08x} installed twice")
        self.outbound[e.spi_out] = Sa(e.spi_out, e.encr_key_out, e.integ_key_out, self._n)

    def sending_on(self) -> Sa | None:
        """The outbound SA Linux would pick: the most recently added one."""
        return max(self.outbound.values(), key=lambda s: s.added, default=None)


@dataclass(order=True)
class _Item:
    at: float
    seq: int
    dgram: Datagram = field(compare=False)


class Faults:
    """Per-datagram decisions: a list of (copies, delay) consumed in send order; after it runs
    out every datagram is delivered once after `base_delay`."""

    def __init__(self, decisions: list[tuple[int, float]] | None = None, base_delay: float = 0.01,
                 drop: Callable[[Datagram, int], bool] | None = None) -> None:
        self.decisions = list(decisions or [])
        self.base_delay = base_delay
        self.drop = drop
        self.count = 0

    def decide(self, d: Datagram) -> list[float]:
        n = self.count
        self.count += 1
        if self.drop is not None and self.drop(d, n):
            return []
        if self.decisions:
            copies, delay = self.decisions.pop(0)
            return [self.base_delay + delay + 0.001 * i for i in range(copies)]
        return [self.base_delay]

    @property
    def active(self) -> bool:
        return bool(self.decisions)


class SimNet:
    def __init__(self, engines: dict[str, IkeEngine], faults: Faults | None = None, now: float = 1000.0,
                 nat: dict[tuple[str, int], tuple[str, int]] | None = None) -> None:
        self.engines = engines
        # a NAT in front of some engines: private (address, port) -> public (address, port)
        self.nat = dict(nat or {})
        self._unnat = {v: k for k, v in self.nat.items()}
        self.planes = {ip: DataPlane() for ip in engines}
        self.events: dict[str, list] = {ip: [] for ip in engines}
        self.faults = faults or Faults()
        self.now = now
        self._heap: list[_Item] = []
        self._seq = 0
        self.delivered: list[tuple[float, Datagram]] = []
        self.traffic_gaps = 0   # moments when an engine sends on an SA its peer has no inbound for
        self.trace: list[tuple[float, str, str, str]] = []   # (time, from, to, decoded summary)
        self.messages: list[tuple[float, str, object]] = []  # (time, from, decoded Message | None)
        self.keepalives: list[tuple[float, Datagram]] = []   # NAT keepalives as they arrived

    def rebind(self, private: tuple[str, int], public: tuple[str, int]) -> None:
        """The NAT forgets a mapping and makes a new one (conntrack flushed): from now on
        `private` goes out as `public`; the old public port leads nowhere."""
        old = self.nat.get(private)
        if old is not None:
            self._unnat.pop(old, None)
        self.nat[private] = public
        self._unnat[public] = private

    def readdress(self, old: str, new: str) -> None:
        """The engine at `old` now has address `new` (MOBIKE): datagrams to `old` go nowhere."""
        for d in (self.engines, self.planes, self.events):
            d[new] = d.pop(old)

    def _collect(self) -> None:
        for ip, e in self.engines.items():
            for d in e.datagrams_to_send():
                assert d.src[0] == ip, (d, ip)
                if d.src in self.nat:
                    d = dataclasses.replace(d, src=self.nat[d.src])
                for delay in self.faults.decide(d):
                    self._seq += 1
                    heapq.heappush(self._heap, _Item(self.now + delay, self._seq, d))
            while (x := e.next_event()) is not None:
                self.events[ip].append(x)
                self.planes[ip].apply(x)

    def _check_traffic(self) -> None:
        ips = list(self.engines)
        if len(ips) != 2:
            return
        for a, b in ((ips[0], ips[1]), (ips[1], ips[0])):
            out = self.planes[a].sending_on()
            if out is not None and self.planes[b].inbound and out.spi not in self.planes[b].inbound:
                self.traffic_gaps += 1

    def step(self, until: float) -> bool:
        """Advance to the next delivery or timer before `until`; False when nothing is due."""
        self._collect()
        t_net = self._heap[0].at if self._heap else None
        timers = [(t, ip) for ip, e in self.engines.items() if (t := e.get_timer()) is not None]
        t_timer = min(timers)[0] if timers else None
        nxt = min([t for t in (t_net, t_timer) if t is not None], default=None)
        if nxt is None or nxt > until:
            self.now = max(self.now, until)
            return False
        self.now = max(self.now, nxt)
        if t_net is not None and t_net <= self.now and (t_timer is None or t_net <= t_timer):
            item = heapq.heappop(self._heap)
            d = item.dgram
            if d.dst in self._unnat:
                d = dataclasses.replace(d, dst=self._unnat[d.dst])
            target = self.engines.get(d.dst[0])
            if d.keepalive:
                # the runner's NAT-T socket drops the 0xFF octet (RFC 3948 §2.3): never the engine's
                if target is not None:
                    self.keepalives.append((self.now, d))
            elif target is not None:
                self.delivered.append((self.now, d))
                summary, msg = decode(target, d.data)
                self.trace.append((self.now, d.src[0], d.dst[0], summary))
                self.messages.append((self.now, d.src[0], msg))
                target.receive_datagram(d.data, d.src, d.dst, self.now)
        else:
            for t, ip in timers:
                if t <= self.now:
                    self.engines[ip].handle_timer(self.now)
        self._collect()
        self._check_traffic()
        return True

    def run(self, duration: float, max_steps: int = 20000) -> None:
        until = self.now + duration
        for _ in range(max_steps):
            if not self.step(until):
                return
        raise AssertionError(f"simulation busy-looping at t={self.now}: timers "
                             f"{[e.get_timer() for e in self.engines.values()]}")

    def run_until(self, cond: Callable[[], bool], limit: float = 3600.0, max_steps: int = 50000) -> None:
        until = self.now + limit
        for _ in range(max_steps):
            if cond():
                return
            if not self.step(until):
                raise AssertionError(f"condition not reached within {limit} s")
        raise AssertionError("run_until: too many steps")


def decode(receiver: IkeEngine, data: bytes):
    """Decode a datagram with the receiving engine's keys: (summary, Message or None)."""
    from appliance.ike import message as M

    try:
        hdr = M.parse_header(data)
        msg, enc = M.parse_message(data)
    except M.ParseError as e:
        return f"malformed ({e.reason})", None
    if isinstance(enc, M.EncryptedFragment):   # RFC 7383: one piece of a message
        kind = "response" if hdr.is_response else "request"
        return (f"{M._enum_name(M.ExchangeType, hdr.exchange_type)} {kind} {hdr.message_id} "
                f"[ SKF({enc.fragment_number}/{enc.total_fragments}) ]"), None
    if enc is not None:
        key = hdr.spi_r if hdr.is_initiator else hdr.spi_i
        sa = receiver._sas.get(key)
        if sa is None or sa.cipher_in is None:
            return msg.summary() + " (no keys)", None
        try:
            msg = M.decrypt_message(data, msg, enc, sa.cipher_in)
        except Exception as e:  # noqa: BLE001 - a trace, not a check
            return msg.summary() + f" ({type(e).__name__})", None
    return msg.summary(), msg


def describe(receiver: IkeEngine, data: bytes) -> str:
    return decode(receiver, data)[0]


def make_engines(seed: int = 1, a_kw: dict | None = None, b_kw: dict | None = None):
    ra = _random.Random(seed)
    rb = _random.Random(seed + 1000)
    a = IkeEngine([tunnel("a", **(a_kw or {}))], random=ra.randbytes)
    b = IkeEngine([tunnel("b", **(b_kw or {}))], random=rb.randbytes)
    return a, b


def installed_pair_ok(net: SimNet) -> list[str]:
    """Problems with 'exactly one Child SA pair per tunnel, matching keys' (empty = fine)."""
    pa, pb = net.planes[A_ADDR], net.planes[B_ADDR]
    errs = pa.errors + pb.errors
    for name, p in (("A", pa), ("B", pb)):
        if len(p.inbound) != 1 or len(p.outbound) != 1:
            errs.append(f"{name} has {len(p.inbound)} inbound and {len(p.outbound)} outbound SAs")
    if errs:
        return errs
    (a_in,), (a_out,) = pa.inbound.values(), pa.outbound.values()
    (b_in,), (b_out,) = pb.inbound.values(), pb.outbound.values()
    if a_out.spi != b_in.spi or (a_out.encr_key, a_out.integ_key) != (b_in.encr_key, b_in.integ_key):
        errs.append("A's outbound SA does not match B's inbound SA")
    if b_out.spi != a_in.spi or (b_out.encr_key, b_out.integ_key) != (a_in.encr_key, a_in.integ_key):
        errs.append("B's outbound SA does not match A's inbound SA")
    return errs


def one_ike_sa_each(net: SimNet) -> list[str]:
    errs = []
    sas = {}
    for ip, e in net.engines.items():
        alive = e.sas()
        established = [s for s in alive if s.established]
        if len(alive) != 1 or len(established) != 1:
            errs.append(f"{ip} has IKE SAs {alive}")
        else:
            sas[ip] = established[0]
    if len(sas) == 2:
        a, b = sas.values()
        if (a.spi_i, a.spi_r) != (b.spi_i, b.spi_r):
            errs.append(f"different IKE SAs: {a} vs {b}")
        elif a.keys.SK_d != b.keys.SK_d:
            errs.append("IKE SA keys differ")
    return errs
