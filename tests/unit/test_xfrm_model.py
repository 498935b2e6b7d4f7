"""The data plane's input dataclasses: validation messages, key redaction, if_id derivation."""

from __future__ import annotations

import ipaddress
import os

import pytest

from appliance.xfrm import (
    IF_ID_MAX,
    IF_ID_MIN,
    ChildSa,
    DataplaneInputError,
    Endpoints,
    EspAlgorithms,
    Lifetime,
    SaKeys,
    TunnelInterface,
    UdpEncap,
    derive_if_id,
)
from appliance.xfrm.model import check_unique_if_ids

GCM = EspAlgorithms.from_proposal("aes256gcm16")


def child(**kw) -> ChildSa:
    base = dict(spi_in=0xC0000001, spi_out=0xC0000002, algorithms=GCM, keys_in=SaKeys(os.urandom(36)),
                keys_out=SaKeys(os.urandom(36)), endpoints=Endpoints("192.0.2.1", "192.0.2.2"))
    base.update(kw)
    return ChildSa(**base)


def test_proposals_map_to_kernel_names():
    assert EspAlgorithms.from_proposal("aes128gcm16") == EspAlgorithms("rfc4106(gcm(aes))", 128, None, 128)
    assert EspAlgorithms.from_proposal("chacha20poly1305").encryption == "rfc7539esp(chacha20,poly1305)"
    cbc = EspAlgorithms.from_proposal("aes256-sha512")
    assert (cbc.encryption, cbc.key_bits, cbc.integrity, cbc.icv_bits) == ("cbc(aes)", 256, "hmac(sha512)", 256)
    assert EspAlgorithms("cbc(aes)", integrity="hmac(sha384)").icv_bits == 192  # RFC 4868 truncation


@pytest.mark.parametrize("kwargs,message", [
    (dict(encryption="gcm(aes)"), r"unknown ESP encryption algorithm 'gcm\(aes\)': allowed cbc\(aes\), "
                                  r"rfc4106\(gcm\(aes\)\), rfc7539esp\(chacha20,poly1305\)"),
    (dict(encryption="rfc4106(gcm(aes))", key_bits=100), r"does not take a 100-bit key: allowed 128, 192, 256"),
    (dict(encryption="rfc4106(gcm(aes))", icv_bits=32), r"does not take a 32-bit ICV: allowed 128, 96, 64"),
    (dict(encryption="rfc4106(gcm(aes))", integrity="hmac(sha256)"), r"is an AEAD: .* integrity must be None"),
    (dict(encryption="cbc(aes)"), r"cbc\(aes\) needs an integrity algorithm: allowed hmac\(sha256\)"),
    (dict(encryption="cbc(aes)", integrity="hmac(md5)"), r"unknown ESP integrity algorithm 'hmac\(md5\)'"),
    (dict(encryption="cbc(aes)", integrity="hmac(sha256)", icv_bits=100), r"truncation of 100 bits is not allowed"),
])
def test_algorithm_errors_say_what_is_allowed(kwargs, message):
    with pytest.raises(DataplaneInputError, match=message):
        EspAlgorithms(**kwargs)


def test_key_lengths_are_checked_per_direction():
    with pytest.raises(DataplaneInputError, match=r"inbound SA 0xc0000001: rfc4106\(gcm\(aes\)\) key is 20 bytes: "
                                                  r"it must be 36 bytes \(key \+ 4-byte salt, RFC 4106\)"):
        child(keys_in=SaKeys(os.urandom(20)))
    any_size = EspAlgorithms("rfc4106(gcm(aes))")
    child(algorithms=any_size, keys_in=SaKeys(os.urandom(20)), keys_out=SaKeys(os.urandom(28)))
    with pytest.raises(DataplaneInputError, match=r"must be 20 or 28 or 36 bytes"):
        child(algorithms=any_size, keys_in=SaKeys(os.urandom(32)))
    with pytest.raises(DataplaneInputError, match="the integrity key must be empty"):
        child(keys_in=SaKeys(os.urandom(36), b"x" * 32))
    cbc = EspAlgorithms.from_proposal("aes128-sha256")
    with pytest.raises(DataplaneInputError, match=r"hmac\(sha256\) key is 0 bytes: it must be 32 bytes \(RFC 4868\)"):
        child(algorithms=cbc, keys_in=SaKeys(os.urandom(16)), keys_out=SaKeys(os.urandom(16), os.urandom(32)))


