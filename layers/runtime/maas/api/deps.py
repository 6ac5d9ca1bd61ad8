"""Dependencies: the service container and the auth checks, as ``Annotated`` types for the routes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from maas.api.metrics import PrometheusMetrics
from maas.domain import Scope, Token
from maas.domain.names import ALIAS_NAME, MODEL_NAME
from maas.errors import Unauthorized
from maas.inference.engine import InferenceEngine
from maas.ports import Backend
from maas.services.aliases import AliasService
from maas.services.deployments import DeploymentService
from maas.services.models import ModelService
from maas.services.serving import ServingResolver
from maas.services.tokens import TokenService
from maas.settings import Settings


class TokenCache:
    """Bearer tokens resolved in the last few seconds, so the inference path skips the registry.
    Revocations through this process evict at once; elsewhere they apply within ``ttl_s``."""

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
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[authorization] = (now + self._ttl, token)
        return token

    def forget(self, token: Token) -> None:
        with self._lock:
            for key in [k for k, (_, t) in self._cache.items() if t.id == token.id]:
                self._cache.pop(key, None)


@dataclass
class Services:
    backend: Backend
    settings: Settings
    models: ModelService
    aliases: AliasService
    deployments: DeploymentService
    tokens: TokenService
    auth: TokenCache
    resolver: ServingResolver
    engine: InferenceEngine
    metrics: PrometheusMetrics


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
bearer = HTTPBearer(auto_error=False, description="A maas token: `Authorization: Bearer maas_...`")


def require(scope: Scope) -> Callable[..., Token]:
    """A dependency checking the caller's token has ``scope`` (for the path's model, if any)."""

    def check(request: Request, services: ServicesDep,
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Token:
        # ``credentials`` only declares the scheme in OpenAPI; the raw header gives precise errors.
        token = services.auth.authenticate(request.headers.get("authorization"))
        return TokenService.require(token, scope, request.path_params.get("name"))

    check.__name__ = f"require_{scope.value}"
    return check


Invoker = Annotated[Token, Depends(require(Scope.INVOKE))]
Deployer = Annotated[Token, Depends(require(Scope.DEPLOY))]
Admin = Annotated[Token, Depends(require(Scope.ADMIN))]

ModelName = Annotated[str, Path(pattern=f"^{MODEL_NAME.pattern}$", max_length=63,
                                description="Model name: lowercase letters, digits, '-'")]
AliasName = Annotated[str, Path(pattern=f"^{ALIAS_NAME.pattern}$", max_length=63)]
VersionNumber = Annotated[int, Path(ge=1, le=999_999_999, description="Version number")]
VersionRef = Annotated[str, Path(pattern=r"^([1-9][0-9]{0,8}|[a-z][a-z0-9-]{0,62})$",
                                 description="Version number or alias")]
