"""`isthmus`: the console CLI."""

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


if __name__ == "__main__":  # pragma: no cover
    main()
