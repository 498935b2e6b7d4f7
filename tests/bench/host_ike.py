"""IKE_SA + first Child SA setups per second, responder against responder (issue 4, `make bench`).

One initiator in one network namespace opens N tunnels (IKE_SA_INIT + IKE_AUTH with the first
Child SA; PSK, `aes256gcm16-prfsha384-x25519`, ESP `aes256gcm16`, 0.0.0.0/0 + ::/0 selectors)
against a responder in another namespace, keeping at most W exchanges in flight. A setup counts
when the initiator reports the Child SA installed, i.e. after the IKE_AUTH response. Rounds
alternate between the responders so that both see the same machine load, and the result is
printed as a ratio against strongSwan's responder measured in the same run. Each round also
prints the CPU time per setup of the responder, the initiator and this process (from /proc), and
how many cores other processes kept busy meanwhile: the machine is shared, and the setups/s of
both responders move with that load. Nothing is asserted on the numbers.

- The initiator is strongSwan 5.9.8 (charon-systemd with `reuse_ikesa = no`, so every initiate
  is a new IKE SA), driven over vici. It is the same for every responder. To switch to our own
  initiator later, write a class with the `Initiator` methods and pass it to `measure()`.
- The anchor responder is strongSwan 5.9.8 with Child SAs in kernel-libipsec (the host kernel has
  no ESP), DoS protection off (no COOKIEs, no per-IP half-open limit), `unique = never`, no vici
  listener, its level-0 audit log to a file.
- Our responder is `python -m appliance.ikerunner` (one tunnel, unique=False), its event lines
  to a file, its log at INFO to a file. `NOTES` (printed) lists what still differs.
- A responder joins by adding a class with the `Responder` methods to `responders()`.

Run: `.venv/bin/python tests/bench/host_ike.py [--tunnels N] [--window W] [--rounds R]` (root).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

TOP = Path(__file__).resolve().parents[2]
if str(TOP) not in sys.path:
    sys.path.insert(0, str(TOP))

from tests.peers.strongswan import Child, Conn, Retransmit, StrongSwan  # noqa: E402
from tests.peers.topology import Side, pair_of_namespaces  # noqa: E402

PSK = "bench-Secret-0123456789abcdef"
IKE_PROPOSAL = "aes256gcm16-prfsha384-x25519"
ESP_PROPOSAL = "aes256gcm16"
INITIATOR_ID = "ini.bench.example"
RESPONDER_ID = "resp.bench.example"
QUIET = {"default": 0, "ike": 0, "cfg": 0, "knl": 0, "net": 0, "enc": 0, "chd": 0, "job": 0, "dmn": 0, "lib": 0}


class Responder(Protocol):
    label: str

    def start(self, side: Side, peer: Side, workdir: Path) -> None: ...
    def pid(self) -> int | None: ...
    def stop(self) -> None: ...


class Initiator(Protocol):
    def start(self, side: Side, peer: Side, workdir: Path) -> None: ...
    def pid(self) -> int | None: ...
    def burst(self, n: int, window: int, timeout: float) -> "Burst": ...
    def stop(self) -> None: ...


@dataclass
class Burst:
    completed: int
    failed: int
    seconds: float
    cpu: dict[str, tuple[float, float]] | None = None   # (user, system) CPU seconds per process in the burst
    others: float | None = None    # cores busy with processes other than these three, on average

    def cpu_per_setup(self, who: str) -> float | None:
        """CPU milliseconds (user + system) of one process per completed setup."""
        if not self.cpu or not self.completed:
            return None
        u, s = self.cpu[who]
        return (u + s) * 1000 / self.completed

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads) so far, from /proc."""
    if pid is None:
        return 0.0, 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / _CLK_TCK, sum(v[:8]) / _CLK_TCK


def _conn(local: Side, remote: Side, local_id: str, remote_id: str) -> Conn:
    return Conn(local_addrs=[local.addr4], remote_addrs=[remote.addr4], local_id=local_id, remote_id=remote_id,
                psk=PSK, proposals=[IKE_PROPOSAL],
                children=[Child(esp_proposals=[ESP_PROPOSAL], if_id_in=42, if_id_out=42)],
                unique=None, mobike=False)


