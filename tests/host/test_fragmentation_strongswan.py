"""IKE fragmentation (RFC 7383) between our engine (appliance/ikerunner.py) and strongSwan 5.9.8
in two host namespaces, each side initiating.

The path drops IP fragments: both veth ends have an MTU of 420 and nftables drops every IPv4
fragment before it is reassembled, so an IKE message that does not fit one 500-octet datagram
is lost unless IKE itself fragments it. Both sides use 400-octet IKE fragments (ours:
`fragmentation.size_ipv4`, strongSwan: `charon.fragment_size`) and twelve traffic selectors each,
which makes every IKE_AUTH message, request and response, larger than that: each must cross as
Encrypted Fragment payloads. charon's log shows it reassembling ours and splitting its own; with
our fragmentation switched off the same path fails cleanly.
"""

from __future__ import annotations

import re

import pytest

from tests.host.ikerunner_proc import EngineProc, tunnel_json
from tests.peers.fixtures import ns_pair, strongswan_factory  # noqa: F401
from tests.peers.strongswan import Child, Conn, Retransmit

PSK = "fragments-Secret-0123456789"
MTU = 420
FRAGMENT_SIZE = 400
OUR_NETS = [f"10.1.{i}.0/24" for i in range(12)]
SWAN_NETS = [f"10.2.{i}.0/24" for i in range(12)]
NOFRAG = """
table ip isthmus_nofrag {
  chain pre {
    type filter hook prerouting priority -500; policy accept;
    ip frag-off & 0x3fff != 0 counter drop
  }
}
"""


def _bad_path(*sides) -> None:
    for s in sides:
        s.ns.run(["ip", "link", "set", s.ifname, "mtu", str(MTU)])
        s.ns.run(["nft", "-f", "-"], input=NOFRAG)


def _dropped(side) -> int:
    out = side.ns.run(["nft", "list", "chain", "ip", "isthmus_nofrag", "pre"]).stdout
    m = re.search(r"counter packets (\d+)", out)
    return int(m.group(1)) if m else -1


def _swan(strongswan_factory, side_sw, side_us):
    # kernel-libipsec routes each policy into its TUN device from an address inside the local
    # selector: give it one per network
    for net in SWAN_NETS:
        side_sw.ns.run(["ip", "addr", "add", net.replace(".0/24", ".1/24"), "dev", "lo"])
    sw = strongswan_factory(side_sw, "sw", charon={"fragment_size": FRAGMENT_SIZE},
                            retransmit=Retransmit(timeout=1.0, base=1.4, tries=3))
    sw.load(Conn(local_addrs=[side_sw.addr4], remote_addrs=[side_us.addr4], local_id="b.example.net",
                 remote_id="a.example.net", psk=PSK, proposals=["aes256gcm16-prfsha384-x25519"],
                 fragmentation="yes",
                 children=[Child(local_ts=SWAN_NETS, remote_ts=["10.1.0.0/16"], esp_proposals=["aes256gcm16"])]))
    return sw


def _ours(tmp_path, side_us, side_sw, *, start: bool, enabled: bool = True) -> EngineProc:
    t = tunnel_json(side_us, side_sw, "to-b", local_id="a.example.net", remote_id="b.example.net",
                    psk=PSK.encode(), start=start, local_ts=OUR_NETS, remote_ts=["10.2.0.0/16"],
                    fragmentation={"enabled": enabled, "size_ipv4": FRAGMENT_SIZE},
                    retransmit={"timeout": 1.0, "base": 1.4, "tries": 3})
    return EngineProc(tmp_path / "ours", side_us, [t])


def _check_fragments_crossed(sw, initiator: str) -> None:
    log = sw.log_text()
    req, resp = ("request", "response") if initiator == "ours" else ("response", "request")
    # strongSwan put our fragments together ...
    assert re.search(rf"parsed IKE_AUTH {req} 1 \[ EF\(1/\d+\) \]", log), sw.log_tail()
    assert "reassembled fragmented IKE message" in log
    # ... and sent its own as fragments, which we reassembled (the SA is up)
    assert re.search(r"splitting IKE message \(\d+ bytes\) into \d+ fragments", log), sw.log_tail()
    assert re.search(rf"generating IKE_AUTH {resp} 1 \[ EF\(1/\d+\) \]", log)


@pytest.mark.parametrize("initiator", ["ours", "strongswan"])
def test_ike_auth_fragmented_both_ways_over_a_path_that_drops_ip_fragments(tmp_path, ns_pair,
                                                                           strongswan_factory, initiator):
    side_us, side_sw = ns_pair
    _bad_path(side_us, side_sw)
    sw = _swan(strongswan_factory, side_sw, side_us)
    with _ours(tmp_path, side_us, side_sw, start=initiator == "ours") as us:
        if initiator == "strongswan":
            sw.initiate_async("c")
        inst = us.wait_event(lambda e: e["event"] == "ChildSaInstalled", 20, what="Child SA")
        sa = sw.wait_ike_up()
        up = us.of("IkeSaUp")[0]
        assert (up["spi_i"], up["spi_r"]) == (sa.spi_i, sa.spi_r)
        assert sa.initiator == (initiator == "strongswan")
        (c,) = sa.installed()
        assert (inst["spi_in"], inst["spi_out"]) == (c.spi_out_int, c.spi_in_int)
        assert sorted(c.local_ts) == sorted(SWAN_NETS) and sorted(c.remote_ts) == sorted(OUR_NETS)
    _check_fragments_crossed(sw, initiator)
    assert _dropped(side_us) == 0 and _dropped(side_sw) == 0   # no IP fragment was needed


def test_without_our_fragmentation_the_same_path_fails_cleanly(tmp_path, ns_pair, strongswan_factory):
    """The control: fragmentation off on our side - nothing announced, IKE_AUTH sent whole, its
    IP fragments dropped, our initiator gives up after its retransmissions."""
    side_us, side_sw = ns_pair
    _bad_path(side_us, side_sw)
    sw = _swan(strongswan_factory, side_sw, side_us)
    with _ours(tmp_path, side_us, side_sw, start=True, enabled=False) as us:
        f = us.wait_event(lambda e: e["event"] == "IkeSaFailed", 30, what="IkeSaFailed")
        assert "no response to IKE_AUTH" in f["reason"]
        assert not us.of("IkeSaUp")
    assert _dropped(side_sw) > 0               # our whole IKE_AUTH, as IP fragments
    assert "EF(" not in sw.log_text() and "FRAG_SUP" not in re.findall(r"parsed IKE_SA_INIT request.*", sw.log_text())[0]
