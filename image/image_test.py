"""make image-test: two copies of the built image, joined by a qemu socket network, each with its own
NoCloud seed, come up from cloud-init alone and bring up a tunnel between them.

    python3 image/image_test.py [--bad-config] [--timeout SECONDS] IMAGE.qcow2

Region A (192.0.2.1, initiator) and region B (192.0.2.2, responder) get their config, PSK and
management prefixes in cloud-init `write_files`; nothing else reaches them. A reporter shipped in
the seed (runcmd) waits for the tunnel, prints `isthmus status` on the serial console, pings the
peer's inside address across the XFRM interfaces, waits for the peer's LAN (an address on lo,
announced with `bgp.announce`) to arrive in the kernel FIB over BGP across the tunnel and pings it
from its own LAN address, prints `isthmus show bgp` and `show routes`, and on B checks the management plane: SSH with a
password refused, the metrics port refused from A (not in B's metrics prefixes), a read-only user's
`isthmus down` refused with its audit line. With --bad-config, B's config has an error and the
test expects its file:line on B's console and no tunnel.

Both guests run under TCG (1 vCPU, 1 GiB each) from copy-on-write overlays; the image is not changed.
Prints the boot-to-tunnel-up time. Exit 0 when every expectation held.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPORTER = r"""#!/bin/sh
# image-test reporter (from the NoCloud seed): results on the serial console, prefixed IMAGE-TEST.
say() { echo "IMAGE-TEST $*" > /dev/ttyS0; }
role=$1 peer_inside=$2 peer_wan=$3 lan=$4 peer_lan=$5
ip addr add "$lan/32" dev lo   # this region's "LAN": announced over BGP (bgp.announce)
say "$role: cloud-init final stage at uptime $(cut -d' ' -f1 /proc/uptime)"
i=0
while [ $i -lt 200 ]; do
    if systemctl is-failed --quiet isthmus-config-check.service; then
        say "$role: config check FAILED"
        isthmus status 2>&1 | sed "s/^/IMAGE-TEST $role: status: /" > /dev/ttyS0
        say "$role: DONE"; exit 0
    fi
    if isthmus --timeout 5 show tunnels --json 2>/dev/null | grep -q '"state": *"up"'; then break; fi
    sleep 3; i=$((i+1))
done
say "$role: tunnel up at uptime $(cut -d' ' -f1 /proc/uptime)"
isthmus status 2>&1 | sed "s/^/IMAGE-TEST $role: status: /" > /dev/ttyS0
if ping -c 3 -W 3 "$peer_inside" >/dev/null 2>&1; then say "$role: ping $peer_inside over XFRM ok"; else say "$role: ping $peer_inside FAILED"; fi
ip -s xfrm state 2>/dev/null | grep -c 'proto esp' | sed "s/^/IMAGE-TEST $role: esp states: /" > /dev/ttyS0
# BGP over the tunnel: the peer's LAN must arrive in the kernel FIB on the XFRM interface
peer_net="${peer_lan%.*}.0/24"
i=0
while [ $i -lt 60 ] && ! ip route show "$peer_net" | grep -q 'dev xfrm-'; do sleep 2; i=$((i+1)); done
route=$(ip route show "$peer_net")
case "$route" in *"dev xfrm-"*) say "$role: BGP route to the peer's LAN at uptime $(cut -d' ' -f1 /proc/uptime): $route";;
                 *) say "$role: BGP route to the peer's LAN FAILED: '$route'";; esac
isthmus show bgp 2>&1 | sed "s/^/IMAGE-TEST $role: bgp: /" > /dev/ttyS0
isthmus show routes 2>&1 | sed "s/^/IMAGE-TEST $role: routes: /" > /dev/ttyS0
if ping -c 3 -W 3 -I "$lan" "$peer_lan" >/dev/null 2>&1; then say "$role: ping LAN $lan -> LAN $peer_lan over BGP ok"
else say "$role: ping LAN $lan -> LAN $peer_lan FAILED"; fi
if [ "$role" = A ]; then
    sleep 20  # B checks its side meanwhile
    out=$(ssh -o BatchMode=yes -o PubkeyAuthentication=no -o PreferredAuthentications=password,keyboard-interactive \
              -o StrictHostKeyChecking=no -o ConnectTimeout=10 isthmus@"$peer_wan" true 2>&1)
    case "$out" in *"Permission denied (publickey)"*) say "A: ssh to B with a password refused: ok";;
                   *) say "A: ssh to B with a password NOT refused: $out";; esac
    timeout 8 bash -c "exec 3<>/dev/tcp/$peer_wan/9477" 2>/dev/null; rc=$?
    # 124: no answer at all (dropped by the firewall), not a reset from a closed port
    if [ $rc = 124 ]; then say "A: metrics port of B from A (not in B's metrics prefixes) dropped: ok"
    else say "A: metrics port of B from A: connect status $rc: FAILED"; fi
