"""``MaasStack``: the constructs of one stage, wired and granted; ``build_app``: what ``app.py`` runs.

Grants live here, not in the constructs (constructs expose what they create; the stack decides who may
touch it), as explicit least-privilege statements: each role gets the actions its handler's code
really calls, on the key prefixes and indexes it uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aws_cdk import App, ArnFormat, CfnOutput, Environment, Stack, Tags, Validations
from aws_cdk import aws_iam as iam
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from infra.account import ACCOUNT_STACK_NAME, AccountSettings
from infra.api import Api
from infra.config import StageConfig, from_context
from infra.deploy_workflow import DeployWorkflow
from infra.functions import IMAGE_POOL_PATH, Functions
from infra.gpu import GpuPath
from infra.model_store import INDEX_NAME, MODELS_PREFIX, UPLOADS_PREFIX, ModelStore
from infra.monitoring import NAMESPACE, Monitoring
from infra.nag import acknowledge_account_findings, acknowledge_findings
from maas.settings import (
    ENV_BUCKET,
    ENV_ROLLBACK_ALARMS,
    ENV_SAGEMAKER_IMAGE,
    ENV_SAGEMAKER_PREFIX,
    ENV_SAGEMAKER_ROLE,
    ENV_STATE_MACHINE,
    ENV_TABLE,
)

REGISTRY_READ = ("dynamodb:GetItem", "dynamodb:Query")
REGISTRY_WRITE = (*REGISTRY_READ, "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem",
                  "dynamodb:BatchWriteItem", "dynamodb:ConditionCheckItem")
# (TransactWriteItems is not an IAM action: a transaction needs the action of each item it writes or checks.)
OBJECT_READ = ("s3:GetObject", "s3:GetObjectVersion")
# Committed models: written once per version, hidden by a delete marker when deleted (the bucket's
# lifecycle keeps the bytes for the stage's retention). No role may erase a version under models/:
# a READY version's pinned S3 version must outlive any bug or stolen credential of the functions.
MODEL_WRITE = (*OBJECT_READ, "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
               "s3:ListMultipartUploadParts")
# Uploads are staging: discarding one erases every version of it.
UPLOAD_WRITE = (*MODEL_WRITE, "s3:DeleteObjectVersion")
BUCKET_LIST = ("s3:ListBucket", "s3:ListBucketVersions", "s3:ListBucketMultipartUploads")


class MaasStack(Stack):
    """One maas stage. Attributes: ``config``, ``store``, ``functions``, ``workflow``, ``gpu``, ``api``,
    ``monitoring``."""

    def __init__(self, scope: Construct, construct_id: str, *, config: StageConfig, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, description=f"maas model serving ({config.name})", **kwargs)
        self.config = config
        Tags.of(self).add("maas:stage", config.name)
        # CDK adds DependsOn from each function to its role's default policy even where a GetAtt already
        # orders them; cfn-lint (and `sam validate --lint`) warn about that redundancy (W3005). Nothing
        # else is ignored.
        self.template_options.metadata = {"cfn-lint": {"config": {"ignore_checks": ["W3005"]}}}

        self.store = ModelStore(self, "ModelStore", config=config)
        self.gpu = GpuPath(self, "Gpu", config=config)
        environment = {
            ENV_BUCKET: self.store.bucket.bucket_name,
            ENV_TABLE: self.store.table.table_name,
            "POWERTOOLS_METRICS_NAMESPACE": NAMESPACE,
            "POWERTOOLS_LOG_LEVEL": "INFO",
        }
        self.functions = Functions(self, "Functions", config=config, environment=environment)
        self.workflow = DeployWorkflow(self, "DeployWorkflow", config=config,
                                       functions=self.functions.deploy_tasks)
        self.functions.api.add_environment(ENV_STATE_MACHINE, self.workflow.state_machine.state_machine_arn)
        # The SageMaker target: the deploy tasks drive endpoint updates; the API accepts `target:
        # sagemaker` and rolls such a deployment back by hand, so it gets the same configuration.
        for function in (*self.functions.deploy_tasks.values(), self.functions.api):
            function.add_environment(ENV_SAGEMAKER_ROLE, self.gpu.execution_role.role_arn)
        # Every function that names a SageMaker resource (the inference pools invoke endpoints).
        for function in (*self.functions.deploy_tasks.values(), self.functions.api, self.functions.inference,
                         *([self.functions.image_inference] if self.functions.image_inference else [])):
            function.add_environment(ENV_SAGEMAKER_PREFIX, self.gpu.name_prefix)
            if self.gpu.image_uri:
                function.add_environment(ENV_SAGEMAKER_IMAGE, self.gpu.image_uri)

        self.api = Api(self, "Api", config=config, management=self.functions.api,
                       inference=self.functions.inference_target, authorizer_function=self.functions.authorizer,
                       image_inference=self.functions.image_inference, image_pool_path=IMAGE_POOL_PATH)
        inference_functions = [self.functions.inference]
        if self.functions.image_inference is not None:
            inference_functions.append(self.functions.image_inference)
        self.monitoring = Monitoring(self, "Monitoring", config=config, rest_api=self.api.rest_api,
                                     inference=inference_functions, management=self.functions.api,
                                     state_machine=self.workflow.state_machine,
                                     workflow_logs=self.workflow.log_group)
        # SageMaker's blue/green update rolls back on its own when one of these alarms fires.
        alarm_names = ",".join(self.monitoring.rollback_alarm_names)
        for function in (*self.functions.deploy_tasks.values(), self.functions.api):
            function.add_environment(ENV_ROLLBACK_ALARMS, alarm_names)
        self._grant()

        outputs = {
            "ApiUrl": (self.api.url, "maas API base URL (export MAAS_URL=...)"),
            "ModelBucketName": (self.store.bucket.bucket_name, "versioned S3 bucket holding model artifacts"),
            "RegistryTableName": (self.store.table.table_name, "DynamoDB registry table"),
            "DeployStateMachineArn": (self.workflow.state_machine.state_machine_arn, "deploy workflow"),
            "AlarmTopicArn": (self.monitoring.topic.topic_arn, "SNS topic of the alarms: subscribe to it"),
            "DashboardName": (self.monitoring.dashboard.dashboard_name, "CloudWatch dashboard"),
        }
        for key, (value, description) in outputs.items():
            CfnOutput(self, key, value=value, description=description)

    def _grant(self) -> None:
        bucket, table = self.store.bucket, self.store.table
        table_arns = [table.table_arn, f"{table.table_arn}/index/{INDEX_NAME}"]
        models = bucket.arn_for_objects(f"{MODELS_PREFIX}*")
        uploads = bucket.arn_for_objects(f"{UPLOADS_PREFIX}*")
        functions = self.functions

        def allow(role: iam.IRole, actions: tuple[str, ...], resources: list[str]) -> None:
            role.add_to_principal_policy(iam.PolicyStatement(actions=list(actions), resources=resources))

        # Management API, cleanup and the optimize task (it registers a version): the whole store
        # (uploads and models) and the registry.
        for role in (functions.api_role, functions.cleanup_role, functions.optimize_role):
            allow(role, UPLOAD_WRITE, [uploads])
            allow(role, MODEL_WRITE, [models])
            allow(role, BUCKET_LIST, [bucket.bucket_arn])
            allow(role, REGISTRY_WRITE, table_arns)
        self.workflow.state_machine.grant_start_execution(functions.api_role)
        # a manual rollback stops the deploy's execution (named after the deployment id)
        allow(functions.api_role, ("states:StopExecution", "states:DescribeExecution"),
              [self.workflow.executions_arn])
        # ... and puts a SageMaker endpoint back on its previous configuration
        self.gpu.grant_roll_back_endpoints(functions.api_role)
        # Deploy tasks: registry writes, committed models read (smoke test), SageMaker endpoints.
        allow(functions.deploy_role, REGISTRY_WRITE, table_arns)
        allow(functions.deploy_role, OBJECT_READ, [models])
        self.gpu.grant_manage_endpoints(functions.deploy_role)
        # check_health reads the canary's metrics (GetMetricData has no resource-level permissions)
        functions.deploy_role.add_to_principal_policy(iam.PolicyStatement(
            actions=["cloudwatch:GetMetricData"], resources=["*"]))
        # Inference: read routes, versions and tokens; read committed models; call maas endpoints.
        allow(functions.inference_role, REGISTRY_READ, [table.table_arn])
        allow(functions.inference_role, OBJECT_READ, [models])
        self.gpu.grant_invoke_endpoints(functions.inference_role)
        # Authorizer: token lookups only.
        allow(functions.authorizer_role, ("dynamodb:GetItem",), [table.table_arn])
        # SageMaker endpoints load committed models (it lists the version's prefix, then downloads it).
        allow(self.gpu.execution_role, OBJECT_READ, [models])
        self.gpu.execution_role.add_to_principal_policy(iam.PolicyStatement(
            actions=["s3:ListBucket"], resources=[bucket.bucket_arn],
            conditions={"StringLike": {"s3:prefix": [f"{MODELS_PREFIX}*"]}}))
        # an endpoint update names the alarms that roll it back
        allow(functions.deploy_role, ("cloudwatch:DescribeAlarms",),
              [self.format_arn(service="cloudwatch", resource="alarm", resource_name=name,
                               arn_format=ArnFormat.COLON_RESOURCE_NAME)
               for name in self.monitoring.rollback_alarm_names])


def build_app(context: Mapping[str, Any] | None = None, *, nag: bool = True,
              env: Environment | None = None, outdir: str | None = None) -> tuple[App, MaasStack]:
    """The CDK app of the stage named in the context (``maas:stage``, default dev) and the account-wide
    ``maas-account`` stack it depends on, with cdk-nag's AWS Solutions checks (every finding either fixed
    or acknowledged with its reason in infra/nag.py)."""
    app = App(context=dict(context) if context else None, outdir=outdir)
    config = from_context(app.node.try_get_context)
    account = AccountSettings(app, ACCOUNT_STACK_NAME, env=env)
    stack = MaasStack(app, f"maas-{config.name}", config=config, env=env)
    stack.add_stack_dependency(account, "API Gateway logs with the account's role, which maas-account sets")
    acknowledge_findings(stack)
    acknowledge_account_findings(account)
    if nag:
        Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app, stack
