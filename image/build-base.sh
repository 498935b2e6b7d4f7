#!/usr/bin/env bash
# Build the appliance's base disk: Debian bookworm (debootstrap) on a GPT disk laid out like
# Debian's cloud images, bootable by BIOS and UEFI, with cloud-init. No loop devices, no mounts
# of the disk, no KVM:
#
#   1. debootstrap (minbase) + apt-get install image/base/packages.txt into a folder (root: chroot)
#   2. mkfs.ext4 -d FOLDER root.img and mkfs.vfat esp.img (files, fixed UUIDs written to fstab)
#   3. sfdisk on the disk file: p14 BIOS boot (1-4 MiB), p15 ESP (4-128 MiB), p1 root (rest),
#      and dd the two file systems into their offsets
#   4. one qemu (TCG) boot of the disk with the kernel's direct boot and init=grub-setup.sh, which
#      runs grub-install for i386-pc and x86_64-efi on /dev/vda and update-grub
#
#   build-base.sh            print the cached disk's folder, building it if its inputs changed
#   build-base.sh --key      print the cache key only
#
# The cache is $ISTHMUS_CACHE/image/base-<key>/ (disk.raw, manifest.txt, build.log); the key
# hashes image/base/*, this script and image/lab/apt-mirror.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${ISTHMUS_CACHE:-/var/cache/isthmus}
key=$(cat "$here/build-base.sh" "$here"/base/* "$here/lab/apt-mirror.sh" | sha256sum | cut -c1-16)
[ "${1:-}" = --key ] && { echo "$key"; exit 0; }
out="$cache/image/base-$key"
if [ -f "$out/disk.raw" ]; then echo "$out"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "image: building the base disk needs root (debootstrap, chroot)" >&2; exit 1; }
mkdir -p "$cache/image"
exec 9>"$cache/image/.base.lock"
flock 9
if [ -f "$out/disk.raw" ]; then echo "$out"; exit 0; fi

step() { echo "image: [$(date -u +%T)] $*" >&2; }
t0=$(date +%s)
read -r mirror security_mirror < <("$here/lab/apt-mirror.sh" bookworm)
tmp="$out.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
root="$tmp/rootfs"
cleanup() { umount "$root/proc" "$root/sys" "$root/dev/pts" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
log="$tmp/build.log"

step "1/4 debootstrap bookworm (minbase) from the host's mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; exit 1; }
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
    "$mirror" "$mirror" "$security_mirror" > "$root/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"; mount -t sysfs sys "$root/sys"
pkgs=$(grep -v '^\s*#' "$here/base/packages.txt" | tr -s ' \n' ' ')
step "1/4 apt-get install ($(echo $pkgs | wc -w) packages and their dependencies)"
chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 sh -c \
    "apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs" >>"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; exit 1; }
chroot "$root" apt-get clean
umount "$root/proc" "$root/sys"
rm -f "$root/usr/sbin/policy-rc.d"

step "2/4 configure: fstab by UUID, grub defaults, serial console, cloud-init datasources"
root_uuid=$(cat /proc/sys/kernel/random/uuid)
esp_id=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
esp_uuid=$(printf '%s-%s' "${esp_id:0:4}" "${esp_id:4:4}" | tr a-f A-F)
cat > "$root/etc/fstab" <<FSTAB
# <file system>                           <mount point> <type> <options>                  <dump> <pass>
UUID=$root_uuid  /             ext4   rw,discard,errors=remount-ro 0 1
UUID=$esp_uuid                            /boot/efi     vfat   umask=0077                 0 2
FSTAB
install -m 0644 "$here/base/default-grub" "$root/etc/default/grub"
install -m 0755 "$here/base/grub-setup.sh" "$root/sbin/isthmus-grub-setup"
echo localhost > "$root/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
: > "$root/etc/machine-id"   # systemd makes a new one on first boot
rm -f "$root"/etc/ssh/ssh_host_*   # cloud-init makes the host keys on first boot
cat > "$root/etc/cloud/cloud.cfg.d/01_isthmus_base.cfg" <<'CFG'
# Isthmus base disk: the clouds the image is made for, and nothing slower to probe.
datasource_list: [ NoCloud, Ec2, GCE, Azure, None ]
system_info:
  network:
    renderers: [ networkd ]
CFG
chroot "$root" systemctl enable systemd-networkd.service >>"$log" 2>&1
chroot "$root" systemctl enable serial-getty@ttyS0.service >>"$log" 2>&1
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' > "$tmp/manifest.txt"
cp "$root"/boot/vmlinuz-* "$tmp/vmlinuz"; cp "$root"/boot/initrd.img-* "$tmp/initrd.img"

step "3/4 disk: GPT like Debian's cloud images (p1 root, p14 BIOS boot, p15 ESP), file systems written into their offsets"
# Sizes in MiB. Root: the tree plus 40% and 256 MiB; cloud-init's growpart grows it at boot.
used=$(du -sm "$root" | cut -f1)
root_mb=$(( used * 14 / 10 + 256 ))
disk_mb=$(( 128 + root_mb + 1 ))
mkfs.ext4 -q -F -L isthmus-root -U "$root_uuid" -d "$root" "$tmp/root.img" "${root_mb}M"
rm -f "$tmp/esp.img"
mkfs.vfat -C -n EFI -i "${esp_id}" "$tmp/esp.img" $(( 124 * 1024 )) >>"$log"
rm -rf "$root"
truncate -s "${disk_mb}M" "$tmp/disk.raw"
sfdisk --quiet "$tmp/disk.raw" <<SFDISK
label: gpt
$tmp/disk.raw1 : start=262144, size=$(( root_mb * 2048 )), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"
$tmp/disk.raw14 : start=2048, size=6144, type=21686148-6449-6E6F-744E-656564454649, name="BIOS boot"
$tmp/disk.raw15 : start=8192, size=253952, type=C12A7328-F81F-11D2-BA4B-00A0C93EC3B8, name="EFI System"
SFDISK
dd if="$tmp/esp.img" of="$tmp/disk.raw" bs=1M seek=4 conv=notrunc,sparse status=none
dd if="$tmp/root.img" of="$tmp/disk.raw" bs=1M seek=128 conv=notrunc,sparse status=none
rm -f "$tmp/esp.img" "$tmp/root.img"
sfdisk --dump "$tmp/disk.raw" >> "$log"

step "4/4 grub for BIOS and UEFI: one qemu boot (TCG) of the disk running grub-install"
timeout "${ISTHMUS_IMAGE_GRUB_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 1 \
    -nodefaults -display none -no-reboot -serial "file:$tmp/grub-console.log" \
    -kernel "$tmp/vmlinuz" -initrd "$tmp/initrd.img" \
    -drive "file=$tmp/disk.raw,if=virtio,format=raw" \
    -append "root=UUID=$root_uuid rw console=ttyS0 init=/sbin/isthmus-grub-setup panic=-1" >>"$log" 2>&1 || true
cat "$tmp/grub-console.log" >> "$log"
if ! grep -q ISTHMUS-GRUB-OK "$tmp/grub-console.log"; then
    grep -E 'ISTHMUS-GRUB|rror' "$tmp/grub-console.log" | tail -n 20 >&2
    echo "image: grub set-up boot failed; the console is in $log" >&2
    cp "$log" "$cache/image/base-failed.log"; exit 1
fi
rm -f "$tmp/grub-console.log"
echo "root_uuid=$root_uuid esp_uuid=$esp_uuid disk_mb=$disk_mb" >> "$tmp/manifest.txt"
trap - EXIT
rm -rf "$out"; mv "$tmp" "$out"
step "base disk ready: $out/disk.raw (${disk_mb} MiB, $(( $(date +%s) - t0 )) s)"
echo "$out"
