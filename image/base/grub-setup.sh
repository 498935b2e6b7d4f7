#!/bin/sh
# PID 1 of the base disk's one set-up boot (image/build-base.sh boots the disk under qemu with
# the kernel's direct boot and init=this). grub-install needs a block device: here the disk is
# /dev/vda, as in any VM, so grub goes into it for BIOS (BIOS boot partition) and UEFI (removable
# path EFI/BOOT/BOOTX64.EFI on the ESP), and update-grub writes grub.cfg. Prints ISTHMUS-GRUB-OK.
set -u
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
mount -o remount,rw /
fail() { echo "ISTHMUS-GRUB-FAILED: $*"; sync; echo o > /proc/sysrq-trigger; sleep 60; }
mkdir -p /boot/efi
mount /boot/efi || fail "mount /boot/efi"
grub-install --target=i386-pc --no-floppy /dev/vda || fail "grub-install i386-pc"
grub-install --target=x86_64-efi --efi-directory=/boot/efi --bootloader-id=debian \
    --removable --no-nvram --no-uefi-secure-boot /dev/vda || fail "grub-install x86_64-efi"
update-grub || fail "update-grub"
grep -q 'linux.*/vmlinuz' /boot/grub/grub.cfg || fail "grub.cfg has no kernel entry"
rm -f /sbin/isthmus-grub-setup
umount /boot/efi
sync
mount -o remount,ro /
echo "ISTHMUS-GRUB-OK"
echo o > /proc/sysrq-trigger
sleep 60
