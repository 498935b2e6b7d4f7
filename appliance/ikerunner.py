"""A thin asyncio shell around the sans-IO IKE engine: UDP sockets, a timer, events out.

`IkeRunner` can be embedded in a larger asyncio program; `python -m appliance.ikerunner
CONFIG.json` runs it standalone (used by the host tests to put one engine in each network
namespace, by interop tests against strongSwan and by the bench): events are printed as JSON
lines on stdout, commands are read as lines on stdin (`rekey_child NAME`, `rekey_ike NAME`, `terminate NAME`,
`connect NAME`, `status`, `quit`).

Sockets: one per (address, port) to listen on. On the NAT-T port (4500 by default) IKE
messages carry the 4-octet non-ESP marker (RFC 3948 §2.2), which is stripped on receipt and
added on sending; the socket is marked UDP_ENCAP_ESPINUDP where the kernel supports it so ESP
in UDP goes to the kernel. Datagrams are sent from the socket bound to the source the engine
chose.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Callable

from appliance.ike import events as ev
from appliance.ike.engine import IkeEngine
from appliance.ike.message import datagram_summary
from appliance.ike.policy import DosProtection, DpdConfig, Identity, RetransmitConfig, TunnelConfig
from appliance.ike.proposals import parse_proposals

log = logging.getLogger("isthmus.ikerunner")

NON_ESP_MARKER = b"\x00\x00\x00\x00"
SOL_UDP = 17
UDP_ENCAP = 100
UDP_ENCAP_ESPINUDP = 2


@dataclass(frozen=True)
class Listen:
    address: str
    port: int
    natt: bool = False   # the NAT-T port: non-ESP marker in front of IKE messages


class IkeRunner:
    """Feeds an IkeEngine from UDP sockets and its timer; reports events to `on_event`.

    Per wake-up of the event loop a readable socket is drained (up to `batch` datagrams, each
    handed to the engine in arrival order; after each one the engine's events are reported and
    then its datagrams sent), and the timer is re-armed once for the whole batch. The sockets are plain
    non-blocking sockets watched with `loop.add_reader` (no asyncio transport/protocol objects
    per datagram); a send that would block is queued and retried when the socket is writable.
    """

    #: Datagrams read from one socket per event-loop wake-up (then others get their turn).
    batch = 64
    #: After the engine failed in handle_timer, look again no sooner than this (no busy loop).
    timer_retry = 1.0

    def __init__(self, engine: IkeEngine, listen: list[Listen], on_event: Callable[[ev.Event], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.listen = listen
        self.on_event = on_event
        self.clock = clock
        self._socks: dict[tuple[str, int], socket.socket] = {}
        self._natt: dict[tuple[str, int], bool] = {}
        self._backlog: dict[socket.socket, deque[tuple[bytes, tuple[str, int]]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for li in self.listen:
            self.add_listen(li)
        self.engine.set_wall_offset(time.time() - self.clock())   # certificate validity
        self.engine.start(self.clock())
        self._flush()

    def add_listen(self, li: Listen) -> None:
        """Open (once) the socket for `li` (our new address, MOBIKE)."""
        assert self._loop is not None
        if (li.address, li.port) in self._socks:
            return
        family = socket.AF_INET6 if ":" in li.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if li.natt:
                try:
                    sock.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
                except OSError as e:  # e.g. a kernel without ESP-in-UDP: IKE still works
                    log.info("UDP_ENCAP on %s:%d not available: %s", li.address, li.port, e)
            sock.bind((li.address, li.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        key = (li.address, li.port)
        self._socks[key] = sock
        self._natt[key] = li.natt
        self._loop.add_reader(sock.fileno(), self._readable, sock, li)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        for sock in self._socks.values():
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
                if sock in self._backlog:
                    self._loop.remove_writer(sock.fileno())
            sock.close()
        self._socks.clear()
        self._backlog.clear()

    # commands ------------------------------------------------------------------------
    def command(self, fn: Callable[[float], None]) -> None:
        """Run an engine command (e.g. `lambda now: engine.rekey_child(name, now)`); its
        exceptions (LookupError for an unknown tunnel...) reach the caller, after the flush."""
        try:
            fn(self.clock())
        finally:
            self._flush()

    # internals -----------------------------------------------------------------------
    def _readable(self, sock: socket.socket, li: Listen) -> None:
        engine, clock = self.engine, self.clock
        local = (li.address, li.port)
        natt = li.natt
        for _ in range(self.batch):
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:   # an ICMP error queued on the socket; the next read goes on
                log.debug("socket %s:%d: %s", li.address, li.port, e)
                continue
            if natt:
                if data[:4] != NON_ESP_MARKER:
                    continue   # ESP the kernel did not take, or a NAT keepalive (0xff)
                data = data[4:]
            try:
                engine.receive_datagram(data, (addr[0], addr[1]), local, clock())
            except Exception:  # noqa: BLE001 - never raises for input; a bug must cost one datagram only
                log.exception("IKE engine failed on %s from %s:%d", datagram_summary(data), addr[0], addr[1])
            self._deliver()   # answer at once: the peer works on it while we read on
        self._arm_timer(engine.get_timer())

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        now = self.clock()
        self.engine.set_wall_offset(time.time() - now)   # follows wall-clock steps
        try:
            self.engine.handle_timer(now)
        except Exception:  # noqa: BLE001 - the timer must be re-armed whatever happened
            log.exception("IKE engine failed handling its timer")
            self._deliver()
            when = self.engine.get_timer()
            self._arm_timer(None if when is None else max(when, now + self.timer_retry))
            return
        self._flush()

    def _flush(self) -> None:
        self._deliver()
        self._arm_timer(self.engine.get_timer())

    def _deliver(self) -> None:
        """Events first (the consumer installs a new inbound SA before our response lets the
        peer use it), then the datagrams."""
        engine = self.engine
        on_event = self.on_event
        while (e := engine.next_event()) is not None:
            try:
                on_event(e)
            except Exception:  # noqa: BLE001 - a failing consumer must not stop the engine
                log.exception("event consumer failed on %s", type(e).__name__)
        for d in engine.datagrams_to_send():
            sock = self._socks.get(d.src) or self._any_sock(d.src[1])
            if sock is None:
                log.warning("no socket for %s:%d; datagram to %s:%d dropped", *d.src, *d.dst)
                continue
            natt = self._natt.get(d.src, d.src[1] == 4500) and not d.keepalive   # RFC 3948 §2.3: bare 0xFF
            self._sendto(sock, NON_ESP_MARKER + d.data if natt else d.data, d.dst)

    def _arm_timer(self, when: float | None) -> None:
        """Keep one loop timer at or before the engine's next timer. An armed timer that is
        earlier than needed stays (waking the engine early is harmless: it re-arms)."""
        if when is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        if self._timer is not None:
            assert self._timer_at is not None
            if self._timer_at <= when:
                return
            self._timer.cancel()
        if self._loop is None:
            return
        self._timer_at = when
        self._timer = self._loop.call_later(max(0.0, when - self.clock()), self._on_timer)

    def _sendto(self, sock: socket.socket, data: bytes, dst: tuple[str, int]) -> None:
        backlog = self._backlog.get(sock)
        if backlog is not None:       # keep the order: queue behind what is waiting
            backlog.append((data, dst))
            return
        try:
            sock.sendto(data, dst)
        except (BlockingIOError, InterruptedError):
            self._backlog[sock] = deque([(data, dst)])
            if self._loop is not None:
                self._loop.add_writer(sock.fileno(), self._writable, sock)
        except OSError as e:          # e.g. no route to the peer: IKE retransmits
            log.debug("sending to %s:%d: %s", dst[0], dst[1], e)

    def _writable(self, sock: socket.socket) -> None:
        backlog = self._backlog.get(sock)
        while backlog:
            data, dst = backlog[0]
            try:
                sock.sendto(data, dst)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("sending to %s:%d: %s", dst[0], dst[1], e)
            backlog.popleft()
        self._backlog.pop(sock, None)
        if self._loop is not None:
            self._loop.remove_writer(sock.fileno())

    def _any_sock(self, port: int) -> socket.socket | None:
        for (addr, p), sock in self._socks.items():
            if p == port and addr in ("0.0.0.0", "::"):
                return sock
        return None


# --------------------------------------------------------------------------- standalone

_KEY_FIELDS = {"encr_key_in", "encr_key_out", "integ_key_in", "integ_key_out"}


def event_to_json(e: ev.Event) -> dict:
    """An event as JSON: bytes as hex, keys replaced by a SHA-256 fingerprint (first 8 octets)
    so tests can compare keys with a peer's without any key being printed."""
    cls = type(e)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    out: dict = {"event": cls.__name__}
    for name in names:
        v = getattr(e, name)
        if name in _KEY_FIELDS:
            out[name + "_sha256"] = hashlib.sha256(v).hexdigest()[:16] if v else ""
        elif isinstance(v, bytes):
            out[name] = v.hex()
        elif isinstance(v, tuple):
            out[name] = list(v)
        else:
            out[name] = v
    return out


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def sa_status(sa) -> dict:
    """What the `status` command says about one IKE SA (addresses and NAT-T state)."""
    return {"tunnel": sa.tunnel, "spi_i": sa.spi_i.hex(), "spi_r": sa.spi_r.hex(), "state": sa.state.value,
            "local": list(sa.local), "remote": list(sa.remote), "nat_local": sa.nat_local,
            "nat_remote": sa.nat_remote, "nat_fake": sa.nat_fake, "udp_encap": sa.udp_encap,
            "keepalives_sent": sa.keepalives_sent, "mobike": sa.mobike, "mobike_moves": sa.mobike_moves}


