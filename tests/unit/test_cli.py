"""`isthmus` against a real ControlServer (in a thread) through click's CliRunner: tables, --json,
exit codes, events, completion — and no field the CLI does not know reaches the output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.shell_completion import ShellComplete
from click.testing import CliRunner

from appliance import __version__, cli
from appliance.control import ControlError
from tests.unit.control_util import ServerThread, wait_until

FAKE_PSK = "FAKE-psk-Zq9v!Xw2"
BIN = Path(sys.executable).parent

TUNNELS = [
    {"name": "to-b", "state": "up", "remote": "198.51.100.2", "remote_id": "b.example.net", "local": "192.0.2.1",
     "local_id": "a.example.net", "interface": "xfrm-b", "start": True, "ike_sas": 1, "child_sas": 1,
     "established": 3723, "bytes_in": 1572864, "packets_in": 1024, "bytes_out": 900, "packets_out": 9,
     "psk": FAKE_PSK, "auth": {"psk": FAKE_PSK}},
    {"name": "to-c", "state": "down", "remote": "203.0.113.7", "remote_id": "evil\x1b[2J\x1b]0;pwned\x07",
     "interface": None, "start": False, "ike_sas": 0, "child_sas": 0, "private_key": FAKE_PSK},
]
IKE_SAS = [{"tunnel": "to-b", "state": "established", "role": "initiator", "local": "192.0.2.1:4500",
            "remote": "198.51.100.2:4500", "local_id": "a.example.net", "remote_id": "b.example.net",
            "spi_i": 0x1A2B3C4D5E6F7081, "spi_r": "0x00000000000000ff", "proposal": "aes256gcm16-prfsha384-x25519",
            "nat": "none", "age": 125, "rekey_in": 86000, "SK_d": FAKE_PSK, "keys": {"SK_ei": FAKE_PSK}}]
CHILD_SAS = [{"tunnel": "to-b", "state": "installed", "spi_in": 0xC1A2B3C4, "spi_out": "0000abcd",
              "proposal": "aes256gcm16-x25519", "interface": "xfrm-b", "if_id": 7, "encap": False,
              "ts_local": ["0.0.0.0/0"], "ts_remote": ["0.0.0.0/0"], "age": 65, "rekey_in": 3000,
              "bytes_in": 1572864, "packets_in": 1024, "bytes_out": 900, "packets_out": 9, "encr_key": FAKE_PSK}]


class FakeDaemon:
    """Handlers shaped like docs/control.md, with fields the CLI must not print mixed in."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.reload_ok = True
        self.bgp = False

    def known(self, params) -> str:
        name = params.get("tunnel")
        if name not in {t["name"] for t in TUNNELS}:
            raise ControlError("unknown_tunnel", f"no tunnel '{name}'; configured: to-b, to-c")
        return name

    def handlers(self):
        async def status(p):
            return {"name": "region-a", "version": __version__, "pid": 4242, "uptime": 90061, "config":
                    "/etc/isthmus/isthmus.yaml", "tunnels": {"configured": 2, "up": 1, "psk": FAKE_PSK},
                    "sas": {"ike": 1, "child": 1, "half_open": 0}, "bgp": None, "secret": FAKE_PSK}

        async def tunnels(p):
            return {"tunnels": TUNNELS}

        async def sas(p):
            if "tunnel" in p:
                self.known(p)
            keep = lambda rows: [r for r in rows if "tunnel" not in p or r["tunnel"] == p["tunnel"]]  # noqa: E731
            return {"ike_sas": keep(IKE_SAS), "child_sas": keep(CHILD_SAS)}

        async def routes(p):
            return {"routes": [{"prefix": "10.2.0.0/16", "next_hop": "169.254.21.2", "interface": "xfrm-b",
                                "tunnel": "to-b", "source": "bgp", "as_path": [65002], "installed": True}]}

        async def bgp(p):
            if not self.bgp:
                raise ControlError("unavailable", "BGP is not configured on this appliance")
            return {"asn": 65001, "router_id": "10.255.0.1", "neighbors": [
                {"tunnel": "to-b", "peer_address": "169.254.21.2", "peer_as": 65002, "state": "established",
                 "uptime": 600, "prefixes_received": 3, "prefixes_accepted": 2, "prefixes_advertised": 1,
                 "md5_password": FAKE_PSK}]}

        def op(name, state):
            async def handler(p):
                self.calls.append((name, dict(p)))
                tunnel = self.known(p)
                if name == "rekey" and p.get("kind") not in ("child", "ike"):
                    raise ControlError("invalid_params", "kind must be child or ike")
                if name == "rekey" and tunnel == "to-c":
                    raise ControlError("failed", "to-c has no Child SA to rekey")
                return {"tunnel": tunnel, "state": state, "message": f"{p.get('kind', '')}".strip() or None}
            return handler

        async def reload(p):
            if self.reload_ok:
                return {"added": ["to-d"], "removed": [], "changed": ["to-b"], "unchanged": ["to-c"]}
            raise ControlError("invalid_config", "the new configuration is invalid; nothing was changed", {
                "issues": [{"file": "/etc/isthmus/isthmus.yaml", "line": 14, "path": "tunnels.to-b.ike.proposals[0]",
                            "tunnel": "to-b", "message": "weak algorithm modp1024", "psk": FAKE_PSK}]})

        async def version(p):
            return {"version": "9.9.9", "protocol": 1, "pid": 4242, "build_secret": FAKE_PSK}

        return {"status": status, "tunnels": tunnels, "sas": sas, "routes": routes, "bgp": bgp,
                "initiate": op("initiate", "connecting"), "terminate": op("terminate", "deleting"),
                "rekey": op("rekey", "rekeying"), "reload": reload, "version": version}


