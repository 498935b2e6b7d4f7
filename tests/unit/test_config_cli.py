"""`isthmus config check [FILE] [--json]` and the shipped example configuration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from appliance import cli
from appliance.config import load_config
from tests.unit.config_util import line_of, make_pki, tunnel, write_config, write_psk

TOP = Path(__file__).resolve().parents[2]
EXAMPLE = TOP / "image" / "files" / "etc" / "isthmus" / "isthmus.yaml.example"


def check(*args: str):
    return CliRunner().invoke(cli.main, ["config", "check", *args])


def test_ok(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel("interface: {address: 169.254.21.1/30}")
                        + "  b:\n    remote: 198.51.100.3\n    auth: {psk_file: secrets/to-b.psk}\n")
    r = check(str(path))
    assert r.exit_code == 0 and r.output == "OK: 2 tunnels\n"
    r = check("--json", str(path))
    assert r.exit_code == 0
    assert json.loads(r.output) == {"ok": True, "file": str(path), "readable": True,
                                    "tunnels": ["to-b", "b"], "errors": []}


def test_invalid_prints_every_error(tmp_path):
    write_psk(tmp_path, mode=0o644)
    path = write_config(tmp_path, tunnel("ike: {proposals: [aes256-sha1-modp2048]}\n"
                                         "interface: {address: 169.254.21.1/29}\npeer_profile: aws"))
    r = check(str(path))
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.output
    assert lines[0].startswith(f"{path}:{line_of(path, 'psk_file')}: tunnels.to-b.auth.psk_file: ")
    assert lines[1].startswith(f"{path}:{line_of(path, 'sha1')}: tunnels.to-b.ike.proposals[0]: ")
    assert lines[2].startswith(f"{path}:{line_of(path, '/29')}: tunnels.to-b.interface.address: AWS inside CIDR")
    assert "3 errors in" in r.stderr
    r = check("--json", str(path))
    assert r.exit_code == 1
    data = json.loads(r.output)
    assert data["ok"] is False and data["tunnels"] == [] and len(data["errors"]) == 3
    assert data["errors"][2] == {
        "file": str(path), "line": line_of(path, "/29"), "path": "tunnels.to-b.interface.address",
        "tunnel": "to-b", "message": data["errors"][2]["message"]}
    assert "/30" in data["errors"][2]["message"]


def test_unreadable_file_exits_2(tmp_path):
    r = check(str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = check(str(tmp_path))
    assert r.exit_code == 2 and "is a directory" in r.stderr
    r = check("--json", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2
    data = json.loads(r.output)
    assert data["ok"] is False and data["readable"] is False and "does not exist" in data["errors"][0]["message"]


def test_yaml_syntax_error_exits_1(tmp_path):
    path = write_config(tmp_path, "tunnels:\n  a: {remote: [\n")
    r = check(str(path))
    assert r.exit_code == 1 and "not valid YAML" in r.stdout


def _install_example(directory: Path) -> Path:
    """The example as shipped, with the secret and certificate files it names next to it."""
    config = directory / "isthmus.yaml"
    shutil.copy(EXAMPLE, config)
    write_psk(directory, "to-b.psk", "x9Kq2vLm8Rt.Yw_Zp4Nc")
    write_psk(directory, "to-aws-1.psk", "Abc.def_123456789")
    make_pki(directory)
    return config


def test_example_config_passes(tmp_path):
    config = _install_example(tmp_path)
    r = check(str(config))
    assert r.exit_code == 0, r.output
    assert r.output == "OK: 3 tunnels\n"
    cfg = load_config(config)
    assert list(cfg.tunnels) == ["to-b", "to-aws-1", "from-dc"]
    assert cfg.tunnels["to-aws-1"].peer_profile == "aws" and cfg.tunnels["from-dc"].start is False


def test_example_commented_cloud_tunnels_pass_too(tmp_path):
    """The Azure and GCP sketches in the example, uncommented, are valid as well."""
    config = _install_example(tmp_path)
    text, out, inside = config.read_text().splitlines(), [], False
    for line in text:
        if line.startswith(("  # to-azure:", "  # to-gcp:")):
            inside = True
            out.append("  " + line[4:])
        elif inside and line.startswith("  #   "):
            out.append("    " + line[6:])
        else:
            inside = inside and line.startswith("  #")
            out.append(line)
    config.write_text("\n".join(out) + "\n")
    write_psk(tmp_path, "to-azure.psk", "Azure.Key_12345")
    write_psk(tmp_path, "to-gcp.psk", "Gcp.Key_12345")
    cfg = load_config(config)
    assert cfg.tunnels["to-azure"].peer_profile == "azure" and cfg.tunnels["to-gcp"].peer_profile == "gcp"


def test_console_script(tmp_path):
    """The installed `isthmus` entry point runs the same check."""
    config = _install_example(tmp_path)
    exe = Path(sys.executable).parent / "isthmus"
    r = subprocess.run([str(exe), "config", "check", str(config)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (r.returncode, r.stdout) == (0, "OK: 3 tunnels\n"), r.stderr
    (tmp_path / "secrets" / "to-b.psk").chmod(0o640)
    r = subprocess.run([str(exe), "config", "check", "--json", str(config)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 1
    assert [e["path"] for e in json.loads(r.stdout)["errors"]] == ["tunnels.to-b.auth.psk_file"]