class StrongSwanResponder:
    label = "strongSwan 5.9.8"

    def __init__(self) -> None:
        self.daemon: StrongSwan | None = None

    def start(self, side: Side, peer: Side, workdir: Path) -> None:
        self.daemon = StrongSwan(workdir, side.name, name="responder", log_keys=False, log_levels=QUIET,
                                 charon={"dos_protection": False, "cookie_threshold": 1_000_000,
                                         "block_threshold": 1_000_000, "init_limit_half_open": 0,
                                         "ikesa_table_size": 256, "ikesa_table_segments": 16})
        self.daemon.start()
        conn = _conn(side, peer, RESPONDER_ID, INITIATOR_ID)
        conn.unique = "never"
        self.daemon.load(conn)
        # Nobody listens to its vici events: charon then builds none (vici checks for
        # listeners), and the bench process does not spend CPU decoding them. Our responder
        # still reports every IKE SA and Child SA (JSON lines), so this favours the anchor.
        if self.daemon.events is not None:
            self.daemon.events.close()
            self.daemon.events = None

    def pid(self) -> int | None:
        return self.daemon.proc.pid if self.daemon and self.daemon.proc else None

    def stop(self) -> None:
        if self.daemon:
            self.daemon.kill()   # no DELETE storm: only the setup rate is measured
            self.daemon = None


class StrongSwanInitiator:
    """strongSwan as the load generator: each vici `initiate` opens a new IKE SA."""

    def __init__(self) -> None:
        self.daemon: StrongSwan | None = None
        self.total = 0
        self.ike_sas: set[str] = set()   # initiator SPIs of the IKE SAs whose Child SA came up

    def start(self, side: Side, peer: Side, workdir: Path) -> None:
        self.daemon = StrongSwan(workdir, side.name, name="initiator", log_keys=False, log_levels=QUIET,
                                 retransmit=Retransmit(tries=5, timeout=4.0, base=1.8),
                                 charon={"reuse_ikesa": False, "ikesa_table_size": 256,
                                         "ikesa_table_segments": 16})
        self.daemon.start()
        self.daemon.load(_conn(side, peer, INITIATOR_ID, RESPONDER_ID))

    def pid(self) -> int | None:
        return self.daemon.proc.pid if self.daemon and self.daemon.proc else None

    def burst(self, n: int, window: int, timeout: float) -> Burst:
        d = self.daemon
        assert d is not None and d.events is not None
        seen = d.mark()
        started = completed = failed = 0
        t0 = time.monotonic()
        deadline = t0 + timeout
        while completed + failed < n and time.monotonic() < deadline:
            while started < n and started - completed - failed < window:
                d.initiate_async("c", "p")
                started += 1
            # Block until the next event (no busy loop stealing CPU from the daemons).
            if d.events.wait(lambda e: True, timeout=1.0, since=seen) is None:
                continue
            evs = d.events.events
            for e in evs[seen:]:
                if e.name == "child-updown" and "up" in e.body:
                    completed += 1
                    self.ike_sas.update(sa.get("initiator-spi", "?") for sa in e.body.values()
                                        if isinstance(sa, dict))
                elif e.name == "ike-updown" and "up" not in e.body:
                    failed += 1
            seen = len(evs)
        burst = Burst(completed, failed, time.monotonic() - t0)
        # The measurement is only meaningful if every setup was a new IKE SA. (Counted from the
        # events: a `list-sas` right after them would miss SAs that charon still has checked out.)
        self.total += completed
        if len(self.ike_sas - {"?"}) < self.total:
            raise RuntimeError(f"the initiator reused IKE SAs ({len(self.ike_sas - {'?'})} distinct for "
                               f"{self.total} setups)")
        return burst

    def stop(self) -> None:
        if self.daemon:
            self.daemon.kill()
            self.daemon = None


