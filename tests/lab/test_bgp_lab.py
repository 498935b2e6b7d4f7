"""BGP over two real XFRM tunnels between two isthmusd appliances (the lab's real IPsec kernel).

    lan-a 10.1.0.10 -- region-a ==== wan1 192.0.2.0/24 ====== region-b -- lan-b 10.2.0.10
                                ==== wan2 198.51.100.0/24 ==

Each appliance announces its LAN (bgp.announce) over both tunnels and learns the other's: no
static routes. Both paths are equal, so each kernel holds one multipath route (ECMP) through
both XFRM interfaces. Then the underlay of the tunnel carrying A's outbound pings is cut: with
DPD `interval: 1s, timeout: 3s` the peer is declared dead, the route manager withdraws that
tunnel's routes at once and the pings flow over the other tunnel. The time from the cut to the
first answered ping is printed and asserted loosely (<= 10 s; the precise figure is for the
bench).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.appliances import Appliance, wait_for
from tests.netns import Netns, veth_pair

pytestmark = pytest.mark.lab

PSKS = ("lab_" + secrets.token_hex(12), "lab_" + secrets.token_hex(12))


def region_config(me: str, asn: int, peer_as: int, lan: str, other_lan: str, start: bool) -> str:
    side = 1 if me == "a" else 2
    peer = 2 if me == "a" else 1
    out = [f"appliance: {{name: region-{me}, router_id: 10.255.0.{side}}}", "tunnels:"]
    for i, (net, inside) in enumerate((("192.0.2", "169.254.21"), ("198.51.100", "169.254.22")), 1):
        out += [f"  t{i}:", f"    remote: {net}.{peer}", f"    local: {net}.{side}",
                f"    auth: {{psk_file: secrets/t{i}.psk}}", f"    start: {'true' if start else 'false'}",
                f"    dpd: {{interval: 1s, timeout: 3s, action: {'restart' if start else 'clear'}}}",
                f"    interface: {{name: xfrm-t{i}, address: {inside}.{side}/30}}",
                f"    bgp: {{peer_as: {peer_as}, peer_address: {inside}.{peer}, hold_time: 9, import: in, "
                f"export: out}}"]
    out += ["bgp:", f"  asn: {asn}", f"  announce: [{lan}]", "  policies:",
            f"    in: {{prefixes: [{{prefix: {other_lan}, le: 24}}]}}",
            f"    out: {{prefixes: [{{prefix: {lan}}}]}}"]
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def two_regions():
    """The two appliances, their underlays and LANs (namespaces), started; stopped at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="isthmus-bgp-lab-"))
    with Netns("bra") as a, Netns("brb") as b, Netns("la") as la, Netns("lb") as lb:
        veth_pair(a, "wan1", b, "wan1")
        veth_pair(a, "wan2", b, "wan2")
        apps = {}
        for key, ns, lan, side, gw, host in (("a", a, la, 1, "10.1.0.1", "10.1.0.10"),
                                             ("b", b, lb, 2, "10.2.0.1", "10.2.0.10")):
            ns.run(f"ip addr add 192.0.2.{side}/24 dev wan1 && ip addr add 198.51.100.{side}/24 dev wan2")
            ns.run("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0")
            veth_pair(ns, "lan", lan, "eth0")
            ns.run(f"ip addr add {gw}/24 dev lan")
            lan.run(f"ip addr add {host}/24 dev eth0 && ip route add default via {gw}")
            app = Appliance(key.upper(), ns.name, tmp / key)
            for i, psk in enumerate(PSKS, 1):
                app.write_psk(f"t{i}.psk", psk)
            apps[key] = app
        apps["a"].write_config(region_config("a", 65001, 65002, "10.1.0.0/16", "10.2.0.0/16", True))
        apps["b"].write_config(region_config("b", 65002, 65001, "10.2.0.0/16", "10.1.0.0/16", False))
        try:
            apps["b"].start(wait=False)
            apps["a"].start(wait=False)
            for app in apps.values():
                app.wait_ready()
            yield apps, (a, b), (la, lb)
        finally:
            for app in apps.values():
                try:
                    app.stop(timeout=30)
                except Exception:  # noqa: BLE001
                    app.kill()


