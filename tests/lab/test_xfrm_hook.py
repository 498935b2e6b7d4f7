"""Acceptance: the tunnel hook. A TCP SYN forwarded through the tunnel carries the clamped MSS in
both directions (captured with tcpdump); config overrides of MTU and MSS win; the nft table follows
the tunnel; user hooks run with the documented environment, never see a key, and a failing or
hanging hook is reported without touching the tunnel."""

from __future__ import annotations

import re
import socket
import stat
import threading
from pathlib import Path

import pytest
from pyroute2 import netns as pyroute2_netns

from tests.lab.xfrm_env import (
    A_IF,
    A_TUNNEL,
    B_IF,
    INNER4,
    INNER6,
    LAN4,
    LAN6,
    Capture,
    Lab,
    a_iface,
    child_pair,
    clamp_rules,
    link,
    ping,
)

HOOKS = {
    "10-record": '#!/bin/sh\nenv | sort > "$(dirname "$0")/records/$ISTHMUS_EVENT-$ISTHMUS_SPI_IN.env"\n',
    "20-fail": "#!/bin/sh\necho 'this hook is broken' >&2\nexit 3\n",
    "30-hang": "#!/bin/sh\nsleep 60\n",
    ".hidden": "#!/bin/sh\ntouch \"$(dirname \"$0\")/records/HIDDEN-RAN\"\n",
}


@pytest.fixture(scope="module")
def hooks_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hooks")
    (d / "records").mkdir()
    for name, text in HOOKS.items():
        p = d / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    (d / "README").write_text("not executable, not run\n")
    return d


@pytest.fixture(scope="module")
def lab(hooks_dir):
    results = []
    lab = Lab(kwargs_a={"hooks_dir": hooks_dir, "hook_timeout": 2.0, "on_hook_result": results.append})
    lab.hook_results = results
    yield lab
    lab.close()


def _syn_mss(lab, client_ns, client_addr_family, server_ns, server_addr, port, capture_ns, capture_if, bpf):
    """Connect from client to server through the tunnel; return the MSS tcpdump saw on capture_if."""
    cap = Capture(capture_ns, capture_if, bpf)
    srv = pyroute2_netns.create_socket(netns=server_ns.name, family=client_addr_family,
                                       socket_type=socket.SOCK_STREAM, flags=0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((server_addr, port))
    srv.listen(1)
    srv.settimeout(30)
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(srv.accept()[0]))
    t.start()
    cli = pyroute2_netns.create_socket(netns=client_ns.name, family=client_addr_family,
                                       socket_type=socket.SOCK_STREAM, flags=0)
    try:
        cli.settimeout(30)
        cli.connect((server_addr, port))
        t.join(30)
    finally:
        cli.close()
        srv.close()
        for c in accepted:
            c.close()
    text = cap.result()
    m = re.search(r"mss (\d+)", text)
    assert m, text
    return int(m.group(1))


def test_mss_clamped_on_forwarded_syn_both_directions(lab):
    ca, cb = child_pair("aes128gcm16")
    lab.up(ca, cb)
    try:
        assert clamp_rules(lab.a) == [
            f'oifname "{A_IF}" meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size > 1406 '
            f'tcp option maxseg size set 1406 comment "isthmus:{A_TUNNEL} out"',
            f'oifname "{A_IF}" meta nfproto ipv6 tcp flags syn / syn,rst tcp option maxseg size > 1386 '
            f'tcp option maxseg size set 1386 comment "isthmus:{A_TUNNEL} out"',
            f'iifname "{A_IF}" meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size > 1406 '
            f'tcp option maxseg size set 1406 comment "isthmus:{A_TUNNEL} in"',
            f'iifname "{A_IF}" meta nfproto ipv6 tcp flags syn / syn,rst tcp option maxseg size > 1386 '
            f'tcp option maxseg size set 1386 comment "isthmus:{A_TUNNEL} in"',
        ]
        # C (LAN MTU 1500: SYN with MSS 1460 / 1440) -> A forwards into the tunnel -> B sees the clamp
        syn = "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"
        assert _syn_mss(lab, lab.c, socket.AF_INET, lab.b, INNER4[1], 7001, lab.b, B_IF, syn) == 1406
        syn6 = "ip6 and (ip6[13+40] & 0x12) == 0x02"
        assert _syn_mss(lab, lab.c, socket.AF_INET6, lab.b, INNER6[1], 7002, lab.b, B_IF, syn6) == 1386
    finally:
        lab.down()
    assert clamp_rules(lab.a) == []


