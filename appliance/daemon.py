"""`isthmusd`: the appliance daemon."""

import click

from appliance import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="isthmusd")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default="/etc/isthmus/isthmus.yaml",
              show_default=True, help="Configuration file.")
@click.option("--run-dir", default="/run/isthmus", show_default=True, envvar="ISTHMUS_RUN_DIR",
              help="Directory for the control socket and pid file.")
def main(config_file: str, run_dir: str) -> None:
    """Run the Isthmus IKEv2 + BGP appliance daemon."""
    raise click.ClickException("the daemon is not implemented yet")


if __name__ == "__main__":  # pragma: no cover
    main()
