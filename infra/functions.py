"""The Lambda functions and their layers.

Layers (built without Docker by ``infra.bundling``): ``runtime`` (the maas package), ``inference``
(numpy, onnxruntime, pydantic, Powertools) and ``api`` (the inference set plus onnx, FastAPI, Mangum).
Every function is Python 3.12 on the stage's architecture, logs to its own log group with the stage's
retention, is traced by X-Ray and runs under its own role (the stack grants the data access).

Reserved concurrency (stage config) caps inference and guarantees capacity to management and to every
deploy task, so a traffic spike can never starve a rollback."""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration, RemovalPolicy, Size
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.bundling import REPO_ROOT, layer_code
from infra.config import StageConfig, log_retention
from maas.services.deploy import ROLLBACK, WORKFLOW, StepName
from maas.settings import ENV_ARTIFACT_CACHE_DIR, ENV_POOL_PATH, ENV_VALIDATION_MEMORY, VALIDATION_PARENT_MB

FUNCTIONS_DIR = REPO_ROOT / "functions"
RUNTIME = lambda_.Runtime.PYTHON_3_12
IMAGE_POOL_PATH = "/image"
API_TIMEOUT = Duration.seconds(29)  # API Gateway's integration timeout
DEPLOY_TIMEOUT = Duration.minutes(5)  # a smoke test loads and runs the model
OPTIMIZE_TIMEOUT = Duration.minutes(15)  # quantize, compare on samples, validate and commit a version
CLEANUP_TIMEOUT = Duration.minutes(15)
#: An inference function stops a model run before API Gateway gives up on the request (29 s), so the
#: caller gets maas's 504 naming the bound and the function is free for the next request.
RUN_DEADLINE_ENV = {"MAAS_MAX_INFERENCE_SECONDS": "25"}


def _camel(name: str) -> str:
    return "".join(part.title() for part in name.split("_"))


