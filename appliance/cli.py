"""`isthmus`: the console CLI.

Talks to the running daemon over its control socket (appliance/control.py); prints human tables,
or with ``--json`` stable JSON for scripts (the views in appliance/cli_views.py: only known fields,
every key always present). Exit status (also in ``isthmus --help`` and docs/control.md):

  0  success
  1  the operation failed or was refused (unknown tunnel, rekey failed, reload rejected, ...)
  2  usage error (bad command line)
  3  the daemon is not reachable (not running, stale socket, no answer)
  4  permission denied on the control socket (it is root-only)

``isthmus config check`` keeps its own codes: 0 valid, 1 invalid, 2 unreadable.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import click
from click.shell_completion import CompletionItem, get_completion_class

from appliance import __version__
from appliance import cli_views as v
from appliance.control import (RUN_DIR_ENV, ControlClient, ControlPermissionError, DaemonUnreachable, RemoteError)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_PERMISSION = 4

EXIT_CODES_HELP = f"""\b
Exit status:
  {EXIT_OK}  success
  {EXIT_FAILED}  operation failed or refused (unknown tunnel, rekey failed, reload rejected)
  {EXIT_USAGE}  usage error
  {EXIT_UNREACHABLE}  daemon not reachable (not running, stale socket, no answer)
  {EXIT_PERMISSION}  permission denied on the control socket (root only)
"""


@dataclass
class Options:
    run_dir: str | None
    timeout: float

    def client(self, timeout: float | None = None) -> ControlClient:
        return ControlClient(self.run_dir, timeout=self.timeout if timeout is None else timeout)


def _fail(code: int, error_code: str, message: str, as_json: bool, extra: dict[str, Any] | None = None,
          *, one_line: bool = False) -> NoReturn:
    """Message on stderr; with --json also ``{"error": {"code", "message", ...}}`` on stdout."""
    click.echo(f"isthmus: {v.clean(message)}", err=True)
    if as_json:
        obj = {"error": {"code": error_code, "message": message, **(extra or {})}}
        click.echo(v.to_json_line(obj) if one_line else v.to_json(obj))
    raise click.exceptions.Exit(code)


class Session:
    """One command's conversation with the daemon; failures become exit codes."""

    def __init__(self, opts: Options, as_json: bool) -> None:
        self.client = opts.client()
        self.as_json = as_json

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def call(self, method: str, **params: Any) -> Any:
        try:
            return self.client.call(method, **params)
        except ControlPermissionError as exc:
            _fail(EXIT_PERMISSION, "permission_denied", str(exc), self.as_json)
        except DaemonUnreachable as exc:
            _fail(EXIT_UNREACHABLE, "unreachable", str(exc), self.as_json)
        except RemoteError as exc:
            extra: dict[str, Any] = {}
            if exc.code == "invalid_config" and isinstance(exc.data, dict):
                issues = v.project_list(exc.data.get("issues"), v.CONFIG_ISSUE)
                extra["issues"] = issues
                for i in issues:
                    where = f"{i['file']}:{i['line']}" if i["line"] else (i["file"] or "config")
                    click.echo(v.clean(f"{where}: {i['path']}: {i['message']}" if i["path"]
                                       else f"{where}: {i['message']}"), err=True)
            _fail(EXIT_FAILED, exc.code, exc.message, self.as_json, extra)


def _options(ctx: click.Context) -> Options:
    return ctx.find_root().obj  # type: ignore[no-any-return]


