"""appliance.tunnels: config -> engine TunnelConfig / data plane TunnelInterface, and negotiated
Child SA -> kernel ChildSa."""

from __future__ import annotations

import ipaddress

import pytest

from appliance.config import ConfigError, load_config
from appliance.ike.constants import EncrId, IntegId, IdType
from appliance.ike.events import ChildSaInstalled
from appliance.tunnels import (KERNEL_LIFETIME_SLACK, diff_plans, esp_algorithms, kernel_child, outer_mtu_limit,
                               plan_tunnels)
from appliance.xfrm import DataplaneInputError
from appliance.xfrm.mtu import esp_inner_mtu
from tests.unit.config_util import PSK, make_pki, tunnel, write_config, write_psk


def _cfg(tmp_path, body: str, name: str = "isthmus.yaml"):
    write_psk(tmp_path)
    return load_config(write_config(tmp_path, tunnel(body), name))


def test_plan_maps_every_field(tmp_path):
    cfg = _cfg(tmp_path, """
        local: 192.0.2.1
        local_id: a.example.net
        remote_id: b@example.net
        start: false
        ike: {proposals: [aes128gcm16-prfsha256-ecp256], lifetime: 8h, rekey_margin: 10m}
        esp: {proposals: [aes128gcm16-ecp256, chacha20poly1305], lifetime: 30m, rekey_margin: 5m}
        dpd: {interval: 5s, timeout: 20s, action: clear}
        interface: {name: xfrm-b, if_id: 0x49000042, address: 169.254.21.1/30, address6: 'fd00:21::1/126'}
        routes: [10.2.0.0/16]
    """)
    p = plan_tunnels(cfg, resolve_local=lambda r: pytest.fail("local is configured"))["to-b"]
    ike = p.ike
    assert (ike.name, ike.local_addr, ike.remote_addr, ike.start) == ("to-b", "192.0.2.1", "198.51.100.2", False)
    assert (ike.local_id.id_type, ike.local_id.data) == (IdType.ID_FQDN, b"a.example.net")
    assert (ike.remote_id.id_type, ike.remote_id.data) == (IdType.ID_RFC822_ADDR, b"b@example.net")
    assert ike.psk == PSK.encode() and PSK not in repr(ike) and PSK not in repr(p)
    assert [str(x) for x in ike.ike_proposals] == ["aes128gcm16-prfsha256-ecp256"]
    assert [str(x) for x in ike.esp_proposals] == ["aes128gcm16-ecp256", "chacha20poly1305"]
    assert (ike.ike_lifetime, ike.ike_rekey_margin, ike.child_lifetime, ike.child_rekey_margin) == \
        (8 * 3600, 600, 1800, 300)
    assert (ike.dpd.interval, ike.dpd.timeout, ike.dpd.action) == (5, 20, "clear")
    assert ike.if_id == p.interface.if_id == 0x49000042
    assert (p.interface.tunnel, p.interface.ifname) == ("to-b", "xfrm-b")
    assert p.interface.addresses == (ipaddress.ip_interface("169.254.21.1/30"), ipaddress.ip_interface("fd00:21::1/126"))
    assert p.interface.mtu is None
    assert p.routes == (ipaddress.ip_network("10.2.0.0/16"),)


def test_ike_fragmentation_settings_reach_the_engine(tmp_path):
    ike = plan_tunnels(_cfg(tmp_path, "local: 192.0.2.1"), resolve_local=None)["to-b"].ike
    assert ike.fragmentation.enabled and ike.fragmentation.size_for("198.51.100.2") == 1280
    cfg = _cfg(tmp_path, "local: 192.0.2.1\nike: {fragmentation: false, fragment_size: 900}", "b.yaml")
    frag = plan_tunnels(cfg, resolve_local=None)["to-b"].ike.fragmentation
    assert not frag.enabled and frag.size_for("198.51.100.2") == 900


