"""The tunnel hook: inner MTU, MSS clamping and user hooks when a Child SA comes up, is rekeyed,
moves (MOBIKE) or goes down.

On up / rekey / move, :func:`tunnel_mtu` computes the interface MTU from the Child SA's transform,
its encapsulation (ESP in UDP or not), the outer address family and the underlay MTU towards the
peer, with the kernel's own formula (:mod:`appliance.xfrm.mtu`); config can override it. The MTU is
set on the XFRM interface and the TCP MSS for it (MTU - 40 for IPv4, MTU - 60 for IPv6, or the
configured ``mss``) is clamped in both directions in the appliance's nftables table
(:mod:`appliance.xfrm.nft`). On down the interface's clamp rules go.

User hooks
----------
Every executable file in the hooks directory (not starting with ``.``, not ending with ``~``),
in name order, runs on each event with the event name as its only argument and this environment
(and nothing else from the daemon's, so no secret leaks into it); keys are never passed:

=========================  ===================================================================
ISTHMUS_EVENT              ``up``, ``rekey``, ``update`` (endpoints moved) or ``down``
ISTHMUS_TUNNEL             tunnel name
ISTHMUS_INTERFACE          XFRM interface name
ISTHMUS_IFINDEX            its ifindex
ISTHMUS_IF_ID              its if_id (decimal)
ISTHMUS_MTU                interface MTU set (up/rekey/update)
ISTHMUS_MSS4, _MSS6        TCP MSS clamps (up/rekey/update)
ISTHMUS_ADDRESSES          interface addresses, space separated (``169.254.21.1/30 fd00::1/126``)
ISTHMUS_LOCAL, _REMOTE     outer (underlay) addresses
ISTHMUS_ENCAP              ``udp`` (NAT-T, then ISTHMUS_LOCAL_PORT / _REMOTE_PORT) or ``none``
ISTHMUS_SPI_IN, _SPI_OUT   SPIs of the Child SA, ``0x%08x``
ISTHMUS_OLD_SPI_IN, _OUT   rekey: SPIs of the Child SA being replaced
ISTHMUS_ESP                transform, e.g. ``rfc4106(gcm(aes)) key 256 icv 128``
ISTHMUS_NETNS              network namespace the tunnel lives in (empty: the daemon's)
=========================  ===================================================================

Hooks run one at a time in a background thread, in the tunnel's network namespace, each limited
to ``timeout`` seconds (then its process group is killed). A failing, hanging or missing hook is
logged (logger ``isthmus.hooks``) and reported to ``on_result``; it never delays or undoes the
tunnel change that fired it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from appliance.xfrm import nft
from appliance.xfrm.model import ChildSa, TunnelInterface
from appliance.xfrm.mtu import esp_inner_mtu, tcp_mss

log = logging.getLogger("isthmus.hooks")

HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_LIMIT = 4096


@dataclass(frozen=True)
class TunnelMtu:
    """What the hook sets for a tunnel: the interface MTU and the MSS clamps."""

    mtu: int
    mss4: int
    mss6: int
    computed: int        # the kernel-formula value (mtu differs when config overrides it)
    underlay_mtu: int


def tunnel_mtu(iface: TunnelInterface, child: ChildSa, underlay_mtu: int) -> TunnelMtu:
    """MTU and MSS of `iface` carrying `child` over an underlay of `underlay_mtu` bytes."""
    ep = child.endpoints
    computed = esp_inner_mtu(child.algorithms, ep.version, ep.encap is not None, underlay_mtu)
    mtu = iface.mtu if iface.mtu is not None else computed
    if iface.mss is not None:
        mss4, mss6 = iface.mss, iface.mss - 20
    else:
        mss4, mss6 = tcp_mss(mtu, 4), tcp_mss(mtu, 6)
    return TunnelMtu(mtu=mtu, mss4=mss4, mss6=mss6, computed=computed, underlay_mtu=underlay_mtu)


def describe_esp(child: ChildSa) -> str:
    a = child.algorithms
    key_bits = (len(child.keys_out.encryption) - a.cipher.salt_bytes) * 8
    if a.aead:
        return f"{a.encryption} key {key_bits} icv {a.icv_bits}"
    return f"{a.encryption} key {key_bits} {a.integrity} trunc {a.icv_bits}"


def hook_environment(event: str, iface: TunnelInterface, ifindex: int, child: ChildSa | None,
                     mtu: TunnelMtu | None, netns: str | None, old: ChildSa | None = None) -> dict[str, str]:
    """The documented environment of a user hook (never any key)."""
    env = {
        "PATH": HOOK_PATH,
        "LANG": "C.UTF-8",
        "ISTHMUS_EVENT": event,
        "ISTHMUS_TUNNEL": iface.tunnel,
        "ISTHMUS_INTERFACE": iface.ifname,
        "ISTHMUS_IFINDEX": str(ifindex),
        "ISTHMUS_IF_ID": str(iface.if_id),
        "ISTHMUS_ADDRESSES": " ".join(str(a) for a in iface.addresses),
        "ISTHMUS_NETNS": netns or "",
    }
    if mtu is not None:
        env.update(ISTHMUS_MTU=str(mtu.mtu), ISTHMUS_MSS4=str(mtu.mss4), ISTHMUS_MSS6=str(mtu.mss6))
    if child is not None:
        ep = child.endpoints
        env.update(ISTHMUS_LOCAL=str(ep.local), ISTHMUS_REMOTE=str(ep.remote),
                   ISTHMUS_ENCAP="udp" if ep.encap else "none",
                   ISTHMUS_SPI_IN=f"{child.spi_in:#010x}", ISTHMUS_SPI_OUT=f"{child.spi_out:#010x}",
                   ISTHMUS_ESP=describe_esp(child))
        if ep.encap:
            env.update(ISTHMUS_LOCAL_PORT=str(ep.encap.local_port), ISTHMUS_REMOTE_PORT=str(ep.encap.remote_port))
    if old is not None:
        env.update(ISTHMUS_OLD_SPI_IN=f"{old.spi_in:#010x}", ISTHMUS_OLD_SPI_OUT=f"{old.spi_out:#010x}")
    return env


@dataclass(frozen=True)
class HookResult:
    event: str
    tunnel: str
    hook: str
    returncode: int | None     # None: did not run to an exit status (timeout, could not start)
    timed_out: bool
    output: str                # the last OUTPUT_LIMIT bytes of stdout+stderr
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class UserHooks:
    """Runs the executables of a hooks directory on tunnel events, in a worker thread."""

    def __init__(self, directory: str | Path, timeout: float = 10.0, netns: str | None = None,
                 on_result: Callable[[HookResult], None] | None = None):
        self.directory = Path(directory)
        self.timeout = timeout
        self.netns = netns
        self.on_result = on_result
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._worker, name="isthmus-hooks", daemon=True)
        self._thread.start()

    def hooks(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in sorted(self.directory.iterdir())
                if p.is_file() and os.access(p, os.X_OK) and not p.name.startswith(".") and not p.name.endswith("~")]

    def fire(self, env: dict[str, str]) -> None:
        """Queue the hooks for one event (returns at once)."""
        self._queue.put(dict(env))

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued event has run its hooks; False if `timeout` passed first."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=self.timeout + 5)

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            for hook in self.hooks():
                result = self._run(hook, item)
                if result.ok:
                    log.info("hook %s for %s of tunnel %s: ok (%.1f s)", hook.name, result.event, result.tunnel,
                             result.seconds)
                else:
                    why = "timed out" if result.timed_out else f"exit status {result.returncode}"
                    log.warning("hook %s for %s of tunnel %s failed (%s): %s", hook.name, result.event,
                                result.tunnel, why, result.output.strip()[-500:])
                if self.on_result is not None:
                    try:
                        self.on_result(result)
                    except Exception:  # pragma: no cover - a broken callback must not stop the worker
                        log.exception("hook result callback failed")

    def _run(self, hook: Path, env: dict[str, str]) -> HookResult:
        event, tunnel = env.get("ISTHMUS_EVENT", ""), env.get("ISTHMUS_TUNNEL", "")
        argv = nft._netns_prefix(self.netns) + [str(hook), event]
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(argv, env=env, cwd=str(self.directory), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return HookResult(event, tunnel, hook.name, None, False, f"could not start: {e}", 0.0)
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                out, _ = proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:  # a daemonized grandchild holds the pipe open
                proc.kill()
                out = b""
        text = out[-OUTPUT_LIMIT:].decode(errors="replace") if out else ""
        return HookResult(event, tunnel, hook.name, None if timed_out else proc.returncode, timed_out, text,
                          time.monotonic() - t0)
