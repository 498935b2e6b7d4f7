"""Benchmark (lab): responder cost at scale on the real kernel (issue 13), charon vs isthmusd.

In one lab boot: strongSwan 5.9.8 charon (Debian's, kernel-netlink) is the initiator in namespace
I with N connections ``cK.example.net`` (PSK, ``aes128gcm16-prfsha256-x25519``, ESP
``aes128gcm16``, one Child SA 0/0 each, its own if_id); vici ``initiate`` requests are pipelined,
keeping 16 IKE SAs in flight. The responder in namespace R, across a veth, is first charon
(``dos_protection = no``, one connection per initiator identity), then isthmusd (N tunnels, each
``remote: 192.0.2.1``, its own ``remote_id``, ``start: false``, its own XFRM interface created
before the timed window; DoS thresholds raised with ``appliance.dos_protection``). The responder
is pinned to CPU 0, the initiator to CPU 1 (when the guest has two). Done = R's kernel SAD holds
2N ESP states.

Printed per responder and N: wall seconds, IKE+Child SA/s, responder CPU per SA (user + system of
the process and the children it waited for, from /proc/<pid>/stat), RSS growth per SA, datagrams
R received beyond the 2N an answer-per-request exchange needs (the initiator's retransmissions),
and the ratios isthmusd / charon. Also: the start-up of an N-tunnel isthmusd (process start to
control socket ready with all N XFRM interfaces present) against ``ip -batch`` creating the same
interfaces with their addresses.

    python3 tests/bench/lab_responder_scale.py          (inside the lab: make bench)
    ISTHMUS_BENCH_SCALE_N=50 python3 tests/bench/lab_responder_scale.py      (a quick run)
    ISTHMUS_BENCH_SCALE_PROFILE=1 ...   isthmusd also runs once more under cProfile (not timed)
    ISTHMUS_BENCH_SCALE_ROUNDS=3 ...     charon and isthmusd alternately 3 times; median ratios
    ISTHMUS_BENCH_SCALE_STARTUP=1000 ... also the start-up alone of a 1000-tunnel isthmusd
    ISTHMUS_BENCH_SCALE_BASELINE=DIR ...  at N <= 200, also isthmusd from the source tree DIR
                                          (e.g. `git archive OLD appliance bgp | tar -x -C DIR`)
"""

from __future__ import annotations

import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
if str(TOP) not in sys.path:
    sys.path.insert(0, str(TOP))

from tests.appliances import Appliance  # noqa: E402
from tests.netns import Netns, veth_pair  # noqa: E402
from tests.peers.strongswan import Child, Conn, Retransmit, StrongSwan  # noqa: E402

PSK = "bench-Scale-0123456789abcdef"
IKE_PROPOSAL = "aes128gcm16-prfsha256-x25519"
ESP_PROPOSAL = "aes128gcm16"
I_ADDR, R_ADDR = "192.0.2.1", "192.0.2.2"
R_ID = "r.example.net"
WINDOW = 16
ROUNDS = int(os.environ.get("ISTHMUS_BENCH_SCALE_ROUNDS", "1"))
QUIET = {"default": 0, "ike": 0, "cfg": 0, "knl": 0, "net": 0, "enc": 0, "chd": 0, "job": 0, "dmn": 0, "lib": 0}
CLK_TCK = os.sysconf("SC_CLK_TCK")
IF_ID_BASE = 0x100


def sh(cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr or r.stdout}")
    return r.stdout


def ini_id(k: int) -> str:
    return f"c{k}.example.net"


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime (the process, all its threads, its waited-for children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pin(pid: int, cpu: int) -> None:
    """Every thread of `pid` (and so what it starts later) onto `cpu`."""
    if (os.cpu_count() or 1) < 2:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            pass


def udp_in(ns: Netns) -> int:
    out = ns.run("cat /proc/net/snmp").stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("Udp:")]
    head, vals = rows[0], rows[1]
    return int(vals[head.index("InDatagrams")])


def esp_states(ns: Netns) -> int:
    out = ns.run("ip xfrm state count").stdout
    m = re.search(r"(\d+)", out)
    return int(m.group(1)) if m else 0


