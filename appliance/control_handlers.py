"""The control socket's requests (``isthmus status``, ``show ...``, ``up``/``down``, ``rekey``,
``reload``): one method per request, reading the daemon's state and calling its engine.

Kept out of :class:`appliance.daemon.Daemon` so the daemon stays wiring only; a handler gets
the daemon (``self.d``) and returns the JSON-able answer, or raises
:class:`~appliance.control.ControlError`.
"""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.control import ControlError, check_params, format_spi, param, unknown_tunnel
from appliance.ike.engine import IkeEngine
from appliance.ike.message import TrafficSelector
from appliance.ike.sa import IkeState

if TYPE_CHECKING:
    from appliance.daemon import Daemon


def _spi8(b: bytes) -> str:
    return format_spi(int.from_bytes(b, "big"), 8)


def _endpoint(ep: tuple[str, int]) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


def _ts_text(ts: TrafficSelector) -> str:
    try:
        start = ipaddress.ip_address(ts.start_addr)
        end = ipaddress.ip_address(ts.end_addr)
        nets = list(ipaddress.summarize_address_range(start, end))
        text = str(nets[0]) if len(nets) == 1 else f"{start}-{end}"
    except (ValueError, TypeError):
        text = f"{ts.start_addr.hex()}-{ts.end_addr.hex()}"
    if ts.ip_protocol or (ts.start_port, ts.end_port) != (0, 65535):
        text += f"[{ts.ip_protocol}/{ts.start_port}-{ts.end_port}]"
    return text


