"""Two regions for the daemon's lab tests, each an `isthmusd` in its own namespace with a LAN host
behind it, and observers of their kernels that use iproute2 and nft, never the code under test.

    lan-a 10.1.0.10 -- region-a ==== wan 192.0.2.0/24 ==== region-b -- lan-b 10.2.0.10

Tunnel ``to-b`` (A, initiator) / ``to-a`` (B, responder) runs between 192.0.2.1 and 192.0.2.2
with FQDN identities and routes each LAN over it; tests may add tunnel ``to-b2`` / ``to-a2``
over IPv6, between 2001:db8:1::11 and 2001:db8:1::12 (IP address identities).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import tempfile
import threading
from pathlib import Path

from appliance.control import ControlClient
from tests.appliances import Appliance
from tests.netns import Netns, veth_pair

PSK1 = "lab_" + secrets.token_hex(12)          # letters, digits and '_' (acceptable to the AWS preset too)
PSK2 = "lab2_" + secrets.token_hex(12)

A_CFG = dict(tunnel="to-b", remote="192.0.2.2", local="192.0.2.1", local_id="a.example.net",
             remote_id="b.example.net", start="true", ifname="xfrm-b", inside="169.254.21.1/30",
             routes="[10.2.0.0/16]")
B_CFG = dict(tunnel="to-a", remote="192.0.2.1", local="192.0.2.2", local_id="b.example.net",
             remote_id="a.example.net", start="false", ifname="xfrm-a", inside="169.254.21.2/30",
             routes="[10.1.0.0/16]")
# the second tunnel runs over IPv6 (IPv4 inside)
A_CFG2 = dict(tunnel="to-b2", remote="'2001:db8:1::12'", local="'2001:db8:1::11'", start="true", ifname="xfrm-b2",
              inside="169.254.22.1/30")
B_CFG2 = dict(tunnel="to-a2", remote="'2001:db8:1::11'", local="'2001:db8:1::12'", start="false", ifname="xfrm-a2",
              inside="169.254.22.2/30")


def tunnel_yaml(c: dict, psk_file: str, extra: str = "") -> str:
    ids = f"    local_id: {c['local_id']}\n    remote_id: {c['remote_id']}\n" if "local_id" in c else ""
    routes = f"    routes: {c['routes']}\n" if "routes" in c else ""
    return (f"  {c['tunnel']}:\n    remote: {c['remote']}\n    local: {c['local']}\n{ids}"
            f"    auth: {{psk_file: {psk_file}}}\n    start: {c['start']}\n"
            f"    dpd: {{interval: 4s, timeout: 20s}}\n"
            f"    interface: {{name: {c['ifname']}, address: {c['inside']}}}\n{routes}{extra}")


class Region:
    def __init__(self, key: str, wan: Netns, lan: Netns, appliance: Appliance, cfg: dict, cfg2: dict):
        self.key, self.ns, self.lan, self.app, self.cfg, self.cfg2 = key, wan, lan, appliance, cfg, cfg2
        self.keys_seen: set[str] = set()

    @property
    def tunnel(self) -> str:
        return self.cfg["tunnel"]

    def config(self, second: bool = False, extra: str = "", extra2: str = "", more: str = "",
               appliance: str = "") -> str:
        text = (f"appliance: {{name: region-{self.key}{appliance}}}\ntunnels:\n"
                + tunnel_yaml(self.cfg, "secrets/t1.psk", extra))
        if second:
            text += tunnel_yaml(self.cfg2, "secrets/t2.psk", extra2)
        return text + more

    # ------------------------------------------------------------------ the kernel, seen by iproute2/nft
    def xfrm_states(self) -> list[dict]:
        """[{spi, src, dst, if_id, key}] from `ip xfrm state` (the test may read keys; the product may not)."""
        out = self.ns.run("ip xfrm state").stdout
        states = []
        for block in re.split(r"\n(?=src )", out.strip()):
            if not block.startswith("src"):
                continue
            m = re.search(r"src (\S+) dst (\S+)\s+proto esp spi (0x[0-9a-f]+)", block)
            key = re.search(r"(?:aead|enc) \S+ (0x[0-9a-f]+)", block)
            if_id = re.search(r"if_id (0x[0-9a-f]+|\d+)", block)
            states.append({"src": m.group(1), "dst": m.group(2), "spi": int(m.group(3), 16),
                           "key": key.group(1)[2:] if key else None,
                           "if_id": int(if_id.group(1), 0) if if_id else None})
        for s in states:
            if s["key"]:
                self.keys_seen.add(s["key"])
        return states

    def sa_counters(self, spi: int) -> tuple[int, int]:
        out = self.ns.run("ip -s xfrm state").stdout
        for block in re.split(r"\n(?=src )", out):
            if re.search(rf"spi {spi:#010x}\b", block):
                m = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", block)
                return int(m.group(1)), int(m.group(2))
        raise AssertionError(f"no SA {spi:#010x} in region {self.key}:\n{out}")

    def xfrm_policies(self) -> list[dict]:
        out = self.ns.run("ip xfrm policy").stdout
        pols = []
        for block in re.split(r"\n(?=src )", out.strip()):
            m = re.match(r"src (\S+) dst (\S+)\s*\n\s*dir (\w+)", block)
            if not m:
                continue
            if_id = re.search(r"if_id (0x[0-9a-f]+|\d+)", block)
            pols.append({"sel": (m.group(1), m.group(2)), "dir": m.group(3),
                         "if_id": int(if_id.group(1), 0) if if_id else None})
        return pols

    def xfrm_links(self) -> dict[str, dict]:
        links = json.loads(self.ns.run("ip -j -d link show type xfrm").stdout or "[]")
        return {x["ifname"]: x for x in links}

    def our_routes(self) -> set[tuple[str, str]]:
        rows = json.loads(self.ns.run("ip -j route show proto 73").stdout or "[]")
        rows += json.loads(self.ns.run("ip -j -6 route show proto 73").stdout or "[]")
        return {(r["dst"], r["dev"]) for r in rows}

    def clamp_interfaces(self) -> list[str]:
        r = self.ns.run("nft -j list table inet isthmus", check=False)
        if r.returncode != 0:
            return []
        names = []
        for item in json.loads(r.stdout)["nftables"]:
            rule = item.get("rule")
            if rule:
                for e in rule["expr"]:
                    m = e.get("match", {})
                    if isinstance(m.get("left"), dict) and m["left"].get("meta", {}).get("key") in ("iifname", "oifname"):
                        names.append(m["right"])
        return names


class Regions:
    """The two regions, built and torn down by the fixture."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="isthmus-lab-"))
        self._stack: list = []
        self.events: list[dict] = []
        self._event_threads: list[threading.Thread] = []

    def __enter__(self) -> "Regions":
        nets = {k: Netns(f"region-{k}").__enter__() for k in ("a", "b")}
        lans = {k: Netns(f"lan-{k}").__enter__() for k in ("a", "b")}
        self._stack = [*nets.values(), *lans.values()]
        veth_pair(nets["a"], "wan", nets["b"], "wan")
        for k, (wan, wan2, gw, host) in {"a": ("192.0.2.1", "2001:db8:1::11", "10.1.0.1", "10.1.0.10"),
                                         "b": ("192.0.2.2", "2001:db8:1::12", "10.2.0.1", "10.2.0.10")}.items():
            ns, lan = nets[k], lans[k]
            ns.run(f"ip addr add {wan}/24 dev wan && ip addr add {wan2}/64 dev wan nodad")
            ns.run("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0")
            veth_pair(ns, "lan", lan, "eth0")
            ns.run(f"ip addr add {gw}/24 dev lan")
            lan.run(f"ip addr add {host}/24 dev eth0 && ip route add default via {gw}")
        self.a = Region("a", nets["a"], lans["a"], Appliance("A", nets["a"].name, self.tmp / "a"), A_CFG, A_CFG2)
        self.b = Region("b", nets["b"], lans["b"], Appliance("B", nets["b"].name, self.tmp / "b"), B_CFG, B_CFG2)
        for r in (self.a, self.b):
            r.app.write_psk("t1.psk", PSK1)
            r.app.write_psk("t2.psk", PSK2)
            r.app.write_config(r.config())
        return self

    def start(self) -> None:
        self.b.app.start(wait=False)
        self.a.app.start(wait=False)
        for r in (self.b, self.a):
            r.app.wait_ready()
            self.follow_events(r)
        for r in (self.a, self.b):
            r.app.wait_tunnel_up(r.tunnel)

    def follow_events(self, r: Region) -> None:
        """Record the daemon's event stream (until it stops) for the no-secrets check."""
        def pump() -> None:
            try:
                with ControlClient(r.app.run_dir, timeout=None) as c:
                    for e in c.events():
                        self.events.append(e)
            except Exception:  # noqa: BLE001 - the stream ends when the daemon stops
                pass
        t = threading.Thread(target=pump, daemon=True)
        t.start()
        self._event_threads.append(t)

    def ping(self, count: int = 5, interval: float = 0.2, src: str = "a", dst: str = "10.2.0.10",
             timeout: float = 60) -> subprocess.CompletedProcess:
        lan = self.a.lan if src == "a" else self.b.lan
        return lan.run(f"ping -c {count} -i {interval} -W 2 {dst}", check=False, timeout=timeout)

    def __exit__(self, *exc) -> None:
        for r in (getattr(self, "a", None), getattr(self, "b", None)):
            if r is not None:
                try:
                    r.app.stop(timeout=30)
                except Exception:  # noqa: BLE001
                    r.app.kill()
        for ns in reversed(self._stack):
            ns.__exit__(None, None, None)


def line_of(path: Path, needle: str, after: str | None = None) -> int:
    """1-based line of the first line containing `needle` (after the line containing `after`)."""
    started = after is None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not started:
            started = after in line
            continue
        if needle in line:
            return n
    raise AssertionError(f"{needle!r} not in {path}")


__all__ = ["PSK1", "PSK2", "Region", "Regions", "line_of"]
