"""Fuzz cases: one case = (seed, index) -> a scenario snapshot restored, 1..3 hostile datagrams
delivered through the public API, then the genuine conversation continued, with three oracles:

1. no exception escapes `receive_datagram`, `handle_timer`, `datagrams_to_send`, `next_event`
   (or `get_timer` and the commands the continuation uses);
2. no such call takes longer than 1 s of CPU time;
3. the genuine conversation still completes: a datagram that did not verify (anything not
   protected with the genuine SA's keys: mutations, replays, forgeries, an attacker's own SA)
   leaves the genuine IKE SA and its Child SA pair untouched, an exchange under way completes,
   both message windows stay in step and a liveness check succeeds within its first round trip;
   after one that did verify (a hostile but authenticated peer, which may legitimately delete
   things) a fresh negotiation between the two engines still succeeds.

Also: log records are formatted (in one case of four) and must not carry control characters
taken from the wire (a peer must not forge log lines)."""

from __future__ import annotations

import logging
import random
import re
import struct
import traceback
from dataclasses import dataclass, field

from appliance.ike import events as ev
from appliance.ike.crypto import CryptoError
from appliance.ike.engine import Datagram
from tests.fuzz import mutate, payloads, wire
from tests.fuzz.scenarios import ATTACKER, Scenario, build_all
from tests.fuzz.world import CallFailed, World, peer_of, state_bytes
from tests.unit.ike.simnet import A_ADDR, B_ADDR, installed_pair_ok

DPD_WINDOW = 10.5    # one liveness interval (simnet DPD 10 s) and a little
SKIP_UNCHANGED = True   # a case that changed nothing skips the (verified) continuation


