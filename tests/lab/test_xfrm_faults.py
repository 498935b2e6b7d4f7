"""Acceptance: bad input and kernel refusals raise a clear error that names the tunnel and the
kernel's reason, and leave no partial object in the kernel (asserted by listing its state with
iproute2 and nft); killing a process half-way through its work and starting again with
reconciliation leaves exactly the expected objects, and never touches anyone else's."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from appliance.xfrm import (
    ChildSa,
    Dataplane,
    DataplaneError,
    DataplaneInputError,
    Endpoints,
    EspAlgorithms,
    SaKeys,
    TunnelInterface,
    derive_if_id,
)
from tests.lab.xfrm_env import (
    A_TUNNEL,
    INNER4,
    WAN4,
    Lab,
    addresses,
    child_pair,
    clamp_rules,
    kernel_snapshot,
    ping,
    xfrm_links,
    xfrm_policies,
    xfrm_states,
)
from tests.netns import Netns

X_IFACE = TunnelInterface("to-x", "xfrm-x", addresses=("169.254.22.1/30",))


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    lab.dpa.add_tunnel(X_IFACE)
    ca, cb = child_pair("aes128gcm16")
    lab.up(ca, cb)       # tunnel to-b stays up for the whole module: failures must not disturb it
    lab.live = ca
    yield lab
    lab.close()


def _no_key_in(text: str, *children: ChildSa) -> None:
    for c in children:
        for keys in (c.keys_in, c.keys_out):
            for k in (keys.encryption, keys.integrity):
                if k:
                    assert k.hex() not in text.lower() and repr(k)[2:-1] not in text


def test_invalid_input_is_refused_before_the_kernel(lab):
    before = kernel_snapshot(lab.a)
    with pytest.raises(DataplaneInputError, match=r"unknown ESP encryption algorithm 'gcm\(aes\)': allowed "
                                                  r"cbc\(aes\), rfc4106\(gcm\(aes\)\), rfc7539esp"):
        EspAlgorithms("gcm(aes)")
    with pytest.raises(DataplaneInputError, match=r"unknown ESP proposal 'aes999gcm16'"):
        EspAlgorithms.from_proposal("aes999gcm16")
    gcm = EspAlgorithms.from_proposal("aes128gcm16")
    with pytest.raises(DataplaneInputError, match=r"outbound SA 0x00abcdef: rfc4106\(gcm\(aes\)\) key is 16 bytes: "
                                                  r"it must be 20 bytes \(key \+ 4-byte salt, RFC 4106\)"):
        ChildSa(0xfedcba, 0xabcdef, gcm, SaKeys(os.urandom(20)), SaKeys(os.urandom(16)), Endpoints(*WAN4))
    cbc = EspAlgorithms.from_proposal("aes256-sha384")
    with pytest.raises(DataplaneInputError, match=r"hmac\(sha384\) key is 32 bytes: it must be 48 bytes"):
        ChildSa(0xfedcba, 0xabcdef, cbc, SaKeys(os.urandom(32), os.urandom(32)),
                SaKeys(os.urandom(32), os.urandom(48)), Endpoints(*WAN4))
    with pytest.raises(DataplaneInputError, match="different IP versions"):
        Endpoints("192.0.2.1", "2001:db8::1")
    assert kernel_snapshot(lab.a) == before


def test_duplicate_spi_rolls_back_the_inbound_sa(lab):
    before = kernel_snapshot(lab.a)
    cx, _ = child_pair("aes256gcm16")
    # the new Child SA's outbound SA would have the live tunnel's outbound SPI towards the same peer
    cx = ChildSa(cx.spi_in, lab.live.spi_out, cx.algorithms, cx.keys_in, cx.keys_out, cx.endpoints)
    with pytest.raises(DataplaneError) as e:
        lab.dpa.install("to-x", cx)
    text = str(e.value)
    assert text.startswith("tunnel 'to-x': installing Child SA")
    assert "File exists (EEXIST)" in text and "duplicate SPI" in text
    assert f"rolled back: the inbound SA {cx.spi_in:#010x}" in text
    assert e.value.code == 17 and e.value.undo_failed == ()
    _no_key_in(text + repr(e.value) + repr(cx), cx)
    assert kernel_snapshot(lab.a) == before
    assert ping(lab.a, INNER4[1], count=2, interval=0.05).received == 2  # the live tunnel is untouched


def test_policy_refused_rolls_back_sas_and_policies(lab):
    if_id = X_IFACE.if_id
    foreign = f"dir fwd src ::/0 dst ::/0 if_id {if_id:#x}"
    lab.a.run(f"ip xfrm policy add {foreign} tmpl src 192.0.2.9 dst 192.0.2.1 proto esp mode tunnel")
    try:
        before = kernel_snapshot(lab.a)
        cx, _ = child_pair("chacha20poly1305")
        with pytest.raises(DataplaneError) as e:
            lab.dpa.install("to-x", cx)
        text = str(e.value)
        assert "adding the fwd policy ::/0" in text and "EEXIST" in text
        for what in (f"the inbound SA {cx.spi_in:#010x}", f"the outbound SA {cx.spi_out:#010x}",
                     "the out policy 0.0.0.0/0", "the in policy ::/0"):
            assert what in text, text
        assert kernel_snapshot(lab.a) == before  # the foreign policy is still there, nothing of ours is
    finally:
        lab.a.run(f"ip xfrm policy del {foreign}")


def test_missing_interface(lab):
    lab.a.run("ip link del xfrm-x")
    try:
        before = kernel_snapshot(lab.a)
        cx, _ = child_pair("aes128gcm16")
        with pytest.raises(DataplaneError, match=r"tunnel 'to-x': installing Child SA .* the tunnel's XFRM interface "
                                                 r"xfrm-x \(if_id 0x[0-9a-f]+\) does not exist"):
            lab.dpa.install("to-x", cx)
        assert kernel_snapshot(lab.a) == before
        with pytest.raises(DataplaneError, match=r"tunnel 'nope': .* no such tunnel in the data plane \(known: to-b, to-x\)"):
            lab.dpa.install("nope", cx)
    finally:
        lab.dpa.remove_tunnel("to-x")
        lab.dpa.add_tunnel(X_IFACE)


# --- crash and restart -----------------------------------------------------------------------------

TUNNELS = [TunnelInterface(f"t{i}", f"xfrm-t{i}", addresses=(f"169.254.30.{4 * i + 1}/30",)) for i in range(1, 7)]

WORKER = r"""
import itertools, os, sys
from appliance.xfrm import *
ns = sys.argv[1]
tunnels = [TunnelInterface(f"t{i}", f"xfrm-t{i}", addresses=(f"169.254.30.{4 * i + 1}/30",)) for i in range(1, 6)]
dp = Dataplane(ns)
dp.reconcile(tunnels)
alg = EspAlgorithms.from_proposal("aes128gcm16")
spi = itertools.count(0x100000)
for cycle in itertools.count():
    for n, t in enumerate(tunnels):
        c = ChildSa(next(spi), next(spi), alg, SaKeys(os.urandom(20)), SaKeys(os.urandom(20)),
                    Endpoints("192.0.2.1", f"192.0.2.{100 + n}"))
        dp.install(t.tunnel, c)
        print(f"cycle {cycle} installed {t.tunnel}", flush=True)
    for t in tunnels:
        dp.down(t.tunnel)
