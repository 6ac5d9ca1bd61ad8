"""The GPU path: SageMaker real-time endpoints for models too large or too slow for Lambda.

What the stack provides: the execution role SageMaker runs the endpoints under, the serving image
(``functions/sagemaker/Dockerfile``: the maas engine on onnxruntime-gpu behind SageMaker's ``/ping`` and
``/invocations``), and the ARN patterns the deploy workflow may create and the inference function may
invoke. Endpoints themselves are created per deployment by the workflow, not by the stack: an idle stack
runs no GPU instance."""

from __future__ import annotations

from aws_cdk import ArnFormat, Stack
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from constructs import Construct

from infra.bundling import REPO_ROOT
from infra.config import StageConfig
from maas.settings import sagemaker_name_prefix

ENDPOINT_ACTIONS = (
    "sagemaker:CreateModel", "sagemaker:DescribeModel", "sagemaker:DeleteModel",
    "sagemaker:CreateEndpointConfig", "sagemaker:DescribeEndpointConfig", "sagemaker:DeleteEndpointConfig",
    "sagemaker:CreateEndpoint", "sagemaker:UpdateEndpoint", "sagemaker:DescribeEndpoint",
    "sagemaker:DeleteEndpoint", "sagemaker:AddTags",
)
#: What undoing an endpoint's update takes (``SageMakerTarget.rollback``: back to the previous config,
#: kept under a name of its own, or delete a first deploy's endpoint): no model creation, no PassRole.
ROLLBACK_ACTIONS = (
    "sagemaker:DescribeEndpoint", "sagemaker:DescribeEndpointConfig", "sagemaker:CreateEndpointConfig",
    "sagemaker:UpdateEndpoint", "sagemaker:DeleteEndpoint", "sagemaker:AddTags",
)


class GpuPath(Construct):
    """``execution_role`` (assumed by SageMaker), ``image`` (None without container pools) and
    ``image_uri``, ``name_prefix`` (``maas-<stage>-``), ``resource_arns`` (the stage's models, endpoint
    configs and endpoints, in that order)."""

    def __init__(self, scope: Construct, construct_id: str, *, config: StageConfig) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        #: what this stage's SageMaker resources are named with (``maas-<stage>-``): the functions get it
        #: as MAAS_SAGEMAKER_PREFIX, and every grant below covers only names that start with it
        self.name_prefix = sagemaker_name_prefix(config.name)
        self.resource_arns = [
            stack.format_arn(service="sagemaker", resource=kind, resource_name=f"{self.name_prefix}*")
            for kind in ("model", "endpoint-config", "endpoint")
        ]
        self.execution_role = iam.Role(
            self, "ExecutionRole", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
            description="maas SageMaker endpoints: read model artifacts, pull the image, write logs and metrics",
        )
        self.execution_role.add_to_policy(iam.PolicyStatement(
            actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            resources=[stack.format_arn(service="logs", resource="log-group",
                                        resource_name=f"/aws/sagemaker/Endpoints/{self.name_prefix}*",
                                        arn_format=ArnFormat.COLON_RESOURCE_NAME)],
        ))
        self.execution_role.add_to_policy(iam.PolicyStatement(
            actions=["cloudwatch:PutMetricData"], resources=["*"],
            conditions={"StringLike": {"cloudwatch:namespace": ["/aws/sagemaker/*", "maas"]}},
        ))
        self.image: ecr_assets.DockerImageAsset | None = None
        self.image_uri = ""
        if config.container_pools:
            self.image = ecr_assets.DockerImageAsset(
                self, "ServingImage", directory=str(REPO_ROOT), file="functions/sagemaker/Dockerfile",
                platform=ecr_assets.Platform.LINUX_AMD64,  # GPU instances are x86_64
            )
            self.image.repository.grant_pull(self.execution_role)
            self.image_uri = self.image.image_uri

    def grant_manage_endpoints(self, grantee: iam.IGrantable) -> None:
        """What the deploy workflow needs: create/update/delete maas endpoints and hand them the role."""
        grantee.grant_principal.add_to_principal_policy(iam.PolicyStatement(
            actions=list(ENDPOINT_ACTIONS), resources=self.resource_arns))
        grantee.grant_principal.add_to_principal_policy(iam.PolicyStatement(
            actions=["iam:PassRole"], resources=[self.execution_role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
        ))

    def grant_roll_back_endpoints(self, grantee: iam.IGrantable) -> None:
        """What the management API needs for a manual rollback of a SageMaker deployment."""
        grantee.grant_principal.add_to_principal_policy(iam.PolicyStatement(
            actions=list(ROLLBACK_ACTIONS), resources=self.resource_arns[1:]))

    def grant_invoke_endpoints(self, grantee: iam.IGrantable) -> None:
        """What the inference function needs to proxy requests to a maas endpoint."""
        grantee.grant_principal.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:InvokeEndpoint"], resources=[self.resource_arns[2]]))

