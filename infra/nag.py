"""cdk-nag AwsSolutions findings this stack acknowledges, each with the reason it is right here.

Acknowledgments name the full finding id (IAM4/IAM5 carry the policy or resource) and sit on the
narrowest scope that has the finding: a new wildcard or a new unauthenticated route elsewhere still
fails the nag test."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aws_cdk import Acknowledgment, Stack, Validations
from constructs import IConstruct

if TYPE_CHECKING:
    from infra.stack import MaasStack

OBJECTS_REASON = ("object-level access inside the stack's own model bucket: keys are per model, version and "
                  "upload id, created at run time, so they can only be named by prefix")


def _acknowledge(scope: IConstruct, finding_id: str, reason: str) -> None:
    Validations.of(scope).acknowledge(Acknowledgment(id=finding_id, reason=reason))


def _arn_of(stack: Stack, construct: IConstruct) -> str:
    child = construct.node.default_child
    assert child is not None
    return f"<{stack.get_logical_id(child)}.Arn>"  # type: ignore[arg-type]


def acknowledge_findings(stack: MaasStack) -> None:
    partition_region_account = "arn:<AWS::Partition>:{service}:<AWS::Region>:<AWS::AccountId>:"
    sagemaker = partition_region_account.format(service="sagemaker")
    bucket = _arn_of(stack, stack.store.bucket)
    prefix = stack.gpu.name_prefix  # maas-<stage>-

    stack_wide = {
        "AwsSolutions-L1": "the layers are built and byte-compiled for CPython 3.12 (scripts/build_layers.py); "
                           "the runtime moves with the layer pins, not on its own",
        "AwsSolutions-COG4": "callers authenticate with maas API tokens checked by the TOKEN authorizer "
                             "(functions/authorizer); there is no Cognito user pool",
        "AwsSolutions-APIG2": "every function validates its request against the maas schema and answers "
                              "problem+json naming the field; API Gateway models cannot read the OIP binary "
                              "tensor extension and would duplicate the OpenAPI schema",
        "AwsSolutions-APIG3": "WAF costs money at idle and is not needed for token-authenticated, throttled "
                              "APIs; attach a web ACL to the stage if the account requires one (README)",
        "AwsSolutions-IAM5[Resource::*]":
            "X-Ray PutTraceSegments/PutTelemetryRecords, ecr:GetAuthorizationToken, cloudwatch:GetMetricData "
            "and cloudwatch:PutMetricData (conditioned on the namespace) support no resource-level permissions",
        f"AwsSolutions-IAM5[Resource::{bucket}/uploads/*]": OBJECTS_REASON,
        f"AwsSolutions-IAM5[Resource::{bucket}/models/*]": OBJECTS_REASON,
        f"AwsSolutions-IAM5[Resource::{sagemaker}model/{prefix}*]":
            "the deploy workflow creates one SageMaker model per GPU deployment; only this stage's maas-<stage>- names",
        f"AwsSolutions-IAM5[Resource::{sagemaker}endpoint-config/{prefix}*]":
            "one endpoint config per GPU deployment (blue/green); only this stage's maas-<stage>- names",
        f"AwsSolutions-IAM5[Resource::{sagemaker}endpoint/{prefix}*]":
            "one endpoint per GPU model, created by the deploy workflow; only this stage's maas-<stage>- names",
        "AwsSolutions-IAM5[Resource::" + partition_region_account.format(service="logs")
        + f"log-group:/aws/sagemaker/Endpoints/{prefix}*]":
            "SageMaker names each endpoint's log group after the endpoint: this stage's endpoints only",
    }
    stack_wide["AwsSolutions-IAM5[Resource::" + partition_region_account.format(service="states")
               + f"execution:maas-{stack.config.name}-deploy:*]"] = (
        "a manual rollback stops the deploy's execution; executions are named at run time (the deployment "
        "id), under this state machine only")
    for task in stack.functions.deploy_tasks.values():
        stack_wide[f"AwsSolutions-IAM5[Resource::{_arn_of(stack, task)}:*]"] = (
            "Step Functions invokes the deploy task function's versions and aliases (<function arn>:*)")
    for finding_id, reason in stack_wide.items():
        _acknowledge(stack, finding_id, reason)
    for method in stack.api.public_methods:
        _acknowledge(method, "AwsSolutions-APIG4",
                     "OIP health probes (/v2/health/live|ready) for load balancers and monitors: no data, no "
                     "model, no token, as the Open Inference Protocol specifies")


def acknowledge_account_findings(stack: Stack) -> None:
    _acknowledge(stack, "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
                 "AmazonAPIGatewayPushToCloudWatchLogs]",
                 "API Gateway's account-level logging role; AWS maintains this policy for exactly that purpose")


__all__ = ["acknowledge_account_findings", "acknowledge_findings"]
