"""The engine's tunnel configuration and identities (RFC 7296 §3.5)."""

from __future__ import annotations

import pytest

from appliance.ike.constants import IdType
from appliance.ike.policy import DpdConfig, Identity, PolicyError, RetransmitConfig
from tests.unit.ike.simnet import tunnel


@pytest.mark.parametrize("text,id_type,data", [
    ("192.0.2.1", IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 1])),
    ("2001:db8::1", IdType.ID_IPV6_ADDR, bytes.fromhex("20010db8000000000000000000000001")),
    ("gw.example.net", IdType.ID_FQDN, b"gw.example.net"),
    ("@gw", IdType.ID_FQDN, b"gw"),
    ("fqdn:192.0.2.1", IdType.ID_FQDN, b"192.0.2.1"),
    ("alice@example.net", IdType.ID_RFC822_ADDR, b"alice@example.net"),
    ("keyid:#0a0b", IdType.ID_KEY_ID, b"\x0a\x0b"),
    ("keyid:gw-1", IdType.ID_KEY_ID, b"gw-1"),
])
def test_identity_parse(text, id_type, data):
    i = Identity.parse(text)
    assert (i.id_type, i.data) == (id_type, data)


def test_dn_identity_round_trips_through_der_and_compares_semantically():
    i = Identity.parse("C=CH, O=Isthmus, CN=gw")
    assert i.id_type == IdType.ID_DER_ASN1_DN and i.data.startswith(b"\x30")
    assert str(i) == "C=CH, O=Isthmus, CN=gw"
    # the same name with PrintableString instead of UTF8String values is the same identity
    printable = i.data.replace(b"\x0c\x07Isthmus", b"\x13\x07Isthmus").replace(b"\x0c\x02gw", b"\x13\x02gw")
    assert printable != i.data and Identity(IdType.ID_DER_ASN1_DN, printable) == i
    assert Identity.parse("C=CH, O=Isthmus, CN=other") != i


def test_fqdn_compares_case_insensitively():
    assert Identity.parse("GW.Example.NET") == Identity.parse("gw.example.net")


@pytest.mark.parametrize("kind,value,text", [("ipv4", "192.0.2.1", "192.0.2.1"), ("fqdn", "a.example.net", "a.example.net"),
                                              ("rfc822", "a@b.c", "a@b.c"), ("dn", "C=CH, CN=a", "C=CH, CN=a")])
def test_identity_from_config_model(kind, value, text):
    assert str(Identity.from_config(kind, value)) == text


@pytest.mark.parametrize("bad", ["", "ipv4:2001:db8::1", "ipv4:gw", "dn:not a dn"])
def test_bad_identities_are_explained(bad):
    with pytest.raises(PolicyError):
        Identity.parse(bad)


def test_tunnel_config_validation_messages():
    with pytest.raises(PolicyError, match="rekey margin"):
        tunnel("a", child_lifetime=600, child_rekey_margin=400)
    with pytest.raises(PolicyError, match="empty pre-shared key"):
        tunnel("a", psk=b"")
    with pytest.raises(PolicyError, match="needs local_addr and remote_addr"):
        tunnel("a", remote_addr=None)
    with pytest.raises(PolicyError, match="not a network"):
        tunnel("a", local_ts=("10.0.0.0/33",))
    with pytest.raises(PolicyError, match="dpd action"):
        DpdConfig(action="explode")


def test_defaults():
    t = tunnel("a")
    assert [str(p) for p in t.ike_proposals] == ["aes256gcm16-prfsha384-x25519"]
    assert [str(p) for p in t.esp_proposals] == ["aes256gcm16"]
    assert (t.ike_lifetime, t.child_lifetime, t.ike_rekey_margin) == (86400, 3600, 540)
    assert RetransmitConfig().schedule() == pytest.approx([4.0, 7.2, 12.96, 23.328, 41.9904, 75.58272])
    assert "simulated-psk" not in repr(t)
