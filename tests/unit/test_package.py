import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import appliance
import bgp
from appliance import cli, daemon


def test_packages_import():
    assert appliance.__version__
    assert bgp.__doc__


def test_cli_help():
    r = CliRunner().invoke(cli.main, ["--help"])
    assert r.exit_code == 0
    assert "Isthmus" in r.output


def test_daemon_help():
    r = CliRunner().invoke(daemon.main, ["--help"])
    assert r.exit_code == 0
    assert "--config" in r.output and "--run-dir" in r.output


def test_console_scripts_installed():
    """The console scripts exist in the environment pytest runs in (make test installs the project)."""
    bindir = Path(sys.executable).parent
    for script in ("isthmus", "isthmusd"):
        r = subprocess.run([str(bindir / script), "--help"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "Usage:" in r.stdout