def test_local_address_and_default_local_id_come_from_the_route_to_the_peer(tmp_path):
    cfg = _cfg(tmp_path, "")
    asked = []
    p = plan_tunnels(cfg, resolve_local=lambda r: asked.append(r) or ipaddress.ip_address("203.0.113.9"))["to-b"]
    assert asked == [ipaddress.ip_address("198.51.100.2")]
    assert p.ike.local_addr == "203.0.113.9"
    assert (p.ike.local_id.id_type, p.ike.local_id.data) == (IdType.ID_IPV4_ADDR, bytes([203, 0, 113, 9]))


def test_no_route_to_the_peer_is_a_config_issue_with_line_and_field(tmp_path):
    cfg = _cfg(tmp_path, "")
    with pytest.raises(ConfigError) as exc:
        plan_tunnels(cfg, resolve_local=lambda r: None)
    (issue,) = exc.value.issues
    assert (issue.line, issue.path, issue.tunnel) == (cfg.tunnels["to-b"].line, "tunnels.to-b.local", "to-b")
    assert "no route to remote 198.51.100.2" in issue.message and "set local:" in issue.message


def _cert_files(tmp_path, crl=False):
    from tests.peers.certs import TestPKI

    p = TestPKI("ecdsa")
    other = TestPKI("ecdsa", "Other org")
    cred = p.issue("a.example.net")
    revoked = p.issue("c.example.net")
    p.revoke(revoked)
    d = tmp_path / "pki"
    d.mkdir()
    (d / "a.pem").write_bytes(cred.bundle_pem)
    (d / "a.key").write_bytes(cred.key_pem)
    (d / "a.key").chmod(0o600)
    (d / "root.pem").write_bytes(p.root_pem)
    (d / "other.pem").write_bytes(other.root_pem)
    (d / "p.crl").write_bytes(p.crl_der())
    return p, cred, revoked


def test_certificate_auth_becomes_engine_credentials(tmp_path):
    p, cred, revoked = _cert_files(tmp_path)
    text = tunnel("").replace("    auth: {psk_file: secrets/to-b.psk}\n", "") + \
        "    local_id: a.example.net\n" \
        "    auth: {certificate: pki/a.pem, key: pki/a.key, ca: [pki/root.pem, pki/other.pem], crl: [pki/p.crl]}\n"
    cfg = load_config(write_config(tmp_path, text))
    ike = plan_tunnels(cfg, resolve_local=lambda r: ipaddress.ip_address("192.0.2.1"))["to-b"].ike
    c = ike.cert
    assert c is not None and ike.psk == b""
    assert c.certificate == cred.cert and c.intermediates == (p.intermediate,)
    assert len(c.cas) == 2 and len(c.crls) == 1
    assert c.crls[0].get_revoked_certificate_by_serial_number(revoked.cert.serial_number) is not None
    assert cred.key_pem.decode().splitlines()[1] not in repr(ike)
    # a single CA file is fine too
    text1 = text.replace("ca: [pki/root.pem, pki/other.pem], crl: [pki/p.crl]", "ca: pki/root.pem")
    ike1 = plan_tunnels(load_config(write_config(tmp_path, text1, "one.yaml")),
                        resolve_local=lambda r: ipaddress.ip_address("192.0.2.1"))["to-b"].ike
    assert len(ike1.cert.cas) == 1 and ike1.cert.crls == ()


