"""IAM, enforced on every request a local function makes to moto.

moto authenticates a request's signature against the access keys it issued (``sts:AssumeRole`` of a
template role), but for most services it checks the action against the resource ``*`` only, and it
treats an unmet condition as an explicit deny. Least-privilege statements (one table and its index,
one state machine, ``endpoint/maas-dev-*``, ``models/*`` keys) would then all be refused. So the local
stack replaces the authorization step: each request becomes the IAM actions and resource ARNs AWS
would evaluate (a DynamoDB transaction: one action per item; an S3 copy: read the source, write the
target), and the role's identity policies are evaluated the way IAM does (explicit deny wins, an
allow needs a matching action, resource and conditions). Every decision is recorded in ``Audit``."""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from infra.local.template import ACCOUNT, PARTITION, REGION

Permission = tuple[str, str]  # (service:Action, resource ARN)


@dataclass(frozen=True)
class Decision:
    principal: str
    action: str
    resource: str
    allowed: bool


class Audit:
    """The last decisions (newest last), for ``/_local/iam`` and the tests."""

    def __init__(self, size: int = 2000) -> None:
        self._decisions: deque[Decision] = deque(maxlen=size)
        self._lock = threading.Lock()

    def record(self, decision: Decision) -> None:
        with self._lock:
            self._decisions.append(decision)

    def decisions(self) -> list[Decision]:
        with self._lock:
            return list(self._decisions)

    def denied(self) -> list[Decision]:
        return [d for d in self.decisions() if not d.allowed]


# -- policy evaluation ------------------------------------------------------------------------------


def _pattern(text: str, *, case: bool) -> re.Pattern[str]:
    parts = (re.escape(part) for part in text.split("*"))
    return re.compile("^" + ".*".join(parts).replace(r"\?", ".") + "$", 0 if case else re.IGNORECASE)


def _matches(patterns: Any, value: str, *, case: bool) -> bool:
    items = patterns if isinstance(patterns, list) else [patterns]
    return any(_pattern(str(item), case=case).match(value) for item in items)


def _condition_holds(conditions: Mapping[str, Mapping[str, Any]], context: Mapping[str, str]) -> bool:
    """StringEquals/StringLike/ArnEquals/ArnLike (what the maas template uses); a key the request does
    not carry fails the condition, as in IAM."""
    for operator, tests in conditions.items():
        for key, expected in tests.items():
            actual = context.get(key.lower())
            if actual is None:
                return False
            wanted = expected if isinstance(expected, list) else [expected]
            if operator in ("StringEquals", "ArnEquals"):
                if actual not in [str(w) for w in wanted]:
                    return False
            elif operator in ("StringLike", "ArnLike"):
                if not _matches(wanted, actual, case=True):
                    return False
            else:
                return False  # an operator the local stack does not evaluate never grants
    return True


def _statements(document: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    statements = document.get("Statement", [])
    yield from statements if isinstance(statements, list) else [statements]


def evaluate(documents: Iterable[Mapping[str, Any]], action: str, resource: str,
             context: Mapping[str, str] | None = None) -> bool:
    """IAM's identity-policy logic for one (action, resource): an explicit deny wins, else any allow."""
    context = {k.lower(): v for k, v in (context or {}).items()}
    allowed = False
    for document in documents:
        for statement in _statements(document):
            if "Action" in statement:
                if not _matches(statement["Action"], action, case=False):
                    continue
            elif _matches(statement.get("NotAction", []), action, case=False):
                continue
            if "Resource" in statement:
                if not _matches(statement["Resource"], resource, case=True):
                    continue
            elif "NotResource" in statement and _matches(statement["NotResource"], resource, case=True):
                continue
            if "Condition" in statement and not _condition_holds(statement["Condition"], context):
                continue
            if statement.get("Effect") == "Deny":
                return False
            allowed = True
    return allowed


# -- what a request needs ---------------------------------------------------------------------------


def _arn(service: str, resource: str) -> str:
    return f"arn:{PARTITION}:{service}:{REGION}:{ACCOUNT}:{resource}"


def _table(name: str) -> str:
    return name if name.startswith("arn:") else _arn("dynamodb", f"table/{name}")


_DYNAMODB_ITEM_ACTIONS = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                          "ConditionCheck": "ConditionCheckItem", "Get": "GetItem"}


def dynamodb_permissions(action: str, body: Mapping[str, Any]) -> list[Permission]:
    if action in ("TransactWriteItems", "TransactGetItems"):
        needed = []
        for item in body.get("TransactItems", []):
            ((kind, spec),) = item.items()
            needed.append((f"dynamodb:{_DYNAMODB_ITEM_ACTIONS[kind]}", _table(spec["TableName"])))
        return needed
    if action in ("BatchWriteItem", "BatchGetItem"):
        return [(f"dynamodb:{action}", _table(name)) for name in body.get("RequestItems", {})]
    table = body.get("TableName")
    if not table:
        return [(f"dynamodb:{action}", "*")]
    resource = _table(table)
    if body.get("IndexName"):
        resource += f"/index/{body['IndexName']}"
    return [(f"dynamodb:{action}", resource)]


