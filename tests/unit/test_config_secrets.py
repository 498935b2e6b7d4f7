"""Secrets only in their own files, checked for type, mode and owner; never shown anywhere."""

from __future__ import annotations

import json
import os
import pickle

import pytest
from click.testing import CliRunner

from appliance import cli
from appliance.config import CertAuth, ConfigError, PskAuth, Secret, load_config
from tests.unit.config_util import PSK, issues_of, line_of, make_pki, one_issue, tunnel, write_config, write_psk


def test_secret_never_shows():
    s = Secret(b"hunter2-hunter2")
    for text in (repr(s), str(s), f"{s}", f"{s!r}", f"{s:>40}", "%s" % s, repr([s]), repr({"k": s})):
        assert "hunter2" not in text and "redacted" in text
    assert s.reveal() == b"hunter2-hunter2" and len(s) == 15
    assert s == Secret(b"hunter2-hunter2") and s != Secret(b"other") and hash(s) == hash(Secret(b"hunter2-hunter2"))
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(TypeError):
        Secret("text")  # type: ignore[arg-type]


def test_psk_is_read_and_hidden_in_every_repr(tmp_path):
    write_psk(tmp_path)
    cfg = load_config(write_config(tmp_path, tunnel("interface: {address: 169.254.21.1/30}")))
    auth = cfg.tunnels["to-b"].auth
    assert isinstance(auth, PskAuth) and auth.psk.reveal() == PSK.encode()  # trailing newline stripped
    for text in (repr(cfg), str(cfg), repr(cfg.tunnels), repr(auth), str(auth)):
        assert PSK not in text


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_group_or_world_accessible_psk_file_refused(tmp_path, mode):
    psk = write_psk(tmp_path, mode=mode)
    path = write_config(tmp_path, tunnel(""))
    issue = one_issue(path)
    assert issue.path == "tunnels.to-b.auth.psk_file" and issue.line == line_of(path, "psk_file")
    assert f"mode {mode:04o}" in issue.message and "chmod 600" in issue.message and str(psk) in issue.message
    assert PSK not in str(issue)


def test_owner_must_be_root_or_daemon_user(tmp_path):
    write_psk(tmp_path)
    path = write_config(tmp_path, tunnel(""))
    uid = os.geteuid()
    other = 4242 if uid != 4242 else 4243
    issue = one_issue(path, secret_owners={other})
    assert f"owned by uid {uid}" in issue.message and f"allowed owners: uid {other}" in issue.message
    assert load_config(path, secret_owners={uid}).tunnels["to-b"].auth.psk.reveal() == PSK.encode()


def test_psk_file_missing_directory_empty_symlink(tmp_path):
    write_psk(tmp_path)
    cfg = write_config(tmp_path, tunnel("", psk_file="secrets/nope.psk"))
    assert "does not exist" in one_issue(cfg).message
    cfg = write_config(tmp_path, tunnel("", psk_file="secrets"), "dir.yaml")
    assert "is not a regular file" in one_issue(cfg).message
    empty = write_psk(tmp_path, "empty.psk", value="")
    cfg = write_config(tmp_path, tunnel("", psk_file=str(empty)), "empty.yaml")
    assert "is empty" in one_issue(cfg).message
    # a symlink is judged by its target
    os.symlink(tmp_path / "secrets" / "to-b.psk", tmp_path / "secrets" / "link.psk")
    cfg = write_config(tmp_path, tunnel("", psk_file="secrets/link.psk"), "link.yaml")
    assert load_config(cfg).tunnels["to-b"].auth.psk.reveal() == PSK.encode()


def test_psk_file_value_without_slash_is_not_echoed(tmp_path):
    """Someone pasting the key itself into psk_file must not see it echoed back."""
    cfg = write_config(tmp_path, tunnel("", psk_file="PastedKeyInsteadOfPath"))
    issue = one_issue(cfg)
    assert "does not exist" in issue.message and "PastedKeyInsteadOfPath" not in str(issue)


def test_inline_psk_refused_without_echo(tmp_path):
    path = write_config(tmp_path, """
        tunnels:
          to-b:
            remote: 198.51.100.2
            auth: {psk: ThisIsTheInlineSecret}
    """)
    issue = one_issue(path)
    assert issue.path == "tunnels.to-b.auth.psk" and issue.line == 4
    assert "psk_file" in issue.message and "refused" in issue.message
    assert "ThisIsTheInlineSecret" not in str(issue)


