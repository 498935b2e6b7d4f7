"""Our responder under a spoofed IKE_SA_INIT flood (issue 10, `make bench`).

Three namespaces (tests/host/ike_flood.py): our responder (`python -m appliance.ikerunner`, one
tunnel accepting its peer from any address, DosProtection defaults: COOKIEs from 30 half-open
SAs), strongSwan 5.9.8 as the genuine initiator, and a flooder sending forged IKE_SA_INIT
requests from 65,534 source addresses in 198.18.0.0/16 at a set pace for a few seconds.

For each offered rate it prints
- offered: datagrams/s the flooder actually sent; handled: the responder's answers/s counted by
  nftables in the flooder's namespace (COOKIEs, once the threshold is reached), and their ratio
  handled/offered (1.00: every forged request answered; below: the socket queue overflowed or the
  engine fell behind; extra requests are then dropped by the kernel, costing us nothing);
- queue-full/s: datagrams the kernel dropped because our socket's queue was full (RcvbufErrors);
- cores busy (from /proc): our responder, the flooder, and everything else on the machine
  (the kernel's packet work, other users), then half-open SAs and RSS growth;
- genuine: strongSwan setups (IKE_SA_INIT with the COOKIE round trip, IKE_AUTH, Child SA) per
  second during the flood, as a ratio against the same count without a flood measured in the
  same run (the anchor), and the median time to one setup.
Nothing is asserted; the machine is shared and the numbers move with its load.

Run: `.venv/bin/python tests/bench/host_dos.py [--rates 1000,3000,10000,30000] [--seconds 6]` (root).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
if str(TOP) not in sys.path:
    sys.path.insert(0, str(TOP))

from tests.host.ike_flood import Flooder, rss_kib  # noqa: E402
from tests.host.ikerunner_proc import EngineProc, tunnel_json  # noqa: E402
from tests.netns import Netns  # noqa: E402
from tests.peers.strongswan import Child, Conn, StrongSwan  # noqa: E402
from tests.peers.topology import pair_of_namespaces  # noqa: E402

PSK = "bench-dos-Secret-0123456789"
QUIET = {"default": 0, "ike": 1, "cfg": 0, "knl": 0, "net": 0, "enc": 0, "chd": 0, "job": 0, "dmn": 0, "lib": 0}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def busy_seconds() -> float:
    """CPU time spent busy by the whole machine (all cores) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / TICKS     # less idle and iowait


def rcvbuf_errors(ns) -> int:
    """UDP datagrams the kernel dropped in `ns` because a socket's receive queue was full."""
    lines = [x.split() for x in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines() if x.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1]))["RcvbufErrors"])


def genuine_setups(swan: StrongSwan, seconds: float) -> list[float]:
    """strongSwan connects, then deletes the SA, again and again for `seconds`: each setup's time."""
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        ok, _ = swan.initiate("c", timeout=20, check=False)
        if not ok:
            continue
        times.append(time.monotonic() - t0)
        swan.terminate(ike="p", timeout=10, check=False)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="1000,3000,10000,30000", help="offered forged IKE_SA_INIT/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each flood")
    a = ap.parse_args()
    rates = [float(x) for x in a.rates.split(",") if x]
    work = Path(tempfile.mkdtemp(prefix="isthmus-bench-dos-"))
    with pair_of_namespaces("dos") as (us, sw), Netns("flood") as nf:
        flooder = Flooder(nf, us)
        sw.ns.run(["ip", "addr", "add", "10.2.0.1/16", "dev", "lo"])   # kernel-libipsec: route from local_ts
        swan = StrongSwan(work / "sw", sw.name, name="sw", log_keys=False, log_levels=QUIET).start()
        t = tunnel_json(us, sw, "to-b", local_id="a.example.net", remote_id="b.example.net", psk=PSK.encode(),
                        start=False, remote_addr=None)
        try:
            swan.load(Conn(local_addrs=[sw.addr4], remote_addrs=[us.addr4], local_id="b.example.net",
                           remote_id="a.example.net", psk=PSK, proposals=["aes256gcm16-prfsha384-x25519"],
                           children=[Child(local_ts=["10.2.0.0/16"], remote_ts=["10.1.0.0/16"],
                                           esp_proposals=["aes256gcm16"])]))
            with EngineProc(work / "ours", us, [t], log_level="WARNING") as ours:
                pid = ours.proc.pid
                base = genuine_setups(swan, a.seconds)
                anchor = len(base) / a.seconds
                print(f"anchor (no flood): {anchor:.1f} genuine setups/s, "
                      f"median {statistics.median(base) * 1000:.0f} ms" if base
                      else "anchor (no flood): no genuine setup completed")
                print(f"{'offered/s':>10} {'handled/s':>10} {'handled/offered':>16} {'queue-full/s':>12} "
                      f"{'cores us':>8} {'flooder':>7} {'others':>6} "
                      f"{'half-open':>9} {'RSS +MiB':>8} {'genuine/s':>10} {'vs anchor':>9} {'setup ms':>9}")
                for rate in rates:
                    rss0, cpu0, ans0 = rss_kib(pid), cpu_seconds(pid), flooder.answers()
                    busy0, drop0 = busy_seconds(), rcvbuf_errors(us.ns)
                    proc = flooder.start(rate=rate, count=int(rate * (a.seconds + 30)), seconds=a.seconds + 30)
                    fpid = proc.pid
                    time.sleep(1.0)              # into COOKIE mode
                    t0 = time.monotonic()
                    setups = genuine_setups(swan, a.seconds)
                    elapsed = time.monotonic() - t0
                    st = ours.status()
                    peak_rss = rss_kib(pid)
                    cpu = cpu_seconds(pid) - cpu0
                    fcpu = cpu_seconds(fpid)
                    busy = busy_seconds() - busy0
                    flood = flooder.finish(0)
                    drops = rcvbuf_errors(us.ns) - drop0
                    handled = flooder.answers() - ans0
                    offered = flood["sent"] / flood["seconds"]
                    got = len(setups) / elapsed
                    secs = flood["seconds"]
                    print(f"{offered:10.0f} {handled / secs:10.0f} {handled / max(1, flood['sent']):16.2f} "
                          f"{drops / secs:12.0f} {cpu / secs:8.2f} {fcpu / secs:7.2f} "
                          f"{max(0.0, busy - cpu - fcpu) / secs:6.2f} {st['half_open']:9d} "
                          f"{(peak_rss - rss0) / 1024:8.1f} "
                          f"{got:10.1f} {got / anchor if anchor else float('nan'):9.2f} "
                          f"{statistics.median(setups) * 1000 if setups else float('nan'):9.0f}")
                    time.sleep(2.0)
                print(f"counters: {ours.status()['dos']}")
        finally:
            swan.close()
    print("notes: handled = COOKIE answers seen at the flooder; a genuine setup includes the COOKIE round trip; "
          "strongSwan is the initiator in every row, our responder the only thing under test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
