"""The lab: a Debian bookworm guest with a real kernel (ESP, XFRM interfaces) under qemu.

The build and CI machines run a kernel without ESP or XFRM interfaces, so every test of the IPsec
data plane runs in this guest. One harness serves the tests, the demo and the benchmarks:

    python -m image.lab.runner build            # build (or find) the cached root filesystem
    python -m image.lab.runner run -- CMD...    # boot, run CMD in /mnt/src, stream, return its status
    python -m image.lab.runner shell            # boot and drop into a shell on the console

Disks given to the guest:

- vda: the cached root filesystem (``$ISTHMUS_CACHE/lab/rootfs-<key>``), opened with
  ``snapshot=on`` so a run never changes it. ``<key>`` hashes packages.txt, build-rootfs.sh,
  apt-mirror.sh and stage1-init: editing any of them rebuilds it; nothing else does.
- vdb: the project's current source tree (tracked and untracked-but-not-ignored files), made for
  each run, read-only, label ``isthmus-src``.
- vdc: the Python dependencies installed on the host from the wheel cache into a folder
  (``pip install --target``) for the guest's python3 (same Debian 12 interpreter as the host's),
  cached by the lock file's hash, read-only, label ``isthmus-deps``.

Serial ports: ttyS0 is the console (streamed), ttyS1 carries the command's exit status, ttyS2 a
JSON-lines channel for structured results (pytest reports). The guest powers itself off after the
command; the host kills qemu at the timeout (and qemu dies with the host process: PDEATHSIG), so
the guest never outlives the run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

HERE = Path(__file__).resolve().parent
TOP = HERE.parent.parent
CACHE = Path(os.environ.get("ISTHMUS_CACHE", "/var/cache/isthmus"))
GUEST_PYTHON = "/usr/bin/python3"
DEFAULT_TIMEOUT = float(os.environ.get("ISTHMUS_LAB_TIMEOUT", "1800"))


class LabError(RuntimeError):
    """The lab could not be built or booted (not: the command in it failed)."""


def _digest(paths: Sequence[Path], extra: str = "") -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(extra.encode())
    return h.hexdigest()[:16]


def rootfs_key() -> str:
    return _digest([HERE / "packages.txt", HERE / "build-rootfs.sh", HERE / "apt-mirror.sh", HERE / "stage1-init"])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builders of the same cached object (e.g. two test runs started together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_rootfs(log: Callable[[str], None] = print) -> Path:
    """Return the folder with lab.img, vmlinuz and initrd.img, building it if the key is new."""
    out = CACHE / "lab" / f"rootfs-{rootfs_key()}"
    if (out / "lab.img").exists():
        return out
    with _locked(CACHE / "lab" / ".rootfs.lock"):
        if (out / "lab.img").exists():
            return out
        if os.geteuid() != 0:
            raise LabError("building the lab root filesystem needs root (debootstrap)")
        log(f"lab: building root filesystem {out.name} (debootstrap, ~2-4 min, cached afterwards)")
        t0 = time.monotonic()
        r = subprocess.run([str(HERE / "build-rootfs.sh"), str(out)])
        if r.returncode != 0:
            raise LabError(f"build-rootfs.sh failed with status {r.returncode}")
        log(f"lab: root filesystem built in {time.monotonic() - t0:.0f} s")
        _prune(CACHE / "lab", "rootfs-*", keep=3)
    return out


def _prune(folder: Path, pattern: str, keep: int) -> None:
    """Drop all but the `keep` most recently built cache entries (other checkouts may use older keys)."""
    entries = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _wheel_dir(lock: Path) -> Path:
    key = hashlib.sha256(lock.read_bytes() + subprocess.run(
        [GUEST_PYTHON, "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
        check=True).stdout.encode()).hexdigest()[:16]
    return CACHE / "wheels" / key


def ensure_deps_disk(log: Callable[[str], None] = print) -> Path:
    """The guest's site-packages on an ext4 image, from the wheel cache (see setup-host.sh)."""
    lock = TOP / "requirements.lock"
    wheels = _wheel_dir(lock)
    if not (wheels / ".complete").exists():
        raise LabError(f"no wheel cache at {wheels}: run image/lab/setup-host.sh (make setup)")
    key = _digest([lock], str(wheels) + " with .pyc")
    img = CACHE / "lab" / f"deps-{key}.img"
    if img.exists():
        return img
    with _locked(CACHE / "lab" / ".deps.lock"):
        if img.exists():
            return img
        log(f"lab: installing Python dependencies for the guest ({img.name})")
        with tempfile.TemporaryDirectory(prefix="isthmus-deps-") as tmp:
            target = Path(tmp) / "deps"
            # The pip of the venv this runs in (python3-venv's ensurepip provides it; stock
            # Debian 12 has no python3-pip), for the same interpreter version the guest runs.
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore",
                            "--no-index", "--find-links", str(wheels),
                            "--target", str(target), "-r", str(lock)], check=True)
            _mkfs(target, img.with_suffix(".tmp"), "isthmus-deps")
            os.replace(img.with_suffix(".tmp"), img)
        _prune(CACHE / "lab", "deps-*.img", keep=3)
    return img


