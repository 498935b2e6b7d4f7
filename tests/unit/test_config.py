"""Config model: the DESIGN.md example, defaults, and every kind of error with file:line and field."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import (ConfigError, Identity, PskAuth, load_config, model, parse_config)
from appliance.config.validate import Bad, parse_duration, to_identity
from appliance.ike.proposals import Proposal
from appliance.xfrm.model import derive_if_id
from tests.unit.config_util import PSK, issues_of, line_of, one_issue, tunnel, write_config, write_psk

# The example of DESIGN.md's "User-facing contract", verbatim but for the PSK path.
DESIGN_EXAMPLE = """\
appliance:
  name: region-a
  router_id: 10.255.0.1
tunnels:
  to-b:
    remote: 198.51.100.2
    local_id: a.example.net
    remote_id: b.example.net
    auth: {psk_file: PSKFILE}
    # or: auth: {certificate: /etc/isthmus/certs/a.pem, key: /etc/isthmus/private/a.key, ca: /etc/isthmus/certs/ca.pem}
    ike: {proposals: [aes256gcm16-prfsha384-x25519], lifetime: 24h}
    esp: {proposals: [aes256gcm16-x25519], lifetime: 1h}
    dpd: {interval: 10s, timeout: 30s, action: restart}
    nat_traversal: auto        # auto | force | off
    mobike: true
    start: true                # initiate, or only respond
    interface: {name: xfrm-b, address: 169.254.21.1/30, mtu: auto}
    bgp: {peer_as: 65002, peer_address: 169.254.21.2, hold_time: 30, import: from-b, export: to-b}
bgp:
  asn: 65001
  announce: [10.1.0.0/16]
  policies:
    from-b: {prefixes: [{prefix: 10.2.0.0/16, le: 24}], max_prefix: {limit: 1000, action: restart}, local_pref: 100}
    to-b:   {prefixes: [{prefix: 10.1.0.0/16, le: 24}], prepend: 0}
