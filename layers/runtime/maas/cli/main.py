"""The ``maas`` command line: manage models, versions, aliases, deployments and tokens, and call models.

Every command talks to a maas server over HTTP through :class:`maas.client.Client` (``serve`` and
``demo`` start one). Errors print one red ``error: ...`` line on stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from maas import __version__
from maas.cli import CliError, stderr_console, stdout_console
from maas.cli.admin import admin_app  # imports no AWS code until `maas admin ...` runs
from maas.client import Client, MaasClientError
from maas.client.client import DEPLOY_WAIT_S
from maas.domain import OptimizeGoal, Scope, Strategy
from maas.errors import MaasError


class MaasGroup(TyperGroup):
    """Root command group: turns expected errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except MaasClientError as exc:
            fail(str(exc))
        except MaasError as exc:
            fail(f"{exc.title}: {exc.detail}")
        except CliError as exc:
            fail(str(exc))


def fail(message: str) -> NoReturn:
    stderr_console().print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@dataclass
class State:
    url: str | None = None
    token: str | None = None
    home: Path | None = None
    json: bool = False

    def client(self) -> Client:
        return Client(self.url, self.token, home=self.home)


app = typer.Typer(
    cls=MaasGroup,
    name="maas",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="Create, list, show, delete and push models.", no_args_is_help=True)
