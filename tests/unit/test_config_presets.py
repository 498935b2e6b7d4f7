"""Cloud-peer presets (peer_profile: aws | azure | gcp): defaults and documented limits."""

from __future__ import annotations

from ipaddress import IPv4Interface

import pytest

from appliance.config import load_config
from appliance.config.presets import AWS_RESERVED_INSIDE, GCP_GATEWAY_MTU, classify
from appliance.ike.proposals import parse_proposal
from tests.unit.config_util import PSK, issues_of, line_of, one_issue, tunnel, write_config, write_psk

AWS = "peer_profile: aws\ninterface: {address: 169.254.100.2/30}\n"
AZURE = """peer_profile: azure
ike: {proposals: [aes256gcm16-prfsha384-ecp384], lifetime: 8h}
esp: {proposals: [aes256gcm16-ecp384], lifetime: 27000s}
interface: {address: 169.254.40.1/30}
"""
GCP = "peer_profile: gcp\ninterface: {address: 169.254.50.2/30}\n"


def load_one(tmp_path, body):
    write_psk(tmp_path)
    return load_config(write_config(tmp_path, tunnel(body))).tunnels["to-b"]


def issues(tmp_path, body):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel(body))
    return path, issues_of(path)


def test_classify_uses_the_parsed_proposal():
    assert classify(parse_proposal("aes256gcm16-prfsha384-ecp384", "ike")) == {
        "encr": ["aes256gcm16"], "integ": [], "prf": ["prfsha384"], "dh": ["ecp384"]}
    # aliases come out canonical; the PRF a non-AEAD IKE proposal implies is judged too
    assert classify(parse_proposal("aes128-aes256-sha2_256-curve25519", "ike")) == {
        "encr": ["aes128", "aes256"], "integ": ["sha256"], "prf": ["prfsha256"], "dh": ["x25519"]}
    assert classify(parse_proposal("aes256gcm128-esn", "esp")) == {
        "encr": ["aes256gcm16"], "integ": [], "prf": [], "dh": []}


# --- AWS ---

def test_aws_defaults(tmp_path):
    t = load_one(tmp_path, AWS)
    assert t.peer_profile == "aws"
    assert t.ike.proposal_strings == ("aes256gcm16-prfsha384-ecp384",)   # AWS has no X25519
    assert t.esp.proposal_strings == ("aes256gcm16-ecp384",)
    assert (t.ike.lifetime, t.esp.lifetime, t.esp.rekey_margin) == (28800, 3600, 270)
    assert t.dpd.timeout == 40
    assert t.interface.address == IPv4Interface("169.254.100.2/30")


def test_aws_slash29_inside_cidr(tmp_path):
    path, found = issues(tmp_path, "peer_profile: aws\ninterface: {address: 169.254.100.1/29}")
    assert len(found) == 1, found
    issue = found[0]
    assert issue.path == "tunnels.to-b.interface.address" and issue.line == line_of(path, "/29")
    assert "AWS inside CIDR must be a /30" in issue.message and "peer_profile: aws" in issue.message


@pytest.mark.parametrize("net", [str(n) for n in AWS_RESERVED_INSIDE])
def test_aws_reserved_inside_blocks(tmp_path, net):
    host = str(IPv4Interface(net).network.network_address + 1)
    path, found = issues(tmp_path, f"peer_profile: aws\ninterface: {{address: {host}/30}}")
    assert len(found) == 1 and found[0].path == "tunnels.to-b.interface.address"
    assert f"overlaps {net}, which AWS reserves" in found[0].message


def test_aws_inside_outside_link_local_and_v6(tmp_path):
    path, found = issues(tmp_path, "peer_profile: aws\ninterface: {address: 10.9.9.1/30, "
                                   "address6: '2001:db8::1/126'}")
    got = {i.path: i.message for i in found}
    assert "inside 169.254.0.0/16" in got["tunnels.to-b.interface.address"]
    assert "/126 inside fd00::/8" in got["tunnels.to-b.interface.address6"]