@pytest.fixture
def daemon(tmp_path):
    fake = FakeDaemon()
    with ServerThread(tmp_path / "run", fake.handlers()) as srv:
        fake.srv = srv
        fake.run_dir = str(srv.run_dir)
        yield fake


def run(daemon_or_dir, *args, env=None):
    run_dir = daemon_or_dir if isinstance(daemon_or_dir, str) else daemon_or_dir.run_dir
    r = CliRunner().invoke(cli.main, ["--run-dir", run_dir, *args], env=env)
    assert FAKE_PSK not in r.output and FAKE_PSK not in (r.stderr or "")
    return r


# ----------------------------------------------------------------------------- status / show
def test_status_human(daemon):
    r = run(daemon, "status")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == f"isthmusd {__version__}  name region-a  pid 4242  up 1d 01h"
    assert lines[1:5] == ["config   /etc/isthmus/isthmus.yaml", "tunnels  1 of 2 up",
                          "SAs      1 IKE, 1 Child, 0 half-open", ""]
    header = lines[5].split()
    assert header[:3] == ["TUNNEL", "STATE", "REMOTE"] and header[-2:] == ["IN", "OUT"]
    assert lines[6].startswith("to-b") and "1.5 MiB (1,024 pkts)" in lines[6] and "900 B (9 pkts)" in lines[6]
    assert "1h 02m" in lines[6]
    # the peer-chosen ID cannot drive the terminal: escapes are shown, not interpreted
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "evil\\x1b[2J\\x1b]0;pwned\\x07" in lines[7]


def test_status_json(daemon):
    r = run(daemon, "status", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == {
        "name": "region-a", "version": __version__, "pid": 4242, "uptime": 90061, "config": "/etc/isthmus/isthmus.yaml",
        "tunnels": {"configured": 2, "up": 1}, "sas": {"ike": 1, "child": 1, "half_open": 0}, "bgp": None}


def test_show_tunnels(daemon):
    r = run(daemon, "show", "tunnels", "--json")
    assert r.exit_code == 0
    rows = json.loads(r.stdout)["tunnels"]
    keys = ["name", "state", "remote", "remote_id", "local", "local_id", "interface", "start", "ike_sas",
            "child_sas", "established", "cert_days_left", "peer_cert_days_left", "last_error", "bytes_in",
            "packets_in", "bytes_out", "packets_out"]
    assert [list(row) for row in rows] == [keys, keys]  # stable keys, in order, for every row
    assert rows[1]["local"] is None and rows[1]["bytes_in"] is None
    assert rows[1]["remote_id"] == "evil\x1b[2J\x1b]0;pwned\x07"  # JSON escapes it (\u001b) for scripts
    assert "\\u001b" in r.stdout
    r = run(daemon, "show", "tunnels")
    assert r.exit_code == 0 and r.stdout.splitlines()[0].split()[:2] == ["TUNNEL", "STATE"]


def test_show_sas_hex_spis(daemon):
    r = run(daemon, "show", "sas")
    assert r.exit_code == 0
    out = r.stdout
    assert "0x1a2b3c4d5e6f7081" in out and "0x00000000000000ff" in out
    assert "0xc1a2b3c4" in out and "0x0000abcd" in out
    assert out.startswith("IKE SAs\n") and "\nChild SAs\n" in out
    assert "1.5 MiB (1,024 pkts)" in out and "2m 05s" in out
    r = run(daemon, "show", "sas", "to-b", "--json")
    data = json.loads(r.stdout)
    assert data["ike_sas"][0]["spi_i"] == "0x1a2b3c4d5e6f7081" and data["ike_sas"][0]["spi_r"] == "0x00000000000000ff"
    child = data["child_sas"][0]
    assert (child["spi_in"], child["spi_out"], child["bytes_in"], child["if_id"]) == ("0xc1a2b3c4", "0x0000abcd",
                                                                                       1572864, 7)
    assert "SK_d" not in data["ike_sas"][0] and "keys" not in data["ike_sas"][0] and "encr_key" not in child
    assert daemon.calls == []
    r = run(daemon, "show", "sas", "to-c")
    assert r.exit_code == 0 and r.stdout.count("none") == 2


def test_unknown_tunnel_is_exit_1(daemon):
    r = run(daemon, "show", "sas", "nope")
    assert r.exit_code == 1
    assert r.stderr == "isthmus: no tunnel 'nope'; configured: to-b, to-c\n" and r.stdout == ""
    r = run(daemon, "up", "nope", "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout) == {"error": {"code": "unknown_tunnel",
                                              "message": "no tunnel 'nope'; configured: to-b, to-c"}}


