"""API Gateway (REST, Lambda proxy integrations) in front of the local functions, read from the
template: its resources and methods, the TOKEN authorizer with its regex and cache TTL, binary media
types, gateway responses, stage throttling, and the limits (10 MB request, 6 MB Lambda payloads, 29 s
integration timeout). What API Gateway answers on its own (a missing route, a refused token, a
timeout) is answered here the same way, with the template's gateway responses where it has them."""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from infra.local.functions import FunctionPool, InvokeResult
from infra.local.iam import evaluate
from infra.local.template import ACCOUNT, REGION, Assembly, Resolver

MAX_REQUEST_BYTES = 10 * 1024 * 1024
INTEGRATION_TIMEOUT_SECONDS = 29.0
DEFAULT_RESPONSES: dict[str, tuple[int, str]] = {
    "MISSING_AUTHENTICATION_TOKEN": (403, "Missing Authentication Token"),
    "UNAUTHORIZED": (401, "Unauthorized"),
    "ACCESS_DENIED": (403, "User is not authorized to access this resource with an explicit deny"),
    "AUTHORIZER_FAILURE": (500, "Internal server error"),
    "REQUEST_TOO_LARGE": (413, "Request Too Long"),
    "INTEGRATION_TIMEOUT": (504, "Endpoint request timed out"),
    "INTEGRATION_FAILURE": (502, "Internal server error"),
    "THROTTLED": (429, "Too Many Requests"),
    "DEFAULT_5XX": (502, "Internal server error"),
}

Response = tuple[int, list[tuple[str, str]], bytes]


@dataclass
class Method:
    resource_path: str  # the template's path, e.g. /v2/{proxy+}
    http_method: str
    function_arn: str
    authorized: bool


@dataclass
class Node:
    literal: dict[str, Node] = field(default_factory=dict)
    parameter: tuple[str, Node] | None = None
    greedy: tuple[str, Node] | None = None
    methods: dict[str, Method] = field(default_factory=dict)
    path: str = "/"


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.updated = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


def _media_type(value: str | None) -> str:
    return (value or "").split(",")[0].split(";")[0].strip().lower()


def _function_of(uri: str) -> str:
    """``arn:aws:apigateway:<region>:lambda:path/2015-03-31/functions/<function arn>/invocations``."""
    match = re.search(r"/functions/(arn:[^/]+)/invocations$", uri)
    if match is None:
        raise ValueError(f"not a Lambda proxy integration: {uri}")
    return match.group(1)


