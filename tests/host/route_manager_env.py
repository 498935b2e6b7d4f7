"""The route manager on the host, against real BGP peers in network namespaces.

    with Appliance(tmp_path, config_text, tunnels=["to-b"]) as app:    # namespace + veths + config
        app.start()                                  # RouteManager in its own loop thread
        app.tunnel_up("to-b")                        # what isthmusd does when the Child SA is installed
        app.wait_fib({"10.2.0.0/16": {("169.254.21.2", "xfrm-b")}})

Without an IPsec kernel, each tunnel interface is a veth named like the config's XFRM interface
(``xfrm-b``) in the appliance namespace, its other end (``p-b``) in the peer's namespace, with the
tunnel's inside addresses on both ends. The RouteManager (bgp/manager.py) runs exactly as in
isthmusd - ExaBGP as its child inside the appliance namespace, its FIB writes into that
namespace - in an asyncio loop on a thread of its own, so the tests can use the peers' blocking
helpers; every call into it goes through that loop (:meth:`Appliance.call`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from appliance.config import load_config
from bgp.manager import RouteManager
from tests.netns import Netns, sh

PSK = "Qm7.vT2_xK9pL4wZ8nR3"


def write_config(directory: Path, text: str) -> Path:
    (directory / "secrets").mkdir(parents=True, exist_ok=True)
    psk = directory / "secrets" / "t.psk"
    psk.write_text(PSK + "\n")
    os.chmod(psk, 0o600)
    path = directory / "isthmus.yaml"
    path.write_text(text)
    return path


def tunnel_yaml(name: str, n: int, peer_as: int, *, imp: str | None = None, exp: str | None = None,
                extra: str = "", v6: bool = False) -> str:
    """A tunnel `name` on interface xfrm-<name[-1]>, inside 169.254.2n.1/30 (peer .2); with `v6`
    also fd00:2n::1/126 and an IPv6 session to fd00:2n::2."""
    bgp = f"peer_as: {peer_as}, peer_address: 169.254.2{n}.2, hold_time: 3"
    addr6 = ""
    if v6:
        bgp += f', peer_address6: "fd00:2{n}::2"'
        addr6 = f', address6: "fd00:2{n}::1/126"'
    if imp:
        bgp += f", import: {imp}"
    if exp:
        bgp += f", export: {exp}"
    if extra:
        bgp += ", " + extra
    return (f"  {name}:\n    remote: 198.51.100.{n}\n    auth: {{psk_file: secrets/t.psk}}\n"
            f"    interface: {{name: xfrm-{name[-1]}, address: 169.254.2{n}.1/30{addr6}}}\n"
            f"    bgp: {{{bgp}}}\n")


class Peer:
    """One peer namespace joined to the appliance by the veth standing in for a tunnel."""

    def __init__(self, ns: Netns, tunnel: str, n: int):
        self.ns, self.tunnel, self.n = ns, tunnel, n
        self.address = f"169.254.2{n}.2"
        self.app_address = f"169.254.2{n}.1"
        self.ifname = f"xfrm-{tunnel[-1]}"

    @property
    def name(self) -> str:
        return self.ns.name


class Appliance:
    def __init__(self, workdir: Path, config_text: str, peers: list[tuple[str, int]], *,
                 stale_timeout: float = 60.0, exabgp_argv: list[str] | None = None):
        self.workdir = Path(workdir)
        self.config_text = config_text
        self.peer_specs = peers
        self.stale_timeout = stale_timeout
        self.exabgp_argv = exabgp_argv
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.mgr: RouteManager | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._ns: list[Netns] = []
        self.peers: dict[str, Peer] = {}

    # ------------------------------------------------------------------ topology
    def __enter__(self) -> "Appliance":
        self.ns = Netns("app")
        self.ns.__enter__()
        self._ns.append(self.ns)
        for tunnel, n in self.peer_specs:
            pns = Netns(f"p{n}")
            pns.__enter__()
            self._ns.append(pns)
            p = Peer(pns, tunnel, n)
            tmp = f"rm{os.getpid() % 10000}{n}"
            sh(["ip", "link", "add", tmp, "type", "veth", "peer", "name", tmp + "p"])
            sh(["ip", "link", "set", tmp, "netns", self.ns.name, "name", p.ifname])
            sh(["ip", "link", "set", tmp + "p", "netns", pns.name, "name", "p-" + tunnel[-1]])
            self.ns.run(["ip", "addr", "add", f"{p.app_address}/30", "dev", p.ifname])
            self.ns.run(["ip", "addr", "add", f"fd00:2{n}::1/126", "dev", p.ifname, "nodad"])
            pns.run(["ip", "addr", "add", f"fd00:2{n}::2/126", "dev", "p-" + tunnel[-1], "nodad"])
            self.ns.run(["ip", "link", "set", p.ifname, "up"])
            pns.run(["ip", "addr", "add", f"{p.address}/30", "dev", "p-" + tunnel[-1]])
            pns.run(["ip", "link", "set", "p-" + tunnel[-1], "up"])
            self.peers[tunnel] = p
        self.config_path = write_config(self.workdir, self.config_text)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            for ns in reversed(self._ns):
                ns.__exit__(None, None, None)

    # ------------------------------------------------------------------ the manager's loop
    def start(self) -> "Appliance":
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="route-manager", daemon=True)
        self.thread.start()
        config = load_config(self.config_path)

        async def make() -> RouteManager:
            mgr = RouteManager(config, self.workdir / "bgp", netns=self.ns.name, publish=self._publish,
                               stale_timeout=self.stale_timeout, exabgp_argv=self.exabgp_argv)
            await mgr.start()
            return mgr
        self.mgr = self.run(make())
        return self

    def stop(self) -> None:
        if self.loop is None:
            return
        if self.mgr is not None:
            try:
                self.run(self.mgr.stop(), timeout=30)
            finally:
                self.mgr = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        assert self.thread is not None
        self.thread.join(10)
        self.loop.close()
        self.loop = None

    def run(self, coro, timeout: float = 60.0) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run fn() on the manager's loop thread (the manager is not thread-safe)."""
        assert self.loop is not None
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def go() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)
        self.loop.call_soon_threadsafe(go)
        return fut.result(timeout)

    def _publish(self, type: str, tunnel: str | None = None, **fields: Any) -> None:
        with self._lock:
            self.events.append({"type": type, "tunnel": tunnel, "t": time.monotonic(), **fields})

    def events_of(self, type: str, tunnel: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["type"] == type and (tunnel is None or e["tunnel"] == tunnel)]

    def tunnel_up(self, name: str) -> None:
        self.call(lambda: self.mgr.tunnel_up(name))

    def tunnel_down(self, name: str, reason: str = "Child SA down") -> float:
        return self.call(lambda: self.mgr.tunnel_down(name, reason))

    def reload(self, config_text: str) -> None:
        self.config_path = write_config(self.workdir, config_text)
        config = load_config(self.config_path)
        self.run(self.mgr.reload(config))

    def show_bgp(self) -> dict[str, Any]:
        return self.call(self.mgr.show_bgp)

    def neighbor(self, tunnel: str) -> dict[str, Any]:
        return next(n for n in self.show_bgp()["neighbors"] if n["tunnel"] == tunnel)

    # ------------------------------------------------------------------ the kernel's view
    def fib(self) -> dict[str, set[tuple[str, str]]]:
        """Our BGP routes in the appliance namespace's kernel: prefix -> {(via, dev)} (ip -j route)."""
        out: dict[str, set[tuple[str, str]]] = {}
        for fam in ("-4", "-6"):
            r = self.ns.run(["ip", "-j", fam, "route", "show", "proto", "74"])
            for e in json.loads(r.stdout or "[]"):
                dst = e["dst"] if "/" in e["dst"] or e["dst"] == "default" else e["dst"] + ("/32" if fam == "-4"
                                                                                            else "/128")
                hops = {(h["gateway"], h["dev"]) for h in e.get("nexthops", [])} or {(e.get("gateway"), e.get("dev"))}
                out[dst] = hops
        return out

    def fib_count(self) -> int:
        r = self.ns.run("ip -4 route show proto 74 | grep -c '^[0-9]' || true")
        return int(r.stdout.strip() or 0)

    def wait(self, fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = fn()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; FIB: {self.fib()}\n"
                             f"bgp: {json.dumps(self.show_bgp(), indent=1, default=str)}\n"
                             f"events: {self.events[-20:]}\n" + self.exabgp_log_tail())

    def wait_fib(self, want: dict[str, set[tuple[str, str]]], timeout: float = 20.0) -> None:
        self.wait(lambda: self.fib() == want, timeout, f"FIB == {want}")

    def wait_established(self, tunnel: str, timeout: float = 20.0) -> None:
        self.wait(lambda: self.neighbor(tunnel)["state"] == "established", timeout, f"{tunnel} established")

    def exabgp_log_tail(self, n: int = 30) -> str:
        p = self.workdir / "bgp" / "exabgp.log"
        text = p.read_text(errors="replace") if p.exists() else ""
        return "--- exabgp.log (tail) ---\n" + "\n".join(text.splitlines()[-n:])
