"""`make demo`, run inside the lab guest: two regions, each an Isthmus appliance running `isthmusd`
from its own config file, with a LAN behind it; the tunnel comes up by itself, each region learns
the other's LAN over BGP across the tunnel (no static routes), and a host in LAN A pings and sends
a file to a host in LAN B across the XFRM interfaces.

    lan-a (10.1.0.10) -- region-a [isthmusd, xfrm-b] ==== ESP over 192.0.2.0/24 ==== [xfrm-a, isthmusd] region-b -- lan-b (10.2.0.10)

Each region is a network namespace with its own run directory (/run/isthmus-a, /run/isthmus-b);
`isthmus --run-dir ...` talks to either. Exits non-zero with the reason when a step fails.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.control import ControlClient, DaemonUnreachable, RemoteError  # noqa: E402

WORK = Path("/tmp/isthmus-demo")
BOLD, GREEN, RED, OFF = "\033[1m", "\033[1;32m", "\033[1;31m", "\033[0m"
PY = [sys.executable]

REGIONS = {
    "a": dict(ns="region-a", lan_ns="lan-a", wan="192.0.2.1", peer_wan="192.0.2.2", lan_gw="10.1.0.1",
              lan_host="10.1.0.10", lan="10.1.0.0/16", peer_lan="10.2.0.0/16", tunnel="to-b", ifname="xfrm-b",
              inside="169.254.21.1/30", me="a.example.net", peer="b.example.net", start="true",
              asn=65001, peer_as=65002, peer_inside="169.254.21.2", router_id="10.255.0.1"),
    "b": dict(ns="region-b", lan_ns="lan-b", wan="192.0.2.2", peer_wan="192.0.2.1", lan_gw="10.2.0.1",
              lan_host="10.2.0.10", lan="10.2.0.0/16", peer_lan="10.1.0.0/16", tunnel="to-a", ifname="xfrm-a",
              inside="169.254.21.2/30", me="b.example.net", peer="a.example.net", start="false",
              asn=65002, peer_as=65001, peer_inside="169.254.21.1", router_id="10.255.0.2"),
}


class DemoFailed(Exception):
    pass


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{OFF}", flush=True)


def sh(cmd: str, ns: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["sh", "-c", cmd]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise DemoFailed(f"`{cmd}`{' in ' + ns if ns else ''} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r


def topology() -> None:
    for r in REGIONS.values():
        for ns in (r["ns"], r["lan_ns"]):
            sh(f"ip netns add {ns}")
            sh("ip link set lo up", ns)
    sh("ip link add wan type veth peer name wan-b")
    sh("ip link set wan netns region-a && ip link set wan-b netns region-b")
    sh("ip link set wan-b name wan", "region-b")
    for r in REGIONS.values():
        ns = r["ns"]
        sh(f"ip addr add {r['wan']}/24 dev wan && ip link set wan up", ns)
        sh(f"ip link add lan type veth peer name lan-host && ip link set lan-host netns {r['lan_ns']}", ns)
        sh(f"ip addr add {r['lan_gw']}/24 dev lan && ip link set lan up", ns)
        sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0", ns)
        sh(f"ip link set lan-host name eth0 && ip addr add {r['lan_host']}/24 dev eth0 && ip link set eth0 up "
           f"&& ip route add default via {r['lan_gw']}", r["lan_ns"])


def config_text(r: dict) -> str:
    return f"""\
appliance: {{name: region-{'a' if r['ns'] == 'region-a' else 'b'}, router_id: {r['router_id']}}}
tunnels:
  {r['tunnel']}:
    remote: {r['peer_wan']}
    local: {r['wan']}
    local_id: {r['me']}
    remote_id: {r['peer']}
    auth: {{psk_file: secrets/{r['tunnel']}.psk}}
    start: {r['start']}              # A initiates, B only responds
    interface: {{name: {r['ifname']}, address: {r['inside']}}}
    # BGP over the tunnel interface: the LAN behind the peer is learned, ours announced
    bgp: {{peer_as: {r['peer_as']}, peer_address: {r['peer_inside']}, hold_time: 9, import: from-peer, export: to-peer}}
bgp:
  asn: {r['asn']}
  announce: [{r['lan']}]
  policies:
    from-peer: {{prefixes: [{{prefix: {r['peer_lan']}, le: 24}}]}}
    to-peer: {{prefixes: [{{prefix: {r['lan']}}}]}}
