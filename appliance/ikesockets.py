"""The daemon's IKE sockets: UDP 500 and 4500 on every address, IPv4 and IPv6 (RFC 7296 §2.11,
RFC 3948).

One wildcard socket per (family, port). Each received datagram comes with the address it was
sent to (``IP_PKTINFO`` / ``IPV6_PKTINFO``), so the engine knows which of our addresses a peer
used, and every datagram is sent from the address the engine chose (the same ancillary data on
``sendmsg``) - an appliance with several addresses answers from the one it was asked on.

On the NAT-T port IKE messages carry the 4-octet non-ESP marker (RFC 3948 §2.2): it is removed on
receipt and added on sending. The port-4500 sockets are marked ``UDP_ENCAP_ESPINUDP`` so that the
kernel takes ESP-in-UDP packets (first four octets = a non-zero SPI) itself and decapsulates them;
what still reaches us without the marker (NAT keepalives, ESP on a kernel without ESP) is
dropped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from collections import deque
from dataclasses import dataclass, field

from appliance.ike.message import datagram_summary
from appliance.xfrm.natt import enable_espinudp

log = logging.getLogger("isthmus.daemon")

Endpoint = tuple[str, int]
NON_ESP_MARKER = b"\x00\x00\x00\x00"
IKE_PORT = 500
NATT_PORT = 4500

# <linux/in.h>, <linux/in6.h>: Python 3.11's socket module lacks IP_PKTINFO
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_IN_PKTINFO = struct.Struct("=I4s4s")      # ipi_ifindex, ipi_spec_dst, ipi_addr
_IN6_PKTINFO = struct.Struct("=16sI")      # ipi6_addr, ipi6_ifindex
_CMSG_SPACE = socket.CMSG_SPACE(max(_IN_PKTINFO.size, _IN6_PKTINFO.size))
MAX_DATAGRAM = 65535


class SocketsError(Exception):
    """A port cannot be opened; the message says which and why."""


@dataclass
class _Sock:
    sock: socket.socket
    family: int
    port: int
    natt: bool
    backlog: deque = field(default_factory=deque)   # (data, ancillary, dst) waiting for the socket


class IkeSockets:
    """UDP sockets for IKE; ``on_datagram(data, src, dst)`` gets every IKE message (marker removed)."""

    def __init__(self, on_datagram: Callable[[bytes, Endpoint, Endpoint], None], *,
                 ports: Iterable[int] = (IKE_PORT, NATT_PORT), natt_port: int = NATT_PORT,
                 families: Iterable[int] = (socket.AF_INET, socket.AF_INET6)) -> None:
        self.on_datagram = on_datagram
        self.ports = tuple(ports)
        self.natt_port = natt_port
        self.families = tuple(families)
        self._socks: dict[tuple[int, int], _Sock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.received = 0
        self.sent = 0
        self.dropped = 0

    def open(self) -> list[str]:
        """Bind every socket. Raises SocketsError when an IPv4 port is taken or cannot be bound;
        IPv6 problems (no IPv6 in this namespace) are returned as warnings."""
        self._loop = asyncio.get_running_loop()
        warnings: list[str] = []
        try:
            for family in self.families:
                for port in self.ports:
                    try:
                        s = self._bind(family, port)
                    except OSError as e:
                        v6 = family == socket.AF_INET6
                        what = f"UDP port {port} ({'IPv6' if v6 else 'IPv4'})"
                        if e.errno == errno.EADDRINUSE:
                            raise SocketsError(f"{what} is in use by another process (another IKE daemon such "
                                               f"as strongSwan's charon, or a second isthmusd in this network "
                                               f"namespace); stop it or run this one in its own namespace") from None
                        if v6 and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                            warnings.append(f"{what} not opened: {e.strerror}; IKE over IPv6 is off")
                            continue
                        raise SocketsError(f"{what} cannot be opened: {e.strerror}") from None
                    natt = port == self.natt_port
                    if natt:
                        try:
                            enable_espinudp(s)
                        except OSError as e:
                            warnings.append(f"UDP port {port}: ESP-in-UDP decapsulation not available "
                                            f"({e.strerror}); NAT-T tunnels will not receive ESP")
                    self._socks[(family, port)] = _Sock(s, family, port, natt)
                    self._loop.add_reader(s.fileno(), self._readable, self._socks[(family, port)])
        except BaseException:
            self.close()
            raise
        return warnings

    @staticmethod
    def _bind(family: int, port: int) -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                s.bind(("::", port))
            else:
                s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                s.bind(("0.0.0.0", port))
        except BaseException:
            s.close()
            raise
        return s

    def close(self) -> None:
        for s in self._socks.values():
            if self._loop is not None:
                self._loop.remove_reader(s.sock.fileno())
                if s.backlog:
                    self._loop.remove_writer(s.sock.fileno())
            s.sock.close()
        self._socks.clear()

    @property
    def bound(self) -> list[tuple[str, int]]:
        return [("IPv6" if s.family == socket.AF_INET6 else "IPv4", s.port) for s in self._socks.values()]

    # ------------------------------------------------------------------ receive
    def _readable(self, s: _Sock) -> None:
        for _ in range(64):   # bounded, so one busy socket cannot starve the loop
            try:
                data, anc, _flags, addr = s.sock.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # ICMP errors surface here on Linux (ECONNREFUSED...)
                log.debug("UDP port %d: %s", s.port, e.strerror)
                continue
            dst = _destination(anc, s.family)
            if dst is None:
                self.dropped += 1
                continue
            if s.natt:
                if data[:4] != NON_ESP_MARKER:
                    self.dropped += 1     # NAT keepalive (0xff) or ESP the kernel did not take
                    continue
                data = data[4:]
            self.received += 1
            try:
                self.on_datagram(data, (addr[0], addr[1]), (dst, s.port))
            except Exception:  # noqa: BLE001 - the engine never raises for input; a bug must not stop reading
                log.exception("processing %s from %s:%d failed", datagram_summary(data), addr[0], addr[1])

    # ------------------------------------------------------------------ send
    def send(self, data: bytes, src: Endpoint, dst: Endpoint, *, marker: bool = True) -> bool:
        """Send `data` from `src` (address, port) to `dst`; False if it could not be sent. On the
        NAT-T port the non-ESP marker goes in front unless `marker` is false (a NAT keepalive)."""
        family = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
        s = self._socks.get((family, src[1]))
        if s is None:
            log.warning("no socket for %s port %d; datagram to %s:%d dropped", src[0], src[1], dst[0], dst[1])
            self.dropped += 1
            return False
        if s.natt and marker:
            data = NON_ESP_MARKER + data
        if family == socket.AF_INET6:
            anc = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, _IN6_PKTINFO.pack(socket.inet_pton(family, src[0]), 0))]
        else:
            anc = [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, socket.inet_pton(family, src[0]), bytes(4)))]
        if s.backlog:                       # keep the order: behind what already waits
            s.backlog.append((data, anc, dst))
            return True
        return self._sendmsg(s, data, anc, dst)

    def _sendmsg(self, s: _Sock, data: bytes, anc: list, dst: Endpoint) -> bool:
        try:
            s.sock.sendmsg([data], anc, 0, dst)
        except (BlockingIOError, InterruptedError):
            # the socket buffer is full: wait until it is writable, in order
            s.backlog.append((data, anc, dst))
            if self._loop is not None and len(s.backlog) == 1:
                self._loop.add_writer(s.sock.fileno(), self._writable, s)
            return True
        except OSError as e:
            _send_failed(dst, e)
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def _writable(self, s: _Sock) -> None:
        while s.backlog:
            data, anc, dst = s.backlog[0]
            try:
                s.sock.sendmsg([data], anc, 0, dst)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                _send_failed(dst, e)
                self.dropped += 1
            else:
                self.sent += 1
            s.backlog.popleft()
        if self._loop is not None:
            self._loop.remove_writer(s.sock.fileno())


def _send_failed(dst: Endpoint, e: OSError) -> None:
    # no route to a peer is what IKE retransmission and its timeout report (ike_sa_failed);
    # anything else (a local address gone, a bad source) is worth a warning each time
    level = logging.DEBUG if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH) else logging.WARNING
    log.log(level, "sending to %s:%d failed: %s", dst[0], dst[1], e.strerror or e)


def _destination(ancillary: list, family: int) -> str | None:
    for level, kind, data in ancillary:
        if family == socket.AF_INET and level == socket.IPPROTO_IP and kind == IP_PKTINFO \
                and len(data) >= _IN_PKTINFO.size:
            _ifindex, _spec_dst, addr = _IN_PKTINFO.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET, addr)
        if family == socket.AF_INET6 and level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO \
                and len(data) >= _IN6_PKTINFO.size:
            addr, _ifindex = _IN6_PKTINFO.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET6, addr)
    return None
