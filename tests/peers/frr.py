"""FRR's bgpd (Debian `frr` 8.4) as a BGP peer in a network namespace.

One `Frr` is one `bgpd` process without zebra (`-Z`: no kernel FIB, no RIB), run as root (`-S`),
with its own config, pid file, log and vty socket directory; queries go through
`vtysh --vty_socket <dir> -d bgpd` and FRR's JSON output. Prefixes in `announce` are originated
with `network` statements (import-check off, since there is no zebra to check them); each
neighbor carries its own address family only (IPv4 prefixes over IPv4 sessions, IPv6 over IPv6).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Sequence

from tests.peers.daemon import BgpNeighbor, Daemon, PeerError

BGPD = "/usr/lib/frr/bgpd"
VTYSH = "/usr/bin/vtysh"


def render_bgpd_conf(*, router_id: str, local_as: int, neighbors: Sequence[BgpNeighbor],
                     announce: Sequence[str], log_path: Path, extra: str = "") -> str:
    v4 = [p for p in announce if ipaddress.ip_network(p).version == 4]
    v6 = [p for p in announce if ipaddress.ip_network(p).version == 6]
    out = ["frr defaults traditional", "hostname isthmus-peer", f"log file {log_path} informational", "!",
           f"router bgp {local_as}", f" bgp router-id {router_id}", " no bgp ebgp-requires-policy",
           " no bgp network import-check", " no bgp default ipv4-unicast"]
    for n in neighbors:
        out.append(f" neighbor {n.address} remote-as {n.remote_as}")
        out.append(f" neighbor {n.address} timers connect 1")
        if n.hold_time is not None:
            out.append(f" neighbor {n.address} timers {max(1, n.hold_time // 3)} {n.hold_time}")
        if n.passive:
            out.append(f" neighbor {n.address} passive")
        if n.local_address:
            out.append(f" neighbor {n.address} update-source {n.local_address}")
    for fam, prefixes in (("ipv4", v4), ("ipv6", v6)):
        out.append(f" address-family {fam} unicast")
        out.extend(f"  network {p}" for p in prefixes)
        out.extend(f"  neighbor {n.address} activate" for n in neighbors
                   if f"ipv{ipaddress.ip_address(n.address).version}" == fam)
        out.append(" exit-address-family")
    out.append("!")
    if extra:
        out.append(extra)
    return "\n".join(out) + "\n"


class Frr(Daemon):
    name = "bgpd"

    def __init__(self, workdir: Path | str, ns: str | None = None, *, router_id: str, local_as: int,
                 neighbors: Sequence[BgpNeighbor] = (), announce: Sequence[str] = (), extra: str = "",
                 bgp_port: int = 179):
        super().__init__(workdir, ns)
        self.router_id, self.local_as = router_id, local_as
        self.neighbors, self.announce, self.extra = list(neighbors), list(announce), extra
        self.bgp_port = bgp_port

    @property
    def vty_dir(self) -> Path:
        return self.workdir / "vty"

    @property
    def log_path(self) -> Path:
        return self.workdir / "bgpd.log"

    def start(self, timeout: float = 15.0) -> "Frr":
        self.vty_dir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "bgpd.conf"
        conf.write_text(render_bgpd_conf(router_id=self.router_id, local_as=self.local_as,
                                         neighbors=self.neighbors, announce=self.announce,
                                         log_path=self.log_path, extra=self.extra))
        self.spawn([BGPD, "-f", str(conf), "-i", str(self.workdir / "bgpd.pid"), "--vty_socket", str(self.vty_dir),
                    "-Z", "-S", "-n", "-P", "0", "-p", str(self.bgp_port)])
        self.wait_until(lambda: (self.vty_dir / "bgpd.vty").exists() and self.vtysh("show bgp summary json",
                                                                                     check=False).returncode == 0,
                        timeout, "bgpd's vty socket")
        return self

    def __enter__(self) -> "Frr":
        if self.proc is None:
            self.start()
        return self

    def diagnostics(self) -> str:
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return super().diagnostics() + "\n--- bgpd.log (tail) ---\n" + "\n".join(log.splitlines()[-30:])

    def vtysh(self, command: str, check: bool = True):
        r = self.run([VTYSH, "--vty_socket", str(self.vty_dir), "-d", "bgpd", "-c", command])
        if check and r.returncode != 0:
            raise PeerError(f"vtysh -c {command!r} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def json(self, command: str) -> Any:
        return json.loads(self.vtysh(command).stdout or "{}")

    def neighbor_state(self, address: str) -> str:
        """BGP FSM state of a neighbor (RFC 4271 §8): Idle, Connect, Active, OpenSent, ..., Established."""
        info = self.json(f"show bgp neighbors {address} json").get(address, {})
        return info.get("bgpState", "")

    def wait_established(self, address: str, timeout: float = 30.0) -> None:
        self.wait_until(lambda: self.neighbor_state(address) == "Established", timeout,
                        f"BGP session with {address} Established")

    def routes(self, family: str = "ipv4") -> dict[str, list[dict[str, Any]]]:
        """prefix → paths, from `show bgp <family> unicast json`."""
        return self.json(f"show bgp {family} unicast json").get("routes", {})

    def learned_from(self, address: str, family: str = "ipv4") -> set[str]:
        return {p for p, paths in self.routes(family).items() if any(x.get("peerId") == address for x in paths)}

    def wait_route(self, prefix: str, address: str, timeout: float = 30.0) -> None:
        fam = "ipv6" if ":" in prefix else "ipv4"
        self.wait_until(lambda: prefix in self.learned_from(address, fam), timeout, f"route {prefix} from {address}")
