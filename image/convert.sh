#!/usr/bin/env bash
# Convert the built qcow2 (make image) to what a cloud imports.
#
#   convert.sh aws|gcp|azure QCOW2 OUT_DIR
#
# aws:   OUT_DIR/isthmus-aws.vmdk (streamOptimized VMDK, for `aws ec2 import-snapshot`) and
#        OUT_DIR/isthmus-aws.raw (raw, for the same or for EBS direct APIs)
# gcp:   OUT_DIR/isthmus-gcp.tar.gz holding disk.raw (size a whole number of GiB), tar
#        --format=oldgnu, as `gcloud compute images create --source-uri` wants it
# azure: OUT_DIR/isthmus-azure.vhd, a fixed VHD whose virtual size is a whole number of MiB
set -euo pipefail
target=${1:?usage: convert.sh aws|gcp|azure QCOW2 OUT_DIR}
src=${2:?}; out=${3:?}
[ -f "$src" ] || { echo "image: $src does not exist: run make image first" >&2; exit 1; }
mkdir -p "$out"
step() { echo "image: [$(date -u +%T)] $*" >&2; }
vsize=$(qemu-img info --output=json "$src" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')
round_up() { echo $(( ( $1 + $2 - 1 ) / $2 * $2 )); }
report() { for f in "$@"; do printf '%-40s %12s bytes (%s)  sha256 %s\n' "$f" "$(stat -c %s "$f")" "$(numfmt --to=iec-i --suffix=B "$(stat -c %s "$f")")" "$(sha256sum "$f" | cut -c1-64)"; done; }
case "$target" in
aws)
    step "qcow2 -> raw and streamOptimized VMDK"
    qemu-img convert -p -O raw "$src" "$out/isthmus-aws.raw"
    qemu-img convert -p -O vmdk -o subformat=streamOptimized "$src" "$out/isthmus-aws.vmdk"
    (cd "$out" && sha256sum isthmus-aws.raw isthmus-aws.vmdk > isthmus-aws.sha256)
    report "$out/isthmus-aws.vmdk" "$out/isthmus-aws.raw" ;;
gcp)
    step "qcow2 -> disk.raw (whole GiB) -> tar.gz (oldgnu, sparse)"
    work=$(mktemp -d "$out/.gcp.XXXXXX"); trap 'rm -rf "$work"' EXIT
    qemu-img convert -p -O raw "$src" "$work/disk.raw"
    size=$(round_up "$vsize" $((1024 * 1024 * 1024)))
    [ "$size" = "$vsize" ] || qemu-img resize -f raw "$work/disk.raw" "$size" >/dev/null
    tar --format=oldgnu -Sczf "$out/isthmus-gcp.tar.gz" -C "$work" disk.raw
    (cd "$out" && sha256sum isthmus-gcp.tar.gz > isthmus-gcp.sha256)
    report "$out/isthmus-gcp.tar.gz" ;;
azure)
    step "qcow2 -> raw (whole MiB) -> fixed VHD"
    work=$(mktemp -d "$out/.azure.XXXXXX"); trap 'rm -rf "$work"' EXIT
    qemu-img convert -p -O raw "$src" "$work/disk.raw"
    size=$(round_up "$vsize" $((1024 * 1024)))
    [ "$size" = "$vsize" ] || qemu-img resize -f raw "$work/disk.raw" "$size" >/dev/null
    qemu-img convert -p -f raw -O vpc -o subformat=fixed,force_size "$work/disk.raw" "$out/isthmus-azure.vhd"
    (cd "$out" && sha256sum isthmus-azure.vhd > isthmus-azure.sha256)
    report "$out/isthmus-azure.vhd" ;;
*) echo "convert.sh: unknown target '$target' (aws, gcp, azure)" >&2; exit 2 ;;
esac