"""


def test_design_example(tmp_path):
    psk = write_psk(tmp_path)
    cfg = load_config(write_config(tmp_path, DESIGN_EXAMPLE.replace("PSKFILE", str(psk))))
    assert cfg.appliance.name == "region-a" and cfg.appliance.router_id == IPv4Address("10.255.0.1")
    assert list(cfg.tunnels) == ["to-b"]
    t = cfg.tunnels["to-b"]
    assert t.remote == IPv4Address("198.51.100.2") and t.local is None
    assert t.local_id == Identity("fqdn", "a.example.net") and t.remote_id == Identity("fqdn", "b.example.net")
    assert isinstance(t.auth, PskAuth) and t.auth.psk.reveal() == PSK.encode() and t.auth.psk_file == psk
    assert t.ike.proposal_strings == ("aes256gcm16-prfsha384-x25519",) and t.ike.lifetime == 86400
    assert t.esp.proposal_strings == ("aes256gcm16-x25519",) and t.esp.lifetime == 3600
    assert all(isinstance(p, Proposal) for p in t.ike.proposals + t.esp.proposals)
    assert (t.dpd.interval, t.dpd.timeout, t.dpd.action) == (10, 30, "restart")
    assert (t.nat_traversal, t.mobike, t.start) == ("auto", True, True)
    assert t.interface.name == "xfrm-b" and t.interface.address == IPv4Interface("169.254.21.1/30")
    assert t.interface.mtu is None and t.interface.address6 is None
    assert t.interface.if_id == derive_if_id("to-b")
    assert t.bgp is not None and (t.bgp.peer_as, t.bgp.peer_address, t.bgp.hold_time) == \
        (65002, IPv4Address("169.254.21.2"), 30)
    assert (t.bgp.import_policy, t.bgp.export_policy) == ("from-b", "to-b")
    assert t.peer_profile is None
    assert cfg.bgp.asn == 65001 and cfg.bgp.router_id == IPv4Address("10.255.0.1")  # from appliance
    assert cfg.bgp.announce == (IPv4Network("10.1.0.0/16"),)
    from_b = cfg.bgp.policies["from-b"]
    assert from_b.prefixes[0].prefix == IPv4Network("10.2.0.0/16") and from_b.prefixes[0].le == 24
    assert (from_b.max_prefix.limit, from_b.max_prefix.action, from_b.local_pref) == (1000, "restart", 100)
    assert cfg.bgp.policies["to-b"].prepend == 0


def test_defaults(tmp_path):
    write_psk(tmp_path)
    cfg = load_config(write_config(tmp_path, tunnel("interface: {address: 169.254.21.1/30}")))
    t = cfg.tunnels["to-b"]
    assert t.ike.proposal_strings == ("aes256gcm16-prfsha384-x25519",) == (model.DEFAULT_IKE_PROPOSAL,)
    assert t.esp.proposal_strings == ("aes256gcm16",) == (model.DEFAULT_ESP_PROPOSAL,)
    assert (t.ike.lifetime, t.esp.lifetime) == (24 * 3600, 3600)
    assert t.ike.rekey_margin == t.esp.rekey_margin == 9 * 60
    assert (t.dpd.interval, t.dpd.timeout, t.dpd.action) == (10, 30, "restart")
    assert (t.nat_traversal, t.mobike, t.start) == ("auto", True, True)
    assert t.interface.name == "xfrm-to-b" and t.interface.mtu is None and t.interface.outer_mtu is None
    assert t.local_id is None and t.remote_id == Identity("ipv4", "198.51.100.2")
    assert t.bgp is None and cfg.bgp is None and cfg.appliance.name is None
    # the default if_id depends only on the tunnel name: stable across reloads and edits elsewhere
    again = load_config(write_config(tmp_path, tunnel("interface: {address: 169.254.21.1/30}")
                                     + "  other:\n    remote: 198.51.100.9\n    auth: {psk_file: secrets/to-b.psk}\n",
                                     "two.yaml"))
    assert again.tunnels["to-b"].interface.if_id == t.interface.if_id
    assert again.tunnels["other"].interface.if_id != t.interface.if_id


def test_same_file_loads_equal_and_psk_change_is_visible(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("interface: {address: 169.254.21.1/30}"))
    a, b = load_config(path), load_config(path)
    assert a == b and a.tunnels["to-b"] == b.tunnels["to-b"]
    write_psk(tmp_path, value="a-different-key-0123")
    c = load_config(path)
    assert c.tunnels["to-b"] != a.tunnels["to-b"]


def test_bad_proposal(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("""
        ike:
          proposals:
            - aes256gcm16-prfsha384-x25519
            - aes256-bogus99-modp3072
    """))
    issue = one_issue(path)
    assert issue.line == line_of(path, "bogus99")
    assert issue.path == "tunnels.to-b.ike.proposals[1]" and issue.tunnel == "to-b"
    assert "bogus99" in issue.message
    assert str(issue).startswith(f"{path}:{issue.line}: tunnels.to-b.ike.proposals[1]: ")


def test_weak_algorithm(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("""
        esp: {proposals: [aes256-sha1]}
    """))
    issue = one_issue(path)
    assert (issue.line, issue.path) == (line_of(path, "aes256-sha1"), "tunnels.to-b.esp.proposals[0]")
    assert "sha1" in issue.message and "weak" in issue.message and "refused" in issue.message


@pytest.mark.parametrize("where,text,path,suggest", [
    ("top", "tunels: {}\n", "tunels", "tunnels"),
    ("tunnel", "    remot: 1.2.3.4\n", "tunnels.to-b.remot", "remote"),
    ("nested", "    ike: {lifetme: 8h}\n", "tunnels.to-b.ike.lifetme", "lifetime"),
    ("nowhere-close", "    colour: blue\n", "tunnels.to-b.colour", None),
])
def test_unknown_key(tmp_path, where, text, path, suggest):
    write_psk(tmp_path)
    body = tunnel("") + text if where != "top" else text + tunnel("")
    cfg = write_config(tmp_path, body)
    issue = one_issue(cfg)
    key = path.rsplit(".", 1)[-1]
    assert issue.path == path and issue.line == line_of(cfg, f"{key}:")
    assert f"unknown key '{path.rsplit('.', 1)[-1]}'" in issue.message and "allowed:" in issue.message
    if suggest:
        assert f"did you mean '{suggest}'?" in issue.message
    else:
        assert "did you mean" not in issue.message


def test_duplicate_interface_name(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, """
        tunnels:
          a:
            remote: 198.51.100.2
            auth: {psk_file: secrets/to-b.psk}
            interface: {name: xfrm-x, address: 169.254.21.1/30}
          b:
            remote: 198.51.100.3
            auth: {psk_file: secrets/to-b.psk}
            interface:
              name: xfrm-x
              address: 169.254.22.1/30
    """)
    issue = one_issue(path)
    assert issue.path == "tunnels.b.interface.name" and issue.tunnel == "b"
    assert issue.line == 10
    assert "'xfrm-x' is already used by tunnel 'a' (line 2)" in issue.message


def test_duplicate_if_id_overlapping_inside_and_indistinguishable_peers(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, """
        tunnels:
          a:
            remote: 198.51.100.2
            auth: {psk_file: secrets/to-b.psk}
            interface: {if_id: 0x49000007, address: 169.254.21.1/30, address6: 'fd00:1::1/126'}
          b:
            remote: 198.51.100.2
            auth: {psk_file: secrets/to-b.psk}
            interface: {if_id: 0x49000007, address: 169.254.21.2/30, address6: 'fd00:1::2/126'}
    """)
    issues = issues_of(path)
    by_path = {i.path: i for i in issues}
    assert set(by_path) == {"tunnels.b.interface.if_id", "tunnels.b.interface.address",
                            "tunnels.b.interface.address6", "tunnels.b.remote_id"}, issues
    assert "if_id 0x49000007 is already used by tunnel 'a'" in by_path["tunnels.b.interface.if_id"].message
    assert "overlaps 169.254.21.0/30 of tunnel 'a'" in by_path["tunnels.b.interface.address"].message
    assert "could not tell them apart" in by_path["tunnels.b.remote_id"].message
    assert all(i.line == 9 for i in issues if "interface" in i.path)
    assert by_path["tunnels.b.remote_id"].line == 7   # remote_id defaults from remote: point there


def test_every_error_is_reported_in_line_order(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, """
        appliance: {router_id: 10.255.0.300}
        tunnels:
          a:
            remote: not-an-address
            auth: {psk_file: secrets/to-b.psk}
            ike: {proposals: [aes256-md5-modp2048], lifetime: 2 weeks}
            dpd: {action: explode}
            nat_traversal: sometimes
            interface: {name: this-name-is-too-long, address: 10.0.0.1/30, mtu: 100000}
          b:
            remote: 198.51.100.3
            mobike: maybe
    """)
    issues = issues_of(path)
    got = [(i.line, i.path) for i in issues]
    assert got == [
        (1, "appliance.router_id"),
        (4, "tunnels.a.remote"),
        (6, "tunnels.a.ike.lifetime"),
        (6, "tunnels.a.ike.proposals[0]"),
        (7, "tunnels.a.dpd.action"),
        (8, "tunnels.a.nat_traversal"),
        (9, "tunnels.a.interface.name"),
        (9, "tunnels.a.interface.address"),
        (9, "tunnels.a.interface.mtu"),
        (10, "tunnels.b.auth"),
        (12, "tunnels.b.mobike"),
    ], "\n".join(map(str, issues))
    text = {i.path: i.message for i in issues}
    assert "'10.255.0.300' is not an IPv4 address" in text["appliance.router_id"]
    assert "allowed: restart, clear, none" in text["tunnels.a.dpd.action"]
    assert "allowed: auto, force, off" in text["tunnels.a.nat_traversal"]
    assert "at most 15" in text["tunnels.a.interface.name"]
    assert "169.254.0.0/16" in text["tunnels.a.interface.address"]
    assert "allowed: auto or 576..9000" in text["tunnels.a.interface.mtu"]
    assert "is required" in text["tunnels.b.auth"]
    assert "expected true or false" in text["tunnels.b.mobike"]
    assert "md5" in text["tunnels.a.ike.proposals[0]"]


@pytest.mark.parametrize("text,seconds", [
    ("24h", 86400), ("30s", 30), ("1h30m", 5400), ("2d", 172800), ("1d2h3m4s", 93784), ("10m", 600),
    (3600, 3600), ("0s", 0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1x", "30m1h", "h", "-5", "1.5h", "soon", True, 1.5, -3])
def test_bad_durations(text):
    with pytest.raises(Bad):
        parse_duration(text)


@pytest.mark.parametrize("address,fragment", [
    ("169.254.21.1/29", "is a /29; allowed: /30 or /31"),
    ("10.0.0.1/30", "not in 169.254.0.0/16"),
    ("169.254.21.0/30", "network or broadcast address"),
    ("169.254.21.3/30", "network or broadcast address"),
    ("169.254.21.1", "prefix length"),
    ("fd00::1/126", "IPv4"),
])
def test_inside_address_rules(tmp_path, address, fragment):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel(f"interface: {{address: '{address}'}}"))
    issue = one_issue(path)
    assert issue.path == "tunnels.to-b.interface.address" and issue.line == line_of(path, address)
    assert fragment in issue.message


def test_inside_slash31_and_v6(tmp_path):
    write_psk(tmp_path)
    cfg = load_config(write_config(tmp_path, tunnel("interface: {address: 169.254.21.0/31, "
                                                    "address6: 'fd00:21::1/126', mtu: 1400}")))
    i = cfg.tunnels["to-b"].interface
    assert i.address == IPv4Interface("169.254.21.0/31") and i.address6 == IPv6Interface("fd00:21::1/126")
    assert i.mtu == 1400
    path = write_config(tmp_path, tunnel("interface: {address6: 'fd00:21::1/64'}"), "bad6.yaml")
    assert "allowed: /126" in one_issue(path).message
    path = write_config(tmp_path, tunnel("interface: {address6: 'fd00:21::1/126', mtu: 1200}"), "mtu6.yaml")
    assert "1280" in one_issue(path).message


def test_yaml_syntax_error_names_line_and_never_quotes_source(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, """
        tunnels:
          to-b:
            remote: 198.51.100.2
            auth: {psk: "SuperSecretInlineKey", psk_file: secrets/to-b.psk}}
            interface: {address: 169.254.21.1/30}
    """)
    issue = one_issue(path)
    assert issue.line == 4 and "not valid YAML" in issue.message
    assert "SuperSecretInlineKey" not in str(issue)


def test_duplicate_yaml_key(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("remote: 198.51.100.3"))
    issue = one_issue(path)
    assert issue.line == 5 and "duplicate key 'remote' (first at line 3)" in issue.message


def test_empty_and_non_mapping_files(tmp_path):
    assert "empty" in one_issue(write_config(tmp_path, "# nothing\n")).message
    assert "expected a mapping" in one_issue(write_config(tmp_path, "- a\n- b\n", "list.yaml")).message
    assert "expected a mapping" in one_issue(write_config(tmp_path, "tunnels: [a]\n", "l2.yaml")).message


def test_tunnel_name_and_address_families(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("local: '2001:db8::1'") + "  'bad name!':\n    remote: 198.51.100.7\n")
    issues = issues_of(path)
    assert [i.path for i in issues] == ["tunnels.to-b.local", "tunnels.bad name!"]
    assert "different IP versions" in issues[0].message and "letters, digits" in issues[1].message


@pytest.mark.parametrize("text,kind,value", [
    ("198.51.100.1", "ipv4", "198.51.100.1"), ("2001:db8::1", "ipv6", "2001:db8::1"),
    ("a.example.net", "fqdn", "a.example.net"), ("@gw", "fqdn", "gw"),
    ("ops@example.net", "rfc822", "ops@example.net"), ("keyid:abc123", "keyid", "abc123"),
    ("C=CH, O=Example, CN=gw", "dn", "C=CH, O=Example, CN=gw"),
])
def test_identities(text, kind, value):
    assert to_identity(text) == Identity(kind, value)


@pytest.mark.parametrize("text", ["not an id!", "@", "keyid:", 42])
def test_bad_identities(text):
    with pytest.raises(Bad):
        to_identity(text)


BGP_BASE = """\
appliance: {router_id: 10.255.0.1}
tunnels:
  to-b:
    remote: 198.51.100.2
    auth: {psk_file: secrets/to-b.psk}
    interface: {address: 169.254.21.1/30}
    bgp: {peer_as: 65002, peer_address: 169.254.21.2, import: from-b}
