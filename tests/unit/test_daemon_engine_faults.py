"""The daemon's engine I/O (Daemon._datagram, Daemon._on_timer) with IkeSockets on loopback
and a real engine with an injected fault (issue 12): what the engine produced before failing
still goes out, the timer is re-armed, and the failure is logged once with the datagram's
header summary."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from appliance.daemon import Daemon
from appliance.ike import message as M
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import DpdConfig, Identity, TunnelConfig
from appliance.ikesockets import IkeSockets

LO = "127.0.0.1"
PSK = b"daemon-fault-psk-0123456789"


def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((LO, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def _tunnel(me: int, peer: int, *, start: bool) -> TunnelConfig:
    lid, rid = ("a.example.net", "b.example.net") if start else ("b.example.net", "a.example.net")
    return TunnelConfig(name="t", local_addr=LO, remote_addr=LO, local_port=me, remote_port=peer,
                        local_id=Identity.parse(lid), remote_id=Identity.parse(rid), psk=PSK, if_id=9,
                        start=start, dpd=DpdConfig(interval=0, timeout=30, action="clear"),
                        half_open_timeout=0.3)


class _FailsAfter(IkeEngine):
    """The real engine; it raises *after* handling each datagram (a bug late in processing)."""

    def receive_datagram(self, data, src, dst, now):
        super().receive_datagram(data, src, dst, now)
        raise RuntimeError("injected engine fault")


def test_a_failing_datagram_still_sends_what_the_engine_produced_and_rearms_the_timer(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="isthmus")
    pa, pb = _free_port(), _free_port()

    async def main() -> None:
        d = Daemon(tmp_path / "none.yaml", tmp_path / "run", metrics_listen=None, hooks_dir=None)
        d._loop = asyncio.get_running_loop()
        d.engine = _FailsAfter([_tunnel(pb, pa, start=False)], random=os.urandom)
        d.sockets = IkeSockets(d._datagram, ports=(pb,), natt_port=0, families=(socket.AF_INET,))
        d.sockets.open()
        client = IkeEngine([_tunnel(pa, pb, start=True)], random=os.urandom)
        client.start(0.0)
        (init,) = client.datagrams_to_send()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind((LO, pa))
        peer.setblocking(False)
        got = []
        try:
            peer.sendto(init.data, (LO, pb))
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.0
            while loop.time() < end and not got:
                try:
                    got.append(peer.recv(65536))
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            assert got and M.parse_header(got[0]).exchange_type == 34   # the answer went out
            assert len(d.engine.sas()) == 1 and d._timer is not None    # the timer is armed
            await asyncio.sleep(0.6)
            assert d.engine.sas() == []                                 # and it fired
        finally:
            d.sockets.close()
            d.executor.shutdown(wait=False)
            peer.close()
        return M.parse_header(init.data).spi_i

    spi_i = asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert f"IKE_SA_INIT request 0, SPIs {spi_i.hex()}_i" in errors[0].getMessage()
    assert PSK.decode() not in caplog.text


class _TimerFailsOnce(IkeEngine):
    failed = False

    def handle_timer(self, now):
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected timer fault")
        super().handle_timer(now)


def test_a_failing_timer_is_logged_and_rearmed(tmp_path, caplog):
    from appliance.ike.policy import RetransmitConfig

    caplog.set_level(logging.INFO, logger="isthmus")
    pa, pb = _free_port(), _free_port()

    async def main() -> list[bytes]:
        d = Daemon(tmp_path / "none.yaml", tmp_path / "run", metrics_listen=None, hooks_dir=None)
        d._loop = asyncio.get_running_loop()
        cfg = _tunnel(pa, pb, start=True)
        from dataclasses import replace
        cfg = replace(cfg, retransmit=RetransmitConfig(timeout=0.1, base=1.0, tries=9))
        d.engine = _TimerFailsOnce([cfg], random=os.urandom)
        d.sockets = IkeSockets(d._datagram, ports=(pa,), natt_port=0, families=(socket.AF_INET,))
        d.sockets.open()
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind((LO, pb))
        silent.setblocking(False)
        got: list[bytes] = []
        try:
            d._engine_call(d.engine.start)
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.5
            while loop.time() < end and len(got) < 3:
                try:
                    got.append(silent.recv(65536))
                except BlockingIOError:
                    await asyncio.sleep(0.01)
        finally:
            if d._timer is not None:
                d._timer.cancel()
            d.sockets.close()
            d.executor.shutdown(wait=False)
            silent.close()
        return got

    got = asyncio.run(main())
    # the request, then (after the failed timer and a 1 s pause) the retransmissions
    assert len(got) >= 3 and len(set(got)) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "IKE engine failed handling its timer"]
