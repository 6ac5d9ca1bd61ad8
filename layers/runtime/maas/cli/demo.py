"""``maas demo``: start a local server, push and deploy the bundled iris model, and call it.

Composition root like ``maas serve``: the server runs in-process on a background thread and this
module drives it over HTTP with the SDK, exactly as a user would.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table
from rich.text import Text

from maas.cli import CliError, stdout_console
from maas.cli.serve import (
    ADMIN_TOKEN_FILE,
    base_url,
    bind_socket,
    build_server,
    close_backend,
    make_server,
    read_admin_token,
    show_admin_token,
)
from maas.client import Client, MaasClientError
from maas.client.client import file_sha256
from maas.examples import EXAMPLE_MODEL_NAME, EXAMPLE_REQUEST, example_model_path
from maas.settings import Settings

IRIS_CLASSES = ("setosa", "versicolor", "virginica")
START_TIMEOUT_S = 30.0
DEPLOY_TIMEOUT_S = 120.0
DEFAULT_PORT = 8080


def demo(
    port: int = DEFAULT_PORT, once: bool = False, home: Path | None = None, host: str = "127.0.0.1"
) -> None:
    settings = Settings.from_env(home)
    sock = bind_socket(host, port)
    out = stdout_console()
    try:
        backend, app, secret, created = build_server(settings, host)
        token = secret or read_admin_token(settings.home)
        if token is None:
            raise CliError(
                f"the admin token of {settings.home} is unknown ({settings.home / ADMIN_TOKEN_FILE} is "
                "missing); start with MAAS_ADMIN_TOKEN=<token> or use a fresh --home"
            )
        server = make_server(app, host, port, "warning")
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="maas-demo", daemon=True
        )
        thread.start()
        try:
            _wait_started(server, thread)
            url = base_url(host, port)
            if secret and created:
                show_admin_token(secret, settings.home)
            out.print(Text.assemble("maas demo server at ", (url, "bold"), f" (home {settings.home})"),
                      soft_wrap=True)
            with Client(url, token) as client:
                version = _ensure_example_version(client)
                _ensure_deployed(client, version)
                answer = client.predict(EXAMPLE_MODEL_NAME, EXAMPLE_REQUEST)
            _print_prediction(answer)
            _print_next_steps(
                url, settings.home, port, secret_in_file=read_admin_token(settings.home) == token
            )
            if once:
                return
            out.print(f"\nserving at {url} - press Ctrl-C to stop", soft_wrap=True)
            try:
                while thread.is_alive():
                    thread.join(0.5)
            except KeyboardInterrupt:
                out.print("stopping...")
                return
            raise CliError("the server stopped unexpectedly; see its log above")
        finally:
            server.should_exit = True
            thread.join(timeout=15)
            close_backend(backend)
    finally:
        sock.close()


def _wait_started(server: Any, thread: threading.Thread) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            raise CliError("the server failed to start; see its log above")
        if time.monotonic() > deadline:
            raise CliError(f"the server did not start within {START_TIMEOUT_S:g}s")
        time.sleep(0.05)


def _ensure_example_version(client: Client) -> int:
    """The READY version holding the bundled example, pushing it only if no such version exists."""
    path = example_model_path()
    sha256 = file_sha256(path)
    out = stdout_console()
    try:
        client.create_model(
            EXAMPLE_MODEL_NAME, description="Iris species classifier (maas demo)", tags={"example": "true"}
        )
    except MaasClientError as exc:
        if exc.status != 409:
            raise
    for version in client.list_versions(EXAMPLE_MODEL_NAME):
        if version.get("status") == "READY" and version.get("sha256") == sha256:
            number = int(version["version"])
            out.print(f"reusing {EXAMPLE_MODEL_NAME} version {number} (same sha256 {sha256[:12]})")
            return number
    committed = client.push(EXAMPLE_MODEL_NAME, path, description="bundled example", create=False)
    number = int(committed["version"])
    out.print(f"pushed {path.name} as {EXAMPLE_MODEL_NAME} version {number} ({committed.get('status')})")
    return number


def _ensure_deployed(client: Client, version: int) -> None:
    out = stdout_console()
    route = client.status(EXAMPLE_MODEL_NAME).get("route") or {}
    if route.get("stable_version") == version and not route.get("canary_version"):
        out.print(f"{EXAMPLE_MODEL_NAME} version {version} is already live")
        return
    deployment = client.deploy(EXAMPLE_MODEL_NAME, version)
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while deployment.get("status") == "IN_PROGRESS":
        if time.monotonic() > deadline:
            raise CliError(f"deployment {deployment.get('id')} still in progress after {DEPLOY_TIMEOUT_S:g}s")
        time.sleep(0.2)
        deployment = client.get_deployment(str(deployment["id"]))
    if deployment.get("status") != "SUCCEEDED":
        events = deployment.get("events") or []
        reason = events[-1].get("detail") if events else ""
        raise CliError(f"deployment {deployment.get('id')} ended {deployment.get('status')}: {reason}")
    out.print(
        f"deployed {EXAMPLE_MODEL_NAME} version {version} ({deployment.get('strategy', 'all_at_once')})"
    )


def _output(answer: dict[str, Any], name: str) -> list[Any] | None:
    for item in answer.get("outputs") or []:
        if item.get("name") == name:
            data = item.get("data")
            return list(data) if isinstance(data, list) else None
    return None


def _print_prediction(answer: dict[str, Any]) -> None:
    out = stdout_console()
    rows = EXAMPLE_REQUEST["inputs"][0]["data"]
    labels = _output(answer, "label")
    probabilities = _output(answer, "probabilities")
    if labels is None or probabilities is None:
        out.print_json(orjson.dumps(answer).decode())
        return
    width = len(IRIS_CLASSES)
    table = Table(title=f"prediction from {answer.get('model_name')} version {answer.get('model_version')}")
    table.add_column("features")
    table.add_column("label")
    for name in IRIS_CLASSES:
        table.add_column(f"p({name})", justify="right")
    for index, features in enumerate(rows):
        label = int(labels[index])
        probs = probabilities[index * width : (index + 1) * width]
        name = IRIS_CLASSES[label] if 0 <= label < width else str(label)
        shown = " ".join(f"{float(x):.1f}" for x in features)
        table.add_row(shown, f"{label} {name}", *(f"{float(p):.3f}" for p in probs))
    out.print(table)


def _print_next_steps(url: str, home: Path, port: int, *, secret_in_file: bool) -> None:
    out = stdout_console()
    url_opt = "" if port == DEFAULT_PORT else f" --url {url}"
    token_expr = f"$(cat {home / ADMIN_TOKEN_FILE})" if secret_in_file else "$MAAS_ADMIN_TOKEN"
    body = orjson.dumps(EXAMPLE_REQUEST).decode()
    shorthand = orjson.dumps({"features": [[5.9, 3.0, 5.1, 1.8]]}).decode()
    lines = [
        f'curl -s {url}/v2/models/{EXAMPLE_MODEL_NAME}/infer -H "Authorization: Bearer {token_expr}" '
        f"-H 'Content-Type: application/json' -d '{body}'",
        f"maas{url_opt} models list",
        f"maas{url_opt} status {EXAMPLE_MODEL_NAME}",
        f"maas{url_opt} predict {EXAMPLE_MODEL_NAME} --data '{shorthand}'",
        f"API docs: {url}/docs",
    ]
    if os.environ.get("MAAS_HOME") is None and home != Path("~/.maas").expanduser():
        lines.insert(1, f"export MAAS_HOME={home}")
    out.print("\ntry next:", style="bold")
    for line in lines:
        out.print(f"  {line}", markup=False, soft_wrap=True)