def conn(k: int, initiator: bool) -> Conn:
    x = IF_ID_BASE + k
    c = Conn(name=f"c{k}", local_addrs=[I_ADDR], remote_addrs=[R_ADDR], local_id=ini_id(k), remote_id=R_ID,
             psk=PSK, proposals=[IKE_PROPOSAL], children=[Child(name="c", esp_proposals=[ESP_PROPOSAL],
                                                                 local_ts=["0.0.0.0/0"], remote_ts=["0.0.0.0/0"],
                                                                 if_id_in=x, if_id_out=x)],
             unique=None, mobike=False)
    return c if initiator else c.mirrored()


class Initiator:
    def __init__(self, ns: Netns, workdir: Path, n: int):
        self.ns, self.n = ns, n
        self.daemon = StrongSwan(workdir, ns.name, name="initiator", log_keys=False, log_levels=QUIET,
                                 retransmit=Retransmit(tries=5, timeout=4.0, base=1.8),
                                 charon={"ikesa_table_size": 1024, "ikesa_table_segments": 16,
                                         "reuse_ikesa": False})

    def start(self) -> None:
        self.daemon.start()
        pin(self.daemon.proc.pid, 1)
        self.daemon.load([conn(k, True) for k in range(self.n)])

    def run(self, responder_ns: Netns, timeout: float) -> tuple[int, int, float]:
        """Initiate every connection, WINDOW in flight; returns (up, failed, seconds until R's SAD
        holds 2N states)."""
        d = self.daemon
        seen = d.events.mark()
        started = up = failed = 0
        t0 = time.monotonic()
        deadline = t0 + timeout
        while up + failed < self.n and time.monotonic() < deadline:
            while started < self.n and started - up - failed < WINDOW:
                d.initiate_async("c", f"c{started}")
                started += 1
            if d.events.wait(lambda e: True, timeout=1.0, since=seen) is None:
                continue
            evs = d.events.events
            for e in evs[seen:]:
                if e.name == "child-updown" and "up" in e.body:
                    up += 1
                elif e.name == "ike-updown" and "up" not in e.body:
                    failed += 1
            seen = len(evs)
        while esp_states(responder_ns) < 2 * up and time.monotonic() < deadline:
            time.sleep(0.05)
        return up, failed, time.monotonic() - t0

    def stop(self) -> None:
        self.daemon.kill()


class CharonResponder:
    label = "charon 5.9.8"

    def __init__(self, ns: Netns, workdir: Path, n: int):
        self.daemon = StrongSwan(workdir, ns.name, name="responder", log_keys=False, log_levels=QUIET,
                                 charon={"dos_protection": False, "cookie_threshold": 10_000_000,
                                         "block_threshold": 10_000_000, "init_limit_half_open": 0,
                                         "ikesa_table_size": 1024, "ikesa_table_segments": 16})
        self.n = n

    def start(self) -> float:
        t0 = time.monotonic()
        self.daemon.start()
        pin(self.daemon.proc.pid, 0)
        self.daemon.load([conn(k, False) for k in range(self.n)])
        # nobody listens to its vici events (vici then builds none), as nobody reads isthmusd's
        self.daemon.events.close()
        self.daemon.events = None
        return time.monotonic() - t0

    @property
    def pid(self) -> int:
        return self.daemon.proc.pid

    def stop(self) -> None:
        self.daemon.kill()


def isthmus_config(n: int, psk_file: str) -> str:
    lines = ["appliance:", "  name: bench-r", "  delete_on_shutdown: false",
             "  dos_protection: {half_open_max: off, half_open_per_source: off, cookie_threshold: off}",
             "tunnels:"]
    for k in range(n):
        net = 0x0100 * 4 + 4 * k          # 169.254.4.0 onwards, /30 each
        addr = f"169.254.{net >> 8}.{(net & 0xFF) + 2}/30"
        lines += [f"  t{k}:", f"    remote: {I_ADDR}", f"    local: {R_ADDR}", f"    local_id: {R_ID}",
                  f"    remote_id: {ini_id(k)}", f"    auth: {{psk_file: {psk_file}}}", "    start: false",
                  f"    ike: {{proposals: [{IKE_PROPOSAL}]}}", f"    esp: {{proposals: [{ESP_PROPOSAL}]}}",
                  # as charon here (no dpd_delay): no DPD exchanges in the window, so the datagrams
                  # beyond 2N are the initiator's retransmissions only
                  "    dpd: {interval: 1h}",
                  f"    interface: {{name: xr{k}, address: {addr}}}"]
    return "\n".join(lines) + "\n"


