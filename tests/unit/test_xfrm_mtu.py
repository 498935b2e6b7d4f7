"""The inner MTU formula (xfrm_state_mtu for tunnel-mode ESP) and the MSS derived from it."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.xfrm import ChildSa, Endpoints, EspAlgorithms, SaKeys, TunnelInterface, UdpEncap
from appliance.xfrm.hook import tunnel_mtu
from appliance.xfrm.model import CIPHERS, INTEGRITY
from appliance.xfrm.mtu import esp_inner_mtu, tcp_mss

GCM = EspAlgorithms.from_proposal("aes128gcm16")
CHACHA = EspAlgorithms.from_proposal("chacha20poly1305")
CBC256 = EspAlgorithms.from_proposal("aes128-sha256")


@pytest.mark.parametrize("alg", [GCM, EspAlgorithms.from_proposal("aes256gcm16"), CHACHA])
def test_aead_on_a_1500_byte_underlay(alg):
    # the numbers the issue states for AES-GCM; ChaCha20-Poly1305 has the same IV, block and ICV
    assert [esp_inner_mtu(alg, v, udp, 1500) for v, udp in ((4, False), (4, True), (6, False), (6, True))] \
        == [1446, 1438, 1426, 1418]


def test_cbc_hmac_differs_by_block_alignment_and_icv():
    assert [esp_inner_mtu(CBC256, v, udp, 1500) for v, udp in ((4, False), (4, True), (6, False), (6, True))] \
        == [1438, 1422, 1406, 1406]
    sha512 = EspAlgorithms.from_proposal("aes256-sha512")   # 32-byte ICV
    assert esp_inner_mtu(sha512, 4, False, 1500) == 1422
    assert esp_inner_mtu(EspAlgorithms.from_proposal("aes128gcm8"), 4, False, 1500) == 1454  # 8-byte ICV


def test_other_underlays():
    assert esp_inner_mtu(GCM, 4, False, 9001) == 8946
    assert esp_inner_mtu(GCM, 4, True, 1460) == 1398
    with pytest.raises(ValueError):
        esp_inner_mtu(GCM, 5, False, 1500)


def _esp_packet_size(alg: EspAlgorithms, outer: int, udp: bool, inner: int) -> int:
    """RFC 4303 §2.4: payload + pad + pad length + next header, aligned to the block size (at
    least 4); then ESP header, IV, ICV, and the outer headers."""
    block = max(alg.cipher.block_bytes, 4)
    padded = -(-(inner + 2) // block) * block
    return (20 if outer == 4 else 40) + (8 if udp else 0) + 8 + alg.cipher.iv_bytes + padded + alg.icv_bytes


@st.composite
def transforms(draw):
    enc = draw(st.sampled_from(sorted(CIPHERS)))
    if CIPHERS[enc].aead:
        return EspAlgorithms(enc, icv_bits=draw(st.sampled_from(CIPHERS[enc].icv_bits)))
    return EspAlgorithms(enc, integrity=draw(st.sampled_from(sorted(INTEGRITY))))


@given(transforms(), st.sampled_from([4, 6]), st.booleans(), st.integers(1280, 65535))
def test_the_mtu_is_the_largest_inner_packet_that_fits(alg, outer, udp, underlay):
    mtu = esp_inner_mtu(alg, outer, udp, underlay)
    assert _esp_packet_size(alg, outer, udp, mtu) <= underlay < _esp_packet_size(alg, outer, udp, mtu + 1)


def test_mss_and_overrides():
    assert tcp_mss(1446, 4) == 1406 and tcp_mss(1446, 6) == 1386
    c = ChildSa(0x1000, 0x1001, CBC256, SaKeys(os.urandom(16), os.urandom(32)), SaKeys(os.urandom(16), os.urandom(32)),
                Endpoints("2001:db8::1", "2001:db8::2", UdpEncap()))
    auto = tunnel_mtu(TunnelInterface("t", "xfrm-t"), c, 1500)
    assert (auto.mtu, auto.mss4, auto.mss6, auto.computed) == (1406, 1366, 1346, 1406)
    fixed = tunnel_mtu(TunnelInterface("t", "xfrm-t", mtu=1400, mss=1300), c, 1500)
    assert (fixed.mtu, fixed.mss4, fixed.mss6, fixed.computed) == (1400, 1300, 1280, 1406)
    only_mtu = tunnel_mtu(TunnelInterface("t", "xfrm-t", mtu=1380), c, 1500)
    assert (only_mtu.mss4, only_mtu.mss6) == (1340, 1320)