class IsthmusResponder:
    """Our IKE engine's responder (appliance/ikerunner.py in the namespace, one tunnel that
    accepts any number of IKE SAs: unique=False, as strongSwan's unique=never).

    The runner reports every IKE SA and Child SA as a JSON line (keys fingerprinted) on its
    stdout, which goes to a file here: a pipe read by a thread of this process (as the host
    tests' EngineProc does) would wake that thread on every write and make this process
    decode the lines, work the anchor is not given either."""

    label = "isthmus engine"

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.events_path: Path | None = None

    def start(self, side: Side, peer: Side, workdir: Path) -> None:
        from tests.host.ikerunner_proc import tunnel_json

        t = tunnel_json(side, peer, "bench", local_id=RESPONDER_ID, remote_id=INITIATOR_ID,
                        psk=PSK.encode(), start=False, unique=False, ike_proposals=[IKE_PROPOSAL],
                        esp_proposals=[ESP_PROPOSAL], dpd={"interval": 0, "timeout": 30, "action": "clear"})
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "ikerunner.json"
        # DoS protection off, as for strongSwan here (one initiator address, many half-open SAs)
        cfg.write_text(json.dumps({"listen": [{"address": side.addr4, "port": 500},
                                              {"address": side.addr4, "port": 4500, "natt": True}],
                                   "tunnels": [t],
                                   "dos": {"half_open_max": None, "half_open_per_source": None,
                                           "cookie_threshold": None}}))
        cfg.chmod(0o600)
        self.events_path = workdir / "events.jsonl"
        with open(self.events_path, "wb") as out, open(workdir / "ikerunner.log", "wb") as err:
            self.proc = subprocess.Popen(["ip", "netns", "exec", side.name, sys.executable, "-m", "appliance.ikerunner",
                                          str(cfg), "--log-level", "INFO"],
                                         cwd=TOP, stdin=subprocess.PIPE, stdout=out, stderr=err)
        deadline = time.monotonic() + 15
        while b'"ready"' not in self.events_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("our responder did not start:\n"
                                   + (workdir / "ikerunner.log").read_text(errors="replace")[-2000:])
            time.sleep(0.05)

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None   # `ip netns exec` execs python

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()   # no DELETE storm: only the setup rate is measured
            self.proc.wait(5)
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc = None


def _cpu_text(b: Burst) -> str:
    if not b.cpu or not b.completed:
        return "CPU n/a"
    per = 1000 / b.completed
    return "CPU ms/setup (sys) " + ", ".join(f"{k} {(u + s) * per:.2f} ({s * per:.2f})"
                                             for k, (u, s) in b.cpu.items())


def responders() -> list[type]:
    """The responders to compare; strongSwan's first (the anchor)."""
    return [StrongSwanResponder, IsthmusResponder]


