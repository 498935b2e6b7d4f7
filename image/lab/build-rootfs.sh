#!/usr/bin/env bash
# Build the lab guest's disk: a Debian bookworm root filesystem (debootstrap) turned into an
# ext4 image, plus the kernel and initrd for qemu's direct kernel boot.
#
#   build-rootfs.sh OUTDIR
#
# OUTDIR receives lab.img, vmlinuz, initrd.img and a manifest; it is written to a temporary
# sibling first and renamed at the end, so an interrupted build never leaves a half disk behind.
set -euo pipefail

out=${1:?usage: build-rootfs.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
# The Debian mirror is the one this host's apt uses (ISTHMUS_DEBIAN_MIRROR overrides it).
read -r mirror security_mirror < <("$here/apt-mirror.sh" bookworm)
size=${ISTHMUS_LAB_DISK_SIZE:-2G}

pkgs=$(grep -v '^\s*#' "$here/packages.txt" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/rootfs"

echo "lab: debootstrap bookworm ($mirror) into $root" >&2
# debootstrap resolves --include poorly for large sets (strongSwan's packages fail to configure
# in its second stage), so it only lays down minbase; apt in the chroot installs the rest.
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$tmp/debootstrap.log" 2>&1 || {
    tail -n 40 "$tmp/debootstrap.log" >&2; exit 1; }
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
    "$mirror" "$mirror" "$security_mirror" > "$root/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
trap 'umount "$root/proc" 2>/dev/null; rm -rf "$tmp"' EXIT
echo "lab: apt-get install $pkgs" >&2
chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 sh -c \
    "apt-get update -qq && apt-get install -y -qq --no-install-recommends $(echo "$pkgs" | tr , ' ')" \
    >"$tmp/apt.log" 2>&1 || { tail -n 40 "$tmp/apt.log" >&2; exit 1; }
chroot "$root" apt-get clean
umount "$root/proc"
trap 'rm -rf "$tmp"' EXIT
rm -f "$root/usr/sbin/policy-rc.d"

# Stage 1 init: everything else comes from the per-run source disk, so changing the guest's
# boot script does not rebuild this image.
install -m 0755 "$here/stage1-init" "$root/sbin/isthmus-stage1"
echo isthmus-lab > "$root/etc/hostname"
printf '127.0.0.1 localhost isthmus-lab\n::1 localhost\n' > "$root/etc/hosts"
# Daemons of the image are started by tests, never by the image itself.
rm -f "$root"/etc/systemd/system/multi-user.target.wants/*
# Keep the disk small: no docs, man pages or apt lists.
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
mkdir -p "$root/mnt/src" "$root/mnt/deps"

cp "$root"/boot/vmlinuz-* "$tmp/vmlinuz"
cp "$root"/boot/initrd.img-* "$tmp/initrd.img"
ls "$root"/lib/modules > "$tmp/kernel-release"
mkfs.ext4 -q -F -L isthmus-lab -d "$root" "$tmp/lab.img" "$size"
chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' > "$tmp/manifest.txt"
rm -rf "$root"
trap - EXIT
rm -rf "$out"
mv "$tmp" "$out"
echo "lab: disk ready in $out" >&2
