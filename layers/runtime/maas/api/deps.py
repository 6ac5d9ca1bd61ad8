"""Dependencies: the service container and the auth checks, as ``Annotated`` types for the routes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from maas.api.metrics import PrometheusMetrics
from maas.domain import Scope, Token
from maas.domain.names import ALIAS_NAME, MODEL_NAME, VERSION_REF
from maas.inference.engine import InferenceEngine
from maas.ports import Backend
from maas.services.aliases import AliasService
from maas.services.deployments import DeploymentService
from maas.services.models import ModelService
from maas.services.optimize import OptimizeService
from maas.services.serving import ServingResolver
from maas.services.tokens import TokenCache as TokenCache  # re-exported: maas.api.app imports it from here
from maas.services.tokens import TokenService
from maas.settings import Settings


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
    optimize: OptimizeService


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
VersionRef = Annotated[str, Path(pattern=f"^({VERSION_REF.pattern})$",
                                 description="Version number or alias")]