def complete_tunnels(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Tunnel names from the running daemon; nothing when it cannot be asked."""
    root = ctx.find_root()
    run_dir = root.params.get("run_dir")
    try:
        with ControlClient(run_dir, timeout=2.0) as c:
            result = c.call("tunnels")
    except Exception:  # completion must never fail loudly
        return []
    names = [t["name"] for t in v.project_list(result.get("tunnels") if isinstance(result, dict) else None, v.TUNNEL)]
    return [CompletionItem(n) for n in names if n and n.startswith(incomplete)]


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys) instead of text.")
tunnel_argument = click.argument("tunnel", shell_complete=complete_tunnels)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="isthmus")
@click.option("--run-dir", envvar=RUN_DIR_ENV, default=None, metavar="DIR",
              help=f"The daemon's run directory (its control socket); default ${RUN_DIR_ENV} or /run/isthmus.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the daemon's answer.")
@click.pass_context
def main(ctx: click.Context, run_dir: str | None, timeout: float) -> None:
    """Isthmus VPN appliance: show and drive tunnels, SAs and routes."""
    ctx.obj = Options(run_dir, timeout)


# --------------------------------------------------------------------------- version, status
@main.command()
@json_option
@click.pass_context
def version(ctx: click.Context, as_json: bool) -> None:
    """Print the CLI's version and, if it is reachable, the daemon's."""
    daemon: dict[str, Any] | None = None
    reason = ""
    try:
        with _options(ctx).client(timeout=min(_options(ctx).timeout, 5.0)) as c:
            daemon = v.project(c.call("version"), v.VERSION)
    except (DaemonUnreachable, RemoteError) as exc:
        reason = str(exc)
    if as_json:
        click.echo(v.to_json({"cli": __version__, "daemon": daemon}))
        return
    click.echo(f"isthmus {__version__}")
    if daemon is not None:
        extra = ", ".join(f"{k} {daemon[k]}" for k in ("pid", "protocol") if daemon[k] is not None)
        click.echo(v.clean(f"isthmusd {daemon['version'] or '?'}" + (f" ({extra})" if extra else "")))
    else:
        click.echo(f"isthmusd: not reachable ({v.clean(reason)})")


CONFIG_CHECK_FILE = "config-check"


def _config_check_report(opts: Options) -> None:
    """Why the daemon is not running, when the boot's config check said so (the image's
    isthmus-config-gate writes ``<run dir>/config-check``: ``ok FILE`` or the problems)."""
    from appliance.control import resolve_run_dir
    try:
        text = (resolve_run_dir(opts.run_dir) / CONFIG_CHECK_FILE).read_text(errors="replace")
    except OSError:
        return
    if text.strip() and not text.startswith("ok "):
        for line in text.splitlines()[:50]:
            click.echo(v.clean(line), err=True)


@main.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Daemon summary and one line per tunnel."""
    try:
        with Session(_options(ctx), as_json) as s:
            st = v.project(s.call("status"), v.STATUS)
    except click.exceptions.Exit as exc:
        if exc.exit_code == EXIT_UNREACHABLE:
            _config_check_report(_options(ctx))
        raise
    with Session(_options(ctx), as_json) as s:
        if as_json:
            click.echo(v.to_json(st))
            return
        tunnels = v.project_list(_get(s.call("tunnels"), "tunnels"), v.TUNNEL)
    head = f"isthmusd {st['version'] or '?'}"
    if st["name"]:
        head += f"  name {st['name']}"
    if st["pid"] is not None:
        head += f"  pid {st['pid']}"
    if st["uptime"] is not None:
        head += f"  up {v.human_duration(st['uptime'])}"
    lines = [head]
    if st["config"]:
        lines.append(f"config   {st['config']}")
    t = st["tunnels"] or {}
    lines.append(f"tunnels  {_n(t.get('up'))} of {_n(t.get('configured'))} up")
    sas = st["sas"] or {}
    lines.append(f"SAs      {_n(sas.get('ike'))} IKE, {_n(sas.get('child'))} Child, "
                 f"{_n(sas.get('half_open'))} half-open")
    if st["bgp"] is not None:
        lines.append(f"BGP      {_n(st['bgp']['established'])} of {_n(st['bgp']['sessions'])} sessions established")
    click.echo("\n".join(v.clean(line) for line in lines))
    click.echo()
    click.echo(_tunnel_table(tunnels) if tunnels else "no tunnels configured")


def _n(x: Any) -> str:
    return "?" if x is None else str(x)


