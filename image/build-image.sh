#!/usr/bin/env bash
# make image: the appliance's qcow2, built here under qemu (TCG unless ISTHMUS_IMAGE_ACCEL=kvm)
# from Debian's packages and the project's wheel set only.
#
#   build-image.sh WHEELS_DIR [OUT_DIR]     (OUT_DIR default build/image)
#
# 1. the base disk (image/build-base.sh, cached in $ISTHMUS_CACHE/image)
# 2. a temporary SSH key for packer, in a NoCloud seed (cidata ISO made by packer's cd_files)
# 3. the payload: wheels, the project's source, image/files
# 4. packer build packer.json (boot, provision.sh, cloud-init clean, compressed qcow2)
# 5. OUT_DIR/isthmus-VERSION.qcow2 + .sha256 + .manifest.txt; paths, sizes, checksums printed
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
wheels=${1:?usage: build-image.sh WHEELS_DIR [OUT_DIR]}
out=${2:-build/image}
accel=${ISTHMUS_IMAGE_ACCEL:-tcg}
step() { echo "image: [$(date -u +%T)] $*" >&2; }
t0=$(date +%s)

step "base disk (cached; a new one takes ~6 min: debootstrap, apt, one TCG boot for grub)"
base=$(image/build-base.sh)
step "base disk: $base/disk.raw"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
mkdir -p "$out"
tmp=$(mktemp -d "$top/$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
ssh-keygen -q -t ed25519 -N '' -C isthmus-image-build -f "$tmp/build-key"
mkdir -p "$tmp/seed"
printf 'instance-id: isthmus-build-%s\nlocal-hostname: isthmus-build\n' "$(date +%s)" > "$tmp/seed/meta-data"
cat > "$tmp/seed/user-data" <<USERDATA
#cloud-config
# The image build's own user: removed (with this key) by packer's shutdown_command.
users:
  - name: packer
    sudo: "ALL=(ALL) NOPASSWD:ALL"
    shell: /bin/sh
    lock_passwd: true
    ssh_authorized_keys: ["$(cat "$tmp/build-key.pub")"]
ssh_pwauth: false
growpart: {mode: "off"}
resize_rootfs: false
USERDATA

step "payload: wheels ($(ls "$wheels"/*.whl | wc -l)), source, image/files"
mkdir -p "$tmp/payload/src"
cp -a "$wheels" "$tmp/payload/wheels"
git ls-files -z -- appliance bgp pyproject.toml README.md requirements.lock | \
    xargs -0 -I{} cp --parents {} "$tmp/payload/src/"
cp -a image/files "$tmp/payload/files"
tar -C "$tmp/payload" -cf "$tmp/payload.tar" .

step "packer build (accelerator $accel; under TCG ~10-20 min; console: $tmp/packer-console.log)"
PACKER_CHECKPOINT_DISABLE=1 packer build -color=false -timestamp-ui \
    -var "base_disk=$base/disk.raw" -var "base_checksum=sha256:$(sha256sum "$base/disk.raw" | cut -d' ' -f1)" -var "output_dir=$tmp/packer" -var "accelerator=$accel" \
    -var "seed_dir=$tmp/seed" -var "ssh_private_key_file=$tmp/build-key" -var "payload=$tmp/payload.tar" \
    packer.json 2>&1 | sed -u 's/^/  packer: /' >&2
[ "${PIPESTATUS[0]}" = 0 ] || { cp -f "$tmp/packer-console.log" "$out/packer-console.log" 2>/dev/null;
                                echo "image: packer build failed (guest console: $out/packer-console.log)" >&2; exit 1; }

name="isthmus-$version"
mv "$tmp/packer/isthmus.qcow2" "$out/$name.qcow2"
(cd "$out" && sha256sum "$name.qcow2" > "$name.qcow2.sha256")
{
    echo "# Isthmus $version appliance image, built $(date -u +%FT%TZ) (accelerator $accel)"
    echo "# base disk: $(basename "$base") (image/build-base.sh)"
    echo "qcow2 $name.qcow2 $(stat -c %s "$out/$name.qcow2") bytes, virtual $(qemu-img info --output=json "$out/$name.qcow2" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p') bytes"
    echo "sha256 $(cut -d' ' -f1 "$out/$name.qcow2.sha256")"
    echo "# Python wheels in /opt/isthmus:"; ls "$wheels" | grep '\.whl$' | sed 's/^/wheel /'
    echo "# Debian packages:"; grep -v '=' "$base/manifest.txt" | sed 's/^/deb /'
} > "$out/$name.manifest.txt"
cp "$tmp/packer/packer-manifest.json" "$out/$name.packer-manifest.json" 2>/dev/null || true
ln -sf "$name.qcow2" "$out/isthmus.qcow2"
step "done in $(( $(date +%s) - t0 )) s"
for f in "$out/$name.qcow2" "$out/$name.manifest.txt"; do
    printf '%-40s %12s bytes (%s)  sha256 %s\n' "$f" "$(stat -c %s "$f")" "$(numfmt --to=iec-i --suffix=B "$(stat -c %s "$f")")" "$(sha256sum "$f" | cut -c1-64)"
done