@dataclass
class Failure:
    seed: int
    index: int
    kind: str          # exception | slow | busy | broken | log
    key: str           # what deduplicates it
    detail: str
    scenario: str
    steps: list[str] = field(default_factory=list)
    tb: str = ""

    def reproducer(self) -> str:
        return f"python -m tests.fuzz --seed {self.seed} --case {self.index}"

    def report(self) -> str:
        lines = [f"[{self.kind}] {self.key}", f"  scenario: {self.scenario}",
                 f"  detail:   {self.detail}"]
        lines += [f"  step:     {s}" for s in self.steps]
        lines.append(f"  reproduce: {self.reproducer()}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- logging oracle
class _LogOracle(logging.Handler):
    """Formats every record (so formatting bugs surface as exceptions) and remembers records
    whose text carries control characters."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if _CONTROL.search(text):
            self.bad.append(text[:200])

    def handleError(self, record: logging.LogRecord) -> None:
        raise   # noqa: PLE0704 - re-raise the formatting error out of the engine's log call


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LOG = logging.getLogger("isthmus.ike")
_ORACLE = _LogOracle()
_LOG_DEFAULT = (_LOG.level, _LOG.propagate)


def _log_mode(on: bool) -> None:
    if on:
        if _ORACLE not in _LOG.handlers:
            _LOG.addHandler(_ORACLE)
        _LOG.setLevel(logging.DEBUG)
        _LOG.propagate = False
    else:
        if _ORACLE in _LOG.handlers:
            _LOG.removeHandler(_ORACLE)
        _LOG.setLevel(_LOG_DEFAULT[0])     # as the process had it (pytest's caplog, the daemon)
        _LOG.propagate = _LOG_DEFAULT[1]
    _ORACLE.bad.clear()


# ---------------------------------------------------------------------------- corpus
class Corpus:
    """Donor datagrams: every genuine datagram of every scenario's history and in-flight set,
    and the recorded strongSwan conversations (tests/data/strongswan); plus the genuine
    decrypted plaintexts (payload chains) for forged messages built from live ones."""

    def __init__(self, scenarios: list[Scenario]) -> None:
        from tests import vectors

        self.datagrams: list[bytes] = []
        seen = set()
        for sc in scenarios:
            w = sc.snapshot.restore()
            for d in [d for d, _ in sc.history] + list(w.held):
                if d.data not in seen:
                    seen.add(d.data)
                    self.datagrams.append(d.data)
        self.recorded: list[bytes] = []
        vecs = [v for v in vectors.recorded_vectors()] + [vectors.STRONGSWAN_PSK_X25519]
        for v in vecs:
            if v.available():
                self.recorded += [d.message for d in v.datagrams()]
        self.donors: list[wire.Raw] = []
        for d in self.datagrams + self.recorded:
            _hdr, ps, _ = wire.split(d)
            self.donors += [p for p in ps if p.type != wire.SK]
        self.plaintexts: list[tuple[int, bool, int, bytes]] = []   # (exchange, response, first, inner)
        for sc in scenarios:
            w = sc.snapshot.restore()
            for d, receiver in sc.history:
                pt = _decrypt(w, d.data, receiver)
                if pt is not None:
                    self.plaintexts.append(pt)
        for v in vecs:
            if v.available():
                self.plaintexts += _recorded_plaintexts(v)
        self.plaintexts = list(dict.fromkeys(self.plaintexts))     # once each, in order
        self.init_requests = [d for d in self.datagrams + self.recorded
                              if len(d) >= 28 and d[18] == 34 and not d[19] & 0x20]


def _decrypt(w: World, data: bytes, receiver: str):
    from appliance.ike import message as M

    try:
        hdr = M.parse_header(data)
        msg, enc = M.parse_message(data, hdr)
    except M.ParseError:
        return None
    if enc is None:
        return None
    e = w.engines.get(receiver)
    sa = e._sas.get(hdr.spi_r if hdr.is_initiator else hdr.spi_i) if e is not None else None
    if sa is None or sa.cipher_in is None:
        return None
    try:
        pt = sa.cipher_in.decrypt(data[enc.body_start:], data[:enc.body_start])
    except CryptoError:
        return None
    inner = pt[:len(pt) - pt[-1] - 1]
    return hdr.exchange_type, hdr.is_response, enc.first_inner, inner


def _recorded_plaintexts(v) -> list[tuple[int, bool, int, bytes]]:
    """strongSwan's own plaintexts: the SK payloads of a recorded conversation decrypted with
    the keys charon logged (Sk_e*/Sk_a* dumps at level 4), one key set per IKE SA in order."""
    from appliance.ike import message as M
    from appliance.ike.crypto import IkeKeys, sk_ciphers
    from tests.vectors import dumps

    log = v.log("initiator")
    grams = [d.message for d in v.datagrams()]
    try:
        proposal = M.parse_message(grams[1])[0].get(M.SA).proposals[0]
    except (M.ParseError, AttributeError, IndexError):
        return []
    spis: list[bytes] = []
    for d in grams:
        if d[:8] not in spis:
            spis.append(d[:8])
    ciphers = {}
    for gen, spi in enumerate(spis):
        def key(label: str) -> bytes:
            ks = dumps(log, label)
            return ks[gen] if len(ks) > gen else b""
        try:
            ciphers[spi] = sk_ciphers(proposal, IkeKeys(
                key("Sk_d secret"), key("Sk_ai secret"), key("Sk_ar secret"), key("Sk_ei secret"),
                key("Sk_er secret"), key("Sk_pi secret"), key("Sk_pr secret")))
        except CryptoError:
            continue
    out = []
    for d in grams:
        _hdr, ps, _ = wire.split(d)
        if not ps or ps[-1].type != wire.SK or d[:8] not in ciphers:
            continue
        c_i, c_r = ciphers[d[:8]]
        body_start = len(d) - len(ps[-1].body)
        try:
            pt = (c_i if d[19] & wire.FLAG_I else c_r).decrypt(d[body_start:], d[:body_start])
        except CryptoError:
            continue
        out.append((d[18], bool(d[19] & wire.FLAG_R), mutate._sk_next(d), pt[:len(pt) - pt[-1] - 1]))
    return out


# ---------------------------------------------------------------------------- case generation
def _sas_with_keys(w: World, ip: str):
    return [sa for sa in w.engines[ip]._sas.values() if sa.alive and sa.cipher_in is not None]


def _genuine(w: World, sa, sc: Scenario | None = None) -> bool:
    """`sa` holds keys only the genuine A and B know: an SA of the snapshot's genuine
    conversation, or one both engines have (not an attacker's half-open SA)."""
    if sc is not None and (sa.spi_i, sa.spi_r) in sc.genuine_sas:
        return True
    other = w.engines[peer_of(sa.local[0] if sa.local[0] in w.engines else A_ADDR)]
    o = other._sas.get(sa.spi_r if sa.initiator else sa.spi_i)
    return o is not None and o.spi_i == sa.spi_i and o.spi_r == sa.spi_r and o.alive


def _target(w: World, ip: str, rng: random.Random):
    sas = _sas_with_keys(w, ip)
    if not sas:
        return None, None
    sa = rng.choice(sas)
    pending = sa.pending.message_id if sa.pending is not None else None
    return sa, mutate.Target(sa.spi_i, sa.spi_r, not sa.initiator, sa.peer_mid, sa.my_mid, pending)


def _src_for(rng: random.Random, w: World, receiver: str, sa=None):
    r = rng.random()
    if r < 0.75:
        if sa is not None:
            return sa.remote
        return (peer_of(receiver), 500)
    if r < 0.85:   # the peer's address (or its NAT's), another port
        return (sa.remote[0] if sa is not None else peer_of(receiver), rng.choice((4500, 500, 501, 1024, 65535)))
    return ATTACKER


def _dst_for(receiver: str, sa=None):
    return sa.local if sa is not None else (receiver, 500)


def _ctx(w: World, sa) -> payloads.Ctx:
    spis = []
    if sa is not None:
        for c in sa.children:
            spis += [c.spi_in, c.spi_out]
    good = {}
    cfg = (sa.config or (sa.candidates[0] if sa.candidates else None)) if sa is not None else None
    if cfg is None:
        cfg = next(iter(w.engines[A_ADDR].tunnels()))
    from appliance.ike.constants import ProtocolId
    good[ProtocolId.IKE] = list(cfg.ike_proposals)
    good[ProtocolId.ESP] = list(cfg.esp_proposals)
    return payloads.Ctx(spis, good, [b"b.example.net", b"a.example.net"])


def gen_mutation(rng, w: World, sc: Scenario, corpus: Corpus):
    pool = rng.random()
    if pool < 0.15 and corpus.recorded:
        donor = rng.choice(corpus.recorded)
        src_kind = "recorded"
    elif pool < 0.45 and (sc.history or w.held):
        donor = rng.choice([d.data for d, _ in sc.history] + [d.data for d in w.held])
        src_kind = "own"
    else:
        donor = rng.choice(corpus.datagrams)
        src_kind = "live"
    receiver = rng.choice((A_ADDR, B_ADDR))
    sa, target = _target(w, receiver, rng)
    iv_icv = (sa.cipher_in.iv_size + sa.cipher_in.icv_size) if sa is not None else 24
    data, steps = mutate.mutate(rng, donor, corpus.donors, target, iv_icv)
    if data == donor:
        data, s = mutate.bitflip(rng, data)
        steps.append(s)
    src = _src_for(rng, w, receiver, sa)
    return Datagram(data, src, _dst_for(receiver, sa)), [f"mutate {src_kind} donor ({len(donor)} octets) "
                                                        f"to {receiver} from {src[0]}:{src[1]}: " + ", ".join(steps)]


def gen_replay(rng, w: World, sc: Scenario, corpus: Corpus):
    pool = [(d, r) for d, r in sc.history] + [(d, d.dst[0]) for d in w.held]
    if not pool:
        return gen_mutation(rng, w, sc, corpus)
    d, receiver = rng.choice(pool)
    if rng.random() < 0.7:
        src = rng.choice((ATTACKER, (d.src[0], 4500), (d.src[0], 1234), ("198.51.100.9", 500)))
    else:
        src = d.src
    return Datagram(d.data, src, d.dst), [f"replay {d.data[18]}/{'resp' if d.data[19] & 0x20 else 'req'} "
                                          f"mid {struct.unpack_from('!I', d.data, 20)[0]} to {receiver} from {src[0]}:{src[1]}"]


def gen_plain(rng, w: World, sc: Scenario, corpus: Corpus):
    """A well-formed unprotected message: an IKE_SA_INIT request or response (with hostile
    contents), or an unencrypted message on an existing SA."""
    receiver = rng.choice((A_ADDR, B_ADDR))
    sa, target = _target(w, receiver, rng)
    kind = rng.random()
    e = w.engines[receiver]
    init_sas = [s for s in e._sas.values() if s.alive and s.initiator and s.spi_r == bytes(8)]
    if init_sas and kind < 0.5:
        # a spoofed IKE_SA_INIT response to an initiator that waits for one
        s = rng.choice(init_sas)
        ps, desc = payloads.chain_for(rng, _ctx(w, s), 34, True)
        spi_r = rng.randbytes(8) if rng.random() < 0.9 else bytes(8)
        first, body = wire.chain(ps)
        data = wire.header(s.spi_i, spi_r, first, 34, wire.FLAG_R, 0, 28 + len(body)) + body
        src = _src_for(rng, w, receiver, s)
        return Datagram(data, src, s.local), [f"IKE_SA_INIT response to {receiver} from {src[0]}:{src[1]}: {desc}"]
    if kind < 0.8 or sa is None:
        ps, desc = payloads.chain_for(rng, _ctx(w, sa), 34, False)
        if corpus.init_requests and rng.random() < 0.3:
            _h, ps, _ = wire.split(rng.choice(corpus.init_requests))
            ps, links, d2 = mutate.surgery(rng, ps, corpus.donors)
            desc = "recorded " + d2
        spi_i = rng.randbytes(8) if rng.random() < 0.85 else rng.choice((bytes(8), (sa.spi_i if sa else bytes(8))))
        first, body = wire.chain(ps)
        mid = 0 if rng.random() < 0.9 else rng.getrandbits(32)
        data = wire.header(spi_i, bytes(8), first, 34, wire.FLAG_I, mid, 28 + len(body)) + body
        src = _src_for(rng, w, receiver)
        return Datagram(data, src, (receiver, 500)), [f"IKE_SA_INIT request to {receiver} from {src[0]}:{src[1]}: {desc}"]
    xchg = rng.choice((35, 36, 37, 34))
    response = rng.random() < 0.5
    ps, desc = payloads.chain_for(rng, _ctx(w, sa), xchg, response)
    first, body = wire.chain(ps)
    flags = (wire.FLAG_I if target.peer_is_initiator else 0) | (wire.FLAG_R if response else 0)
    mid = target.response_mid(rng) if response else target.request_mid(rng)
    data = wire.header(sa.spi_i, sa.spi_r, first, xchg, flags, mid, 28 + len(body)) + body
    src = _src_for(rng, w, receiver, sa)
    return Datagram(data, src, sa.local), [f"unprotected {xchg}/{'resp' if response else 'req'} mid {mid} to {receiver}: {desc}"]


def gen_forged(rng, w: World, sc: Scenario, corpus: Corpus):
    """A well-formed (or deliberately malformed) plaintext protected with the receiving SA's
    real keys, so it passes the integrity check and reaches the parsers and handlers."""
    receiver = rng.choice((A_ADDR, B_ADDR))
    sa, target = _target(w, receiver, rng)
    if sa is None:
        receiver = peer_of(receiver)
        sa, target = _target(w, receiver, rng)
        if sa is None:
            return gen_plain(rng, w, sc, corpus)
    steps = []
    focus = False
    if corpus.plaintexts and rng.random() < 0.35:
        xchg, response, first0, inner0 = rng.choice(corpus.plaintexts)
        ps, _trail = wire.walk(first0, inner0)
        n = rng.choice((1, 1, 2, 3))
        desc = "live plaintext"
        for _ in range(n):
            ps, links, d = mutate.surgery(rng, ps, corpus.donors)
            desc += " " + d
            if links is not None:
                break
        if rng.random() < 0.3:
            response = not response
    else:
        focus = not sa.established and rng.random() < 0.5
        if focus:
            # before IKE_AUTH completed: the IKE_AUTH message the SA waits for (an attacker's
            # own half-open SA on B is the path that needs no PSK)
            # (IKE_INTERMEDIATE while additional key exchanges remain, RFC 9370)
            xchg, response = (43 if sa.addke_todo else 35), sa.initiator
        else:
            xchg = rng.choice((35, 36, 36, 37, 37, 34, 43, 44, rng.choice(mutate.EXCHANGES)))
            response = rng.random() < 0.45
        ps, desc = payloads.chain_for(rng, _ctx(w, sa), xchg, response)
        links = None
        if rng.random() < 0.25:
            ps, links, d = mutate.surgery(rng, ps, corpus.donors)
            desc += " " + d
    first, inner = wire.chain(ps, links=links)
    pad = None
    r = rng.random()
    if r < 0.15:
        inner, d = rng.choice((mutate.bitflip, mutate.truncate, mutate.extend, mutate.setbytes))(rng, inner)
        desc += " inner-" + d.split("(")[0]
    elif r < 0.25:
        n = rng.choice((0, 1, 15, 16, 255))
        pad = rng.randbytes(rng.choice((0, 1, 3))) + bytes([n])
        desc += f" pad-length {n}"
    elif r < 0.28:
        pad = b""
        desc += " no-pad-octet"
    peer_i = target.peer_is_initiator if rng.random() < 0.97 else not target.peer_is_initiator
    flags = (wire.FLAG_I if peer_i else 0) | (wire.FLAG_R if response else 0)
    if rng.random() < 0.03:
        flags |= wire.FLAG_V
    mid = target.response_mid(rng) if response else target.request_mid(rng)
    if focus:
        mid = (target.pending if response and target.pending is not None else target.peer_mid)
    if pad == b"" and inner == b"":
        pad = None
    iv = rng.randbytes(sa.cipher_in.iv_size)
    try:
        data = wire.protect(sa.cipher_in, dict(spi_i=sa.spi_i, spi_r=sa.spi_r, exchange=xchg,
                                               flags=flags, mid=mid), first, inner, iv, pad)
    except CryptoError:
        return gen_plain(rng, w, sc, corpus)
    src = _src_for(rng, w, receiver, sa)
    who = "genuine SA" if _genuine(w, sa, sc) else "attacker's SA"
    steps.append(f"forged with the {who}'s keys: {xchg}/{'resp' if response else 'req'} mid {mid} "
                 f"to {receiver} from {src[0]}:{src[1]}: {desc}")
    return Datagram(data, src, sa.local), steps


GENERATORS = ((gen_mutation, 0.40), (gen_forged, 0.35), (gen_plain, 0.15), (gen_replay, 0.10))


def _pick(rng, table):
    r = rng.random()
    acc = 0.0
    for item, p in table:
        acc += p
        if r < acc:
            return item
    return table[-1][0]


def _verifies(w: World, sc: Scenario, d: Datagram) -> bool:
    """Would the receiver's integrity check pass on this datagram for the genuine SA (and it is
    not a copy of a genuine datagram already sent)? Only such a datagram may change state."""
    if d.data in sc.seen or len(d.data) < 28:
        return False
    e = w.engines.get(w.unnat.get(d.dst, d.dst)[0])
    if e is None:
        return False
    hdr_i = bool(d.data[19] & wire.FLAG_I)
    sa = e._sas.get(d.data[8:16] if hdr_i else d.data[0:8])
    if sa is None or sa.cipher_in is None or not _genuine(w, sa, sc):
        return False
    return _decrypt(w, d.data, w.unnat.get(d.dst, d.dst)[0]) is not None


# ---------------------------------------------------------------------------- oracle 3
def _current(e):
    return [s for s in e.sas() if s.established and not s.closing]


def problems(w: World, sc: Scenario, strict: bool, identity: bool | None = None,
             progress: bool = True) -> list[str]:
    """What is wrong with the genuine tunnel now. `strict`: a pair of Child SAs exactly as the
    kernel would hold it; `identity` (default: strict): also the very IKE SA and Child SAs of
    the snapshot (or their rekeyed successors), no IkeSaDown / PeerDead at all."""
    if identity is None:
        identity = strict
    a, b = w.engines[A_ADDR], w.engines[B_ADDR]
    ca, cb = _current(a), _current(b)
    out = []
    if len(ca) != 1 or len(cb) != 1:
        return [f"established IKE SAs: A {len(ca)}, B {len(cb)}"]
    sa, sb = ca[0], cb[0]
    if (sa.spi_i, sa.spi_r) != (sb.spi_i, sb.spi_r):
        return ["A and B are up on different IKE SAs"]
    if sa.keys.SK_d != sb.keys.SK_d:
        return ["A and B have different IKE SA keys"]
    for name, s in (("A", sa), ("B", sb)):
        if s.pending is not None or s.queue:
            out.append(f"{name} still has an exchange under way")
    if sa.my_mid != sb.peer_mid or sb.my_mid != sa.peer_mid:
        out.append("message windows out of step")
    base = sc.mids.get(sa.spi_i, (0, 0))
    if progress and sa.my_mid + sb.my_mid <= base[0] + base[1]:
        out.append("no genuine exchange completed")
    out += installed_pair_ok(w) if strict else _traffic_flows(w)
    if identity:
        if sc.genuine is not None and not sc.ike_rekey and (sa.spi_i, sa.spi_r) != sc.genuine:
            out.append("the genuine IKE SA was replaced")
        if sc.negotiating_spi_i is not None and sa.spi_i != sc.negotiating_spi_i:
            out.append("the negotiation under way did not complete (a new one did)")
        for ip, x in w.events:
            if isinstance(x, ev.IkeSaDown):
                out.append(f"{'A' if ip == A_ADDR else 'B'}: IkeSaDown: {x.reason}")
            elif isinstance(x, ev.PeerDead):
                out.append(f"{'A' if ip == A_ADDR else 'B'}: PeerDead (DPD action {x.action})")
        for ip, p in w.planes.items():
            # the pair up at snapshot time, or its rekeyed successors; a side that had none yet
            # (IKE_AUTH under way) may install exactly one new pair
            allowed = set(sc.child_spis.get(ip, ()))
            fresh_ok = not allowed
            for eip, x in w.events:
                if eip != ip or not isinstance(x, ev.ChildSaInstalled):
                    continue
                if x.replaces is not None and x.replaces[0] in allowed:
                    allowed.add(x.spi_in)
                elif x.replaces is None and fresh_ok:
                    allowed.add(x.spi_in)
                    fresh_ok = False
            if any(spi not in allowed for spi in p.inbound):
                out.append(f"{'A' if ip == A_ADDR else 'B'}: the genuine Child SA was replaced (not by a rekey)")
    return out


def _traffic_flows(w: World) -> list[str]:
    """Relaxed data plane check: what each side sends on, the other can receive (extra pairs
    a hostile authenticated peer created may linger until they are resolved or expire)."""
    out = []
    for x, y in ((A_ADDR, B_ADDR), (B_ADDR, A_ADDR)):
        s = w.planes[x].sending_on()
        r = w.planes[y].inbound.get(s.spi) if s is not None else None
        if s is None or r is None or (s.encr_key, s.integ_key) != (r.encr_key, r.integ_key):
            out.append(f"{'A' if x == A_ADDR else 'B'} sends on no SA the other side receives on")
    return out + w.planes[A_ADDR].errors + w.planes[B_ADDR].errors


def _rekeys(w: World, sc: Scenario) -> list[str]:
    """More of the genuine conversation: A rekeys the Child SA, then B rekeys the IKE SA
    (CREATE_CHILD_SA both ways, the DELETEs that follow); the tunnel is then whole again."""
    a, b = w.engines[A_ADDR], w.engines[B_ADDR]
    start = len(w.events)
    old = _current(a)[0].spi_i
    w.call("rekey_child", a.rekey_child, "to-b", w.now)
    w.pump()
    w.call("rekey_ike", b.rekey_ike, "to-a", w.now)
    w.advance(w.now + 1.0)
    out = problems(w, sc, strict=True, identity=False, progress=False)
    for ip, x in w.events[start:]:
        if isinstance(x, (ev.IkeSaDown, ev.PeerDead, ev.IkeSaFailed)):
            out.append(f"rekeys: {'A' if ip == A_ADDR else 'B'}: {type(x).__name__}")
    if not any(isinstance(x, ev.ChildSaInstalled) and x.replaces is not None for _ip, x in w.events[start:]):
        out.append("rekeys: the Child SA was not rekeyed")
    if any(s.spi_i == old for s in _current(a)):
        out.append("rekeys: the IKE SA was not rekeyed")
    return [p if p.startswith("rekeys") else "after rekeys: " + p for p in out]


def _continue(w: World, sc: Scenario) -> None:
    w.release_held()
    if sc.fresh:
        w.call("start", w.engines[A_ADDR].start, w.now)
        w.pump()
    w.advance(w.now + DPD_WINDOW)


def _init_race(sc: Scenario, d: Datagram) -> bool:
    """A copy of the genuine initiator's IKE_SA_INIT request (changed or not) sent to the
    responder while the genuine one is in flight: nothing authenticates IKE_SA_INIT, so the
    responder answers it and that negotiation may fail (the AUTH payloads then disagree);
    the initiator must recover by itself."""
    spi_i = sc.negotiating_spi_i or sc.first_spi_i
    if spi_i is None or len(d.data) < 28 or d.data[18] != 34:
        return False
    if not d.data[19] & wire.FLAG_R:
        return d.data[:8] == spi_i
    # §2.21.1 / issue 12 #10: an initiator acts at once on an unauthenticated COOKIE,
    # INVALID_KE_PAYLOAD or INVALID_MAJOR_VERSION (a spoofed one costs a round trip or a retry);
    # and an answer with SA, KE and Nonce that arrives first is the one it goes on with (a
    # well-formed KE value cannot be told from the genuine one; IKE_AUTH then fails)
    _h, ps, _ = wire.split(d.data)
    if {33, 34, 40} <= {p.type for p in ps}:
        return True
    return any(p.type == 41 and len(p.body) >= 4 and int.from_bytes(p.body[2:4], "big") in (5, 17, 16390)
               for p in ps)


def _comes_up(w: World, sc: Scenario) -> list[str]:
    # the initiator gives up on IKE_AUTH after its retransmissions (~190 s), then retries
    w.advance(w.now + 400.0, stop=lambda: not problems(w, sc, strict=True, identity=False))
    w.advance(w.now + DPD_WINDOW)
    return problems(w, sc, strict=True, identity=False)


def _renegotiate(w: World, sc: Scenario) -> list[str]:
    """After an authenticated hostile datagram the genuine SA may be gone or confused (the
    forged message spoke for the peer, which then behaves as if it never sent it): the
    engines must still negotiate a fresh tunnel. Both sides drop what they have, A connects."""
    a, b = w.engines[A_ADDR], w.engines[B_ADDR]
    w.call("terminate", a.terminate, "to-b", w.now)
    w.pump()
    w.call("terminate", b.terminate, "to-a", w.now)
    w.pump()
    # a DELETE the peer no longer answers is retransmitted until it gives up
    w.advance(w.now + 600.0, stop=lambda: not a.sas() and not any(s.established for s in b.sas()))
    w.now += 1.0
    w.call("connect", a.connect, "to-b", w.now)
    w.advance(w.now + 60.0, stop=lambda: bool(_current(a)) and bool(_current(b)) and not installed_pair_ok(w))
    w.advance(w.now + DPD_WINDOW)
    out = []
    ca, cb = _current(a), _current(b)
    if len(ca) != 1 or len(cb) != 1:
        return [f"fresh negotiation failed: established IKE SAs A {len(ca)}, B {len(cb)}"]
    sa, sb = ca[0], cb[0]
    if (sa.spi_i, sa.spi_r) != (sb.spi_i, sb.spi_r) or sa.keys.SK_d != sb.keys.SK_d:
        return ["fresh negotiation failed: A and B are up on different IKE SAs"]
    if sa.pending is not None or sb.pending is not None or sa.my_mid != sb.peer_mid or sb.my_mid != sa.peer_mid:
        out.append("fresh negotiation: exchanges stuck or windows out of step")
    fresh = [x.spi_in for ip, x in w.events if isinstance(x, ev.ChildSaInstalled)]
    for ip, p in w.planes.items():
        live = [spi for spi in p.inbound if spi in fresh]
        if len(live) != 1:
            out.append(f"fresh negotiation: {'A' if ip == A_ADDR else 'B'} has {len(live)} new Child SAs")
    return out


# ---------------------------------------------------------------------------- one case
@dataclass
class Case:
    seed: int
    index: int
    scenario: str
    steps: list[str]
    failure: Failure | None
    verified: bool


def _norm(text: str) -> str:
    return re.sub(r"\b[0-9a-f]{8,}\b", "H", re.sub(r"\d+(\.\d+)?", "N", text))


class Fuzzer:
    def __init__(self, scenarios: list[Scenario] | None = None) -> None:
        self.scenarios = scenarios if scenarios is not None else build_all()
        self.corpus = Corpus(self.scenarios)
        self._baseline()

    def _baseline(self) -> None:
        """Each scenario's own continuation (no hostile datagram) passes the strict oracle."""
        for sc in self.scenarios:
            w = sc.snapshot.restore()
            _continue(w, sc)
            found = problems(w, sc, strict=True) or _rekeys(w, sc)
            if found:
                raise AssertionError(f"scenario {sc.name} fails without any hostile datagram: {found}")

    @staticmethod
    def _log_failure(seed, index, sc, steps, w: World | None = None) -> Failure | None:
        if _ORACLE.bad:
            return Failure(seed, index, "log", "log line with control characters from the wire",
                           repr(_ORACLE.bad[0]), sc.name, steps)
        for _ip, x in (w.events if w is not None else ()):
            reason = getattr(x, "reason", "")
            if isinstance(reason, str) and _CONTROL.search(reason):
                return Failure(seed, index, "log", f"{type(x).__name__} reason with control characters "
                               "from the wire (the daemon logs it)", repr(reason[:200]), sc.name, steps)
        return None

    def case(self, seed: int, index: int) -> Case:
        rng = random.Random(f"{seed}:{index}")
        sc = self.scenarios[rng.randrange(len(self.scenarios))]
        logs = rng.random() < 0.25
        more = rng.random() < 0.5      # continue with both rekeys too (when something changed)
        _log_mode(logs)
        w = sc.snapshot.restore()
        before = state_bytes(w)
        steps: list[str] = []
        verified = race = False
        try:
            n = 1 if rng.random() < 0.7 else rng.choice((2, 2, 3))
            gen = _pick(rng, GENERATORS)
            for k in range(n):
                if k and rng.random() < 0.5:
                    gen = _pick(rng, GENERATORS)
                d, s = gen(rng, w, sc, self.corpus)
                steps += s
                if _verifies(w, sc, d):
                    verified = True
                if _init_race(sc, d):
                    race = True
                w.deliver(d)
                w.pump()
            if SKIP_UNCHANGED and state_bytes(w) == before:
                # nothing changed: the genuine conversation continues exactly as from the
                # snapshot, which Fuzzer() checked once (deterministic engines)
                return Case(seed, index, sc.name, steps, self._log_failure(seed, index, sc, steps, w), verified)
            _continue(w, sc)
            found = problems(w, sc, strict=not verified)
            if not found and not verified and more:
                found = _rekeys(w, sc)
            if found and verified:
                found = _renegotiate(w, sc)
            elif found and race:
                found = _comes_up(w, sc)
            fail = None
            if found:
                fail = Failure(seed, index, "broken", f"oracle 3 ({'authenticated' if verified else 'unauthenticated'}"
                               f" hostile datagram): {_norm(found[0])}", "; ".join(found), sc.name, steps)
            else:
                fail = self._log_failure(seed, index, sc, steps, w)
        except CallFailed as e:
            key = (f"oracle 1: {e.detail.split(':')[0]} at {e.location}" if e.kind == "exception"
                   else f"oracle 2: slow {e.api}" if e.kind == "slow" else f"{e.kind} in {e.api}")
            fail = Failure(seed, index, e.kind, key, f"{e.api}: {e.detail}", sc.name, steps, e.tb)
        except Exception as e:  # noqa: BLE001 - a bug of the fuzzer itself: report it as such
            fail = Failure(seed, index, "harness", f"fuzzer error {type(e).__name__}", str(e), sc.name,
                           steps, traceback.format_exc())
        finally:
            if logs:
                _log_mode(False)
        return Case(seed, index, sc.name, steps, fail, verified)