def test_certificate_auth_file_errors_name_file_and_line(tmp_path):
    from tests.unit.config_util import issues_of, line_of

    _cert_files(tmp_path)
    (tmp_path / "pki" / "junk.crl").write_bytes(b"not a CRL")
    base = tunnel("").replace("    auth: {psk_file: secrets/to-b.psk}\n", "") + "    local_id: a.example.net\n"
    text = base + ("    auth:\n      certificate: pki/a.pem\n      key: pki/a.key\n      ca:\n"
                   "        - pki/root.pem\n        - pki/missing.pem\n      crl:\n        - pki/junk.crl\n")
    path = write_config(tmp_path, text)
    issues = {i.path: i for i in issues_of(path)}
    assert set(issues) == {"tunnels.to-b.auth.ca[1]", "tunnels.to-b.auth.crl[0]"}
    assert issues["tunnels.to-b.auth.ca[1]"].line == line_of(path, "pki/missing.pem")
    assert "does not exist" in issues["tunnels.to-b.auth.ca[1]"].message
    assert issues["tunnels.to-b.auth.crl[0]"].line == line_of(path, "pki/junk.crl")
    assert "not a PEM or DER X.509 CRL" in issues["tunnels.to-b.auth.crl[0]"].message
    # our local_id must be in our own certificate
    bad_id = base.replace("local_id: a.example.net", "local_id: z.example.net") + \
        "    auth: {certificate: pki/a.pem, key: pki/a.key, ca: pki/root.pem}\n"
    with pytest.raises(ConfigError) as exc:
        plan_tunnels(load_config(write_config(tmp_path, bad_id, "id.yaml")),
                     resolve_local=lambda r: ipaddress.ip_address("192.0.2.1"))
    (issue,) = exc.value.issues
    assert issue.path == "tunnels.to-b.local_id" and "z.example.net is not in our certificate" in issue.message
    path = write_config(tmp_path, base + "    auth: {certificate: pki/a.pem, key: pki/a.key, ca: []}\n", "e.yaml")
    (issue,) = issues_of(path)
    assert issue.path == "tunnels.to-b.auth.ca" and "at least one" in issue.message


def test_rekey_margin_close_to_the_lifetime_fits_the_engine(tmp_path):
    cfg = _cfg(tmp_path, "esp: {lifetime: 1h, rekey_margin: 50m}\nike: {lifetime: 1h, rekey_margin: 59m}")
    ike = plan_tunnels(cfg, resolve_local=lambda r: ipaddress.ip_address("192.0.2.1"))["to-b"].ike
    for life, margin in ((ike.child_lifetime, ike.child_rekey_margin), (ike.ike_lifetime, ike.ike_rekey_margin)):
        assert margin * (1 + ike.rekey_jitter) < life


def test_outer_mtu_gives_the_interface_an_mtu_for_the_costliest_proposal(tmp_path):
    cfg = _cfg(tmp_path, "peer_profile: gcp\nesp: {proposals: [aes256gcm16, aes256-sha256]}")
    p = plan_tunnels(cfg, resolve_local=lambda r: ipaddress.ip_address("192.0.2.1"))["to-b"]
    cbc = esp_inner_mtu(esp_algorithms(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128), 4, True, 1460)
    gcm = esp_inner_mtu(esp_algorithms(EncrId.AES_GCM_16, 256, None), 4, True, 1460)
    assert cbc < gcm and p.interface.mtu == cbc
    assert outer_mtu_limit(p.ike.esp_proposals, 4, 1460) == cbc


@pytest.mark.parametrize("encr,bits,integ,kernel,icv", [
    (EncrId.AES_GCM_16, 256, None, "rfc4106(gcm(aes))", 128),
    (EncrId.AES_GCM_12, 128, None, "rfc4106(gcm(aes))", 96),
    (EncrId.AES_GCM_8, 128, None, "rfc4106(gcm(aes))", 64),
    (EncrId.CHACHA20_POLY1305, None, None, "rfc7539esp(chacha20,poly1305)", 128),
    (EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128, "cbc(aes)", 128),
    (EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_512_256, "cbc(aes)", 256),
])
def test_esp_transform_names_for_the_kernel(encr, bits, integ, kernel, icv):
    alg = esp_algorithms(encr, bits, integ)
    assert alg.encryption == kernel and alg.icv_bits == icv
    if integ is not None:
        assert alg.integrity.startswith("hmac(sha")


def test_unsupported_esp_transforms_say_what_is_allowed():
    with pytest.raises(DataplaneInputError, match="AES_CTR is not supported.*allowed: AES-GCM"):
        esp_algorithms(EncrId.AES_CTR, 128, IntegId.HMAC_SHA2_256_128)
    with pytest.raises(DataplaneInputError, match="allowed with AES-CBC: sha256"):
        esp_algorithms(EncrId.AES_CBC, 128, IntegId.HMAC_SHA1_96)