@pytest.fixture
def regions():
    with two_regions() as r:
        yield r


def bgp_route(ns: Netns, prefix: str) -> dict | None:
    rows = json.loads(ns.run(["ip", "-j", "route", "show", prefix, "proto", "74"]).stdout or "[]")
    return rows[0] if rows else None


def devs(route: dict | None) -> set[str]:
    if not route:
        return set()
    return {h["dev"] for h in route.get("nexthops", [])} or {route.get("dev")}


def sa_packets_out(ns: Netns) -> dict[str, int]:
    """Outbound ESP packets per XFRM SA destination (our peer address of each tunnel)."""
    out = ns.run("ip -s xfrm state").stdout
    res = {}
    for block in re.split(r"\n(?=src )", out):
        m = re.match(r"src (\S+) dst (\S+)", block)
        c = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", block)
        if m and c:
            res[m.group(2)] = res.get(m.group(2), 0) + int(c.group(2))
    return res


def diagnostics(apps: dict, nss) -> str:
    out = []
    for (key, app), ns in zip(apps.items(), nss):
        out.append(f"=== region {key}: routes\n" + ns.run("ip route; ip -br link", check=False).stdout)
        for what in (("show", "bgp"), ("show", "tunnels")):
            r = app.cli(*what, check=False)
            out.append(f"--- {key}: isthmus {' '.join(what)}\n{r.stdout}{r.stderr}")
        log = app.run_dir / "bgp" / "exabgp.log"
        if log.exists():
            lines = [x for x in log.read_text(errors="replace").splitlines() if "statistics" not in x]
            out.append(f"--- {key}: exabgp.log (tail)\n" + "\n".join(lines[-40:]))
        out.append(f"--- {key}: isthmusd log (tail)\n" + app.log_tail(40))
    return "\n".join(out)


def test_bgp_over_two_tunnels_ecmp_and_dpd_failover(regions):
    apps, (a, b), (la, lb) = regions
    try:
        run(apps, a, b, la)
    except Exception:
        print(diagnostics(apps, (a, b)))
        raise


def settled(apps, a, b) -> bool:
    """Both tunnels up on both sides and each kernel's route to the other LAN through both."""
    for app in apps.values():
        if {t["name"]: t["state"] for t in app.cli_json("show", "tunnels")["tunnels"]} != {"t1": "up", "t2": "up"}:
            return False
    return (devs(bgp_route(a, "10.2.0.0/16")) == {"xfrm-t1", "xfrm-t2"}
            and devs(bgp_route(b, "10.1.0.0/16")) == {"xfrm-t1", "xfrm-t2"})


def dpd_count(apps) -> int:
    return sum(app.log_text().count("peer dead") for app in apps.values())


