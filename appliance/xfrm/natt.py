"""ESP in UDP (RFC 3948) on the IKE daemon's NAT-T socket.

The kernel only decapsulates ESP that arrives on a UDP socket marked ``UDP_ENCAP_ESPINUDP``: the
daemon's port-4500 socket (IKE and ESP share it, told apart by the non-ESP marker, RFC 3948 §2.2).
Without that socket, SAs with UDP encapsulation send but never receive.
"""

from __future__ import annotations

import socket

UDP_ENCAP = 100               # include/uapi/linux/udp.h: setsockopt(IPPROTO_UDP, UDP_ENCAP, type)
UDP_ENCAP_ESPINUDP = 2


def enable_espinudp(sock: socket.socket) -> None:
    """Mark a bound UDP socket (IPv4 or IPv6) as the ESP-in-UDP endpoint of its port."""
    sock.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)


def open_natt_socket(family: int, port: int = 4500, address: str | None = None,
                     netns: str | None = None) -> socket.socket:
    """A UDP socket on `port` with ESP-in-UDP decapsulation on, in network namespace `netns`
    (for tests and tools; the daemon marks its own IKE socket with :func:`enable_espinudp`)."""
    if netns is None:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    else:
        from pyroute2 import netns as pyroute2_netns
        sock = pyroute2_netns.create_socket(netns=netns, family=family, socket_type=socket.SOCK_DGRAM, flags=0)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    enable_espinudp(sock)
    return sock
