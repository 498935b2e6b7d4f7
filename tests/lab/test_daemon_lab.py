"""isthmusd end to end on a real IPsec kernel: two appliances (regions A and B, each in its own
namespace with a LAN host behind it) started from config files negotiate a tunnel by themselves.

One topology serves the whole module, in order, like one operator session: SPIs and counters
through the CLI, a reload that adds a tunnel under load, four bad reloads, kill -9 and restart,
and at the end a search of everything the product wrote (logs, CLI output, metrics, the event
stream) for the PSKs and the SA keys the kernel holds.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.appliances import wait_for
from tests.lab.daemon_env import PSK1, PSK2, Regions, line_of

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def regions():
    with Regions() as r:
        r.start()
        yield r


def _installed(app, tunnel: str) -> dict:
    c = app.installed_child(tunnel)
    assert c is not None, app.sas(tunnel)
    return c


def _snapshot(regions: Regions) -> dict:
    """Both sides' SPIs as the daemons report them (IKE and Child SAs)."""
    out = {}
    for r in (regions.a, regions.b):
        sas = r.app.sas()
        out[r.key] = ({(s["tunnel"], s["spi_i"], s["spi_r"]) for s in sas["ike_sas"]},
                      {(c["tunnel"], c["spi_in"], c["spi_out"]) for c in sas["child_sas"]})
        r.xfrm_states()   # remember the keys for the no-secrets test
    return out


def test_show_sas_json_both_sides_agree_and_counters_grow(regions):
    a, b = regions.a, regions.b
    sa_a, sa_b = a.app.cli_json("show", "sas"), b.app.cli_json("show", "sas")
    ike_a = [s for s in sa_a["ike_sas"] if s["state"] == "established"]
    ike_b = [s for s in sa_b["ike_sas"] if s["state"] == "established"]
    assert len(ike_a) == len(ike_b) == 1
    assert (ike_a[0]["spi_i"], ike_a[0]["spi_r"]) == (ike_b[0]["spi_i"], ike_b[0]["spi_r"])
    assert (ike_a[0]["role"], ike_b[0]["role"]) == ("initiator", "responder")
    ch_a = [c for c in sa_a["child_sas"] if c["state"] == "installed"]
    ch_b = [c for c in sa_b["child_sas"] if c["state"] == "installed"]
    assert len(ch_a) == len(ch_b) == 1
    ca, cb = ch_a[0], ch_b[0]
    assert (ca["spi_in"], ca["spi_out"]) == (cb["spi_out"], cb["spi_in"])
    assert ca["interface"] == "xfrm-b" and cb["interface"] == "xfrm-a"
    assert ca["proposal"] == cb["proposal"] == "aes256gcm16"
    # the kernel holds exactly these SPIs (iproute2 is the observer)
    spis_a = {s["spi"] for s in a.xfrm_states()}
    assert spis_a == {int(ca["spi_in"], 16), int(ca["spi_out"], 16)}

    r = regions.ping(count=20, interval=0.05)
    assert r.returncode == 0, r.stdout + r.stderr
    k1 = a.sa_counters(int(ca["spi_out"], 16))
    after_a = {c["spi_in"]: c for c in a.app.cli_json("show", "sas")["child_sas"]}[ca["spi_in"]]
    k2 = a.sa_counters(int(ca["spi_out"], 16))
    after_b = {c["spi_in"]: c for c in b.app.cli_json("show", "sas")["child_sas"]}[cb["spi_in"]]
    # 20 echo requests out of A and into B, 20 replies the other way, on top of what was there
    assert after_a["packets_out"] >= (ca["packets_out"] or 0) + 20
    assert after_a["bytes_out"] >= (ca["bytes_out"] or 0) + 20 * 84
    assert after_a["packets_in"] >= (ca["packets_in"] or 0) + 20
    assert after_b["packets_in"] >= (cb["packets_in"] or 0) + 20
    assert after_b["packets_out"] >= (cb["packets_out"] or 0) + 20
    # what the CLI shows is the kernel's own count, read between two iproute2 reads
    assert k1[0] <= after_a["bytes_out"] <= k2[0] and k1[1] <= after_a["packets_out"] <= k2[1]
    text = a.app.cli("show", "sas").stdout
    assert ca["spi_in"] in text and "xfrm-b" in text


