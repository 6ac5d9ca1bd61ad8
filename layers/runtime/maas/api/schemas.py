"""Request and response bodies of the management API (the entities themselves are domain objects)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from maas.domain import (
    Alias,
    Deployment,
    HealthThresholds,
    Model,
    ModelVersion,
    Route,
    RunLimits,
    Scope,
    UploadTarget,
)
from maas.domain.names import MODEL_NAME, TOKEN_NAME


def _unencodable(value: Any) -> bool:
    """Whether ``value`` holds a string UTF-8 cannot encode (a lone surrogate such as ``"\\ud800"``).
    Iterative: a body nested as deep as the JSON parser allows must not exhaust the stack here."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return False


class Body(BaseModel):
    """Request bodies: unknown fields are refused (so a client never believes an ignored field was
    used), and so is text that is not Unicode. JSON may escape lone surrogates (``"\\ud800"``); Python
    keeps them in ``str``, the registries store them, and every later answer that includes them fails
    to encode: one request would break ``GET /models`` for everyone."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _unicode_only(cls, value: Any) -> Any:
        if _unencodable(value):
            raise ValueError("text must be valid Unicode (no lone surrogate escapes such as \\ud800)")
        return value


def _documented(pattern: str) -> dict[str, Any]:
    """The name rule in the OpenAPI document only: clients (and fuzzers) see what is accepted, while
    the domain validator keeps answering with its own message naming the rule in words."""
    return {"pattern": f"^{pattern}$"}


class CreateModel(Body):
    name: str = Field(max_length=63, examples=["fraud"], json_schema_extra=_documented(MODEL_NAME.pattern))
    description: str = Field(default="", max_length=4096)
    tags: dict[str, str] = Field(default_factory=dict)


class CreateVersion(Body):
    description: str = Field(default="", max_length=4096)
    limits: RunLimits | None = Field(default=None, description="The version's own bounds on one run "
                                     "(max_inference_seconds, max_output_bytes): at most the server's")
    size: int | None = Field(default=None, gt=0, description="Size of the bytes to upload (required on AWS)")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                               description="sha256 of the bytes to upload, hex (required on AWS)")
    part_size: int | None = Field(default=None, gt=0,
                                  description="Multipart upload: bytes per part (5 MiB to 5 GiB)")
    part_sha256: list[str] = Field(default_factory=list, max_length=10_000,
                                   description="Multipart upload: sha256 of each part, hex, in order")


class CommitVersion(Body):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the uploaded bytes, hex")
    size: int = Field(gt=0, description="size of the uploaded bytes")


class SetAlias(Body):
    version: int = Field(ge=1, le=999_999_999)


class StartDeployment(Body):
    version: Annotated[StrictInt | str, Field(description="Version number or alias", examples=[3, "champion"])]
    strategy: str = Field(default="all_at_once", examples=["canary"], description=(
        "all_at_once: all traffic at once (after an optional bake at 100%); canary: `canary_percent` of "
        "traffic for `bake_seconds`, then all; linear: `linear_step_percent` more every "
        "`linear_interval_seconds`, health checked after each step"))
    target: str = Field(default="lambda", description="lambda (the inference functions / this server) or "
                                                      "sagemaker where the server has that target")
    canary_percent: float | None = Field(default=None, gt=0, le=100,
                                         description="canary: share of traffic the new version gets (default 10)")
    linear_step_percent: float | None = Field(default=None, gt=0, le=100,
                                              description="linear: traffic added per step (default 10)")
    bake_seconds: int | None = Field(default=None, ge=0, le=86_400,
                                     description="Seconds the new version's health is watched before "
                                                 "promoting (default 0)")
    linear_interval_seconds: int | None = Field(default=None, ge=0, le=86_400,
                                                description="linear: seconds between steps (default: bake_seconds); "
                                                            "all the waits of a deploy together: at most 82,800")
    optimize: bool = Field(default=False, description="Quantize the version (int8, checked against its "
                                                      "outputs) and deploy the derived version")
    thresholds: HealthThresholds | None = Field(default=None, description=(
        "Health limits during the bake: max_error_rate (default 0.01), max_p99_latency_ms, "
        "max_p99_latency_ratio to the stable version (default 2)"))


class Rollback(Body):
    to_version: int | None = Field(default=None, ge=1, le=999_999_999)


class CreateToken(Body):
    name: str = Field(max_length=64, json_schema_extra=_documented(TOKEN_NAME.pattern))
    scopes: list[str] = Field(min_length=1, max_length=3, examples=[["invoke"]],
                              json_schema_extra={"items": {"type": "string", "enum": [s.value for s in Scope]}})
    model: str | None = Field(default=None, max_length=63, json_schema_extra=_documented(MODEL_NAME.pattern))


class TokenInfo(BaseModel):
    id: str
    name: str
    scopes: list[Scope]
    model: str | None
    created_at: datetime
    created_by: str
    revoked: bool


class CreatedToken(TokenInfo):
    token: str | None = Field(description="The secret; shown only in this response (null in a replay of the "
                                          "same Idempotency-Key: the secret is never stored)")


class StagedUploadInfo(BaseModel):
    upload_id: str
    size: int
    sha256: str


class PendingVersionInfo(BaseModel):
    version: ModelVersion
    upload: UploadTarget


class ModelStatus(BaseModel):
    model: Model
    latest_version: int | None
    route: Route | None
    deployment: Deployment | None


class ModelPage(BaseModel):
    items: list[Model]
    next_cursor: str | None = None


class VersionPage(BaseModel):
    items: list[ModelVersion]
    next_cursor: str | None = None


class DeploymentPage(BaseModel):
    items: list[Deployment]
    next_cursor: str | None = None


class AliasList(BaseModel):
    items: list[Alias]


class TokenList(BaseModel):
    items: list[TokenInfo]


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json errors a route can answer."""
    return {code: {"description": "Problem details", "content": {"application/problem+json": {}}}
            for code in codes}
