"""`isthmus status` when isthmusd is not running because the boot's config check refused the
config (the image's isthmus-config-gate writes <run dir>/config-check): the problems with their
file:line are shown, and the exit status still says 'not reachable'."""

from __future__ import annotations

from click.testing import CliRunner

from appliance import cli

PROBLEM = "/etc/isthmus/isthmus.yaml:7: tunnels.to-b.remote: not an IP address: 'peer-b'"


def test_status_shows_the_refused_config(tmp_path):
    (tmp_path / "config-check").write_text(f"isthmus: INVALID configuration, isthmusd not started:\n{PROBLEM}\n")
    r = CliRunner().invoke(cli.main, ["--run-dir", str(tmp_path), "status"])
    assert r.exit_code == cli.EXIT_UNREACHABLE
    assert PROBLEM in r.output and "not running" in r.output


def test_status_says_nothing_more_after_a_good_check(tmp_path):
    (tmp_path / "config-check").write_text("ok /etc/isthmus/isthmus.yaml\n")
    r = CliRunner().invoke(cli.main, ["--run-dir", str(tmp_path), "status"])
    assert r.exit_code == cli.EXIT_UNREACHABLE and "INVALID" not in r.output and "ok /etc" not in r.output


def test_status_without_a_check_file(tmp_path):
    r = CliRunner().invoke(cli.main, ["--run-dir", str(tmp_path), "status"])
    assert r.exit_code == cli.EXIT_UNREACHABLE and "not running" in r.output