def _get(result: Any, key: str) -> Any:
    return result.get(key) if isinstance(result, dict) else None


def _tunnel_table(rows: list[dict[str, Any]]) -> str:
    cols = v.columns(v.TUNNEL) + [("IN", lambda r: v.traffic(r, "in")), ("OUT", lambda r: v.traffic(r, "out"))]
    return v.table(rows, cols)


# --------------------------------------------------------------------------- show
@main.group()
def show() -> None:
    """Show tunnels, SAs, routes or BGP sessions."""


@show.command("tunnels")
@json_option
@click.pass_context
def show_tunnels(ctx: click.Context, as_json: bool) -> None:
    """Configured tunnels with their state and traffic."""
    with Session(_options(ctx), as_json) as s:
        rows = v.project_list(_get(s.call("tunnels"), "tunnels"), v.TUNNEL)
    if as_json:
        click.echo(v.to_json({"tunnels": rows}))
    else:
        click.echo(_tunnel_table(rows) if rows else "no tunnels configured")


@show.command("sas")
@click.argument("tunnel", required=False, shell_complete=complete_tunnels)
@json_option
@click.pass_context
def show_sas(ctx: click.Context, tunnel: str | None, as_json: bool) -> None:
    """IKE and Child SAs (of TUNNEL, or all), SPIs in hex, traffic counters."""
    params = {"tunnel": tunnel} if tunnel else {}
    with Session(_options(ctx), as_json) as s:
        result = s.call("sas", **params)
    ike = v.project_list(_get(result, "ike_sas"), v.IKE_SA)
    child = v.project_list(_get(result, "child_sas"), v.CHILD_SA)
    if as_json:
        click.echo(v.to_json({"ike_sas": ike, "child_sas": child}))
        return
    click.echo("IKE SAs")
    click.echo(v.table(ike, v.columns(v.IKE_SA)) if ike else "  none")
    click.echo()
    click.echo("Child SAs")
    cols = v.columns(v.CHILD_SA) + [("IN", lambda r: v.traffic(r, "in")), ("OUT", lambda r: v.traffic(r, "out"))]
    click.echo(v.table(child, cols) if child else "  none")


@show.command("routes")
@json_option
@click.pass_context
def show_routes(ctx: click.Context, as_json: bool) -> None:
    """Routes the appliance installed (BGP-learned and per-tunnel)."""
    with Session(_options(ctx), as_json) as s:
        rows = v.project_list(_get(s.call("routes"), "routes"), v.ROUTE)
    if as_json:
        click.echo(v.to_json({"routes": rows}))
    else:
        click.echo(v.table(rows, v.columns(v.ROUTE)) if rows else "no routes")


@show.command("bgp")
@json_option
@click.pass_context
def show_bgp(ctx: click.Context, as_json: bool) -> None:
    """BGP sessions over the tunnels."""
    with Session(_options(ctx), as_json) as s:
        result = s.call("bgp")
    head = v.project(result, v.BGP)
    neighbors = v.project_list(_get(result, "neighbors"), v.BGP_NEIGHBOR)
    if as_json:
        click.echo(v.to_json({**head, "neighbors": neighbors}))
        return
    click.echo(f"local AS {_n(head['asn'])}, router id {v.clean(head['router_id'] or '?')}")
    click.echo()
    click.echo(v.table(neighbors, v.columns(v.BGP_NEIGHBOR)) if neighbors else "no BGP neighbors")


# --------------------------------------------------------------------------- actions
def _operation(ctx: click.Context, method: str, as_json: bool, **params: Any) -> None:
    with Session(_options(ctx), as_json) as s:
        result = v.project(s.call(method, **params), v.OPERATION)
    if as_json:
        click.echo(v.to_json(result))
        return
    name = result["tunnel"] or params.get("tunnel", "?")
    text = f"{name}: {result['state'] or 'requested'}"
    if result["message"]:
        text += f" ({result['message']})"
    click.echo(v.clean(text))


