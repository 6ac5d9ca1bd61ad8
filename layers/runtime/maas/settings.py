"""Runtime settings, read from the environment (prefix ``MAAS_``) with safe defaults."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from maas.errors import InvalidInput

# Environment variables the CDK stack sets on the Lambda functions (infra/ imports these names, the AWS
# backend and the handlers read them: one spelling for both sides).
ENV_BUCKET = "MAAS_BUCKET"
ENV_TABLE = "MAAS_TABLE"
ENV_ENDPOINT = "MAAS_AWS_ENDPOINT_URL"  # a local emulator (moto server) instead of AWS
ENV_STATE_MACHINE = "MAAS_DEPLOY_STATE_MACHINE_ARN"  # set: deploys run as Step Functions executions
ENV_ARTIFACT_CACHE_DIR = "MAAS_ARTIFACT_CACHE_DIR"
ENV_ARTIFACT_CACHE_BYTES = "MAAS_ARTIFACT_CACHE_BYTES"
ENV_ROUTE_TTL = "MAAS_ROUTE_TTL_S"
ENV_SAGEMAKER_ROLE = "MAAS_SAGEMAKER_ROLE_ARN"  # the execution role SageMaker models run under
ENV_SAGEMAKER_IMAGE = "MAAS_SAGEMAKER_IMAGE_URI"  # the GPU serving image (functions/sagemaker)
ENV_ROLLBACK_ALARMS = "MAAS_ROLLBACK_ALARMS"  # comma-separated CloudWatch alarms SageMaker updates roll back on
#: SageMaker models, endpoint configs and endpoints maas creates are named with this prefix; the stack's
#: IAM grants cover only those names.
SAGEMAKER_NAME_PREFIX = "maas-"
ENV_SAGEMAKER_PREFIX = "MAAS_SAGEMAKER_PREFIX"  # the stage's SageMaker name prefix (default SAGEMAKER_NAME_PREFIX)


def sagemaker_name_prefix(stage: str) -> str:
    """The names a stage's SageMaker models, endpoint configs and endpoints start with: ``maas-<stage>-``,
    so two stages in one account never share an endpoint (nor the IAM grants on its name pattern)."""
    return f"{SAGEMAKER_NAME_PREFIX}{stage}-"
ENV_POOL_PATH = "MAAS_POOL_PATH"  # a second inference pool's path prefix on the shared API (e.g. /image)


def _default_home() -> Path:
    return Path(os.environ.get("MAAS_HOME") or Path.home() / ".maas").expanduser()


#: The validation child's address-space cap never goes below this: Python, onnx and onnxruntime need it.
MIN_VALIDATION_MEMORY_BYTES = 1024 * 1024 * 1024
#: What a process that validates (the API, the optimize task) keeps for itself beside its child.
VALIDATION_PARENT_MB = 512
ENV_VALIDATION_MEMORY = "MAAS_VALIDATION_MEMORY_BYTES"


class Limits(BaseModel):
    """Caps that protect the server from hostile or accidental oversize input."""

    max_model_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    max_nodes: int = Field(default=100_000, gt=0)
    max_request_bytes: int = Field(default=6 * 1024 * 1024, gt=0)
    max_tensor_elements: int = Field(default=4 * 1024 * 1024, gt=0)
    #: One model run's deadline: past it onnxruntime is stopped (``RunOptions.terminate``) and the
    #: request gets 504. Bounds what an input-dependent loop or allocation can take from a server thread.
    max_inference_seconds: float = Field(default=30.0, gt=0)
    #: The bytes a model's outputs may hold for one request (as tensors, before encoding): a 70-byte
    #: request to an outer-product model once produced a 400 MB JSON answer.
    max_output_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    validation_timeout_s: float = Field(default=120.0, gt=0)
    #: The sandboxed int8 optimization of one version (quantize, compare on samples, time both): under
    #: the optimize function's 15 minutes, with room left to validate and commit the derived version.
    optimize_timeout_s: float = Field(default=600.0, gt=0)
    validation_memory_bytes: int = Field(default=4 * 1024 * 1024 * 1024, gt=0)
    #: RLIMIT_NOFILE of the validation child: imports, the model file and onnxruntime's own files
    #: need about a dozen descriptors; a model has no business opening more.
    validation_max_open_files: int = Field(default=64, ge=16)
    #: Threads and processes the validation child may start (RLIMIT_NPROC, counted above what its
    #: user already runs): onnxruntime starts one, a model that somehow forks gets no further.
    validation_max_new_tasks: int = Field(default=16, ge=4)
    #: Validations (each a child of up to ``validation_memory_bytes``) running at once in this process;
    #: more wait up to ``validation_queue_timeout_s``, then get 503 with Retry-After (the version stays
    #: PENDING: committing again retries).
    max_concurrent_validations: int = Field(default=2, ge=1)
    validation_queue_timeout_s: float = Field(default=10.0, ge=0)
    #: What every served session holds together, weights and working memory: one onnxruntime arena
    #: capped at this many bytes (``maas.inference.memory``). A run that would pass it answers 422 (it
    #: could never fit) or 503 (other runs hold the rest). None: half the machine's (or cgroup's) memory,
    #: or half the Lambda function's memory less 384 MiB.
    inference_memory_bytes: int | None = Field(default=None, ge=64 * 1024 * 1024)
    #: Sessions kept loaded, by the memory each was measured to hold on load (at least its artifact's
    #: bytes); never more than ``inference_memory_bytes``.
    session_cache_bytes: int = Field(default=1024 * 1024 * 1024, gt=0)
    #: A request body must keep arriving: at most this long between two chunks, and (uploads aside,
    #: which stream to storage) this long in all. A stranger holding connections open gets a 408.
    body_idle_timeout_s: float = Field(default=30.0, gt=0)
    #: The request line and headers must all arrive within this long of the connection opening (or of
    #: the previous response): a silent or trickling connection is answered 408 and closed.
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=120.0, gt=0)
    #: Request bytes held in memory across every connection at once (uploads stream and do not count):
    #: past it a request gets 503 with Retry-After instead of more memory.
    max_buffered_request_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    upload_ttl_s: int = Field(default=24 * 3600, gt=0)
    page_size_max: int = Field(default=1000, gt=0)


class Settings(BaseModel):
    home: Path = Field(default_factory=_default_home)
    limits: Limits = Field(default_factory=Limits)

    @classmethod
    def from_env(cls, home: Path | str | None = None) -> Settings:
        overrides = {
            name: os.environ[f"MAAS_{name.upper()}"]
            for name in Limits.model_fields
            if f"MAAS_{name.upper()}" in os.environ
        }
        try:
            limits = Limits.model_validate(overrides)
        except ValidationError as error:
            first = error.errors()[0]
            variable = f"MAAS_{str(first['loc'][0]).upper()}"
            raise InvalidInput(f"{variable}: {first['msg']}", field=variable) from None
        resolved_home = Path(home).expanduser() if home is not None else _default_home()
        return cls(home=resolved_home, limits=limits)
