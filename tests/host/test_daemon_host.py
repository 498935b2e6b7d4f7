"""isthmusd on the host kernel: real daemons in network namespaces, driven through the control
socket and the real CLI.

The host kernel has no ESP and no XFRM interfaces, so here the data plane fails for every Child
SA - which is what these tests use to check how the daemon behaves then: a `dataplane_error`
event with the kernel's reason, the IKE SA deleted with a DELETE to the peer, and a new attempt
later. Everything else (start/stop, pid file, control socket, reload validation, SIGHUP, systemd
notifications, IKE between two daemons, authentication failures, metrics) runs for real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.control import ControlClient, RemoteError
from appliance.daemon import RETRY_FIRST as RETRY_FIRST_S
from tests.appliances import Appliance, wait_for
from tests.netns import Netns, veth_pair

pytestmark = pytest.mark.host

PSK = "host-test-psk-7c1f0e9a2b"


def config(tunnel: str, remote: str, local: str, start: bool, psk_file: str = "secrets/t.psk", extra: str = "",
           more: str = "", name: str = "region") -> str:
    return (f"appliance: {{name: {name}}}\ntunnels:\n  {tunnel}:\n    remote: {remote}\n    local: {local}\n"
            f"    auth: {{psk_file: {psk_file}}}\n    start: {'true' if start else 'false'}\n"
            f"    routes: [10.99.0.0/16]\n{extra}{more}")


@pytest.fixture
def pair(tmp_path):
    """Namespaces A and B joined by veth (192.0.2.1 <-> 192.0.2.2) and an Appliance for each."""
    with Netns("dha") as na, Netns("dhb") as nb:
        veth_pair(na, "wan", nb, "wan")
        na.run("ip addr add 192.0.2.1/24 dev wan")
        nb.run("ip addr add 192.0.2.2/24 dev wan")
        a = Appliance("A", na.name, tmp_path / "a")
        b = Appliance("B", nb.name, tmp_path / "b")
        for x in (a, b):
            x.write_psk("t.psk", PSK)
        a.write_config(config("to-b", "192.0.2.2", "192.0.2.1", True, name="region-a"))
        b.write_config(config("to-a", "192.0.2.1", "192.0.2.2", False, name="region-b"))
        try:
            yield a, b
        finally:
            for x in (a, b):
                x.kill()


class Events:
    """The daemon's event stream, recorded in a thread."""

    def __init__(self, app: Appliance) -> None:
        self.items: list[dict] = []
        self._client = ControlClient(app.run_dir, timeout=None)
        self._stream = self._client.events()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for e in self._stream:
                self.items.append(e)
        except Exception:  # noqa: BLE001 - the stream ends with the daemon
            pass

    def of(self, type_: str) -> list[dict]:
        return [e for e in self.items if e["type"] == type_]

    def close(self) -> None:
        self._stream.close()
        self._client.close()


def test_start_status_pid_file_cli_and_clean_stop(pair):
    a, _ = pair
    a.start()
    assert a.pid == a.proc.pid      # `ip netns exec` execs the daemon
    st = a.cli_json("status")
    assert st["name"] == "region-a" and st["tunnels"] == {"configured": 1, "up": 0}
    assert st["config"] == str(a.config_path) and st["pid"] == a.pid
    tunnels = a.cli_json("show", "tunnels")["tunnels"]
    assert [(t["name"], t["state"], t["interface"], t["local"]) for t in tunnels] == \
        [("to-b", "connecting", "xfrm-to-b", "192.0.2.1")]   # initiating; B is not running
    routes = a.call("routes")["routes"]
    assert routes == [{"prefix": "10.99.0.0/16", "next_hop": None, "interface": "xfrm-to-b", "tunnel": "to-b",
                       "source": "static", "as_path": None, "installed": False, "active": False}]
    r = a.cli("show", "bgp", check=False)
    assert r.returncode == 1 and "BGP is not configured" in r.stderr
    r = a.cli("up", "nope", check=False)
    assert r.returncode == 1 and "no tunnel 'nope'; configured: to-b" in r.stderr
    r = a.cli("rekey", "to-b", check=False)
    assert r.returncode == 1 and "cannot rekey to-b" in r.stderr
    pid_file, sock = a.run_dir / "isthmusd.pid", a.run_dir / "isthmusd.sock"
    assert pid_file.exists() and sock.exists()
    assert a.stop(signal.SIGTERM) == 0
    assert not pid_file.exists() and not sock.exists()
    assert "stopping (SIGTERM)" in a.log_text()


