"""GoBGP 3 (Debian `gobgpd`) as a BGP peer in a network namespace.

One `GoBgp` is one `gobgpd` process with its own TOML config and log in a work directory; its
gRPC API listens on 127.0.0.1:<api_port> inside the namespace (each namespace has its own
loopback) and is queried with `gobgp -p <api_port> ... -j`. GoBGP never touches the kernel FIB
(no zebra). Prefixes in `announce` are added to its global RIB with `gobgp global rib add` once
the daemon answers; everything received is accepted (GoBGP's default policy), everything in the
global RIB is exported to every neighbor of the same address family.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Sequence

from tests.peers.daemon import BgpNeighbor, Daemon, PeerError

GOBGPD = "/usr/bin/gobgpd"
GOBGP = "/usr/bin/gobgp"


def render_gobgp_conf(*, router_id: str, local_as: int, neighbors: Sequence[BgpNeighbor], port: int = 179) -> str:
    out = ["[global.config]", f"  as = {local_as}", f'  router-id = "{router_id}"', f"  port = {port}", ""]
    for n in neighbors:
        fam = "ipv4-unicast" if ipaddress.ip_address(n.address).version == 4 else "ipv6-unicast"
        out += ["[[neighbors]]", "  [neighbors.config]", f'    neighbor-address = "{n.address}"',
                f"    peer-as = {n.remote_as}"]
        if n.local_address:
            out += ["  [neighbors.transport.config]", f'    local-address = "{n.local_address}"']
            if n.passive:
                out.append("    passive-mode = true")
        hold = n.hold_time or 9
        out += ["  [neighbors.timers.config]", f"    hold-time = {hold}", f"    keepalive-interval = {max(1, hold // 3)}",
                "    connect-retry = 1", "    idle-hold-time-after-reset = 1"]
        out += ["  [[neighbors.afi-safis]]", "    [neighbors.afi-safis.config]", f'      afi-safi-name = "{fam}"', ""]
    return "\n".join(out) + "\n"


class GoBgp(Daemon):
    name = "gobgpd"

    def __init__(self, workdir: Path | str, ns: str | None = None, *, router_id: str, local_as: int,
                 neighbors: Sequence[BgpNeighbor] = (), announce: Sequence[str] = (), api_port: int = 50051):
        super().__init__(workdir, ns)
        self.router_id, self.local_as = router_id, local_as
        self.neighbors, self.announce = list(neighbors), list(announce)
        self.api_port = api_port

    def start(self, timeout: float = 15.0) -> "GoBgp":
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "gobgpd.toml"
        conf.write_text(render_gobgp_conf(router_id=self.router_id, local_as=self.local_as, neighbors=self.neighbors))
        self.spawn([GOBGPD, "-f", str(conf), "-t", "toml", "-p", "--pprof-disable",
                    f"--api-hosts=127.0.0.1:{self.api_port}"])
        self.wait_until(lambda: self.gobgp("global", check=False).returncode == 0, timeout, "gobgpd's API")
        for p in self.announce:
            self.add(p)
        return self

    def __enter__(self) -> "GoBgp":
        if self.proc is None:
            self.start()
        return self

    def gobgp(self, *args: str, check: bool = True):
        r = self.run([GOBGP, "-p", str(self.api_port), *args])
        if check and r.returncode != 0:
            raise PeerError(f"gobgp {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def add(self, prefix: str, *attrs: str) -> None:
        fam = "ipv4" if ipaddress.ip_network(prefix).version == 4 else "ipv6"
        self.gobgp("global", "rib", "add", prefix, *attrs, "-a", fam)

    def delete(self, prefix: str) -> None:
        fam = "ipv4" if ipaddress.ip_network(prefix).version == 4 else "ipv6"
        self.gobgp("global", "rib", "del", prefix, "-a", fam)

    def neighbor_state(self, address: str) -> str:
        r = self.gobgp("neighbor", address, "-j", check=False)
        if r.returncode != 0:
            return ""
        try:
            info = json.loads(r.stdout or "{}")
        except ValueError:
            return ""
        return str(info.get("state", {}).get("session_state", ""))

    def wait_established(self, address: str, timeout: float = 30.0) -> None:
        # gobgp 3.10's JSON gives the state as the gRPC enum's number: 6 = ESTABLISHED
        self.wait_until(lambda: self.neighbor_state(address) in ("6", "established"), timeout,
                        f"BGP session with {address} established")

    def rib(self, family: str = "ipv4") -> dict[str, list[dict[str, Any]]]:
        """prefix -> paths, from `gobgp global rib -a <family> -j`."""
        r = self.gobgp("global", "rib", "-a", family, "-j")
        return json.loads(r.stdout or "{}") or {}

    def learned_from(self, address: str, family: str = "ipv4") -> set[str]:
        return {p for p, paths in self.rib(family).items()
                if any(x.get("neighbor-ip") == address for x in paths)}

    def wait_route(self, prefix: str, address: str, timeout: float = 30.0) -> None:
        fam = "ipv6" if ":" in prefix else "ipv4"
        self.wait_until(lambda: prefix in self.learned_from(address, fam), timeout, f"route {prefix} from {address}")

    def uptime_stamp(self, address: str) -> int | None:
        """When the session with `address` was last established (GoBGP's timers.state.uptime,
        seconds since the epoch): unchanged = the session was not reset."""
        r = self.gobgp("neighbor", address, "-j", check=False)
        try:
            return int(json.loads(r.stdout)["timers"]["state"]["uptime"]["seconds"])
        except (ValueError, KeyError, TypeError):
            return None
