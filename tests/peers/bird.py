"""BIRD 2 (Debian `bird2`) as a BGP peer in a network namespace.

One `Bird` is one `bird -f` process with its own config, control socket and log in a work
directory. It never touches the kernel FIB (no `protocol kernel`): it only speaks BGP, announces
the prefixes given in `announce` (as static blackhole routes exported to every neighbor of the
same address family: IPv4 prefixes over IPv4 sessions, IPv6 over IPv6) and imports everything. Queries go through `birdc -s <socket>`.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Sequence

from tests.peers.daemon import BgpNeighbor, Daemon, PeerError

BIRD = "/usr/sbin/bird"
BIRDC = "/usr/sbin/birdc"


def render_bird_conf(*, router_id: str, local_as: int, neighbors: Sequence[BgpNeighbor],
                     announce: Sequence[str], log_path: Path, extra: str = "") -> str:
    v4 = [p for p in announce if ipaddress.ip_network(p).version == 4]
    v6 = [p for p in announce if ipaddress.ip_network(p).version == 6]
    lines = [f"router id {router_id};", f'log "{log_path}" all;', "protocol device { }"]
    if v4:
        lines.append("protocol static announce4 { ipv4; " + " ".join(f"route {p} blackhole;" for p in v4) + " }")
    if v6:
        lines.append("protocol static announce6 { ipv6; " + " ".join(f"route {p} blackhole;" for p in v6) + " }")
    for i, n in enumerate(neighbors):
        local = f"local {n.local_address} as {local_as};" if n.local_address else f"local as {local_as};"
        body = [local, f"neighbor {n.address} as {n.remote_as};"]
        if n.passive:
            body.append("passive on;")
        if n.hold_time is not None:
            body.append(f"hold time {n.hold_time}; keepalive time {max(1, n.hold_time // 3)};")
        body.append("connect retry time 1; connect delay time 1; error wait time 1, 4;")
        # One channel, the neighbor's own address family (no IPv6 routes with IPv4 next hops).
        fam = f"ipv{ipaddress.ip_address(n.address).version}"
        body.append(f"{fam} {{ import all; export where source = RTS_STATIC; }};")
        lines.append(f"protocol bgp {neighbor_protocol(i)} {{ " + " ".join(body) + " }")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def neighbor_protocol(index: int) -> str:
    """The BIRD protocol name of the index-th neighbor."""
    return f"n{index}"


class Bird(Daemon):
    name = "bird"

    def __init__(self, workdir: Path | str, ns: str | None = None, *, router_id: str, local_as: int,
                 neighbors: Sequence[BgpNeighbor] = (), announce: Sequence[str] = (), extra: str = ""):
        super().__init__(workdir, ns)
        self.router_id, self.local_as = router_id, local_as
        self.neighbors, self.announce, self.extra = list(neighbors), list(announce), extra

    @property
    def socket_path(self) -> Path:
        return self.workdir / "bird.ctl"

    @property
    def log_path(self) -> Path:
        return self.workdir / "bird.log"

    def start(self, timeout: float = 10.0) -> "Bird":
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "bird.conf"
        conf.write_text(render_bird_conf(router_id=self.router_id, local_as=self.local_as,
                                         neighbors=self.neighbors, announce=self.announce,
                                         log_path=self.log_path, extra=self.extra))
        self.socket_path.unlink(missing_ok=True)
        self.spawn([BIRD, "-f", "-c", str(conf), "-s", str(self.socket_path), "-P", str(self.workdir / "bird.pid")])
        self.wait_until(lambda: self.socket_path.exists() and self.birdc("show status", check=False).returncode == 0,
                        timeout, "BIRD's control socket")
        return self

    def __enter__(self) -> "Bird":
        if self.proc is None:
            self.start()
        return self

    def diagnostics(self) -> str:
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return super().diagnostics() + "\n--- bird.log (tail) ---\n" + "\n".join(log.splitlines()[-30:])

    def birdc(self, command: str, check: bool = True):
        r = self.run([BIRDC, "-s", str(self.socket_path), *command.split()])
        if check and r.returncode != 0:
            raise PeerError(f"birdc {command} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def protocols(self) -> dict[str, dict[str, str]]:
        """name → {proto, table, state, since, info} from `show protocols`."""
        out = self.birdc("show protocols").stdout
        res = {}
        for line in out.splitlines():
            parts = line.split(None, 5)
            if len(parts) >= 5 and parts[1] in ("BGP", "Static", "Device", "Direct", "Kernel"):
                res[parts[0]] = {"proto": parts[1], "table": parts[2], "state": parts[3], "since": parts[4],
                                 "info": parts[5] if len(parts) > 5 else ""}
        return res

    def bgp_state(self, index: int = 0) -> str:
        """BGP state of the index-th neighbor: Established, Active, Connect, ..."""
        p = self.protocols().get(neighbor_protocol(index))
        return p["info"].split()[0] if p and p["info"] else ""

    def wait_established(self, index: int = 0, timeout: float = 30.0) -> None:
        self.wait_until(lambda: self.bgp_state(index) == "Established", timeout,
                        f"BGP session {neighbor_protocol(index)} Established")

    def routes(self, protocol: str | None = None) -> set[str]:
        """Prefixes in BIRD's tables (all, or those learned from one protocol)."""
        out = self.birdc("show route" + (f" protocol {protocol}" if protocol else "")).stdout
        return {m.group(1) for m in re.finditer(r"^([0-9a-fA-F.:]+/\d+)\s", out, re.M)}

    def learned(self, index: int = 0) -> set[str]:
        return self.routes(neighbor_protocol(index))

    def wait_route(self, prefix: str, index: int = 0, timeout: float = 30.0) -> None:
        self.wait_until(lambda: prefix in self.learned(index), timeout, f"route {prefix} from {neighbor_protocol(index)}")