else
    if getent passwd packer >/dev/null; then say "B: the build user is in the image: FAILED"; else say "B: no build user in the image: ok"; fi
    useradd -M -s /bin/sh -G isthmus-read alice
    out=$(su alice -c 'isthmus down to-a' 2>&1); rc=$?
    say "B: read-only user's 'isthmus down' -> status $rc: $out"
    sleep 1
    journalctl -u isthmusd.service --no-pager -o cat 2>/dev/null | grep -o 'audit: [^"]*' | tail -n 3 | sed 's/^/IMAGE-TEST B: journal: /' > /dev/ttyS0
    su alice -c 'isthmus status' >/dev/null 2>&1 && say "B: read-only user's status: ok"
    isthmus show tunnels --json | grep -q '"state": *"up"' && say "B: tunnel still up after the refused down: ok"
    bash -c 'exec 3<>/dev/tcp/127.0.0.1/9477' && say "B: metrics port listening (locally): ok"
fi
say "$role: DONE"
"""

REGIONS = {
    "a": {"name": "region-a", "wan": "192.0.2.1", "peer_wan": "192.0.2.2", "inside": "169.254.21.1/30", "peer_inside": "169.254.21.2",
          "tunnel": "to-b", "start": "true", "me": "a.example.net", "peer": "b.example.net", "mac": "52:54:00:12:00:01",
          "asn": 64601, "peer_as": 64602, "lan": "10.10.0.1", "peer_lan": "10.20.0.1"},
    "b": {"name": "region-b", "wan": "192.0.2.2", "peer_wan": "192.0.2.1", "inside": "169.254.21.2/30", "peer_inside": "169.254.21.1",
          "tunnel": "to-a", "start": "false", "me": "b.example.net", "peer": "a.example.net", "mac": "52:54:00:12:00:02",
          "asn": 64602, "peer_as": 64601, "lan": "10.20.0.1", "peer_lan": "10.10.0.1"},
}


def config(r: dict, bad: bool) -> str:
    remote = "peer-a.invalid" if bad else r["peer_wan"]
    lan, peer_lan = (x.rsplit(".", 1)[0] + ".0/24" for x in (r["lan"], r["peer_lan"]))
    return (f"appliance: {{name: {r['name']}, router_id: {r['wan']}}}\n"
            f"tunnels:\n  {r['tunnel']}:\n    remote: {remote}\n    local: {r['wan']}\n"
            f"    local_id: {r['me']}\n    remote_id: {r['peer']}\n"
            f"    auth: {{psk_file: secrets/{r['tunnel']}.psk}}\n    start: {r['start']}\n"
            f"    interface: {{name: xfrm-{r['tunnel'][-1]}, address: {r['inside']}}}\n"
            f"    bgp: {{peer_as: {r['peer_as']}, peer_address: {r['peer_inside']}, import: from-peer, export: to-peer}}\n"
            f"bgp:\n  asn: {r['asn']}\n  announce: [{lan}]\n  policies:\n"
            f"    from-peer: {{prefixes: [{{prefix: {peer_lan}}}]}}\n"
            f"    to-peer: {{prefixes: [{{prefix: {lan}}}]}}\n")


def indent(text: str, n: int) -> str:
    return "".join(" " * n + line + "\n" for line in text.splitlines())


def seed(work: Path, key: str, r: dict, psk: str, pubkey: str, bad: bool) -> Path:
    d = work / f"seed-{key}"
    d.mkdir()
    (d / "meta-data").write_text(f"instance-id: image-test-{key}-{secrets.token_hex(4)}\nlocal-hostname: region-{key}\n")
    (d / "network-config").write_text(
        "version: 2\nethernets:\n  eth0:\n"
        f"    match: {{macaddress: '{r['mac']}'}}\n    set-name: eth0\n    addresses: [{r['wan']}/24]\n")
    mgmt = (f"add element inet isthmus_mgmt admin4 {{ {r['peer_wan']}/32 }}\n"
            "add element inet isthmus_mgmt metrics4 { 198.51.100.0/24 }\n")
    (d / "user-data").write_text(
        "#cloud-config\n"
        f"ssh_authorized_keys: ['{pubkey}']\n"
        "write_files:\n"
        "  - path: /etc/isthmus/isthmus.yaml\n    permissions: '0644'\n    content: |\n" + indent(config(r, bad), 6) +
        f"  - path: /etc/isthmus/secrets/{r['tunnel']}.psk\n    permissions: '0600'\n    content: '{psk}'\n"
        "  - path: /etc/isthmus/management.nft\n    content: |\n" + indent(mgmt, 6) +
        "  - path: /usr/local/sbin/image-test-report\n    permissions: '0755'\n    content: |\n" + indent(REPORTER, 6) +
        "runcmd:\n"
        f"  - [sh, -c, 'setsid /usr/local/sbin/image-test-report {key.upper()} {r['peer_inside']} {r['peer_wan']} {r['lan']} {r['peer_lan']} "
        ">/dev/null 2>&1 < /dev/null &']\n")
    iso = work / f"seed-{key}.iso"
    subprocess.run(["genisoimage", "-quiet", "-output", str(iso), "-volid", "cidata", "-joliet", "-rock",
                    str(d / "user-data"), str(d / "meta-data"), str(d / "network-config")], check=True)
    return iso


OVMF = Path("/usr/share/ovmf/OVMF.fd")


def uefi_boot(image: Path, timeout: float) -> int:
    """One copy booted by UEFI firmware (OVMF): grub's EFI/BOOT/BOOTX64.EFI must load the kernel
    and systemd must get to the login prompt. (The two-copy test boots by BIOS.)"""
    if not OVMF.exists():
        print("image-test: no OVMF firmware: apt-get install ovmf", flush=True)
        return 1
    work = Path(tempfile.mkdtemp(prefix="isthmus-image-uefi-"))
    disk, console = work / "uefi.qcow2", work / "console.log"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(disk)], check=True)
    t0 = time.monotonic()
    p = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "1024",
                          "-nodefaults", "-display", "none", "-no-reboot", "-bios", str(OVMF),
                          "-drive", f"file={disk},if=virtio,format=qcow2", "-serial", f"file:{console}"],
                         stdin=subprocess.DEVNULL, start_new_session=True)
    ok = {"grub (EFI) booted the kernel": False, "systemd up to the login prompt": False}
    try:
        while time.monotonic() - t0 < timeout and not all(ok.values()):
            time.sleep(3)
            text = console.read_text(errors="replace") if console.exists() else ""
            ok["grub (EFI) booted the kernel"] = "Kernel command line: BOOT_IMAGE=" in text and "efi: EFI v" in text
            ok["systemd up to the login prompt"] = "login:" in text
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        disk.unlink(missing_ok=True)
    for name, good in ok.items():
        print(f"image-test: {'ok  ' if good else 'FAIL'} UEFI: {name}")
    print(f"image-test: UEFI boot checked in {time.monotonic() - t0:.0f} s; console in {console}", flush=True)
    return 0 if all(ok.values()) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("--uefi", action="store_true", help="only boot one copy with UEFI firmware (OVMF)")
    ap.add_argument("--bad-config", action="store_true", help="give B an invalid config")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()
    image = Path(a.image).resolve()
    if a.uefi:
        return uefi_boot(image, min(a.timeout, 600))
    work = Path(tempfile.mkdtemp(prefix="isthmus-image-test-"))
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "key")], check=True)
        pub = (work / "key.pub").read_text().strip()
        psk = secrets.token_urlsafe(24)
        port = 20000 + secrets.randbelow(20000)
        for key, r in REGIONS.items():
            disk = work / f"{key}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(disk)], check=True)
            iso = seed(work, key, r, psk, pub, a.bad_config and key == "b")
            net = f"listen=127.0.0.1:{port}" if key == "a" else f"connect=127.0.0.1:{port}"
            argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "1024",
                    "-nodefaults", "-display", "none", "-no-reboot",
                    "-drive", f"file={disk},if=virtio,format=qcow2", "-drive", f"file={iso},media=cdrom,readonly=on",
                    "-netdev", f"socket,id=wan,{net}", "-device", f"virtio-net-pci,netdev=wan,mac={r['mac']}",
                    "-device", "virtio-rng-pci", "-serial", f"file:{work / ('console-' + key + '.log')}"]
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True))
            print(f"image-test: region {key.upper()} booting ({'initiator' if key == 'a' else 'responder'}"
                  f"{', BAD config' if a.bad_config and key == 'b' else ''})", flush=True)
            time.sleep(1)  # A listens before B connects
        seen: dict[str, set[str]] = {"a": set(), "b": set()}
        up_at: dict[str, float] = {}
        bgp_at: dict[str, float] = {}
        while time.monotonic() - t0 < a.timeout:
            time.sleep(3)
            for key in REGIONS:
                log = work / f"console-{key}.log"
                text = log.read_text(errors="replace") if log.exists() else ""
                for line in re.findall(r"IMAGE-TEST [^\r\n]*", text):
                    if line not in seen[key]:
                        seen[key].add(line)
                        print(f"  {line}", flush=True)
                        if "tunnel up" in line and key not in up_at:
                            up_at[key] = time.monotonic() - t0
                        if "BGP route to the peer's LAN at" in line and key not in bgp_at:
                            bgp_at[key] = time.monotonic() - t0
                if a.bad_config and key == "b":
                    for line in re.findall(r"[^\r\n]*isthmus\.yaml:\d+:[^\r\n]*", text):
                        if ("bad", line) not in seen[key]:
                            seen[key].add(("bad", line))  # type: ignore[arg-type]
                            print(f"  console B: {line.strip()}", flush=True)
            if all(any(s.endswith(": DONE") for s in seen[k] if isinstance(s, str)) for k in REGIONS) or \
               (a.bad_config and any(isinstance(s, str) and s.endswith("B: DONE") for s in seen["b"])):
                break
        else:
            print(f"image-test: TIMEOUT after {a.timeout:.0f} s", flush=True)
        lines = [s for k in REGIONS for s in seen[k] if isinstance(s, str)]
        console_b = (work / "console-b.log").read_text(errors="replace")
        if a.bad_config:
            checks = {"B's bad config on its console with file:line": re.search(r"/etc/isthmus/isthmus\.yaml:\d+: ", console_b),
                      "B's config check failed": any("B: config check FAILED" in s for s in lines),
                      "isthmus status on B shows file:line": any(re.search(r"B: status: .*isthmus\.yaml:\d+", s) for s in lines)}
        else:
            checks = {"A tunnel up": "a" in up_at, "B tunnel up": "b" in up_at,
                      "ping A->B over XFRM": any("A: ping" in s and s.endswith("ok") for s in lines),
                      "ping B->A over XFRM": any("B: ping" in s and s.endswith("ok") for s in lines),
                      "status shows the tunnel up": any(re.search(r"A: status: .*to-b.*up", s) for s in lines),
                      "A learned B's LAN over BGP": any("A: BGP route to the peer's LAN at" in s for s in lines),
                      "B learned A's LAN over BGP": any("B: BGP route to the peer's LAN at" in s for s in lines),
                      "LAN A -> LAN B over the BGP route": any("A: ping LAN" in s and s.endswith("over BGP ok") for s in lines),
                      "LAN B -> LAN A over the BGP route": any("B: ping LAN" in s and s.endswith("over BGP ok") for s in lines),
                      "ssh password refused": any("password refused: ok" in s for s in lines),
                      "metrics dropped from a non-metrics address": any("metrics port of B from A" in s and s.endswith("dropped: ok") for s in lines),
                      "metrics listening on B": any("B: metrics port listening" in s for s in lines),
                      "read-only down refused": any("read-only user's 'isthmus down' -> status 1" in s and "permission denied" in s for s in lines),
                      "audit line in the journal": any("B: journal: audit:" in s and "outcome=refused:forbidden" in s for s in lines),
                      "no build user in the image": any("no build user in the image: ok" in s for s in lines),
                      "tunnel intact after the refused down": any("still up after the refused down: ok" in s for s in lines)}
        for name, ok in checks.items():
            print(f"image-test: {'ok  ' if ok else 'FAIL'} {name}")
        for key, t in sorted(up_at.items()):
            print(f"image-test: region {key.upper()}: boot to tunnel up {t:.0f} s (TCG, both guests on this machine)")
        for key, t in sorted(bgp_at.items()):
            print(f"image-test: region {key.upper()}: boot to the peer's LAN in the FIB {t:.0f} s")
        print(f"image-test: {time.monotonic() - t0:.0f} s in all; consoles in {work}")
        return 0 if all(checks.values()) else 1
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in work.glob("*.qcow2"):  # the overlays; consoles and seeds stay for reading
            f.unlink()


if __name__ == "__main__":
    sys.exit(main())