def test_config_overrides_mtu_and_mss(lab):
    # the same tunnel, reconfigured: MTU 1400 and MSS 1300 instead of the computed 1446 / 1406
    lab.dpa.remove_tunnel(A_TUNNEL)
    lab.dpa.add_tunnel(a_iface(mtu=1400, mss=1300))
    try:
        ca, cb = child_pair("aes128gcm16")
        lab.up(ca, cb)
        try:
            assert link(lab.a, A_IF)["mtu"] == 1400
            assert any("maxseg size set 1300" in r and "ipv4" in r for r in clamp_rules(lab.a))
            assert any("maxseg size set 1280" in r and "ipv6" in r for r in clamp_rules(lab.a))
            syn = "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"
            assert _syn_mss(lab, lab.c, socket.AF_INET, lab.b, INNER4[1], 7003, lab.b, B_IF, syn) == 1300
            # the other direction: B answers with its own MSS (1406, from its MTU 1446); A clamps the
            # SYN-ACK coming out of the tunnel before it reaches C
            synack = "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)"
            assert _syn_mss(lab, lab.c, socket.AF_INET, lab.b, INNER4[1], 7004, lab.c, "lan", synack) == 1300
        finally:
            lab.down()
    finally:
        lab.dpa.remove_tunnel(A_TUNNEL)
        lab.dpa.add_tunnel(a_iface())


def test_user_hooks_run_with_documented_environment(lab, hooks_dir):
    records = hooks_dir / "records"
    assert lab.dpa.hooks.drain(timeout=60)  # hooks of the earlier tests' events
    lab.hook_results.clear()
    ca, cb = child_pair("aes128-sha256", encap=True)
    lab.up(ca, cb)
    try:
        # the hanging hook has not finished yet, and the tunnel already carries traffic
        assert not any(r.hook == "30-hang" for r in lab.hook_results)
        assert ping(lab.a, INNER4[1], count=3, interval=0.05).received == 3
        na, nb = child_pair("aes128-sha256", encap=True)
        lab.dpb.rekey("to-a", nb, outbound=False)
        lab.dpa.rekey(A_TUNNEL, na)
        lab.dpb.activate_outbound("to-a", nb.spi_in)
    finally:
        lab.down()
    assert lab.dpa.hooks.drain(timeout=60)

    def env(event, spi):
        text = (records / f"{event}-{spi:#010x}.env").read_text()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    up = env("up", ca.spi_in)
    assert up["ISTHMUS_EVENT"] == "up" and up["ISTHMUS_TUNNEL"] == A_TUNNEL and up["ISTHMUS_INTERFACE"] == A_IF
    assert up["ISTHMUS_IF_ID"] == str(lab.iface_a.if_id)
    assert up["ISTHMUS_MTU"] == "1422" and up["ISTHMUS_MSS4"] == "1382" and up["ISTHMUS_MSS6"] == "1362"
    assert up["ISTHMUS_SPI_OUT"] == f"{ca.spi_out:#010x}" and up["ISTHMUS_ENCAP"] == "udp"
    assert up["ISTHMUS_LOCAL"] == "192.0.2.1" and up["ISTHMUS_REMOTE"] == "192.0.2.2"
    assert up["ISTHMUS_LOCAL_PORT"] == "4500" and up["ISTHMUS_ADDRESSES"] == "169.254.21.1/30 fd00:21::1/126"
    assert up["ISTHMUS_ESP"] == "cbc(aes) key 128 hmac(sha256) trunc 128"
    assert up["ISTHMUS_NETNS"] == lab.a.name
    rekey = env("rekey", na.spi_in)
    assert rekey["ISTHMUS_OLD_SPI_IN"] == f"{ca.spi_in:#010x}" and rekey["ISTHMUS_SPI_IN"] == f"{na.spi_in:#010x}"
    down = env("down", na.spi_in)
    assert down["ISTHMUS_EVENT"] == "down" and "ISTHMUS_MTU" not in down
    # the daemon's environment does not leak in, and no key is ever in a hook's environment
    allowed = {"PATH", "LANG", "PWD", "SHLVL", "_"}
    for f in records.glob("*.env"):
        text = f.read_text()
        names = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line}
        assert names <= allowed | {n for n in names if n.startswith("ISTHMUS_")}, names
        for c in (ca, na):
            for keys in (c.keys_in, c.keys_out):
                for k in (keys.encryption, keys.integrity):
                    assert k.hex() not in text.lower()
    assert not (records / "HIDDEN-RAN").exists()
    by_hook = {}
    for r in lab.hook_results:
        by_hook.setdefault(r.hook, []).append(r)
    assert {r.event for r in by_hook["10-record"]} == {"up", "rekey", "down"} and all(r.ok for r in by_hook["10-record"])
    assert all(r.returncode == 3 and "this hook is broken" in r.output for r in by_hook["20-fail"])
    assert all(r.timed_out and r.returncode is None for r in by_hook["30-hang"])
    assert set(by_hook) == {"10-record", "20-fail", "30-hang"}
