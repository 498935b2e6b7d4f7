"""A 3-level RSA-4096 certificate chain between our engine (appliance/ikerunner.py) and
strongSwan 5.9.8 over a path that drops IP fragments (issue 10: certificates + RFC 7383).

The PKI is made here (tests/peers/certs.py, kind "rsa4096"): one root, and under it one
intermediate CA per side, each issuing that side's end entity; both sides trust the root only,
so each must send its end entity *and* its intermediate (RFC 7296 §3.6), which with 4096-bit
keys and a 512-octet AUTH makes every IKE_AUTH message about 3.5 KB. The path is that of the
Internet at its worst: both veth ends have an MTU of 1280 and nftables drops every IPv4 fragment
(tests/host/test_fragmentation_strongswan.py uses the same rule with smaller messages). Both
sides keep their default IKE fragment size, 1280 (ours: `fragmentation.size_ipv4`, strongSwan's
`charon.fragment_size`).

With fragmentation on, the chain crosses as Encrypted Fragment payloads both ways, whichever
side initiates. With ours off, nothing is announced, the IKE_AUTH goes whole, its IP fragments
are dropped, and the exchange fails cleanly: our side reports the failure and why, no exception
in our log, no SA and no Child SA left on either side.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.host.ikerunner_proc import EngineProc, tunnel_json
from tests.peers.certs import TestPKI
from tests.peers.fixtures import ns_pair, strongswan_factory  # noqa: F401
from tests.peers.strongswan import Child, Conn, Retransmit

MTU = 1280
NOFRAG = """
table ip isthmus_nofrag {
  chain pre {
    type filter hook prerouting priority -500; policy accept;
    ip frag-off & 0x3fff != 0 counter drop
  }
}
"""
_PKI: dict[str, TestPKI] = {}


def pkis() -> tuple[TestPKI, TestPKI]:
    """(strongSwan's intermediate, ours) under one RSA-4096 root; made once per session (RSA-4096
    key generation takes seconds)."""
    if not _PKI:
        _PKI["sw"] = TestPKI("rsa4096", intermediate_cn="strongSwan's intermediate CA (rsa4096)")
        _PKI["us"] = _PKI["sw"].sibling("our intermediate CA (rsa4096)")
        _PKI["sw_cred"] = _PKI["sw"].issue("b.example.net")
        _PKI["us_cred"] = _PKI["us"].issue("a.example.net")
    return _PKI["sw"], _PKI["us"]


def _bad_path(*sides) -> None:
    for s in sides:
        s.ns.run(["ip", "link", "set", s.ifname, "mtu", str(MTU)])
        s.ns.run(["nft", "-f", "-"], input=NOFRAG)


def _dropped(side) -> int:
    out = side.ns.run(["nft", "list", "chain", "ip", "isthmus_nofrag", "pre"]).stdout
    m = re.search(r"counter packets (\d+)", out)
    return int(m.group(1)) if m else -1


def _swan(strongswan_factory, side_sw, side_us):
    p_sw, _ = pkis()
    side_sw.ns.run(["ip", "addr", "add", "10.2.0.1/16", "dev", "lo"])   # kernel-libipsec: route from local_ts
    sw = strongswan_factory(side_sw, "sw", retransmit=Retransmit(timeout=1.0, base=1.4, tries=3))
    p_sw.write_strongswan(sw.swanctl_dir, _PKI["sw_cred"], "me")
    sw.load(Conn(local_addrs=[side_sw.addr4], remote_addrs=[side_us.addr4], local_id="b.example.net",
                 remote_id="a.example.net", auth="pubkey", cert="me.pem", proposals=["aes256gcm16-prfsha384-x25519"],
                 fragmentation="yes",
                 children=[Child(local_ts=["10.2.0.0/16"], remote_ts=["10.1.0.0/16"], esp_proposals=["aes256gcm16"])]))
    return sw


def _ours(tmp_path, side_us, side_sw, *, start: bool, enabled: bool = True) -> EngineProc:
    _, p_us = pkis()
    cred = _PKI["us_cred"]
    d = tmp_path / "ours-files"
    d.mkdir(parents=True, exist_ok=True)
    (d / "cert.pem").write_bytes(cred.bundle_pem)            # end entity + our intermediate
    (d / "key.pem").write_bytes(cred.key_pem)
    (d / "key.pem").chmod(0o600)
    (d / "ca.pem").write_bytes(p_us.root_pem)                 # the root only
    cert = {"certificate": str(d / "cert.pem"), "key": str(d / "key.pem"), "ca": [str(d / "ca.pem")]}
    t = tunnel_json(side_us, side_sw, "to-b", local_id="a.example.net", remote_id="b.example.net", psk=b"",
                    cert=cert, start=start, local_ts=["10.1.0.0/16"], remote_ts=["10.2.0.0/16"],
                    fragmentation={"enabled": enabled}, half_open_timeout=5,
                    retransmit={"timeout": 1.0, "base": 1.4, "tries": 3})
    return EngineProc(tmp_path / "ours", side_us, [t])


@pytest.mark.parametrize("initiator", ["ours", "strongswan"])
def test_rsa4096_chain_crosses_a_path_that_drops_ip_fragments(tmp_path, ns_pair, strongswan_factory, initiator):
    side_us, side_sw = ns_pair
    _bad_path(side_us, side_sw)
    sw = _swan(strongswan_factory, side_sw, side_us)
    with _ours(tmp_path, side_us, side_sw, start=initiator == "ours") as us:
        if initiator == "strongswan":
            sw.initiate_async("c")
        inst = us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 30, what="Child SA")
        sa = sw.wait_ike_up(timeout=15)
        up = us.of("IkeSaUp")[0]
        assert (up["spi_i"], up["spi_r"]) == (sa.spi_i, sa.spi_r) and sa.initiator == (initiator == "strongswan")
        (c,) = sa.installed()
        assert (inst["spi_in"], inst["spi_out"]) == (c.spi_out_int, c.spi_in_int)
        log, ours_log = sw.log_text(), us.log_text()
    req, resp = ("request", "response") if initiator == "ours" else ("response", "request")
    # the chain: strongSwan received our end entity and intermediate and built the path to the root
    assert re.search(r"received end entity cert \"O=Isthmus tests, CN=a.example.net\"", log), log[-3000:]
    assert re.search(r"received issuer cert \"O=Isthmus tests, CN=our intermediate CA \(rsa4096\)\"", log)
    assert re.search(r"authentication of 'a.example.net' with RSA\S* successful", log)
    assert re.search(r"peer b.example.net authenticated with DIGITAL_SIGNATURE", ours_log), ours_log[-2000:]
    # ... and every IKE_AUTH crossed as IKE fragments, both ways; no IP fragment was needed
    assert re.search(rf"parsed IKE_AUTH {req} 1 \[ EF\(1/[2-9]\) \]", log), log[-3000:]
    assert "reassembled fragmented IKE message" in log
    assert re.search(rf"generating IKE_AUTH {resp} 1 \[ EF\(1/[2-9]\) \]", log)
    m = re.search(r"splitting IKE message \((\d+) bytes\) into (\d+) fragments", log)
    assert m and int(m.group(1)) > 2 * MTU, m and m.group(0)
    print(f"\nstrongSwan's IKE_AUTH: {m.group(1)} octets in {m.group(2)} fragments")
    assert _dropped(side_us) == 0 and _dropped(side_sw) == 0
    assert "Traceback" not in ours_log


@pytest.mark.parametrize("initiator", ["ours", "strongswan"])
def test_without_our_fragmentation_the_chain_fails_cleanly(tmp_path, ns_pair, strongswan_factory, initiator):
    side_us, side_sw = ns_pair
    _bad_path(side_us, side_sw)
    sw = _swan(strongswan_factory, side_sw, side_us)
    with _ours(tmp_path, side_us, side_sw, start=initiator == "ours", enabled=False) as us:
        if initiator == "strongswan":
            sw.initiate_async("c")     # its IKE_AUTH goes whole (nothing negotiated) and is lost
        f = us.wait_event(lambda e: e["event"] in ("IkeSaFailed", "IkeSaDown"), 40, what="our SA's end")
        st = us.status()              # (our initiator tries again after reconnect_delay, 5 s)
        if initiator == "strongswan":
            deadline = time.monotonic() + 30
            while sw.list_sas() and time.monotonic() < deadline:    # strongSwan gives up as well
                time.sleep(0.5)
        swan_sas = sw.list_sas()
        log, ours_log = sw.log_text(), us.log_text()
        events = [e["event"] for e in us.events]
    print(f"\nours ({initiator} initiating): {f}")
    assert "IkeSaUp" not in events and "ChildSaInstalled" not in events
    assert st["sas"] == [] and st["half_open"] == 0, st
    if initiator == "strongswan":
        assert swan_sas == [], swan_sas
    else:   # strongSwan's responder keeps a half-open SA for our attempt until its own timeout
        assert all(sa.state == "CONNECTING" and not sa.children for sa in swan_sas), swan_sas
    assert "EF(" not in log and "Traceback" not in ours_log
    assert _dropped(side_us if initiator == "strongswan" else side_sw) > 0     # the whole IKE_AUTH, as IP fragments
    # the reason says what happened and what to do
    if initiator == "ours":
        assert "no response to IKE_AUTH" in f["reason"] and "IKE fragmentation (RFC 7383) is off here" in f["reason"]
    else:
        assert "IKE_AUTH did not complete" in f["reason"] and "supports IKE fragmentation" in f["reason"]
    assert f["reason"] in ours_log
