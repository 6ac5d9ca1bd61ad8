"""Token administration (admin scope)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from maas.api.deps import Admin, ServicesDep
from maas.api.idempotency import IdempotentRoute, secret_fields
from maas.api.schemas import CreatedToken, CreateToken, TokenInfo, TokenList, problem_responses
from maas.domain import Token

router = APIRouter(tags=["tokens"], route_class=IdempotentRoute)  # Idempotency-Key (maas.api.idempotency)


def _info(token: Token) -> TokenInfo:
    return TokenInfo(id=token.id, name=token.name, scopes=list(token.scopes), model=token.model,
                     created_at=token.created_at, created_by=token.created_by, revoked=token.revoked)


@router.post("/tokens", status_code=201, response_model=CreatedToken,
             responses=problem_responses(401, 403, 415, 422))
@secret_fields("token")
def create_token(body: CreateToken, services: ServicesDep, caller: Admin) -> CreatedToken:
    token, secret = services.tokens.create(body.name, body.scopes, model=body.model, created_by=caller.name)
    return CreatedToken(**_info(token).model_dump(), token=secret)


@router.get("/tokens", response_model=TokenList, responses=problem_responses(401, 403))
def list_tokens(services: ServicesDep, _: Admin) -> TokenList:
    return TokenList(items=[_info(t) for t in services.backend.registry.list_tokens()])


@router.delete("/tokens/{token_id}", status_code=204, responses=problem_responses(401, 403, 404, 422))
def revoke_token(token_id: Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")], services: ServicesDep,
                 _: Admin) -> Response:
    revoked = services.backend.registry.revoke_token(token_id)
    services.auth.forget(revoked)
    return Response(status_code=204)
