"""API tokens: creation, hashing, lookup and scope checks.

Tokens are random 256-bit secrets shown once; only their sha256 is stored, so a leaked registry
does not leak credentials. sha256 (not a slow KDF) is right here because the secrets are random."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from collections.abc import Iterable

from maas.domain import Scope, Token, check_model_name, check_token_name
from maas.errors import Forbidden, InvalidInput, Unauthorized
from maas.ports import Registry

TOKEN_PREFIX = "maas_"


def new_token_value() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def parse_scopes(scopes: Iterable[str]) -> tuple[Scope, ...]:
    parsed: list[Scope] = []
    for index, scope in enumerate(scopes):
        try:
            parsed.append(Scope(scope))
        except ValueError:
            raise InvalidInput(
                f"unknown scope {scope!r}; use admin, deploy or invoke", field=f"scopes[{index}]"
            ) from None
    if not parsed:
        raise InvalidInput("at least one scope is required", field="scopes")
    return tuple(dict.fromkeys(parsed))


class TokenService:
    def __init__(self, registry: Registry):
        self._registry = registry

    def create(self, name: str, scopes: Iterable[str], *, model: str | None = None, created_by: str = "",
               raw: str | None = None) -> tuple[Token, str]:
        """Create a token; returns the record and the secret (the only time it is visible)."""
        check_token_name(name)
        if model is not None:
            check_model_name(model, field="model")
        if raw is not None and (not raw.startswith(TOKEN_PREFIX) or len(raw) < len(TOKEN_PREFIX) + 32):
            raise InvalidInput(f"a token must start with {TOKEN_PREFIX!r} and hold at least 32 random "
                               "characters after it", field="token")
        secret = raw or new_token_value()
        token = Token(
            id=uuid.uuid4().hex[:16],
            name=name,
            token_hash=hash_token(secret),
            scopes=parse_scopes(scopes),
            model=model,
            created_by=created_by,
        )
        return self._registry.create_token(token), secret

    def authenticate(self, authorization: str | None) -> Token:
        """Resolve an ``Authorization: Bearer ...`` header to a live token."""
        if not authorization:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if not hmac.compare_digest(scheme.lower().encode(), b"bearer") or not value:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        token = self._registry.find_token(hash_token(value))
        if token is None or token.revoked:
            raise Unauthorized("the token is unknown or revoked")
        return token

    @staticmethod
    def require(token: Token, scope: Scope, model: str | None = None) -> Token:
        if not token.allows(scope, model):
            where = f" on model {model!r}" if model and token.model else ""
            raise Forbidden(f"this token lacks the {scope.value!r} scope{where}")
        return token


class TokenCache:
    """Bearer tokens resolved in the last few seconds, so the inference path skips the registry.

    Shared by every transport (the FastAPI app, the inference Lambda): a registry read per request
    would cost more than the model for small models. Revocations through this process evict at once
    (``forget``); elsewhere they apply within ``ttl_s``. Failed lookups are never cached, so a
    brand-new token works on its first request."""

    #: bound on remembered headers: a flood of random tokens must not grow memory without limit
    MAX_ENTRIES = 10_000

    def __init__(self, tokens: TokenService, ttl_s: float = 5.0):
        self._tokens = tokens
        self._ttl = ttl_s
        self._cache: dict[str, tuple[float, Token]] = {}
        self._lock = threading.Lock()

    def authenticate(self, authorization: str | None) -> Token:
        if authorization is None:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        now = time.monotonic()
        hit = self._cache.get(authorization)
        if hit is not None and hit[0] > now:
            return hit[1]
        token = self._tokens.authenticate(authorization)
        with self._lock:
            if len(self._cache) > self.MAX_ENTRIES:
                self._cache.clear()
            self._cache[authorization] = (now + self._ttl, token)
        return token

    def forget(self, token: Token) -> None:
        with self._lock:
            for key in [k for k, (_, t) in self._cache.items() if t.id == token.id]:
                self._cache.pop(key, None)
