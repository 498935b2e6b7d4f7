"""The XFRM netlink layer, nft table and rtnetlink helpers against the host kernel, in network
namespaces. The host kernel has the XFRM policy database (no ESP, no XFRM interfaces), so
policies, SA lookups, batches, namespaces and the nft table are tested here; SAs and tunnels in
tests/lab."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import re

import pytest

from appliance.xfrm import nft
from appliance.xfrm.kernel import PolicySpec, Xfrm
from appliance.xfrm.link import Links
from appliance.xfrm.netlink import NamespaceError, NetlinkError
from tests.netns import Netns, veth_pair

IP = ipaddress.ip_address
NETS = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
OURS = 0x49000010


def policies(ns: Netns) -> list[tuple]:
    """(dir, src, dst, if_id, (tmpl src, tmpl dst)) of each policy, as `ip xfrm policy` shows it."""
    found = []
    for block in re.split(r"\n(?=src )", ns.run("ip xfrm policy").stdout.strip()):
        if not block.startswith("src "):
            continue
        sel = re.match(r"src (\S+) dst (\S+)", block)
        if_id = re.search(r"if_id (0x[0-9a-f]+)", block)
        tmpl = re.search(r"tmpl src (\S+) dst (\S+)", block)
        found.append((re.search(r"dir (\w+)", block).group(1), sel.group(1), sel.group(2),
                      int(if_id.group(1), 16) if if_id else 0, tmpl.groups() if tmpl else None))
    return sorted(found)


def specs(if_id: int) -> list[PolicySpec]:
    a, b = IP("192.0.2.1"), IP("192.0.2.2")
    return [PolicySpec(d, net, if_id, if_id, a if d == "out" else b, b if d == "out" else a)
            for net in NETS for d in ("out", "in", "fwd")]


def test_policies_round_trip_through_the_kernel():
    with Netns("x") as ns:
        x = Xfrm(ns.name)
        try:
            for s in specs(OURS):
                x.add_policy(s)
            seen = policies(ns)  # iproute2 is the independent reader
            assert len(seen) == 6
            assert ("out", "0.0.0.0/0", "0.0.0.0/0", OURS, ("192.0.2.1", "192.0.2.2")) in seen
            assert ("fwd", "::/0", "::/0", OURS, ("192.0.2.2", "192.0.2.1")) in seen
            dumped = {(p.direction, str(p.src), p.if_id, p.templates[0][:2]) for p in x.dump_policies()}
            assert ("in", "::/0", OURS, (IP("192.0.2.2"), IP("192.0.2.1"))) in dumped and len(dumped) == 6
            with pytest.raises(NetlinkError) as e:
                x.add_policy(specs(OURS)[0])
            assert e.value.code == 17 and str(e.value).startswith("adding the out policy 0.0.0.0/0 if_id 0x49000010")
            moved = PolicySpec("out", NETS[0], OURS, OURS, IP("198.51.100.1"), IP("192.0.2.2"))
            x.add_policy(moved, update=True)
            assert ("out", "0.0.0.0/0", "0.0.0.0/0", OURS, ("198.51.100.1", "192.0.2.2")) in policies(ns)
            assert x.delete_policy("in", NETS[1], OURS) is True
            assert x.delete_policy("in", NETS[1], OURS, missing_ok=True) is False
            with pytest.raises(NetlinkError, match="No such file or directory"):
                x.delete_policy("in", NETS[1], OURS)
        finally:
            x.close()


def test_flush_ours_leaves_everyone_elses_objects():
    with Netns("x") as ns:
        ns.run("ip xfrm policy add dir out src 10.0.0.0/8 dst 10.0.0.0/8 if_id 5 "
               "tmpl src 192.0.2.1 dst 192.0.2.9 proto esp mode tunnel && "
               "ip xfrm policy add dir in src 10.0.0.0/8 dst 10.0.0.0/8 "
               "tmpl src 192.0.2.9 dst 192.0.2.1 proto esp mode tunnel && "
               f"ip xfrm policy add dir out src 10.1.0.0/16 dst 10.2.0.0/16 if_id {0x49ABCDEF:#x} "
               "tmpl src 192.0.2.1 dst 192.0.2.9 proto esp mode tunnel")
        with Xfrm(ns.name) as x:
            x.batch([x.add_policy_request(s) for s in specs(OURS) + specs(OURS + 1)])
            assert len(policies(ns)) == 15
            assert x.flush_ours() == (0, 13)
            assert x.flush_ours() == (0, 0)
        assert policies(ns) == [("in", "10.0.0.0/8", "10.0.0.0/8", 0, ("192.0.2.9", "192.0.2.1")),
                                ("out", "10.0.0.0/8", "10.0.0.0/8", 5, ("192.0.2.1", "192.0.2.9"))]


def test_batch_reports_each_outcome():
    with Netns("x") as ns, Xfrm(ns.name) as x:
        many = [PolicySpec("out", ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.0/24"), OURS, OURS,
                           IP("192.0.2.1"), IP("192.0.2.2")) for i in range(600)]
        reqs = [x.add_policy_request(s) for s in many]
        reqs.insert(300, x.add_policy_request(many[10]))  # a duplicate in the middle
        results = x.batch(reqs)
        assert len(results) == 601 and [i for i, r in enumerate(results) if r is not None] == [300]
        assert results[300].code == 17
        assert len(x.dump_policies()) == 600
        assert x.flush_ours() == (0, 600)


def test_sa_lookups_and_missing_namespace():
    with Netns("x") as ns, Xfrm(ns.name) as x:
        assert x.get_sa(IP("192.0.2.2"), 0x1234) is None
        assert x.dump_sas() == []
        assert x.delete_sa(IP("192.0.2.2"), 0x1234, missing_ok=True) is False
        with pytest.raises(NetlinkError, match=r"deleting SA 0x00001234 to 192.0.2.2: No such process \(ESRCH\)"):
            x.delete_sa(IP("192.0.2.2"), 0x1234)
    with pytest.raises(NamespaceError, match="network namespace 'ist-no-such-ns' does not exist"):
        Xfrm("ist-no-such-ns")


def test_namespaces_are_separate():
    with Netns("x") as one, Netns("y") as two, Xfrm(one.name) as x:
        x.add_policy(specs(OURS)[0])
        assert len(policies(one)) == 1 and policies(two) == []


def test_nft_table_is_replaced_whole_and_alone():
    with Netns("x") as ns:
        ns.run("nft add table inet other && nft add chain inet other c '{ type filter hook input priority 0; }'")
        assert nft.read_clamps(ns.name) is None
        nft.apply([nft.MssClamp("to-b", "xfrm-b", 1406, 1386), nft.MssClamp("to-c", "xfrm-c", 1382, 1362)], ns.name)
        assert nft.read_clamps(ns.name) == [nft.MssClamp("to-b", "xfrm-b", 1406, 1386),
                                            nft.MssClamp("to-c", "xfrm-c", 1382, 1362)]
        nft.apply([nft.MssClamp("to-c", "xfrm-c", 1300, 1280)], ns.name)
        assert nft.read_clamps(ns.name) == [nft.MssClamp("to-c", "xfrm-c", 1300, 1280)]
        listing = json.loads(ns.run("nft -j list ruleset").stdout)["nftables"]
        chains = {(c["chain"]["table"], c["chain"]["name"]) for c in listing if "chain" in c}
        assert chains == {("other", "c"), ("isthmus", "mss_clamp")}
        nft.apply([], ns.name)
        assert nft.read_clamps(ns.name) == []
        nft.remove(ns.name)
        assert nft.read_clamps(ns.name) is None
        nft.remove(ns.name)  # removing twice is fine
        assert "table inet other" in ns.run("nft list ruleset").stdout


def _nft_handles(ns: Netns) -> tuple[int, dict[str, int]]:
    """(table handle, rule comment + family -> rule handle) as `nft -j list` reports them."""
    listing = json.loads(ns.run("nft -j list table inet isthmus").stdout)["nftables"]
    table = next(x["table"]["handle"] for x in listing if "table" in x)
    rules = {}
    for x in listing:
        if "rule" in x:
            r = x["rule"]
            proto = next(e["match"]["right"] for e in r["expr"] if "match" in e
                         and e["match"]["left"] == {"meta": {"key": "nfproto"}})
            rules[f"{r['comment']} {proto}"] = r["handle"]
    return table, rules


def test_nft_clamps_change_one_tunnel_at_a_time():
    """Issue 13: a Child SA coming up or going down changes its tunnel's four rules only (the
    table, and every other tunnel's rules, keep their handles); a table changed behind our back
    is rewritten whole at the next change."""
    b, c, d = (nft.MssClamp("to-b", "xfrm-b", 1406, 1386), nft.MssClamp("to-c", "xfrm-c", 1382, 1362),
               nft.MssClamp("to-d", "xfrm-d", 1300, 1280))
    with Netns("x") as ns:
        table = nft.ClampTable(ns.name)
        try:
            table.reset([])
            table.sync({}, {"to-b": b})
            table.sync({"to-b": b}, {"to-b": b, "to-c": c})
            assert nft.read_clamps(ns.name) == [b, c]
            t0, rules0 = _nft_handles(ns)
            assert len(rules0) == 8
            c2 = nft.MssClamp("to-c", "xfrm-c", 1350, 1330)
            table.sync({"to-b": b, "to-c": c}, {"to-b": b, "to-c": c2, "to-d": d})
            assert nft.read_clamps(ns.name) == [b, c2, d]
            t1, rules1 = _nft_handles(ns)
            assert t1 == t0, "the table was rewritten"
            assert {k: v for k, v in rules1.items() if "to-b" in k} == {k: v for k, v in rules0.items() if "to-b" in k}
            assert not {v for k, v in rules1.items() if "to-c" in k} & set(rules0.values())
            table.sync({"to-b": b, "to-c": c2, "to-d": d}, {"to-c": c2, "to-d": d})
            assert nft.read_clamps(ns.name) == [c2, d]
            assert _nft_handles(ns)[0] == t0
            # someone deletes one of our rules: our delete by handle fails, the change is refused
            # as a whole, and the next one rewrites the table
            victim = _nft_handles(ns)[1]["isthmus:to-c out ipv4"]
            ns.run(f"nft delete rule inet isthmus mss_clamp handle {victim}")
            with pytest.raises(nft.NftError):
                table.sync({"to-c": c2, "to-d": d}, {"to-d": d})
            table.sync({"to-c": c2, "to-d": d}, {"to-d": d})
            assert nft.read_clamps(ns.name) == [d]
            assert _nft_handles(ns)[0] != t0
        finally:
            table.close()


_IN_PROCESS = """
import sys
from appliance.xfrm import nft
t = nft.ClampTable(None)
t.reset([])
b, c = nft.MssClamp("to-b", "xfrm-b", 1406, 1386), nft.MssClamp("to-c", "xfrm-c", 1382, 1362)
t.sync({}, {"to-b": b, "to-c": c})
t.sync({"to-b": b, "to-c": c}, {"to-c": c})
try:
    t.reset([c, nft.MssClamp("to-d", 'x"y', 1300, 1280)])     # a whole rewrite is an nft script
