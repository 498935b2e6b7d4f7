"""The BGP peer harnesses prove each other: BIRD in one namespace, FRR bgpd in the other, an eBGP
session over veth, and each learns the prefixes the other originates (IPv4 and IPv6)."""

from __future__ import annotations

import pytest

from tests.peers.bird import Bird
from tests.peers.daemon import BgpNeighbor, PeerError
from tests.peers.frr import Frr
from tests.peers.topology import pair_of_namespaces

# Documentation prefixes only (RFC 5737, RFC 3849): these are announcements, not traffic targets.
BIRD_NETS = ["198.51.100.0/24", "2001:db8:b1:d::/64"]
FRR_NETS = ["203.0.113.0/24", "2001:db8:f:a::/64"]


@pytest.fixture
def sides():
    with pair_of_namespaces("bgp") as s:
        yield s


def test_bird_and_frr_exchange_routes(sides, tmp_path):
    a, b = sides
    with Bird(tmp_path / "bird", a.name, router_id=a.addr4, local_as=65001, announce=BIRD_NETS,
              neighbors=[BgpNeighbor(b.addr4, 65002, local_address=a.addr4, hold_time=9),
                         BgpNeighbor(b.addr6, 65002, local_address=a.addr6, hold_time=9)]) as bird, \
         Frr(tmp_path / "frr", b.name, router_id=b.addr4, local_as=65002, announce=FRR_NETS,
             neighbors=[BgpNeighbor(a.addr4, 65001, local_address=b.addr4, hold_time=9),
                        BgpNeighbor(a.addr6, 65001, local_address=b.addr6, hold_time=9)]) as frr:
        for i in (0, 1):
            bird.wait_established(i)
        frr.wait_established(a.addr4)
        frr.wait_established(a.addr6)
        bird.wait_route(FRR_NETS[0], 0)
        bird.wait_route(FRR_NETS[1], 1)
        frr.wait_route(BIRD_NETS[0], a.addr4)
        frr.wait_route(BIRD_NETS[1], a.addr6)
        assert bird.learned(0) == {FRR_NETS[0]} and bird.learned(1) == {FRR_NETS[1]}
        assert frr.learned_from(a.addr4) == {BIRD_NETS[0]}
        assert frr.learned_from(a.addr6, "ipv6") == {BIRD_NETS[1]}

        # The session really depends on the peer: stop FRR and BIRD loses both sessions. (Its
        # routes may stay a while as stale: FRR announces graceful restart, RFC 4724.)
        frr.stop()
        bird.wait_until(lambda: bird.bgp_state(0) != "Established" and bird.bgp_state(1) != "Established", 15,
                        "both sessions down")


def test_wrong_peer_as_is_refused(sides, tmp_path):
    a, b = sides
    with Bird(tmp_path / "bird", a.name, router_id=a.addr4, local_as=65001,
              neighbors=[BgpNeighbor(b.addr4, 65099, local_address=a.addr4)]) as bird, \
         Frr(tmp_path / "frr", b.name, router_id=b.addr4, local_as=65002,
             neighbors=[BgpNeighbor(a.addr4, 65001, local_address=b.addr4)]):
        with pytest.raises(PeerError, match="timed out"):
            bird.wait_established(timeout=5)
        assert "Bad peer AS: 65002" in bird.log_path.read_text()
