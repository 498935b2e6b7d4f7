"""User hooks: real executables in a directory, run with the documented environment only; a failing
or hanging hook is reported and time-limited, never raised."""

from __future__ import annotations

import stat
import time

from appliance.xfrm import ChildSa, Endpoints, EspAlgorithms, SaKeys, TunnelInterface, UdpEncap
from appliance.xfrm.hook import UserHooks, hook_environment, tunnel_mtu


def _hook(d, name, text):
    p = d / name
    p.write_text(text)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def _child(**kw):
    alg = EspAlgorithms.from_proposal("aes256gcm16")
    base = dict(spi_in=0xC100, spi_out=0xC200, algorithms=alg, keys_in=SaKeys(b"\xaa" * 36),
                keys_out=SaKeys(b"\xbb" * 36), endpoints=Endpoints("192.0.2.1", "192.0.2.2", UdpEncap(4500, 1234)))
    base.update(kw)
    return ChildSa(**base)


def test_environment_is_documented_and_keyless():
    iface = TunnelInterface("to-b", "xfrm-b", addresses=("169.254.21.1/30", "fd00::1/126"))
    c, old = _child(), _child(spi_in=0xD100, spi_out=0xD200)
    env = hook_environment("rekey", iface, 7, c, tunnel_mtu(iface, c, 1500), "ns-a", old)
    assert env == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
        "ISTHMUS_EVENT": "rekey", "ISTHMUS_TUNNEL": "to-b", "ISTHMUS_INTERFACE": "xfrm-b", "ISTHMUS_IFINDEX": "7",
        "ISTHMUS_IF_ID": str(iface.if_id), "ISTHMUS_ADDRESSES": "169.254.21.1/30 fd00::1/126",
        "ISTHMUS_NETNS": "ns-a", "ISTHMUS_MTU": "1438", "ISTHMUS_MSS4": "1398", "ISTHMUS_MSS6": "1378",
        "ISTHMUS_LOCAL": "192.0.2.1", "ISTHMUS_REMOTE": "192.0.2.2", "ISTHMUS_ENCAP": "udp",
        "ISTHMUS_LOCAL_PORT": "4500", "ISTHMUS_REMOTE_PORT": "1234",
        "ISTHMUS_SPI_IN": "0x0000c100", "ISTHMUS_SPI_OUT": "0x0000c200",
        "ISTHMUS_ESP": "rfc4106(gcm(aes)) key 256 icv 128",
        "ISTHMUS_OLD_SPI_IN": "0x0000d100", "ISTHMUS_OLD_SPI_OUT": "0x0000d200",
    }
    joined = " ".join(env.values()).lower()
    assert "aaaa" not in joined and "bbbb" not in joined


def test_hooks_run_in_order_with_only_their_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ISTHMUS_PSK_SECRET", "do-not-leak")
    out = tmp_path / "out"
    _hook(tmp_path, "20-second", f'#!/bin/sh\necho "second $1" >> {out}\n')
    _hook(tmp_path, "10-first", f'#!/bin/sh\necho "first $1 $ISTHMUS_TUNNEL ${{ISTHMUS_PSK_SECRET:-clean}}" >> {out}\n')
    _hook(tmp_path, ".hidden", f"#!/bin/sh\necho hidden >> {out}\n")
    _hook(tmp_path, "backup~", f"#!/bin/sh\necho backup >> {out}\n")
    (tmp_path / "notes.txt").write_text("not executable")
    results = []
    hooks = UserHooks(tmp_path, timeout=5, on_result=results.append)
    try:
        hooks.fire({"ISTHMUS_EVENT": "up", "ISTHMUS_TUNNEL": "to-b", "PATH": "/usr/bin:/bin"})
        hooks.fire({"ISTHMUS_EVENT": "down", "ISTHMUS_TUNNEL": "to-b", "PATH": "/usr/bin:/bin"})
        assert hooks.drain(timeout=30)
    finally:
        hooks.close()
    assert out.read_text().splitlines() == ["first up to-b clean", "second up", "first down to-b clean", "second down"]
    assert [(r.hook, r.event, r.ok) for r in results] == [
        ("10-first", "up", True), ("20-second", "up", True), ("10-first", "down", True), ("20-second", "down", True)]


def test_failing_and_hanging_hooks_are_reported_not_raised(tmp_path):
    _hook(tmp_path, "10-fail", "#!/bin/sh\necho 'no route to the monitoring host' >&2\nexit 4\n")
    _hook(tmp_path, "20-hang", "#!/bin/sh\nsleep 300 &\nsleep 300\n")
    _hook(tmp_path, "30-after", f"#!/bin/sh\ntouch {tmp_path / 'after-ran'}\n")
    results = []
    hooks = UserHooks(tmp_path, timeout=0.5, on_result=results.append)
    try:
        t0 = time.monotonic()
        hooks.fire({"ISTHMUS_EVENT": "up", "ISTHMUS_TUNNEL": "t"})
        assert time.monotonic() - t0 < 0.5  # fire() only queues
        assert hooks.drain(timeout=30)
    finally:
        hooks.close()
    fail, hang, after = results
    assert (fail.returncode, fail.timed_out, fail.ok) == (4, False, False)
    assert "no route to the monitoring host" in fail.output
    assert (hang.returncode, hang.timed_out) == (None, True)
    assert after.ok and (tmp_path / "after-ran").exists()


def test_missing_directory_runs_nothing(tmp_path):
    hooks = UserHooks(tmp_path / "absent", timeout=1)
    try:
        assert hooks.hooks() == []
        hooks.fire({"ISTHMUS_EVENT": "up"})
        assert hooks.drain(timeout=10)
    finally:
        hooks.close()
