"""The local stack's pieces on their own: IAM evaluation and the ARNs a request needs, intrinsic
functions, EMF extraction, and the API front's routing, authorizer and limits (with stand-in pools)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from infra.local.cloudwatch import metric_data
from infra.local.functions import InvokeResult, image_task_root
from infra.local.gateway import MAX_REQUEST_BYTES, RestApi
from infra.local.iam import dynamodb_permissions, evaluate, required
from infra.local.template import Assembly, Physical, Resolver, Unresolvable

TABLE = "arn:aws:dynamodb:us-east-1:123456789012:table/t"


# -- IAM --------------------------------------------------------------------------------------------


def test_iam_allows_what_a_statement_grants_and_an_explicit_deny_wins() -> None:
    grant = {"Statement": [{"Effect": "Allow", "Action": ["dynamodb:GetItem", "s3:Get*"],
                            "Resource": [TABLE, "arn:aws:s3:::b/models/*"]}]}
    assert evaluate([grant], "dynamodb:GetItem", TABLE)
    assert evaluate([grant], "DynamoDB:getitem", TABLE)  # actions are case-insensitive
    assert not evaluate([grant], "dynamodb:PutItem", TABLE)
    assert not evaluate([grant], "dynamodb:GetItem", TABLE + "/index/gsi1")
    assert evaluate([grant], "s3:GetObjectVersion", "arn:aws:s3:::b/models/m/1/model.onnx")
    assert not evaluate([grant], "s3:GetObject", "arn:aws:s3:::b/uploads/x")
    deny = {"Statement": {"Effect": "Deny", "Action": "s3:*", "Resource": "*"}}
    assert not evaluate([grant, deny], "s3:GetObject", "arn:aws:s3:::b/models/x")
    assert not evaluate([], "dynamodb:GetItem", TABLE)


def test_iam_conditions_must_hold_and_a_missing_key_fails_them() -> None:
    listing = {"Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::b",
                              "Condition": {"StringLike": {"s3:prefix": ["models/*"]}}}]}
    assert evaluate([listing], "s3:ListBucket", "arn:aws:s3:::b", {"s3:prefix": "models/m/1/"})
    assert not evaluate([listing], "s3:ListBucket", "arn:aws:s3:::b", {"s3:prefix": "uploads/"})
    assert not evaluate([listing], "s3:ListBucket", "arn:aws:s3:::b")


def test_a_transaction_needs_each_items_action_on_its_table() -> None:
    body = {"TransactItems": [{"Put": {"TableName": "t"}}, {"ConditionCheck": {"TableName": "t"}},
                              {"Update": {"TableName": "u"}}]}
    assert dynamodb_permissions("TransactWriteItems", body) == [
        ("dynamodb:PutItem", TABLE), ("dynamodb:ConditionCheckItem", TABLE),
        ("dynamodb:UpdateItem", "arn:aws:dynamodb:us-east-1:123456789012:table/u")]
    assert dynamodb_permissions("Query", {"TableName": "t", "IndexName": "gsi1"}) == [
        ("dynamodb:Query", TABLE + "/index/gsi1")]


def test_s3_requests_need_the_key_arns_aws_evaluates() -> None:
    def needs(method: str, uri: str, action: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Any:
        return required("s3", action, method=method, uri=uri, body=body, data={}, headers=headers or {})

    assert needs("GET", "http://h/b/models/m/1/model.onnx?versionId=v1", "GetObject")[0] == [
        ("s3:GetObjectVersion", "arn:aws:s3:::b/models/m/1/model.onnx")]
    copy = needs("PUT", "http://h/b/models/m/1/model.onnx", "PutObject",
                 headers={"x-amz-copy-source": "/b/uploads/u1?versionId=v2"})[0]
    assert copy == [("s3:PutObject", "arn:aws:s3:::b/models/m/1/model.onnx"),
                    ("s3:GetObjectVersion", "arn:aws:s3:::b/uploads/u1")]
    delete = (b'<Delete><Object><Key>uploads/a</Key></Object>'
              b'<Object><Key>models/m/1/model.onnx</Key><VersionId>v9</VersionId></Object></Delete>')
    assert needs("POST", "http://h/b?delete", "DeleteObject", body=delete)[0] == [
        ("s3:DeleteObject", "arn:aws:s3:::b/uploads/a"),
        ("s3:DeleteObjectVersion", "arn:aws:s3:::b/models/m/1/model.onnx")]
    assert needs("GET", "http://h/b?list-type=2&prefix=models/", "ListBucket")[1] == {"s3:prefix": "models/"}


# -- the template -----------------------------------------------------------------------------------


def test_intrinsic_functions_resolve_against_the_local_resources() -> None:
    resolver = Resolver("maas-dev", {"Table": Physical("t", {"Arn": TABLE})})
    value = {"Fn::Join": ["", [{"Fn::GetAtt": ["Table", "Arn"]}, "/index/", {"Fn::Select": [1, {"Fn::Split": [
        ":", "a:gsi1:b"]}]}]]}
    assert resolver.resolve(value, "x") == TABLE + "/index/gsi1"
    assert resolver.resolve({"Fn::Sub": "${AWS::Region}/${Table}/${Table.Arn}"}, "x") == f"us-east-1/t/{TABLE}"
    assert resolver.resolve({"Fn::Sub": ["${A}-${AWS::AccountId}", {"A": {"Ref": "Table"}}]}, "x") == "t-123456789012"
    with pytest.raises(Unresolvable, match="Ref Missing"):
        resolver.resolve({"Ref": "Missing"}, "x")
    with pytest.raises(Unresolvable, match="Fn::If"):
        resolver.resolve({"Fn::If": ["c", 1, 2]}, "x")


def test_an_image_function_runs_from_its_dockerfiles_copy_steps(tmp_path: Path) -> None:
    context = tmp_path / "context"
    (context / "pkg" / "maas").mkdir(parents=True)
    (context / "pkg" / "maas" / "__init__.py").write_text("")
    (context / "fn").mkdir()
    (context / "fn" / "handler.py").write_text("def handler(e, c): return e\n")
    (context / "Dockerfile").write_text(
        "FROM public.ecr.aws/lambda/python:3.12\nCOPY requirements.txt /tmp/requirements.txt\n"
        "RUN pip install -r /tmp/requirements.txt \\\n    --target ${LAMBDA_TASK_ROOT}\n"
        "COPY pkg/maas/ ${LAMBDA_TASK_ROOT}/maas/\nCOPY fn/handler.py ${LAMBDA_TASK_ROOT}/handler.py\n"
        'CMD ["handler.handler"]\n')
    root, handler = image_task_root(context, "Dockerfile", tmp_path / "out")
    assert handler == "handler.handler"
    assert (root / "handler.py").is_file() and (root / "maas" / "__init__.py").is_file()
    assert not (root / "tmp").exists()  # only COPY steps into the task root


# -- CloudWatch -------------------------------------------------------------------------------------


def test_emf_lines_become_one_datum_per_dimension_set_and_value() -> None:
    line = json.dumps({"_aws": {"Timestamp": 1_700_000_000_000, "CloudWatchMetrics": [{
        "Namespace": "maas", "Dimensions": [["model", "version"], ["model"]],
        "Metrics": [{"Name": "Invocations", "Unit": "Count"}, {"Name": "ModelLatency", "Unit": "Milliseconds"}]}]},
        "model": "m", "version": "2", "Invocations": 1, "ModelLatency": [1.5, 2.5]})
    data = metric_data(line)
    assert len(data) == 6 and {namespace for namespace, _ in data} == {"maas"}
    latencies = [d for _, d in data if d["MetricName"] == "ModelLatency" and len(d["Dimensions"]) == 2]
    assert [d["Value"] for d in latencies] == [1.5, 2.5]
    assert latencies[0]["Dimensions"] == [{"Name": "model", "Value": "m"}, {"Name": "version", "Value": "2"}]
    assert metric_data('{"level": "INFO"}') == [] and metric_data("START RequestId: x") == []


# -- the API front ----------------------------------------------------------------------------------


class Pool:
    """A function stand-in: records events, answers with ``answer(event)``."""

    def __init__(self, answer: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self.answer = answer

    def invoke(self, event: dict[str, Any]) -> InvokeResult:
        self.events.append(event)
        result = self.answer(event)
        return result if isinstance(result, InvokeResult) else InvokeResult(payload=json.dumps(result).encode())


API_ARN = "arn:aws:lambda:us-east-1:123456789012:function:api"
INFERENCE_ARN = "arn:aws:lambda:us-east-1:123456789012:function:inference"
AUTHORIZER_ARN = "arn:aws:lambda:us-east-1:123456789012:function:authorizer"


def _method(resource: Any, http_method: str, function: str, authorized: bool = True) -> dict[str, Any]:
    return {"Type": "AWS::ApiGateway::Method", "Properties": {
        "HttpMethod": http_method, "ResourceId": resource, "AuthorizationType": "CUSTOM" if authorized else "NONE",
        "AuthorizerId": {"Ref": "Authorizer"}, "RestApiId": {"Ref": "Api"},
        "Integration": {"Type": "AWS_PROXY", "IntegrationHttpMethod": "POST", "Uri": (
            f"arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions/{function}/invocations")}}}


def _permission(function: str, source: str) -> dict[str, Any]:
    return {"Type": "AWS::Lambda::Permission", "Properties": {
        "Action": "lambda:InvokeFunction", "FunctionName": function, "Principal": "apigateway.amazonaws.com",
        "SourceArn": f"arn:aws:execute-api:us-east-1:123456789012:local/{source}"}}


def rest_api(pools: dict[str, Pool], binary: list[str] | None = None, ttl: int = 300) -> RestApi:
    root = {"Fn::GetAtt": ["Api", "RootResourceId"]}
    resources = {
        "Api": {"Type": "AWS::ApiGateway::RestApi", "Properties": {"BinaryMediaTypes": binary or ["*/*"]}},
        "Stage": {"Type": "AWS::ApiGateway::Stage", "Properties": {"StageName": "dev", "MethodSettings": [
            {"ThrottlingRateLimit": 1000, "ThrottlingBurstLimit": 1000}]}},
        "Authorizer": {"Type": "AWS::ApiGateway::Authorizer", "Properties": {
            "Type": "TOKEN", "IdentitySource": "method.request.header.Authorization",
            "IdentityValidationExpression": "^Bearer maas_[a-z]+$", "AuthorizerResultTtlInSeconds": ttl,
            "AuthorizerUri": f"arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions/{AUTHORIZER_ARN}"
                             "/invocations"}},
        "Proxy": {"Type": "AWS::ApiGateway::Resource", "Properties": {"ParentId": root, "PathPart": "{proxy+}"}},
        "V2": {"Type": "AWS::ApiGateway::Resource", "Properties": {"ParentId": root, "PathPart": "v2"}},
        "V2Proxy": {"Type": "AWS::ApiGateway::Resource", "Properties": {"ParentId": {"Ref": "V2"},
                                                                         "PathPart": "{proxy+}"}},
        "Health": {"Type": "AWS::ApiGateway::Resource", "Properties": {"ParentId": {"Ref": "V2"},
                                                                        "PathPart": "health"}},
        "Live": {"Type": "AWS::ApiGateway::Resource", "Properties": {"ParentId": {"Ref": "Health"},
                                                                      "PathPart": "live"}},
        "ProxyAny": _method({"Ref": "Proxy"}, "ANY", API_ARN),
        "V2ProxyAny": _method({"Ref": "V2Proxy"}, "ANY", INFERENCE_ARN),
        "LiveGet": _method({"Ref": "Live"}, "GET", INFERENCE_ARN, authorized=False),
        "P1": _permission(API_ARN, "dev/*/*"),
        "P2": _permission(INFERENCE_ARN, "dev/*/v2/*"),
        "P3": _permission(AUTHORIZER_ARN, "authorizers/Authorizer"),
    }
    assembly = Assembly(Path("."), "maas-dev", {"Resources": resources}, {}, {})
    resolver = Resolver("maas-dev", {"Api": Physical("local"), "Authorizer": Physical("Authorizer")})
    return RestApi(assembly, resolver, pools)  # type: ignore[arg-type]


def allow(event: dict[str, Any]) -> dict[str, Any] | InvokeResult:
    if event["authorizationToken"] != "Bearer maas_good":
        return InvokeResult(error={"errorType": "Denied", "errorMessage": "Unauthorized"})
    return {"principalId": "t1", "context": {"scopes": "admin"}, "policyDocument": {"Statement": [
        {"Effect": "Allow", "Action": "execute-api:Invoke", "Resource": "arn:aws:execute-api:*:*:local/dev/*/*"}]}}


def call(api: RestApi, method: str, path: str, body: bytes | None = b"", headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, str], bytes]:
    status, pairs, content = asyncio.run(api.handle(method, path, "a=1&a=2", list((headers or {}).items()), body,
                                                    "127.0.0.1"))
    return status, dict(pairs), content


def test_routes_prefer_literal_paths_and_the_authorizer_answer_is_cached() -> None:
    echo = {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": "{}"}
    pools = {API_ARN: Pool(lambda e: echo), INFERENCE_ARN: Pool(lambda e: echo), AUTHORIZER_ARN: Pool(allow)}
    api = rest_api(pools)
    good = {"Authorization": "Bearer maas_good"}
    assert call(api, "GET", "/dev/v2/health/live")[0] == 200  # public
    assert call(api, "POST", "/dev/v2/models/m/infer", b"{}", good)[0] == 200
    assert call(api, "GET", "/dev/models", b"", good)[0] == 200
    assert [e["resource"] for e in pools[INFERENCE_ARN].events] == ["/v2/health/live", "/v2/{proxy+}"]
    (managed,) = pools[API_ARN].events
    assert managed["pathParameters"] == {"proxy": "models"}
    assert managed["multiValueQueryStringParameters"] == {"a": ["1", "2"]}
    assert managed["queryStringParameters"] == {"a": "2"}
    assert managed["requestContext"]["authorizer"] == {"principalId": "t1", "scopes": "admin"}
    assert len(pools[AUTHORIZER_ARN].events) == 1  # cached for the TTL across routes
    # refused by the regex without an invocation, by the authorizer, or for another stage
    for headers in ({}, {"Authorization": "Bearer x"}):
        assert call(api, "GET", "/dev/models", b"", headers)[0] == 401
    assert len(pools[AUTHORIZER_ARN].events) == 1
    assert call(api, "GET", "/dev/models", b"", {"Authorization": "Bearer maas_bad"})[0] == 401
    assert call(api, "GET", "/prod/models", b"", good)[0] == 403


def test_binary_bodies_and_answers_follow_the_binary_media_types() -> None:
    payload = bytes(range(256))

    def answer(event: dict[str, Any]) -> dict[str, Any]:
        return {"statusCode": 200, "isBase64Encoded": True, "headers": {"content-type": "application/octet-stream"},
                "body": base64.b64encode(payload).decode()}

    pools = {API_ARN: Pool(answer), INFERENCE_ARN: Pool(answer), AUTHORIZER_ARN: Pool(allow)}
    good = {"Authorization": "Bearer maas_good"}
    everything = rest_api(pools)  # */*: with no Content-Type and no Accept (tritonclient)
    status, _, content = call(everything, "POST", "/dev/v2/models/m/infer", payload, good)
    assert status == 200 and content == payload
    event = pools[INFERENCE_ARN].events[-1]
    assert event["isBase64Encoded"] is True and base64.b64decode(event["body"]) == payload
    octets = rest_api(pools, binary=["application/octet-stream"])  # the old setting: base64 text comes back
    status, _, content = call(octets, "POST", "/dev/v2/models/m/infer", payload, good)
    assert status == 200 and content == base64.b64encode(payload)
    assert pools[INFERENCE_ARN].events[-1]["isBase64Encoded"] is False


def test_payload_limits_and_function_failures_are_the_gateways_answers() -> None:
    def fail(event: dict[str, Any]) -> InvokeResult:
        return InvokeResult(error={"errorType": "Boom", "errorMessage": "x"})

    pools = {API_ARN: Pool(fail), INFERENCE_ARN: Pool(lambda e: {"no": "statusCode"}), AUTHORIZER_ARN: Pool(allow)}
    api = rest_api(pools)
    good = {"Authorization": "Bearer maas_good"}
    assert call(api, "POST", "/dev/v2/models/m/infer", None, good)[0] == 413  # over MAX_REQUEST_BYTES
    assert MAX_REQUEST_BYTES == 10 * 1024 * 1024
    assert call(api, "GET", "/dev/models", b"", good)[0] == 502  # the function raised
    assert call(api, "POST", "/dev/v2/x", b"{}", good)[0] == 502  # not a proxy response
    too_large = InvokeResult(error={"errorType": "RequestEntityTooLargeException", "errorMessage": "big"})
    pools[API_ARN].answer = lambda e: too_large
    assert call(api, "GET", "/dev/models", b"", good)[0] == 413


def test_a_function_without_a_permission_for_api_gateway_is_never_invoked() -> None:
    echo = {"statusCode": 200, "body": "{}"}
    pools = {API_ARN: Pool(lambda e: echo), INFERENCE_ARN: Pool(lambda e: echo), AUTHORIZER_ARN: Pool(allow)}
    api = rest_api(pools)
    api.permissions = [p for p in api.permissions if p["FunctionName"] != API_ARN]
    assert call(api, "GET", "/dev/models", b"", {"Authorization": "Bearer maas_good"})[0] == 502
    assert pools[API_ARN].events == []
    api.permissions = [p for p in api.permissions if p["FunctionName"] != AUTHORIZER_ARN]
    assert call(api, "POST", "/dev/v2/m", b"{}", {"Authorization": "Bearer maas_other"})[0] == 500