@pytest.mark.parametrize("kwargs,message", [
    (dict(spi_in=0), r"spi_in 0 is not a valid ESP SPI \(256 to 0xffffffff, RFC 4303 §2.1\)"),
    (dict(spi_out=2**32), r"spi_out 4294967296 is not a valid ESP SPI"),
    (dict(replay_window=5000), r"replay_window 5000 must be 0-4096 packets"),
    (dict(esn=True, replay_window=0), r"ESN needs a replay window"),
])
def test_child_sa_errors(kwargs, message):
    with pytest.raises(DataplaneInputError, match=message):
        child(**kwargs)


def test_endpoints_and_lifetimes():
    ep = Endpoints("2001:db8::1", ipaddress.ip_address("2001:db8::2"), UdpEncap(4500, 31337))
    assert ep.version == 6 and isinstance(ep.local, ipaddress.IPv6Address)
    with pytest.raises(DataplaneInputError, match="different IP versions"):
        Endpoints("192.0.2.1", "2001:db8::2")
    with pytest.raises(DataplaneInputError, match="endpoint local address 'nowhere' is not an IP address"):
        Endpoints("nowhere", "192.0.2.2")
    with pytest.raises(DataplaneInputError, match="remote_port 0 is not a port"):
        UdpEncap(4500, 0)
    with pytest.raises(DataplaneInputError, match=r"soft_bytes \(10\) is above hard_bytes \(5\)"):
        Lifetime(soft_bytes=10, hard_bytes=5)
    with pytest.raises(DataplaneInputError, match="hard_seconds must be a positive integer"):
        Lifetime(hard_seconds=0)


def test_keys_never_shown():
    secret = bytes.fromhex("deadbeef" * 9)
    c = child(keys_in=SaKeys(secret), keys_out=SaKeys(secret))
    for text in (repr(c), str(c), repr(c.keys_in), str(c.keys_in), f"{c}"):
        assert "deadbeef" not in text and "\\xde" not in text
    assert repr(c.keys_in) == "SaKeys(encryption=<36 bytes>, integrity=<0 bytes>)"


def test_if_id_is_derived_stably_inside_the_owned_range():
    assert derive_if_id("to-b") == derive_if_id("to-b")
    assert derive_if_id("to-b") != derive_if_id("to-c")
    # a fixed value: restarts and other machines derive the same if_id from the same name
    assert derive_if_id("to-b") == 0x49B980DB
    for n in range(2000):
        assert IF_ID_MIN <= derive_if_id(f"tunnel-{n}") <= IF_ID_MAX
    t = TunnelInterface("to-b", "xfrm-b", addresses=("169.254.21.1/30", "fd00::1/126"))
    assert t.if_id == 0x49B980DB
    assert [str(a) for a in t.addresses] == ["169.254.21.1/30", "fd00::1/126"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(ifname="this-name-is-too-long"), r"interface name 'this-name-is-too-long' is not allowed: 1-15"),
    (dict(ifname="bad/name"), r"interface name 'bad/name' is not allowed"),
    (dict(if_id=7), r"if_id 7 is outside the range Isthmus owns \(0x49000000-0x49ffffff\)"),
    (dict(addresses=("169.254.1.1/33",)), r"interface address '169.254.1.1/33' is not an address/prefix"),
    (dict(mtu=1000, addresses=("fd00::1/126",)), r"mtu 1000 must be 1280-65535 \(IPv6 needs at least 1280\)"),
    (dict(mss=100), r"mss 100 must be 536-65495"),
    (dict(tunnel="a b"), r"tunnel name 'a b' is not allowed"),
])
def test_tunnel_interface_errors(kwargs, message):
    base = dict(tunnel="to-b", ifname="xfrm-b")
    base.update(kwargs)
    with pytest.raises(DataplaneInputError, match=message):
        TunnelInterface(**base)


def test_if_id_and_name_collisions_are_reported():
    a = TunnelInterface("a", "xfrm-a", if_id=IF_ID_MIN + 5)
    b = TunnelInterface("b", "xfrm-b", if_id=IF_ID_MIN + 5)
    with pytest.raises(DataplaneInputError, match=r"tunnels 'a' and 'b' both have if_id 0x49000005: set "
                                                  r"interface.if_id for one of them"):
        check_unique_if_ids([a, b])
    with pytest.raises(DataplaneInputError, match="both use interface name 'xfrm-a'"):
        check_unique_if_ids([a, TunnelInterface("c", "xfrm-a")])