bgp:
  asn: 65001
  announce: [10.1.0.0/16]
  policies:
    from-b: {prefixes: [{prefix: 10.2.0.0/16, ge: 17, le: 24}, 10.3.0.0/16], med: 10,
             communities: ['65001:100', '65001:1:2', no-export]}
"""


def test_bgp_valid(tmp_path):
    write_psk(tmp_path)
    cfg = load_config(write_config(tmp_path, BGP_BASE))
    pol = cfg.bgp.policies["from-b"]
    assert [(p.prefix, p.ge, p.le) for p in pol.prefixes] == \
        [(IPv4Network("10.2.0.0/16"), 17, 24), (IPv4Network("10.3.0.0/16"), None, None)]
    assert pol.communities == ("65001:100", "65001:1:2", "no-export") and pol.med == 10


@pytest.mark.parametrize("old,new,path,fragment", [
    ("import: from-b", "import: frm-b", "tunnels.to-b.bgp.import", "did you mean 'from-b'?"),
    ("peer_address: 169.254.21.2", "peer_address: 169.254.22.2", "tunnels.to-b.bgp.peer_address",
     "not in the tunnel's inside network 169.254.21.0/30"),
    ("peer_address: 169.254.21.2", "peer_address: 169.254.21.1", "tunnels.to-b.bgp.peer_address", "own"),
    ("asn: 65001", "asn: 23456", "bgp.asn", "AS_TRANS"),
    ("10.1.0.0/16]", "10.1.0.1/16]", "bgp.announce[0]", "did you mean 10.1.0.0/16?"),
    ("ge: 17", "ge: 8", "bgp.policies.from-b.prefixes[0].ge", "allowed: 16..32"),
    ("'65001:100'", "'65001:70000'", "bgp.policies.from-b.communities[0]", "ASN:VALUE"),
    ("med: 10", "med: -1", "bgp.policies.from-b.med", "allowed: 0..4294967295"),
    ("med: 10", "medd: 10", "bgp.policies.from-b.medd", "did you mean 'med'?"),
    ("peer_as: 65002", "peer_as: 65002, hold_time: 2", "tunnels.to-b.bgp.hold_time", "3..65535"),
])
def test_bgp_errors(tmp_path, old, new, path, fragment):
    write_psk(tmp_path)
    assert old in BGP_BASE
    cfg = write_config(tmp_path, BGP_BASE.replace(old, new))
    issue = one_issue(cfg)
    assert issue.path == path and fragment in issue.message, str(issue)
    assert issue.line == line_of(cfg, new.split(":")[0] if path.endswith(("medd", "hold_time")) else new)


def test_tunnel_bgp_needs_top_level_bgp(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("interface: {address: 169.254.21.1/30}\n"
                                         "bgp: {peer_as: 65002, peer_address: 169.254.21.2}"))
    issue = one_issue(path)
    assert issue.path == "tunnels.to-b.bgp" and "top-level bgp section" in issue.message


def test_parse_config_from_text_uses_base_dir(tmp_path):
    write_psk(tmp_path)
    cfg = parse_config(tunnel(""), "inline.yaml", base_dir=tmp_path)
    assert cfg.tunnels["to-b"].auth.psk_file == tmp_path / "secrets" / "to-b.psk"
    with pytest.raises(ConfigError) as exc:
        parse_config(tunnel(""), "inline.yaml", base_dir=tmp_path / "nowhere")
    assert exc.value.issues[0].path == "tunnels.to-b.auth.psk_file"


def test_yaml_booleans_read_as_words_where_words_are_expected(tmp_path):
    """YAML 1.1 reads `off` as false: `nat_traversal: off` still means "off"."""
    write_psk(tmp_path)
    t = load_config(write_config(tmp_path, tunnel("nat_traversal: off\ndpd: {action: none}\nmobike: no"))).tunnels["to-b"]
    assert (t.nat_traversal, t.dpd.action, t.mobike) == ("off", "none", False)


def test_no_tunnels_is_valid(tmp_path):
    assert load_config(write_config(tmp_path, "tunnels:\n")).tunnels == {}
    assert load_config(write_config(tmp_path, "appliance: {name: a}\n", "b.yaml")).tunnels == {}


@given(st.integers(0, 30), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_duration_spellings_agree(d, h, m, s):
    text = "".join(f"{v}{u}" for v, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if v) or "0s"
    assert parse_duration(text) == parse_duration(((d * 24 + h) * 60 + m) * 60 + s) == ((d * 24 + h) * 60 + m) * 60 + s


def test_explicit_if_id_must_be_in_the_owned_range(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, tunnel("interface: {if_id: 7, address: 169.254.21.1/30}")))
    by_path = {i.path: i for i in e.value.issues}
    assert "0x49000000-0x49ffffff" in by_path["tunnels.to-b.interface.if_id"].message


def test_ike_fragmentation_keys(tmp_path):
    """ike.fragmentation (RFC 7383, default on as strongSwan's fragmentation=yes) and
    ike.fragment_size (the whole IP datagram; default: the engine's 1280)."""
    write_psk(tmp_path)
    t = load_config(write_config(tmp_path, tunnel(""))).tunnels["to-b"]
    assert (t.ike.fragmentation, t.ike.fragment_size) == (True, None)
    t = load_config(write_config(tmp_path, tunnel("ike: {fragmentation: false, fragment_size: 576}"),
                                 "b.yaml")).tunnels["to-b"]
    assert (t.ike.fragmentation, t.ike.fragment_size) == (False, 576)
    for text, fragment in (("ike: {fragment_size: 200}", "576..9000"),
                           ("ike: {fragmentation: maybe}", "true or false"),
                           ("esp: {fragmentation: true}", "unknown key 'fragmentation'")):
        path = write_config(tmp_path, tunnel(text), "c.yaml")
        issue = one_issue(path)
        assert fragment in issue.message and issue.line == line_of(path, "fragment"), text


def test_hybrid_post_quantum_proposals(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("""
        ike:
          proposals:
            - aes256gcm16-prfsha384-x25519-ke1_mlkem768
            - aes256gcm16-prfsha384-x25519-ke1_mlkem1024-ke1_none
            - aes256gcm16-prfsha384-x25519
    """))
    t = load_config(path).tunnels["to-b"]
    assert t.ike.proposal_strings[0] == "aes256gcm16-prfsha384-x25519-ke1_mlkem768"
    assert [int(x.id) for x in t.ike.proposals[0].transforms if x.type == 6] == [36]


@pytest.mark.parametrize("bad, word", [
    ("aes256gcm16-prfsha384-x25519-ke1_mlkem", "unknown algorithm 'ke1_mlkem'"),
    ("aes256gcm16-prfsha384-mlkem768", "ke1_mlkem768"),
    ("aes256gcm16-prfsha384-x25519-ke9_mlkem768", "N = 1..7"),
])
def test_bad_hybrid_proposal_spellings(tmp_path, bad, word):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel(f"""
        ike:
          proposals:
            - aes256gcm16-prfsha384-x25519
            - {bad}
    """))
    issue = one_issue(path)
    assert (issue.line, issue.path) == (line_of(path, bad), "tunnels.to-b.ike.proposals[1]")
    assert word in issue.message


def test_ml_kem_in_esp_proposals_is_refused(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("""
        esp: {proposals: [aes256gcm16-ke1_mlkem768]}
    """))
    issue = one_issue(path)
    assert issue.path == "tunnels.to-b.esp.proposals[0]" and "IKE_FOLLOWUP_KE" in issue.message
