"""What every construct of the synthesized stack must say (intent, not hashed ids): the model store,
the functions and their least-privilege roles, API authentication on every route, the deploy state
machine built from maas.services.deploy, the SageMaker path, and the dashboard and alarms."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from aws_cdk.assertions import Match

from infra.config import DEV, PROD, stage_config
from infra.deploy_workflow import (
    CHOICE_STATE,
    FAILED_STATE,
    FAILURE_PATH,
    ROLLBACK_FAILED_STATE,
    START_STATE,
    SUCCEEDED_STATE,
    UNDO_PATH,
    UNDO_STATE,
    UNDONE_STATE,
    WAIT_STATE,
    state_name,
    state_name_of,
)
from infra.gpu import ENDPOINT_ACTIONS, ROLLBACK_ACTIONS
from maas.backends.aws.table import table_definition, time_to_live_specification
from maas.errors import InvalidInput
from maas.services.deploy import (
    DONE_PATH,
    EXECUTION_TIMEOUT_SECONDS,
    LOOP_CHOICE_AFTER,
    LOOP_START,
    MAX_TOTAL_BAKE_SECONDS,
    ROLLBACK,
    WAIT_AFTER,
    WAIT_SECONDS_PATH,
    WORKFLOW,
    StepName,
)
from maas.settings import (
    ENV_BUCKET,
    ENV_POOL_PATH,
    ENV_SAGEMAKER_IMAGE,
    ENV_SAGEMAKER_ROLE,
    ENV_STATE_MACHINE,
    ENV_TABLE,
    ENV_VALIDATION_MEMORY,
    SAGEMAKER_NAME_PREFIX,
    VALIDATION_PARENT_MB,
)
from tests.infra.conftest import Synthesized

# -- helpers ------------------------------------------------------------------------------------------


def resolve(value: Any) -> str:
    """A CloudFormation value as readable text: ``{"Ref": "X"}`` -> ``<X>``, GetAtt -> ``<X.Attr>``,
    Fn::Join concatenated."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "Ref" in value:
            return f"<{value['Ref']}>"
        if "Fn::GetAtt" in value:
            return "<{}.{}>".format(*value["Fn::GetAtt"])
        if "Fn::Join" in value:
            separator, parts = value["Fn::Join"]
            return separator.join(resolve(part) for part in parts)
    return json.dumps(value)


def statements_of(synth: Synthesized, role: Any) -> list[dict[str, Any]]:
    """Every policy statement attached to ``role`` (inline default policies)."""
    role_id = synth.logical_id(role)
    found = []
    for policy in synth.resources("AWS::IAM::Policy").values():
        if {"Ref": role_id} in policy["Properties"]["Roles"]:
            found.extend(policy["Properties"]["PolicyDocument"]["Statement"])
    return found


def actions_on(statements: list[dict[str, Any]]) -> dict[str, set[str]]:
    """action -> the resources it is allowed on (as text)."""
    allowed: dict[str, set[str]] = {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for action in actions:
            allowed.setdefault(action, set()).update(resolve(resource) for resource in resources)
    return allowed


def function_by_handler(synth: Synthesized, handler: str) -> dict[str, Any]:
    matches = [body for body in synth.resources("AWS::Lambda::Function").values()
               if body["Properties"].get("Handler") == handler]
    assert len(matches) == 1, f"{handler}: {len(matches)} functions"
    return matches[0]["Properties"]


def state_machine_definition(synth: Synthesized) -> dict[str, Any]:
    (machine,) = synth.resources("AWS::StepFunctions::StateMachine").values()
    return json.loads(resolve(machine["Properties"]["DefinitionString"]))


# -- configuration ----------------------------------------------------------------------------------


def test_stage_config_errors_name_the_context_key() -> None:
    with pytest.raises(InvalidInput) as caught:
        stage_config("dev", {"dev": {"inference_memory_mb": 64}})
    assert caught.value.field == "maas:stages.dev.inference_memory_mb"
    with pytest.raises(InvalidInput) as caught:
        stage_config("dev", {"dev": {"no_such_setting": 1}})
    assert caught.value.field == "maas:stages.dev.no_such_setting"
    with pytest.raises(InvalidInput) as caught:
        stage_config("Bad_Name")
    assert caught.value.field == "maas:stage"
    with pytest.raises(InvalidInput, match="base"):
        stage_config("qa", {"qa": {"base": "staging"}})


def test_stage_config_bases_and_overrides() -> None:
    assert stage_config("prod") == PROD and PROD.retain_data and not DEV.retain_data
    staging = stage_config("staging", {"staging": {"base": "prod", "retain_data": False, "architecture": "arm64"}})
    assert staging.name == "staging" and staging.architecture == "arm64" and not staging.retain_data
    assert staging.inference_reserved_concurrency == PROD.inference_reserved_concurrency


# -- model store --------------------------------------------------------------------------------------


def models_bucket(synth: Synthesized) -> dict[str, Any]:
    return synth.raw["Resources"][synth.logical_id(synth.stack.store.bucket)]


def test_bucket_is_versioned_encrypted_private_and_logged(dev: Synthesized) -> None:
    props = models_bucket(dev)["Properties"]
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"][
        "SSEAlgorithm"] == "AES256"
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
    assert props["LoggingConfiguration"]["DestinationBucketName"] == {
        "Ref": dev.logical_id(dev.stack.store.access_logs)}


def test_bucket_policies_deny_plain_http(dev: Synthesized) -> None:
    for bucket in (dev.stack.store.bucket, dev.stack.store.access_logs):
        bucket_id = dev.logical_id(bucket)
        policies = [p for p in dev.resources("AWS::S3::BucketPolicy").values()
                    if p["Properties"]["Bucket"] == {"Ref": bucket_id}]
        assert len(policies) == 1
        denies = [s for s in policies[0]["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
        assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} and s["Action"] == "s3:*"
                   for s in denies)


