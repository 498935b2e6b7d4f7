"""Inner MTU and TCP MSS of an ESP tunnel, by the kernel's own formula.

The kernel sizes what fits into one ESP packet with ``xfrm_state_mtu()`` (net/xfrm/xfrm_state.c),
using the header length ``esp_init_state()`` (net/ipv4/esp4.c, net/ipv6/esp6.c) sets up::

    header_len = sizeof(ESP header) [8] + IV size
               + outer IP header [20 IPv4 / 40 IPv6]        (tunnel mode)
               + UDP header [8]                            (ESP in UDP, RFC 3948)
    blksize    = ALIGN(cipher block size, 4)               (ESP pads to 4 bytes at least)
    mtu        = ((underlay - header_len - ICV) & ~(blksize - 1)) - 2

The final 2 bytes are ESP's pad-length and next-header fields (RFC 4303 §2.4-2.6). AES-GCM and
ChaCha20-Poly1305 have 8-byte IVs, a 1-byte block (so 4-byte alignment) and a 16-byte ICV: on a
1500-byte underlay that gives 1446 (IPv4), 1438 (IPv4+UDP), 1426 (IPv6), 1418 (IPv6+UDP).
AES-CBC has a 16-byte IV and block, and its ICV is the HMAC truncation (16 bytes for SHA-256).
"""

from __future__ import annotations

from appliance.xfrm.model import EspAlgorithms

ESP_HEADER = 8          # SPI + sequence number (RFC 4303 §2)
ESP_TRAILER_FIXED = 2   # pad length + next header
IPV4_HEADER = 20
IPV6_HEADER = 40
UDP_HEADER = 8
TCP_HEADER = 20


def esp_header_len(algorithms: EspAlgorithms, outer_version: int, udp_encap: bool) -> int:
    """``x->props.header_len`` of a tunnel-mode ESP SA."""
    if outer_version not in (4, 6):
        raise ValueError(f"outer IP version must be 4 or 6, not {outer_version!r}")
    outer = IPV4_HEADER if outer_version == 4 else IPV6_HEADER
    return ESP_HEADER + algorithms.cipher.iv_bytes + outer + (UDP_HEADER if udp_encap else 0)


def esp_inner_mtu(algorithms: EspAlgorithms, outer_version: int, udp_encap: bool, underlay_mtu: int) -> int:
    """The largest inner packet one tunnel-mode ESP packet carries without fragmenting
    (``xfrm_state_mtu()`` for a valid ESP SA in tunnel mode)."""
    blksize = (algorithms.cipher.block_bytes + 3) & ~3
    room = underlay_mtu - esp_header_len(algorithms, outer_version, udp_encap) - algorithms.icv_bytes
    return (room & ~(blksize - 1)) - ESP_TRAILER_FIXED


def tcp_mss(mtu: int, inner_version: int) -> int:
    """The TCP MSS that fills an inner packet of `mtu` bytes (no IP or TCP options)."""
    return mtu - (IPV4_HEADER if inner_version == 4 else IPV6_HEADER) - TCP_HEADER