class RestApi:
    """One ``AWS::ApiGateway::RestApi`` of the template and its only stage."""

    def __init__(self, assembly: Assembly, resolver: Resolver, pools: Mapping[str, FunctionPool],
                 api_id: str = "local") -> None:
        self.api_id = api_id
        self.pools = pools
        (rest_api_id, rest_api), = assembly.of_type("AWS::ApiGateway::RestApi")
        self.binary_media_types = [t.lower() for t in rest_api.get("BinaryMediaTypes", [])]
        (_, stage), = assembly.of_type("AWS::ApiGateway::Stage")
        self.stage = stage["StageName"]
        settings: dict[str, Any] = next(iter(stage.get("MethodSettings", [])), {})
        self.throttle = TokenBucket(float(settings.get("ThrottlingRateLimit", 10_000)),
                                    int(settings.get("ThrottlingBurstLimit", 5_000)))
        self.root = Node()
        self._build_routes(assembly, resolver, rest_api_id)
        self.authorizer: dict[str, Any] | None = None
        for authorizer_id, authorizer in assembly.of_type("AWS::ApiGateway::Authorizer"):
            if authorizer.get("Type") != "TOKEN":
                raise ValueError(f"authorizer type {authorizer.get('Type')} is not emulated")
            self.authorizer = {
                "source_arn": f"arn:aws:execute-api:{REGION}:{ACCOUNT}:{api_id}/authorizers/"
                              f"{resolver.ref(authorizer_id, authorizer_id)}",
                "function": _function_of(resolver.resolve(authorizer["AuthorizerUri"], "Authorizer")),
                "header": authorizer["IdentitySource"].removeprefix("method.request.header."),
                "regex": re.compile(authorizer["IdentityValidationExpression"])
                if authorizer.get("IdentityValidationExpression") else None,
                "ttl": int(authorizer.get("AuthorizerResultTtlInSeconds", 300)),
            }
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._cache_lock = threading.Lock()
        self.authorizer_calls = 0
        self.gateway_responses: dict[str, dict[str, Any]] = {
            properties["ResponseType"]: properties for _, properties in assembly.of_type(
                "AWS::ApiGateway::GatewayResponse")}
        self.permissions = [resolver.resolve(p, "Permission") for _, p in assembly.of_type("AWS::Lambda::Permission")]

    # -- the template's routes

    def _build_routes(self, assembly: Assembly, resolver: Resolver, rest_api_id: str) -> None:
        resources = dict(assembly.of_type("AWS::ApiGateway::Resource"))
        paths: dict[str, str] = {}

        def path_of(resource_id: str) -> str:
            if resource_id in paths:
                return paths[resource_id]
            properties = resources[resource_id]
            parent = properties["ParentId"]
            parent_path = "" if "Fn::GetAtt" in parent else path_of(parent["Ref"]).rstrip("/")
            paths[resource_id] = f"{parent_path}/{properties['PathPart']}"
            return paths[resource_id]

        for _, properties in assembly.of_type("AWS::ApiGateway::Method"):
            resource = properties["ResourceId"]
            path = "/" if "Fn::GetAtt" in resource else path_of(resource["Ref"])
            integration = properties["Integration"]
            if integration.get("Type") != "AWS_PROXY":
                raise ValueError(f"integration {integration.get('Type')} of {path} is not emulated")
            method = Method(path, properties["HttpMethod"],
                            _function_of(resolver.resolve(integration["Uri"], path)),
                            properties.get("AuthorizationType") == "CUSTOM")
            node = self.root
            for part in [p for p in path.split("/") if p]:
                if part.endswith("+}"):
                    node.greedy = node.greedy or (part[1:-2], Node())
                    node = node.greedy[1]
                elif part.startswith("{"):
                    node.parameter = node.parameter or (part[1:-1], Node())
                    node = node.parameter[1]
                else:
                    node = node.literal.setdefault(part, Node())
            node.path = path
            node.methods[method.http_method] = method

    def match(self, path: str, http_method: str) -> tuple[Method, dict[str, str]] | None:
        parts = [p for p in path.split("/") if p]

        def walk(node: Node, index: int, parameters: dict[str, str]) -> tuple[Node, dict[str, str]] | None:
            if index == len(parts):
                return (node, parameters) if node.methods else None
            part = parts[index]
            if part in node.literal:
                found = walk(node.literal[part], index + 1, parameters)
                if found:
                    return found
            if node.parameter is not None:
                found = walk(node.parameter[1], index + 1, {**parameters, node.parameter[0]: part})
                if found:
                    return found
            if node.greedy is not None and node.greedy[1].methods:
                return node.greedy[1], {**parameters, node.greedy[0]: "/".join(parts[index:])}
            return None

        found = walk(self.root, 0, {})
        if found is None:
            return None
        node, parameters = found
        method = node.methods.get(http_method) or node.methods.get("ANY")
        return (method, parameters) if method else None

    # -- API Gateway's own answers

    def gateway_response(self, kind: str, request_id: str) -> Response:
        status, message = DEFAULT_RESPONSES[kind]
        body = json.dumps({"message": message}).encode()
        headers = [("content-type", "application/json")]
        custom = self.gateway_responses.get(kind)
        if custom is not None:
            status = int(custom.get("StatusCode", status))
            templates = custom.get("ResponseTemplates") or {}
            if "application/json" in templates:
                body = templates["application/json"].encode()
            headers = [(name.removeprefix("gatewayresponse.header.").lower(), value.strip("'"))
                       for name, value in (custom.get("ResponseParameters") or {}).items()] or headers
        return status, [*headers, ("x-amzn-requestid", request_id), ("x-amzn-errortype", kind)], body

    # -- the request path

    def method_arn(self, method: str, path: str) -> str:
        return f"arn:aws:execute-api:{REGION}:{ACCOUNT}:{self.api_id}/{self.stage}/{method}{path}"

    def _may_invoke(self, function_arn: str, source_arn: str, principal: str) -> bool:
        """The function's resource policy (``AWS::Lambda::Permission``) lets this caller invoke it."""
        for permission in self.permissions:
            target = str(permission.get("FunctionName", ""))
            if permission.get("Principal") != principal or target not in (function_arn,
                                                                            function_arn.rsplit(":", 1)[-1]):
                continue
            pattern = permission.get("SourceArn")
            if pattern is None or fnmatch.fnmatchcase(source_arn, pattern):
                return True
        return False

    def _authorize(self, token: str, method_arn: str, request_id: str) -> dict[str, Any] | Response:
        assert self.authorizer is not None
        now = time.monotonic()
        with self._cache_lock:
            cached = self._cache.get(token)
        if cached is None or cached[0] <= now:
            function_arn = self.authorizer["function"]
            if not self._may_invoke(function_arn, self.authorizer["source_arn"], "apigateway.amazonaws.com"):
                return self.gateway_response("AUTHORIZER_FAILURE", request_id)
            self.authorizer_calls += 1
            result = self.pools[function_arn].invoke(
                {"type": "TOKEN", "authorizationToken": token, "methodArn": method_arn})
            if result.error is not None:
                kind = "UNAUTHORIZED" if result.error.get("errorMessage") == "Unauthorized" else "AUTHORIZER_FAILURE"
                return self.gateway_response(kind, request_id)
            answer = result.json()
            with self._cache_lock:
                if self.authorizer["ttl"] > 0:
                    self._cache[token] = (now + self.authorizer["ttl"], answer)
        else:
            answer = cached[1]
        if not evaluate([answer.get("policyDocument", {})], "execute-api:Invoke", method_arn):
            return self.gateway_response("ACCESS_DENIED", request_id)
        return {"principalId": answer.get("principalId"), **(answer.get("context") or {})}

    def _is_binary(self, media_type: str) -> bool:
        return any(pattern == "*/*" or (media_type and fnmatch.fnmatchcase(media_type, pattern))
                   for pattern in self.binary_media_types)

    async def handle(self, http_method: str, raw_path: str, query: str, headers: list[tuple[str, str]],
                     body: bytes | None, source_ip: str) -> Response:
        """One request: ``body`` None means it was over API Gateway's 10 MB limit."""
        request_id = str(uuid.uuid4())
        prefix = f"/{self.stage}"
        if raw_path != prefix and not raw_path.startswith(prefix + "/"):
            return 403, [("content-type", "application/json")], b'{"message":"Forbidden"}'
        if body is None:
            return self.gateway_response("REQUEST_TOO_LARGE", request_id)
        path = raw_path[len(prefix):] or "/"
        matched = self.match(path, http_method)
        if matched is None:
            return self.gateway_response("MISSING_AUTHENTICATION_TOKEN", request_id)
        method, parameters = matched
        if not self.throttle.take():
            return self.gateway_response("THROTTLED", request_id)
        single: dict[str, str] = {}
        multi: dict[str, list[str]] = {}
        for name, value in headers:
            key = next((k for k in single if k.lower() == name.lower()), name)
            single[key] = value
            multi.setdefault(key, []).append(value)
        lookup = {k.lower(): v for k, v in single.items()}
        context: dict[str, Any] = {}
        if method.authorized and self.authorizer is not None:
            token = lookup.get(self.authorizer["header"].lower())
            regex = self.authorizer["regex"]
            if not token or (regex is not None and not regex.search(token)):
                return self.gateway_response("UNAUTHORIZED", request_id)
            authorized = await asyncio.to_thread(self._authorize, token, self.method_arn(http_method, path),
                                                 request_id)
            if isinstance(authorized, tuple):
                return authorized
            context = authorized
        source_arn = self.method_arn(http_method, method.resource_path)
        if not self._may_invoke(method.function_arn, source_arn, "apigateway.amazonaws.com"):
            return self.gateway_response("DEFAULT_5XX", request_id)
        binary = self._is_binary(_media_type(lookup.get("content-type")))
        pairs = parse_qsl(query, keep_blank_values=True)
        query_multi: dict[str, list[str]] = {}
        for name, value in pairs:
            query_multi.setdefault(name, []).append(value)
        event = {
            "resource": method.resource_path, "path": path, "httpMethod": http_method,
            "headers": single or None, "multiValueHeaders": multi or None,
            "queryStringParameters": {k: v[-1] for k, v in query_multi.items()} or None,
            "multiValueQueryStringParameters": query_multi or None,
            "pathParameters": parameters or None, "stageVariables": None,
            "requestContext": {
                "accountId": ACCOUNT, "apiId": self.api_id, "resourcePath": method.resource_path,
                "httpMethod": http_method, "path": raw_path, "stage": self.stage, "requestId": request_id,
                "requestTimeEpoch": int(time.time() * 1000), "protocol": "HTTP/1.1",
                "domainName": lookup.get("host", "127.0.0.1"),
                "identity": {"sourceIp": source_ip, "userAgent": lookup.get("user-agent")},
                **({"authorizer": context} if context else {}),
            },
            "body": (base64.b64encode(body).decode() if binary else body.decode("utf-8", "replace")) if body else None,
            "isBase64Encoded": bool(binary and body),
        }
        pool = self.pools[method.function_arn]
        try:
            result = await asyncio.wait_for(asyncio.to_thread(pool.invoke, event), INTEGRATION_TIMEOUT_SECONDS)
        except TimeoutError:
            return self.gateway_response("INTEGRATION_TIMEOUT", request_id)
        return self._proxy_response(result, lookup.get("accept"), request_id)

    def _proxy_response(self, result: InvokeResult, accept: str | None, request_id: str) -> Response:
        if result.error is not None:
            if result.error.get("errorType") == "RequestEntityTooLargeException":
                return self.gateway_response("REQUEST_TOO_LARGE", request_id)
            return self.gateway_response("DEFAULT_5XX", request_id)
        try:
            answer = result.json()
            status = int(answer["statusCode"])
        except (ValueError, KeyError, TypeError):
            return self.gateway_response("DEFAULT_5XX", request_id)  # a malformed Lambda proxy response
        headers: list[tuple[str, str]] = []
        seen = set()
        for name, values in (answer.get("multiValueHeaders") or {}).items():
            for value in values:
                headers.append((name.lower(), str(value)))
            seen.add(name.lower())
        for name, value in (answer.get("headers") or {}).items():
            if name.lower() not in seen:
                headers.append((name.lower(), str(value)))
        raw = answer.get("body") or ""
        if answer.get("isBase64Encoded") and self._is_binary(_media_type(accept)):
            body = base64.b64decode(raw)
        else:
            body = raw.encode() if isinstance(raw, str) else json.dumps(raw).encode()
        headers = [(k, v) for k, v in headers if k not in ("content-length", "transfer-encoding")]
        return status, [*headers, ("x-amzn-requestid", request_id)], body


def asgi(api: RestApi, extra: Callable[[str, str, bytes], Response | None] | None = None) -> Any:
    """The ASGI application of the front: the stage's routes, plus the local stack's own ``/_local``
    routes (``extra``)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        size = 0
        over = False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_REQUEST_BYTES:
                over = True
            elif chunk:
                chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = None if over else b"".join(chunks)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        path = scope.get("raw_path", scope["path"].encode()).decode("latin-1").split("?", 1)[0]
        response = None
        if extra is not None and path.startswith("/_local/"):
            response = await asyncio.to_thread(extra, scope["method"], path, body or b"")
        if response is None:
            client = scope.get("client") or ("127.0.0.1", 0)
            response = await api.handle(scope["method"], path, scope.get("query_string", b"").decode("latin-1"),
                                        headers, body, client[0])
        status, response_headers, content = response
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response_headers]
                    + [(b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    return app
