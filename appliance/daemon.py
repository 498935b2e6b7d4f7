"""`isthmusd`: the appliance daemon - a thin asyncio shell around the sans-IO IKE engine.

::

    isthmusd --config /etc/isthmus/isthmus.yaml --run-dir /run/isthmus \\
             --metrics-listen 127.0.0.1:9477 --log-format auto --log-level info

What it holds together (aioquic's protocol-layer idea: the protocol state lives in the engine,
this module only moves bytes, time and events):

* the config (:mod:`appliance.config`) turned into plans (:mod:`appliance.tunnels`);
* one :class:`~appliance.ike.engine.IkeEngine` for all tunnels, fed by UDP 500/4500 on IPv4 and
  IPv6 (:mod:`appliance.ikesockets`) and by its own timer;
* the data plane (:mod:`appliance.dpworker` around :class:`appliance.xfrm.Dataplane`) in a single
  thread: Child SA events become XFRM SAs, policies, the interface's MTU and MSS clamp, user
  hooks and the tunnel's static routes; ``reconcile`` at start;
* the control socket (:mod:`appliance.control`: status, tunnels, sas, routes, bgp, initiate,
  terminate, rekey, reload, and the event stream), Prometheus metrics, JSON logs, systemd
  notifications (:mod:`appliance.sdnotify`) and a pid file in the run directory.

Reload (SIGHUP or ``isthmus reload``) validates the whole new file first; a file with a problem
changes nothing and the problems (file:line, field) go back to the caller. Otherwise unchanged
tunnels are not touched, changed ones are deleted (DELETE to the peer) and negotiated again,
removed ones are deleted, added ones start.

When the data plane fails for a Child SA (the kernel refuses an SA, the interface cannot be
made...), the daemon publishes ``dataplane_error`` (and ``tunnel_state`` ``error``) with the data
plane's message, deletes the tunnel's IKE SA with a DELETE to the peer - SAs the kernel does not
hold would black-hole traffic - and, for ``start: true`` tunnels, initiates again with back-off
(2 s doubling to 60 s).

SIGTERM / SIGINT: with ``appliance.delete_on_shutdown`` (default) every IKE SA is deleted (DELETE
to the peers), then routes, SAs, policies, MSS rules and interfaces of ours are removed.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # start-up (python -m appliance.daemon): no cyclic GC while the imports, the config and the
    # plans build their objects (it cost ~40% of loading a 1,000-tunnel config); Daemon._start
    # turns it on again and freezes what start-up made (issue 13)
    gc.disable()

import asyncio
import dataclasses
import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from appliance import __version__, profiling, sdnotify
from appliance.config import DEFAULT_CONFIG_PATH, Config, ConfigError, ConfigReadError, load_config
from appliance.access import policy_from_system
from appliance.control import (ControlError, ControlServer, ControlSocketInUse, EventBus, RunDirError, format_spi,
                               resolve_run_dir, socket_path)
from appliance.control_handlers import ControlHandlers, _endpoint, _spi8
from appliance.dpworker import DataplaneWorker, DpResult, describe_hook
from appliance.ike import events as ev
from appliance.ike.engine import IkeEngine
from appliance.ike.sa import IkeState
from appliance.ikesockets import IkeSockets, SocketsError
from appliance.logs import register_secret, setup_logging
from appliance.metrics import IsthmusMetrics, MetricsServer, Registry, parse_listen
from appliance.entropy import KernelRandom
from appliance.static_routes import static_metric
from appliance.tunnels import TunnelPlan, diff_plans, plan_tunnels

if TYPE_CHECKING:   # imported when needed: not every appliance has BGP or certificates (start-up, issue 13)
    from appliance.crl_fetch import CrlFetcher
    from bgp.manager import RouteManager

log = logging.getLogger("isthmus.daemon")


def bgp_wanted(config: Config) -> bool:
    """Does this config need the route manager (a bgp: section and a tunnel with a bgp block)?
    (bgp.manager.bgp_wanted, without importing the route manager.)"""
    return config.bgp is not None and any(t.bgp is not None for t in config.tunnels.values())

PID_FILE = "isthmusd.pid"
DEFAULT_HOOKS_DIR = "/etc/isthmus/hooks"
RETRY_FIRST = 2.0
RETRY_MAX = 60.0
SHUTDOWN_WAIT = 3.0
LIVENESS_POLL = 5.0      # seconds between reads of the inbound SA counters (DPD deferral)
LIVENESS_POLL_MIN = 0.25  # ... at most this often (a quarter of the shortest DPD interval)
CRL_POLL = 5.0           # seconds between looks at CRL distribution points to (re)fetch
MAX_CRL_URLS = 128       # distribution points followed at once


class StartError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass
class _TunnelState:
    """The daemon's own view of a tunnel (loop thread only)."""

    up_since: float | None = None          # the kernel holds a Child SA (monotonic time)
    spis: tuple[int, int] | None = None    # the pair carrying traffic
    routes: tuple = ()                     # static routes in the kernel
    error: str | None = None               # last data plane failure, until the next success
    auth_error: str | None = None          # last AuthFailed reason, until an IKE SA comes up
    peer_cert_not_after: float | None = None   # the peer's certificate at its last authentication
    failures: int = 0
    retry: asyncio.TimerHandle | None = None
    reconnect_on_down: bool = False        # a changed tunnel: initiate as soon as the old IKE SA is gone

    def cancel_retry(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None


class Daemon:
    """One appliance: see the module docstring. ``await Daemon(...).run()`` returns an exit status."""

    def __init__(self, config_path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None, *,
                 metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9477), hooks_dir: str | None = DEFAULT_HOOKS_DIR,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config_path = Path(config_path)
        self.run_dir = resolve_run_dir(run_dir)
        self.metrics_listen = metrics_listen
        self.hooks_dir = hooks_dir
        self.clock = clock
        self.started = clock()
        self.config: Config | None = None
        self.plans: dict[str, TunnelPlan] = {}
        self.state: dict[str, _TunnelState] = {}
        self.bus = EventBus()
        self.metrics = IsthmusMetrics(Registry())
        self.metrics.registry.add_collector(self._collect)
        self.engine: IkeEngine | None = None
        self.bgp: RouteManager | None = None     # the route manager (bgp/), when the config has BGP
        self.sockets: IkeSockets | None = None
        self.control: ControlServer | None = None
        self.http: MetricsServer | None = None
        self.worker = DataplaneWorker()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="isthmus-dataplane",
            initializer=profiling.profile_this_thread, initargs=("dataplane",))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self._stop_reason = "stopped"
        self._reload_lock = asyncio.Lock()
        self._pid_file: Path | None = None
        self._dp_outstanding = 0                 # Child SA jobs submitted, not yet handled
        self._dp_pending: Counter[str] = Counter()   # ... of each tunnel
        self._held: dict[str, list] = {}         # datagrams of a tunnel waiting for its jobs
        self._tasks: list[asyncio.Future] = []
        # CRL distribution points (appliance/crl_fetch.py): fetched in their own threads, bounded
        self._crl_fetcher: CrlFetcher | None = None     # made with the first URL to fetch
        self._crl_executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="isthmus-crl")
        self._crl_urls: dict[str, None] = {}
        self._crl_inflight: set[str] = set()
        # MOBIKE (appliance/mobility.py): our address changes, from rtnetlink
        self.address_watch = None
        self.selector = None

    @property
    def crl_fetcher(self) -> "CrlFetcher":
        if self._crl_fetcher is None:
            from appliance.crl_fetch import CrlFetcher
            self._crl_fetcher = CrlFetcher()
        return self._crl_fetcher

    # ================================================================== life cycle
    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        try:
            await self._start()
        except StartError as e:
            log.error("%s", e)
            await self._close()
            raise
        for sig, fn in ((signal.SIGTERM, lambda: self.stop("SIGTERM")), (signal.SIGINT, lambda: self.stop("SIGINT")),
                        (signal.SIGHUP, self._sighup)):
            self._loop.add_signal_handler(sig, fn)
        sdnotify.ready(f"{len(self.plans)} tunnels")
        log.info("isthmusd %s ready: %d tunnels, run dir %s", __version__, len(self.plans), self.run_dir,
                 extra={"pid": os.getpid()})
        await self._stop.wait()
        await self._shutdown()
        return 0

    def stop(self, reason: str = "stopped") -> None:
        self._stop_reason = reason
        self._stop.set()

    async def _start(self) -> None:
        try:
            try:
                gc_was_on = gc.isenabled()
                gc.disable()             # the config's objects are all alive: nothing to find
                config = load_config(self.config_path)
                plans = plan_tunnels(config)
            finally:
                if gc_was_on:
                    gc.enable()
        except ConfigReadError as e:
            raise StartError(str(e)) from None
        except ConfigError as e:
            raise StartError(f"the configuration has {len(e.issues)} problem(s):\n" + str(e)) from None
        self._register_secrets(config)
        self.config, self.plans = config, plans
        self.state = {n: _TunnelState() for n in plans}

        self.control = ControlServer(socket_path(self.run_dir), ControlHandlers(self).table(), events=self.bus,
                                     access=policy_from_system())
        try:
            await self.control.start()
        except ControlSocketInUse as e:
            self.control = None
            raise StartError(f"another isthmusd is running with run directory {self.run_dir} ({e}); stop it or "
                             f"give this one its own --run-dir") from None
        except RunDirError as e:
            self.control = None
            raise StartError(str(e)) from None
        self._write_pid_file()

        try:
            await self._dp(self.worker.open, self.hooks_dir, self._hook_result_threadsafe)
        except Exception as e:  # noqa: BLE001 - netlink sockets cannot be opened: nothing works
            raise StartError(f"the kernel data plane cannot be opened: {e}") from None
        await self._static_metric(config)
        try:
            report, flushed = await self._dp(self.worker.reconcile, plans)
        except Exception as e:  # noqa: BLE001
            log.error("reconciling the kernel state failed: %s", e)
            self.bus.publish("dataplane_error", None, message=f"reconciling the kernel state failed: {e}")
        else:
            log.info("kernel state reconciled: interfaces created: %s; adopted: %s; removed: %s; stale SAs %d, "
                     "policies %d, MSS rules of %s, routes %d removed",
                     ", ".join(report.created) or "none", ", ".join(report.adopted) or "none",
                     ", ".join(report.removed_interfaces) or "none", report.removed_sas, report.removed_policies,
                     ", ".join(report.removed_clamps) or "no tunnel", flushed)
            for err in report.errors:
                log.error("data plane: %s", err)
                self.bus.publish("dataplane_error", None, message=err)

        # certificate validity needs the wall clock: UNIX time = engine time + offset
        self.engine = IkeEngine([p.ike for p in plans.values()], random=KernelRandom(),
                                dos=config.appliance.dos_protection,
                                wall_offset=time.time() - self.clock())
        self.sockets = IkeSockets(self._datagram)
        try:
            for w in self.sockets.open():
                log.warning("%s", w)
        except SocketsError as e:
            raise StartError(str(e)) from None
        log.info("IKE listening on %s", ", ".join(f"{f} UDP {p}" for f, p in self.sockets.bound))

        if self.metrics_listen is not None:
            host, port = self.metrics_listen
            self.http = MetricsServer(self.metrics.registry, host, port)
            try:
                await self.http.start()
            except OSError as e:
                log.error("metrics not served: cannot listen on %s:%d (%s); use --metrics-listen HOST:PORT or off",
                          host, port, e.strerror or e)
                self.http = None
        await self._start_bgp(config)
        self._start_mobility()
        self._engine_call(self.engine.start)
        # what start-up built lives as long as the daemon: out of the collector's way from now on
        gc.enable()
        gc.freeze()
        self._tasks.append(asyncio.ensure_future(self._liveness()))
        self._tasks.append(asyncio.ensure_future(self._crl_refresh()))

    def _start_mobility(self) -> None:
        """Watch rtnetlink for address and route changes (tunnels with mobike: true follow our
        address with MOBIKE, RFC 4555); without netlink the tunnels just do not move."""
        from appliance.mobility import AddressWatch, SourceSelector

        try:
            self.selector = SourceSelector()
            self.address_watch = AddressWatch(self._loop, self._local_addresses_changed,
                                              xfrm_interfaces=self.selector.xfrm_ifindexes)
        except OSError as e:
            log.warning("address changes are not followed (MOBIKE): rtnetlink unavailable: %s", e)
            self.address_watch = None

    def _local_addresses_changed(self) -> None:
        """Our addresses or routes changed: every mobike tunnel whose route to the peer now
        leaves from another address of ours moves there (engine.local_address_changed). A
        configured `local:` is kept as long as it exists. One look at the kernel for all
        tunnels (addresses once, a route lookup per distinct peer address), never per tunnel."""
        if self.engine is None or self.selector is None:
            return
        mobile = [(name, plan) for name, plan in self.plans.items() if plan.tunnel.mobike]
        if not mobile:
            return
        ours, sources = self.selector.lookup(str(plan.tunnel.remote) for _, plan in mobile)
        for name, plan in mobile:
            current = self.engine.local_address(name)
            pinned = plan.tunnel.local is not None
            if pinned and current is not None and current in ours:
                continue
            remote = str(plan.tunnel.remote)
            new = sources.get(remote)
            if new is None:
                log.warning("no usable route to the peer %s any more (outside our XFRM interfaces); the "
                            "tunnel stays at %s", remote, current, extra={"tunnel": name})
                continue
            if new == current:
                continue
            result = self._engine_call(lambda now, n=name, a=new: self.engine.local_address_changed(n, a, now))
            sa = self.engine.current_sa(name)
            if result == "update" and sa is not None and sa.children_in_use():
                # The UPDATE_SA_ADDRESSES request is out; our old address is gone, so our side of
                # the Child SAs moves now, during the round trip (the engine's own event after the
                # answer then finds them in place, or corrects the encapsulation if a NAT appeared).
                # Whatever we send next (the answer to the peer's return routability check, after
                # which it sends to the new address) waits for this job, as always.
                self._dp_submit(ev.IkeSaAddressesUpdated(tunnel=name, spi_i=sa.spi_i, spi_r=sa.spi_r,
                                                         local=sa.local, remote=sa.remote, udp_encap=sa.udp_encap))
            what = {"update": "the IKE SA follows (MOBIKE UPDATE_SA_ADDRESSES)",
                    "no-mobike": "the peer does not do MOBIKE: the IKE SA is deleted and made again",
                    "responder": "the peer initiated: it decides the addresses",
                    "no-sa": "no IKE SA up: the next one starts from there"}.get(result, result)
            log.info("our address towards %s is now %s (was %s): %s", remote, new, current, what,
                     extra={"tunnel": name})
            self.bus.publish("local_address_changed", name, address=new, previous=current, action=result)
            # a reload finds the tunnel unchanged when the route still picks the new address
            self.plans[name] = dataclasses.replace(plan, ike=dataclasses.replace(plan.ike, local_addr=new))

    async def _crl_refresh(self) -> None:
        """Fetch the CRL distribution points of the peers' chains the engine validated (it does
        no I/O): each URL again once the fetcher's cache entry is stale (nextUpdate, bounded);
        a fetched CRL goes to the engine, which revokes running IKE SAs and later attempts."""
        while True:
            await asyncio.sleep(CRL_POLL)
            if self.engine is None:
                continue
            for url in self.engine.take_crl_urls():
                if len(self._crl_urls) < MAX_CRL_URLS:
                    self._crl_urls[url] = None
            for url in list(self._crl_urls):
                if url in self._crl_inflight or self.crl_fetcher.cached(url) is not None:
                    continue
                self._crl_inflight.add(url)
                fut = self._loop.run_in_executor(self._crl_executor, self.crl_fetcher.get, url)  # type: ignore[union-attr]
                fut.add_done_callback(lambda f, u=url: self._crl_fetched(u, f))

    def _crl_fetched(self, url: str, fut: asyncio.Future) -> None:
        self._crl_inflight.discard(url)
        if fut.cancelled() or fut.exception() is not None or self.engine is None:
            return
        crl = fut.result()
        if crl is not None:
            hit = self._engine_call(lambda now: self.engine.add_crl(crl, now))  # type: ignore[union-attr]
            for name in hit or ():
                log.warning("peer certificate revoked by the CRL from %s; IKE SA deleted", url,
                            extra={"tunnel": name})

    async def _start_bgp(self, config: Config) -> None:
        """The route manager (ExaBGP child, FIB), if the config has a bgp: section and a tunnel
        with a bgp block. A failure here is logged: the tunnels still work without BGP."""
        if not bgp_wanted(config):
            return
        from bgp.manager import RouteManager

        mgr = RouteManager(config, self.run_dir / "bgp", publish=self.bus.publish, metrics=self.metrics,
                           clock=self.clock)
        try:
            await mgr.start()
        except Exception as e:  # noqa: BLE001
            log.error("the route manager cannot start: %s", e)
            self.bus.publish("dataplane_error", None, message=f"the route manager cannot start: {e}")
            with contextlib.suppress(Exception):
                await mgr.stop()
            return
        self.bgp = mgr
        for name, st in self.state.items():
            if st.up_since is not None:
                mgr.tunnel_up(name)

    async def _liveness(self) -> None:
        """Inbound ESP proves the peer alive (RFC 7296 §2.4: liveness checks are for when nothing
        is heard): every LIVENESS_POLL seconds (or a quarter of the shortest DPD interval, at
        least LIVENESS_POLL_MIN) the packet counters of the tunnels' XFRM interfaces are read
        (what their SAs decrypted and encrypted, one dump for all tunnels: issue 13) and a
        tunnel whose inbound count moved has its DPD deferred (engine.traffic_seen), so busy
        tunnels exchange no empty INFORMATIONAL messages. The packets arrived after the
        previous poll: that is the time reported as heard, so DPD's timeout (counted from the
        last time the peer was heard, appliance/ike/liveness.py) is never late by a poll
        period. An outbound count that moved tells the engine ESP went out
        (engine.traffic_sent): behind a NAT, a tunnel that sends needs no NAT keepalives
        (RFC 3948 §2.3)."""
        last: dict[str, tuple[int, int]] = {}
        polled = self.clock()
        while True:
            intervals = [p.ike.dpd.interval for p in self.plans.values() if p.ike.dpd.interval > 0]
            await asyncio.sleep(max(LIVENESS_POLL_MIN, min([LIVENESS_POLL, *(i / 4 for i in intervals)])))
            if self.engine is None:
                continue
            since, polled = polled, self.clock()
            seen: dict[str, tuple[int, int]] = await self._dp(self.worker.traffic)
            moved_in = {name for name, (rx, _tx) in seen.items() if name in last and rx > last[name][0]}
            moved_out = {name for name, (_rx, tx) in seen.items() if name in last and tx > last[name][1]}
            last = seen
            for name in moved_in:
                if name in self.plans:
                    self._engine_call(lambda now, n=name: self.engine.traffic_seen(n, now, heard_at=since))
            for name in moved_out:   # outbound ESP keeps a NAT mapping: no keepalive needed
                if name in self.plans:
                    self._engine_call(lambda now, n=name: self.engine.traffic_sent(n, now))

    async def _shutdown(self) -> None:
        reason = self._stop_reason
        sdnotify.stopping(f"stopping ({reason})")
        log.info("stopping (%s)", reason)
        self.bus.publish("daemon_stopping", None, reason=reason)
        for st in self.state.values():
            st.cancel_retry()
        for task in self._tasks:
            task.cancel()
        delete = self.config.appliance.delete_on_shutdown if self.config else True
        if self.bgp is not None:
            await self.bgp.stop(flush=delete)
            self.bgp = None
        if delete and self.engine is not None:
            for name in list(self.plans):
                self._engine_call(lambda now, n=name: self.engine.terminate(n, now))
            deadline = self.clock() + SHUTDOWN_WAIT
            while self.engine.sas() and self.clock() < deadline:
                await asyncio.sleep(0.05)
            left = self.engine.sas()
            if left:
                log.warning("%d IKE SA(s) not confirmed deleted by their peers within %.0f s", len(left),
                            SHUTDOWN_WAIT)
            await self._dp_drain()
            problems = await self._dp(self.worker.teardown)
            for p in problems:
                log.error("removing kernel state: %s", p)
            log.info("kernel state of this appliance removed")
        elif not delete:
            log.info("delete_on_shutdown is false: SAs stay in the kernel until the next start")
        await self._close()

    async def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.address_watch is not None:
            self.address_watch.close()
            self.address_watch = None
        if self.selector is not None:
            self.selector.close()
            self.selector = None
        if self.sockets is not None:
            self.sockets.close()
        if self.http is not None:
            await self.http.close()
        if self.control is not None:
            await self.control.close()
        with contextlib.suppress(Exception):
            await self._dp(self.worker.close)
        self.executor.shutdown(wait=True)
        self._crl_executor.shutdown(wait=False, cancel_futures=True)
        self._remove_pid_file()

    def _write_pid_file(self) -> None:
        path = self.run_dir / PID_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.chmod(tmp, 0o644)
        tmp.replace(path)
        self._pid_file = path

    def _remove_pid_file(self) -> None:
        if self._pid_file is None:
            return
        with contextlib.suppress(OSError):
            if self._pid_file.read_text().strip() == str(os.getpid()):
                self._pid_file.unlink()
        self._pid_file = None

    @staticmethod
    def _register_secrets(config: Config) -> None:
        for t in config.tunnels.values():
            psk = getattr(t.auth, "psk", None)
            if psk is not None:
                register_secret(psk)
            key = getattr(t.auth, "key_pem", None)
            if key is not None:
                register_secret(key)

    # ================================================================== engine I/O
    def _datagram(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        assert self.engine is not None
        try:
            self.engine.receive_datagram(data, src, dst, self.clock())
        finally:
            # what the engine produced before a failure still goes out, and the timer is
            # re-armed; IkeSockets logs the failure with the datagram's summary
            self._flush()

    def _engine_call(self, fn: Callable[[float], Any]) -> Any:
        """Run an engine command (``fn(now)``) and act on what it produced."""
        try:
            return fn(self.clock())
        finally:
            self._flush()

    def _on_timer(self) -> None:
        self._timer = None
        if self.engine is not None:
            now = self.clock()
            self.engine.set_wall_offset(time.time() - now)   # follows wall-clock steps
            try:
                self.engine.handle_timer(now)
            except Exception:  # noqa: BLE001 - the timer must be re-armed whatever happened
                log.exception("IKE engine failed handling its timer")
                self._flush(not_before=now + 1.0)
                return
            self._flush()

    def _flush(self, not_before: float | None = None) -> None:
        engine = self.engine
        if engine is None:
            return
        datagrams = engine.datagrams_to_send()
        while (e := engine.next_event()) is not None:
            try:
                self._on_event(e)
            except Exception:  # noqa: BLE001 - a bug in one event's handling must not stop the engine
                log.exception("handling %s failed", type(e).__name__)
        self._send(datagrams)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = engine.get_timer()
        if when is not None and not_before is not None:
            when = max(when, not_before)    # after a failure: no busy loop on a due timer
        if when is not None and self._loop is not None:
            self._timer = self._loop.call_later(max(0.0, when - self.clock()), self._on_timer)

    def _send(self, datagrams: list) -> None:
        """Send what the engine produced - but a tunnel's datagrams only once the kernel holds
        what the events before them asked for. The peer acts on our messages at once: it sends
        on a new Child SA when our IKE_AUTH or CREATE_CHILD_SA answer arrives, and removes an
        old inbound SA when our DELETE or its answer does (RFC 7296 §1.4.1, §2.8). Sent before
        the data plane finished, those messages would let traffic reach SAs we have not
        installed yet or have just stopped using; so while a tunnel has data plane jobs
        pending, its datagrams wait (in order) behind them. Other tunnels' datagrams, and those
        of SAs whose tunnel is not decided yet (IKE_SA_INIT answers), do not wait: one tunnel's
        kernel work never delays another's answers (issue 13)."""
        for d in datagrams:
            name = None if d.keepalive or self.engine is None else self.engine.tunnel_of_datagram(d.data)
            if name is not None and (self._dp_pending.get(name) or name in self._held):
                self._held.setdefault(name, []).append(d)
            else:
                self._transmit([d])

    def _transmit(self, datagrams: list) -> None:
        if self.sockets is None:
            return
        for d in datagrams:
            # a NAT keepalive is the bare 0xFF octet, without the non-ESP marker (RFC 3948 §2.3)
            self.sockets.send(d.data, d.src, d.dst, marker=not d.keepalive)

    def _release_held(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held:
            self._transmit(held)

    def _later(self, fn: Callable[[float], Any]) -> None:
        """An engine command from inside event handling: run it after the current flush."""
        assert self._loop is not None
        self._loop.call_soon(lambda: self._engine_call(fn))

    # ================================================================== events
    def _on_event(self, e: ev.Event) -> None:
        name = e.tunnel
        if isinstance(e, ev.IkeSaAddressesUpdated):
            log.info("IKE SA now between %s and the peer at %s; Child SAs follow (no rekey)", _endpoint(e.local),
                     _endpoint(e.remote), extra={"tunnel": name})
            self.bus.publish("ike_sa_moved", name, local=_endpoint(e.local), remote=_endpoint(e.remote),
                             spi_i=_spi8(e.spi_i), spi_r=_spi8(e.spi_r))
            self._dp_submit(e)
            return
        if isinstance(e, (ev.ChildSaInstalled, ev.ChildSaOutboundInstalled, ev.ChildSaDeleted)):
            self._dp_submit(e)
            if isinstance(e, ev.ChildSaDeleted):
                self.bus.publish("child_sa_down", name, spi_in=format_spi(e.spi_in), spi_out=format_spi(e.spi_out),
                                 reason=e.reason)
                self.metrics.forget_sa(name, e.spi_in, e.spi_out)
            return
        if isinstance(e, ev.IkeSaUp):
            st = self.state.get(name)
            if st is not None:
                st.auth_error = None
                for sa in self.engine.sas(name) if self.engine is not None else ():
                    if sa.spi_i == e.spi_i and sa.spi_r == e.spi_r:
                        st.peer_cert_not_after = sa.peer_cert_not_after
            log.info("IKE SA up with %s (%s)", _endpoint(e.remote), e.remote_id,
                     extra={"tunnel": name, "spi_i": int.from_bytes(e.spi_i, "big"),
                            "spi_r": int.from_bytes(e.spi_r, "big"), "proposal": e.proposal})
            self.bus.publish("ike_sa_up", name, role="initiator" if e.initiator else "responder",
                             local=_endpoint(e.local), remote=_endpoint(e.remote), remote_id=e.remote_id,
                             spi_i=_spi8(e.spi_i), spi_r=_spi8(e.spi_r), proposal=e.proposal)
        elif isinstance(e, ev.IkeSaRekeyed):
            log.info("IKE SA rekeyed", extra={"tunnel": name, "spi_i": int.from_bytes(e.new_spi_i, "big")})
            self.metrics.rekeys.inc(tunnel=name, kind="ike")
            self.bus.publish("ike_sa_rekeyed", name, old_spi_i=_spi8(e.old_spi_i), old_spi_r=_spi8(e.old_spi_r),
                             spi_i=_spi8(e.new_spi_i), spi_r=_spi8(e.new_spi_r), proposal=e.proposal)
        elif isinstance(e, ev.IkeSaDown):
            log.info("IKE SA down: %s", e.reason, extra={"tunnel": name})
            self.bus.publish("ike_sa_down", name, spi_i=_spi8(e.spi_i), spi_r=_spi8(e.spi_r), reason=e.reason)
            st = self.state.get(name)
            if st is not None and st.reconnect_on_down:
                st.reconnect_on_down = False
                self._later(lambda now: self._connect_if_configured(name, now))
        elif isinstance(e, ev.IkeSaFailed):
            log.warning("IKE SA not established: %s", e.reason, extra={"tunnel": name})
            self.bus.publish("ike_sa_failed", name, reason=e.reason)
        elif isinstance(e, ev.AuthFailed):
            log.warning("authentication failed: %s", e.reason, extra={"tunnel": name})
            st = self.state.get(name)
            if st is not None:
                st.auth_error = e.reason
            self.metrics.auth_failures.inc(tunnel=name if name in self.plans else "")
            self.bus.publish("auth_failed", name or None, reason=e.reason)
        elif isinstance(e, ev.PeerDead):
            log.warning("peer dead (no answer to liveness checks); action %s", e.action, extra={"tunnel": name})
            self.metrics.dpd_failures.inc(tunnel=name)
            plan = self.plans.get(name)
            if self.bgp is not None:
                self.bgp.tunnel_down(name, "peer dead (DPD)")
            self.bus.publish("dpd_timeout", name, remote=str(plan.tunnel.remote) if plan else None,
                             reason=f"no answer to liveness checks; action {e.action}")
        elif isinstance(e, ev.ChildSaRekeyed):
            self.metrics.rekeys.inc(tunnel=name, kind="child")
            self.bus.publish("child_sa_rekeyed", name, old_spi_in=format_spi(e.old_spi_in),
                             old_spi_out=format_spi(e.old_spi_out), spi_in=format_spi(e.new_spi_in),
                             spi_out=format_spi(e.new_spi_out))
        elif isinstance(e, ev.ChildSaFailed):
            log.warning("Child SA not created: %s", e.reason, extra={"tunnel": name})
            self.bus.publish("child_sa_failed", name, reason=e.reason)

    def _connect_if_configured(self, name: str, now: float) -> None:
        plan = self.plans.get(name)
        if plan is not None and plan.ike.start and self.engine is not None:
            self.engine.connect(name, now)

    # ================================================================== data plane
    async def _dp(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` in the data plane thread, after every job queued before it."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self.executor, fn, *args)

    async def _dp_drain(self) -> None:
        await self._dp(lambda: None)

    def _dp_submit(self, e: ev.Event) -> None:
        fut = self.executor.submit(self.worker.apply, e)
        self._dp_outstanding += 1
        self._dp_pending[e.tunnel] += 1
        loop = self._loop
        assert loop is not None

        def done(f: concurrent.futures.Future) -> None:
            with contextlib.suppress(RuntimeError):   # loop closed at exit
                loop.call_soon_threadsafe(self._dp_finished, e, f)
        fut.add_done_callback(done)

    def _dp_finished(self, e: ev.Event, fut: concurrent.futures.Future) -> None:
        # jobs finish in submission order (one thread), so at zero every job before the held
        # datagrams is done
        self._dp_outstanding -= 1
        self._dp_pending[e.tunnel] -= 1
        try:
            self._dp_done(e, fut)
        finally:
            if self._dp_pending[e.tunnel] <= 0:
                del self._dp_pending[e.tunnel]
                self._release_held(e.tunnel)

    def _dp_done(self, e: ev.Event, fut: concurrent.futures.Future) -> None:
        try:
            r: DpResult = fut.result()
        except Exception as exc:  # noqa: BLE001 - a bug in the worker: report like a failure
            log.exception("data plane job for %s failed", type(e).__name__)
            r = DpResult("failed", e.tunnel, error=f"internal error: {exc}")
        name = r.tunnel
        st = self.state.get(name)
        if r.kind == "failed":
            self._dp_failed(name, r.error or "unknown error", e)
            return
        for p in r.route_problems:
            log.error("route %s", p, extra={"tunnel": name})
            self.bus.publish("dataplane_error", name, message=f"route {p}")
        if st is None:
            return
        if r.kind == "up":
            st.up_since, st.spis, st.error, st.failures = self.clock(), (r.spi_in, r.spi_out), None, 0
            st.routes = r.routes
            mtu = r.mtu.mtu if r.mtu else None
            log.info("tunnel up on %s (MTU %s): Child SA %s/%s installed in %.2f s", r.interface, mtu,
                     format_spi(r.spi_in), format_spi(r.spi_out), r.seconds, extra={"tunnel": name})
            self.bus.publish("child_sa_up", name, spi_in=format_spi(r.spi_in), spi_out=format_spi(r.spi_out),
                             proposal=self._child_proposal(name, r.spi_in), interface=r.interface)
            for prefix in r.routes:
                self.bus.publish("route_added", name, prefix=str(prefix), interface=r.interface)
            self.bus.publish("tunnel_state", name, state="up", interface=r.interface)
            self.metrics.tunnel_up.set(1, tunnel=name)
            if self.bgp is not None:
                self.bgp.tunnel_up(name)
        elif r.kind in ("rekeyed", "outbound"):
            if r.kind == "outbound" or (isinstance(e, ev.ChildSaInstalled) and e.outbound):
                st.spis = (r.spi_in, r.spi_out)
            st.error, st.failures = None, 0
        elif r.kind == "moved":
            log.info("Child SAs moved to %s - %s (MTU %s)", _endpoint(e.local), _endpoint(e.remote),
                     r.mtu.mtu if r.mtu else None, extra={"tunnel": name})
        elif r.kind == "down":
            self._went_down(name, st, r)

    def _went_down(self, name: str, st: _TunnelState, r: DpResult) -> None:
        st.up_since, st.spis = None, None
        if self.bgp is not None:
            self.bgp.tunnel_down(name, "Child SA down")
        for prefix in st.routes:
            self.bus.publish("route_withdrawn", name, prefix=str(prefix), interface=r.interface)
        st.routes = ()
        log.info("tunnel down on %s", r.interface, extra={"tunnel": name})
        self.bus.publish("tunnel_state", name, state="down", interface=r.interface)
        self.metrics.tunnel_up.set(0, tunnel=name)

    def _child_proposal(self, name: str, spi_in: int) -> str | None:
        if self.engine is None:
            return None
        for sa in self.engine.sas(name):
            for c in sa.children:
                if c.spi_in_int == spi_in:
                    return str(c.proposal)
        return None

    def _dp_failed(self, name: str, error: str, e: ev.Event) -> None:
        """The kernel did not take a Child SA change: say so, delete the IKE SA (DELETE to the
        peer: SAs the kernel does not hold would black-hole traffic) and try again later."""
        st = self.state.get(name)
        log.error("data plane: %s", error, extra={"tunnel": name})
        self.bus.publish("dataplane_error", name, message=error)
        if st is None or self.engine is None or name not in self.plans:
            return
        if isinstance(e, ev.ChildSaDeleted):
            # a teardown that did not finish: the data plane forgot the pair anyway and says
            # what it left behind; the IKE side is already going down - nothing to retry
            if st.up_since is not None and not self._engine_has_child(name):
                self._went_down(name, st, DpResult("down", name, interface=self.plans[name].interface.ifname))
            return
        st.error = error
        st.failures += 1
        self.bus.publish("tunnel_state", name, state="error", reason=error)
        if st.up_since is not None:
            # what is left in the kernel goes too: routes first
            fut = self.executor.submit(self.worker.down, name)
            fut.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._after_failure_down, name, f))
        self._engine_call(lambda now: self.engine.terminate(name, now))
        plan = self.plans[name]
        st.cancel_retry()
        if plan.ike.start:
            delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (st.failures - 1))
            log.info("initiating again in %.0f s", delay, extra={"tunnel": name})
            assert self._loop is not None
            st.retry = self._loop.call_later(delay, self._retry, name)

    def _engine_has_child(self, name: str) -> bool:
        return self.engine is not None and any(sa.children_in_use() for sa in self.engine.sas(name))

    def _after_failure_down(self, name: str, fut: concurrent.futures.Future) -> None:
        st = self.state.get(name)
        r = fut.result()
        if st is not None and r.kind == "down":
            self._went_down(name, st, r)

    def _retry(self, name: str) -> None:
        st = self.state.get(name)
        if st is None:
            return
        st.retry = None
        if name in self.plans and self.engine is not None:
            self._engine_call(lambda now: self.engine.connect(name, now))

    def _hook_result_threadsafe(self, r) -> None:
        if self._loop is None or r.ok:
            return
        text = describe_hook(r)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(lambda: self.bus.publish("hook_failed", r.tunnel, message=text))

    # ================================================================== reload
    def _sighup(self) -> None:
        async def run() -> None:
            try:
                result = await self.reload()
                log.info("reloaded on SIGHUP: %s", result)
            except ControlError as e:
                log.error("reload on SIGHUP refused: %s", e.message)
        asyncio.ensure_future(run())

    async def reload(self) -> dict[str, list[str]]:
        """Apply the config file again, atomically (see the module docstring)."""
        async with self._reload_lock:
            try:
                config = load_config(self.config_path)
                plans = plan_tunnels(config)
            except ConfigError as e:   # includes ConfigReadError
                issues = [i.as_dict() for i in e.issues]
                log.error("reload refused: %d problem(s) in %s; nothing was changed", len(issues), self.config_path)
                for issue in e.issues:
                    log.error("%s", str(issue))
                raise ControlError("invalid_config", f"the configuration has {len(issues)} problem(s); "
                                                     f"nothing was changed", {"issues": issues}) from None
            assert self.engine is not None
            sdnotify.reloading()
            try:
                return await self._apply(config, plans)
            finally:
                sdnotify.ready(f"{len(self.plans)} tunnels")

    async def _apply(self, config: Config, plans: dict[str, TunnelPlan]) -> dict[str, list[str]]:
        assert self.engine is not None
        d = diff_plans(self.plans, plans)
        self._register_secrets(config)
        engine = self.engine
        # 1. the engine: delete what goes (DELETE to the peers)
        for name in (*d.removed, *d.changed):
            st = self.state.get(name)
            if st is not None:
                st.cancel_retry()
            self._engine_call(lambda now, n=name: engine.remove_tunnel(n, now))
        # 2. the kernel: routes, SAs, policies and interfaces of what goes; interfaces of what comes
        for name in (*d.removed, *d.changed):
            for p in await self._dp(self.worker.remove_tunnel, name):
                log.error("removing tunnel: %s", p, extra={"tunnel": name})
            if self.bgp is not None:
                self.bgp.tunnel_down(name, "removed from the configuration" if name in d.removed
                                     else "changed in the configuration")
            st = self.state.pop(name, None)
            if st is not None and st.up_since is not None:
                for prefix in st.routes:
                    self.bus.publish("route_withdrawn", name, prefix=str(prefix), interface=None)
                self.bus.publish("tunnel_state", name, state="down", reason="removed from the configuration"
                                 if name in d.removed else "changed in the configuration")
            self.metrics.forget_tunnel(name)
        self.config = config
        if self.engine is not None:
            self.engine.dos = config.appliance.dos_protection
        await self._static_metric(config)
        await self._reload_bgp(config)
        for name in (*d.changed, *d.added):
            err = await self._dp(self.worker.add_tunnel, plans[name])
            if err:
                log.error("data plane: %s", err, extra={"tunnel": name})
                self.bus.publish("dataplane_error", name, message=err)
        # 3. the engine: new and changed tunnels start (changed ones once their old IKE SA is gone)
        self.plans = dict(plans)
        for name in (*d.changed, *d.added):
            self.state[name] = _TunnelState(reconnect_on_down=name in d.changed)
            self._engine_call(lambda now, n=name: engine.add_tunnel(plans[n].ike))
            if plans[name].ike.start:
                self._engine_call(lambda now, n=name: engine.connect(n, now))
        result = {"added": list(d.added), "removed": list(d.removed), "changed": list(d.changed),
                  "unchanged": list(d.unchanged)}
        log.info("configuration reloaded: %d added, %d removed, %d changed, %d unchanged", len(d.added),
                 len(d.removed), len(d.changed), len(d.unchanged))
        self.bus.publish("config_reloaded", None, added=result["added"], removed=result["removed"],
                         changed=result["changed"])
        return result

    async def _static_metric(self, config: Config) -> None:
        """bgp.prefer_static: static routes ahead of BGP's (the kernel's default metric) or behind
        them (appliance/static_routes.py); on a reload that flips it, the installed ones move."""
        prefer = config.bgp.prefer_static if config.bgp is not None else True
        try:
            problems = await self._dp(self.worker.set_static_metric, static_metric(prefer))
        except Exception as e:  # noqa: BLE001 - routes keep their old metric; say so
            problems = [f"static routes: {e}"]
        for p in problems:
            log.error("route %s", p)
            self.bus.publish("dataplane_error", None, message=f"route {p}")

    async def _reload_bgp(self, config: Config) -> None:
        if self.bgp is not None and not bgp_wanted(config):
            await self.bgp.stop()
            self.bgp = None
        elif self.bgp is not None:
            await self.bgp.reload(config, {n for n, st in self.state.items() if st.up_since is not None})
        else:
            await self._start_bgp(config)

    # ================================================================== control (appliance/control_handlers.py)
    async def _counters(self) -> dict[str, Any]:
        try:
            return await self._dp(self.worker.counters)
        except Exception as e:  # noqa: BLE001 - status without counters beats no status
            log.debug("counters: %s", e)
            return {}

    def _tunnel_state_name(self, name: str) -> str:
        st = self.state.get(name)
        if st is not None and st.up_since is not None:
            return "up"
        if st is not None and st.auth_error is not None:
            return "auth-failed"        # until an IKE SA comes up (the reason: `last_error`)
        if st is not None and st.error is not None:
            return "error"
        if self.engine is not None and self.engine.sas(name):
            return "connecting"
        return "down"

    def _cert_days(self, name: str, plan: TunnelPlan) -> dict[str, int | None]:
        """Whole days until our certificate and the peer's (as of its last authentication)
        expire (negative: expired), or None."""
        wall = time.time()
        own = peer = None
        cert = plan.ike.cert
        st = self.state.get(name)
        if cert is not None:
            own = math.floor((cert.not_after() - wall) / 86400)
            if st is not None and st.peer_cert_not_after is not None:
                peer = math.floor((st.peer_cert_not_after - wall) / 86400)
        return {"cert_days_left": own, "peer_cert_days_left": peer}

    # ================================================================== metrics
    async def _collect(self) -> None:
        if self.bgp is not None:
            self.bgp.collect_metrics()
        if self.engine is None:
            return
        sas = self.engine.sas()
        ike = Counter(sa.state.value for sa in sas if sa.state != IkeState.CONNECTING)
        child = Counter(c.state.value for sa in sas for c in sa.children if c.alive)
        self.metrics.set_sa_states(dict(ike), dict(child), sum(1 for sa in sas if sa.state == IkeState.CONNECTING))
        self.metrics.set_dos(self.engine.dos_counters, self.engine.cookies_required)
        for name, plan in self.plans.items():
            self.metrics.tunnel_up.set(1 if self._tunnel_state_name(name) == "up" else 0, tunnel=name)
            days = self._cert_days(name, plan)
            for side, key in (("local", "cert_days_left"), ("peer", "peer_cert_days_left")):
                if days[key] is None:
                    self.metrics.cert_days_left.remove_matching(tunnel=name, side=side)
                else:
                    self.metrics.cert_days_left.set(days[key], tunnel=name, side=side)
        for name, cs in (await self._counters()).items():
            for c in cs:
                if c.inbound is None and c.outbound is None:
                    continue
                self.metrics.set_sa_traffic(
                    name, spi_in=c.spi_in, spi_out=c.spi_out,
                    bytes_in=c.inbound.bytes if c.inbound else 0, packets_in=c.inbound.packets if c.inbound else 0,
                    bytes_out=c.outbound.bytes if c.outbound else 0,
                    packets_out=c.outbound.packets if c.outbound else 0)


# ====================================================================== command line
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="isthmusd")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=DEFAULT_CONFIG_PATH,
              show_default=True, help="Configuration file.")
@click.option("--run-dir", default=None, envvar="ISTHMUS_RUN_DIR",
              help="Directory for the control socket and pid file [default: $ISTHMUS_RUN_DIR or /run/isthmus].")
@click.option("--metrics-listen", default="127.0.0.1:9477", show_default=True, metavar="HOST:PORT|off",
              help="Where Prometheus metrics are served (GET /metrics).")
@click.option("--log-format", type=click.Choice(["auto", "json", "human"]), default="auto", show_default=True,
              help="auto: JSON lines unless stdout is a terminal (under systemd: JSON).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              default="info", show_default=True)
@click.option("--hooks-dir", default=DEFAULT_HOOKS_DIR, show_default=True,
              help="User hooks run on tunnel up/rekey/down (see docs/dataplane.md); ignored if absent.")
def main(config_file: str, run_dir: str | None, metrics_listen: str, log_format: str, log_level: str,
         hooks_dir: str) -> None:
    """Run the Isthmus IKEv2 appliance daemon (route-based tunnels on XFRM interfaces)."""
    try:
        listen = parse_listen(metrics_listen)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--metrics-listen") from None
    setup_logging(log_level, log_format)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)   # its debug output is per netlink message
    daemon = Daemon(config_file, run_dir, metrics_listen=listen, hooks_dir=hooks_dir)
    profiling.profile_this_thread("main")   # ISTHMUS_PROFILE only (appliance/profiling.py)
    try:
        status = asyncio.run(daemon.run())
    except StartError as e:
        click.echo(f"isthmusd: {e}", err=True)
        sys.exit(1)
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