class Functions(Construct):
    """``api``, ``inference`` (+ ``inference_target``, the ``live`` alias when provisioned concurrency is
    on), ``image_inference`` (container image; None without container pools), ``authorizer``,
    ``deploy_tasks`` (step name -> function, one per ``maas.services.deploy`` step), ``cleanup``, and
    the roles they run under: ``api_role``, ``inference_role``, ``authorizer_role``, ``deploy_role``,
    ``optimize_role``, ``cleanup_role``."""

    def __init__(self, scope: Construct, construct_id: str, *, config: StageConfig,
                 environment: Mapping[str, str]) -> None:
        super().__init__(scope, construct_id)
        self._config = config
        self._environment = dict(environment)
        self.architecture = (lambda_.Architecture.ARM_64 if config.architecture == "arm64"
                             else lambda_.Architecture.X86_64)
        self.runtime_layer = self._layer("RuntimeLayer", "runtime", "maas package (layers/runtime/maas)")
        self.inference_layer = self._layer("InferenceLayer", "inference", "numpy, onnxruntime, pydantic, Powertools")
        self.api_layer = self._layer("ApiLayer", "api", "inference layer + onnx, FastAPI, Mangum")

        self.api_role = self._role("ApiRole", "management API")
        self.inference_role = self._role("InferenceRole", "inference")
        self.authorizer_role = self._role("AuthorizerRole", "token authorizer")
        self.deploy_role = self._role("DeployRole", "deploy workflow tasks")
        self.optimize_role = self._role("OptimizeRole", "deploy workflow's optimize task (registers a version)")
        self.cleanup_role = self._role("CleanupRole", "scheduled store cleanup")

        self.api = self._function(
            "Api", "api", "handler.handler", role=self.api_role, layers=[self.api_layer],
            memory=config.api_memory_mb, timeout=API_TIMEOUT, reserved=config.api_reserved_concurrency,
            description="maas management API (FastAPI behind Mangum)",
            extra_env=validation_env(config.api_memory_mb),
        )
        self.inference = self._function(
            "Inference", "inference", "handler.handler", role=self.inference_role, layers=[self.inference_layer],
            memory=config.inference_memory_mb, timeout=API_TIMEOUT,
            reserved=config.inference_reserved_concurrency,
            description="maas inference (Open Inference Protocol v2), zip pool",
            # Powertools' tracer import costs ~0.2 s of cold start; Lambda's own X-Ray segment remains.
            extra_env={"POWERTOOLS_TRACE_DISABLED": "true", ENV_ARTIFACT_CACHE_DIR: "/tmp/maas-artifacts",
                       **RUN_DEADLINE_ENV},
        )
        self.inference_target: lambda_.IFunction = self.inference
        if config.inference_provisioned_concurrency:
            self.inference_target = lambda_.Alias(
                self, "InferenceLive", alias_name="live", version=self.inference.current_version,
                provisioned_concurrent_executions=config.inference_provisioned_concurrency,
            )
        self.authorizer = self._function(
            "Authorizer", "authorizer", "handler.handler", role=self.authorizer_role,
            layers=[self.inference_layer], memory=config.authorizer_memory_mb, timeout=Duration.seconds(10),
            reserved=None, description="maas token authorizer for API Gateway",
            extra_env={"POWERTOOLS_TRACE_DISABLED": "true"},
        )
        self.deploy_tasks: dict[str, lambda_.Function] = {}
        for step in (*WORKFLOW, ROLLBACK):
            # The optimize step registers a new (quantized) version: it needs onnx and the quantizer (the api
            # layer), write access to the store, and time; every other step only reads models.
            optimizing = step.name is StepName.OPTIMIZE
            # The smoke test and the optimization run the model in a sandboxed child capped below the
            # function's memory: they get the optimize function's size, so a bomb meets the child's cap.
            sandboxed = optimizing or step.name is StepName.SMOKE_TEST
            self.deploy_tasks[step.name.value] = self._function(
                f"Deploy{_camel(step.name.value)}", "deploy", f"handler.{step.name.value}",
                role=self.optimize_role if optimizing else self.deploy_role,
                layers=[self.api_layer if optimizing else self.inference_layer],
                memory=config.optimize_memory_mb if sandboxed else config.deploy_memory_mb,
                timeout=OPTIMIZE_TIMEOUT if optimizing else DEPLOY_TIMEOUT,
                reserved=config.deploy_reserved_concurrency, description=f"maas deploy step: {step.description}",
                extra_env=validation_env(config.optimize_memory_mb) if sandboxed else None,
            )
        self.cleanup = self._function(
            "Cleanup", "deploy", "handler.cleanup", role=self.cleanup_role, layers=[self.inference_layer],
            memory=config.deploy_memory_mb, timeout=CLEANUP_TIMEOUT, reserved=None,
            description="maas store cleanup: expired uploads, stale PENDING versions, unreferenced artifacts",
        )
        events.Rule(
            self, "CleanupSchedule", description="maas store cleanup",
            schedule=events.Schedule.rate(Duration.minutes(config.cleanup_every_minutes)),
            targets=[targets.LambdaFunction(self.cleanup, retry_attempts=2)],
        )

        self.image_inference: lambda_.DockerImageFunction | None = None
        if config.container_pools:
            log_group = self._log_group("ImageInference")
            log_group.grant_write(self.inference_role)  # the shared role writes both pools' logs and EMF
            self.image_inference = lambda_.DockerImageFunction(
                self, "ImageInference",
                code=lambda_.DockerImageCode.from_image_asset(
                    str(REPO_ROOT), file="functions/inference/Dockerfile",
                    platform=(ecr_assets.Platform.LINUX_ARM64 if config.architecture == "arm64"
                              else ecr_assets.Platform.LINUX_AMD64),
                ),
                architecture=self.architecture,
                role=self.inference_role,
                memory_size=config.image_inference_memory_mb,
                ephemeral_storage_size=_ephemeral(config.image_inference_memory_mb),
                timeout=API_TIMEOUT,
                reserved_concurrent_executions=config.inference_reserved_concurrency,
                tracing=lambda_.Tracing.ACTIVE,
                log_group=log_group,
                description="maas inference, container-image pool for large models",
                environment={**self._environment, "POWERTOOLS_SERVICE_NAME": "maas-inference",
                             "POWERTOOLS_TRACE_DISABLED": "true", ENV_POOL_PATH: IMAGE_POOL_PATH,
                             **RUN_DEADLINE_ENV},
            )

    # -- helpers ------------------------------------------------------------------------------------

    def _layer(self, construct_id: str, layer: str, description: str) -> lambda_.LayerVersion:
        return lambda_.LayerVersion(
            self, construct_id, code=layer_code(layer, self._config.architecture),
            compatible_runtimes=[RUNTIME], compatible_architectures=[self.architecture],
            description=description, removal_policy=RemovalPolicy.DESTROY,
        )

    def _role(self, construct_id: str, purpose: str) -> iam.Role:
        return iam.Role(self, construct_id, assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                        description=f"maas {purpose} (least privilege: granted by the stack)")

    def _log_group(self, construct_id: str) -> logs.LogGroup:
        return logs.LogGroup(
            self, f"{construct_id}Logs",
            retention=log_retention(self._config.log_retention_days),
            removal_policy=RemovalPolicy.RETAIN if self._config.retain_data else RemovalPolicy.DESTROY,
        )

    def _function(self, construct_id: str, role_dir: str, handler: str, *, role: iam.Role,
                  layers: list[lambda_.LayerVersion], memory: int, timeout: Duration, reserved: int | None,
                  description: str, extra_env: Mapping[str, str] | None = None) -> lambda_.Function:
        log_group = self._log_group(construct_id)
        log_group.grant_write(role)
        return lambda_.Function(
            self, construct_id,
            runtime=RUNTIME,
            architecture=self.architecture,
            handler=handler,
            code=lambda_.Code.from_asset(str(FUNCTIONS_DIR / role_dir), exclude=["__pycache__", "*.pyc",
                                                                                    "Dockerfile", "*.md"]),
            layers=[self.runtime_layer, *layers],
            role=role,
            memory_size=memory,
            ephemeral_storage_size=_ephemeral(memory) if role_dir == "inference" else None,
            timeout=timeout,
            reserved_concurrent_executions=reserved,
            tracing=lambda_.Tracing.ACTIVE,
            log_group=log_group,
            description=description,
            environment={**self._environment, "POWERTOOLS_SERVICE_NAME": f"maas-{role_dir}",
                         **(extra_env or {})},
        )


def validation_env(memory_mb: int) -> dict[str, str]:
    """A function that validates models (the API, the optimize task) gives its validation child the
    memory it does not need itself, so a model's memory bomb hits the child's cap, not Lambda's limit
    (which would kill the function, and with it the request)."""
    return {ENV_VALIDATION_MEMORY: str((memory_mb - VALIDATION_PARENT_MB) * 1024 * 1024)}


def _ephemeral(memory_mb: int) -> Size:
    """/tmp holds the artifact cache: room for the models the function's memory can serve."""
    return Size.mebibytes(max(512, min(10240, memory_mb * 2)))
