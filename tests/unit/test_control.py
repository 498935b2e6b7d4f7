"""The control socket: the real ControlServer and the real ControlClient over a temporary unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from appliance.control import (E_BAD_REQUEST, E_BUSY, E_INTERNAL, E_INVALID_PARAMS, E_TOO_LARGE, E_UNKNOWN_METHOD,
                               ControlClient, ControlError, ControlServer, ControlSocketInUse, DaemonUnreachable,
                               EventBus, RemoteError, RunDirError, check_params, format_spi, param, prepare_run_dir,
                               resolve_run_dir, socket_path, unknown_tunnel)
from tests.unit.control_util import ServerThread, wait_until


async def echo(params):
    return {"params": params}


async def fail(params):
    raise ControlError("unknown_tunnel", "no tunnel 'x'; configured: to-b", {"tunnels": ["to-b"]})


async def crash(params):
    raise RuntimeError("handler bug")


async def bad_result(params):
    return {"key": b"\x01\x02secret"}


async def typed(params):
    check_params(params, {"tunnel", "ike"})
    return [param(params, "tunnel", str), param(params, "ike", bool, False)]


HANDLERS = {"echo": echo, "fail": fail, "crash": crash, "bad_result": bad_result, "typed": typed}


@pytest.fixture
def srv(tmp_path):
    with ServerThread(tmp_path / "run", HANDLERS) as s:
        yield s


def raw(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def read_line(s: socket.socket) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            raise EOFError(buf)
        buf += chunk
    return json.loads(buf)


# ----------------------------------------------------------------------------- requests
def test_call_round_trip(srv):
    with ControlClient(srv.run_dir) as c:
        assert c.call("echo", tunnel="to-b", n=3) == {"params": {"tunnel": "to-b", "n": 3}}
        assert c.call("echo") == {"params": {}}  # same connection, second request


def test_default_version(srv):
    from appliance import __version__
    with ControlClient(srv.run_dir) as c:
        assert c.call("version") == {"version": __version__, "protocol": 1, "pid": os.getpid()}


def test_unknown_tunnel_helper():
    err = unknown_tunnel("x", ["to-c", "to-b"])
    assert (err.code, err.message) == ("unknown_tunnel", "no tunnel 'x'; configured: to-b, to-c")
    assert unknown_tunnel("x", []).message.endswith("configured: none")


def test_handler_errors_are_answers_not_crashes(srv):
    with ControlClient(srv.run_dir) as c:
        with pytest.raises(RemoteError) as e:
            c.call("fail")
        assert (e.value.code, e.value.data) == ("unknown_tunnel", {"tunnels": ["to-b"]})
        assert "no tunnel 'x'" in e.value.message
        with pytest.raises(RemoteError) as e:
            c.call("crash")
        assert e.value.code == E_INTERNAL and "RuntimeError" in e.value.message
        with pytest.raises(RemoteError) as e:
            c.call("nope")
        assert e.value.code == E_UNKNOWN_METHOD and "echo" in e.value.message and "subscribe" in e.value.message
        assert c.call("echo", a=1) == {"params": {"a": 1}}  # the connection survived all of it


def test_result_with_bytes_is_refused(srv):
    """A handler cannot put raw bytes (key material) on the wire: internal error, no bytes echoed."""
    with ControlClient(srv.run_dir) as c:
        with pytest.raises(RemoteError) as e:
            c.call("bad_result")
    assert e.value.code == E_INTERNAL
    assert "secret" not in e.value.message and "\\x01" not in e.value.message


def test_param_helpers(srv):
    with ControlClient(srv.run_dir) as c:
        assert c.call("typed", tunnel="t") == ["t", False]
        assert c.call("typed", tunnel="t", ike=True) == ["t", True]
        for params, text in [({}, "missing parameter 'tunnel'"),
                             ({"tunnel": 5}, "'tunnel' must be a string, not an integer"),
                             ({"tunnel": "t", "ike": 1}, "'ike' must be a boolean"),
                             ({"tunnel": "t", "force": True}, "unknown parameter 'force'; allowed: ike, tunnel")]:
            with pytest.raises(RemoteError) as e:
                c.call("typed", **params)
            assert e.value.code == E_INVALID_PARAMS and text in e.value.message, e.value.message


@pytest.mark.parametrize("line, code, rid", [
    (b"not json\n", E_BAD_REQUEST, None),
    (b"\xff\xfe\n", E_BAD_REQUEST, None),
    (b"[1, 2]\n", E_BAD_REQUEST, None),
    (b'"echo"\n', E_BAD_REQUEST, None),
    (b'{"id": 1}\n', E_BAD_REQUEST, 1),
    (b'{"id": 2, "method": 5}\n', E_BAD_REQUEST, 2),
    (b'{"id": 3, "method": ""}\n', E_BAD_REQUEST, 3),
    (b'{"id": 4, "method": "echo", "params": [1]}\n', E_BAD_REQUEST, 4),
    (b'{"id": true, "method": "echo"}\n', E_BAD_REQUEST, None),
    (b'{"id": [1], "method": "echo"}\n', E_BAD_REQUEST, None),
    (b'{"id": 5, "method": "echo", "extra": 1}\n', E_BAD_REQUEST, 5),
    (b'{"id": 6, "method": "subscribe", "params": {"types": "x"}}\n', E_INVALID_PARAMS, 6),
    (b'{"id": 7, "method": "subscribe", "params": {"tunnel": "x"}}\n', E_INVALID_PARAMS, 7),
])
def test_malformed_request_gets_error_and_connection_survives(srv, line, code, rid):
    s = raw(srv.path)
    try:
        s.sendall(line)
        resp = read_line(s)
        assert resp["id"] == rid and resp["error"]["code"] == code, resp
        assert resp["error"]["message"]
        s.sendall(b'{"id": "next", "method": "echo", "params": {"ok": true}}\n')
        assert read_line(s) == {"id": "next", "result": {"params": {"ok": True}}}
    finally:
        s.close()


def test_ids_echoed_blank_lines_ignored(srv):
    s = raw(srv.path)
    try:
        s.sendall(b'\n\r\n{"method": "echo"}\n{"id": null, "method": "echo", "params": null}\n')
        assert read_line(s) == {"id": None, "result": {"params": {}}}
        assert read_line(s) == {"id": None, "result": {"params": {}}}
        # pipelined requests are answered in order
        s.sendall(b'{"id": 1, "method": "echo", "params": {"n": 1}}\n{"id": 2, "method": "echo", "params": {"n": 2}}\n')
        assert [read_line(s)["id"], read_line(s)["id"]] == [1, 2]
    finally:
        s.close()


def test_last_request_without_newline_is_answered(srv):
    s = raw(srv.path)
    try:
        s.sendall(b'{"id": 9, "method": "echo"}')
        s.shutdown(socket.SHUT_WR)
        assert read_line(s) == {"id": 9, "result": {"params": {}}}
        assert s.recv(1) == b""  # then the server closes
    finally:
        s.close()


@pytest.mark.parametrize("newline", [True, False])
def test_request_too_large(tmp_path, newline):
    with ServerThread(tmp_path / "run", HANDLERS, max_request=1024) as srv:
        s = raw(srv.path)
        try:
            big = b'{"id": 1, "method": "echo", "params": {"x": "' + b"a" * 5000 + b'"}}'
            try:
                s.sendall(big + (b"\n" if newline else b""))
            except BrokenPipeError:
                pass
            resp = read_line(s)
            assert resp["error"]["code"] == E_TOO_LARGE and "1024" in resp["error"]["message"]
            with pytest.raises((EOFError, ConnectionResetError)):
                read_line(s)  # connection closed
        finally:
            s.close()
        # exactly at the limit is fine
        line = b'{"id": 1, "method": "echo", "params": {"x": "'
        line += b"a" * (1024 - len(line) - 3) + b'"}}'
        assert len(line) == 1024
        s = raw(srv.path)
        try:
            s.sendall(line + b"\n")
            assert read_line(s)["result"]["params"]["x"].startswith("aaa")
        finally:
            s.close()
        with ControlClient(srv.run_dir) as c:  # the server is fine
            assert c.call("echo") == {"params": {}}


def test_connection_limit(tmp_path):
    with ServerThread(tmp_path / "run", HANDLERS, max_connections=2) as srv:
        a, b = raw(srv.path), raw(srv.path)
        try:
            wait_until(lambda: srv.server.connections == 2)
            c = raw(srv.path)
            resp = read_line(c)
            assert resp["error"]["code"] == E_BUSY
            c.close()
        finally:
            a.close()
            b.close()
        wait_until(lambda: srv.server.connections == 0)
        with ControlClient(srv.run_dir) as cl:
            assert cl.call("echo") == {"params": {}}


def test_idle_connection_is_closed(tmp_path):
    with ServerThread(tmp_path / "run", HANDLERS, idle_timeout=0.2) as srv:
        s = raw(srv.path)
        try:
            assert s.recv(1) == b""  # the server hung up on the silent client
        finally:
            s.close()


def test_subscribe_is_reserved():
    with pytest.raises(ValueError, match="subscribe"):
        ControlServer("/nonexistent/x.sock", {"subscribe": echo})


# ----------------------------------------------------------------------------- socket, directory, stale socket
def test_socket_and_dir_modes(tmp_path):
    run = tmp_path / "a" / "run"
    with ServerThread(run, HANDLERS) as srv:
        assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
        st = os.lstat(srv.path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert srv.path == run / "isthmusd.sock"
    assert not srv.path.exists()  # removed on close


def test_existing_dir_is_tightened(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)
    prepare_run_dir(run)
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700


def test_unsafe_run_dirs_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(RunDirError, match="sticky"):
        prepare_run_dir(shared)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777  # untouched
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError):
        prepare_run_dir(f)
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(RunDirError, match="uid 65534"):
        prepare_run_dir(other)


def test_stale_socket_is_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(run / "isthmusd.sock"))  # bound, never listening: what a killed daemon leaves
    dead.close()
    with pytest.raises(DaemonUnreachable, match="stale socket"):
        ControlClient(run).call("echo")
    with ServerThread(run, HANDLERS) as srv:
        with ControlClient(run) as c:
            assert c.call("echo") == {"params": {}}
        assert stat.S_IMODE(os.lstat(srv.path).st_mode) == 0o600


def test_live_daemon_is_not_replaced(srv):
    ino = os.lstat(srv.path).st_ino
    second = ControlServer(srv.path, HANDLERS)
    with pytest.raises(ControlSocketInUse, match="another isthmusd is running"):
        asyncio.run(second.start())
    assert os.lstat(srv.path).st_ino == ino
    with ControlClient(srv.run_dir) as c:  # the first one still serves
        assert c.call("echo") == {"params": {}}


def test_non_socket_at_path_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "isthmusd.sock").write_text("not mine")
    with pytest.raises(ControlSocketInUse, match="not a socket"):
        asyncio.run(ControlServer(run / "isthmusd.sock", HANDLERS).start())
    assert (run / "isthmusd.sock").read_text() == "not mine"


def test_close_leaves_a_replaced_socket_alone(tmp_path):
    with ServerThread(tmp_path / "run", HANDLERS) as srv:
        os.unlink(srv.path)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(srv.path))
        srv.stop()
        assert srv.path.exists()  # someone else's socket now: not removed
        other.close()


# ----------------------------------------------------------------------------- client errors
def test_client_without_daemon(tmp_path, monkeypatch):
    with pytest.raises(DaemonUnreachable) as e:
        ControlClient(tmp_path).call("status")
    assert "not running" in str(e.value) and str(tmp_path / "isthmusd.sock") in str(e.value)
    assert "ISTHMUS_RUN_DIR" in str(e.value)


def test_run_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("ISTHMUS_RUN_DIR", raising=False)
    assert socket_path() == Path("/run/isthmus/isthmusd.sock")
    monkeypatch.setenv("ISTHMUS_RUN_DIR", str(tmp_path))
    assert resolve_run_dir() == tmp_path
    assert resolve_run_dir("/x") == Path("/x")


def test_daemon_going_away_mid_session(tmp_path):
    with ServerThread(tmp_path / "run", HANDLERS) as srv:
        c = ControlClient(srv.run_dir)
        assert c.call("echo") == {"params": {}}
        srv.stop()
        with pytest.raises(DaemonUnreachable):
            c.call("echo")
        c.close()


def test_client_rejects_garbage_from_the_socket(tmp_path):
    """Something that is not isthmusd listening on the path: a clear protocol error."""
    path = tmp_path / "isthmusd.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)
    import threading

    def answer():
        conn, _ = lsock.accept()
        conn.recv(1000)
        conn.sendall(b"HTTP/1.0 400 Bad Request\n")
        conn.close()
    t = threading.Thread(target=answer)
    t.start()
    with pytest.raises(DaemonUnreachable, match="not JSON"):
        ControlClient(tmp_path).call("status")
    t.join()
    lsock.close()


def test_format_spi():
    assert format_spi(0xC1A2) == "0x0000c1a2"
    assert format_spi(0x1A2B3C4D5E6F7081, 8) == "0x1a2b3c4d5e6f7081"


# ----------------------------------------------------------------------------- events
def test_events_stream_in_order_with_filters(srv):
    all_events = ControlClient(srv.run_dir).events()  # subscribed when events() returns
    only_b = ControlClient(srv.run_dir).events(tunnels=["to-b"], types=["child_sa_up"])
    assert srv.bus.subscribers == 2
    first = srv.publish("hello")
    srv.publish("child_sa_up", "to-c", spi_in="0x00000001")
    srv.publish("ike_sa_up", "to-b")
    ev = srv.publish("child_sa_up", "to-b", spi_in="0xc1a2b3c4", spi_out="0x0000abcd")
    assert next(only_b) == ev
    assert set(ev) == {"type", "time", "tunnel", "spi_in", "spi_out"}
    assert ev["time"].endswith("Z") and ev["time"][:2] == "20"
    assert next(all_events) == first and first["tunnel"] is None
    assert [next(all_events)["type"] for _ in range(3)] == ["child_sa_up", "ike_sa_up", "child_sa_up"]
    all_events.close()
    only_b.close()
    wait_until(lambda: srv.bus.subscribers == 0)  # closing the stream unsubscribes
    with pytest.raises(StopIteration):
        next(all_events)


def test_subscribe_errors_raise_at_call(srv, tmp_path):
    with pytest.raises(RemoteError) as e:
        ControlClient(srv.run_dir).events(types=[1])  # type: ignore[list-item]
    assert e.value.code == E_INVALID_PARAMS
    with pytest.raises(DaemonUnreachable):
        ControlClient(tmp_path / "nothing").events()


def test_event_stream_ends_when_daemon_stops(tmp_path):
    with ServerThread(tmp_path / "run", HANDLERS) as srv:
        it = ControlClient(srv.run_dir).events()
        import threading
        out: list = []

        def follow():
            try:
                for ev in it:
                    out.append(ev)
            except DaemonUnreachable as exc:
                out.append(exc)
        t = threading.Thread(target=follow)
        t.start()
        wait_until(lambda: srv.bus.subscribers == 1)
        srv.publish("x")
        wait_until(lambda: len(out) == 1)
        srv.stop()
        t.join(5)
        assert out[0]["type"] == "x" and isinstance(out[1], DaemonUnreachable)


def test_publish_refuses_non_json_values():
    bus = EventBus()

    class KeyHolder:
        def __repr__(self):
            return "KeyHolder(<redacted>)"
    for bad in (b"\x00" * 16, KeyHolder(), float("nan")):
        with pytest.raises((TypeError, ValueError)):
            bus.publish("x", "t", value=bad)
    with pytest.raises(ValueError, match="time"):
        bus.publish("x", time=1)
    assert bus.published == 0


def test_subscription_queue_drops_with_marker_in_order():
    async def go():
        bus = EventBus(queue_size=3)
        sub = bus.subscribe()
        for i in range(5):
            bus.publish("e", n=i)
        assert sub.pending() == 3 and sub.dropped_total == 2
        got = [await sub.get() for _ in range(4)]
        assert [g.get("n") for g in got[:3]] == [0, 1, 2]
        assert got[3]["type"] == "dropped" and got[3]["count"] == 2
        # after the marker the queue takes events again, in order
        bus.publish("e", n=5)
        for i in range(6, 10):
            bus.publish("e", n=i)  # 6, 7 fit, 8 and 9 dropped
        got = [await sub.get() for _ in range(4)]
        assert [g.get("n") for g in got] == [5, 6, 7, None] and got[3]["count"] == 2
        sub.close()
        assert bus.subscribers == 0
        bus.publish("e")  # nobody listening: fine
    asyncio.run(go())


def test_slow_subscriber_does_not_stall_the_daemon(tmp_path):
    """A subscriber that reads nothing: the daemon keeps publishing and answering requests; when
    the subscriber finally reads, it sees what fit in its queue, then a 'dropped N' marker, and
    every event is accounted for."""
    with ServerThread(tmp_path / "run", HANDLERS, queue_size=50) as srv:
        s = raw(srv.path)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b'{"id": 1, "method": "subscribe"}\n')
        assert read_line(s)["result"] == {"subscribed": True, "queue": 50}
        wait_until(lambda: srv.bus.subscribers == 1)
        n = 5000
        pad = "p" * 400  # ~2 MB in total: far more than the socket buffers hold

        def burst():
            for i in range(n):
                srv.bus.publish("tick", "t", n=i, pad=pad)
        srv.run(burst, timeout=60)
        with ControlClient(srv.run_dir) as c:  # the daemon still answers while the subscriber sleeps
            assert c.call("echo") == {"params": {}}
        srv.publish("last", "t", n=n)
        received, dropped, order = 0, 0, []
        s.settimeout(10)
        f = s.makefile("rb")
        while True:
            ev = json.loads(f.readline())
            if ev["type"] == "dropped":
                dropped += ev["count"]
                order.append("D")
                continue
            received += 1
            order.append(ev["n"])
            if ev["type"] == "last":
                break
        s.close()
        assert dropped > 0 and received + dropped == n + 1
        nums = [o for o in order if o != "D"]
        assert nums == sorted(nums)  # never reordered
        assert order[-1] == n


def test_utc_timestamp_is_datetimes_rounding():
    """utc_timestamp formats the second once (issue 13); the text is what datetime gives."""
    import random
    from datetime import datetime, timezone

    from appliance.control import utc_timestamp

    def ref(t):
        dt = datetime.fromtimestamp(t, tz=timezone.utc)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    rnd = random.Random(13)
    cases = [0.0, 1e-7, 0.9999995, 0.9999994, 1764752226.0005, 1764752226.9999996]
    cases += [rnd.uniform(0, 4e9) for _ in range(3000)]
    cases += [rnd.randint(0, 2**32) + rnd.choice([0.0, 0.0005, 0.9995, 0.99999949, 0.99999951]) for _ in range(3000)]
    for t in cases:
        assert utc_timestamp(t) == ref(t), t