def test_second_daemon_on_the_same_run_dir_is_refused(pair):
    a, _ = pair
    a.start()
    r = subprocess.run(a.argv(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "another isthmusd is running with run directory" in r.stderr
    assert a.call("status")["pid"] == a.pid    # the first one is unharmed


def test_invalid_config_at_start_exits_1_with_file_line_and_field(pair):
    a, _ = pair
    a.write_config(config("to-b", "192.0.2.2", "192.0.2.1", True, extra="    esp: {proposals: [aes128-md5]}\n"))
    r = subprocess.run(a.argv(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"{a.config_path}:9: tunnels.to-b.esp.proposals[0]:" in r.stderr, r.stderr
    assert not (a.run_dir / "isthmusd.pid").exists()


BAD = {
    "bad proposal": (dict(extra="    ike: {proposals: [aes256gcm16-prfsha384-nosuchgroup]}\n"),
                     "tunnels.to-b.ike.proposals[0]", 9),
    "weak algorithm": (dict(extra="    esp: {proposals: [3des-sha1]}\n"), "tunnels.to-b.esp.proposals[0]", 9),
    "aws /29": (dict(more="  aws:\n    peer_profile: aws\n    remote: 198.51.100.9\n"
                          "    auth: {psk_file: secrets/aws.psk}\n    interface: {address: 169.254.100.1/29}\n"),
                "tunnels.aws.interface.address", 13),
}


def test_reload_refuses_invalid_configs_and_keeps_running_config(pair):
    a, _ = pair
    a.write_psk("aws.psk", "Qm7.vT2_xK9pL4wZ8nR3")
    a.start()
    good = a.config_path.read_text()
    for what, (change, field, line) in BAD.items():
        a.write_config(config("to-b", "192.0.2.2", "192.0.2.1", True, **change))
        r = a.cli("reload", check=False)
        assert r.returncode == 1, what
        assert f"{a.config_path}:{line}: {field}:" in r.stderr, (what, r.stderr)
        assert "nothing was changed" in r.stderr
    # a world-readable PSK file
    a.write_config(good)
    (a.etc / "secrets" / "t.psk").chmod(0o644)
    r = a.cli("reload", "--json", check=False)
    assert r.returncode == 1
    issues = json.loads(r.stdout)["error"]["issues"]
    assert [(i["line"], i["path"], i["tunnel"]) for i in issues] == [(6, "tunnels.to-b.auth.psk_file", "to-b")]
    assert "0644" in issues[0]["message"] and PSK not in r.stdout + r.stderr
    (a.etc / "secrets" / "t.psk").chmod(0o600)
    assert [t["name"] for t in a.call("tunnels")["tunnels"]] == ["to-b"]
    # a valid change goes through: one added, the existing one unchanged
    a.write_config(good + "  to-c:\n    remote: 192.0.2.3\n    local: 192.0.2.1\n"
                          "    auth: {psk_file: secrets/t.psk}\n    start: false\n")
    assert a.call("reload") == {"added": ["to-c"], "removed": [], "changed": [], "unchanged": ["to-b"]}
    assert [t["name"] for t in a.call("tunnels")["tunnels"]] == ["to-b", "to-c"]
    # and back: to-c removed, to-b changed (a new PSK file means a new PSK)
    a.write_psk("t2.psk", PSK + "-v2")
    a.write_config(good.replace("secrets/t.psk", "secrets/t2.psk"))
    assert a.call("reload") == {"added": [], "removed": ["to-c"], "changed": ["to-b"], "unchanged": []}


def test_sighup_reloads_and_a_bad_file_on_sighup_changes_nothing(pair):
    a, _ = pair
    a.start()
    ev = Events(a)
    try:
        good = a.config_path.read_text()
        a.write_config(good.replace("routes: [10.99.0.0/16]", "routes: [10.98.0.0/16]"))
        a.proc.send_signal(signal.SIGHUP)
        wait_for("config_reloaded", lambda: ev.of("config_reloaded"), 30)
        assert ev.of("config_reloaded")[0]["changed"] == ["to-b"]
        assert a.call("routes")["routes"][0]["prefix"] == "10.98.0.0/16"
        a.write_config(good.replace("remote: 192.0.2.2", "remote: 192.0.2.999"))
        a.proc.send_signal(signal.SIGHUP)
        wait_for("the refusal in the log", lambda: "reload refused" in a.log_text(), 30)
        assert f"{a.config_path}:4: tunnels.to-b.remote:" in a.log_text()
        assert a.call("routes")["routes"][0]["prefix"] == "10.98.0.0/16"
        assert len(ev.of("config_reloaded")) == 1
    finally:
        ev.close()


def test_systemd_notifications(pair, tmp_path):
    a, _ = pair
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(60)
    try:
        a.start(env={"NOTIFY_SOCKET": str(path)})
        assert sock.recv(4096).decode().splitlines()[0] == "READY=1"
        a.proc.send_signal(signal.SIGHUP)
        reloading = sock.recv(4096).decode().splitlines()
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert int(reloading[1].split("=")[1]) > 0
        assert sock.recv(4096).decode().startswith("READY=1")
        a.proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode().startswith("STOPPING=1")
        assert a.stop() == 0
    finally:
        sock.close()


def test_two_daemons_negotiate_and_a_failing_data_plane_deletes_and_retries(pair):
    """IKE between two real daemons; the host kernel refuses the XFRM interface, so each Child SA
    fails in the data plane: both publish dataplane_error with the kernel's reason, the IKE SA
    is deleted (DELETE to the peer), and the initiator tries again with back-off."""
    a, b = pair
    b.start()
    a.start(wait=False)
    a.wait_ready()
    ev_a, ev_b = Events(a), Events(b)
    try:
        # the initiator may have negotiated before we subscribed: the retry shows it all again
        wait_for("a second round on A (retry after the failure)", lambda: len(ev_a.of("ike_sa_up")) >= 2, 60,
                 log_of=a)
        up_a, up_b = ev_a.of("ike_sa_up")[0], wait_for("B's ike_sa_up", lambda: ev_b.of("ike_sa_up"), 30)[0]
        assert up_a["role"] == "initiator" and up_b["role"] == "responder"
        for e in (ev_a, ev_b):
            errors = e.of("dataplane_error")
            assert errors and all("xfrm" in x["message"].lower() for x in errors), errors
        first = {(e["spi_i"], e["spi_r"]) for e in ev_a.of("ike_sa_up")}
        assert {(e["spi_i"], e["spi_r"]) for e in ev_b.of("ike_sa_up")} & first
        downs = ev_a.of("ike_sa_down") + ev_b.of("ike_sa_down")
        assert downs, "the IKE SA of a failed Child SA must be deleted"
        assert any(e["state"] == "error" for e in ev_a.of("tunnel_state"))
        assert not ev_a.of("child_sa_up") and not ev_a.of("route_added")
        t = a.call("tunnels")["tunnels"][0]
        assert t["state"] in ("error", "connecting") and t["established"] is None
        assert "initiating again in" in a.log_text()
        m = a.metrics()
        assert 'isthmus_tunnel_up{tunnel="to-b"} 0' in m
    finally:
        ev_a.close()
        ev_b.close()


def test_wrong_psk_is_an_auth_failure_in_events_metrics_and_logs(pair):
    a, b = pair
    b.write_psk("t.psk", PSK + "-different")
    b.start()
    a.start(wait=False)
    a.wait_ready()
    ev = Events(a)
    try:
        wait_for("auth_failed on A", lambda: ev.of("auth_failed"), 60, log_of=a)
        m = wait_for("the auth failure counted",
                     lambda: (t := a.metrics()) and 'isthmus_auth_failures_total{tunnel="to-b"}' in t and t, 30)
        assert "isthmus_half_open_ike_sas" in m and "\nisthmus_ike_cookies_required 0\n" in m
        text = a.log_text() + b.log_text() + json.dumps(ev.items) + m
        for secret in (PSK, PSK + "-different"):
            assert secret not in text and secret.encode().hex() not in text
    finally:
        ev.close()
    assert b.call("tunnels")["tunnels"][0]["state"] != "up"


def test_terminate_and_initiate_from_the_cli(pair):
    """`isthmus down` stops the tunnel for good (also the data plane retry); `isthmus up` starts it.
    On the host every IKE SA lives only until its Child SA fails in the data plane, so the tunnel's
    life is followed in the event stream."""
    a, b = pair
    b.start()
    a.start()
    ev = Events(a)
    try:
        wait_for("an IKE SA coming up on A", lambda: ev.of("ike_sa_up"), 60, log_of=a)
        r = a.cli("down", "to-b")
        assert r.stdout.startswith("to-b: ")
        time.sleep(0.5)
        seen = len(ev.of("ike_sa_up"))
        time.sleep(RETRY_FIRST_S * 3)   # longer than the first data plane retry: none may come
        assert len(ev.of("ike_sa_up")) == seen, "re-initiated after 'down'"
        assert not a.sas()["ike_sas"]
        assert a.call("initiate", tunnel="to-b")["state"] == "connecting"
        wait_for("a new IKE SA after 'up'", lambda: len(ev.of("ike_sa_up")) > seen, 60, log_of=a)
    finally:
        ev.close()
    with pytest.raises(RemoteError) as exc:
        a.call("rekey", tunnel="to-b", kind="sideways")
    assert exc.value.code == "invalid_params"


def test_metrics_listen_off_and_log_formats(tmp_path):
    """Options: --metrics-listen off, a bad --metrics-listen is a usage error (exit 2)."""
    r = subprocess.run([sys.executable, "-m", "appliance.daemon", "--metrics-listen", "nowhere"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--metrics-listen" in r.stderr
    r = subprocess.run([sys.executable, "-m", "appliance.daemon", "--config", str(tmp_path / "missing.yaml"),
                        "--run-dir", str(tmp_path / "run"), "--metrics-listen", "off"],
                       capture_output=True, text=True, timeout=60, env={**os.environ})
    assert r.returncode == 1 and "does not exist" in r.stderr
    assert not Path(tmp_path / "run" / "isthmusd.pid").exists()