def _mkfs(folder: Path, image: Path, label: str) -> None:
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
    size_mb = max(64, int(size * 1.5 / 2**20) + 64)
    image.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(folder), str(image), f"{size_mb}M"],
                   check=True, stdout=subprocess.DEVNULL)


def source_files(top: Path = TOP) -> list[str]:
    """Tracked files plus untracked files that are not ignored: the tree as the developer sees it."""
    r = subprocess.run(["git", "-C", str(top), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True)
    return [p for p in r.stdout.decode().split("\0") if p and (top / p).is_file()]


def make_source_disk(workdir: Path, command: str, env: dict[str, str]) -> Path:
    stage = workdir / "src"
    for rel in source_files():
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(TOP / rel, dst)
    lab = stage / ".lab"
    lab.mkdir(exist_ok=True)
    envlines = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    (lab / "cmd").write_text("#!/bin/sh\n" + envlines + command + "\n")
    (lab / "cmd").chmod(0o755)
    img = workdir / "src.img"
    _mkfs(stage, img, "isthmus-src")
    return img


def kvm_usable() -> bool:
    """KVM only when asked for and present: on these machines /dev/kvm exists but KVM guests hang
    or assert (see LAB.md), and a failed probe costs more than TCG saves."""
    return os.environ.get("ISTHMUS_LAB_ACCEL", "tcg") == "kvm" and os.access("/dev/kvm", os.R_OK | os.W_OK)


def _pdeathsig() -> None:
    # The guest dies with whoever started it (PR_SET_PDEATHSIG = 1).
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    os.setpgrp()


@dataclasses.dataclass
class LabRun:
    status: int | None          # exit status of the command; None when the guest did not report one
    timed_out: bool
    console: str                # everything the guest printed on its console
    results: list[dict]         # JSON lines written by the command to /dev/ttyS2 ($ISTHMUS_LAB_RESULTS)
    seconds: float
    qemu_pid: int = 0           # the guest's qemu process, reaped before run() returns

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.timed_out


def qemu_command(rootfs: Path, src: Path, deps: Path, workdir: Path, interactive: bool = False,
                 memory_mb: int = 2048, cpus: int = 2) -> list[str]:
    accel = ["-accel", "kvm", "-cpu", "host"] if kvm_usable() else ["-accel", "tcg,thread=multi", "-cpu", "max"]
    console = ["-serial", "mon:stdio"] if interactive else ["-serial", "stdio"]
    return [
        "qemu-system-x86_64", *accel, "-smp", str(cpus), "-m", str(memory_mb),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(rootfs / "vmlinuz"), "-initrd", str(rootfs / "initrd.img"),
        "-drive", f"file={rootfs / 'lab.img'},if=virtio,format=raw,snapshot=on",
        "-drive", f"file={src},if=virtio,format=raw,readonly=on",
        "-drive", f"file={deps},if=virtio,format=raw,readonly=on",
        *console,
        "-serial", f"file:{workdir / 'status'}",
        "-serial", f"file:{workdir / 'results'}",
        "-device", "virtio-rng-pci",
        "-append", "root=/dev/vda rw console=ttyS0 quiet loglevel=3 init=/sbin/isthmus-stage1 panic=-1 "
                   "8250.nr_uarts=4 net.ifnames=0",
    ]


def run(command: str | Sequence[str], timeout: float = DEFAULT_TIMEOUT,
        output: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
        log: Callable[[str], None] | None = None) -> LabRun:
    """Boot the guest, run `command` (a shell string, or argv) in /mnt/src as root, and return.

    Every console line is passed to `output` as it arrives (default: printed). The guest is
    killed if it has not powered off after `timeout` seconds.
    """
    output = output or (lambda line: print(line, flush=True))
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not isinstance(command, str):
        command = shlex.join(command)
    rootfs = ensure_rootfs(log)
    deps = ensure_deps_disk(log)
    with tempfile.TemporaryDirectory(prefix="isthmus-lab-") as tmp:
        workdir = Path(tmp)
        src = make_source_disk(workdir, command, env or {})
        argv = qemu_command(rootfs, src, deps, workdir)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
        lines: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
                lines.append(line)
                output(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            log(f"lab: guest still running after {timeout:.0f} s: killed")
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=5)
        seconds = time.monotonic() - t0
        status_text = (workdir / "status").read_text(errors="replace").strip() if (workdir / "status").exists() else ""
        status = None
        for tok in reversed(status_text.split()):
            if tok.lstrip("-").isdigit():
                status = int(tok)
                break
        results = []
        if (workdir / "results").exists():
            for line in (workdir / "results").read_text(errors="replace").splitlines():
                line = line.strip().replace("\r", "")
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        results.append(json.loads(line))
        return LabRun(status=status, timed_out=timed_out, console="\n".join(lines),
                      results=results, seconds=seconds, qemu_pid=proc.pid)


def shell() -> int:
    rootfs = ensure_rootfs()
    deps = ensure_deps_disk()
    with tempfile.TemporaryDirectory(prefix="isthmus-lab-") as tmp:
        workdir = Path(tmp)
        src = make_source_disk(workdir, "exec setsid -c /bin/bash -l <>/dev/ttyS0 >&0 2>&0", {"ISTHMUS_LAB_SHELL": "1"})
        print("lab: booting a shell (Ctrl-A X quits qemu; `poweroff -f` or Ctrl-D ends the guest)", file=sys.stderr)
        return subprocess.call(qemu_command(rootfs, src, deps, workdir, interactive=True))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m image.lab.runner", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    sub.add_parser("build", help="build (or find) the cached root filesystem and the dependency disk")
    r = sub.add_parser("run", help="boot the guest and run a command in /mnt/src")
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    r.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("shell", help="boot the guest with a shell on this terminal")
    sub.add_parser("key", help="print the root filesystem's cache key")
    a = ap.parse_args(argv)
    try:
        if a.verb == "key":
            print(rootfs_key())
            return 0
        if a.verb == "build":
            print(ensure_rootfs())
            print(ensure_deps_disk())
            return 0
        if a.verb == "shell":
            return shell()
        cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
        if not cmd:
            ap.error("run needs a command")
        res = run(cmd[0] if len(cmd) == 1 else shlex.join(cmd), timeout=a.timeout)
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2
    if res.timed_out:
        print(f"lab: timed out after {res.seconds:.0f} s", file=sys.stderr)
        return 124
    if res.status is None:
        print("lab: the guest powered off without reporting an exit status", file=sys.stderr)
        return 125
    print(f"lab: exit status {res.status} after {res.seconds:.0f} s", file=sys.stderr)
    return res.status


if __name__ == "__main__":
    sys.exit(main())
