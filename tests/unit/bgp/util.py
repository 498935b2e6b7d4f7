"""Helpers for the route manager's unit tests: configs through the real validator, routes."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

from netaddr import IPAddress, IPNetwork

from appliance.config import Config, parse_config
from bgp.route import Origin, Route

_DIR: Path | None = None


def _dir() -> Path:
    """A directory with the PSK file the configs name (made once per test process)."""
    global _DIR
    if _DIR is None:
        _DIR = Path(tempfile.mkdtemp(prefix="isthmus-bgp-test-"))
        (_DIR / "k.psk").write_text("Qm7.vT2_xK9pL4wZ8nR3\n")
        os.chmod(_DIR / "k.psk", 0o600)
    return _DIR


def tunnel_yaml(name: str, n: int, peer_as: int, imp: str | None = "in", exp: str | None = "out",
                extra: str = "") -> str:
    """Tunnel ``name``: remote 198.18.0.n, inside 169.254.n.1/30, peer .2 (and fd00:n::2)."""
    keys = [f"peer_as: {peer_as}", f"peer_address: 169.254.{n}.2", f"peer_address6: 'fd00:{n}::2'"]
    if imp:
        keys.append(f"import: {imp}")
    if exp:
        keys.append(f"export: {exp}")
    if extra:
        keys.append(extra)
    return (f"  {name}:\n    remote: 198.18.0.{n}\n    auth: {{psk_file: k.psk}}\n"
            f"    interface: {{address: 169.254.{n}.1/30, address6: 'fd00:{n}::1/126'}}\n"
            f"    bgp: {{{', '.join(keys)}}}\n")


def make_config(tunnels: str, bgp: str) -> Config:
    """``tunnels``: tunnel_yaml() blocks; ``bgp``: the body of the top-level bgp section."""
    text = "appliance: {router_id: 10.255.0.1}\ntunnels:\n" + tunnels + "bgp:\n" + \
        textwrap.indent(textwrap.dedent(bgp).strip("\n"), "  ") + "\n"
    return parse_config(text, _dir() / "isthmus.yaml")


def route(prefix: str, neighbor: str, *, as_path: tuple[int, ...] = (65002,), next_hop: str | None = None,
          origin: Origin = Origin.IGP, med: int | None = None, local_pref: int | None = None,
          communities=(), large_communities=(), router_id: str | None = None, peer_as: int | None = None,
          ebgp: bool = True) -> Route:
    net = IPNetwork(prefix)
    if next_hop is None:
        n = int(neighbor.lstrip("t") or 1) if neighbor.lstrip("t").isdigit() else 1
        next_hop = f"169.254.{n}.2" if net.version == 4 else f"fd00:{n}::2"
    return Route(prefix=net, next_hop=IPAddress(next_hop), neighbor=neighbor, as_path=tuple(as_path),
                 origin=origin, med=med, local_pref=local_pref, communities=tuple(communities),
                 large_communities=tuple(large_communities),
                 peer_as=peer_as if peer_as is not None else (as_path[0] if as_path else 0),
                 peer_router_id=IPAddress(router_id) if router_id else None, ebgp=ebgp)
