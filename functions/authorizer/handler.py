"""API Gateway TOKEN authorizer: a request without a live maas token never reaches a function.

API Gateway calls this with the ``Authorization`` header (after its own regex check of the header's
shape) and caches the answer per header value for the stage's TTL, so a burst of requests costs one
registry read. The policy allows the whole API, not just ``methodArn``: a cached answer is reused for
every route, and scope checks (admin/deploy/invoke, model restrictions) stay in the functions, which
authenticate the token again (through a 5 s cache) and therefore see a revocation within seconds even
while this authorizer's answer is still cached.

Answers: a policy (allowed), or the exception message ``Unauthorized``, which API Gateway turns into a
401 without calling the function. Any other failure (a registry outage) becomes API Gateway's 500: the
request is refused either way."""

from __future__ import annotations

from typing import Any

from maas.backends.aws import AwsBackend
from maas.backends.aws.telemetry import get_logger
from maas.errors import Unauthorized
from maas.services.tokens import TokenCache, TokenService
from maas.settings import Settings

SERVICE = "maas-authorizer"
logger = get_logger(SERVICE)

backend = AwsBackend.from_env(Settings.from_env())
tokens = TokenCache(TokenService(backend.registry))


class Denied(Exception):
    """Raised with the exact message API Gateway maps to a 401."""

    def __init__(self) -> None:
        super().__init__("Unauthorized")


def api_arn(method_arn: str) -> str:
    """``arn:aws:execute-api:<region>:<account>:<api>/<stage>/<METHOD>/<path>`` -> every method and path
    of the same API and stage."""
    api, _, rest = method_arn.partition("/")
    stage = rest.split("/", 1)[0]
    if not api.startswith("arn:") or not stage:
        raise Denied()
    return f"{api}/{stage}/*/*"


def policy(principal: str, resource: str, context: dict[str, str]) -> dict[str, Any]:
    return {
        "principalId": principal,
        "policyDocument": {
            "Version": "2012-10-17",
            "Statement": [{"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": resource}],
        },
        "context": context,
    }


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    header = event.get("authorizationToken")
    method_arn = event.get("methodArn")
    if not isinstance(header, str) or not isinstance(method_arn, str):
        raise Denied()
    try:
        token = tokens.authenticate(header)
    except Unauthorized:
        logger.info("token refused")
        raise Denied() from None
    return policy(token.id, api_arn(method_arn), {
        "tokenId": token.id,
        "scopes": ",".join(scope.value for scope in token.scopes),
        "model": token.model or "",
    })
