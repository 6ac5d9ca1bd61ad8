"""Optimize a version: dynamic int8 quantization registered as a derived version (lineage to its parent)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from maas.api.deps import Deployer, ModelName, ServicesDep, VersionRef
from maas.api.idempotency import IdempotentRoute
from maas.api.schemas import problem_responses
from maas.domain import ModelVersion, OptimizeGoal

router = APIRouter(tags=["models"], route_class=IdempotentRoute)  # Idempotency-Key (maas.api.idempotency)


class OptimizeVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tolerance: float = Field(
        default=0.05, ge=0, le=1, allow_inf_nan=False,
        description="Largest accepted difference of each float output from the parent's, relative to "
                    "max(1, the output's peak magnitude); integer/label outputs must agree on >= 90% of elements",
    )
    goal: OptimizeGoal = Field(
        default=OptimizeGoal.LATENCY,
        description="What the derived version is for: 'latency' (it must be measurably faster than the parent "
                    "in paired runs) or 'size' (smaller, and not measurably slower). It must be smaller either way",
    )


class OptimizedVersion(BaseModel):
    version: ModelVersion = Field(description="The derived (int8) version, READY, with parent_version set")
    report: dict[str, Any] = Field(
        description="method, scheme (weights: s7, s7-per-channel or u8), goal, reused, parent_version, version, "
                    "parent_bytes, derived_bytes, size_ratio, parent_p50_ms, derived_p50_ms, speedup, "
                    "speedup_interval (99%), timing_pairs, max_abs_diff, max_rel_diff, tolerance, min_agreement, "
                    "samples, batch, inputs, compared, outputs (per-output comparison), checks (portability, "
                    "size, accuracy, latency: passed and why)")


@router.post(
    "/models/{name}/versions/{version}/optimize", status_code=201, response_model=OptimizedVersion,
    responses={
        200: {"model": OptimizedVersion,
              "description": "The version was optimized before: its int8 derivative (report.reused is true)"},
        201: {"description": "A new int8 version was registered"},
        **problem_responses(401, 403, 404, 409, 415, 422, 503),
    },
)
def optimize_version(name: ModelName, version: VersionRef, services: ServicesDep, token: Deployer,
                     response: Response, body: OptimizeVersion | None = None) -> OptimizedVersion:
    """Quantize the version's weights to int8 and register the result as a new version, if it is exact on
    every CPU, smaller, within ``tolerance`` of the parent's outputs on sample inputs and faster (or, with
    ``goal: size``, not slower). Else 422 with ``check`` naming the failed check and the measured
    ``report``, and no version is created."""
    body = body or OptimizeVersion()
    derived, report = services.optimize.optimize(name, version, tolerance=body.tolerance, goal=body.goal.value,
                                                 created_by=token.name)
    if report.get("reused"):
        response.status_code = 200
    return OptimizedVersion(version=derived, report=report)