@main.command()
@tunnel_argument
@json_option
@click.pass_context
def up(ctx: click.Context, tunnel: str, as_json: bool) -> None:
    """Bring TUNNEL up (initiate its IKE and Child SA)."""
    _operation(ctx, "initiate", as_json, tunnel=tunnel)


@main.command()
@tunnel_argument
@json_option
@click.pass_context
def down(ctx: click.Context, tunnel: str, as_json: bool) -> None:
    """Take TUNNEL down (delete its SAs; the peer is told)."""
    _operation(ctx, "terminate", as_json, tunnel=tunnel)


@main.command()
@tunnel_argument
@click.option("--ike", is_flag=True, help="Rekey the IKE SA instead of the Child SA.")
@json_option
@click.pass_context
def rekey(ctx: click.Context, tunnel: str, ike: bool, as_json: bool) -> None:
    """Rekey TUNNEL's Child SA (or with --ike its IKE SA) now."""
    _operation(ctx, "rekey", as_json, tunnel=tunnel, kind="ike" if ike else "child")


@main.command()
@json_option
@click.pass_context
def reload(ctx: click.Context, as_json: bool) -> None:
    """Re-read the configuration; apply it only if it is valid (unchanged tunnels are not touched)."""
    with Session(_options(ctx), as_json) as s:
        result = v.project(s.call("reload"), v.RELOAD)
    if as_json:
        click.echo(v.to_json(result))
        return
    parts = []
    for key in ("added", "removed", "changed", "unchanged"):
        names = result[key] or []
        parts.append(f"{len(names)} {key}" + (f" ({', '.join(names)})" if names and key != "unchanged" else ""))
    click.echo(v.clean("reloaded: " + ", ".join(parts)))


# --------------------------------------------------------------------------- events
@main.command()
@click.option("--type", "types", multiple=True, metavar="TYPE", help="Only events of this type (repeatable).")
@click.option("--tunnel", "tunnels", multiple=True, metavar="TUNNEL", shell_complete=complete_tunnels,
              help="Only events of this tunnel (repeatable).")
@json_option
@click.pass_context
def events(ctx: click.Context, types: tuple[str, ...], tunnels: tuple[str, ...], as_json: bool) -> None:
    """Follow the daemon's events (SA up/down/rekey, DPD, auth failures, ...) until Ctrl-C.

    With --json, one JSON object per line (an error ends the stream as {"error": {...}}). A
    'dropped' event means this reader was too slow and that many events were skipped. Exit status
    0 on Ctrl-C, 3 if the daemon goes away."""
    opts = _options(ctx)
    try:
        try:
            stream = opts.client().events(types=list(types) or None, tunnels=list(tunnels) or None)
        except ControlPermissionError as exc:
            _fail(EXIT_PERMISSION, "permission_denied", str(exc), as_json, one_line=True)
        except DaemonUnreachable as exc:
            _fail(EXIT_UNREACHABLE, "unreachable", str(exc), as_json, one_line=True)
        except RemoteError as exc:
            _fail(EXIT_FAILED, exc.code, exc.message, as_json, one_line=True)
        with stream:
            try:
                for ev in stream:
                    click.echo(v.to_json_line(v.event_json(ev)) if as_json else v.event_line(ev))
            except DaemonUnreachable as exc:
                _fail(EXIT_UNREACHABLE, "unreachable", f"event stream ended: {exc}", as_json, one_line=True)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_OK) from None
    except BrokenPipeError:  # `isthmus events | head`: the reader left
        _quiet_stdout()
        raise click.exceptions.Exit(EXIT_OK) from None


def _quiet_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------- completion
SHELLS = ("bash", "zsh", "fish")


@main.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  isthmus completion bash > /etc/bash_completion.d/isthmus
    zsh:   isthmus completion zsh > "${fpath[1]}/_isthmus"
    fish:  isthmus completion fish > ~/.config/fish/completions/isthmus.fish

    Tunnel names complete from the running daemon."""
    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(main, {}, "isthmus", "_ISTHMUS_COMPLETE").source())


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