def measure(responder_classes: list[type], initiator_class: type, tunnels: int, window: int, rounds: int,
            workdir: Path) -> dict[str, list[Burst]]:
    results: dict[str, list[Burst]] = {cls.label: [] for cls in responder_classes}
    with pair_of_namespaces("bench") as (ini_side, resp_side):
        for r in range(rounds):
            for cls in responder_classes:
                resp: Responder = cls()
                ini: Initiator = initiator_class()
                try:
                    resp.start(resp_side, ini_side, workdir / f"r{r}-{cls.__name__}-resp")
                    ini.start(ini_side, resp_side, workdir / f"r{r}-{cls.__name__}-ini")
                    ini.burst(window, window, timeout=30.0)   # warm-up, not counted
                    procs = {"responder": resp.pid(), "initiator": ini.pid(), "bench": os.getpid()}
                    before = {k: cpu_seconds(p) for k, p in procs.items()}
                    m0 = machine_cpu()
                    burst = ini.burst(tunnels, window, timeout=max(60.0, tunnels * 0.5))
                    m1 = machine_cpu()
                    after = {k: cpu_seconds(p) for k, p in procs.items()}
                    burst.cpu = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in procs}
                    ours = sum(u + s for u, s in burst.cpu.values())
                    if burst.seconds > 0:
                        burst.others = max(0.0, (m1[0] - m0[0]) - ours) / burst.seconds
                finally:
                    ini.stop()
                    resp.stop()
                results[cls.label].append(burst)
                print(f"  round {r + 1} {cls.label:>20}: {burst.completed}/{tunnels} up, {burst.failed} failed, "
                      f"{burst.seconds:.2f} s, {burst.rate:.1f} setups/s; {_cpu_text(burst)}"
                      + (f"; other processes {burst.others:.1f} cores" if burst.others is not None else ""),
                      flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tunnels", type=int, default=500, help="IKE SAs per round (default 500)")
    p.add_argument("--window", type=int, default=16, help="setups in flight at most (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per responder (default 5)")
    args = p.parse_args(argv)
    classes = responders()
    print(f"IKE_SA + first Child SA setups/s: PSK, {IKE_PROPOSAL}, ESP {ESP_PROPOSAL}; "
          f"{args.tunnels} tunnels per round, window {args.window}, {args.rounds} rounds; "
          f"initiator: strongSwan 5.9.8; {os.cpu_count()} cores, load average {_loadavg()}", flush=True)
    for line in NOTES:
        print(f"  note: {line}")
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-ike-") as tmp:
        results = measure(classes, StrongSwanInitiator, args.tunnels, args.window, args.rounds, Path(tmp))
    anchor = classes[0].label
    med = {label: statistics.median(b.rate for b in bursts) for label, bursts in results.items()}
    for label, bursts in results.items():
        rates = [b.rate for b in bursts]
        incomplete = sum(args.tunnels - b.completed for b in bursts)
        print(f"{label}: median {med[label]:.1f} setups/s (min {min(rates):.1f}, max {max(rates):.1f})"
              + (f", {incomplete} setups not completed" if incomplete else ""))
    if len(classes) == 1:
        rates = [b.rate for b in results[anchor]]
        print(f"ratio: not available: our responder does not exist yet (only the anchor, {anchor}); "
              f"anchor spread max/min = {max(rates) / min(rates):.2f}" if min(rates) > 0 else "ratio: n/a")
    for label, bursts in results.items():
        cpu = [c for b in bursts if (c := b.cpu_per_setup("responder")) is not None]
        if cpu:
            print(f"{label}: responder CPU per setup median {statistics.median(cpu):.3f} ms "
                  f"(min {min(cpu):.3f}, max {max(cpu):.3f})")
    for label in list(results)[1:]:
        ratio = med[label] / med[anchor] if med[anchor] else float("nan")
        pairs = [b.rate / a.rate for a, b in zip(results[anchor], results[label]) if a.rate > 0]
        print(f"ratio {label} / {anchor}: {ratio:.2f} (goal >= 1.0)"
              + (f"; round by round: median {statistics.median(pairs):.2f}, min {min(pairs):.2f}, "
                 f"max {max(pairs):.2f}" if pairs else ""))
        ca = [c for b in results[anchor] if (c := b.cpu_per_setup("responder")) is not None]
        co = [c for b in results[label] if (c := b.cpu_per_setup("responder")) is not None]
        if ca and co:
            print(f"responder CPU per setup, {anchor} / {label}: "
                  f"{statistics.median(ca) / statistics.median(co):.2f} (above 1: ours uses less)")
    print(f"load average at the end: {_loadavg()}")
    return 0


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


#: What differs between the two responders besides the IKE implementation (printed with the results).
NOTES = (
    "strongSwan installs each Child SA (and its policies) into kernel-libipsec, its userspace ESP "
    "(the host kernel has no ESP); ours installs nothing: it reports each IKE SA and Child SA as a "
    "JSON line (keys as SHA-256 fingerprints) to a file. A production daemon would add XFRM netlink "
    "calls per Child SA.",
    "strongSwan has a thread pool (both cores); ours is one Python process (one core at a time). "
    "Under contention for the 2 cores (the initiator, this bench, other users' processes) the "
    "scheduler shares CPU per thread, which favours the thread pool. The responders' CPU per setup "
    "(printed too) is the comparison that depends least on that load.",
    "Neither responder has a vici/event listener attached, DoS protection (cookies) is off on both, "
    "DPD is off on both; both accept any number of IKE SAs for the one tunnel (unique=never). "
    "Both write their audit log lines to a file (strongSwan at level 0: IKE_SA and CHILD_SA "
    "established; ours at INFO: Child SA installed).",
)


if __name__ == "__main__":
    sys.exit(main())