class ControlHandlers:
    def __init__(self, daemon: "Daemon") -> None:
        self.d = daemon

    def table(self) -> dict[str, Any]:
        return {"status": self.h_status, "tunnels": self.h_tunnels, "sas": self.h_sas, "routes": self.h_routes,
                "bgp": self.h_bgp, "initiate": self.h_initiate, "terminate": self.h_terminate,
                "rekey": self.h_rekey, "reload": self.h_reload}

    def _running(self) -> IkeEngine:
        """The engine, or 'unavailable' while the daemon is still starting (the control socket is
        bound first, so that a second daemon on the same run directory is refused early)."""
        if self.d.engine is None or self.d.config is None:
            raise ControlError("unavailable", "isthmusd is starting; try again in a moment")
        return self.d.engine

    def _tunnel_param(self, params: dict[str, Any]) -> str:
        name = param(params, "tunnel", str)
        if name not in self.d.plans:
            raise unknown_tunnel(name, self.d.plans)
        return name

    async def h_status(self, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, ())
        self._running()
        assert self.d.engine is not None and self.d.config is not None
        sas = self.d.engine.sas()
        return {
            "name": self.d.config.appliance.name, "version": __version__, "pid": os.getpid(),
            "uptime": round(self.d.clock() - self.d.started, 1), "config": str(self.d.config_path),
            "tunnels": {"configured": len(self.d.plans),
                        "up": sum(1 for n in self.d.plans if self.d._tunnel_state_name(n) == "up")},
            "sas": {"ike": sum(1 for sa in sas if sa.state != IkeState.CONNECTING),
                    "child": sum(1 for sa in sas for c in sa.children if c.alive),
                    "half_open": sum(1 for sa in sas if sa.state == IkeState.CONNECTING)},
            "bgp": self.d.bgp.summary() if self.d.bgp is not None else None,
        }

    async def h_tunnels(self, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, ())
        self._running()
        assert self.d.engine is not None
        counters = await self.d._counters()
        now = self.d.clock()
        rows = []
        for name, plan in self.d.plans.items():
            st = self.d.state.get(name)
            sas = self.d.engine.sas(name)
            traffic = {"bytes_in": 0, "packets_in": 0, "bytes_out": 0, "packets_out": 0}
            for c in counters.get(name, []):
                if c.inbound is not None:
                    traffic["bytes_in"] += c.inbound.bytes
                    traffic["packets_in"] += c.inbound.packets
                if c.outbound is not None:
                    traffic["bytes_out"] += c.outbound.bytes
                    traffic["packets_out"] += c.outbound.packets
            rows.append({
                "name": name, "state": self.d._tunnel_state_name(name), "remote": str(plan.tunnel.remote),
                "remote_id": str(plan.ike.remote_id) if plan.ike.remote_id else None,
                "local": plan.ike.local_addr, "local_id": str(plan.ike.local_id),
                "interface": plan.interface.ifname, "start": plan.ike.start,
                "ike_sas": len(sas), "child_sas": sum(1 for sa in sas for c in sa.children_in_use()),
                "established": round(now - st.up_since, 1) if st is not None and st.up_since is not None else None,
                **self.d._cert_days(name, plan),
                "last_error": (st.auth_error or st.error) if st is not None else None,
                **traffic,
            })
        return {"tunnels": rows}

    async def h_sas(self, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, ("tunnel",))
        self._running()
        assert self.d.engine is not None
        only = self._tunnel_param(params) if "tunnel" in params else None
        counters = await self.d._counters()
        now = self.d.clock()
        by_spi = {c.spi_in: c for cs in counters.values() for c in cs}
        ike_rows, child_rows = [], []
        for sa in sorted(self.d.engine.sas(only), key=lambda s: (s.tunnel, s.created_at)):
            nat = {(False, False): "none", (True, False): "local", (False, True): "remote",
                   (True, True): "both"}[(sa.nat_local, sa.nat_remote)]
            cfg = sa.config
            ike_rows.append({
                "tunnel": sa.tunnel, "state": sa.state.value, "role": "initiator" if sa.initiator else "responder",
                "local": _endpoint(sa.local), "remote": _endpoint(sa.remote),
                "local_id": str(cfg.local_id) if cfg is not None else None,
                "remote_id": sa.remote_id_text or None, "spi_i": _spi8(sa.spi_i), "spi_r": _spi8(sa.spi_r),
                "proposal": str(sa.proposal) if sa.proposal is not None else None, "nat": nat,
                "mobike": sa.mobike,
                "age": round(now - (sa.established_at or sa.created_at), 1),
                "rekey_in": round(sa.rekey_at - now, 1) if sa.rekey_at is not None else None,
            })
            plan = self.d.plans.get(sa.tunnel)
            for c in sa.children:
                if not c.alive:
                    continue
                k = by_spi.get(c.spi_in_int)
                ts_local, ts_remote = (c.ts_i, c.ts_r) if c.we_initiated else (c.ts_r, c.ts_i)
                state = c.state.value if c.outbound_installed else f"{c.state.value} (inbound only)"
                child_rows.append({
                    "tunnel": sa.tunnel, "state": state, "spi_in": format_spi(c.spi_in_int),
                    "spi_out": format_spi(c.spi_out_int), "proposal": str(c.proposal),
                    "interface": plan.interface.ifname if plan else None, "if_id": plan.interface.if_id if plan else None,
                    "encap": sa.udp_encap, "ts_local": [_ts_text(t) for t in ts_local],
                    "ts_remote": [_ts_text(t) for t in ts_remote], "age": round(now - c.created_at, 1),
                    "rekey_in": round(c.rekey_at - now, 1) if c.state.value == "installed" else None,
                    "bytes_in": k.inbound.bytes if k and k.inbound else None,
                    "packets_in": k.inbound.packets if k and k.inbound else None,
                    "bytes_out": k.outbound.bytes if k and k.outbound else None,
                    "packets_out": k.outbound.packets if k and k.outbound else None,
                })
        return {"ike_sas": ike_rows, "child_sas": child_rows}

    async def h_routes(self, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, ())
        self._running()
        try:
            kernel = await self.d._dp(self.d.worker.installed_routes)
            ifindexes = await self.d._dp(self.d.worker.ifindexes)
        except Exception:  # noqa: BLE001
            kernel, ifindexes = set(), {}
        rows = static_route_rows(self.d.plans, kernel, ifindexes)
        if self.d.bgp is not None:
            return {"routes": self.d.bgp.show_routes(rows)}
        for r in rows:
            r["active"] = r["installed"]
        return {"routes": rows}

    async def h_bgp(self, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, ())
        self._running()
        if self.d.bgp is None:
            raise ControlError("unavailable", "BGP is not configured: no bgp: section, or no tunnel with a bgp "
                                              "block (see docs/bgp.md)")
        return self.d.bgp.show_bgp()

    async def h_initiate(self, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, ("tunnel",))
        self._running()
        name = self._tunnel_param(params)
        assert self.d.engine is not None
        st = self.d.state.get(name)
        if st is not None:
            st.cancel_retry()
        if self.d.engine.current_sa(name) is not None:
            return {"tunnel": name, "state": self.d._tunnel_state_name(name), "message": "already established"}
        self.d._engine_call(lambda now: self.d.engine.connect(name, now))
        return {"tunnel": name, "state": "connecting", "message": "initiating"}

    async def h_terminate(self, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, ("tunnel",))
        self._running()
        name = self._tunnel_param(params)
        assert self.d.engine is not None
        st = self.d.state.get(name)
        if st is not None:
            st.cancel_retry()
        had = bool(self.d.engine.sas(name))
        self.d._engine_call(lambda now: self.d.engine.terminate(name, now))
        return {"tunnel": name, "state": "terminating" if had else "down",
                "message": "deleting the IKE SA (DELETE sent); no automatic re-initiation until 'up'" if had
                else "no SA to delete; no automatic re-initiation until 'up'"}

    async def h_rekey(self, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, ("tunnel", "kind"))
        self._running()
        name = self._tunnel_param(params)
        kind = param(params, "kind", str, "child")
        if kind not in ("child", "ike"):
            raise ControlError("invalid_params", f"kind {kind!r}: allowed child or ike")
        assert self.d.engine is not None
        engine = self.d.engine
        try:
            self.d._engine_call(lambda now: (engine.rekey_child if kind == "child" else engine.rekey_ike)(name, now))
        except LookupError as e:
            raise ControlError("failed", f"cannot rekey {name}: {e.args[0] if e.args else e}") from None
        return {"tunnel": name, "state": "rekeying", "message": f"{'Child' if kind == 'child' else 'IKE'} SA rekey started"}

    async def h_reload(self, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, ())
        self._running()
        return await self.d.reload()


def static_route_rows(plans: dict[str, Any], kernel: set[tuple[str, int]], ifindexes: dict[str, int]) -> list[dict]:
    """`show routes` rows of the static routes (tunnels.X.routes): `kernel` is (prefix text,
    ifindex) of ours in the kernel (DataplaneWorker.installed_routes), `ifindexes` each tunnel's
    interface. Whether each is the route in use next to BGP's is RouteManager.show_routes's."""
    rows = []
    for name, plan in plans.items():
        for prefix in plan.routes:
            rows.append({"prefix": str(prefix), "next_hop": None, "interface": plan.interface.ifname,
                         "tunnel": name, "source": "static", "as_path": None,
                         "installed": (str(prefix), ifindexes.get(name, -1)) in kernel})
    return rows
