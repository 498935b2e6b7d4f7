#!/bin/sh
# Runs as root inside the build VM (packer's shell provisioner), offline: everything comes from
# /tmp/isthmus-payload.tar (image/build-image.sh packs it): wheels/ (the wheel set .venv is made
# from), src/ (the project), files/ (image/files: units, sysctls, nftables, sshd, cloud-init).
set -eu
step() { echo "isthmus-provision: $*"; }
work=$(mktemp -d)
tar -C "$work" -xf /tmp/isthmus-payload.tar
rm -f /tmp/isthmus-payload.tar
f="$work/files"

step "groups for the control socket's roles"
getent group isthmus-read >/dev/null || groupadd --system isthmus-read
getent group isthmus-admin >/dev/null || groupadd --system isthmus-admin

step "Isthmus into /opt/isthmus (venv, offline from the wheel set)"
python3 -m venv /opt/isthmus
/opt/isthmus/bin/pip install --quiet --disable-pip-version-check --no-index --find-links "$work/wheels" \
    -r "$work/src/requirements.lock"
/opt/isthmus/bin/pip install --quiet --disable-pip-version-check --no-index --no-deps --no-build-isolation "$work/src"
ln -sf /opt/isthmus/bin/isthmus /usr/local/bin/isthmus
ln -sf /opt/isthmus/bin/isthmusd /usr/local/sbin/isthmusd
/opt/isthmus/bin/isthmus --version || /opt/isthmus/bin/isthmus --help >/dev/null

step "files: systemd units, sysctls, modules, nftables, sshd, cloud-init"
install -d -m 0755 /etc/isthmus /etc/isthmus/hooks
install -d -m 0700 /etc/isthmus/secrets
install -m 0644 "$f/etc/isthmus/isthmus.yaml.example" /etc/isthmus/isthmus.yaml.example
install -m 0644 "$f/etc/isthmus/management.nft" /etc/isthmus/management.nft
install -m 0644 "$f"/systemd/*.service /etc/systemd/system/
install -d /etc/systemd/system/ssh.service.d
install -m 0644 "$f/systemd/ssh.service.d/isthmus-hostkeys.conf" /etc/systemd/system/ssh.service.d/
[ -e /etc/default/isthmusd ] || printf '%s\n' '# isthmusd arguments (docs/daemon.md); the firewall admits the metrics port only from @metrics4/6' \
    'ISTHMUSD_ARGS="--metrics-listen 0.0.0.0:9477"' > /etc/default/isthmusd
install -m 0755 "$f/sbin/isthmus-config-gate" /usr/local/sbin/isthmus-config-gate
install -m 0644 "$f/etc/sysctl.d/60-isthmus.conf" /etc/sysctl.d/60-isthmus.conf
install -m 0644 "$f/etc/modules-load.d/isthmus.conf" /etc/modules-load.d/isthmus.conf
install -m 0644 "$f/etc/nftables.conf" /etc/nftables.conf
install -m 0644 "$f/etc/ssh/sshd_config.d/50-isthmus.conf" /etc/ssh/sshd_config.d/50-isthmus.conf
install -m 0644 "$f/etc/cloud/cloud.cfg.d/90_isthmus.cfg" /etc/cloud/cloud.cfg.d/90_isthmus.cfg
nft -c -f /etc/nftables.conf
sshd -t
for m in $(grep -v '^#' /etc/modules-load.d/isthmus.conf); do modinfo -n "$m" >/dev/null; done
systemctl enable nftables.service chrony.service isthmus-config-check.service isthmusd.service

step "clean: cloud-init state, host keys, machine id, apt lists, the build user"
apt-get clean
rm -rf /var/lib/apt/lists/* "$work"
cloud-init clean --logs --seed
rm -f /etc/ssh/ssh_host_*
truncate -s 0 /etc/machine-id
echo localhost > /etc/hostname   # cloud-init sets the instance's own
rm -f /var/lib/dbus/machine-id
journalctl --rotate >/dev/null 2>&1 || true
journalctl --vacuum-time=1s >/dev/null 2>&1 || true
fstrim / || true
# The build user (and its key and sudoers entry) goes in packer's shutdown_command, the last
# thing run over its own SSH session.
step "done"