def test_routes_and_bgp(daemon):
    r = run(daemon, "show", "routes")
    assert r.exit_code == 0 and "10.2.0.0/16" in r.stdout and "65002" in r.stdout and "yes" in r.stdout
    r = run(daemon, "show", "bgp")
    assert r.exit_code == 1 and "BGP is not configured" in r.stderr
    daemon.bgp = True
    r = run(daemon, "show", "bgp", "--json")
    data = json.loads(r.stdout)
    assert data["asn"] == 65001 and data["neighbors"][0]["prefixes_accepted"] == 2
    assert "md5_password" not in data["neighbors"][0]
    r = run(daemon, "show", "bgp")
    assert "local AS 65001, router id 10.255.0.1" in r.stdout and "established" in r.stdout


# ----------------------------------------------------------------------------- actions
def test_up_down_rekey(daemon):
    r = run(daemon, "up", "to-b")
    assert (r.exit_code, r.stdout) == (0, "to-b: connecting\n")
    r = run(daemon, "down", "to-b", "--json")
    assert json.loads(r.stdout) == {"tunnel": "to-b", "state": "deleting", "message": None}
    assert run(daemon, "rekey", "to-b").stdout == "to-b: rekeying (child)\n"
    assert run(daemon, "rekey", "--ike", "to-b").stdout == "to-b: rekeying (ike)\n"
    r = run(daemon, "rekey", "to-c")
    assert r.exit_code == 1 and "no Child SA to rekey" in r.stderr
    assert daemon.calls == [("initiate", {"tunnel": "to-b"}), ("terminate", {"tunnel": "to-b"}),
                            ("rekey", {"tunnel": "to-b", "kind": "child"}), ("rekey", {"tunnel": "to-b", "kind": "ike"}),
                            ("rekey", {"tunnel": "to-c", "kind": "child"})]


def test_reload(daemon):
    r = run(daemon, "reload")
    assert (r.exit_code, r.stdout) == (0, "reloaded: 1 added (to-d), 0 removed, 1 changed (to-b), 1 unchanged\n")
    daemon.reload_ok = False
    r = run(daemon, "reload")
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        "/etc/isthmus/isthmus.yaml:14: tunnels.to-b.ike.proposals[0]: weak algorithm modp1024",
        "isthmus: the new configuration is invalid; nothing was changed"]
    r = run(daemon, "reload", "--json")
    assert json.loads(r.stdout)["error"]["issues"] == [
        {"file": "/etc/isthmus/isthmus.yaml", "line": 14, "path": "tunnels.to-b.ike.proposals[0]", "tunnel": "to-b",
         "message": "weak algorithm modp1024"}]


def test_version(daemon, tmp_path):
    r = run(daemon, "version")
    assert (r.exit_code, r.stdout) == (0, f"isthmus {__version__}\nisthmusd 9.9.9 (pid 4242, protocol 1)\n")
    r = run(daemon, "version", "--json")
    assert json.loads(r.stdout) == {"cli": __version__, "daemon": {"version": "9.9.9", "protocol": 1, "pid": 4242}}
    r = run(str(tmp_path / "none"), "version", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"cli": __version__, "daemon": None}
    r = run(str(tmp_path / "none"), "version")
    assert r.exit_code == 0 and "isthmusd: not reachable (isthmusd is not running" in r.stdout


