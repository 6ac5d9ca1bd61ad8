"""The AWS backend: models in S3 (versioned bucket), the registry in DynamoDB, validation in a child
process (on Lambda, /tmp holds the staged file), and deploys as Step Functions executions when the
stack gives a state machine. Same ports, same guarantees as the local backend."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maas.backends.aws.artifacts import S3ArtifactStore
from maas.backends.aws.clients import LazyClient, make_client
from maas.backends.aws.idempotency import DynamoIdempotencyStore
from maas.backends.aws.registry import DynamoRegistry
from maas.domain import Signature
from maas.errors import InvalidInput
from maas.ports import ArtifactStore, DeployExecutor, EndpointTarget, IdempotencyStore, Registry, Validator
from maas.settings import ENV_BUCKET, ENV_ENDPOINT, ENV_STATE_MACHINE, ENV_TABLE, Settings

if TYPE_CHECKING:
    from maas.inference.sandbox import Sandbox, SubprocessValidator


class LazyValidator:
    """The sandboxed validator, imported on first use: the inference function never validates, and
    importing onnx would only lengthen its cold start."""

    def __init__(self, settings: Settings):
        self._limits = settings.limits
        self._real: SubprocessValidator | None = None

    @property
    def sandbox(self) -> Sandbox:
        """The child-process runner behind it (smoke tests and optimizations use it too)."""
        return self._validator().sandbox

    def validate(self, path: Path) -> Signature:
        return self._validator().validate(path)

    def _validator(self) -> SubprocessValidator:
        if self._real is None:
            from maas.inference.sandbox import SubprocessValidator

            self._real = SubprocessValidator(self._limits)
        return self._real


class AwsBackend:
    """Registry, artifact store and validator on AWS (``maas.ports.Backend``)."""

    def __init__(self, settings: Settings, *, bucket: str, table: str, s3: Any = None, dynamodb: Any = None,
                 validator: Validator | None = None, endpoint_url: str | None = None,
                 state_machine_arn: str | None = None, deploy_executor: DeployExecutor | None = None):
        """``state_machine_arn``: deploys start executions of that state machine (its client is made
        on first use: functions that never deploy do not pay for it); ``deploy_executor`` overrides it.
        Neither: deploys run in the API's process."""
        self.settings = settings
        self.state_machine_arn = state_machine_arn
        self._endpoint_url = endpoint_url
        self._deploy_executor = deploy_executor
        self.bucket = bucket
        self.table = table
        self.s3 = s3 if s3 is not None else LazyClient("s3", endpoint_url=endpoint_url)
        self.dynamodb = dynamodb if dynamodb is not None else make_client("dynamodb", endpoint_url=endpoint_url)
        self.registry: Registry = DynamoRegistry(self.dynamodb, table,
                                                 page_size_max=settings.limits.page_size_max)
        self.artifacts: ArtifactStore = S3ArtifactStore(self.s3, bucket, settings.limits)
        # Same table as the registry (its own partition per key, expired by the table's TTL).
        self.idempotency: IdempotencyStore = DynamoIdempotencyStore(self.dynamodb, table)
        self.validator: Validator = validator if validator is not None else LazyValidator(settings)
        self._endpoint_targets: dict[str, EndpointTarget] | None = None

    @property
    def deploy_executor(self) -> DeployExecutor | None:
        """Step Functions when a state machine is configured, else None (in-process deploys)."""
        if self._deploy_executor is None and self.state_machine_arn:
            from maas.backends.aws.workflow import StepFunctionsExecutor

            client = make_client("stepfunctions", endpoint_url=self._endpoint_url)
            self._deploy_executor = StepFunctionsExecutor(client, self.state_machine_arn)
        return self._deploy_executor

    @property
    def endpoint_targets(self) -> Mapping[str, EndpointTarget]:
        """Deployment targets that shift traffic themselves: ``sagemaker`` where the stack configured it
        (``MAAS_SAGEMAKER_ROLE_ARN`` and ``MAAS_SAGEMAKER_IMAGE_URI`` set, as on the deploy functions),
        else none. Built on first use: functions that never deploy do not import it."""
        if self._endpoint_targets is None:
            from maas.backends.aws.sagemaker import TARGET, sagemaker_target_from_env

            target = sagemaker_target_from_env(self.settings, self.bucket)
            self._endpoint_targets = {TARGET: target} if target is not None else {}
        return self._endpoint_targets

    @classmethod
    def from_env(cls, settings: Settings | None = None, **kwargs: Any) -> AwsBackend:
        """Built from ``MAAS_BUCKET`` and ``MAAS_TABLE`` (set by the CDK stack on every function), and
        ``MAAS_DEPLOY_STATE_MACHINE_ARN`` where deploys run as Step Functions executions."""
        missing = [name for name in (ENV_BUCKET, ENV_TABLE) if not os.environ.get(name)]
        if missing:
            raise InvalidInput(f"{missing[0]} is not set: the AWS backend needs the bucket and table names",
                               field=missing[0])
        kwargs.setdefault("state_machine_arn", os.environ.get(ENV_STATE_MACHINE) or None)
        return cls(settings or Settings.from_env(), bucket=os.environ[ENV_BUCKET], table=os.environ[ENV_TABLE],
                   endpoint_url=os.environ.get(ENV_ENDPOINT) or None, **kwargs)

    def close(self) -> None:
        """Nothing to release: botocore clients hold only pooled connections."""


__all__ = ["ENV_BUCKET", "ENV_ENDPOINT", "ENV_STATE_MACHINE", "ENV_TABLE", "AwsBackend"]