def test_no_secret_in_any_error_or_cli_output(tmp_path):
    """A broken config holding a PSK file and an inline psk: nothing secret in errors or CLI output."""
    write_psk(tmp_path)
    path = write_config(tmp_path, """
        tunnels:
          a:
            peer_profile: aws
            remote: 198.51.100.2
            auth: {psk_file: secrets/to-b.psk}
            esp: {lifetime: 2h}
            interface: {address: 169.254.0.1/30}
          b:
            remote: 198.51.100.3
            auth: {psk: InlineSecretValue, psk_file: secrets/to-b.psk}
    """)
    issues = issues_of(path)
    assert len(issues) >= 3
    text = "\n".join(str(i) for i in issues)
    assert PSK not in text and "InlineSecretValue" not in text
    for args in (["config", "check", str(path)], ["config", "check", "--json", str(path)]):
        r = CliRunner().invoke(cli.main, args)
        assert r.exit_code == 1
        assert PSK not in r.output and "InlineSecretValue" not in r.output
    # and an AWS-invalid PSK is reported without showing it
    bad = "0bad-psk!"
    write_psk(tmp_path, value=bad)
    path = write_config(tmp_path, tunnel("peer_profile: aws\ninterface: {address: 169.254.21.2/30}"), "aws.yaml")
    issue = one_issue(path)
    assert issue.path == "tunnels.to-b.auth.psk_file" and bad not in str(issue)
    r = CliRunner().invoke(cli.main, ["config", "check", "--json", str(path)])
    assert r.exit_code == 1 and bad not in r.output and json.loads(r.output)["errors"][0]["line"] == issue.line


def test_certificate_auth(tmp_path):
    pki = make_pki(tmp_path)
    body = "auth: {certificate: certs/a.pem, key: private/a.key, ca: certs/ca.pem}\nlocal_id: a.example.net"
    text = tunnel("").replace("    auth: {psk_file: secrets/to-b.psk}\n", "") + \
        "\n".join("    " + line for line in body.splitlines()) + "\n"
    cfg = load_config(write_config(tmp_path, text))
    auth = cfg.tunnels["to-b"].auth
    assert isinstance(auth, CertAuth)
    assert auth.certificate == pki["certificate"] and auth.key == pki["key"] and auth.ca == (pki["ca"],)
    assert auth.key_pem.reveal().startswith(b"-----BEGIN PRIVATE KEY-----")
    key_text = pki["key"].read_text().strip().splitlines()[1]
    assert key_text not in repr(cfg) and key_text not in repr(auth)

    os.chmod(pki["key"], 0o644)
    path = write_config(tmp_path, text, "open-key.yaml")
    issue = one_issue(path)
    assert issue.path == "tunnels.to-b.auth.key" and issue.line == line_of(path, "key:")
    assert "mode 0644" in issue.message and key_text not in str(issue)
    os.chmod(pki["key"], 0o600)

    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other")
    path = write_config(tmp_path, text.replace("private/a.key", str(other["key"])), "mismatch.yaml")
    assert "does not belong to certificate" in one_issue(path).message

    path = write_config(tmp_path, text.replace("certs/ca.pem", "private/a.key"), "ca-not-cert.yaml")
    issue = one_issue(path)
    assert issue.path == "tunnels.to-b.auth.ca" and "not readable as PEM X.509" in issue.message
    assert key_text not in str(issue)

    path = write_config(tmp_path, text.replace(", ca: certs/ca.pem", ""), "no-ca.yaml")
    assert one_issue(path).path == "tunnels.to-b.auth.ca"

    path = write_config(tmp_path, text.replace("auth: {", "auth: {psk_file: secrets/x.psk, "), "both.yaml")
    assert "either psk_file or certificate" in one_issue(path).message


def test_auth_required_and_must_say_how(tmp_path):
    path = write_config(tmp_path, "tunnels:\n  t:\n    remote: 198.51.100.2\n    auth: {}\n")
    issue = one_issue(path)
    assert issue.path == "tunnels.t.auth" and "psk_file, or certificate + key + ca" in issue.message


def test_config_error_str_lists_every_issue(tmp_path):
    path = write_config(tmp_path, "tunnels:\n  t:\n    remote: x\n    mobike: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    lines = str(exc.value).splitlines()
    assert len(lines) == len(exc.value.issues) == 3
    assert lines[0].startswith(f"{path}:2: tunnels.t.auth")
