"""The local backend: everything ``maas serve`` needs, under one home directory.

    <home>/registry.db     the registry (SQLite, WAL), idempotency keys included
    <home>/artifacts/      uploads and content-addressed blobs
    <home>/admin-token     the generated admin token (mode 0600), when MAAS_ADMIN_TOKEN is not set
    <home>/.lock           serializes start-up work between processes sharing the home
    <home>/server.lock     held by the one server (`maas serve` / `maas demo`) using the home
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import MappingProxyType, TracebackType

from maas.backends.local.artifacts import FileArtifactStore
from maas.backends.local.idempotency import SqliteIdempotencyStore
from maas.backends.local.registry import SqliteRegistry
from maas.domain import Scope, Token
from maas.errors import Conflict
from maas.ports import ArtifactStore, DeployExecutor, EndpointTarget, IdempotencyStore, Registry, Validator
from maas.services.tokens import TokenService, hash_token
from maas.settings import Settings

ADMIN_TOKEN_FILE = "admin-token"
LOCK_FILE = ".lock"
SERVER_LOCK_FILE = "server.lock"
ENV_ADMIN_TOKEN_NAME = "admin-env"  # "admin (env)" is not a valid token name (maas.domain.names)


def _is_admin(token: Token | None) -> bool:
    return token is not None and not token.revoked and token.model is None and Scope.ADMIN in token.scopes


class LocalBackend:
    """Registry, artifact store and validator for one machine (``maas.ports.Backend``)."""

    #: Deploys run in the server's process (``maas.services.deploy.InProcessExecutor``).
    deploy_executor: DeployExecutor | None = None
    #: no target shifts traffic itself here: every deploy is routed by this process
    endpoint_targets: Mapping[str, EndpointTarget] = MappingProxyType({})

    def __init__(self, settings: Settings, *, validator: Validator | None = None):
        self.settings = settings
        self.home = Path(settings.home)
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sqlite = SqliteRegistry(self.home / "registry.db", page_size_max=settings.limits.page_size_max)
        # Typed as the ports: ``maas.ports.Backend`` declares them as (invariant) attributes.
        self.registry: Registry = self._sqlite
        self.artifacts: ArtifactStore = FileArtifactStore(self.home / "artifacts", settings.limits)
        # Same database as the registry: a key's claim is as durable as the writes it guards.
        self.idempotency: IdempotencyStore = SqliteIdempotencyStore(self._sqlite)
        if validator is None:
            from maas.inference.sandbox import SubprocessValidator  # heavy; only when needed

            validator = SubprocessValidator(settings.limits)
        self.validator: Validator = validator
        self._server_lock: int | None = None

    def claim_server(self) -> None:
        """Make this process the home's one server, until ``close()``.

        The server runs deploys and housekeeping (it rolls back deploys a crash left IN_PROGRESS),
        which is only safe when no other server is driving the same deployments. CLI commands and
        other clients may still use the home concurrently."""
        if self._server_lock is not None:
            return
        fd = os.open(self.home / SERVER_LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Conflict(f"another maas server is already using {self.home}; stop it, or pass another "
                           "--home") from None
        self._server_lock = fd

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock shared by every process (and thread) using this home."""
        fd = os.open(self.home / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def ensure_admin_token(self, explicit: str | None = None) -> tuple[str | None, bool]:
        """Make sure an admin token exists. Returns ``(secret, created)``.

        With ``explicit`` (``MAAS_ADMIN_TOKEN``) that secret becomes an admin token if it is not one
        already, and the tokens earlier values of ``MAAS_ADMIN_TOKEN`` made are revoked. Otherwise the
        token saved in ``<home>/admin-token`` is reused while it is valid,
        or a new one is created and saved there (mode 0600); ``created`` says the caller should show it.
        """
        tokens = TokenService(self.registry)
        with self._locked():
            if explicit:
                existing = self.registry.find_token(hash_token(explicit))
                if existing is None:
                    existing, _ = tokens.create(ENV_ADMIN_TOKEN_NAME, [Scope.ADMIN.value], created_by="maas",
                                                raw=explicit)
                elif not _is_admin(existing):
                    raise Conflict("MAAS_ADMIN_TOKEN is a token that is revoked or not an unrestricted "
                                   "admin token; choose another secret", field="MAAS_ADMIN_TOKEN")
                # Rotating MAAS_ADMIN_TOKEN retires the secret it replaces: only the current one stays live.
                for token in self.registry.list_tokens():
                    if (token.name == ENV_ADMIN_TOKEN_NAME and token.created_by == "maas" and not token.revoked
                            and token.id != existing.id):
                        self.registry.revoke_token(token.id)
                return explicit, False
            path = self.home / ADMIN_TOKEN_FILE
            saved = self._read_token_file(path)
            if saved and _is_admin(self.registry.find_token(hash_token(saved))):
                return saved, False
            _, secret = tokens.create("admin", [Scope.ADMIN.value], created_by="maas")
            self._write_token_file(path, secret)
            return secret, True

    @staticmethod
    def _read_token_file(path: Path) -> str | None:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        with suppress(OSError):
            os.chmod(path, 0o600)
        return text or None

    def _write_token_file(self, path: Path, secret: str) -> None:
        with suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secret + "\n")
            out.flush()
            os.fsync(out.fileno())
        dir_fd = os.open(self.home, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        self._sqlite.close()
        if self._server_lock is not None:
            os.close(self._server_lock)  # releases the server lock
            self._server_lock = None

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["ADMIN_TOKEN_FILE", "ENV_ADMIN_TOKEN_NAME", "LocalBackend"]