class BenchAppliance(Appliance):
    """isthmusd as the image runs it: JSON logs at INFO to a file, metrics served, no hooks.
    `code`: run the daemon from another copy of the source (a baseline)."""

    code: str | None = None

    def argv(self) -> list[str]:
        if self.code:
            run = (f"import sys, runpy; sys.path.insert(0, {self.code!r}); "
                   "runpy.run_module('appliance.daemon', run_name='__main__', alter_sys=True)")
            start = [sys.executable, "-c", run]
        else:
            start = [sys.executable, "-m", "appliance.daemon"]
        cmd = start + ["--config", str(self.config_path),
               "--run-dir", str(self.run_dir), "--log-format", "json", "--log-level", "info",
               "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--hooks-dir", str(self.etc / "hooks")]
        return ["ip", "netns", "exec", self.ns] + cmd


class IsthmusResponder:
    label = "isthmusd"

    def __init__(self, ns: Netns, workdir: Path, n: int, profile: str | None = None, code: str | None = None):
        self.ns, self.n, self.profile = ns, n, profile
        self.app = BenchAppliance("R", ns.name, workdir)
        self.app.code = COMPILED.get(code or str(TOP), code)
        if code:
            self.label = "isthmusd (baseline)"
        self.app.write_psk("bench.psk", PSK)
        self.app.write_config(isthmus_config(n, str(self.app.etc / "secrets" / "bench.psk")))

    def start(self) -> float:
        """Seconds from the process start to ready with all N interfaces present."""
        env = {"ISTHMUS_PROFILE": self.profile} if self.profile else None
        t0 = time.monotonic()
        self.app.start(wait=False, env=env)
        pin(self.app.proc.pid, 0)
        self.app.wait_ready(timeout=600)
        while self.ns.run("ip -o link show type xfrm").stdout.count("\n") < self.n:
            if time.monotonic() - t0 > 600:
                raise RuntimeError("isthmusd did not create its interfaces:\n" + self.app.log_tail())
            time.sleep(0.05)
        took = time.monotonic() - t0
        pin(self.app.proc.pid, 0)     # threads started meanwhile
        self.phases = self._phases(time.time() - took)
        return took

    def _phases(self, started: float) -> str:
        """Where the start-up went, from the daemon's own log time stamps."""
        import datetime
        marks = {}
        for r in self.app.log_records():
            msg, ts = r.get("message", ""), r.get("time")
            if not ts:
                continue
            t = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=datetime.timezone.utc).timestamp() - started
            marks.setdefault("first log line (interpreter, imports, config)", t)
            if msg.startswith("kernel state reconciled"):
                marks.setdefault("interfaces reconciled", t)
            if " ready: " in msg:
                marks.setdefault("ready", t)
        return ", ".join(f"{k} {v:.1f} s" for k, v in marks.items())

    @property
    def pid(self) -> int:
        return self.app.proc.pid

    def stop(self) -> None:
        if self.profile:
            self.app.stop(signal.SIGTERM, timeout=600)
        else:
            self.app.kill()
        # the interfaces go with the namespace
        self.ns.run("ip xfrm state flush; ip xfrm policy flush", check=False, timeout=600)


COMPILED: dict[str, str] = {}     # source tree -> its byte-compiled copy


