#!/usr/bin/env bash
# Prepare this (Debian 12) machine for `make test`, `make demo` and `make lab`: the apt packages
# the tests and the lab need, a wheel cache keyed by requirements.lock, and the project's virtualenv
# (.venv) installed offline from that cache. Idempotent and quick when everything is in place.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"
cache=${ISTHMUS_CACHE:-/var/cache/isthmus}
py=${ISTHMUS_PYTHON:-/usr/bin/python3}

# Host packages: the lab VM (qemu, debootstrap, e2fsprogs), namespaces and nftables for host
# tests, and the real peers the host tests talk to (strongSwan, FRR, BIRD).
apt_pkgs=(python3 python3-venv python3-dev qemu-system-x86 qemu-utils debootstrap e2fsprogs kmod
          iproute2 nftables iputils-ping tcpdump util-linux git
          strongswan-swanctl charon-systemd libstrongswan-standard-plugins libcharon-extra-plugins
          frr bird2 gobgpd packer)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing packages ${missing[*]}; run as root (apt-get install)" >&2; exit 1
    fi
    echo "setup: apt-get install ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Daemons from these packages must not start on the host: tests start their own.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
fi

# Wheels, keyed by the lock file and the interpreter. Stock Debian 12 has no python3-pip: the
# pip used to fetch them is the one python3-venv's ensurepip puts into a bootstrap virtualenv.
key=$( (cat requirements.lock; "$py" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
wheels="$cache/wheels/$key"
if [ ! -f "$wheels/.complete" ]; then
    echo "setup: downloading wheels into $wheels" >&2
    mkdir -p "$wheels"
    boot=$(mktemp -d)
    "$py" -m venv "$boot/venv"
    "$boot/venv/bin/pip" download --quiet --disable-pip-version-check --only-binary=:all: \
        -d "$wheels" -r requirements.lock
    rm -rf "$boot"
    touch "$wheels/.complete"
fi

# The virtualenv: rebuilt when the lock file or the interpreter changes.
if [ ! -f .venv/.isthmus-$key ]; then
    echo "setup: creating .venv from $wheels" >&2
    rm -rf .venv
    "$py" -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check --no-index --find-links "$wheels" -r requirements.lock
    touch .venv/.isthmus-$key
fi
# The project itself, editable, so the console scripts `isthmus` and `isthmusd` exist.
if ! .venv/bin/python -c 'import appliance, sys; sys.exit(0 if appliance.__file__.startswith(sys.argv[1]) else 1)' "$top" 2>/dev/null \
   || [ ! -x .venv/bin/isthmus ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check --no-index --no-deps --no-build-isolation -e . >/dev/null
fi
echo "$wheels"
