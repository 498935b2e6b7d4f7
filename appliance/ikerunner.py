"""A thin asyncio shell around the sans-IO IKE engine: UDP sockets, a timer, events out.

The daemon (another issue) embeds `IkeRunner`; `python -m appliance.ikerunner CONFIG.json`
runs it standalone (used by the host tests to put one engine in each network namespace and by
interop tests against strongSwan): events are printed as JSON lines on stdout, commands are
read as lines on stdin (`rekey_child NAME`, `rekey_ike NAME`, `terminate NAME`,
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
from dataclasses import dataclass, fields
from typing import Callable

from appliance.ike import events as ev
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import DpdConfig, Identity, RetransmitConfig, TunnelConfig
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


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, runner: "IkeRunner", listen: Listen) -> None:
        self.runner = runner
        self.listen = listen

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        self.runner._received(self.listen, data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("socket %s:%d: %s", self.listen.address, self.listen.port, exc)


class IkeRunner:
    """Feeds an IkeEngine from UDP sockets and its timer; reports events to `on_event`."""

    def __init__(self, engine: IkeEngine, listen: list[Listen], on_event: Callable[[ev.Event], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.listen = listen
        self.on_event = on_event
        self.clock = clock
        self._transports: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self._natt: dict[tuple[str, int], bool] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for li in self.listen:
            family = socket.AF_INET6 if ":" in li.address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if li.natt:
                try:
                    sock.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
                except OSError as e:  # e.g. a kernel without ESP-in-UDP: IKE still works
                    log.info("UDP_ENCAP on %s:%d not available: %s", li.address, li.port, e)
            sock.bind((li.address, li.port))
            transport, _ = await self._loop.create_datagram_endpoint(lambda li=li: _Proto(self, li), sock=sock)
            self._transports[(li.address, li.port)] = transport  # type: ignore[assignment]
            self._natt[(li.address, li.port)] = li.natt
        self.engine.start(self.clock())
        self._flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for t in self._transports.values():
            t.close()
        self._transports.clear()

    # commands ------------------------------------------------------------------------
    def command(self, fn: Callable[[float], None]) -> None:
        """Run an engine command (e.g. `lambda now: engine.rekey_child(name, now)`)."""
        fn(self.clock())
        self._flush()

    # internals -----------------------------------------------------------------------
    def _received(self, li: Listen, data: bytes, src: tuple[str, int]) -> None:
        if li.natt:
            if data[:4] != NON_ESP_MARKER:
                return   # ESP the kernel did not take, or a NAT keepalive (0xff)
            data = data[4:]
        self.engine.receive_datagram(data, src, (li.address, li.port), self.clock())
        self._flush()

    def _on_timer(self) -> None:
        self._timer = None
        self.engine.handle_timer(self.clock())
        self._flush()

    def _flush(self) -> None:
        for d in self.engine.datagrams_to_send():
            t = self._transports.get(d.src) or self._any_transport(d.src[1])
            if t is None:
                log.warning("no socket for %s:%d; datagram to %s:%d dropped", *d.src, *d.dst)
                continue
            natt = self._natt.get(d.src, d.src[1] == 4500)
            t.sendto(NON_ESP_MARKER + d.data if natt else d.data, d.dst)
        while (e := self.engine.next_event()) is not None:
            try:
                self.on_event(e)
            except Exception:  # noqa: BLE001 - a failing consumer must not stop the engine
                log.exception("event consumer failed on %s", type(e).__name__)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.engine.get_timer()
        if when is not None and self._loop is not None:
            delay = max(0.0, when - self.clock())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _any_transport(self, port: int):
        for (addr, p), t in self._transports.items():
            if p == port and addr in ("0.0.0.0", "::"):
                return t
        return None


# --------------------------------------------------------------------------- standalone

_KEY_FIELDS = {"encr_key_in", "encr_key_out", "integ_key_in", "integ_key_out"}


def event_to_json(e: ev.Event) -> dict:
    """An event as JSON: bytes as hex, keys replaced by a SHA-256 fingerprint (first 8 octets)
    so tests can compare keys with a peer's without any key being printed."""
    out: dict = {"event": type(e).__name__}
    for f in fields(e):  # type: ignore[arg-type]
        v = getattr(e, f.name)
        if f.name in _KEY_FIELDS:
            out[f.name + "_sha256"] = hashlib.sha256(v).hexdigest()[:16] if v else ""
        elif isinstance(v, bytes):
            out[f.name] = v.hex()
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def tunnel_from_json(d: dict) -> TunnelConfig:
    """A TunnelConfig from the runner's JSON (names as in TunnelConfig; `psk_hex` or
    `psk_file`; proposals as strongSwan strings; `dpd` as {interval, timeout, action})."""
    if "psk_file" in d:
        with open(d["psk_file"], "rb") as f:
            psk = f.read().strip()
    else:
        psk = bytes.fromhex(d["psk_hex"])
    kw = {k: v for k, v in d.items() if k in {f.name for f in fields(TunnelConfig)}
          and k not in ("psk", "local_id", "remote_id", "ike_proposals", "esp_proposals", "dpd",
                        "retransmit", "local_ts", "remote_ts")}
    if "dpd" in d:
        kw["dpd"] = DpdConfig(**d["dpd"])
    if "retransmit" in d:
        kw["retransmit"] = RetransmitConfig(**d["retransmit"])
    for k in ("local_ts", "remote_ts"):
        if k in d:
            kw[k] = tuple(d[k])
    return TunnelConfig(
        local_id=Identity.parse(d["local_id"]),
        remote_id=Identity.parse(d["remote_id"]) if d.get("remote_id") else None,
        psk=psk,
        ike_proposals=tuple(parse_proposals(d.get("ike_proposals", ["aes256gcm16-prfsha384-x25519"]), "ike")),
        esp_proposals=tuple(parse_proposals(d.get("esp_proposals", ["aes256gcm16"]), "esp")),
        **kw)


async def _amain(cfg: dict) -> int:
    tunnels = [tunnel_from_json(t) for t in cfg["tunnels"]]
    engine = IkeEngine(tunnels, random=os.urandom)
    listen = [Listen(li["address"], li["port"], li.get("natt", li["port"] == 4500)) for li in cfg["listen"]]
    out = sys.stdout

    def emit(e: ev.Event) -> None:
        out.write(json.dumps(event_to_json(e)) + "\n")
        out.flush()

    runner = IkeRunner(engine, listen, emit)
    await runner.start()
    out.write(json.dumps({"event": "ready"}) + "\n")
    out.flush()
    loop = asyncio.get_running_loop()
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
                    out.write(json.dumps({"event": "status", "sas": [repr(sa) for sa in engine.sas()]}) + "\n")
                    out.flush()
                elif cmd in ("rekey_child", "rekey_ike", "terminate", "connect"):
                    fn = getattr(engine, cmd)
                    runner.command(lambda now, fn=fn: fn(args[0], now))
                else:
                    raise ValueError(f"unknown command {cmd!r}")
            except (LookupError, ValueError) as e:
                out.write(json.dumps({"event": "error", "message": str(e)}) + "\n")
                out.flush()
    finally:
        for t in tunnels:
            runner.command(lambda now, n=t.name: engine.terminate(n, now))
        await asyncio.sleep(cfg.get("shutdown_wait", 0.5))
        runner.close()
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