def tunnel_from_json(d: dict) -> TunnelConfig:
    """A TunnelConfig from the runner's JSON (names as in TunnelConfig; `psk_hex` or
    `psk_file`, or `cert` = {certificate, key, ca: [files], crl: [files]}; proposals as
    strongSwan strings; `dpd` as {interval, timeout, action}; `fragmentation` as
    FragmentationConfig's fields)."""
    cert = None
    psk = b""
    if "cert" in d:
        from appliance.ike.certificates import CertCredentials

        c = d["cert"]

        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()
        cas = c["ca"] if isinstance(c["ca"], list) else [c["ca"]]
        cert = CertCredentials.from_pem(read(c["certificate"]), read(c["key"]), [read(x) for x in cas],
                                        [read(x) for x in c.get("crl", [])])
    elif "psk_file" in d:
        with open(d["psk_file"], "rb") as f:
            psk = f.read().strip()
    else:
        psk = bytes.fromhex(d["psk_hex"])
    kw = {k: v for k, v in d.items() if k in {f.name for f in fields(TunnelConfig)}
          and k not in ("psk", "cert", "local_id", "remote_id", "ike_proposals", "esp_proposals", "dpd",
                        "retransmit", "local_ts", "remote_ts", "fragmentation")}
    if "dpd" in d:
        kw["dpd"] = DpdConfig(**d["dpd"])
    if "retransmit" in d:
        kw["retransmit"] = RetransmitConfig(**d["retransmit"])
    if "fragmentation" in d:
        from appliance.ike.policy import FragmentationConfig

        kw["fragmentation"] = FragmentationConfig(**d["fragmentation"])
    for k in ("local_ts", "remote_ts"):
        if k in d:
            kw[k] = tuple(d[k])
    return TunnelConfig(
        local_id=Identity.parse(d["local_id"]),
        remote_id=Identity.parse(d["remote_id"]) if d.get("remote_id") else None,
        psk=psk, cert=cert,
        ike_proposals=tuple(parse_proposals(d.get("ike_proposals", ["aes256gcm16-prfsha384-x25519"]), "ike")),
        esp_proposals=tuple(parse_proposals(d.get("esp_proposals", ["aes256gcm16"]), "esp")),
        **kw)


