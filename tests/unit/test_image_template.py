"""The image's build inputs, checked without building: `packer validate packer.json` (the
Debian packer the image is built with), the files provision.sh installs exist, the scripts parse,
and the management firewall is a ruleset nft accepts. Building the image is `make image` (minutes
under TCG), never part of `make test`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
IMAGE = TOP / "image"


def _packer() -> str:
    exe = shutil.which("packer")
    if exe is None:
        pytest.fail("packer is not installed: apt-get install packer (image/lab/setup-host.sh does)")
    return exe


@pytest.fixture
def packer_vars(tmp_path):
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (tmp_path / "seed").mkdir()
    for f in ("seed/user-data", "seed/meta-data", "payload.tar", "disk.raw"):
        (tmp_path / f).write_bytes(b"")
    return {"base_disk": tmp_path / "disk.raw", "seed_dir": tmp_path / "seed", "ssh_private_key_file": key,
            "payload": tmp_path / "payload.tar", "output_dir": tmp_path / "out"}


def _validate(template: Path, variables: dict) -> subprocess.CompletedProcess:
    argv = [_packer(), "validate"]
    for k, v in variables.items():
        argv += ["-var", f"{k}={v}"]
    return subprocess.run([*argv, str(template)], capture_output=True, text=True, timeout=120, cwd=TOP,
                          env={**os.environ, "PACKER_CHECKPOINT_DISABLE": "1"})


def test_packer_validate(packer_vars):
    r = _validate(TOP / "packer.json", packer_vars)
    assert r.returncode == 0, r.stdout + r.stderr


def test_packer_validate_catches_a_broken_template(packer_vars, tmp_path):
    """The check above can fail: a template with an unknown builder key does not validate."""
    t = json.loads((TOP / "packer.json").read_text())
    t["builders"][0]["no_such_option"] = True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(t))
    r = _validate(bad, packer_vars)
    assert r.returncode != 0 and "no_such_option" in r.stdout + r.stderr


def test_template_shape():
    t = json.loads((TOP / "packer.json").read_text())
    b = t["builders"][0]
    assert b["type"] == "qemu" and b["disk_image"] is True and b["format"] == "qcow2" and b["disk_compression"]
    assert t["variables"]["accelerator"] == "tcg" and b["accelerator"] == "{{user `accelerator`}}"
    assert b["cd_label"] == "cidata"  # NoCloud seed
    assert int(b["ssh_handshake_attempts"]) >= 50 and t["variables"]["ssh_timeout"].endswith("m")
    scripts = [p["script"] for p in t["provisioners"] if "script" in p]
    assert scripts == ["image/provision.sh"] and (TOP / scripts[0]).exists()
    assert "userdel -f -r packer" in b["shutdown_command"]  # the build user never reaches the image


def test_provision_installs_only_files_that_exist():
    text = (IMAGE / "provision.sh").read_text()
    refs = re.findall(r'"\$f/([^"]+)"', text)
    assert len(refs) >= 8
    for ref in refs:
        matches = list((IMAGE / "files").glob(ref))
        assert matches, f"provision.sh installs image/files/{ref}, which does not exist"


def test_scripts_parse():
    for script in ["build-base.sh", "build-image.sh", "convert.sh"]:
        r = subprocess.run(["bash", "-n", str(IMAGE / script)], capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr)
    for script in ["provision.sh", "base/grub-setup.sh", "files/sbin/isthmus-config-gate"]:
        r = subprocess.run(["sh", "-n", str(IMAGE / script)], capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr)


def test_management_firewall_is_valid_nft(tmp_path):
    nft = shutil.which("nft")
    if nft is None:
        pytest.fail("nft is not installed: apt-get install nftables")
    conf = (IMAGE / "files/etc/nftables.conf").read_text()
    mgmt = IMAGE / "files/etc/isthmus/management.nft"
    assert 'include "/etc/isthmus/management.nft"' in conf
    (tmp_path / "nftables.conf").write_text(conf.replace("/etc/isthmus/management.nft", str(mgmt)))
    r = subprocess.run([nft, "-c", "-f", str(tmp_path / "nftables.conf")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # and nft -c does refuse a broken one, so the check above means something
    (tmp_path / "bad.conf").write_text(conf.replace("policy drop;", "policy dorp;").replace(
        "/etc/isthmus/management.nft", str(mgmt)))
    assert subprocess.run([nft, "-c", "-f", str(tmp_path / "bad.conf")], capture_output=True).returncode != 0
    # what the policy admits, read from the rules themselves
    assert "policy drop;" in conf and "udp dport { 500, 4500 } accept" in conf and "meta l4proto esp accept" in conf
    assert 'iifname "xfrm*" tcp dport 179 accept' in conf
    assert re.search(r"tcp dport 22 ip saddr @admin4 accept", conf)
    assert re.search(r"tcp dport 9477 ip saddr @metrics4 accept", conf)


def test_sshd_keys_only():
    text = (IMAGE / "files/etc/ssh/sshd_config.d/50-isthmus.conf").read_text()
    for line in ("PermitRootLogin no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                 "AuthenticationMethods publickey"):
        assert line in text.splitlines()


def test_units():
    unit = (IMAGE / "files/systemd/isthmusd.service").read_text()
    assert "Type=notify" in unit and "Requires=isthmus-config-check.service" in unit
    cfg = (IMAGE / "files/etc/cloud/cloud.cfg.d/90_isthmus.cfg").read_text()
    assert "datasource_list: [ NoCloud, Ec2, GCE, Azure, None ]" in cfg and "ssh_pwauth: false" in cfg