@pytest.mark.parametrize("initiator", ["a", "b"])
def test_child_sa_rekey_under_traffic_loses_nothing_and_leaves_one_pair(regions, initiator):
    """`isthmus rekey` from either side while pings cross: RFC 7296 §2.8 make-before-break through
    the daemon's event -> data plane mapping (the responder installs inbound first, outbound on
    the old pair's DELETE)."""
    a, b = regions.a, regions.b
    old_a, old_b = _installed(a.app, "to-b"), _installed(b.app, "to-a")
    ping = subprocess.Popen(["ip", "netns", "exec", a.lan.name, "ping", "-c", "1000", "-i", "0.005", "-W", "2", "-q",
                             "10.2.0.10"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.3)
    r = (a if initiator == "a" else b)
    assert r.app.call("rekey", tunnel=r.tunnel, kind="child")["state"] == "rekeying"
    # the new pair carries traffic on both sides before the pings end
    def switched(app, tunnel, old):
        c = app.installed_child(tunnel)     # None while the old pair is 'rekeying'
        return c is not None and c["spi_in"] != old["spi_in"]
    wait_for("the new pair installed on both sides",
             lambda: switched(a.app, "to-b", old_a) and switched(b.app, "to-a", old_b), 60, 0.05)
    rekeyed_during_ping = ping.poll() is None
    out, _ = ping.communicate(timeout=300)
    stats = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    print(f"\nChild SA rekey by {initiator.upper()} under load: {stats.group(0)}")
    assert rekeyed_during_ping, "the pings ended before the rekey was done: the test proves nothing"
    assert (int(stats.group(1)), int(stats.group(2))) == (1000, 1000), out

    def settled():
        ca, cb = a.app.installed_child("to-b"), b.app.installed_child("to-a")
        return (ca and cb and ca["spi_in"] != old_a["spi_in"] and len(a.app.sas("to-b")["child_sas"]) == 1
                and len(b.app.sas("to-a")["child_sas"]) == 1 and (ca, cb))
    ca, cb = wait_for("one new Child SA pair on both sides", settled, 60, 0.2)
    assert (ca["spi_in"], ca["spi_out"]) == (cb["spi_out"], cb["spi_in"])
    assert {ca["spi_in"], ca["spi_out"]}.isdisjoint({old_a["spi_in"], old_a["spi_out"]})
    for reg, c in ((a, ca), (b, cb)):
        assert {s["spi"] for s in reg.xfrm_states()} == {int(c["spi_in"], 16), int(c["spi_out"], 16)}
    assert old_b["spi_in"] == old_a["spi_out"]


def test_ike_sa_rekey_keeps_the_child_sa(regions):
    a, b = regions.a, regions.b
    ike_before = a.app.sas("to-b")["ike_sas"][0]
    child_before = _installed(a.app, "to-b")
    a.app.cli("rekey", "--ike", "to-b")

    def rekeyed():
        ike = [s for s in a.app.sas("to-b")["ike_sas"] if s["state"] == "established"]
        return len(a.app.sas("to-b")["ike_sas"]) == 1 and ike and ike[0]["spi_i"] != ike_before["spi_i"] and ike[0]
    ike = wait_for("the IKE SA replaced", rekeyed, 60, 0.2)
    peer = [s for s in b.app.sas("to-a")["ike_sas"] if s["state"] == "established"]
    assert [(p["spi_i"], p["spi_r"]) for p in peer] == [(ike["spi_i"], ike["spi_r"])]
    child = _installed(a.app, "to-b")
    assert (child["spi_in"], child["spi_out"]) == (child_before["spi_in"], child_before["spi_out"])
    assert regions.ping(count=3).returncode == 0
    assert 'isthmus_rekeys_total{tunnel="to-b",kind="ike"} 1' in a.app.metrics()


def _dpd_probes(app) -> int:
    """Liveness checks A sent: empty INFORMATIONAL requests (RFC 7296 §2.4) in its debug log."""
    return sum(1 for x in app.log_records() if "sending INFORMATIONAL request" in x.get("message", "")
               and x["message"].endswith("[ SK{} ]"))


def test_esp_traffic_defers_dpd_and_an_idle_tunnel_is_probed(regions):
    """DPD interval 4 s in this topology: 10 s of steady pings across the tunnel send no liveness
    check (the inbound SA counters prove the peer alive); 10 s of silence do."""
    a = regions.a
    assert regions.ping(count=15, interval=0.2, timeout=120).returncode == 0   # the peer was just heard
    before = _dpd_probes(a.app)
    r = regions.ping(count=50, interval=0.2, timeout=120)
    assert r.returncode == 0
    busy = _dpd_probes(a.app) - before
    time.sleep(10)
    idle = _dpd_probes(a.app) - before - busy
    print(f"\nliveness checks sent by A: {busy} during 10 s of traffic, {idle} during 10 s idle")
    assert busy == 0
    assert idle >= 1


def test_reload_adds_a_tunnel_while_1000_pings_cross_the_first(regions):
    a, b = regions.a, regions.b
    before = _snapshot(regions)
    for r in (a, b):
        r.app.write_config(r.config(second=True))
    ping = subprocess.Popen(["ip", "netns", "exec", a.lan.name, "ping", "-c", "1000", "-i", "0.005", "-W", "2", "-q",
                             "10.2.0.10"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    results = {}
    for r in (b, a):   # the responder learns the new tunnel first
        results[r.key] = r.app.call("reload")
    reloaded_during_ping = ping.poll() is None
    for r in (a, b):
        assert results[r.key]["added"] == [r.cfg2["tunnel"]], results
        assert results[r.key]["unchanged"] == [r.tunnel] and not results[r.key]["changed"], results
    for r in (a, b):
        r.app.wait_tunnel_up(r.cfg2["tunnel"], timeout=120)
    out, _ = ping.communicate(timeout=300)
    stats = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert stats, out
    print(f"\nreload under load: {stats.group(0)} (reloaded while the ping ran: {reloaded_during_ping})")
    assert reloaded_during_ping, "the pings ended before both reloads were done: the test proves nothing"
    assert (int(stats.group(1)), int(stats.group(2))) == (1000, 1000), out
    after = _snapshot(regions)
    for k in ("a", "b"):
        tunnel = {"a": "to-b", "b": "to-a"}[k]
        # the first tunnel was not touched: same IKE SA, same Child SA
        assert {x for x in after[k][0] if x[0] == tunnel} == {x for x in before[k][0] if x[0] == tunnel}
        assert {x for x in after[k][1] if x[0] == tunnel} == {x for x in before[k][1] if x[0] == tunnel}
    # the second tunnel carries traffic: ping B's inside address over xfrm-b2
    r = a.ns.run("ping -c 3 -i 0.2 -W 2 169.254.22.2", check=False)
    assert r.returncode == 0, r.stdout
    assert len(a.xfrm_links()) == 2 and set(a.xfrm_links()) == {"xfrm-b", "xfrm-b2"}


BAD_CONFIGS = [
    # (name, how to break region A's config, expected field, words in the message)
    ("bad proposal", dict(extra="    esp: {proposals: [aes256gcm16-bogus99]}\n"),
     "tunnels.to-b.esp.proposals[0]", "bogus99"),
    ("weak algorithm", dict(extra="    ike: {proposals: [aes128-sha1-modp1024]}\n"),
     "tunnels.to-b.ike.proposals[0]", "sha1"),
    ("/29 inside CIDR with peer_profile aws", dict(more=(
        "  to-aws:\n    peer_profile: aws\n    remote: 198.51.100.7\n    local: 192.0.2.1\n"
        "    auth: {psk_file: secrets/t1.psk}\n    interface: {name: xfrm-aws, address: 169.254.100.1/29}\n")),
     "tunnels.to-aws.interface.address", "/29"),
    ("world-readable PSK file", dict(psk_mode=0o644), "tunnels.to-b.auth.psk_file", "0644"),
]


@pytest.mark.parametrize("name,change,field,words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_reload_is_refused_with_file_line_field_and_changes_nothing(regions, name, change, field, words):
    a = regions.a
    before = _snapshot(regions)
    good = a.config(second=True)
    path = a.app.config_path
    psk = a.app.etc / "secrets" / "t1.psk"
    try:
        if "psk_mode" in change:
            a.app.write_config(good)
            psk.chmod(change["psk_mode"])
            line = line_of(path, "psk_file: secrets/t1.psk")
        else:
            a.app.write_config(a.config(second=True, extra=change.get("extra", ""), more=change.get("more", "")))
            needle = {"tunnels.to-b.esp.proposals[0]": "aes256gcm16-bogus99",
                      "tunnels.to-b.ike.proposals[0]": "aes128-sha1-modp1024",
                      "tunnels.to-aws.interface.address": "169.254.100.1/29"}[field]
            line = line_of(path, needle)
        r = a.app.cli("reload", check=False)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert f"{path}:{line}: {field}: " in r.stderr, r.stderr
        assert words in r.stderr, r.stderr
        j = a.app.cli("reload", "--json", check=False)
        assert j.returncode == 1
        issues = json.loads(j.stdout)["error"]["issues"]
        assert any(i["line"] == line and i["path"] == field for i in issues), issues
    finally:
        psk.chmod(0o600)
        a.app.write_config(good)
    # nothing changed: same SAs on both sides, tunnels up, the config still in force
    assert _snapshot(regions) == before
    assert {t["name"]: t["state"] for t in a.app.call("tunnels")["tunnels"]} == {"to-b": "up", "to-b2": "up"}
    assert regions.ping(count=3).returncode == 0


def test_kill9_restart_recovers_and_leaves_no_stale_kernel_object(regions):
    a, b = regions.a, regions.b
    old = {r.key: {s["spi"] for s in r.xfrm_states()} for r in (a, b)}
    assert len(old["a"]) == 4     # two tunnels, a pair each
    a.app.kill()
    # the kernel keeps what the killed daemon made: the stale objects the restart must clean up
    assert {s["spi"] for s in a.xfrm_states()} == old["a"]
    assert regions.ping(count=2).returncode == 0, "the old SAs should still carry traffic after kill -9"
    t0 = time.monotonic()
    a.app.start(wait=False)
    t_ready = wait_for("A's control socket", lambda: _answers(a.app), 120, 0.1, a.app) and time.monotonic() - t0
    regions.follow_events(a)
    wait_for("LAN A to reach LAN B again", lambda: regions.ping(count=1, interval=0.2).returncode == 0, 120, 0.05)
    recovered = time.monotonic() - t0
    for r in (a, b):
        for tunnel in (r.tunnel, r.cfg2["tunnel"]):
            r.app.wait_tunnel_up(tunnel)
    both_up = time.monotonic() - t0
    print(f"\nkill -9 + restart of region A: control socket after {t_ready:.1f} s, LAN A -> LAN B traffic after "
          f"{recovered:.1f} s, both tunnels up on both sides after {both_up:.1f} s")
    regions.recovery = (t_ready, recovered, both_up)

    # B drops the SAs of the IKE SA A's restart replaced (INITIAL_CONTACT)
    def settled():
        return all(len(r.xfrm_states()) == 4 for r in (a, b))
    wait_for("both kernels to hold exactly two SA pairs", settled, 60, 0.2)
    for r in (a, b):
        tunnels = {t["name"]: t for t in r.app.call("tunnels")["tunnels"]}
        sas = r.app.sas()["child_sas"]
        want_spis = {int(c[k], 16) for c in sas if c["state"] == "installed" for k in ("spi_in", "spi_out")}
        states = r.xfrm_states()
        assert {s["spi"] for s in states} == want_spis, (states, sas)
        links = r.xfrm_links()
        assert set(links) == {t["interface"] for t in tunnels.values()}
        if_ids = {_int(x["linkinfo"]["info_data"]["if_id"]) for x in links.values()}
        assert {s["if_id"] for s in states} == if_ids
        pols = r.xfrm_policies()
        assert len(pols) == 6 * len(tunnels)          # 0/0 and ::/0, out/in/fwd, per tunnel
        assert {p["if_id"] for p in pols} == if_ids
        assert sorted(r.clamp_interfaces()) == sorted(4 * list(links))   # 4 MSS rules per interface
        want_routes = {("10.2.0.0/16", "xfrm-b")} if r.key == "a" else {("10.1.0.0/16", "xfrm-a")}
        assert r.our_routes() == want_routes
    assert {s["spi"] for s in a.xfrm_states()}.isdisjoint(old["a"])
    assert {s["spi"] for s in b.xfrm_states()}.isdisjoint(old["b"])


def _int(v) -> int:
    return int(v, 0) if isinstance(v, str) else int(v)


def _answers(app) -> bool:
    try:
        app.call("status", timeout=2)
        return True
    except Exception:  # noqa: BLE001 - not yet, or still starting
        return False


def test_sigterm_deletes_everything_and_a_restart_brings_it_back(regions):
    a, b = regions.a, regions.b
    assert a.app.stop(signal.SIGTERM) == 0
    # A deleted its SAs with DELETEs: B removed its side too, and A's kernel is empty of ours
    assert a.xfrm_states() == [] and a.xfrm_links() == {} and a.our_routes() == set()
    wait_for("B to drop its SAs after A's DELETEs", lambda: b.xfrm_states() == [], 30, 0.2)
    assert {t["state"] for t in b.app.call("tunnels")["tunnels"]} == {"down"}
    assert b.our_routes() == set()        # withdrawn with the tunnel
    assert regions.ping(count=1).returncode != 0
    a.app.start()
    regions.follow_events(a)
    a.app.wait_tunnel_up("to-b")
    b.app.wait_tunnel_up("to-a")
    assert regions.ping(count=3).returncode == 0


def test_reload_renegotiates_a_changed_tunnel_and_deletes_a_removed_one(regions):
    a, b = regions.a, regions.b
    for r in (a, b):
        for t in (r.tunnel, r.cfg2["tunnel"]):
            r.app.wait_tunnel_up(t)
    first = _snapshot(regions)
    old2 = _installed(a.app, "to-b2")
    assert old2["proposal"] == "aes256gcm16"
    change = "    esp: {proposals: [aes128gcm16]}\n"
    for r in (a, b):
        r.app.write_config(r.config(second=True, extra2=change))
        assert r.app.call("reload") == {"added": [], "removed": [], "changed": [r.cfg2["tunnel"]],
                                        "unchanged": [r.tunnel]}

    def renegotiated():
        ca, cb = a.app.installed_child("to-b2"), b.app.installed_child("to-a2")
        return ca and cb and ca["proposal"] == cb["proposal"] == "aes128gcm16" and (ca, cb)
    ca, cb = wait_for("to-b2 negotiated again with the new proposal", renegotiated, 120, 0.2)
    assert (ca["spi_in"], ca["spi_out"]) == (cb["spi_out"], cb["spi_in"]) and ca["spi_in"] != old2["spi_in"]
    assert a.ns.run("ping -c 2 -i 0.2 -W 2 169.254.22.2", check=False).returncode == 0
    after = _snapshot(regions)
    for k, t in (("a", "to-b"), ("b", "to-a")):   # the unchanged tunnel kept its SAs
        assert {x for x in after[k][1] if x[0] == t} == {x for x in first[k][1] if x[0] == t}
    if_id2 = _int(a.xfrm_links()["xfrm-b2"]["linkinfo"]["info_data"]["if_id"])

    # removed from A's config only: A deletes it with a DELETE, B (which keeps it configured,
    # respond-only) takes its side down at once
    a.app.write_config(a.config())
    assert a.app.call("reload") == {"added": [], "removed": ["to-b2"], "changed": [], "unchanged": ["to-b"]}
    assert set(a.xfrm_links()) == {"xfrm-b"}
    assert if_id2 not in {s["if_id"] for s in a.xfrm_states()}
    wait_for("B to take to-a2 down after A's DELETE", lambda: b.app.tunnel("to-a2")["state"] == "down", 30, 0.2,
             log_of=b.app)
    assert {s["spi"] for s in b.xfrm_states()} == {int(x, 16) for c in [_installed(b.app, "to-a")]
                                                   for x in (c["spi_in"], c["spi_out"])}
    assert regions.ping(count=3).returncode == 0


def test_shutdown_without_delete_leaves_traffic_flowing_until_the_restart(regions):
    a, b = regions.a, regions.b
    a.app.write_config(a.config(appliance=", delete_on_shutdown: false"))
    assert a.app.call("reload")["unchanged"] == ["to-b"]
    before = {s["spi"] for s in a.xfrm_states()}
    assert len(before) == 2
    assert a.app.stop(signal.SIGTERM) == 0
    assert {s["spi"] for s in a.xfrm_states()} == before       # left in the kernel on purpose
    assert regions.ping(count=3).returncode == 0               # and still carrying traffic
    assert "delete_on_shutdown is false" in a.app.log_text()
    a.app.start()
    regions.follow_events(a)
    a.app.wait_tunnel_up("to-b")
    wait_for("one pair on each side", lambda: all(len(r.xfrm_states()) == 2 for r in (a, b)), 60, 0.2)
    assert {s["spi"] for s in a.xfrm_states()}.isdisjoint(before)   # reconciled away, negotiated anew
    assert regions.ping(count=3).returncode == 0
    a.app.write_config(a.config())
    a.app.call("reload")


def test_a_kernel_refusing_the_child_sa_is_reported_rolled_back_deleted_and_retried(regions):
    """Fault injection: the kernel refuses A's MSS clamp - another program (an `nft -i` session
    kept open) owns a table named `inet isthmus` (nftables' `flags owner`: nobody else may
    change or delete it) - so the tunnel hook cannot install the clamp. The data plane rolls the
    Child SA back, the daemon publishes the reason, deletes the IKE SA with the peer and retries
    with back-off; once the owner exits (the kernel then removes its table) the tunnel comes up
    by itself."""
    a, b = regions.a, regions.b
    assert a.app.stop(signal.SIGTERM) == 0
    owner = subprocess.Popen(["ip", "netns", "exec", a.ns.name, "nft", "-i"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    owner.stdin.write("add table inet isthmus { flags owner; }\n")
    owner.stdin.flush()
    wait_for("the owned table", lambda: "flags owner" in a.ns.run("nft list ruleset").stdout, 30, 0.1)
    mark = len(regions.events)
    a.app.start()
    regions.follow_events(a)

    def errors():
        return [e for e in regions.events[mark:] if e["type"] == "dataplane_error" and e.get("tunnel") == "to-b"
                and "installing Child SA" in e["message"]]
    try:
        errs = wait_for("two failed installs on A (the first try and a retry)",
                        lambda: len(errors()) >= 2 and errors(), 90, 0.2, a.app)
        assert "nft" in errs[0]["message"] and "rolled back" in errs[0]["message"], errs[0]
        assert any(e["type"] == "tunnel_state" and e.get("tunnel") == "to-b" and e["state"] == "error"
                   for e in regions.events[mark:])
        assert "initiating again in" in a.app.log_text()
        # rolled back: no SA, policy or route of the failed pair stays in A's kernel ...
        assert a.xfrm_states() == [] and a.xfrm_policies() == [] and a.our_routes() == set()
        # ... and the peer does not keep a pair nobody can use (A deleted the IKE SA with it)
        wait_for("B without a Child SA for to-a", lambda: not b.app.sas("to-a")["child_sas"], 30, 0.2)
    finally:
        owner.stdin.close()
        owner.wait(30)
    t0 = time.monotonic()
    a.app.wait_tunnel_up("to-b", timeout=120)
    b.app.wait_tunnel_up("to-a", timeout=60)
    print(f"\nclamp refused: {len(errors())} failed installs, rolled back each time; up {time.monotonic() - t0:.1f} s "
          "after the table's owner exited")
    assert regions.ping(count=3).returncode == 0


def test_no_psk_or_key_material_in_logs_cli_output_metrics_or_events(regions):
    a, b = regions.a, regions.b
    for r in (a, b):
        r.app.cli("status")
        r.app.cli("show", "tunnels")
        r.app.cli("show", "sas")
        r.app.cli("show", "routes")
        r.app.cli("show", "sas", "--json")
        r.app.cli("show", "bgp", check=False)
        r.app.call("rekey", tunnel=r.tunnel, kind="child")
    for r in (a, b):
        r.app.wait_tunnel_up(r.tunnel)
    wait_for("the rekeyed pair to be the only one",
             lambda: all(len(r.xfrm_states()) == 2 for r in (a, b)), 60, 0.2)
    for r in (a, b):
        r.xfrm_states()
        r.app.metrics()
    corpus = {
        "logs": a.app.log_text() + b.app.log_text(),
        "cli+metrics": "\n".join(a.app.cli_output + b.app.cli_output),
        "events": "\n".join(map(str, regions.events)),
    }
    # the corpus is real: it holds what an operator looks at
    assert "tunnel up on xfrm-b" in corpus["logs"]
    assert "isthmus_child_sa_bytes_total" in corpus["cli+metrics"]
    assert "child_sa_rekeyed" in corpus["events"]
    keys = a.keys_seen | b.keys_seen
    assert len(keys) >= 8, "expected the keys of several SAs (first pairs, reload, restart, rekey)"
    needles = {}
    for psk in (PSK1, PSK2):
        raw = psk.encode()
        needles[f"PSK {psk[:4]}…"] = [psk, raw.hex(), base64.b64encode(raw).decode()]
    for k in keys:
        needles[f"SA key {k[:6]}…"] = [k, k[:32]]          # the whole key and its first 16 bytes
    found = []
    for where, text in corpus.items():
        low = text.lower()
        for what, forms in needles.items():
            if any(f.lower() in low for f in forms):
                found.append(f"{what} in {where}")
    assert not found, found
    print(f"\nsearched {sum(len(t) for t in corpus.values()):,} characters of logs, CLI output, metrics and events "
          f"for {len(needles)} secrets ({len(keys)} SA keys, 2 PSKs): none found")