except nft.NftError as e:
    print("refused:", str(e).splitlines()[0])
"""


def test_nft_netlink_rules_are_the_ones_nft_makes():
    """A tunnel's rules sent as our own nf_tables messages (issue 13) are, byte code and
    comment, what nft itself makes of the script (`nft --debug=netlink` lists both), and a
    refused transaction carries the kernel's reason."""
    import re

    b = nft.MssClamp("to-b", "xfrm-b", 1406, 1386)
    b2 = nft.MssClamp("to-b", "xfrm-b", 1300, 1280)
    with Netns("x") as ns:
        table = nft.ClampTable(ns.name)
        try:
            assert table._nl is not None
            table.reset([b])                  # an nft script
            listing = lambda: re.sub(r"(?m)^(inet isthmus mss_clamp)[ 0-9]*$", r"\1",
                                     ns.run("nft --debug=netlink list table inet isthmus").stdout)
            by_nft = listing()
            table.sync({"to-b": b}, {"to-b": b2})
            table.sync({"to-b": b2}, {"to-b": b})     # our messages
            assert listing() == by_nft
            assert nft.read_clamps(ns.name) == [b]
            with pytest.raises(nft.NftError, match="No such file or directory"):
                table._nl.transaction([nft.delete_rule_message(999_999)])
        finally:
            table.close()


