"""The asyncio runner around the IKE engine (appliance/ikerunner.py) on loopback sockets.

Two runners in one event loop, each with its own engine, talk over 127.0.0.1. What is pinned:
the exchange completes; a responder reports a new Child SA before it sends the response that
lets the peer use it; sends that would block are queued and go out in order once the socket is
writable; the engine's timers fire (retransmissions) although the runner only re-arms its loop
timer when it has to move earlier.
"""

from __future__ import annotations

import asyncio
import os
import socket

from appliance.ike import events as ev
from appliance.ike.engine import IkeEngine
from appliance.ike.policy import DpdConfig, Identity, RetransmitConfig, TunnelConfig
from appliance.ikerunner import IkeRunner, Listen

LO = "127.0.0.1"
PSK = b"runner-test-psk-0123456789"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((LO, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tunnel(me: int, peer: int, *, start: bool, name: str = "t", **kw) -> TunnelConfig:
    lid, rid = ("a.example.net", "b.example.net") if start else ("b.example.net", "a.example.net")
    return TunnelConfig(name=name, local_addr=LO, remote_addr=LO, local_port=me, remote_port=peer,
                        local_id=Identity.parse(lid), remote_id=Identity.parse(rid), psk=PSK, if_id=9,
                        start=start, dpd=DpdConfig(interval=0, timeout=30, action="clear"), **kw)


class Recording(IkeRunner):
    """Records the order of reported events and sent datagrams (the runner's own two outputs)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.log: list[str] = []

    def _sendto(self, sock, data, dst) -> None:
        self.log.append(f"send {data[18]}")   # the exchange type (no non-ESP marker on these ports)
        super()._sendto(sock, data, dst)


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def _pair(pa: int, pb: int, events_a: list, events_b: list, b_cls=IkeRunner):
    a = IkeRunner(IkeEngine([_tunnel(pa, pb, start=True)], random=os.urandom), [Listen(LO, pa)], events_a.append)
    b = b_cls(IkeEngine([_tunnel(pb, pa, start=False)], random=os.urandom), [Listen(LO, pb)], None)
    return a, b


def test_responder_reports_the_child_sa_before_sending_the_response():
    async def main() -> None:
        pa, pb = _free_ports(2)
        ea: list = []
        eb: list = []
        a, b = _pair(pa, pb, ea, eb, Recording)

        def on_b(e) -> None:
            eb.append(e)
            b.log.append(type(e).__name__)
        b.on_event = on_b
        await b.start()
        await a.start()
        try:
            await _until(lambda: any(isinstance(e, ev.ChildSaInstalled) for e in ea))
        finally:
            a.close()
            b.close()
        assert [type(e).__name__ for e in eb] == ["IkeSaUp", "ChildSaInstalled"]
        # IKE_SA_INIT (34) answered, then the events, then the IKE_AUTH (35) response
        assert b.log == ["send 34", "IkeSaUp", "ChildSaInstalled", "send 35"]
        (ca,), (cb,) = [e for e in ea if isinstance(e, ev.ChildSaInstalled)], [
            e for e in eb if isinstance(e, ev.ChildSaInstalled)]
        assert (ca.spi_in, ca.spi_out) == (cb.spi_out, cb.spi_in) and ca.encr_key_in == cb.encr_key_out
    asyncio.run(main())


class _Stubborn:
    """A socket whose first `n` sends would block (EAGAIN), as a full send buffer does."""

    def __init__(self, sock: socket.socket, n: int) -> None:
        self.sock, self.n, self.sent = sock, n, []

    def sendto(self, data, dst):
        if self.n > 0:
            self.n -= 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        self.sent.append(data)
        return self.sock.sendto(data, dst)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_sends_that_would_block_are_queued_in_order():
    async def main() -> None:
        pa, pb = _free_ports(2)
        ea: list = []
        eb: list = []
        a, b = _pair(pa, pb, ea, eb)
        b.on_event = eb.append
        await b.start()
        # the responder's socket refuses its first two sends; the engine's retransmissions
        # would recover too, so make them slow enough not to be what completes the exchange
        key = (LO, pb)
        stub = _Stubborn(b._socks[key], 2)
        b._socks[key] = stub    # type: ignore[assignment]
        await a.start()
        try:
            await _until(lambda: any(isinstance(e, ev.ChildSaInstalled) for e in ea), timeout=3.0)
        finally:
            a.close()
            b.close()
        assert stub.n == 0 and [d[18] for d in stub.sent] == [34, 35]
        assert not b._backlog
    asyncio.run(main())


def test_engine_timers_fire_retransmissions_also_when_the_next_one_moves_earlier():
    async def main() -> None:
        pa, p_slow, p_fast = _free_ports(3)
        silent = []
        for port in (p_slow, p_fast):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((LO, port))
            s.setblocking(False)
            silent.append(s)
        slow = _tunnel(pa, p_slow, start=True, retransmit=RetransmitConfig(timeout=5.0, base=1.5, tries=3))
        fast = _tunnel(pa, p_fast, start=False, name="fast",
                       retransmit=RetransmitConfig(timeout=0.1, base=1.5, tries=3))
        engine = IkeEngine([slow, fast], random=os.urandom)
        a = IkeRunner(engine, [Listen(LO, pa)], lambda e: None)
        await a.start()                 # the loop timer is armed for the slow tunnel (5 s)
        await asyncio.sleep(0.05)
        a.command(lambda now: engine.connect("fast", now))    # now a timer is due in 0.1 s
        got: dict[int, list[bytes]] = {p_slow: [], p_fast: []}
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.5
            while loop.time() < end:
                idle = True
                for s in silent:
                    try:
                        got[s.getsockname()[1]].append(s.recv(65536))
                        idle = False
                    except BlockingIOError:
                        pass
                if idle:
                    await asyncio.sleep(0.01)
        finally:
            a.close()
            for s in silent:
                s.close()
        # fast: the request, then retransmissions after 0.1, 0.15 and 0.225 s (the same datagram)
        assert len(got[p_fast]) == 4 and len(set(got[p_fast])) == 1
        assert len(got[p_slow]) == 1
    asyncio.run(main())


# ---------------------------------------------------------------- engine failures (issue 12)

FAULT_XCHG = 99     # an exchange type that makes _Faulty's receive_datagram fail


class _Faulty(IkeEngine):
    """The real engine with injected faults: receive_datagram raises for datagrams of exchange
    type 99 (after the real engine saw them), handle_timer raises the first `timer_faults`
    times. Stands in for a bug in the engine, which never raises for input by contract."""

    timer_faults = 0

    def receive_datagram(self, data, src, dst, now):
        super().receive_datagram(data, src, dst, now)
        if len(data) > 18 and data[18] == FAULT_XCHG:
            raise RuntimeError("injected engine fault")

    def handle_timer(self, now):
        if self.timer_faults > 0:
            self.timer_faults -= 1
            raise RuntimeError("injected timer fault")
        super().handle_timer(now)


def _init_request(me: int, peer: int) -> bytes:
    client = IkeEngine([_tunnel(me, peer, start=True)], random=os.urandom)
    client.start(0.0)
    (d,) = client.datagrams_to_send()
    return d.data


def test_an_engine_failure_on_one_datagram_skips_neither_the_batch_nor_the_timer(caplog):
    import logging

    from appliance.ike import message as M

    async def main() -> None:
        pa, pb = _free_ports(2)
        engine = _Faulty([_tunnel(pb, pa, start=False, half_open_timeout=0.3)], random=os.urandom)
        b = IkeRunner(engine, [Listen(LO, pb)], lambda e: None)
        await b.start()
        (sock,) = b._socks.values()
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())   # read the batch below, in one go
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind((LO, pa))
        client.settimeout(2.0)
        bad = bytearray(_init_request(pa, pb))
        bad[18] = FAULT_XCHG
        first, second = _init_request(pa, pb), _init_request(pa, pb)
        try:
            for d in (first, bytes(bad), second):
                client.sendto(d, (LO, pb))
            await asyncio.sleep(0.05)
            b._readable(sock, b.listen[0])      # one batch: the failing datagram in the middle
            answers = [client.recv(65536), client.recv(65536)]
            assert [M.parse_header(a).exchange_type for a in answers] == [34, 34]
            assert len(engine.sas()) == 2
            assert b._timer is not None         # re-armed after the batch: half-open expiry
            await asyncio.sleep(0.6)
            assert engine.sas() == []           # ... and it fired
        finally:
            b.close()
            client.close()
        failures = [r for r in caplog.records if r.name == "isthmus.ikerunner" and r.levelno >= logging.ERROR]
        assert len(failures) == 1
        text = failures[0].getMessage()
        assert f"{FAULT_XCHG} request 0, SPIs {bytes(bad[0:8]).hex()}_i" in text and f"127.0.0.1:{pa}" in text
        assert "injected engine fault" in caplog.text
        assert PSK.hex() not in caplog.text and PSK.decode() not in caplog.text
    caplog.set_level(logging.INFO, logger="isthmus")
    asyncio.run(main())


def test_an_engine_failure_in_handle_timer_does_not_lose_the_timer(caplog):
    import logging

    async def main() -> None:
        pa, pb = _free_ports(2)
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind((LO, pb))
        silent.setblocking(False)
        engine = _Faulty([_tunnel(pa, pb, start=True,
                                  retransmit=RetransmitConfig(timeout=0.1, base=1.0, tries=5))],
                         random=os.urandom)
        engine.timer_faults = 1
        a = IkeRunner(engine, [Listen(LO, pa)], lambda e: None)
        a.timer_retry = 0.2
        got: list[bytes] = []
        await a.start()
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.0
            while loop.time() < end and len(got) < 3:
                try:
                    got.append(silent.recv(65536))
                except BlockingIOError:
                    await asyncio.sleep(0.01)
        finally:
            a.close()
            silent.close()
        # the first timer (retransmission due at 0.1 s) failed; the runner looked again after
        # 0.2 s and the retransmissions went on
        assert len(got) >= 3 and len(set(got)) == 1
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
            "IKE engine failed handling its timer"]
    caplog.set_level(logging.INFO, logger="isthmus")
    asyncio.run(main())