def states_permissions(action: str, body: Mapping[str, Any]) -> list[Permission]:
    arn = body.get("executionArn") or body.get("stateMachineArn") or "*"
    return [(f"states:{action}", arn)]


def sagemaker_permissions(action: str, body: Mapping[str, Any], path: str) -> list[Permission]:
    if action == "InvokeEndpoint":  # sagemaker-runtime: POST /endpoints/<name>/invocations
        name = unquote(path.split("/")[2]) if path.count("/") >= 3 else "*"
        return [("sagemaker:InvokeEndpoint", _arn("sagemaker", f"endpoint/{name.lower()}"))]
    for field, kind in (("EndpointName", "endpoint"), ("EndpointConfigName", "endpoint-config"),
                        ("ModelName", "model")):
        value = body.get(field)
        if isinstance(value, str):
            return [(f"sagemaker:{action}", _arn("sagemaker", f"{kind}/{value.lower()}"))]
    return [(f"sagemaker:{action}", "*")]


def logs_permissions(action: str, body: Mapping[str, Any]) -> list[Permission]:
    group = body.get("logGroupName")
    if not group:
        return [(f"logs:{action}", "*")]
    resource = _arn("logs", f"log-group:{group}")
    stream = body.get("logStreamName")
    return [(f"logs:{action}", f"{resource}:log-stream:{stream}" if stream else f"{resource}:*")]


def cloudwatch_permissions(action: str, body: Mapping[str, Any]) -> list[Permission]:
    names = [value for key, value in body.items() if re.fullmatch(r"AlarmNames\.member\.\d+", key)]
    names += list(body.get("AlarmNames", []) or [])
    if action == "DescribeAlarms" and names:
        return [(f"cloudwatch:{action}", _arn("cloudwatch", f"alarm:{name}")) for name in names]
    return [(f"cloudwatch:{action}", "*")]


def sns_permissions(action: str, body: Mapping[str, Any]) -> list[Permission]:
    return [(f"sns:{action}", str(body.get("TopicArn") or "*"))]


_S3_OBJECT_READS = {"GetObject", "GetObjectVersion"}