def test_nft_in_the_daemons_own_namespace_runs_in_process():
    """The daemon's namespace (netns None): libnftables in-process, no nft program - the child
    has no PATH at all - and refusals still carry nft's words."""
    with Netns("x") as ns:
        r = ns.run(["env", "-i", f"PYTHONPATH={os.getcwd()}", sys.executable, "-c", _IN_PROCESS], check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith("refused: nft: Error:"), r.stdout
        assert nft.read_clamps(ns.name) == [nft.MssClamp("to-c", "xfrm-c", 1382, 1362)]


def test_nft_refusal_carries_nfts_words():
    with Netns("x") as ns:
        with pytest.raises(nft.NftError, match="Error"):
            nft.apply([nft.MssClamp("to-b", "xfrm-b", 99999, 1386)], ns.name)
        assert nft.read_clamps(ns.name) is None  # the transaction left nothing


def test_underlay_mtu_follows_the_route():
    with Netns("x") as a, Netns("y") as b:
        veth_pair(a, "wan", b, "wan")
        a.run("ip link set wan mtu 1400 && ip addr add 192.0.2.1/24 dev wan && "
              "ip route add 198.51.100.0/24 via 192.0.2.2 mtu 1300")
        links = Links(a.name)
        try:
            assert links.underlay_mtu(IP("192.0.2.2")) == 1400
            assert links.underlay_mtu(IP("198.51.100.7")) == 1300
            assert links.underlay_mtu(IP("203.0.113.1")) == 1500  # no route at all
            assert links.get("wan").mtu == 1400 and links.get("nope") is None
        finally:
            links.close()


def test_links_refuse_a_missing_namespace_and_never_create_it():
    with pytest.raises(NamespaceError, match="network namespace 'ist-no-such-ns' does not exist"):
        Links("ist-no-such-ns")
    assert not __import__("os").path.exists("/var/run/netns/ist-no-such-ns")