def wait_quiet(apps, a, b, quiet: float = 6.0, timeout: float = 180.0) -> None:
    """Settled, and no DPD timeout for `quiet` seconds: under TCG, the start-up of two daemons and
    two ExaBGPs can delay IKE answers past DPD's 3 s (a false "peer dead" and a flap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wait_for("both tunnels up and ECMP on both sides", lambda: settled(apps, a, b),
                 max(1.0, deadline - time.monotonic()), 0.5)
        n = dpd_count(apps)
        time.sleep(quiet)
        if dpd_count(apps) == n and settled(apps, a, b):
            return
        print(f"a DPD timeout while settling ({dpd_count(apps) - n}); waiting again")
    raise AssertionError("the tunnels never stayed up for long enough")


def run(apps, a, b, la):
    for app in apps.values():
        for t in ("t1", "t2"):
            app.wait_tunnel_up(t)
    # each side learned the other's LAN over both tunnels: one multipath route
    wait_quiet(apps, a, b)
    print("\nA:", a.run("ip route show 10.2.0.0/16").stdout.strip())
    for app in apps.values():
        bgp = app.cli_json("show", "bgp")
        assert [n["state"] for n in bgp["neighbors"]] == ["established", "established"], bgp
        routes = app.cli_json("show", "routes")["routes"]
        assert {(r["tunnel"], r["installed"]) for r in routes} == {("t1", True), ("t2", True)}, routes
    print(apps["a"].cli("show", "bgp").stdout)
    assert la.run("ping -c 3 -i 0.2 -W 2 10.2.0.10", check=False).returncode == 0

    failover, wan, dev, other = cut_and_time(apps, a, b, la)
    print(f"failover: first ping answered {failover:.2f} s after the underlay of {dev} was cut (DPD 1s/3s)")
    assert failover <= 10.0
    wait_for("A: the route only through the other tunnel", lambda: devs(bgp_route(a, "10.2.0.0/16")) == {other},
             30, 0.5)
    bgp = apps["a"].cli_json("show", "bgp")
    states = {n["tunnel"]: n["state"] for n in bgp["neighbors"]}
    assert states[other[-2:]] == "established" and states[dev[-2:]] != "established", states
    assert la.run("ping -c 3 -i 0.2 -W 2 10.2.0.10", check=False).returncode == 0


TIMELINE = ("peer dead", "FIB: routes through", "IKE SA down", "BGP session", "tunnel down", "Child SA")


def timeline(apps, cut: float, before: float = 0.5) -> list[str]:
    """The daemons' log lines about the failover from `before` s ahead of `cut` (wall clock) on,
    as offsets from `cut`."""
    since = cut - before
    rows = []
    for key, app in apps.items():
        for r in app.log_records():
            t = r.get("time")
            if not t or not any(w in r.get("message", "") for w in TIMELINE):
                continue
            at = datetime.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=datetime.timezone.utc).timestamp()
            if at >= since:
                rows.append((at - cut, f"{at - cut:+7.3f} s  {key.upper()} {r.get('tunnel', '-'):3} "
                                       f"{r['message'][:110]}"))
    return [x for _, x in sorted(rows)]


def cut_and_time(apps, a, b, la) -> tuple[float, str, str, str]:
    """Cut the underlay of the tunnel carrying A's pings (on B's side; A's end loses carrier
    too) while pinging every 50 ms: seconds from the cut to the first answered ping after it,
    the underlay, its XFRM interface and the other one. Prints the daemons' timeline."""
    # which tunnel carries A's outbound pings? (ECMP hashes the flow onto one path)
    before = sa_packets_out(a)
    la.run("ping -c 20 -i 0.02 -W 1 10.2.0.10", check=False)
    after = sa_packets_out(a)
    moved = {dst: after.get(dst, 0) - before.get(dst, 0) for dst in after}
    busy = max(moved, key=lambda d: moved[d])
    assert moved[busy] >= 20, moved
    wan, dev, other = ("wan1", "xfrm-t1", "xfrm-t2") if busy.startswith("192.0.2.") else \
        ("wan2", "xfrm-t2", "xfrm-t1")
    print(f"A's pings leave through {dev} ({busy}); cutting {wan}")

    ping = subprocess.Popen(["ip", "netns", "exec", la.name, "ping", "-D", "-i", "0.05", "-W", "1", "-c", "400",
                             "10.2.0.10"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    cut = time.time()
    b.run(f"ip link set {wan} down")           # the underlay dies (A's end loses carrier too)
    out, _ = ping.communicate(timeout=120)
    replies = [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]
    after_cut = [t for t in replies if t > cut]
    assert after_cut, out[-2000:]
    # the first reply after the gap the cut made
    gaps = [t for prev, t in zip([cut, *after_cut], after_cut) if t - prev > 0.5]
    first = gaps[0] if gaps else after_cut[0]
    print(f"{len(replies)} replies to 400 pings; timeline from the cut:")
    for line in timeline(apps, cut):
        print("   ", line)
    print(f"    {first - cut:+7.3f} s  first ping answered after the cut")
    return first - cut, wan, dev, other