"""


def test_kill_9_half_way_then_reconcile(tmp_path):
    with Netns("k") as k:
        k.run("ip link add wan type dummy && ip link set wan up && ip addr add 192.0.2.1/24 dev wan")
        # someone else's objects, outside Isthmus's if_id range: they must survive everything below
        k.run("ip link add foreign0 type xfrm dev wan if_id 7 && "
              "ip xfrm state add src 192.0.2.1 dst 192.0.2.50 proto esp spi 0x777 mode tunnel "
              f"aead 'rfc4106(gcm(aes))' 0x{'55' * 20} 128 if_id 7 && "
              "ip xfrm policy add dir out src 0.0.0.0/0 dst 0.0.0.0/0 if_id 7 "
              "tmpl src 192.0.2.1 dst 192.0.2.50 proto esp mode tunnel && "
              "nft add table inet other && nft add chain inet other c '{ type filter hook forward priority 0; }'")
        foreign = kernel_snapshot(k)
        foreign_nft = k.run("nft list table inet other").stdout

        worker = subprocess.Popen([sys.executable, "-c", WORKER, k.name], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            lines = []
            while True:
                line = worker.stdout.readline()
                assert line, "".join(lines)
                lines.append(line)
                if line.strip() == "cycle 1 installed t3":
                    break
            worker.kill()  # SIGKILL: no cleanup of any kind
        finally:
            if worker.poll() is None:
                worker.kill()
            worker.wait()

        # it really died half-way: tunnels up, SAs, policies and clamps left behind
        left = kernel_snapshot(k)
        ours = [s for s in left["states"] if s[3] != 7]
        assert len(ours) >= 6 and any(l[2] for l in left["links"]) and left["clamps"]

        # restart with the same five tunnels
        t1_5 = TUNNELS[:5]
        with Dataplane(k.name) as dp:
            report = dp.reconcile(t1_5)
        assert sorted(report.adopted) == [t.ifname for t in t1_5] and report.created == ()
        assert report.removed_sas >= 6 and report.removed_policies >= 18 and report.removed_clamps
        after = kernel_snapshot(k)
        assert after["states"] == foreign["states"] and after["policies"] == foreign["policies"]
        assert after["clamps"] == []
        assert {l[0]: (l[1], l[2]) for l in after["links"]} == {
            "foreign0": (7, False), **{t.ifname: (derive_if_id(t.tunnel), False) for t in t1_5}}
        for t in t1_5:
            assert addresses(k, t.ifname) == {str(a) for a in t.addresses}
        assert k.run("nft list table inet other").stdout == foreign_nft
        index_before = {l["ifname"]: l["ifindex"] for l in xfrm_links(k)}

        # restart again with t5 dropped and t6 added: t5 goes, t6 comes, t1-t4 are kept as they were
        with Dataplane(k.name) as dp:
            report = dp.reconcile(TUNNELS[:4] + [TUNNELS[5]])
            assert report.removed_interfaces == ("xfrm-t5",) and report.created == ("xfrm-t6",)
            names = {l["ifname"]: l["ifindex"] for l in xfrm_links(k)}
            assert set(names) == {"foreign0", "xfrm-t1", "xfrm-t2", "xfrm-t3", "xfrm-t4", "xfrm-t6"}
            assert all(names[f"xfrm-t{i}"] == index_before[f"xfrm-t{i}"] for i in range(1, 5))
            # and the restarted data plane works on a reconciled tunnel
            c = ChildSa(0x300001, 0x300002, EspAlgorithms.from_proposal("aes128gcm16"), SaKeys(os.urandom(20)),
                        SaKeys(os.urandom(20)), Endpoints("192.0.2.1", "192.0.2.100"))
            dp.install("t1", c)
            assert {s["spi"] for s in xfrm_states(k)} == {0x777, 0x300001, 0x300002}
            assert len([p for p in xfrm_policies(k) if p["if_id"] == derive_if_id("t1")]) == 6
            dp.down("t1")
        assert kernel_snapshot(k)["states"] == foreign["states"]
