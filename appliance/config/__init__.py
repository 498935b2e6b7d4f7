"""Isthmus configuration: ``/etc/isthmus/isthmus.yaml`` as a validated, typed model.

How the daemon uses it::

    from appliance.config import load_config, ConfigError, ConfigReadError

    try:
        config = load_config("/etc/isthmus/isthmus.yaml")
    except ConfigReadError as exc:       # file missing / unreadable
        ...
    except ConfigError as exc:           # invalid: exc.issues lists every problem
        for issue in exc.issues:
            log.error(str(issue))        # "isthmus.yaml:14: tunnels.to-b.ike.proposals[0]: ..."
    else:
        for name, tunnel in config.tunnels.items():
            tunnel.ike.proposals          # parsed appliance.ike.proposals.Proposal objects
            tunnel.auth.psk.reveal()      # PskAuth; bytes only where AUTH is computed

``isthmus config check`` calls :func:`check_config`, which runs exactly the same validation.
The model classes are in :mod:`appliance.config.model`; the YAML schema and the cloud presets are
documented in docs/config.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.config.errors import ConfigError, ConfigReadError, Issue
from appliance.config.model import (DEFAULT_CONFIG_PATH, ApplianceSettings, BgpPolicy, BgpSettings, CertAuth,
                                    Config, DpdSettings, EspSettings, Identity, IkeSettings, InterfaceSettings,
                                    MaxPrefix, PrefixMatch, PskAuth, Tunnel, TunnelBgp)
from appliance.config.secrets import Secret, default_secret_owners, forget_read_secrets
from appliance.config.validate import Ctx, ProposalParser, build
from appliance.config.yamlmarks import YamlSyntaxError, load_marked

__all__ = [
    "DEFAULT_CONFIG_PATH", "ApplianceSettings", "BgpPolicy", "BgpSettings", "CertAuth", "CheckResult", "Config",
    "ConfigError", "ConfigReadError", "DpdSettings", "EspSettings", "Identity", "IkeSettings",
    "InterfaceSettings", "Issue", "MaxPrefix", "PrefixMatch", "PskAuth", "Secret", "Tunnel", "TunnelBgp",
    "check_config", "load_config", "parse_config",
]


@dataclass(frozen=True)
class CheckResult:
    """Outcome of :func:`check_config`: a config, or the issues that prevented one."""

    path: str
    config: Config | None
    issues: tuple[Issue, ...]

    @property
    def ok(self) -> bool:
        return self.config is not None


def _proposal_api() -> tuple[ProposalParser, type[Exception]]:
    from appliance.ike.proposals import ProposalError, parse_proposal
    return parse_proposal, ProposalError


def parse_config(text: str, path: str | os.PathLike[str], *, base_dir: str | os.PathLike[str] | None = None,
                 secret_owners: Iterable[int] | None = None) -> Config:
    """Validate config ``text`` (named ``path`` in messages). Raises ConfigError with all issues.

    Relative secret paths resolve against ``base_dir`` (default: the directory of ``path``).
    ``secret_owners``: uids allowed to own secret files (default: root and this process's user).
    """
    shown = os.fspath(path)
    parser, perror = _proposal_api()
    ctx = Ctx(shown, Path(base_dir) if base_dir is not None else Path(shown).parent,
              frozenset(secret_owners) if secret_owners is not None else default_secret_owners(), parser, perror)
    try:
        data, duplicates = load_marked(text)
    except YamlSyntaxError as exc:
        raise ConfigError([Issue(shown, exc.line, "", f"not valid YAML: {exc.problem} (column {exc.column})")]) \
            from None
    try:
        config = build(data, duplicates, ctx, Path(shown))
    finally:
        forget_read_secrets()     # the file reads shared by this parse's tunnels, not kept after it
    if config is None:
        raise ConfigError(ctx.issues)
    return config


def _read(path: str | os.PathLike[str]) -> str:
    shown = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigReadError([Issue(shown, 0, "", "cannot read the config file: it does not exist")]) from None
    except IsADirectoryError:
        raise ConfigReadError([Issue(shown, 0, "", "cannot read the config file: it is a directory")]) from None
    except PermissionError:
        raise ConfigReadError([Issue(shown, 0, "", "cannot read the config file: permission denied")]) from None
    except OSError as exc:
        raise ConfigReadError([Issue(shown, 0, "", f"cannot read the config file: {exc.strerror}")]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError([Issue(shown, line, "", "the file is not UTF-8 text")]) from None


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH, *,
                secret_owners: Iterable[int] | None = None) -> Config:
    """Read and validate a config file; secrets are read from their files.

    Raises ConfigReadError if the file cannot be read, ConfigError (``.issues``) if invalid.
    """
    return parse_config(_read(path), path, secret_owners=secret_owners)


def check_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH, *,
                 secret_owners: Iterable[int] | None = None) -> CheckResult:
    """Same validation as :func:`load_config`, returning issues instead of raising ConfigError.

    ConfigReadError (the file cannot be read) is still raised: callers report it differently.
    """
    try:
        config = load_config(path, secret_owners=secret_owners)
    except ConfigReadError:
        raise
    except ConfigError as exc:
        return CheckResult(os.fspath(path), None, tuple(exc.issues))
    return CheckResult(os.fspath(path), config, ())
