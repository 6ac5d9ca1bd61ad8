"""Domain objects and their rules. Pure data: no I/O, no transport, no storage."""

from maas.domain.models import (
    Alias,
    Deployment,
    DeploymentEvent,
    DeploymentStatus,
    HealthThresholds,
    Model,
    ModelVersion,
    Page,
    Route,
    Scope,
    Signature,
    Strategy,
    TensorSpec,
    Token,
    UploadTarget,
    VersionStatus,
)
from maas.domain.names import (
    check_alias_name,
    check_model_name,
    check_token_name,
    check_version_number,
)

__all__ = [
    "Alias",
    "Deployment",
    "DeploymentEvent",
    "DeploymentStatus",
    "HealthThresholds",
    "Model",
    "ModelVersion",
    "Page",
    "Route",
    "Scope",
    "Signature",
    "Strategy",
    "TensorSpec",
    "Token",
    "UploadTarget",
    "VersionStatus",
    "check_alias_name",
    "check_model_name",
    "check_token_name",
    "check_version_number",
]
