"""The states a hostile datagram meets: snapshots of a live simnet conversation between the
genuine engines A (initiator, 192.0.2.1) and B (responder, 192.0.2.2), built once, restored per
case. Every exchange type is under way in one of them, as request in flight and as response in
flight, before and after IKE_AUTH, during Child SA and IKE SA rekeys; one has an attacker's
half-open IKE SA on B (the attacker did IKE_SA_INIT itself, so it holds real SK keys, no PSK)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from appliance.ike.engine import Datagram, IkeEngine
from appliance.ike.policy import DpdConfig, Identity, TunnelConfig
from appliance.ike.proposals import parse_proposals
from tests.fuzz.world import Snapshot, World
from tests.unit.ike.simnet import A_ADDR, B_ADDR, make_engines, tunnel

DPD = DpdConfig(interval=10, timeout=30, action="restart")
ATTACKER = ("203.0.113.66", 500)

SUITES = {
    # name: (IKE proposal, ESP proposal)
    "gcm": ("aes256gcm16-prfsha384-x25519", "aes256gcm16"),
    "cbc": ("aes128-sha256-ecp256", "aes128-sha256"),
    # hybrid post-quantum: IKE_INTERMEDIATE with ML-KEM-768 (RFC 9242, RFC 9370)
    "pq": ("aes256gcm16-prfsha384-x25519-ke1_mlkem768", "aes256gcm16"),
}


@dataclass
class Scenario:
    name: str
    snapshot: Snapshot
    #: the genuine IKE SA's (SPIi, SPIr) at snapshot time (None before IKE_SA_INIT finished)
    genuine: tuple[bytes, bytes] | None
    #: the genuine initiator's SPIi when a negotiation is under way (it must complete)
    negotiating_spi_i: bytes | None = None
    fresh: bool = False              # the continuation starts the tunnel (A.start)
    #: fresh scenarios: the SPIi of A's first IKE_SA_INIT, unless a hostile datagram made A
    #: draw random octets first (answering an IKE_SA_INIT itself)
    first_spi_i: bytes | None = None
    ike_rekey: bool = False          # the continuation may legitimately change the IKE SPIs
    child_spis: dict[str, frozenset[int]] = field(default_factory=dict)  # ip -> inbound SPIs at snapshot time
    mids: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # SPIi -> (A.my_mid, B.my_mid)
    history: list[tuple[Datagram, str]] = field(default_factory=list)   # delivered before: replays
    #: every genuine datagram the engines received so far (a copy is a replay; a datagram in
    #: flight is not in it: its first delivery, from wherever, is a genuine new message)
    seen: frozenset[bytes] = frozenset()
    #: (SPIi, SPIr) of every IKE SA with keys only A and B know (not the attacker's)
    genuine_sas: frozenset[tuple[bytes, bytes]] = frozenset()


#: A behind a NAT (nat scenarios): B sees it at this public address, with these ports
NAT_PUBLIC = "198.51.100.1"
NAT_MAP = {(A_ADDR, 500): (NAT_PUBLIC, 40500), (A_ADDR, 4500): (NAT_PUBLIC, 44500)}


def _road_warriors(ike: str, esp: str) -> TunnelConfig:
    """A second tunnel on B that accepts its peer from any address (another identity and PSK):
    with it, anyone on the internet gets an IKE_SA_INIT answered, from anywhere."""
    return TunnelConfig(name="road-warriors", local_addr=B_ADDR, remote_addr=None,
                        local_id=Identity.parse("b.example.net"), remote_id=Identity.parse("rw.example.org"),
                        psk=b"another-psk-for-road-warriors", if_id=43, start=False, dpd=DPD,
                        ike_proposals=tuple(parse_proposals(ike, "ike")),
                        esp_proposals=tuple(parse_proposals(esp, "esp")))


def _engines(suite: str, seed: int, nat: bool = False) -> tuple[IkeEngine, IkeEngine]:
    ike, esp = SUITES[suite]
    kw = dict(dpd=DPD, ike=ike, esp=esp, mobike=True)
    a, b = make_engines(seed, dict(kw), dict(kw, remote_addr=NAT_PUBLIC) if nat else dict(kw))
    b.add_tunnel(_road_warriors(ike, esp))
    return a, b


def _is(d: Datagram, exchange: int, response: bool | None = None) -> bool:
    return len(d.data) >= 28 and d.data[18] == exchange and (
        response is None or bool(d.data[19] & 0x20) == response)


def _genuine(w: World) -> tuple[bytes, bytes] | None:
    sa = w.engines[A_ADDR].current_sa("to-b")
    if sa is None:
        sas = [s for s in w.engines[A_ADDR].sas() if s.spi_r != bytes(8)]
        if not sas:
            return None
        sa = sas[0]
    return sa.spi_i, sa.spi_r


def _freeze(name: str, w: World, seen: set[bytes], **kw) -> Scenario:
    history = list(w.history)
    w.events = []
    genuine = _genuine(w)
    mids = {}
    for sa in w.engines[A_ADDR].sas():
        other = w.engines[B_ADDR]._sas.get(sa.spi_r)
        mids[sa.spi_i] = (sa.my_mid, other.my_mid if other is not None else 0)
    spis = {ip: frozenset(p.inbound) for ip, p in w.planes.items()}
    seen = {d.data for d, _ in history}
    attacker = getattr(w, "attacker_spis", set())
    pairs = frozenset((s.spi_i, s.spi_r) for e in w.engines.values() for s in e._sas.values()
                      if s.cipher_in is not None and s.spi_i not in attacker)
    return Scenario(name, Snapshot(w), genuine, child_spis=spis, mids=mids, history=history,
                    seen=frozenset(seen), genuine_sas=pairs, **kw)


def build(suite: str = "gcm", seed: int = 7, nat: bool = False) -> list[Scenario]:
    """Every scenario of one suite, deterministic for (suite, seed, nat). With `nat`, A is
    behind a NAT (B sees it at NAT_PUBLIC; both float to port 4500, UDP encapsulation)."""
    out: list[Scenario] = []
    seen: set[bytes] = set()
    label = suite
    if nat:
        label += "-nat"

    def fresh_world() -> World:
        a, b = _engines(suite, seed, nat)
        w = World({A_ADDR: a, B_ADDR: b})
        if nat:
            w.nat = dict(NAT_MAP)
            w.unnat = {v: k for k, v in NAT_MAP.items()}
        return w

    # before anything: B answers whoever sends IKE_SA_INIT; the continuation starts A
    w = fresh_world()
    out.append(_freeze(f"{label}/fresh", w, seen, fresh=True))

    # an attacker (no PSK) completed IKE_SA_INIT with B from A's address: B holds a half-open
    # IKE SA with real keys; then the genuine A starts
    w = fresh_world()
    _attacker_half_open(w, suite, seed)
    out.append(_freeze(f"{label}/fresh+attacker", w, seen, fresh=True))

    # A's IKE_SA_INIT request in flight
    w = fresh_world()
    w.hold = lambda d: True
    w.call("start", w.engines[A_ADDR].start, w.now)
    w.pump()
    out.append(_freeze(f"{label}/init-request", w, seen, negotiating_spi_i=w.held[0].data[:8]))
    # the engines are deterministic: A's first IKE_SA_INIT in the fresh scenarios has this SPIi
    # too (the corpus holds its request, so a hostile copy can precede it)
    for sc in out[:2]:
        sc.first_spi_i = w.held[0].data[:8]

    if suite == "pq":
        # A's IKE_INTERMEDIATE request in flight (ML-KEM encapsulation key), then B's response
        # (B has updated its keys, A not yet)
        w = fresh_world()
        w.hold = lambda d: _is(d, 43, False)
        w.call("start", w.engines[A_ADDR].start, w.now)
        w.pump()
        spi_i = w.held[0].data[:8]
        out.append(_freeze(f"{label}/intermediate-request", w, seen, negotiating_spi_i=spi_i))
        w.hold = lambda d: _is(d, 43, True)
        w.release_held()
        out.append(_freeze(f"{label}/intermediate-response", w, seen, negotiating_spi_i=spi_i))

    # A's IKE_AUTH request in flight (B has a half-open SA with keys)
    w = fresh_world()
    w.hold = lambda d: _is(d, 35, False)
    w.call("start", w.engines[A_ADDR].start, w.now)
    w.pump()
    spi_i = w.held[0].data[:8]
    out.append(_freeze(f"{label}/auth-request", w, seen, negotiating_spi_i=spi_i))

    # B's IKE_AUTH response in flight (B is up, A waits)
    w.hold = lambda d: _is(d, 35, True)
    w.release_held()
    out.append(_freeze(f"{label}/auth-response", w, seen, negotiating_spi_i=spi_i))

    # established, quiet
    w.hold = None
    w.release_held()
    w.now += 1.0
    up, up_history = Snapshot(w), list(w.history)
    out.append(_freeze(f"{label}/up", w, seen))

    def from_up() -> World:
        x = up.restore()
        x.record = True
        x.history = list(up_history)
        return x

    # established + an attacker's half-open IKE SA on B (keys known to the attacker)
    w = from_up()
    _attacker_half_open(w, suite, seed)
    out.append(_freeze(f"{label}/up+attacker", w, seen))

    # Child SA rekey by A (CREATE_CHILD_SA), request then response in flight, then A's DELETE
    # of the old pair (INFORMATIONAL) in flight, then its response
    for who, name in ((A_ADDR, "to-b"), (B_ADDR, "to-a")):
        tag = "a" if who == A_ADDR else "b"
        w = from_up()
        w.hold = lambda d: True
        w.call("rekey_child", w.engines[who].rekey_child, name, w.now)
        w.pump()
        out.append(_freeze(f"{label}/child-rekey-{tag}-request", w, seen))
        w.release_held()
        out.append(_freeze(f"{label}/child-rekey-{tag}-response", w, seen))
        w.release_held()
        if w.held:
            out.append(_freeze(f"{label}/child-delete-{tag}-request", w, seen))
            w.release_held()
            if w.held:
                out.append(_freeze(f"{label}/child-delete-{tag}-response", w, seen))

    # IKE SA rekey by A (CREATE_CHILD_SA with protocol IKE), then the old SA's DELETE
    w = from_up()
    w.hold = lambda d: True
    w.call("rekey_ike", w.engines[A_ADDR].rekey_ike, "to-b", w.now)
    w.pump()
    out.append(_freeze(f"{label}/ike-rekey-request", w, seen, ike_rekey=True))
    w.release_held()
    out.append(_freeze(f"{label}/ike-rekey-response", w, seen, ike_rekey=True))
    w.release_held()
    if suite == "pq" and w.held and _is(w.held[0], 44):
        # RFC 9370 §2.2.4: the IKE_FOLLOWUP_KE (ML-KEM) on the old SA, request then response
        out.append(_freeze(f"{label}/ike-followup-request", w, seen, ike_rekey=True))
        w.release_held()
        out.append(_freeze(f"{label}/ike-followup-response", w, seen, ike_rekey=True))
        w.release_held()
    if w.held:
        out.append(_freeze(f"{label}/ike-delete-request", w, seen, ike_rekey=True))
        w.release_held()
        if w.held:
            out.append(_freeze(f"{label}/ike-delete-response", w, seen, ike_rekey=True))
    w.hold = None
    w.release_held()
    out.append(_freeze(f"{label}/up-after-ike-rekey", w, seen))

    # a liveness check (empty INFORMATIONAL) in flight, request then response
    w = from_up()
    w.hold = lambda d: True
    w.advance(w.now + 10.5, stop=lambda: bool(w.held))
    out.append(_freeze(f"{label}/dpd-request", w, seen))
    w.release_held()
    out.append(_freeze(f"{label}/dpd-response", w, seen))
    return out


def _attacker_half_open(w: World, suite: str, seed: int) -> None:
    """An attacker's IKE_SA_INIT to B from A's address (so it matches B's tunnel); B answers
    and derives the keys; the attacker never authenticates."""
    ike, esp = SUITES[suite]
    m = IkeEngine([tunnel("a", dpd=DPD, ike=ike, esp=esp)], random=random.Random(seed + 4242).randbytes)
    m.start(w.now)
    w.attacker_spis = {s.spi_i for s in m.sas()}
    for d in m.datagrams_to_send():
        src = w.nat.get(d.src, d.src)    # through A's NAT too, in the nat scenarios
        w.call("receive_datagram", w.engines[B_ADDR].receive_datagram, d.data, src, d.dst, w.now)
    for d in w.call("datagrams_to_send", w.engines[B_ADDR].datagrams_to_send):
        pass    # B's IKE_SA_INIT response goes to A's address; A would ignore it


def build_all(seed: int = 7) -> list[Scenario]:
    return (build("gcm", seed) + build("cbc", seed + 1) + build("gcm", seed + 2, nat=True)
            + build("pq", seed + 3))