def test_aws_needs_inside_address(tmp_path):
    path, found = issues(tmp_path, "peer_profile: aws")
    assert [i.path for i in found] == ["tunnels.to-b.interface.address"]
    assert "needs interface.address written out" in found[0].message


@pytest.mark.parametrize("psk", ["short7!", "has-a-dash-in-it", "0startsWithZero", "x" * 65, "spaces in key"])
def test_aws_psk_rules(tmp_path, psk):
    write_psk(tmp_path, value=psk)
    path = write_config(tmp_path, tunnel(AWS))
    issue = one_issue(path)
    assert issue.path == "tunnels.to-b.auth.psk_file" and issue.line == line_of(path, "psk_file")
    assert "8-64 characters" in issue.message and psk not in str(issue)


@pytest.mark.parametrize("psk", ["abcdefgh", "A.b_c.D_e1234567", "9" * 64])
def test_aws_psk_accepted(tmp_path, psk):
    write_psk(tmp_path, value=psk)
    assert load_config(write_config(tmp_path, tunnel(AWS))).tunnels["to-b"].auth.psk.reveal() == psk.encode()


@pytest.mark.parametrize("extra,path,fragment", [
    ("ike: {lifetime: 9h}", "ike.lifetime", "900-28800 s, not 32400 s"),
    ("esp: {lifetime: 2h}", "esp.lifetime", "Phase 2 lifetime must be 900-3600 s, not 7200 s"),
    ("ike: {lifetime: 1h}\nesp: {lifetime: 1h}", "esp.lifetime", "must be less than the Phase 1 lifetime"),
    ("esp: {rekey_margin: 30s}", "esp.rekey_margin", "between 60 s and half the Phase 2 lifetime (1800 s)"),
    ("esp: {lifetime: 20m, rekey_margin: 11m}", "esp.rekey_margin", "(600 s), not 660 s"),
    ("dpd: {timeout: 20s}", "dpd.timeout", "at least 30 s, not 20 s"),
    ("ike: {proposals: [aes256gcm16-prfsha384-x25519]}", "ike.proposals[0]",
     "key exchange (DH group) 'x25519' is not accepted by AWS"),
    ("esp: {proposals: [chacha20poly1305]}", "esp.proposals[0]", "encryption 'chacha20poly1305' is not accepted"),
])
def test_aws_limits(tmp_path, extra, path, fragment):
    cfg_path, found = issues(tmp_path, AWS + extra)
    assert len(found) == 1, found
    assert found[0].path == f"tunnels.to-b.{path}" and fragment in found[0].message, found[0]
    assert found[0].line == line_of(cfg_path, path.split(".")[0] + ":" if "[" not in path else "proposals")


def test_aws_short_phase1_also_breaks_the_phase2_rule(tmp_path):
    _, found = issues(tmp_path, AWS + "ike: {lifetime: 10m}")
    assert {(i.path, i.message.split(" (peer_profile")[0]) for i in found} == {
        ("tunnels.to-b.ike.lifetime", "AWS Phase 1 lifetime must be 900-28800 s, not 600 s"),
        ("tunnels.to-b.esp.lifetime", "AWS Phase 2 lifetime (3600 s) must be less than the Phase 1 lifetime (600 s)")}
    # the default esp.lifetime is not in the file: its issue points at the tunnel
    assert {i.path: i.line for i in found}["tunnels.to-b.esp.lifetime"] == 2


# --- Azure ---

def test_azure_valid_and_defaults(tmp_path):
    t = load_one(tmp_path, AZURE)
    assert t.peer_profile == "azure" and t.dpd.timeout == 45
    assert (t.ike.lifetime, t.esp.lifetime) == (28800, 27000)


