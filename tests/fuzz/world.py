"""Two genuine engines (simnet's A and B) on an in-memory wire with immediate delivery, every
public API call timed and guarded, and cheap snapshots (pickle, with the immutable crypto and
configuration objects shared rather than copied)."""

from __future__ import annotations

import io
import pickle
import time
import traceback
from dataclasses import dataclass, field

from appliance.ike.engine import Datagram, IkeEngine
from tests.unit.ike.simnet import A_ADDR, B_ADDR, DataPlane

#: oracle 2: no single call of the public API may take longer than this (CPU seconds)
SLOW_CALL = 1.0


class CallFailed(Exception):
    """Raised by World.call after an exception escaped the engine or a call was too slow:
    the case stops there (the engine's state is no longer trustworthy)."""

    def __init__(self, kind: str, api: str, detail: str, location: str, tb: str) -> None:
        super().__init__(f"{kind} in {api}: {detail} at {location}")
        self.kind, self.api, self.detail, self.location, self.tb = kind, api, detail, location, tb


def _location(exc: BaseException) -> str:
    """The innermost frame of the engine (appliance/...) the exception came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    best = frames[-1] if frames else None
    for f in frames:
        if "/appliance/" in f.filename.replace("\\", "/"):
            best = f
    if best is None:
        return "?"
    path = best.filename.replace("\\", "/")
    if "/appliance/" in path:
        path = "appliance/" + path.rsplit("/appliance/", 1)[1]
    return f"{path}:{best.lineno} ({best.name})"


@dataclass
class World:
    engines: dict[str, IkeEngine]
    now: float = 1000.0
    planes: dict[str, DataPlane] = field(default_factory=dict)
    events: list[tuple[str, object]] = field(default_factory=list)
    held: list[Datagram] = field(default_factory=list)        # genuine datagrams in flight
    history: list[tuple[Datagram, str]] = field(default_factory=list)   # delivered: (datagram, receiver)
    record: bool = True          # keep history (while building; off in the hot path)
    hold: object = None          # while building: a predicate on datagrams to hold back
    #: a NAT in front of engines: private (address, port) -> public (address, port)
    nat: dict = field(default_factory=dict)
    unnat: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for ip in self.engines:
            self.planes.setdefault(ip, DataPlane())

    # ---------------------------------------------------------------- guarded public API
    def call(self, api: str, fn, *args):
        # CPU time of this process, not wall time: the machine is shared, and a call that is
        # merely descheduled is not slow
        t0 = time.process_time()
        try:
            r = fn(*args)
        except Exception as e:  # noqa: BLE001 - oracle 1: nothing may escape
            raise CallFailed("exception", api, f"{type(e).__name__}: {e}"[:300], _location(e),
                             traceback.format_exc()) from None
        dt = time.process_time() - t0
        if dt > SLOW_CALL:
            raise CallFailed("slow", api, f"{dt:.2f} s of CPU", api, "")
        return r

    def deliver(self, d: Datagram) -> None:
        if d.dst in self.unnat:
            d = Datagram(d.data, d.src, self.unnat[d.dst])
        e = self.engines.get(d.dst[0])
        if e is None:
            return                      # to an address no engine has (the attacker's)
        if self.record:
            self.history.append((d, d.dst[0]))
        self.call("receive_datagram", e.receive_datagram, d.data, d.src, d.dst, self.now)

    def collect(self) -> list[Datagram]:
        out = []
        for ip, e in self.engines.items():
            for d in self.call("datagrams_to_send", e.datagrams_to_send):
                if d.src in self.nat:
                    d = Datagram(d.data, self.nat[d.src], d.dst)
                out.append(d)
            while (x := self.call("next_event", e.next_event)) is not None:
                self.events.append((ip, x))
                self.planes[ip].apply(x)
        return out

    def pump(self, max_rounds: int = 64) -> None:
        """Deliver everything sent until the wire is quiet (time stands still)."""
        for _ in range(max_rounds):
            out = self.collect()
            if not out:
                return
            for d in out:
                if self.hold is not None and self.hold(d):
                    self.held.append(d)
                else:
                    self.deliver(d)
        raise CallFailed("busy", "pump", "engines still sending after 64 rounds", "pump", "")

    def timer(self) -> float | None:
        ts = [t for e in self.engines.values() if (t := self.call("get_timer", e.get_timer)) is not None]
        return min(ts) if ts else None

    def advance(self, until: float, max_steps: int = 2000, stop=None) -> None:
        """Run timers and deliveries up to `until` (or until `stop()` holds)."""
        self.pump()
        for _ in range(max_steps):
            if stop is not None and stop():
                return
            t = self.timer()
            if t is None or t > until:
                self.now = max(self.now, until)
                return
            self.now = max(self.now, t)
            for e in self.engines.values():
                et = self.call("get_timer", e.get_timer)
                if et is not None and et <= self.now:
                    self.call("handle_timer", e.handle_timer, self.now)
            self.pump()
        raise CallFailed("busy", "advance", f"timers busy-looping at t={self.now}", "advance", "")

    def release_held(self) -> None:
        held, self.held = self.held, []
        for d in held:
            self.deliver(d)
        self.pump()


# -------------------------------------------------------------------- snapshots
def _shared_types() -> tuple[type, ...]:
    """Immutable objects a snapshot shares instead of copying (and that cannot be pickled)."""
    from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x448, x25519
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    from appliance.ike.policy import TunnelConfig
    out = [AESGCM, ChaCha20Poly1305, TunnelConfig]
    # the key classes are abstract; pickling looks the concrete (Rust) types up
    for make in (lambda: x25519.X25519PrivateKey.generate(), lambda: x448.X448PrivateKey.generate(),
                 lambda: ec.generate_private_key(ec.SECP256R1()),
                 lambda: mlkem.MLKEM768PrivateKey.generate(), lambda: mlkem.MLKEM1024PrivateKey.generate()):
        out.append(type(make()))
    return tuple(out)


#: shared objects by registry number, this process only (snapshots never leave it)
_SHARED: list[object] = []
_SHARED_INDEX: dict[int, int] = {}


def _shared(i: int) -> object:
    return _SHARED[i]


def _share(obj: object):
    i = _SHARED_INDEX.get(id(obj))
    if i is None:
        i = _SHARED_INDEX[id(obj)] = len(_SHARED)
        _SHARED.append(obj)     # kept alive, so its id is never reused
    return _shared, (i,)


def _by_identity(obj: object):
    return _shared, (id(obj),)     # never unpickled: only compared


_TABLES: dict[bool, dict] = {}


def _dump(world: World, register: bool = True) -> bytes:
    table = _TABLES.get(register)
    if table is None:
        import copyreg
        table = _TABLES[register] = dict(copyreg.dispatch_table)
        for t in _shared_types():
            table[t] = _share if register else _by_identity
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    p.dispatch_table = table      # a C-level lookup: no Python call per pickled object
    p.dump(world)
    return buf.getvalue()


def state_bytes(world: World) -> bytes:
    """The complete state of a World as octets, for comparison only: equal octets, equal
    state (the shared immutable objects count by identity, and are not registered: a case's
    new keys are not kept alive)."""
    return _dump(world, register=False)


class Snapshot:
    """A frozen World: `restore()` gives an independent copy in ~0.15 ms (unpickling), far
    cheaper than negotiating again (or than copy.deepcopy). The crypto objects (AEAD keys,
    private keys) and tunnel configurations are immutable and shared, not copied."""

    def __init__(self, world: World) -> None:
        saved = world.record, world.hold, world.history, world.events
        world.record, world.hold, world.history, world.events = False, None, [], []
        try:
            self._data = _dump(world)
        finally:
            world.record, world.hold, world.history, world.events = saved

    def restore(self) -> World:
        return pickle.loads(self._data)

    @property
    def size(self) -> int:
        return len(self._data)


def peer_of(ip: str) -> str:
    return B_ADDR if ip == A_ADDR else A_ADDR


__all__ = ["CallFailed", "SLOW_CALL", "Snapshot", "World", "peer_of", "state_bytes"]
