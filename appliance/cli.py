"""`isthmus`: the console CLI."""

import json
import sys

import click

from appliance import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="isthmus")
def main() -> None:
    """Isthmus VPN appliance: show and drive tunnels, SAs and routes."""


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"isthmus {__version__}")


@main.group()
def config() -> None:
    """Check the appliance configuration."""


@config.command("check")
@click.argument("file", required=False, default=None, metavar="[FILE]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def config_check(file: str | None, as_json: bool) -> None:
    """Validate FILE (default /etc/isthmus/isthmus.yaml) exactly as the daemon does.

    Exit status: 0 valid, 1 invalid (every problem is printed), 2 the file cannot be read.
    """
    from appliance.config import DEFAULT_CONFIG_PATH, ConfigReadError, check_config

    path = file or DEFAULT_CONFIG_PATH
    try:
        result = check_config(path)
    except ConfigReadError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "file": path, "readable": False,
                                   "errors": [i.as_dict() for i in exc.issues]}, indent=2))
        else:
            for issue in exc.issues:
                click.echo(str(issue), err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps({
            "ok": result.ok, "file": path, "readable": True,
            "tunnels": list(result.config.tunnels) if result.config else [],
            "errors": [i.as_dict() for i in result.issues]}, indent=2))
    elif result.config is not None:
        n = len(result.config.tunnels)
        click.echo(f"OK: {n} tunnel{'' if n == 1 else 's'}")
    else:
        for issue in result.issues:
            click.echo(str(issue))
        n = len(result.issues)
        click.echo(f"{n} error{'' if n == 1 else 's'} in {path}", err=True)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