def _deleted_objects(body: bytes) -> list[tuple[str, str | None]]:
    """The (key, version id) pairs of a ``DeleteObjects`` request body."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return []
    found = []
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "Object":
            continue
        values = {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in element}
        found.append((values.get("Key", ""), values.get("VersionId")))
    return found


def s3_permissions(action: str, path: str, query: Mapping[str, list[str]],
                   headers: Mapping[str, str], body: bytes = b"") -> tuple[list[Permission], dict[str, str]]:
    """Path-style requests (the local endpoint is an IP address): ``/<bucket>[/<key>]``."""
    bucket, _, key = path.lstrip("/").partition("/")
    key = unquote(key)
    context: dict[str, str] = {}
    if not key and "delete" in query:  # DeleteObjects: the rights of one delete per object
        return [("s3:DeleteObjectVersion" if version else "s3:DeleteObject", f"arn:{PARTITION}:s3:::{bucket}/{name}")
                for name, version in _deleted_objects(body)], context
    if "prefix" in query:
        context["s3:prefix"] = query["prefix"][0]
    if action in ("GetObject",) and "versionId" in query:
        action = "GetObjectVersion"
    resource = f"arn:{PARTITION}:s3:::{bucket}/{key}" if key else f"arn:{PARTITION}:s3:::{bucket}"
    needed = [(f"s3:{action}", resource)]
    source = headers.get("x-amz-copy-source") or headers.get("X-Amz-Copy-Source")
    if source:
        source_path, _, source_query = unquote(source).lstrip("/").partition("?")
        read = "GetObjectVersion" if "versionId=" in source_query else "GetObject"
        needed.append((f"s3:{read}", f"arn:{PARTITION}:s3:::{source_path}"))
    return needed, context


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def required(service: str, action: str, *, method: str, uri: str, body: bytes, data: Mapping[str, Any],
             headers: Mapping[str, str]) -> tuple[list[Permission], dict[str, str]]:
    """The (action, resource) pairs AWS evaluates for this request, and its condition keys."""
    parsed = urlparse(uri)
    if service == "s3":
        return s3_permissions(action, parsed.path, parse_qs(parsed.query, keep_blank_values=True), headers, body)
    params: dict[str, Any] = {**{k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in data.items()},
                              **_json_body(body)}
    if service == "dynamodb":
        return dynamodb_permissions(action, params), {}
    if service == "states":
        return states_permissions(action, params), {}
    if service == "sagemaker":
        return sagemaker_permissions(action, params, parsed.path), {}
    if service == "logs":
        return logs_permissions(action, params), {}
    if service == "monitoring":
        namespace = params.get("Namespace")
        return ([(p.replace("monitoring:", "cloudwatch:"), r) for p, r in cloudwatch_permissions(action, params)],
                {"cloudwatch:namespace": namespace} if isinstance(namespace, str) else {})
    if service == "sns":
        return sns_permissions(action, params), {}
    if service == "lambda" and action == "Invoke":  # POST /2015-03-31/functions/<name or arn>/invocations
        name = unquote(parsed.path.rstrip("/").rsplit("/", 2)[-2])
        arn = name if name.startswith("arn:") else _arn("lambda", f"function:{name}")
        return [("lambda:InvokeFunction", arn)], {}
    return [(f"{service}:{action}", "*")], {}


# -- the patch into moto ----------------------------------------------------------------------------


@contextmanager
def enforced(audit: Audit, operators: Callable[[], set[str]],
             service_principals: Mapping[str, Callable[[], tuple[str, list[dict[str, Any]]]]] | None = None,
             ) -> Iterator[None]:
    """While active, every request moto serves is authenticated (signature and access key) and then
    authorized by ``evaluate`` against the caller's policies. Callers in ``operators()`` (the local
    stack's own setup user) are allowed everything, like an account administrator.
    ``service_principals`` maps an access key id that moto's own services sign with (its Step
    Functions interpreter calling Lambda) to the role AWS would use (the state machine's)."""
    services = dict(service_principals or {})
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    original = ActionAuthenticatorMixin._authenticate_and_authorize_action

    def authorize(self: Any, iam_request_cls: type, resource: str = "*") -> None:
        from moto.iam.access_control import create_access_key

        parsed = urlparse(self.uri)
        query = parse_qs(parsed.query, keep_blank_values=True)
        path = self.raw_path + (f"?{parsed.query}" if parsed.query else "")
        request = None
        key_id = _key_id(self.headers.get("Authorization", ""))
        if key_id in services:
            principal, documents = services[key_id]()
            needed, context = required(_service(self.headers), self._get_action(), method=self.method, uri=self.uri,
                                       body=self.raw_body or b"", data=self.data or {}, headers=dict(self.headers))
            try:
                _check(audit, principal, documents, needed, context, iam_request_cls)
            except _Refused as refused:
                raise _denied(iam_request_cls, principal, refused.action) from None
            return
        if "Authorization" in self.headers:
            request = iam_request_cls(account_id=self.current_account, method=self.method, path=path,
                                      data=self.data, body=self.raw_body, headers=self.headers,
                                      action=self._get_action())
            request.check_signature()
            access_key, service = request._access_key, request._service
        else:
            # a presigned URL: the signer's credentials are in the query string (moto checks the
            # signature of presigned S3 requests itself); the signer's rights apply at use, as on AWS
            credential = query.get("X-Amz-Credential", [""])[0].split("/")
            if len(credential) < 4:
                raise _denied(iam_request_cls, "anonymous", self._get_action())
            token = query.get("X-Amz-Security-Token", [None])[0]
            access_key = create_access_key(self.current_account, PARTITION, credential[0],
                                           {"X-Amz-Security-Token": token} if token else {})
            service = credential[3]
        principal = access_key.arn
        if principal in operators():
            return
        action = self._get_action()
        needed, context = required(service, action, method=self.method, uri=self.uri, body=self.raw_body or b"",
                                   data=self.data or {}, headers=dict(self.headers))
        documents = [_document(policy) for policy in access_key.collect_policies()]
        try:
            _check(audit, principal, documents, needed, context, iam_request_cls)
        except _Refused as refused:
            if request is not None:
                request._action = refused.action
                request._raise_access_denied()
            raise _denied(iam_request_cls, principal, refused.action) from None

    ActionAuthenticatorMixin._authenticate_and_authorize_action = authorize  # type: ignore[method-assign]
    previous = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = previous
        ActionAuthenticatorMixin._authenticate_and_authorize_action = original  # type: ignore[method-assign]


class _Refused(Exception):
    def __init__(self, action: str) -> None:
        super().__init__(action)
        self.action = action


def _check(audit: Audit, principal: str, documents: list[dict[str, Any]], needed: list[Permission],
           context: Mapping[str, str], iam_request_cls: type) -> None:
    for action, resource in needed:
        allowed = evaluate(documents, action, resource, context)
        audit.record(Decision(principal, action, resource, allowed))
        if not allowed:
            raise _Refused(action)


def _key_id(authorization: str) -> str:
    match = re.search(r"Credential=([^/]+)/", authorization)
    return match.group(1) if match else ""


def _service(headers: Mapping[str, str]) -> str:
    match = re.search(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/", headers.get("Authorization", ""))
    return match.group(1) if match else ""


def _denied(iam_request_cls: type, principal: str, action: str) -> Exception:
    from moto.core.exceptions import AccessDeniedError
    from moto.iam.access_control import S3IAMRequest
    from moto.s3.exceptions import S3AccessDeniedError

    return S3AccessDeniedError() if iam_request_cls is S3IAMRequest else AccessDeniedError(
        user_arn=principal, action=action)


def _document(policy: Any) -> dict[str, Any]:
    from moto.iam.access_control import IAMPolicy

    document: dict[str, Any] = IAMPolicy(policy)._policy_json
    return document
