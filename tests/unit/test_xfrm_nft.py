"""The MSS clamp table: rendering, and reading back what nft reports (JSON as nft 1.0.6 prints it)."""

from __future__ import annotations

import json

from appliance.xfrm.nft import MssClamp, parse_clamps, render

# `nft -j list table inet isthmus` for one tunnel, trimmed to two of its four rules
NFT_JSON = json.loads("""{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
 {"table": {"family": "inet", "name": "isthmus", "handle": 3}},
 {"chain": {"family": "inet", "table": "isthmus", "name": "mss_clamp", "handle": 1, "type": "filter",
            "hook": "forward", "prio": -150, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "isthmus", "chain": "mss_clamp", "handle": 2, "comment": "isthmus:to-b out",
  "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "xfrm-b"}},
           {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
           {"match": {"op": "==", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "rst"]]},
                      "right": "syn"}},
           {"match": {"op": ">", "left": {"tcp option": {"name": "maxseg", "field": "size"}}, "right": 1406}},
           {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}}, "value": 1406}}]}},
 {"rule": {"family": "inet", "table": "isthmus", "chain": "mss_clamp", "handle": 3, "comment": "isthmus:to-b out",
  "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "xfrm-b"}},
           {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}},
           {"match": {"op": ">", "left": {"tcp option": {"name": "maxseg", "field": "size"}}, "right": 1386}},
           {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}}, "value": 1386}}]}},
 {"rule": {"family": "inet", "table": "isthmus", "chain": "mss_clamp", "handle": 9, "comment": "someone else",
  "expr": [{"accept": null}]}}]}""")


def test_render_replaces_the_whole_table_in_one_transaction():
    text = render([MssClamp("to-c", "xfrm-c", 1382, 1362), MssClamp("to-b", "xfrm-b", 1406, 1386)])
    lines = text.splitlines()
    assert lines[:5] == ["table inet isthmus", "delete table inet isthmus", "table inet isthmus {",
                         "\tchain mss_clamp {", "\t\ttype filter hook forward priority mangle; policy accept;"]
    rules = [l.strip() for l in lines if "maxseg" in l]
    assert len(rules) == 8
    assert rules[0] == ('oifname "xfrm-b" meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size > 1406 '
                        'tcp option maxseg size set 1406 comment "isthmus:to-b out"')
    assert rules[3] == ('iifname "xfrm-b" meta nfproto ipv6 tcp flags syn / syn,rst tcp option maxseg size > 1386 '
                        'tcp option maxseg size set 1386 comment "isthmus:to-b in"')
    assert all("xfrm-c" in r for r in rules[4:])  # sorted by interface
    assert lines[-2:] == ["\t}", "}"]


def test_render_empty_table():
    assert [l for l in render([]).splitlines() if "maxseg" in l] == []


def test_parse_clamps_reads_our_rules_only():
    assert parse_clamps(NFT_JSON) == [MssClamp("to-b", "xfrm-b", 1406, 1386)]
    assert parse_clamps({"nftables": []}) == []