async def _amain(cfg: dict) -> int:
    tunnels = [tunnel_from_json(t) for t in cfg["tunnels"]]
    # optional "dos": DosProtection's fields ({"cookie_threshold": null, ...}: null is no limit)
    engine = IkeEngine(tunnels, random=os.urandom, dos=DosProtection(**cfg.get("dos", {})))
    listen = [Listen(li["address"], li["port"], li.get("natt", li["port"] == 4500)) for li in cfg["listen"]]
    out = sys.stdout
    loop = asyncio.get_running_loop()
    lines: list[str] = []

    def write_out() -> None:
        if lines:
            out.write("".join(lines))
            out.flush()
            lines.clear()

    def say(obj: dict) -> None:
        lines.append(json.dumps(obj) + "\n")
        write_out()

    def emit(e: ev.Event) -> None:
        # the events of one loop iteration go out in one write
        if not lines:
            loop.call_soon(write_out)
        lines.append(json.dumps(event_to_json(e)) + "\n")

    runner = IkeRunner(engine, listen, emit)
    await runner.start()
    watch = selector = None
    if cfg.get("follow_addresses"):
        # MOBIKE (appliance/mobility.py, as the daemon does): our address changes from rtnetlink
        from appliance.mobility import AddressWatch, SourceSelector

        selector = SourceSelector()
        ports = sorted({(li.port, li.natt) for li in listen})

        def moved() -> None:
            for t in tunnels:
                if not t.mobike or t.remote_addr is None:
                    continue
                new = selector.source_for(t.remote_addr)
                cur = engine.local_address(t.name)
                if new is None or new == cur:
                    continue
                for port, natt in ports:
                    runner.add_listen(Listen(new, port, natt))
                result = []
                runner.command(lambda now, n=t.name, a=new: result.append(engine.local_address_changed(n, a, now)))
                say({"event": "local_address_changed", "tunnel": t.name, "address": new, "previous": cur,
                     "action": result[0] if result else None})
        watch = AddressWatch(loop, moved)
    say({"event": "ready"})
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            words = line.decode().split()
            if not words:
                continue
            cmd, args = words[0], words[1:]
            try:
                if cmd == "quit":
                    break
                if cmd == "status":
                    say({"event": "status", "sas": [repr(sa) for sa in engine.sas()],
                         "detail": [sa_status(sa) for sa in engine.sas()],
                         "half_open": engine.half_open_count, "cookies_required": engine.cookies_required,
                         "dos": dict(engine.dos_counters)})
                elif cmd in ("rekey_child", "rekey_ike", "terminate", "connect"):
                    fn = getattr(engine, cmd)
                    runner.command(lambda now, fn=fn: fn(args[0], now))
                else:
                    raise ValueError(f"unknown command {cmd!r}")
            except (LookupError, ValueError) as e:
                say({"event": "error", "message": str(e)})
    finally:
        for t in tunnels:
            runner.command(lambda now, n=t.name: engine.terminate(n, now))
        await asyncio.sleep(cfg.get("shutdown_wait", 0.5))
        if watch is not None:
            watch.close()
            selector.close()
        runner.close()
        write_out()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.ikerunner",
                                 description="Run the IKE engine on UDP sockets (events as JSON lines).")
    ap.add_argument("config", help="JSON file: {listen: [{address, port}], tunnels: [...]}")
    ap.add_argument("--log-level", default="WARNING")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    with open(a.config) as f:
        cfg = json.load(f)
    return asyncio.run(_amain(cfg))


if __name__ == "__main__":
    sys.exit(main())