alias_app = typer.Typer(help="Name versions with aliases (champion, stable...).", no_args_is_help=True)
tokens_app = typer.Typer(help="Create, list and revoke API tokens (admin scope).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(alias_app, name="alias")
app.add_typer(tokens_app, name="tokens")

app.add_typer(admin_app, name="admin")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"maas {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option("--url", envvar="MAAS_URL", help="Server URL (default: http://127.0.0.1:8080)."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="MAAS_TOKEN",
            help="API token (default: <home>/admin-token, written by a local `maas serve`).",
            show_default=False,
        ),
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option("--home", envvar="MAAS_HOME", help="Local maas directory (default: ~/.maas)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print raw JSON instead of tables.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """maas: turn an ONNX model into a versioned, monitored inference service.

    Start with `maas demo`, or run `maas serve` and use the commands below against it.

    Point them at another server with --url/MAAS_URL and --token/MAAS_TOKEN.

    Example: maas models push fraud model.onnx && maas deploy fraud 1
    """
    ctx.obj = State(url=url, token=token, home=home, json=json_output)


def _state(ctx: typer.Context) -> State:
    state = ctx.find_object(State)
    return state if state is not None else State()


# -- output helpers -------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    typer.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _when(value: Any) -> str:
    text = str(value or "")
    return text[:19].replace("T", " ") if len(text) >= 19 else text


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


def _tags(tags: Any) -> str:
    return ", ".join(f"{key}={value}" for key, value in (tags or {}).items())


def _signature_table(signature: dict[str, Any] | None) -> Table:
    table = Table(title="signature")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("datatype")
    table.add_column("shape")
    for kind in ("inputs", "outputs"):
        for spec in (signature or {}).get(kind, []):
            shape = "[" + ", ".join(str(dim) for dim in spec.get("shape", [])) + "]"
            table.add_row(kind[:-1], spec.get("name", ""), spec.get("datatype", ""), shape)
    return table


def _route_text(route: dict[str, Any] | None) -> str:
    if not route:
        return "not deployed"
    text = f"stable v{route.get('stable_version')}"
    if route.get("canary_version") is not None:
        text += f", canary v{route['canary_version']} at {float(route.get('canary_weight') or 0):g}%"
    return text


def _deployment_summary(deployment: dict[str, Any]) -> str:
    return (
        f"deployment {deployment.get('id')}: version {deployment.get('version')} "
        f"{deployment.get('strategy')} -> {deployment.get('status')}"
    )


def _parse_tags(values: list[str] | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values or []:
        key, sep, tag = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint="--tag")
        tags[key] = tag
    return tags


def parse_data(value: str) -> Any:
    """``--data``: inline JSON, ``@path`` to read a JSON file, or ``@-`` for stdin."""
    text = value
    if value.startswith("@"):
        source = value[1:]
        if source == "-":
            text = sys.stdin.read()
        else:
            try:
                text = Path(source).expanduser().read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise typer.BadParameter(f"{source!r} is not UTF-8 text", param_hint="--data") from None
            except OSError as exc:
                raise typer.BadParameter(
                    f"cannot read {source!r}: {exc.strerror or exc}", param_hint="--data"
                ) from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--data") from None
    if not isinstance(data, dict | list):
        raise typer.BadParameter(
            'expected a JSON object: an OIP request {"inputs": [...]} or {"input_name": [[...]]}',
            param_hint="--data",
        )
    return data


def _version_arg(value: str) -> int | str:
    return int(value) if value.isascii() and value.isdigit() else value


# -- serve / demo ---------------------------------------------------------------------------------


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on; keep 127.0.0.1 unless behind TLS.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8080,
    home: Annotated[
        Path | None,
        typer.Option("--home", help="Directory for the registry and artifacts (default: ~/.maas)."),
    ] = None,
    access_log: Annotated[bool, typer.Option(
        "--access-log/--no-access-log",
        help="Log one line per request (off by default: at thousands of requests a second the log "
             "costs more than a small model).")] = False,
) -> None:
    """Run the local maas server (SQLite registry + artifact directory) in the foreground.

    On first start it creates an admin token, prints it once and saves it for the CLI.

    The token file is <home>/admin-token (mode 0600); set MAAS_ADMIN_TOKEN to choose the token instead
    (no file is written then; the CLI and SDK read MAAS_ADMIN_TOKEN when MAAS_TOKEN is unset).

    Example: maas serve --port 8080 --home ~/.maas
    """
    from maas.cli.serve import serve as run_serve

    run_serve(host=host, port=port, home=home or _state(ctx).home, access_log=access_log)


@app.command()
def demo(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Exit after the first prediction.")] = False,
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port for the demo server.")] = 8080,
) -> None:
    """Start a local server, push and deploy the bundled iris model, call it, keep serving.

    Reuses the iris version already pushed with the same sha256. Stop with Ctrl-C.

    Example: maas demo --once --port 8081
    """
    from maas.cli.demo import demo as run_demo

    run_demo(port=port, once=once, home=_state(ctx).home)


# -- models ---------------------------------------------------------------------------------------


@models_app.command("create")
def models_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name: lowercase letters, digits and '-'.")],
    description: Annotated[str, typer.Option("--description", "-d", help="What the model does.")] = "",
    tag: Annotated[
        list[str] | None, typer.Option("--tag", "-t", help="KEY=VALUE tag; repeat for more.")
    ] = None,
) -> None:
    """Create an empty model (`maas models push` also creates it on first push).

    Example: maas models create fraud --description "card fraud scorer" --tag team=risk
    """
    state = _state(ctx)
    with state.client() as client:
        model = client.create_model(name, description=description, tags=_parse_tags(tag))
    if state.json:
        _print_json(model)
    else:
        stdout_console().print(f"created model {model.get('name', name)}", markup=False, soft_wrap=True)


@models_app.command("list")
def models_list(ctx: typer.Context) -> None:
    """List every model.

    Example: maas models list --json   (put --json before the command: maas --json models list)
    """
    state = _state(ctx)
    with state.client() as client:
        models = client.list_models()
    if state.json:
        _print_json(models)
        return
    table = Table(title=f"models ({len(models)})")
    for column in ("name", "description", "tags", "created"):
        table.add_column(column)
    for model in models:
        table.add_row(
            model.get("name", ""),
            model.get("description", ""),
            _tags(model.get("tags")),
            _when(model.get("created_at")),
        )
    stdout_console().print(table)


@models_app.command("show")
def models_show(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Show a model: description, tags, latest version and where its traffic goes.

    Example: maas models show fraud
    """
    state = _state(ctx)
    with state.client() as client:
        info = client.get_model(name)
    if state.json:
        _print_json(info)
        return
    model = info.get("model") or {}
    table = Table(show_header=False, title=f"model {model.get('name', name)}")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("description", model.get("description", ""))
    table.add_row("tags", _tags(model.get("tags")))
    table.add_row("created", _when(model.get("created_at")))
    latest = info.get("latest_version")
    table.add_row("latest version", "none" if latest is None else str(latest))
    table.add_row("route", _route_text(info.get("route")))
    deployment = info.get("deployment")
    if deployment:
        table.add_row("deployment", _deployment_summary(deployment))
    stdout_console().print(table)


@models_app.command("delete")
def models_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    force: Annotated[bool, typer.Option("--force", help="Delete even while it is deployed.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a model with all its versions, aliases and deployments (admin scope).

    Refused while the model is deployed unless --force.

    Example: maas models delete fraud --yes
    """
    if not yes:
        typer.confirm(f"delete model {name!r} and all its versions?", abort=True)
    state = _state(ctx)
    with state.client() as client:
        client.delete_model(name, force=force)
    if not state.json:
        stdout_console().print(f"deleted model {name}", markup=False, soft_wrap=True)


@models_app.command("push")
def models_push(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name (created if missing).")],
    file: Annotated[Path, typer.Argument(help="The .onnx file.", exists=True, dir_okay=False, readable=True)],
    description: Annotated[str, typer.Option("--description", "-d", help="Notes for this version.")] = "",
    optimize: Annotated[
        bool, typer.Option("--optimize", help="Then quantize it to int8 as a further version (maas models optimize).")
    ] = False,
    tolerance: Annotated[
        float | None,
        typer.Option("--tolerance", min=0.0, max=1.0, help="With --optimize: accepted output difference (0.05)."),
    ] = None,
    goal: Annotated[
        OptimizeGoal | None,
        typer.Option("--goal", help="With --optimize: latency (must be faster, the default) or size (smaller, "
                                    "not slower)."),
    ] = None,
    part_size_mib: Annotated[
        int | None,
        typer.Option("--part-size", min=5, max=5120, metavar="MIB",
                     help="Upload files larger than this in parts of this many MiB (S3 multipart: 5 to 5120; "
                          "default 64). Smaller parts retry faster on slow links."),
    ] = None,
    max_inference_seconds: Annotated[
        float | None,
        typer.Option("--max-inference-seconds", min=0.001, metavar="SECONDS",
                     help="This version's deadline for one run (default: the server's, 30 s): a request "
                          "past it is stopped and answered 504. Only tighter than the server's."),
    ] = None,
    max_output_mib: Annotated[
        float | None,
        typer.Option("--max-output-mib", min=0.001, metavar="MIB",
                     help="The most output one request may make this version produce (default: the "
                          "server's, 64 MiB): past it the answer is 422. Only tighter than the server's."),
    ] = None,
) -> None:
    """Upload an ONNX file as the model's next version, then verify and validate it.

    Streams the file straight to storage with a progress bar, computing its sha256 on the way.

    The server then checks the checksum, validates the graph and extracts its signature.

    With --optimize, the new version is then quantized to int8 and registered as one more version.

    With --max-inference-seconds or --max-output-mib the version gets run limits tighter than the server's.

    Example: maas models push fraud ./model.onnx --description "retrained on May data"
    """
    state = _state(ctx)
    progress = Progress(
        TextColumn("uploading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=True,
        disable=state.json,
    )
    with state.client() as client, progress:
        task = progress.add_task(file.name, total=None)

        def on_progress(sent: int, total: int) -> None:
            progress.update(task, completed=sent, total=total)

        limits: dict[str, Any] = {}
        if max_inference_seconds is not None:
            limits["max_inference_seconds"] = max_inference_seconds
        if max_output_mib is not None:
            limits["max_output_bytes"] = max(1, int(max_output_mib * 1024 * 1024))
        version = client.push(name, file, description=description, progress=on_progress,
                              part_size=part_size_mib * 1024 * 1024 if part_size_mib is not None else None,
                              limits=limits or None)
        optimized: dict[str, Any] | None = None
        optimize_error: str | None = None
        if optimize:
            try:
                optimized = client.optimize(name, version["version"], tolerance=tolerance,
                                            goal=goal.value if goal is not None else None)
            except MaasClientError as exc:
                optimize_error = str(exc)
    if optimize_error is not None:
        if not state.json:
            stdout_console().print(f"{name} version {version.get('version')}: {version.get('status')}", markup=False)
        raise CliError(f"version {version.get('version')} was pushed, but optimizing it failed: {optimize_error}")
    if state.json:
        _print_json(version if optimized is None else {"pushed": version, "optimized": optimized})
        return
    out = stdout_console()
    out.print(
        f"{name} version {version.get('version')}: {version.get('status')} "
        f"(sha256 {str(version.get('sha256') or '')[:12]}, {_size(version.get('size'))})",
        markup=False,
    )
    out.print(_signature_table(version.get("signature")))
    if optimized is not None:
        _print_optimized(name, optimized)
        version = optimized["version"]
    out.print(f"deploy it with: maas deploy {name} {version.get('version')}", markup=False, soft_wrap=True)


def _ms(value: Any) -> str:
    return f"{value:.3g} ms" if isinstance(value, int | float) else "n/a"


def _print_optimized(name: str, result: dict[str, Any]) -> None:
    """Sizes, p50 latencies and differences of an int8 derivative against its parent."""
    version, report = result.get("version") or {}, result.get("report") or {}
    out = stdout_console()
    how = "already optimized as" if report.get("reused") else "optimized into"
    scheme = f", {report['scheme']} weights" if report.get("scheme") else ""
    out.print(f"{name} version {report.get('parent_version', version.get('parent_version'))} {how} version "
              f"{version.get('version')} (int8 dynamic quantization{scheme}): {version.get('status')}", markup=False,
              soft_wrap=True)
    table = Table("", "parent", "int8", "change", box=None, pad_edge=False)
    parent_bytes, derived_bytes = report.get("parent_bytes"), report.get("derived_bytes")
    ratio = (f"{derived_bytes / parent_bytes:.2f}x" if isinstance(parent_bytes, int) and parent_bytes
             and isinstance(derived_bytes, int) else "")
    table.add_row("size", _size(parent_bytes), _size(derived_bytes), ratio)
    parent_ms, derived_ms = report.get("parent_p50_ms"), report.get("derived_p50_ms")
    speedup, interval = report.get("speedup"), report.get("speedup_interval") or []
    bounds = (f" (99%: {interval[0]:.2f}x-{interval[1]:.2f}x)" if len(interval) == 2
              and all(isinstance(bound, int | float) for bound in interval) else "")
    table.add_row("p50 latency", _ms(parent_ms), _ms(derived_ms),
                  f"{speedup:.2f}x as fast{bounds}" if isinstance(speedup, int | float) else "")
    out.print(table)
    diff, rel = report.get("max_abs_diff"), report.get("max_rel_diff")
    parts = []
    if isinstance(diff, int | float):
        parts.append(f"max abs diff {diff:.4g}")
    if isinstance(rel, int | float):
        parts.append(f"{rel:.4g} relative to the output's scale")
    agreement = report.get("min_agreement_seen")
    if isinstance(agreement, int | float) and any(o.get("kind") == "exact" for o in report.get("outputs") or []):
        parts.append(f"labels agree {agreement:.1%}")
    out.print(f"difference: {', '.join(parts) or 'n/a'} (tolerance {report.get('tolerance')})", markup=False)


@models_app.command("optimize")
def models_optimize(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version number or alias to quantize.")],
    tolerance: Annotated[
        float | None,
        typer.Option("--tolerance", min=0.0, max=1.0,
                     help="Accepted difference of each output from the parent's (default 0.05)."),
    ] = None,
    goal: Annotated[
        OptimizeGoal | None,
        typer.Option("--goal", help="latency: the int8 version must be measurably faster (default); size: "
                                    "smaller and not measurably slower."),
    ] = None,
) -> None:
    """Quantize a version to int8 and register the result as a new version with the parent as lineage.

    The derived version is kept only if it passes every check: its integer arithmetic is exact on every
    CPU (no 16-bit saturation on x86 CPUs without VNNI), it is smaller than the parent, its outputs stay
    within the tolerance of the parent's on sample inputs (float outputs: max difference relative to
    max(1, the output's peak); labels: 90% equal), and it is faster in paired runs (--goal size: not
    slower). Otherwise nothing is registered and the failed check is named. Size, p50 latency and the
    difference are printed.

    Example: maas models optimize fraud 3 --tolerance 0.02
    """
    state = _state(ctx)
    with state.client() as client:
        result = client.optimize(name, _version_arg(version), tolerance=tolerance,
                                 goal=goal.value if goal is not None else None)
    if state.json:
        _print_json(result)
        return
    _print_optimized(name, result)
    number = (result.get("version") or {}).get("version")
    stdout_console().print(f"deploy it with: maas deploy {name} {number}", markup=False, soft_wrap=True)


# -- versions / aliases ---------------------------------------------------------------------------


@app.command()
def versions(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """List a model's versions, newest first, with their status and aliases.

    Example: maas versions fraud
    """
    state = _state(ctx)
    with state.client() as client:
        items = client.list_versions(name)
        aliases = client.list_aliases(name) if not state.json else []
    if state.json:
        _print_json(items)
        return
    by_version: dict[int, list[str]] = {}
    for alias in aliases:
        by_version.setdefault(int(alias.get("version", 0)), []).append(str(alias.get("alias")))
    table = Table(title=f"{name} versions ({len(items)})")
    for column in ("version", "status", "aliases", "sha256", "size", "created", "description"):
        table.add_column(column, justify="right" if column in ("version", "size") else "left")
    for item in items:
        status = str(item.get("status", ""))
        if item.get("status_reason"):
            status += f" ({item['status_reason']})"
        table.add_row(
            str(item.get("version")),
            status,
            ", ".join(by_version.get(int(item.get("version", 0)), [])),
            str(item.get("sha256") or "")[:12],
            _size(item.get("size")),
            _when(item.get("created_at")),
            item.get("description", ""),
        )
    stdout_console().print(table)


@alias_app.command("set")
def alias_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="Alias, e.g. champion.")],
    version: Annotated[int, typer.Argument(help="READY version number the alias points to.", min=1)],
) -> None:
    """Point an alias at a READY version (creates or moves it atomically).

    Example: maas alias set fraud champion 3
    """
    state = _state(ctx)
    with state.client() as client:
        result = client.set_alias(name, alias, version)
    if state.json:
        _print_json(result)
    else:
        stdout_console().print(
            f"{name}:{alias} -> version {result.get('version', version)}", markup=False, soft_wrap=True
        )


@alias_app.command("list")
def alias_list(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """List a model's aliases.

    Example: maas alias list fraud
    """
    state = _state(ctx)
    with state.client() as client:
        items = client.list_aliases(name)
    if state.json:
        _print_json(items)
        return
    table = Table(title=f"{name} aliases ({len(items)})")
    for column in ("alias", "version", "updated"):
        table.add_column(column)
    for item in items:
        table.add_row(str(item.get("alias")), str(item.get("version")), _when(item.get("updated_at")))
    stdout_console().print(table)


@alias_app.command("delete")
def alias_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="Alias to remove.")],
) -> None:
    """Remove an alias (the version stays).

    Example: maas alias delete fraud champion
    """
    with _state(ctx).client() as client:
        client.delete_alias(name, alias)
    if not _state(ctx).json:
        stdout_console().print(f"deleted alias {name}:{alias}", markup=False, soft_wrap=True)


# -- deploy / rollback / status -------------------------------------------------------------------


@app.command()
def deploy(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version number or alias (e.g. 3 or champion).")],
    strategy: Annotated[
        Strategy, typer.Option(help="all_at_once: all traffic at once (after --bake at 100% if given); "
                                    "canary: --canary-percent of traffic for --bake seconds, then all; "
                                    "linear: --step-percent more every --interval seconds.")
    ] = Strategy.ALL_AT_ONCE,
    target: Annotated[
        str | None, typer.Option(help="lambda (default: the inference functions, or this server) or sagemaker "
                                      "(an endpoint that shifts traffic itself, where the server has one).")
    ] = None,
    canary_percent: Annotated[
        float | None, typer.Option("--canary-percent", help="canary: % of traffic the new version gets while "
                                                            "it bakes (default 10).", min=0, max=100)
    ] = None,
    linear_step_percent: Annotated[
        float | None, typer.Option("--step-percent", "--linear-step-percent",
                                   help="linear: % of traffic added per step (default 10).", min=0, max=100)
    ] = None,
    bake: Annotated[
        int | None, typer.Option("--bake", help="Seconds the new version's health is watched before it takes "
                                                "all traffic (default 0).", min=0)
    ] = None,
    interval: Annotated[
        int | None, typer.Option("--interval", help="linear: seconds between steps, health checked after "
                                                    "each (default: --bake).", min=0)
    ] = None,
    max_error_rate: Annotated[
        float | None, typer.Option("--max-error-rate", help="Roll back if the new version's error rate goes "
                                                            "over this fraction (default 0.01).", min=0, max=1)
    ] = None,
    max_p99_ms: Annotated[
        float | None, typer.Option("--max-p99-ms", help="Roll back if its p99 latency goes over this many "
                                                        "milliseconds (default: no limit).", min=0)
    ] = None,
    max_p99_ratio: Annotated[
        float | None, typer.Option("--max-p99-ratio", help="Roll back if its p99 latency goes over this many "
                                                           "times the stable version's (default 2).", min=0)
    ] = None,
    optimize: Annotated[
        bool, typer.Option("--optimize", help="Quantize the version to int8 and deploy the derived version, "
                                              "if it is exact on every CPU, smaller, within tolerance of the "
                                              "original's outputs and faster (else the deploy fails there).")
    ] = False,
    wait: Annotated[
        bool,
        typer.Option("--wait/--no-wait", help="Wait for a deployment the server runs in the background."),
    ] = True,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for it (with --wait).", min=0)
    ] = DEPLOY_WAIT_S,
) -> None:
    """Deploy a version (number or alias): validate it, smoke-test it on inputs made from its
    signature, shift traffic to it with the strategy, watch its health, then promote it, or roll back
    on its own if a step fails or its error rate or latency break the limits.

    The previous stable version keeps serving throughout, and stays one `maas rollback` away (which
    also cancels a deploy in flight).

    Canary, linear and baked deploys run in the background: the command follows them until they
    finish (at most --timeout seconds, progress on stderr) and exits 1 if they FAILED or were
    ROLLED_BACK. --no-wait returns at once; watch with `maas status NAME`.

    Examples: maas deploy fraud 3
              maas deploy fraud 3 --strategy canary --canary-percent 10 --bake 300
              maas deploy fraud 3 --strategy linear --step-percent 20 --interval 60 --max-p99-ms 250
    """
    state = _state(ctx)
    given = {"max_error_rate": max_error_rate, "max_p99_latency_ms": max_p99_ms,
             "max_p99_latency_ratio": max_p99_ratio}
    thresholds = {key: value for key, value in given.items() if value is not None} or None
    with state.client() as client:
        deployment = client.deploy(
            name,
            _version_arg(version),
            strategy=strategy.value,
            wait=False,
            target=target,
            canary_percent=canary_percent,
            linear_step_percent=linear_step_percent,
            bake_seconds=bake,
            linear_interval_seconds=interval,
            thresholds=thresholds,
            optimize=optimize or None,
        )
        if wait and deployment.get("status") == "IN_PROGRESS" and deployment.get("id"):
            deployment = _follow_deployment(client, deployment, timeout, quiet=state.json)
    if state.json:
        _print_json(deployment)
    else:
        out = stdout_console()
        out.print(_deployment_summary(deployment), markup=False, soft_wrap=True)
        out.print(f"watch it with: maas status {name}", markup=False, soft_wrap=True)
    if deployment.get("status") in ("FAILED", "ROLLED_BACK"):
        fail(f"deployment {deployment.get('id')} {str(deployment.get('status')).lower().replace('_', ' ')}: "
             f"{_last_event(deployment)}")


def _last_event(deployment: dict[str, Any]) -> str:
    events = deployment.get("events") or [{}]
    last = events[-1] if isinstance(events[-1], dict) else {}
    return ": ".join(str(part) for part in (last.get("kind"), last.get("detail")) if part) or "no event"


def _follow_deployment(client: Client, deployment: dict[str, Any], timeout: float, *, quiet: bool) -> dict[str, Any]:
    """Poll a deployment still IN_PROGRESS until it finishes, showing its latest event on stderr."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=stderr_console(),
        transient=True,
        disable=quiet,
    )

    def describe(current: dict[str, Any]) -> str:
        return (f"deployment {str(current.get('id'))[:8]} (version {current.get('version')}) "
                f"{current.get('status')}: {_last_event(current)}")

    with progress:
        task = progress.add_task(describe(deployment), total=None)
        return client.wait_for_deployment(
            str(deployment["id"]), timeout=timeout,
            on_update=lambda current: progress.update(task, description=describe(current)),
        )


@app.command()
def rollback(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    to: Annotated[
        int | None, typer.Option("--to", help="Version to go back to (default: the previous one).", min=1)
    ] = None,
) -> None:
    """Send all traffic back to the previous stable version (or --to a given READY version).

    Example: maas rollback fraud --to 2
    """
    state = _state(ctx)
    with state.client() as client:
        deployment = client.rollback(name, to_version=to)
    if state.json:
        _print_json(deployment)
    else:
        stdout_console().print(
            f"rolled back; live now: {_deployment_summary(deployment)}", markup=False, soft_wrap=True
        )


@app.command()
def status(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Show where a model's traffic goes (stable, canary and weight), every transition of its newest
    deployment (traffic shifts, health checks, promotion or the reason for a rollback) and its
    recent deployments.

    Example: maas status fraud
    """
    state = _state(ctx)
    with state.client() as client:
        info = client.status(name)
        recent = client.list_deployments(name, limit=10)
    if state.json:
        _print_json(info | {"deployments": recent})
        return
    out = stdout_console()
    route = info.get("route")
    route_table = Table(title=f"{name} route", show_header=True)
    for column in ("stable", "canary", "canary weight"):
        route_table.add_column(column)
    if route:
        canary = route.get("canary_version")
        route_table.add_row(
            f"v{route.get('stable_version')}",
            "-" if canary is None else f"v{canary}",
            "-" if canary is None else f"{float(route.get('canary_weight') or 0):g}%",
        )
        out.print(route_table)
    else:
        latest = info.get("latest_version")
        out.print(
            f"{name} is not deployed (latest version: {latest if latest is not None else 'none'})",
            markup=False,
        )
    live = info.get("deployment")
    # Every transition of the newest deployment (in flight, or just promoted / rolled back: the why).
    deployment = recent[0] if recent else live
    if not deployment:
        return
    if live and live.get("id") != deployment.get("id"):
        out.print(f"live: {_deployment_summary(live)}", markup=False, soft_wrap=True)
    out.print(_deployment_summary(deployment), markup=False, soft_wrap=True)
    if deployment.get("status") == "IN_PROGRESS" and deployment.get("canary_version") is not None:
        out.print(f"traffic now: {float(deployment.get('canary_weight') or 0):g}% to version "
                  f"{deployment['canary_version']}, the rest to version {deployment.get('stable_version')}",
                  markup=False, soft_wrap=True)
    events = Table(title=f"history of deployment {str(deployment.get('id', ''))[:8]}")
    for column in ("at", "event", "detail"):
        events.add_column(column)
    for event in deployment.get("events") or []:
        events.add_row(_when(event.get("at")), str(event.get("kind", "")), str(event.get("detail", "")))
    out.print(events)
    deployments = Table(title="deployments (newest first)")
    for column in ("id", "version", "strategy", "status", "started", "last event"):
        deployments.add_column(column)
    for item in recent:
        last = (item.get("events") or [{}])[-1]
        deployments.add_row(str(item.get("id", ""))[:8], f"v{item.get('version')}", str(item.get("strategy", "")),
                            str(item.get("status", "")), _when(item.get("created_at")),
                            f"{last.get('kind', '')}: {last.get('detail', '')}")
    out.print(deployments)


# -- inference ------------------------------------------------------------------------------------


@app.command()
def predict(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help='Inputs as JSON, @file.json or @- (stdin): an OIP request {"inputs": [...]} or '
            'the shorthand {"input_name": [[...]]}.',
        ),
    ],
    version: Annotated[
        str | None, typer.Option("--version", help="Version number or alias (default: the deployed route).")
    ] = None,
) -> None:
    """Call a model (OIP v2 infer) and print the response JSON.

    The shorthand maps each input name to a nested list; the client sends it with the model's datatype.

    Example: maas predict iris --data '{"features": [[5.1, 3.5, 1.4, 0.2]]}'
    """
    payload = parse_data(data)
    with _state(ctx).client() as client:
        try:
            answer = client.predict(name, payload, version=None if version is None else _version_arg(version))
        except (ValueError, TypeError, OverflowError) as exc:
            # The shorthand could not become tensors (ragged lists, objects, out-of-range numbers).
            raise typer.BadParameter(f"cannot turn the data into tensors: {exc}", param_hint="--data") from None
    _print_json(answer)


# -- tokens ---------------------------------------------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A label for the token, e.g. the app using it.")],
    scope: Annotated[
        list[Scope], typer.Option("--scope", "-s", help="admin, deploy or invoke; repeat for more.")
    ],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Restrict the token to one model.")
    ] = None,
) -> None:
    """Create an API token and print its secret (shown only once).

    Example: maas tokens create checkout-app --scope invoke --model fraud
    """
    state = _state(ctx)
    with state.client() as client:
        created = client.create_token(name, [item.value for item in scope], model=model)
    if state.json:
        _print_json(created)
        return
    restriction = f", model {created.get('model')}" if created.get("model") else ""
    text = Text.assemble(
        (str(created.get("token")), "bold"),
        f"\n\nid {created.get('id')}, scopes {', '.join(created.get('scopes') or [])}{restriction}\n",
        ("Copy it now: it will not be shown again.", "yellow"),
    )
    stdout_console().print(Panel(text, title=f"token {created.get('name', name)}", expand=False))


@tokens_app.command("list")
def tokens_list(ctx: typer.Context) -> None:
    """List API tokens (never their secrets).

    Example: maas tokens list
    """
    state = _state(ctx)
    with state.client() as client:
        items = client.list_tokens()
    if state.json:
        _print_json(items)
        return
    table = Table(title=f"tokens ({len(items)})")
    for column in ("id", "name", "scopes", "model", "created", "revoked"):
        table.add_column(column)
    for item in items:
        table.add_row(
            str(item.get("id")),
            str(item.get("name", "")),
            ", ".join(item.get("scopes") or []),
            str(item.get("model") or "-"),
            _when(item.get("created_at")),
            "yes" if item.get("revoked") else "",
        )
    stdout_console().print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    ctx: typer.Context, token_id: Annotated[str, typer.Argument(metavar="ID", help="Token id.")]
) -> None:
    """Revoke a token; requests using it fail from now on.

    Example: maas tokens revoke 3f2a9c
    """
    with _state(ctx).client() as client:
        client.revoke_token(token_id)
    if not _state(ctx).json:
        stdout_console().print(f"revoked token {token_id}", markup=False, soft_wrap=True)


def main() -> None:
    """Console script entry point (``maas``)."""
    app(prog_name="maas")


if __name__ == "__main__":
    main()
