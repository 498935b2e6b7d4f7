"""The lab runner's contract: output streams, the exit status comes back, and a hung guest is
killed at the timeout and never outlives the run."""

from pathlib import Path

from image.lab import runner


def _alive(pid: int) -> bool:
    try:
        return "qemu" in Path(f"/proc/{pid}/cmdline").read_text()
    except FileNotFoundError:
        return False


def test_status_and_output_come_back():
    lines = []
    res = runner.run("echo lab-says-hello; uname -r; grep -c . /proc/net/xfrm_stat; exit 3",
                     timeout=300, output=lines.append, log=lines.append)
    assert not res.timed_out
    assert res.status == 3
    assert "lab-says-hello" in lines
    assert "cloud-amd64" in res.console  # the guest's own kernel, not the host's
    assert not _alive(res.qemu_pid)


def test_hung_guest_is_killed_at_timeout():
    res = runner.run("sleep 100000", timeout=20, output=lambda line: None, log=lambda msg: None)
    assert res.timed_out and res.status is None
    assert res.seconds < 40
    assert res.qemu_pid and not _alive(res.qemu_pid), "the guest's qemu survived the run"