def test_azure_needs_every_parameter_explicit(tmp_path):
    path, found = issues(tmp_path, "peer_profile: azure\ninterface: {address: 169.254.40.1/30}")
    assert sorted(i.path for i in found) == [
        "tunnels.to-b.esp.lifetime", "tunnels.to-b.esp.proposals",
        "tunnels.to-b.ike.lifetime", "tunnels.to-b.ike.proposals"]
    assert all("explicitly" in i.message and "Azure" in i.message for i in found)


@pytest.mark.parametrize("old,new,path,fragment", [
    ("[aes256gcm16-prfsha384-ecp384]", "[aes256gcm16-prfsha384-ecp384, aes128gcm16-prfsha256-ecp256]",
     "ike.proposals", "exactly one policy combination"),
    ("[aes256gcm16-ecp384]", "[aes256gcm16-aes128gcm16-ecp384]", "esp.proposals[0]", "one algorithm per role"),
    ("prfsha384-ecp384]", "prfsha384-x25519]", "ike.proposals[0]", "'x25519' is not accepted by Azure"),
    ("[aes256gcm16-ecp384]", "[aes256-sha384]", "esp.proposals[0]", "integrity 'sha384' is not accepted by Azure"),
    ("lifetime: 27000s", "lifetime: 200s, rekey_margin: 1m", "esp.lifetime", "at least 300 s"),
    ("interface:", "dpd: {timeout: 5s}\ninterface:", "dpd.timeout", "9-3600 s"),
])
def test_azure_limits(tmp_path, old, new, path, fragment):
    assert old in AZURE
    _, found = issues(tmp_path, AZURE.replace(old, new, 1))
    assert len(found) == 1, found
    assert found[0].path == f"tunnels.to-b.{path}" and fragment in found[0].message, found[0]


# --- GCP ---

def test_gcp_defaults(tmp_path):
    t = load_one(tmp_path, GCP)
    assert (t.ike.lifetime, t.esp.lifetime) == (36000, 10800)
    assert t.interface.outer_mtu == GCP_GATEWAY_MTU == 1460 and t.interface.mtu is None
    assert t.ike.proposal_strings == ("aes256gcm16-prfsha384-ecp384",)


@pytest.mark.parametrize("extra,path,fragment", [
    ("interface: {address: 169.254.50.2/30, outer_mtu: 1500}", "interface.outer_mtu", "gateway MTU of 1460"),
    ("interface: {address: 169.254.50.2/30, mtu: 1460, outer_mtu: 1460}", "interface.mtu", "smaller than outer_mtu"),
    ("interface: {address: 169.254.50.2/30, mtu: 1460, outer_mtu: auto}", "interface.mtu", "pre-fragmentation"),
    ("local_id: gw.example.net", "local_id", "only 1:1 NAT"),
    ("local_id: 10.0.0.5", "local_id", "external (public) IPv4 address, not 10.0.0.5"),
])
def test_gcp_limits(tmp_path, extra, path, fragment):
    body = GCP + extra if extra.startswith("local_id") else "peer_profile: gcp\n" + extra
    _, found = issues(tmp_path, body)
    assert len(found) == 1, found
    assert found[0].path == f"tunnels.to-b.{path}" and fragment in found[0].message, found[0]


def test_gcp_public_local_id_accepted(tmp_path):
    t = load_one(tmp_path, GCP + "local_id: 52.1.2.3")
    assert t.local_id.kind == "ipv4" and t.local_id.value == "52.1.2.3"


def test_unknown_profile(tmp_path):
    _, found = issues(tmp_path, "peer_profile: oracle")
    assert found[0].path == "tunnels.to-b.peer_profile" and "allowed: aws, azure, gcp" in found[0].message


def test_presets_do_not_leak_the_psk(tmp_path):
    _, found = issues(tmp_path, AWS + "esp: {lifetime: 2h}\ndpd: {timeout: 1s}")
    assert len(found) == 2 and all(PSK not in str(i) for i in found)