def test_bucket_lifecycle(dev: Synthesized, prod: Synthesized) -> None:
    for synth in (dev, prod):
        rules = {rule["Id"]: rule for rule in models_bucket(synth)["Properties"]["LifecycleConfiguration"]["Rules"]}
        assert rules["abort-incomplete-multipart"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
        uploads = rules["expire-uncommitted-uploads"]
        assert uploads["Prefix"] == "uploads/" and uploads["ExpirationInDays"] == synth.config.upload_expiry_days
        models = rules["keep-deleted-models"]
        assert models["Prefix"] == "models/" and "ExpirationInDays" not in models  # never expires current bytes
        assert models["NoncurrentVersionExpiration"]["NoncurrentDays"] == synth.config.noncurrent_version_days
    assert PROD.noncurrent_version_days > DEV.noncurrent_version_days


def test_table_matches_what_the_backend_writes(dev: Synthesized) -> None:
    props = dev.raw["Resources"][dev.logical_id(dev.stack.store.table)]["Properties"]
    expected = table_definition("ignored")
    assert props["KeySchema"] == expected["KeySchema"]
    assert sorted(props["AttributeDefinitions"], key=str) == sorted(expected["AttributeDefinitions"], key=str)
    (index,) = props["GlobalSecondaryIndexes"]
    (expected_index,) = expected["GlobalSecondaryIndexes"]
    assert {k: index[k] for k in ("IndexName", "KeySchema", "Projection")} == expected_index
    assert props["BillingMode"] == expected["BillingMode"] == "PAY_PER_REQUEST"
    assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert props["SSESpecification"]["SSEEnabled"] is True
    assert props["TimeToLiveSpecification"] == time_to_live_specification()  # idempotency keys expire


def test_prod_keeps_data_dev_may_destroy_it(dev: Synthesized, prod: Synthesized) -> None:
    for synth, policy in ((dev, "Delete"), (prod, "Retain")):
        table = synth.raw["Resources"][synth.logical_id(synth.stack.store.table)]
        bucket = models_bucket(synth)
        assert table["DeletionPolicy"] == policy and bucket["DeletionPolicy"] == policy
        assert table["Properties"].get("DeletionProtectionEnabled", False) is (policy == "Retain")
    # dev empties the bucket on destroy; prod never deletes objects
    assert dev.resources("Custom::S3AutoDeleteObjects") and not prod.resources("Custom::S3AutoDeleteObjects")


# -- functions ----------------------------------------------------------------------------------------

def test_every_zip_function_is_python312_on_the_stage_arch_with_layers_and_tracing(dev: Synthesized) -> None:
    functions = [body["Properties"] for body in dev.resources("AWS::Lambda::Function").values()
                 if body["Properties"].get("Runtime", "").startswith("python")]
    # api, inference, authorizer, one per deploy step, cleanup
    assert len(functions) == 3 + len(WORKFLOW) + 1 + 1
    for props in functions:
        assert props["Runtime"] == "python3.12"
        assert props["Architectures"] == ["x86_64"]
        assert props["TracingConfig"] == {"Mode": "Active"}
        assert len(props["Layers"]) == 2  # the maas runtime layer + one dependency layer
        env = props["Environment"]["Variables"]
        assert env[ENV_BUCKET] == {"Ref": dev.logical_id(dev.stack.store.bucket)}
        assert env[ENV_TABLE] == {"Ref": dev.logical_id(dev.stack.store.table)}
        assert props["LoggingConfig"]["LogGroup"]


def test_functions_memory_timeouts_and_environment(dev: Synthesized) -> None:
    f = dev.stack.functions
    by_id = {name: dev.raw["Resources"][dev.logical_id(fn)]["Properties"]
             for name, fn in (("api", f.api), ("inference", f.inference), ("authorizer", f.authorizer),
                              ("cleanup", f.cleanup))}
    assert by_id["api"]["MemorySize"] == DEV.api_memory_mb and by_id["api"]["Timeout"] == 29
    assert by_id["inference"]["MemorySize"] == DEV.inference_memory_mb
    assert by_id["inference"]["Environment"]["Variables"]["POWERTOOLS_TRACE_DISABLED"] == "true"
    assert by_id["inference"]["EphemeralStorage"]["Size"] >= 512
    assert by_id["authorizer"]["MemorySize"] == DEV.authorizer_memory_mb
    assert by_id["cleanup"]["Handler"] == "handler.cleanup"
    # the API starts deploys as executions of the state machine
    machine_id = dev.logical_id(dev.stack.workflow.state_machine)
    assert by_id["api"]["Environment"]["Variables"][ENV_STATE_MACHINE] == {"Ref": machine_id}
    for step in (*WORKFLOW, ROLLBACK):
        props = function_by_handler(dev, f"handler.{step.name.value}")
        # the smoke test and optimize run the model in the sandbox's child, capped below the function
        sandboxed = step.name in (StepName.OPTIMIZE, StepName.SMOKE_TEST)
        memory = DEV.optimize_memory_mb if sandboxed else DEV.deploy_memory_mb
        assert props["Timeout"] >= 60 and props["MemorySize"] == memory
        child_cap = props["Environment"]["Variables"].get(ENV_VALIDATION_MEMORY)
        assert child_cap == (str((memory - VALIDATION_PARENT_MB) * 1024 * 1024) if sandboxed else None)
        assert props["Environment"]["Variables"][ENV_SAGEMAKER_ROLE] == {
            "Fn::GetAtt": [dev.logical_id(dev.stack.gpu.execution_role), "Arn"]}
    # log groups keep the stage's retention
    retention = {body["Properties"].get("RetentionInDays") for body in dev.resources("AWS::Logs::LogGroup").values()}
    assert retention == {DEV.log_retention_days}


def test_reserved_and_provisioned_concurrency(dev: Synthesized, prod: Synthesized) -> None:
    def reserved(synth: Synthesized, fn: Any) -> int | None:
        return synth.raw["Resources"][synth.logical_id(fn)]["Properties"].get("ReservedConcurrentExecutions")

    for synth in (dev, prod):
        f, config = synth.stack.functions, synth.config
        assert reserved(synth, f.inference) == config.inference_reserved_concurrency
        assert reserved(synth, f.api) == config.api_reserved_concurrency
        assert {reserved(synth, task) for task in f.deploy_tasks.values()} == {config.deploy_reserved_concurrency}
    # prod: inference is capped, management and every deploy task (rollback included) have capacity of their own
    assert PROD.inference_reserved_concurrency and PROD.api_reserved_concurrency and PROD.deploy_reserved_concurrency
    assert not dev.resources("AWS::Lambda::Alias")  # provisioned concurrency off by default


def test_provisioned_concurrency_puts_the_api_on_a_live_alias() -> None:
    from infra.stack import build_app
    from tests.infra.conftest import cdk_context

    app, stack = build_app(cdk_context(**{"maas:stages": {"dev": {
        "inference_provisioned_concurrency": 2, "container_pools": False}}}), nag=False)
    template = app.synth().get_stack_by_name(stack.stack_name).template
    aliases = [r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::Lambda::Alias"]
    assert len(aliases) == 1 and aliases[0]["Name"] == "live"
    assert aliases[0]["ProvisionedConcurrencyConfig"] == {"ProvisionedConcurrentExecutions": 2}
    # no container image assets without container pools
    assert not [r for r in template["Resources"].values()
                if r["Type"] == "AWS::Lambda::Function" and r["Properties"].get("PackageType") == "Image"]


def test_container_image_inference_pool(pools: Synthesized) -> None:
    (image_fn,) = [body["Properties"] for body in pools.resources("AWS::Lambda::Function").values()
                   if body["Properties"].get("PackageType") == "Image"]
    assert image_fn["MemorySize"] == DEV.image_inference_memory_mb
    assert image_fn["Environment"]["Variables"][ENV_POOL_PATH] == "/image"
    assert image_fn["Role"] == {"Fn::GetAtt": [pools.logical_id(pools.stack.functions.inference_role), "Arn"]}
    assert "ImageUri" in image_fn["Code"]
    # it logs (and so writes its EMF metrics) to its own log group, under the role it shares
    log_group = resolve(image_fn["LoggingConfig"]["LogGroup"])
    allowed = actions_on(statements_of(pools, pools.stack.functions.inference_role))
    written = allowed["logs:PutLogEvents"]
    assert any(log_group.rstrip(">") in resource for resource in written), (log_group, written)
    # and its errors count towards the inference error-rate alarm, like the zip pool's
    (alarm,) = [body["Properties"] for body in pools.resources("AWS::CloudWatch::Alarm").values()
                if body["Properties"]["AlarmName"] == "maas-dev-InferenceErrorRate"]
    counted = {json.dumps(query["MetricStat"]["Metric"]["Dimensions"]) for query in alarm["Metrics"]
               if "MetricStat" in query and query["MetricStat"]["Metric"]["MetricName"] == "Errors"}
    f = pools.stack.functions
    functions = {pools.logical_id(f.inference), pools.logical_id(f.image_inference)}
    assert all(any(name in dimensions for dimensions in counted) for name in functions), counted


def test_stages_need_no_docker_by_default(dev: Synthesized, prod: Synthesized) -> None:
    """`cdk deploy` of a default stage publishes no container image (no Docker daemon needed): the
    image pool, the SageMaker image and the SageMaker target (it needs the image) are opt-in."""
    for synth in (dev, prod):
        assert not synth.config.container_pools
        assert synth.stack.functions.image_inference is None and synth.stack.gpu.image is None
        assert not [body for body in synth.resources("AWS::Lambda::Function").values()
                    if body["Properties"].get("PackageType") == "Image"]
        for function in (*synth.stack.functions.deploy_tasks.values(), synth.stack.functions.api):
            env = synth.raw["Resources"][synth.logical_id(function)]["Properties"]["Environment"]["Variables"]
            assert ENV_SAGEMAKER_IMAGE not in env


def test_container_pools_from_the_command_line() -> None:
    from infra.config import from_context

    context = {"maas:stage": "dev", "maas:stages": '{"dev": {"container_pools": true}}'}
    assert from_context(context.get).container_pools
    with pytest.raises(InvalidInput, match="JSON object"):
        from_context({"maas:stages": "{not json"}.get)


# -- least privilege ----------------------------------------------------------------------------------


def test_no_statement_allows_a_wildcard_action(dev: Synthesized) -> None:
    for policy in dev.resources("AWS::IAM::Policy").values():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert not [a for a in actions if a == "*" or a.endswith(":*")], statement


def test_inference_role_reads_only(dev: Synthesized) -> None:
    allowed = actions_on(statements_of(dev, dev.stack.functions.inference_role))
    bucket = f"<{dev.logical_id(dev.stack.store.bucket)}.Arn>"
    table = f"<{dev.logical_id(dev.stack.store.table)}.Arn>"
    assert allowed["s3:GetObject"] == {f"{bucket}/models/*"}
    assert allowed["dynamodb:GetItem"] == {table} and allowed["dynamodb:Query"] == {table}
    assert allowed["sagemaker:InvokeEndpoint"] == {
        f"arn:<AWS::Partition>:sagemaker:<AWS::Region>:<AWS::AccountId>:endpoint/{SAGEMAKER_NAME_PREFIX}dev-*"}
    data_writes = {a for a in allowed if a.startswith(("s3:", "dynamodb:", "sagemaker:"))
                   and a.split(":")[1].startswith(("Put", "Delete", "Update", "BatchWrite", "Create"))}
    assert data_writes == set(), data_writes
    # its own logs and traces, nothing else
    assert {a for a in allowed if a.startswith(("logs:", "xray:"))} == {
        "logs:CreateLogStream", "logs:PutLogEvents", "xray:PutTraceSegments", "xray:PutTelemetryRecords"}


def test_authorizer_role_only_looks_up_tokens(dev: Synthesized) -> None:
    allowed = actions_on(statements_of(dev, dev.stack.functions.authorizer_role))
    data = {a for a in allowed if a.startswith(("s3:", "dynamodb:", "sagemaker:", "states:"))}
    assert data == {"dynamodb:GetItem"}


def test_api_role_manages_the_store_and_starts_deploys(dev: Synthesized) -> None:
    allowed = actions_on(statements_of(dev, dev.stack.functions.api_role))
    bucket = f"<{dev.logical_id(dev.stack.store.bucket)}.Arn>"
    for action in ("s3:PutObject", "s3:GetObjectVersion", "s3:DeleteObject", "s3:AbortMultipartUpload"):
        assert allowed[action] == {f"{bucket}/uploads/*", f"{bucket}/models/*"}
    assert allowed["s3:ListBucketVersions"] == {bucket}
    for action in ("dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:ConditionCheckItem", "dynamodb:Query"):
        assert f"<{dev.logical_id(dev.stack.store.table)}.Arn>" in allowed[action]
    assert allowed["states:StartExecution"] == {f"<{dev.logical_id(dev.stack.workflow.state_machine)}>"}
    # a manual rollback stops the execution of this state machine only
    assert allowed["states:StopExecution"] == {
        "arn:<AWS::Partition>:states:<AWS::Region>:<AWS::AccountId>:execution:maas-dev-deploy:*"}
    # a manual rollback of a SageMaker deployment puts its endpoint back: no model creation, no PassRole
    prefix = "arn:<AWS::Partition>:sagemaker:<AWS::Region>:<AWS::AccountId>:"
    assert {a for a in allowed if a.startswith(("sagemaker:", "iam:"))} == set(ROLLBACK_ACTIONS)
    for action in ROLLBACK_ACTIONS:
        assert allowed[action] == {f"{prefix}{kind}/{SAGEMAKER_NAME_PREFIX}dev-*"
                                   for kind in ("endpoint-config", "endpoint")}


def test_deploy_role_and_sagemaker_role(dev: Synthesized) -> None:
    gpu = dev.stack.gpu
    allowed = actions_on(statements_of(dev, dev.stack.functions.deploy_role))
    prefix = "arn:<AWS::Partition>:sagemaker:<AWS::Region>:<AWS::AccountId>:"
    for action in ENDPOINT_ACTIONS:
        assert allowed[action] == {f"{prefix}{kind}/{SAGEMAKER_NAME_PREFIX}dev-*"
                                   for kind in ("model", "endpoint-config", "endpoint")}
    role_arn = f"<{dev.logical_id(gpu.execution_role)}.Arn>"
    assert allowed["iam:PassRole"] == {role_arn}
    (pass_role,) = [s for s in statements_of(dev, dev.stack.functions.deploy_role) if s["Action"] == "iam:PassRole"]
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    assert "s3:PutObject" not in allowed and "s3:DeleteObject" not in allowed  # deploys never write artifacts
    assert allowed["cloudwatch:GetMetricData"] == {"*"}  # check_health reads the canary's metrics
    # SageMaker's blue/green updates roll back on the serving alarms, named on every deploy task
    from maas.settings import ENV_ROLLBACK_ALARMS

    assert function_by_handler(dev, "handler.shift_traffic")["Environment"]["Variables"][ENV_ROLLBACK_ALARMS] == (
        "maas-dev-InferenceErrorRate,maas-dev-ApiLatencyP99")
    alarm_names = {a["Properties"]["AlarmName"] for a in dev.resources("AWS::CloudWatch::Alarm").values()}
    assert {"maas-dev-InferenceErrorRate", "maas-dev-ApiLatencyP99"} <= alarm_names
    # ...except the optimize task, which registers the quantized version: its own role, the api layer (onnx,
    # the quantizer) and a longer timeout
    optimize = dev.stack.functions.deploy_tasks["optimize"]
    props = dev.raw["Resources"][dev.logical_id(optimize)]["Properties"]
    assert props["Role"] == {"Fn::GetAtt": [dev.logical_id(dev.stack.functions.optimize_role), "Arn"]}
    assert {"Ref": dev.logical_id(dev.stack.functions.api_layer)} in props["Layers"]
    assert props["Timeout"] == 900
    optimize_allowed = actions_on(statements_of(dev, dev.stack.functions.optimize_role))
    assert "s3:PutObject" in optimize_allowed and "dynamodb:TransactWriteItems" not in optimize_allowed
    assert not [a for a in optimize_allowed if a.startswith(("sagemaker:", "iam:"))]
    # SageMaker's execution role: assumed by SageMaker only, reads committed models, pulls the image
    role = dev.raw["Resources"][dev.logical_id(gpu.execution_role)]["Properties"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    sm_allowed = actions_on(statements_of(dev, gpu.execution_role))
    assert sm_allowed["s3:GetObject"] == {f"<{dev.logical_id(dev.stack.store.bucket)}.Arn>/models/*"}
    assert "s3:PutObject" not in sm_allowed


# -- API ------------------------------------------------------------------------------------------------


def resource_paths(synth: Synthesized) -> dict[str, str]:
    """API Gateway resource logical id -> its full path."""
    resources = synth.resources("AWS::ApiGateway::Resource")
    api_id = synth.logical_id(synth.stack.api.rest_api)

    def path_of(logical_id: str) -> str:
        props = resources[logical_id]["Properties"]
        parent = props["ParentId"]
        prefix = "" if parent == {"Fn::GetAtt": [api_id, "RootResourceId"]} else path_of(parent["Ref"])
        return f"{prefix}/{props['PathPart']}"

    return {logical_id: path_of(logical_id) for logical_id in resources}


def test_every_route_but_the_health_probes_needs_the_authorizer(dev: Synthesized) -> None:
    paths = resource_paths(dev)
    authorizer_id = dev.logical_id(dev.stack.api.authorizer)
    methods = {}
    for method in dev.resources("AWS::ApiGateway::Method").values():
        props = method["Properties"]
        path = paths[props["ResourceId"]["Ref"]] if "Ref" in props["ResourceId"] else "/"
        methods[f"{props['HttpMethod']} {path}"] = props
    assert set(methods) >= {"ANY /{proxy+}", "GET /v2", "ANY /v2/{proxy+}", "GET /v2/health/live",
                            "GET /v2/health/ready"}
    for route, props in methods.items():
        if route in ("GET /v2/health/live", "GET /v2/health/ready"):
            assert props["AuthorizationType"] == "NONE"
        else:
            assert props["AuthorizationType"] == "CUSTOM", route
            assert props["AuthorizerId"] == {"Ref": authorizer_id}, route
        assert props["Integration"]["Type"] == "AWS_PROXY"


def test_authorizer_checks_maas_tokens_with_caching(dev: Synthesized) -> None:
    (authorizer,) = dev.resources("AWS::ApiGateway::Authorizer").values()
    props = authorizer["Properties"]
    assert props["Type"] == "TOKEN"
    assert props["IdentitySource"] == "method.request.header.Authorization"
    assert props["AuthorizerResultTtlInSeconds"] == DEV.authorizer_cache_seconds
    assert "maas_" in props["IdentityValidationExpression"]
    assert f"{dev.logical_id(dev.stack.functions.authorizer)}.Arn" in resolve(props["AuthorizerUri"])


def test_api_stage_logging_throttling_binary(dev: Synthesized) -> None:
    (api,) = dev.resources("AWS::ApiGateway::RestApi").values()
    assert api["Properties"]["BinaryMediaTypes"] == ["*/*"]  # binary tensors arrive with no Content-Type (tritonclient)
    (stage,) = dev.resources("AWS::ApiGateway::Stage").values()
    props = stage["Properties"]
    assert props["StageName"] == "dev" and props["TracingEnabled"] is True
    assert props["AccessLogSetting"]["DestinationArn"] == {
        "Fn::GetAtt": [dev.logical_id(dev.stack.api.access_logs), "Arn"]}
    (settings,) = props["MethodSettings"]
    assert settings["ThrottlingRateLimit"] == DEV.throttle_rate_limit
    assert settings["ThrottlingBurstLimit"] == DEV.throttle_burst_limit
    assert settings["LoggingLevel"] == "ERROR" and settings["DataTraceEnabled"] is False
    responses = {r["Properties"]["ResponseType"]: r["Properties"]
                 for r in dev.resources("AWS::ApiGateway::GatewayResponse").values()}
    assert responses["UNAUTHORIZED"]["StatusCode"] == "401"


def test_outputs(dev: Synthesized) -> None:
    outputs = dev.raw["Outputs"]
    assert {"ApiUrl", "ModelBucketName", "RegistryTableName", "DeployStateMachineArn", "AlarmTopicArn",
            "DashboardName"} <= set(outputs)
    assert outputs["ModelBucketName"]["Value"] == {"Ref": dev.logical_id(dev.stack.store.bucket)}
    assert outputs["RegistryTableName"]["Value"] == {"Ref": dev.logical_id(dev.stack.store.table)}
    # maas admin bootstrap reads these exact keys
    from maas.cli.admin import OUTPUT_BUCKET, OUTPUT_TABLE, OUTPUT_URL

    assert {OUTPUT_URL, OUTPUT_TABLE, OUTPUT_BUCKET} <= set(outputs)


# -- deploy workflow ----------------------------------------------------------------------------------


def test_state_machine_is_the_step_list(dev: Synthesized) -> None:
    definition = state_machine_definition(dev)
    states = definition["States"]
    forward = [state_name(step) for step in WORKFLOW]
    # a deployment's input starts the first step; a manual rollback's endpoint undo its own branch
    assert definition["StartAt"] == START_STATE
    start = states[START_STATE]
    assert start["Default"] == forward[0]
    assert start["Choices"] == [{"And": [{"Variable": UNDO_PATH, "IsPresent": True},
                                         {"Variable": UNDO_PATH, "BooleanEquals": True}], "Next": UNDO_STATE}]
    assert set(states) == {START_STATE, *forward, state_name(ROLLBACK), SUCCEEDED_STATE, FAILED_STATE, WAIT_STATE,
                           CHOICE_STATE, ROLLBACK_FAILED_STATE, UNDO_STATE, UNDONE_STATE}
    tasks = dev.stack.functions.deploy_tasks
    for index, step in enumerate(WORKFLOW):
        state = states[state_name(step)]
        assert state["Type"] == "Task"
        assert state["Resource"] == f"<{dev.logical_id(tasks[step.name.value])}.Arn>"
        following = forward[index + 1] if index + 1 < len(forward) else SUCCEEDED_STATE
        if step.name == WAIT_AFTER:  # the bake: a Wait on the step's own output, then on
            assert state["Next"] == WAIT_STATE
            assert states[WAIT_STATE] == {"Type": "Wait", "SecondsPath": WAIT_SECONDS_PATH, "Next": following,
                                          "Comment": states[WAIT_STATE]["Comment"]}
        elif step.name == LOOP_CHOICE_AFTER:  # done: on to promote; else back to the next traffic step
            assert state["Next"] == CHOICE_STATE
            choice = states[CHOICE_STATE]
            assert choice["Choices"] == [{"Variable": DONE_PATH, "BooleanEquals": True, "Next": following}]
            assert choice["Default"] == state_name_of(LOOP_START)
        else:
            assert state["Next"] == following
        assert state["Catch"] == [{"ErrorEquals": ["States.ALL"], "ResultPath": FAILURE_PATH,
                                   "Next": state_name(ROLLBACK)}]
        retried = {error for retry in state.get("Retry", []) for error in retry["ErrorEquals"]}
        assert set(step.retry_on) <= retried
    rollback = states[state_name(ROLLBACK)]
    assert rollback["Resource"] == f"<{dev.logical_id(tasks[ROLLBACK.name.value])}.Arn>"
    assert rollback["Next"] == FAILED_STATE and states[FAILED_STATE]["Type"] == "Fail"
    # A rollback SageMaker keeps waiting (an endpoint update runs) retries long enough to outlast it...
    (patient,) = [retry for retry in rollback["Retry"] if "Unavailable" in retry["ErrorEquals"]]
    assert (patient["IntervalSeconds"], patient["MaxAttempts"], patient["MaxDelaySeconds"]) == (30, 25, 120)
    assert ROLLBACK.worst_retry_seconds() >= 45 * 60
    # ... within the hour the bake bound leaves of the execution
    assert MAX_TOTAL_BAKE_SECONDS + ROLLBACK.worst_retry_seconds() < EXECUTION_TIMEOUT_SECONDS
    # ... and one that cannot finish ends in a Fail state of its own, which an alarm counts
    assert rollback["Catch"] == [{"ErrorEquals": ["States.ALL"], "ResultPath": FAILURE_PATH,
                                  "Next": ROLLBACK_FAILED_STATE}]
    assert states[ROLLBACK_FAILED_STATE]["Type"] == "Fail"
    assert states[ROLLBACK_FAILED_STATE]["Error"] == "RollbackFailed"
    # the undo branch is the same task with the same patience, ending in success
    undo = states[UNDO_STATE]
    assert undo["Resource"] == rollback["Resource"] and undo["Retry"] == rollback["Retry"]
    assert undo["Catch"] == rollback["Catch"] and undo["Next"] == UNDONE_STATE
    assert states[UNDONE_STATE]["Type"] == "Succeed"


def test_state_machine_is_standard_logged_and_traced(dev: Synthesized) -> None:
    (machine,) = dev.resources("AWS::StepFunctions::StateMachine").values()
    props = machine["Properties"]
    assert props["StateMachineType"] == "STANDARD"
    assert props["TracingConfiguration"] == {"Enabled": True}
    assert props["LoggingConfiguration"]["Level"] == "ALL"
    machine_role = statements_of(dev, dev.stack.workflow.state_machine.role)
    invoked = actions_on(machine_role)["lambda:InvokeFunction"]
    assert {f"<{dev.logical_id(fn)}.Arn>" for fn in dev.stack.functions.deploy_tasks.values()} <= invoked


# -- monitoring -----------------------------------------------------------------------------------------


def test_dashboard_widgets(dev: Synthesized) -> None:
    (dashboard,) = dev.resources("AWS::CloudWatch::Dashboard").values()
    body = resolve(dashboard["Properties"]["DashboardBody"])
    for title in ("Model latency p50", "Model latency p99", "Invocations per model", "Errors per model",
                  "Cold starts", "Artifact cache hits", "Lambda throttles", "Deploy workflow executions",
                  "Alarms"):
        assert f'"title":"{title}' in body, title
    for metric in ("ModelLatency", "Invocations", "Errors", "ColdStart", "CacheHit"):
        assert f"MetricName=\\\\\\\"{metric}\\\\\\\"" in body or f'MetricName=\\"{metric}\\"' in body, metric
    assert "ExecutionsFailed" in body and "Throttles" in body


def test_alarms_notify_the_encrypted_topic(dev: Synthesized) -> None:
    topic_id = dev.logical_id(dev.stack.monitoring.topic)
    alarms = dev.resources("AWS::CloudWatch::Alarm")
    assert len(alarms) == 6
    (rollbacks,) = [a["Properties"] for a in alarms.values() if a["Properties"].get("MetricName") == "RollbackFailures"]
    (metric_filter,) = dev.resources("AWS::Logs::MetricFilter").values()
    assert metric_filter["Properties"]["LogGroupName"] == {"Ref": dev.logical_id(dev.stack.workflow.log_group)}
    assert ROLLBACK_FAILED_STATE in metric_filter["Properties"]["FilterPattern"]
    assert metric_filter["Properties"]["MetricTransformations"][0]["MetricName"] == "RollbackFailures"
    assert rollbacks["Threshold"] == 1 and "by hand" in rollbacks["AlarmDescription"]
    names = {resolve(a["Properties"].get("AlarmDescription", "")) for a in alarms.values()}
    assert any("p99 latency" in n for n in names) and any("deploy failed" in n for n in names)
    for alarm in alarms.values():
        assert alarm["Properties"]["AlarmActions"] == [{"Ref": topic_id}]
    failed = [a["Properties"] for a in alarms.values() if a["Properties"].get("MetricName") == "ExecutionsFailed"]
    assert failed and failed[0]["Threshold"] == 1
    # A timed-out execution skips Catch -> Rollback: it gets an alarm of its own.
    timed_out = [a["Properties"] for a in alarms.values() if a["Properties"].get("MetricName") == "ExecutionsTimedOut"]
    assert timed_out and timed_out[0]["Threshold"] == 1 and "without rolling back" in timed_out[0]["AlarmDescription"]
    latency = [a["Properties"] for a in alarms.values() if a["Properties"].get("MetricName") == "Latency"]
    assert latency and latency[0]["Threshold"] == DEV.alarm_p99_latency_ms
    topic = dev.raw["Resources"][topic_id]["Properties"]
    assert "KmsMasterKeyId" in topic
    dev.template.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})
    dev.template.has_resource_properties("AWS::SNS::TopicPolicy", Match.object_like({
        "PolicyDocument": Match.object_like({"Statement": Match.array_with([Match.object_like({
            "Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}})])})}))


def test_the_longest_deploy_ends_before_the_execution_times_out(dev: Synthesized) -> None:
    """Past its timeout an execution stops without Catch -> Rollback, so every deploy the API accepts
    must bake for less than it, with room left for the steps (an hour)."""
    timeout = state_machine_definition(dev)["TimeoutSeconds"]
    assert timeout == EXECUTION_TIMEOUT_SECONDS
    assert timeout >= MAX_TOTAL_BAKE_SECONDS + 3600


def test_the_api_function_gets_the_sagemaker_target(pools: Synthesized, aws_credentials: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The API validates `target` and rolls deployments back by hand: it must build the same SageMaker
    target as the deploy tasks from the environment the template gives it (else `--target sagemaker`
    answers 422 "target must be one of lambda" on a deployed stack)."""
    from maas.backends.aws.sagemaker import sagemaker_target_from_env
    from maas.settings import ENV_ROLLBACK_ALARMS, Settings

    api = pools.raw["Resources"][pools.logical_id(pools.stack.functions.api)]["Properties"]["Environment"]["Variables"]
    task = function_by_handler(pools, "handler.shift_traffic")["Environment"]["Variables"]
    for key in (ENV_SAGEMAKER_ROLE, ENV_SAGEMAKER_IMAGE, ENV_ROLLBACK_ALARMS):
        assert api[key] == task[key], key
        monkeypatch.setenv(key, resolve(api[key]))
    from maas.backends.aws.clients import session

    try:
        target = sagemaker_target_from_env(Settings(), "bucket")
    finally:
        # the shared botocore session was made outside moto: later tests must not inherit it
        session.cache_clear()
    assert target is not None and target.alarm_names == ("maas-dev-InferenceErrorRate", "maas-dev-ApiLatencyP99")


def test_no_role_can_erase_a_committed_model_version(dev: Synthesized) -> None:
    """A READY version pins an S3 version of models/...: only a delete marker may hide it (the bucket's
    lifecycle keeps the bytes for the stage's retention). Erasing versions is for staged uploads only."""
    bucket = f"<{dev.logical_id(dev.stack.store.bucket)}.Arn>"
    f = dev.stack.functions
    roles = [f.api_role, f.cleanup_role, f.optimize_role, f.deploy_role, f.inference_role, f.authorizer_role,
             dev.stack.gpu.execution_role]
    for role in roles:
        allowed = actions_on(statements_of(dev, role))
        erasable = allowed.get("s3:DeleteObjectVersion", set())
        assert erasable <= {f"{bucket}/uploads/*"}, (dev.logical_id(role), erasable)
    for role in (f.api_role, f.cleanup_role, f.optimize_role):  # they discard uploads
        assert actions_on(statements_of(dev, role))["s3:DeleteObjectVersion"] == {f"{bucket}/uploads/*"}


def test_each_stage_names_its_own_sagemaker_resources(pools: Synthesized, prod: Synthesized) -> None:
    """dev and prod in one account must not share an endpoint, nor grants on each other's names: every
    function that names a SageMaker resource gets its stage's prefix, and every grant covers only it."""
    from maas.backends.aws.sagemaker import endpoint_config_name, endpoint_name, model_resource_name
    from maas.settings import ENV_SAGEMAKER_PREFIX

    for synth, prefix in ((pools, "maas-dev-"), (prod, "maas-prod-")):
        assert synth.stack.gpu.name_prefix == prefix
        f = synth.stack.functions
        for function in (*f.deploy_tasks.values(), f.api, f.inference,
                         *([f.image_inference] if f.image_inference else [])):
            env = synth.raw["Resources"][synth.logical_id(function)]["Properties"]["Environment"]["Variables"]
            assert env[ENV_SAGEMAKER_PREFIX] == prefix
        resources = {resolve(resource) for policy in synth.resources("AWS::IAM::Policy").values()
                     for statement in policy["Properties"]["PolicyDocument"]["Statement"]
                     for resource in (statement["Resource"] if isinstance(statement["Resource"], list)
                                      else [statement["Resource"]])}
        granted = {resource for resource in resources if ":sagemaker:" in resource or "/aws/sagemaker/" in resource}
        assert len(granted) == 4 and all(resource.rsplit("/", 1)[1] == f"{prefix}*" for resource in granted), granted
        names = (endpoint_name("fraud", prefix), endpoint_config_name("fraud", "a" * 32, prefix),
                 model_resource_name("fraud", 3, "a" * 32, prefix))
        assert all(name.startswith(prefix) for name in names)
    other = endpoint_name("fraud", "maas-prod-")
    assert not other.startswith("maas-dev-") and other != endpoint_name("fraud", "maas-dev-")


def test_the_readme_names_the_concurrency_prod_reserves(prod: Synthesized) -> None:
    """A fresh account's quota must fit what the template reserves (Lambda keeps 100 unreserved)."""
    import re
    from pathlib import Path

    reserved = sum(body["Properties"].get("ReservedConcurrentExecutions", 0)
                   for body in prod.resources("AWS::Lambda::Function").values())
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    said = re.search(r"prod reserves \*\*(\d+)\*\* in all \(([^)]*)\).*?quota of at least \*\*(\d+)\*\*", readme)
    assert said is not None
    terms = [[int(factor) for factor in term.split(" x ")] for term in said.group(2).split(" + ")]
    assert int(said.group(1)) == reserved == sum(math.prod(term) for term in terms)
    assert int(said.group(3)) == reserved + 100
    assert len(prod.stack.functions.deploy_tasks) == 7 and "each of the seven deploy-task functions" in readme


def test_container_pools_add_the_image_pool_route_and_the_serving_image(pools: Synthesized) -> None:
    paths = set(resource_paths(pools).values())
    assert {"/image", "/image/v2", "/image/v2/{proxy+}"} <= paths
    gpu = pools.stack.gpu
    assert gpu.image is not None and "ecr:BatchGetImage" in actions_on(statements_of(pools, gpu.execution_role))


def test_no_stage_owns_the_account_wide_api_gateway_logging_role(dev: Synthesized, prod: Synthesized) -> None:
    """API Gateway's logging role is an account setting: in maas-account, kept on destroy, which each
    stage depends on; a stage stack that set it would overwrite another stage's and, destroyed, break
    API logging for the whole account."""
    from aws_cdk import Stack
    from aws_cdk.assertions import Template

    from infra.account import ACCOUNT_STACK_NAME

    for synth in (dev, prod):
        assert not synth.resources("AWS::ApiGateway::Account")
        trusts = [json.dumps(body["Properties"]["AssumeRolePolicyDocument"])
                  for body in synth.resources("AWS::IAM::Role").values()]
        assert not [trust for trust in trusts if "apigateway.amazonaws.com" in trust]
        (account,) = [dependency for dependency in synth.stack.dependencies if isinstance(dependency, Stack)]
        assert account.stack_name == ACCOUNT_STACK_NAME
    template = Template.from_stack(account).to_json()
    (settings,) = [body for body in template["Resources"].values() if body["Type"] == "AWS::ApiGateway::Account"]
    (role,) = [body for body in template["Resources"].values() if body["Type"] == "AWS::IAM::Role"]
    assert settings["DeletionPolicy"] == "Retain" and role["DeletionPolicy"] == "Retain"
    assert "apigateway.amazonaws.com" in json.dumps(role["Properties"]["AssumeRolePolicyDocument"])
    assert len(template["Resources"]) == 2  # nothing else lives there


def test_the_readme_says_what_a_new_account_needs(dev: Synthesized, prod: Synthesized, pools: Synthesized) -> None:
    """The Deploy section's list for a fresh account, checked against what the templates require."""
    import re
    from pathlib import Path

    from maas.cli.admin import OUTPUT_BUCKET, OUTPUT_TABLE, OUTPUT_URL

    repo = Path(__file__).resolve().parents[2]
    readme = " ".join((repo / "README.md").read_text().split())
    needs = readme[readme.index("**What a new account needs**"):readme.index("Then, with AWS credentials")]
    # the bootstrap version the template's CheckBootstrapVersion rule demands
    (assertion,) = dev.raw["Rules"]["CheckBootstrapVersion"]["Assertions"]
    refused = assertion["Assert"]["Fn::Not"][0]["Fn::Contains"][0]
    said = re.search(r"\*\*version (\d+)\*\* or later", needs)
    assert said is not None and int(said.group(1)) == max(int(v) for v in refused) + 1
    # the quota: what prod reserves, plus the 100 Lambda keeps unreserved
    reserved = sum(body["Properties"].get("ReservedConcurrentExecutions", 0)
                   for body in prod.resources("AWS::Lambda::Function").values())
    quota = re.search(r"at least \*\*(\d+)\*\*", needs)
    assert quota is not None and int(quota.group(1)) == reserved + 100
    assert not any("ReservedConcurrentExecutions" in body["Properties"]
                   for body in dev.resources("AWS::Lambda::Function").values())
    # Docker only with container pools: no image asset otherwise
    assert "**no Docker**" in needs
    for synth in (dev, prod):
        assert "container-assets" not in json.dumps(synth.raw), synth.stack.stack_name
    assert "container-assets" in json.dumps(pools.raw)
    # the Node.js that package.json pins
    node = json.loads((repo / "package.json").read_text())["devDependencies"]["node"]
    assert f"**Node.js {node.split('.')[0]}**" in needs
    # what `maas admin bootstrap --stack` reads
    assert {OUTPUT_URL, OUTPUT_TABLE, OUTPUT_BUCKET} <= set(dev.raw["Outputs"])
    assert all(f"`{name}`" in needs for name in (OUTPUT_URL, OUTPUT_TABLE, OUTPUT_BUCKET))


def test_functions_that_validate_models_leave_their_child_room(dev: Synthesized, prod: Synthesized) -> None:
    """The API (commits) and the optimize task (derived versions) validate models in a capped child:
    the cap plus what the function keeps must fit the function's memory, or a memory bomb kills the
    function (Lambda's limit) before the child's cap refuses the model."""
    from infra.config import stage_config
    from maas.settings import ENV_VALIDATION_MEMORY, MIN_VALIDATION_MEMORY_BYTES, VALIDATION_PARENT_MB

    for synth in (dev, prod):
        f = synth.stack.functions
        for function in (f.api, f.deploy_tasks["optimize"]):
            props = synth.raw["Resources"][synth.logical_id(function)]["Properties"]
            cap = int(props["Environment"]["Variables"][ENV_VALIDATION_MEMORY])
            assert cap >= MIN_VALIDATION_MEMORY_BYTES
            assert cap + VALIDATION_PARENT_MB * 1024 * 1024 <= props["MemorySize"] * 1024 * 1024
    with pytest.raises(InvalidInput, match=r"api_memory_mb.*at least 1536 MB"):
        stage_config("dev", {"dev": {"api_memory_mb": 1024}})


def test_inference_functions_stop_a_model_run_before_api_gateway_gives_up(pools: Synthesized) -> None:
    f = pools.stack.functions
    assert f.image_inference is not None
    for function in (f.inference, f.image_inference):
        props = pools.raw["Resources"][pools.logical_id(function)]["Properties"]
        deadline = float(props["Environment"]["Variables"]["MAAS_MAX_INFERENCE_SECONDS"])
        assert 0 < deadline < props["Timeout"] <= 29