def _installed(**kw) -> ChildSaInstalled:
    base = dict(tunnel="to-b", spi_in=0xC0000001, spi_out=0xC0000002, protocol=3, encr_id=EncrId.AES_GCM_16,
                encr_key_bits=256, integ_id=None, esn=False, local_addr="192.0.2.1", remote_addr="192.0.2.2",
                local_port=500, remote_port=500, udp_encap=False, if_id=0x49000001, lifetime_soft=3000.0,
                lifetime_hard=3600.0, outbound=True, encr_key_in=b"\x11" * 36, encr_key_out=b"\x22" * 36)
    base.update(kw)
    return ChildSaInstalled(**base)


def test_kernel_child_from_a_negotiated_pair():
    c = kernel_child(_installed())
    assert (c.spi_in, c.spi_out) == (0xC0000001, 0xC0000002)
    assert c.keys_in.encryption == b"\x11" * 36 and c.keys_out.encryption == b"\x22" * 36
    assert str(c.endpoints.local) == "192.0.2.1" and c.endpoints.encap is None
    assert c.lifetime.hard_seconds == 3600 + KERNEL_LIFETIME_SLACK and c.lifetime.soft_seconds is None
    assert "11" * 8 not in repr(c) and "22" * 8 not in repr(c)
    n = kernel_child(_installed(udp_encap=True, local_port=4500, remote_port=4501))
    assert (n.endpoints.encap.local_port, n.endpoints.encap.remote_port) == (4500, 4501)


def test_kernel_child_refuses_a_key_of_the_wrong_length():
    with pytest.raises(DataplaneInputError, match="key is 20 bytes"):
        kernel_child(_installed(encr_key_in=b"\x11" * 20))


def test_diff_plans(tmp_path):
    one = _cfg(tmp_path, "routes: [10.2.0.0/16]", "one.yaml")
    resolve = lambda r: ipaddress.ip_address("192.0.2.1")  # noqa: E731
    p1 = plan_tunnels(one, resolve)
    assert diff_plans(p1, plan_tunnels(_cfg(tmp_path, "routes: [10.2.0.0/16]", "again.yaml"), resolve)).unchanged == \
        ("to-b",)
    d = diff_plans(p1, plan_tunnels(_cfg(tmp_path, "routes: [10.3.0.0/16]", "two.yaml"), resolve))
    assert (d.added, d.removed, d.changed, d.unchanged) == ((), (), ("to-b",), ())
    # the same config but the route to the peer now leaves from another address: changed
    d = diff_plans(p1, plan_tunnels(one, lambda r: ipaddress.ip_address("192.0.2.7")))
    assert d.changed == ("to-b",)
    assert diff_plans(p1, {}).removed == ("to-b",) and diff_plans({}, p1).added == ("to-b",)


def test_nat_traversal_and_keepalive_reach_the_engine(tmp_path):
    ike = plan_tunnels(_cfg(tmp_path, "local: 192.0.2.1"), resolve_local=None)["to-b"].ike
    assert (ike.nat_traversal, ike.nat_keepalive) == ("auto", 20)
    cfg = _cfg(tmp_path, "local: 192.0.2.1\nnat_traversal: force\nnat_keepalive: 45s", "b.yaml")
    ike = plan_tunnels(cfg, resolve_local=None)["to-b"].ike
    assert (ike.nat_traversal, ike.nat_keepalive) == ("force", 45)
    cfg = _cfg(tmp_path, "local: 192.0.2.1\nnat_traversal: off\nnat_keepalive: 0", "c.yaml")
    ike = plan_tunnels(cfg, resolve_local=None)["to-b"].ike
    assert (ike.nat_traversal, ike.nat_keepalive) == ("off", 0)


@pytest.mark.parametrize("value", ["2h", "-5", "soon"])
def test_a_bad_nat_keepalive_is_refused_with_its_path(tmp_path, value):
    write_psk(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(tmp_path, tunnel(f"nat_keepalive: {value}")))
    (issue,) = exc.value.issues
    assert issue.path == "tunnels.to-b.nat_keepalive"
    if value == "2h":
        assert "allowed: 0 (no keepalives) or 1s..1h" in issue.message
