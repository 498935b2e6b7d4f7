"""appliance.ikesockets on loopback: destination addresses from PKTINFO, replies from the address
that was asked, the non-ESP marker on the NAT-T port (RFC 3948 §2.2); and appliance.sdnotify."""

from __future__ import annotations

import asyncio
import socket

import pytest

from appliance import sdnotify
from appliance.ikesockets import NON_ESP_MARKER, IkeSockets, SocketsError


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("0.0.0.0", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _peer(family=socket.AF_INET, addr="127.0.0.1") -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((addr, 0))
    s.settimeout(5)
    return s


def test_receive_with_destination_and_reply_from_the_asked_address():
    ike, natt = _free_ports(2)

    async def main():
        got = []
        socks = IkeSockets(lambda d, src, dst: got.append((d, src, dst)), ports=(ike, natt), natt_port=natt)
        socks.open()
        peer = _peer()
        try:
            # 127.0.0.2 is ours too (all of 127/8 is local): the engine must learn which one was used
            peer.sendto(b"IKE_SA_INIT", ("127.0.0.2", ike))
            peer.sendto(NON_ESP_MARKER + b"IKE_AUTH", ("127.0.0.3", natt))
            peer.sendto(b"\xff", ("127.0.0.1", natt))                       # NAT keepalive: dropped
            peer.sendto(b"\x00\x00\x10\x01ESP...", ("127.0.0.1", natt))     # ESP (SPI != 0): not for us
            peer.sendto(NON_ESP_MARKER + b"last", ("127.0.0.1", natt))
            for _ in range(100):
                await asyncio.sleep(0.02)
                if len(got) >= 3:
                    break
            src = peer.getsockname()
            # the keepalive and the ESP packet never reach the engine (with UDP_ENCAP_ESPINUDP the
            # kernel takes both itself; without it IkeSockets drops them)
            assert got == [(b"IKE_SA_INIT", src, ("127.0.0.2", ike)), (b"IKE_AUTH", src, ("127.0.0.3", natt)),
                           (b"last", src, ("127.0.0.1", natt))]
            # answers leave from the address and port the engine names; on 4500 with the marker
            assert socks.send(b"answer-500", ("127.0.0.2", ike), src)
            data, frm = peer.recvfrom(100)
            assert (data, frm) == (b"answer-500", ("127.0.0.2", ike))
            assert socks.send(b"answer-4500", ("127.0.0.3", natt), src)
            data, frm = peer.recvfrom(100)
            assert (data, frm) == (NON_ESP_MARKER + b"answer-4500", ("127.0.0.3", natt))
            # a NAT keepalive goes out as the bare 0xFF octet (RFC 3948 §2.3), no marker
            assert socks.send(b"\xff", ("127.0.0.3", natt), src, marker=False)
            data, frm = peer.recvfrom(100)
            assert (data, frm) == (b"\xff", ("127.0.0.3", natt))
            # a source port without a socket is refused, not sent from a random one
            assert not socks.send(b"x", ("127.0.0.1", 1), src)
        finally:
            peer.close()
            socks.close()

    asyncio.run(main())


def test_ipv6_with_destination_address():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    (ike,) = _free_ports(1)

    async def main():
        got = []
        socks = IkeSockets(lambda d, src, dst: got.append((d, src, dst)), ports=(ike,), natt_port=0)
        warnings = socks.open()
        if ("IPv6", ike) not in socks.bound:
            pytest.skip(f"IPv6 not available here: {warnings}")
        peer = _peer(socket.AF_INET6, "::1")
        try:
            peer.sendto(b"v6", ("::1", ike))
            for _ in range(50):
                await asyncio.sleep(0.02)
                if got:
                    break
            assert got == [(b"v6", peer.getsockname()[:2], ("::1", ike))]
            assert socks.send(b"back", ("::1", ike), got[0][1])
            data, frm = peer.recvfrom(100)
            assert data == b"back" and frm[:2] == ("::1", ike)
        finally:
            peer.close()
            socks.close()

    asyncio.run(main())


def test_a_port_in_use_is_an_error_that_names_it():
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("0.0.0.0", 0))
    port = holder.getsockname()[1]

    async def main():
        socks = IkeSockets(lambda *a: None, ports=(port,), natt_port=0, families=(socket.AF_INET,))
        with pytest.raises(SocketsError, match=f"UDP port {port} \\(IPv4\\) is in use by another process"):
            socks.open()
        assert socks.bound == []

    try:
        asyncio.run(main())
    finally:
        holder.close()


def test_sd_notify_path_abstract_and_absent(tmp_path):
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    try:
        assert sdnotify.notify("READY=1", "STATUS=2 tunnels", environ={"NOTIFY_SOCKET": str(path)})
        assert s.recv(100) == b"READY=1\nSTATUS=2 tunnels"
    finally:
        s.close()
    name = f"isthmus-test-{id(tmp_path)}"
    a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.bind("\0" + name)
    a.settimeout(5)
    try:
        assert sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert a.recv(100) == b"STOPPING=1"
    finally:
        a.close()
    assert not sdnotify.notify("READY=1", environ={})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})


def test_a_failing_consumer_costs_one_datagram_and_is_logged_once_with_its_summary(caplog):
    """Issue 12: an exception from the engine for one datagram must not skip the rest of the
    batch; it is logged once, with the datagram's header summary (never its content)."""
    import logging
    import struct

    (ike,) = _free_ports(1)
    header = b"S" * 8 + bytes(8) + struct.pack("!BBBBII", 33, 0x20, 34, 0x08, 0, 40) + b"secret-k"

    async def main():
        got = []

        def consumer(d, src, dst):
            if d.startswith(b"S" * 8):
                raise RuntimeError("engine bug")
            got.append(d)

        socks = IkeSockets(consumer, ports=(ike,), natt_port=0, families=(socket.AF_INET,))
        socks.open()
        peer = _peer()
        try:
            peer.sendto(b"first", ("127.0.0.1", ike))
            peer.sendto(header, ("127.0.0.1", ike))
            peer.sendto(b"last", ("127.0.0.1", ike))
            for _ in range(100):
                await asyncio.sleep(0.02)
                if len(got) >= 2:
                    break
        finally:
            socks.close()
            peer.close()
        assert got == [b"first", b"last"]

    caplog.set_level(logging.INFO, logger="isthmus")
    asyncio.run(main())
    (rec,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert ("IKE_SA_INIT request 0, SPIs 5353535353535353_i 0000000000000000_r, 36 octets"
            in rec.getMessage())
    assert "secret-k" not in caplog.text
