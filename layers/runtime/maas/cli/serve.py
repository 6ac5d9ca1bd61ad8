"""``maas serve``: the local server (composition root: local backend + HTTP API + uvicorn).

The heavy imports (FastAPI, onnxruntime, uvicorn) happen inside the functions so ``maas --help`` and
the client commands stay fast and work without the server extras.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.panel import Panel
from rich.text import Text

from maas.cli import CliError, stderr_console, stdout_console
from maas.settings import Limits, Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

ADMIN_TOKEN_FILE = "admin-token"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: Host header names a loopback-bound server answers (see ``create_app(allowed_hosts=...)``).
LOOPBACK_ALLOWED_HOSTS = ("127.0.0.1", "localhost", "[::1]")
EXTRAS_HINT = "install the server extras: pip install 'maas[local]'"


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so a taken port is one clear error, not a uvicorn log."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise CliError(f"cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CliError(
                f"port {port} on {host} is already in use; pick another one with --port {port + 1}"
            ) from None
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def warn_if_public(host: str) -> None:
    if host not in LOOPBACK_HOSTS:
        stderr_console().print(
            f"warning: listening on {host}, not 127.0.0.1: anyone who can reach this machine can call "
            "the API (tokens still required). Put TLS in front of it before exposing it.",
            style="bold yellow",
            markup=False,
            soft_wrap=True,
        )


def read_admin_token(home: Path) -> str | None:
    try:
        secret = (home / ADMIN_TOKEN_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return secret or None


def build_server(settings: Settings, host: str = "127.0.0.1") -> tuple[Any, FastAPI, str | None, bool]:
    """Local backend + API app; returns ``(backend, app, admin secret or None, created_now)``.

    The admin token is ``MAAS_ADMIN_TOKEN`` when set, else the one saved in ``<home>/admin-token``
    (the backend creates and saves it, mode 0600, on first start). On a loopback address the app
    only answers loopback Host headers (DNS rebinding defence)."""
    try:
        from maas.api import create_app
        from maas.backends.local import LocalBackend
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("maas"):
            raise CliError(f"the server needs {exc.name!r}; {EXTRAS_HINT}") from None
        raise
    from maas.backends.local.maintenance import clean, recover_interrupted_deploys

    backend = LocalBackend(settings)
    try:
        backend.claim_server()
        secret, created = backend.ensure_admin_token(os.environ.get("MAAS_ADMIN_TOKEN") or None)
        for interrupted in recover_interrupted_deploys(backend):
            stderr_console().print(f"rolled back deploy of {interrupted.model} v{interrupted.version}: "
                                   "it was interrupted by a restart", style="yellow", markup=False)
        clean(backend)
        allowed = LOOPBACK_ALLOWED_HOSTS if host in LOOPBACK_HOSTS else None
        app = create_app(backend, settings, allowed_hosts=allowed)
    except BaseException:
        close_backend(backend)
        raise
    return backend, app, secret, created


def show_admin_token(secret: str, home: Path) -> None:
    text = Text.assemble(
        (secret, "bold"),
        f"\n\nsaved to {home / ADMIN_TOKEN_FILE} (mode 0600) for the CLI; it is shown only this once.\n"
        'Use it as "Authorization: Bearer <token>", or create narrower ones with `maas tokens create`.',
    )
    stdout_console().print(Panel(text, title="admin token created", border_style="green", expand=False))


def make_server(app: FastAPI, host: str, port: int, log_level: str, *, access_log: bool = False,
                header_timeout_s: float = Limits().header_timeout_s) -> Any:
    """A ``uvicorn.Server`` for ``app``; run it with ``server.run(sockets=[bind_socket(host, port)])``.

    HTTP is uvicorn's httptools protocol (installed with the ``api`` extra: its pure-Python h11 parser
    and asyncio's loop cost about as much per request as a small model) with a deadline on request
    headers (``maas.api.header_deadline``); the loop is uvloop where installed."""
    try:
        import uvicorn

        from maas.api.header_deadline import header_deadline_protocol
    except ModuleNotFoundError:
        raise CliError(f"the server needs 'uvicorn' and 'httptools'; {EXTRAS_HINT}") from None
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        http=header_deadline_protocol(header_timeout_s),
        loop="auto",
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def close_backend(backend: Any) -> None:
    close = getattr(backend, "close", None)
    if callable(close):
        close()


def serve(host: str = "127.0.0.1", port: int = 8080, home: Path | None = None, *, access_log: bool = False) -> None:
    """Run the local maas server in the foreground until Ctrl-C."""
    settings = Settings.from_env(home)
    sock = bind_socket(host, port)
    try:
        warn_if_public(host)
        backend, app, secret, created = build_server(settings, host)
        if secret and created:
            show_admin_token(secret, settings.home)
        url = base_url(host, port)
        out = stdout_console()
        out.print(Text.assemble(f"maas is serving {settings.home} at ", (url, "bold")), soft_wrap=True)
        out.print(f"API docs: {url}/docs    stop with Ctrl-C", soft_wrap=True)
        server = make_server(app, host, port, "info", access_log=access_log,
                             header_timeout_s=settings.limits.header_timeout_s)
        from maas.backends.local.maintenance import Maintenance

        maintenance = Maintenance(backend).start()
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        finally:
            maintenance.stop()
            close_backend(backend)
    finally:
        sock.close()