# ----------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize("args", [["status"], ["show", "tunnels"], ["show", "sas"], ["show", "routes"],
                                  ["show", "bgp"], ["up", "x"], ["down", "x"], ["rekey", "x"], ["reload"],
                                  ["events"], ["status", "--json"]])
def test_daemon_not_running_is_exit_3(tmp_path, args):
    r = run(str(tmp_path), *args)
    assert r.exit_code == 3, r.output
    assert "isthmusd is not running" in r.stderr and str(tmp_path / "isthmusd.sock") in r.stderr
    if "--json" in args:
        assert json.loads(r.stdout)["error"]["code"] == "unreachable"


@pytest.mark.parametrize("args", [["up"], ["rekey", "--bogus", "x"], ["show", "everything"], ["nope"],
                                  ["completion", "tcsh"], ["--timeout", "0", "status"]])
def test_usage_errors_are_exit_2(daemon, args):
    assert run(daemon, *args).exit_code == 2


def test_run_dir_from_environment(daemon):
    r = CliRunner().invoke(cli.main, ["up", "to-b"], env={"ISTHMUS_RUN_DIR": daemon.run_dir})
    assert r.exit_code == 0 and r.stdout == "to-b: connecting\n"


def test_daemon_dies_mid_command_is_exit_3(tmp_path):
    async def hang(p):
        import asyncio
        await asyncio.sleep(30)
    with ServerThread(tmp_path / "run", {"status": hang}) as srv:
        r = CliRunner().invoke(cli.main, ["--run-dir", str(srv.run_dir), "--timeout", "0.3", "status"])
    assert r.exit_code == 3 and "did not answer within 0.3 s" in r.stderr


# ----------------------------------------------------------------------------- events
def _feed_then_stop(daemon, events):
    def go():
        wait_until(lambda: daemon.srv.bus.subscribers == 1)
        for ev in events:
            daemon.srv.publish(*ev[:2], **ev[2])
        daemon.srv.stop()
    t = threading.Thread(target=go)
    t.start()
    return t


EVENTS = [("child_sa_up", "to-b", {"spi_in": "0xc1a2b3c4", "spi_out": 0xABCD, "proposal": "aes256gcm16-x25519",
                                   "encr_key": FAKE_PSK}),
          ("dpd_timeout", "to-c", {"reason": "no answer after 30 s"}),
          ("config_reloaded", None, {"added": ["to-d"], "changed": []})]


def test_events_json_until_daemon_stops(daemon):
    t = _feed_then_stop(daemon, EVENTS)
    r = run(daemon, "events", "--json")
    t.join(5)
    assert r.exit_code == 3 and "event stream ended" in r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines.pop()["error"]["code"] == "unreachable"  # the stream's end, as one JSON line
    assert [e["type"] for e in lines] == ["child_sa_up", "dpd_timeout", "config_reloaded"]
    assert set(lines[0]) == {"type", "time", "tunnel", "spi_in", "spi_out", "proposal"}
    assert lines[0]["spi_out"] == "0x0000abcd"
    assert lines[2] == {"type": "config_reloaded", "time": lines[2]["time"], "tunnel": None, "added": ["to-d"],
                        "changed": []}


def test_events_human_with_filters(daemon):
    t = _feed_then_stop(daemon, EVENTS)
    r = run(daemon, "events", "--tunnel", "to-b", "--tunnel", "to-c", "--type", "child_sa_up", "--type", "dpd_timeout")
    t.join(5)
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("child_sa_up      to-b  spi_in=0xc1a2b3c4 spi_out=0x0000abcd proposal=aes256gcm16-x25519")
    assert lines[1].endswith('dpd_timeout      to-c  reason="no answer after 30 s"')
    assert lines[0][:4] == "20" + lines[0][2:4] and lines[0][23] == "Z"


