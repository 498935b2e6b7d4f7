"""Config fields the daemon added: static routes per tunnel, delete_on_shutdown, the if_id range the
data plane owns."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

from appliance.config import load_config
from appliance.xfrm import model as xfrm_model
from tests.unit.config_util import line_of, one_issue, tunnel, write_config, write_psk


def test_routes_parse_in_order(tmp_path):
    write_psk(tmp_path)
    cfg = load_config(write_config(tmp_path, tunnel("routes: [10.2.0.0/16, 'fd00:2::/48']")))
    assert cfg.tunnels["to-b"].routes == (IPv4Network("10.2.0.0/16"), IPv6Network("fd00:2::/48"))


def test_routes_default_empty_and_change_is_a_tunnel_change(tmp_path):
    write_psk(tmp_path)
    a = load_config(write_config(tmp_path, tunnel(""), "a.yaml"))
    b = load_config(write_config(tmp_path, tunnel("routes: [10.2.0.0/16]"), "b.yaml"))
    assert a.tunnels["to-b"].routes == ()
    assert a.tunnels["to-b"] != b.tunnels["to-b"]


def test_route_with_host_bits_names_line_field_and_fix(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("routes:\n  - 10.2.0.0/16\n  - 10.3.0.1/16"))
    issue = one_issue(path)
    assert issue.line == line_of(path, "10.3.0.1/16")
    assert issue.path == "tunnels.to-b.routes[1]" and issue.tunnel == "to-b"
    assert "host bits set; did you mean 10.3.0.0/16" in issue.message


def test_route_containing_the_remote_is_refused(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("routes: [0.0.0.0/0]"))
    issue = one_issue(path)
    assert issue.path == "tunnels.to-b.routes[0]"
    assert "contains the tunnel's remote address 198.51.100.2" in issue.message


def test_route_not_a_list_and_duplicates(tmp_path):
    write_psk(tmp_path)
    assert "expected a list of prefixes" in one_issue(write_config(tmp_path, tunnel("routes: 10.2.0.0/16"))).message
    issue = one_issue(write_config(tmp_path, tunnel("routes: [10.2.0.0/16, 10.2.0.0/16]"), "dup.yaml"))
    assert issue.path == "tunnels.to-b.routes[1]" and "listed twice" in issue.message


def test_same_prefix_on_two_tunnels_is_refused(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, """
        tunnels:
          a:
            remote: 198.51.100.2
            auth: {psk_file: secrets/to-b.psk}
            routes: [10.2.0.0/16]
          b:
            remote: 198.51.100.3
            auth: {psk_file: secrets/to-b.psk}
            routes: [10.2.0.0/16, 10.3.0.0/16]
    """)
    issue = one_issue(path)
    assert issue.tunnel == "b" and issue.path == "tunnels.b.routes"
    assert "already routed over tunnel 'a'" in issue.message


def test_delete_on_shutdown(tmp_path):
    write_psk(tmp_path)
    assert load_config(write_config(tmp_path, tunnel(""))).appliance.delete_on_shutdown is True
    cfg = load_config(write_config(tmp_path, "appliance: {delete_on_shutdown: false}\n" + tunnel(""), "b.yaml"))
    assert cfg.appliance.delete_on_shutdown is False
    issue = one_issue(write_config(tmp_path, "appliance: {delete_on_shutdown: maybe}\n" + tunnel(""), "c.yaml"))
    assert issue.path == "appliance.delete_on_shutdown" and "true or false" in issue.message


def test_the_data_plane_accepts_the_configs_if_ids(tmp_path):
    write_psk(tmp_path)
    for name, body in (("d.yaml", ""), ("e.yaml", "interface: {if_id: 0x49000007}")):
        t = load_config(write_config(tmp_path, tunnel(body), name)).tunnels["to-b"]
        xfrm_model.TunnelInterface("to-b", t.interface.name, if_id=t.interface.if_id)


def test_dos_protection(tmp_path):
    from appliance.ike.policy import DosProtection

    write_psk(tmp_path)
    assert load_config(write_config(tmp_path, tunnel(""))).appliance.dos_protection == DosProtection()
    cfg = load_config(write_config(tmp_path, "appliance:\n  dos_protection: {half_open_max: 50, "
                                   "half_open_per_source: off, cookie_threshold: 0}\n" + tunnel(""), "b.yaml"))
    assert cfg.appliance.dos_protection == DosProtection(half_open_max=50, half_open_per_source=None,
                                                         cookie_threshold=0)
    issue = one_issue(write_config(tmp_path, "appliance:\n  dos_protection: {cookie_threshold: many}\n"
                                   + tunnel(""), "c.yaml"))
    assert issue.path == "appliance.dos_protection.cookie_threshold" and "whole number" in issue.message
    issue = one_issue(write_config(tmp_path, "appliance:\n  dos_protection: {half_open: 5}\n" + tunnel(""), "d.yaml"))
    assert issue.path == "appliance.dos_protection.half_open" and "half_open_max" in issue.message
    cfg = load_config(write_config(tmp_path, "appliance:\n  dos_protection: {invalid_ike_spi_rate: 50}\n"
                                   + tunnel(""), "e.yaml"))
    assert cfg.appliance.dos_protection == DosProtection(invalid_ike_spi_rate=50)
    cfg = load_config(write_config(tmp_path, "appliance:\n  dos_protection: {invalid_ike_spi_rate: off}\n"
                                   + tunnel(""), "f.yaml"))
    assert cfg.appliance.dos_protection.invalid_ike_spi_rate is None
    issue = one_issue(write_config(tmp_path, "appliance:\n  dos_protection: {invalid_ike_spi_rate: 0}\n"
                                   + tunnel(""), "g.yaml"))
    assert issue.path == "appliance.dos_protection.invalid_ike_spi_rate" and issue.line == 2
    # a load test switches it all off, as strongSwan's dos_protection = no
    for text in ("off", "false"):
        cfg = load_config(write_config(tmp_path, f"appliance:\n  dos_protection: {text}\n" + tunnel(""), "h.yaml"))
        assert cfg.appliance.dos_protection == DosProtection(half_open_max=None, half_open_per_source=None,
                                                             cookie_threshold=None)
    issue = one_issue(write_config(tmp_path, "appliance:\n  dos_protection: on\n" + tunnel(""), "i.yaml"))
    assert issue.path == "appliance.dos_protection"