"""


def write_configs(psk: str) -> None:
    for key, r in REGIONS.items():
        etc = WORK / key / "etc"
        (etc / "secrets").mkdir(parents=True, exist_ok=True)
        os.chmod(WORK / key, 0o700)
        psk_file = etc / "secrets" / f"{r['tunnel']}.psk"
        psk_file.write_text(psk + "\n")
        os.chmod(psk_file, 0o600)
        (etc / "isthmus.yaml").write_text(config_text(r))


def run_dir(key: str) -> str:
    return f"/run/isthmus-{key}"


def start_daemon(key: str) -> subprocess.Popen:
    r = REGIONS[key]
    log = open(WORK / key / "isthmusd.log", "wb")
    return subprocess.Popen(["ip", "netns", "exec", r["ns"], *PY, "-m", "appliance.daemon",
                             "--config", str(WORK / key / "etc" / "isthmus.yaml"), "--run-dir", run_dir(key),
                             "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT)


def call(key: str, method: str, **params):
    with ControlClient(run_dir(key), timeout=10) as c:
        return c.call(method, **params)


def wait(what: str, fn, timeout: float, procs: dict[str, subprocess.Popen]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key, p in procs.items():
            if p.poll() is not None:
                raise DemoFailed(f"isthmusd of region {key.upper()} exited with status {p.returncode}:\n"
                                 + log_tail(key))
        try:
            v = fn()
            if v:
                return v
        except DaemonUnreachable:
            pass
        except RemoteError as e:
            if e.code != "unavailable":   # 'unavailable': still starting
                raise DemoFailed(f"the daemon answered {e.code}: {e.message}") from None
        time.sleep(0.1)
    raise DemoFailed(f"timed out after {timeout:.0f} s waiting for {what}\n" + log_tail("a") + "\n" + log_tail("b"))


def log_tail(key: str, n: int = 15) -> str:
    path = WORK / key / "isthmusd.log"
    lines = path.read_text(errors="replace").splitlines()[-n:] if path.exists() else []
    return f"--- region {key.upper()} log (last {len(lines)} lines):\n" + "\n".join(lines)


def cli_both(*args: str) -> None:
    """`isthmus --run-dir ... ARGS` for both regions (the real CLI, run side by side)."""
    procs = {k: subprocess.Popen([*PY, "-m", "appliance.cli", "--run-dir", run_dir(k), *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in REGIONS}
    for k, p in procs.items():
        out, _ = p.communicate(timeout=120)
        print(f"\n$ isthmus --run-dir {run_dir(k)} {' '.join(args)}      {BOLD}# region {k.upper()}{OFF}")
        print(out.rstrip())
        if p.returncode != 0:
            raise DemoFailed(f"isthmus {' '.join(args)} for region {k.upper()} exited {p.returncode}")


def cleanup(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait(10)
    for r in REGIONS.values():
        for ns in (r["ns"], r["lan_ns"]):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main() -> int:
    t_start = time.monotonic()
    procs: dict[str, subprocess.Popen] = {}
    results: dict[str, str] = {}
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    try:
        say("two regions joined by an underlay (192.0.2.0/24), a LAN host behind each")
        topology()
        print("lan-a 10.1.0.10 -- region-a 192.0.2.1 ==== 192.0.2.2 region-b -- lan-b 10.2.0.10")
        if sh("ping -c 1 -W 1 10.2.0.10", "lan-a", check=False).returncode == 0:
            raise DemoFailed("LAN B is reachable before any tunnel exists: the demo topology leaks")

        say("each region's config (/tmp/isthmus-demo/a/etc/isthmus.yaml shown; B mirrors it)")
        write_configs(secrets.token_urlsafe(24))
        print(config_text(REGIONS["a"]).rstrip())

        say("start isthmusd in both regions")
        t0 = time.monotonic()
        procs["b"] = start_daemon("b")
        procs["a"] = start_daemon("a")
        for key in REGIONS:
            print(f"$ ip netns exec region-{key} isthmusd --config /tmp/isthmus-demo/{key}/etc/isthmus.yaml "
                  f"--run-dir {run_dir(key)}")
        wait("both daemons to answer", lambda: all(call(k, "status") for k in REGIONS), 180, procs)
        t_ready = time.monotonic() - t0
        wait("the tunnel to come up on both sides",
             lambda: all(call(k, "tunnels")["tunnels"][0]["state"] == "up" for k in REGIONS), 60, procs)
        t_up = time.monotonic() - t0
        print(f"daemons answering after {t_ready:.1f} s; tunnel up after {t_up:.1f} s")
        results["tunnel"] = f"up {t_up:.1f} s after start"

        say("isthmus status, isthmus show sas")
        cli_both("status")
        cli_both("show", "sas")
        sas = {k: call(k, "sas")["child_sas"] for k in REGIONS}
        a_child = [c for c in sas["a"] if c["state"] == "installed"][0]
        b_child = [c for c in sas["b"] if c["state"] == "installed"][0]
        if (a_child["spi_in"], a_child["spi_out"]) != (b_child["spi_out"], b_child["spi_in"]):
            raise DemoFailed(f"the two sides disagree on the Child SA's SPIs: A {a_child}, B {b_child}")
        results["spis"] = f"A and B agree on SPIs {a_child['spi_in']}/{a_child['spi_out']}"

        say("BGP over the tunnel: each region learns the other's LAN (isthmus show bgp, show routes)")
        t0 = time.monotonic()
        wait("the BGP sessions established and LAN B's route in region A's kernel",
             lambda: all(n["state"] == "established" for k in REGIONS for n in call(k, "bgp")["neighbors"])
             and "10.2.0.0/16" in sh("ip route show proto 74", "region-a").stdout
             and "10.1.0.0/16" in sh("ip route show proto 74", "region-b").stdout, 90, procs)
        print(f"learned over BGP {time.monotonic() - t0:.1f} s after the tunnel came up")
        results["bgp"] = f"LANs learned over BGP {time.monotonic() - t0:.1f} s after tunnel up"
        cli_both("show", "bgp")
        cli_both("show", "routes")

        say("the kernel: routes over the tunnel interface in region A (proto 74: BGP, isthmus)")
        print(sh("ip -br addr show xfrm-b; ip route show dev xfrm-b", "region-a").stdout.rstrip())

        say("LAN A host pings LAN B host (10.1.0.10 -> 10.2.0.10)")
        r = sh("ping -c 5 -i 0.2 -W 2 10.2.0.10", "lan-a", check=False)
        print(r.stdout.rstrip())
        if r.returncode != 0:
            raise DemoFailed("ping from LAN A to LAN B failed")
        results["ping"] = [line for line in r.stdout.splitlines() if "packets transmitted" in line][0]

        say("LAN A host sends a 4 MiB file to LAN B host over TCP")
        sent = WORK / "sent.bin"
        sent.write_bytes(os.urandom(4 << 20))
        received = WORK / "received.bin"
        listener = subprocess.Popen(["ip", "netns", "exec", "lan-b", "sh", "-c", f"nc -l -p 5001 > {received}"])
        time.sleep(0.5)
        t0 = time.monotonic()
        sh(f"nc -N -w 10 10.2.0.10 5001 < {sent}", "lan-a", timeout=120)
        listener.wait(60)
        secs = time.monotonic() - t0
        h1, h2 = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (sent, received))
        print(f"sent {sent.stat().st_size} bytes in {secs:.1f} s; received {received.stat().st_size} bytes; "
              f"sha256 {'identical' if h1 == h2 else 'DIFFERENT'}")
        if h1 != h2:
            raise DemoFailed("the file received in LAN B differs from the one sent")
        results["file"] = f"4 MiB identical in {secs:.1f} s"

        say("the traffic in the kernel's SA counters (isthmus show tunnels)")
        cli_both("show", "tunnels")
        after = {c["spi_in"]: c for c in call("a", "sas")["child_sas"]}[a_child["spi_in"]]
        if not after["bytes_out"] or after["bytes_out"] < 4 << 20:
            raise DemoFailed(f"region A's outbound SA counted {after['bytes_out']} bytes, less than the file")
        results["counters"] = f"A sent {after['bytes_out']:,} bytes in {after['packets_out']:,} ESP packets"

        say("on the wire between the regions: the LAN hosts' ping travels as ESP")
        cap = subprocess.Popen(["ip", "netns", "exec", "region-b", "timeout", "8", "tcpdump", "-c", "4", "-n",
                                "-i", "wan", "esp or icmp or tcp"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
        time.sleep(1.5)
        sh("ping -c 2 -i 0.2 10.2.0.10", "lan-a", check=False)
        wire = cap.communicate(timeout=30)[0]
        print(wire.rstrip())
        lines = [x for x in wire.splitlines() if x.strip()]
        if len(lines) < 4 or not all("ESP" in x for x in lines):
            raise DemoFailed("expected the ping to cross the underlay as ESP only (no ICMP in the clear)")

        say("stop both daemons (SIGTERM): SAs deleted with the peer, kernel state removed")
        for key in ("a", "b"):
            procs[key].send_signal(signal.SIGTERM)
        for key in ("a", "b"):
            rc = procs[key].wait(60)
            left = sh("ip xfrm state | grep -c ^src; ip -br link show type xfrm | wc -l", REGIONS[key]["ns"],
                      check=False).stdout.split()
            print(f"region {key.upper()}: isthmusd exited {rc}; XFRM states left: {left[0] if left else '?'}, "
                  f"XFRM interfaces left: {left[1] if len(left) > 1 else '?'}")
            if rc != 0 or left[:2] != ["0", "0"]:
                raise DemoFailed(f"region {key.upper()} did not shut down cleanly")
        after_stop = sh("ping -c 1 -W 1 10.2.0.10", "lan-a", check=False).returncode
        if after_stop == 0:
            raise DemoFailed("LAN B still reachable after both daemons stopped")
        results["shutdown"] = "clean: no SA or interface left; LAN B unreachable without the tunnel"
    except DemoFailed as e:
        print(f"\n{RED}DEMO FAILED{OFF}: {e}", flush=True)
        return 1
    finally:
        cleanup(procs)

    print(f"\n{GREEN}DEMO OK{OFF} in {time.monotonic() - t_start:.0f} s: two isthmusd appliances, one IKEv2 tunnel "
          "between region A and region B")
    for k, v in results.items():
        print(f"  {k:9} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