def test_events_ctrl_c_exits_0(daemon):
    """The real console script in a subprocess, interrupted like a user would."""
    # as from a terminal: SIGINT at its default even when the test run itself ignores it (a
    # background job of a non-interactive shell, e.g. `(.ci/run &)`, inherits SIGINT ignored)
    proc = subprocess.Popen([str(BIN / "isthmus"), "--run-dir", daemon.run_dir, "events", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until(lambda: daemon.srv.bus.subscribers == 1, timeout=30)
        daemon.srv.publish("ike_sa_up", "to-b", spi_i=5)
        first = proc.stdout.readline()
        assert json.loads(first)["spi_i"] == "0x0000000000000005"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == "" and out == ""


def test_events_reader_leaving_is_quiet(daemon):
    """`isthmus events | head -1`: the CLI ends with 0 and no traceback when its reader leaves."""
    proc = subprocess.Popen(f"'{BIN / 'isthmus'}' --run-dir '{daemon.run_dir}' events --json | head -n 1",
                            shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: daemon.srv.bus.subscribers == 1, timeout=30)
    for i in range(200):  # the first line ends head; later writes hit a closed pipe
        daemon.srv.publish("tick", "to-b", count=i)
        if proc.poll() is not None:
            break
    out, err = proc.communicate(timeout=30)
    assert json.loads(out)["count"] == 0 and err == ""


# ----------------------------------------------------------------------------- completion
@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F"), ("zsh", "#compdef isthmus"),
                                           ("fish", "complete --no-files --command isthmus")])
def test_completion_scripts(shell, marker):
    r = CliRunner().invoke(cli.main, ["completion", shell])
    assert r.exit_code == 0 and marker in r.stdout and "_ISTHMUS_COMPLETE" in r.stdout


def test_tunnel_names_complete_from_the_daemon(daemon, tmp_path):
    comp = ShellComplete(cli.main, {}, "isthmus", "_ISTHMUS_COMPLETE")
    names = lambda args, inc: [c.value for c in comp.get_completions(args, inc)]  # noqa: E731
    assert names(["--run-dir", daemon.run_dir, "up"], "to") == ["to-b", "to-c"]
    assert names(["--run-dir", daemon.run_dir, "rekey", "--ike"], "to-c") == ["to-c"]
    assert names(["--run-dir", daemon.run_dir, "show", "sas"], "") == ["to-b", "to-c"]
    assert names(["--run-dir", daemon.run_dir, "events", "--tunnel"], "") == ["to-b", "to-c"]
    assert names(["--run-dir", str(tmp_path / "none"), "up"], "") == []  # no daemon: no names, no error
    assert "show" in names([], "sh") and "status" in names([], "st")


def test_bash_completion_end_to_end(daemon):
    """The way bash asks: the console script with _ISTHMUS_COMPLETE, COMP_WORDS and COMP_CWORD."""
    env = {**os.environ, "_ISTHMUS_COMPLETE": "bash_complete", "COMP_WORDS": "isthmus down t", "COMP_CWORD": "2",
           "ISTHMUS_RUN_DIR": daemon.run_dir}
    r = subprocess.run([str(BIN / "isthmus")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert r.stdout.splitlines() == ["plain,to-b", "plain,to-c"]


# ----------------------------------------------------------------------------- formatting helpers
def test_human_units():
    from appliance.cli_views import human_bytes, human_duration, human_packets
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 1048576 * 5 + 1, 3 * 1024 ** 3, 1024 ** 6)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB", "1024.0 PiB"]
    assert [human_packets(n) for n in (0, 1, 1234567)] == ["0 pkts", "1 pkt", "1,234,567 pkts"]
    assert [human_duration(s) for s in (0, 59.9, 60, 3599, 3600, 86399, 90061)] == [
        "0s", "59s", "1m 00s", "59m 59s", "1h 00m", "23h 59m", "1d 01h"]


def test_coerce_is_strict():
    from appliance.cli_views import BOOL, BYTES, SPI4, SPI8, STR, STRLIST, coerce
    assert coerce(SPI4, 0xC1A2B3C4) == "0xc1a2b3c4" and coerce(SPI4, "C1A2B3C4") == "0xc1a2b3c4"
    assert coerce(SPI4, 1 << 32) is None and coerce(SPI4, "0x123456789") is None and coerce(SPI4, "zz") is None
    assert coerce(SPI8, "0x1a2b3c4d5e6f7081") == "0x1a2b3c4d5e6f7081" and coerce(SPI4, True) is None
    assert coerce(BYTES, True) is None and coerce(BYTES, "5") is None and coerce(BYTES, 5.0) == 5
    assert coerce(STR, {"nested": "x"}) is None and coerce(STR, 5) == "5" and coerce(BOOL, 1) is None
    assert coerce(STRLIST, ["a", {"b": 1}, 3]) == ["a", "3"]