def byte_compile(tmp: Path, code: str | None = None) -> None:
    """The image runs isthmusd byte-compiled (pip install writes the .pyc files); the lab guest
    mounts the source read-only with PYTHONDONTWRITEBYTECODE, so every start would compile every
    module again under TCG. So the daemon runs from a copy of `appliance` and `bgp` compiled
    once, untimed (a PYTHONPYCACHEPREFIX would hide the standard library's own .pyc files)."""
    import shutil
    for k, top in enumerate([TOP] + ([Path(code)] if code else [])):
        dest = tmp / f"compiled{k}"
        for pkg in ("appliance", "bgp"):
            if (top / pkg).is_dir():
                shutil.copytree(top / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest)], check=True, capture_output=True)
        COMPILED[str(top)] = str(dest)


def one(responder_cls, n: int, tmp: Path, tag: str, profile: str | None = None, code: str | None = None) -> dict:
    with Netns("scl-i") as ni, Netns("scl-r") as nr:
        veth_pair(ni, "wan", nr, "wan")
        ni.run(f"ip addr add {I_ADDR}/24 dev wan")
        nr.run(f"ip addr add {R_ADDR}/24 dev wan")
        time.sleep(0.5)
        kw = {"profile": profile} if profile else {}
        if code:
            kw["code"] = code
        resp = responder_cls(nr, tmp / f"{tag}-resp", n, **kw)
        ini = Initiator(ni, tmp / f"{tag}-ini", n)
        try:
            startup = resp.start()
            ini.start()
            time.sleep(1.0)
            pid = resp.pid
            cpu0, rss0, udp0 = cpu_seconds(pid), rss_kib(pid), udp_in(nr)
            up, failed, seconds = ini.run(nr, timeout=max(120.0, n * 1.5))
            cpu1, rss1, udp1 = cpu_seconds(pid), rss_kib(pid), udp_in(nr)
            states = esp_states(nr)
        finally:
            ini.stop()
            resp.stop()
        done = max(up, 1)
        return dict(label=resp.label, n=n, up=up, failed=failed, states=states, seconds=seconds,
                    rate=up / seconds if seconds else 0.0, cpu_ms=(cpu1 - cpu0) * 1000 / done,
                    rss_kib=(rss1 - rss0) / done, extra=(udp1 - udp0) - 2 * up, startup=startup,
                    phases=getattr(resp, "phases", ""))


def ip_batch_links(n: int, tmp: Path) -> float:
    """Anchor for start-up: `ip -batch` making the N interfaces with if_id, alias and address."""
    with Netns("scl-ip") as ns:
        path = tmp / "links.batch"
        lines = []
        for k in range(n):
            net = 0x0100 * 4 + 4 * k
            lines += [f"link add xr{k} type xfrm if_id {0x49000000 + k}",
                      f"link set xr{k} alias isthmus:t{k}",
                      f"addr add 169.254.{net >> 8}.{(net & 0xFF) + 2}/30 dev xr{k}"]
        path.write_text("\n".join(lines) + "\n")
        t0 = time.monotonic()
        ns.run(f"ip -batch {path}")
        return time.monotonic() - t0


def show(r: dict) -> None:
    print(f"  {r['label']:>13} N={r['n']}: {r['up']}/{r['n']} up ({r['failed']} failed), SAD {r['states']} states, "
          f"{r['seconds']:.1f} s, {r['rate']:.1f} SA/s, CPU {r['cpu_ms']:.1f} ms/SA, RSS {r['rss_kib']:.1f} KiB/SA, "
          f"{r['extra']} datagrams beyond 2N (retransmissions)", flush=True)


def print_profile(path: str, title: str, limit: int = 30) -> None:
    for suffix in ("main", "dataplane"):
        f = f"{path}.{suffix}"
        if not os.path.exists(f):
            print(f"  (no profile {f})")
            continue
        print(f"--- cProfile of isthmusd, {title}, thread {suffix}: by cumulative time")
        st = pstats.Stats(f)
        st.sort_stats("cumulative").print_stats(limit)
        print(f"--- thread {suffix}: by own time")
        st.sort_stats("tottime").print_stats(limit)


