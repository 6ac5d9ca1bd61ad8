"""Stage configuration (dev, prod, or any stage built on one of them) read from CDK context.

Typed defaults live here, not in ``cdk.json``: a typo or a wrong type in the context fails synth with the
field's name instead of deploying a half-configured stack. ``cdk.json`` holds the per-stage overrides:

    "maas:stage": "dev",                      # or: npx cdk synth -c maas:stage=prod
    "maas:stages": {"prod": {"alarm_email": "oncall@example.com"},
                    "staging": {"base": "prod", "retain_data": false}}
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from aws_cdk import aws_logs as logs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from maas.errors import InvalidInput
from maas.settings import MIN_VALIDATION_MEMORY_BYTES, VALIDATION_PARENT_MB

STAGE_CONTEXT_KEY = "maas:stage"
STAGES_CONTEXT_KEY = "maas:stages"
STAGE_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,15}$"
# CloudWatch Logs accepts only these retention periods (days).
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192,
                      2557, 2922, 3288, 3653)

MemoryMb = Annotated[int, Field(ge=128, le=10240)]


class StageConfig(BaseModel):
    """Everything that differs between stages. Memory in MB, durations in seconds unless named."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=STAGE_NAME_PATTERN)
    architecture: Literal["x86_64", "arm64"] = "x86_64"

    api_memory_mb: MemoryMb
    inference_memory_mb: MemoryMb
    image_inference_memory_mb: MemoryMb
    deploy_memory_mb: MemoryMb
    #: the optimize task validates the versions it derives, as the API validates commits
    optimize_memory_mb: MemoryMb
    authorizer_memory_mb: MemoryMb

    # Reserved concurrency: a cap on inference and a guarantee for management and the deploy tasks, so a
    # traffic spike can never starve a rollback. None leaves a function in the unreserved pool (new AWS
    # accounts start with a concurrency limit too small for any reservation).
    inference_reserved_concurrency: int | None = Field(default=None, ge=1)
    api_reserved_concurrency: int | None = Field(default=None, ge=1)
    deploy_reserved_concurrency: int | None = Field(default=None, ge=1)
    # Provisioned concurrency on the inference function's "live" alias: no cold starts, billed per hour.
    inference_provisioned_concurrency: int = Field(default=0, ge=0)

    log_retention_days: int = 30
    # prod keeps data: the bucket and table survive `cdk destroy`, and the table has deletion protection.
    retain_data: bool = False
    noncurrent_version_days: int = Field(default=30, ge=1)
    upload_expiry_days: int = Field(default=2, ge=1)

    throttle_rate_limit: float = Field(default=100, gt=0)
    throttle_burst_limit: int = Field(default=200, ge=1)
    authorizer_cache_seconds: int = Field(default=300, ge=0, le=3600)

    alarm_error_rate_percent: float = Field(default=5.0, gt=0, le=100)
    alarm_p99_latency_ms: float = Field(default=1000.0, gt=0)
    alarm_throttles: int = Field(default=10, ge=1)
    alarm_email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")

    # Container-image assets (the image inference pool and the SageMaker GPU image) need Docker on the
    # machine that runs `cdk deploy`: opt-in, so a stage deploys from any machine by default.
    container_pools: bool = False
    cleanup_every_minutes: int = Field(default=60, ge=5)

    @field_validator("api_memory_mb", "optimize_memory_mb")
    @classmethod
    def _room_to_validate(cls, memory_mb: int) -> int:
        """These functions validate models in a child process capped below their own memory."""
        least = VALIDATION_PARENT_MB + MIN_VALIDATION_MEMORY_BYTES // (1024 * 1024)
        if memory_mb < least:
            raise ValueError(f"must be at least {least} MB: {VALIDATION_PARENT_MB} MB for the function and "
                             f"{least - VALIDATION_PARENT_MB} MB for the model validation child it runs")
        return memory_mb

    @field_validator("log_retention_days")
    @classmethod
    def _known_retention(cls, days: int) -> int:
        if days not in LOG_RETENTION_DAYS:
            raise ValueError(f"must be one of {', '.join(map(str, LOG_RETENTION_DAYS))}")
        return days


DEV = StageConfig(
    name="dev",
    api_memory_mb=2048,
    inference_memory_mb=2048,
    image_inference_memory_mb=4096,
    deploy_memory_mb=1024,
    optimize_memory_mb=2048,
    authorizer_memory_mb=512,
    log_retention_days=14,
)

PROD = DEV.model_copy(update={
    "name": "prod",
    "inference_memory_mb": 3008,
    "image_inference_memory_mb": 6144,
    "inference_reserved_concurrency": 200,
    "api_reserved_concurrency": 20,
    "deploy_reserved_concurrency": 2,
    "log_retention_days": 90,
    "retain_data": True,
    "noncurrent_version_days": 365,
    "throttle_rate_limit": 1000,
    "throttle_burst_limit": 2000,
})

BASES: dict[str, StageConfig] = {"dev": DEV, "prod": PROD}


def stage_config(stage: str, stages: dict[str, Any] | None = None) -> StageConfig:
    """The typed config of ``stage``: its base's defaults (``base``: dev or prod; a stage named prod is
    based on prod, any other on dev) overlaid with ``stages[stage]``. Errors name the context key."""
    overrides = dict((stages or {}).get(stage) or {})
    base_name = overrides.pop("base", "prod" if stage == "prod" else "dev")
    if base_name not in BASES:
        raise InvalidInput(f"{STAGES_CONTEXT_KEY}.{stage}.base must be one of {', '.join(BASES)}",
                           field=f"{STAGES_CONTEXT_KEY}.{stage}.base")
    try:
        return StageConfig.model_validate({**BASES[base_name].model_dump(), **overrides, "name": stage})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        key = STAGE_CONTEXT_KEY if where == "name" else f"{STAGES_CONTEXT_KEY}.{stage}.{where}"
        raise InvalidInput(f"cdk context {key}: {first['msg']}", field=key) from None


def from_context(try_get_context: Any) -> StageConfig:
    """Read the stage from a construct's ``node.try_get_context``."""
    stage = try_get_context(STAGE_CONTEXT_KEY) or "dev"
    stages = try_get_context(STAGES_CONTEXT_KEY) or {}
    if isinstance(stages, str):  # `-c 'maas:stages={"dev": {...}}'` on the command line arrives as text
        try:
            stages = json.loads(stages)
        except ValueError:
            raise InvalidInput(f"cdk context {STAGES_CONTEXT_KEY} must be a JSON object",
                               field=STAGES_CONTEXT_KEY) from None
    if not isinstance(stages, dict):
        raise InvalidInput(f"cdk context {STAGES_CONTEXT_KEY} must be an object", field=STAGES_CONTEXT_KEY)
    return stage_config(str(stage), stages)


def log_retention(days: int) -> logs.RetentionDays:
    """CDK's enum member for ``days`` (its members are listed in the same order as LOG_RETENTION_DAYS;
    the stack tests check the synthesized value)."""
    finite = [member for member in logs.RetentionDays if member is not logs.RetentionDays.INFINITE]
    return dict(zip(LOG_RETENTION_DAYS, finite, strict=True))[days]