def main() -> int:
    sizes = [int(x) for x in os.environ.get("ISTHMUS_BENCH_SCALE_N", "200,1000").split(",") if x]
    profile = os.environ.get("ISTHMUS_BENCH_SCALE_PROFILE") == "1"
    baseline = os.environ.get("ISTHMUS_BENCH_SCALE_BASELINE")   # a copy of older source, N <= 200 only
    print(f"responder at scale: PSK, {IKE_PROPOSAL}, ESP {ESP_PROPOSAL}, window {WINDOW}; initiator charon "
          f"5.9.8 pinned to CPU 1, responder to CPU 0; {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-scale-") as d:
        tmp = Path(d)
        byte_compile(tmp, baseline)
        for n in sizes:
            print(f"== N = {n}", flush=True)
            rounds = []
            for r in range(ROUNDS):
                # rounds alternate the two responders: other users of the shared host move both
                ch = one(CharonResponder, n, tmp, f"c{n}-{r}")
                show(ch)
                us = one(IsthmusResponder, n, tmp, f"i{n}-{r}")
                show(us)
                rounds.append((ch, us))
                print(f"  round {r + 1} ratios isthmusd / charon at N={n}: SA/s {us['rate'] / ch['rate']:.2f}, "
                      f"CPU per SA {us['cpu_ms'] / ch['cpu_ms']:.2f}, RSS per SA "
                      f"{us['rss_kib'] / ch['rss_kib'] if ch['rss_kib'] > 0 else float('nan'):.2f}; load "
                      f"{os.getloadavg()[0]:.2f} in the guest", flush=True)
            anchor = ip_batch_links(n, tmp)
            print(f"  isthmusd start-up with {n} tunnels (ready, {n} interfaces): {us['startup']:.2f} s "
                  f"({us['phases']}); "
                  f"ip -batch making the same interfaces: {anchor:.2f} s; ratio {us['startup'] / anchor:.1f}"
                  + (" (goal <= 10 s)" if n >= 1000 else ""), flush=True)

            def med(f):
                xs = sorted(f(c, u) for c, u in rounds)
                return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
            what = "" if ROUNDS == 1 else f" (median of {ROUNDS} rounds)"
            print(f"  ratios isthmusd / charon at N={n}{what}: SA/s {med(lambda c, u: u['rate'] / c['rate']):.2f} "
                  f"(goal >= 1.0), CPU per SA {med(lambda c, u: u['cpu_ms'] / c['cpu_ms']):.2f} (goal <= 1.0), "
                  f"RSS per SA {med(lambda c, u: u['rss_kib'] / c['rss_kib'] if c['rss_kib'] > 0 else float('nan')):.2f} "
                  f"(goal <= 2.0); retransmissions {sum(u['extra'] for _, u in rounds)} vs "
                  f"{sum(c['extra'] for c, _ in rounds)} (goal 0)", flush=True)
            if baseline and n <= 200:
                old = one(IsthmusResponder, n, tmp, f"b{n}", code=baseline)
                show(old)
                print(f"  baseline start-up with {n} tunnels: {old['startup']:.2f} s ({old['phases']}); ratios "
                      f"baseline / charon: SA/s {old['rate'] / ch['rate']:.2f}, CPU per SA "
                      f"{old['cpu_ms'] / ch['cpu_ms']:.2f}, RSS per SA {old['rss_kib'] / ch['rss_kib']:.2f}", flush=True)
            if profile:
                prof = str(tmp / f"prof{n}")
                r = one(IsthmusResponder, n, tmp, f"p{n}", profile=prof)
                print(f"  (profiled run, not comparable: {r['seconds']:.1f} s, CPU {r['cpu_ms']:.1f} ms/SA)")
                print_profile(prof, f"N={n}")
        for n in [int(x) for x in os.environ.get("ISTHMUS_BENCH_SCALE_STARTUP", "").split(",") if x]:
            with Netns("scl-s") as ns:
                resp = IsthmusResponder(ns, tmp / f"s{n}", n)
                try:
                    took = resp.start()
                finally:
                    resp.stop()
            anchor = ip_batch_links(n, tmp)
            print(f"  isthmusd start-up alone with {n} tunnels: {took:.2f} s ({resp.phases}); ip -batch {anchor:.2f} s; "
                  f"ratio {took / anchor:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
