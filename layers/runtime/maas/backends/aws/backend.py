"""The AWS backend: models in S3 (versioned bucket), the registry in DynamoDB, validation in a child
process (on Lambda, /tmp holds the staged file). Same ports, same guarantees as the local backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from maas.backends.aws.artifacts import S3ArtifactStore
from maas.backends.aws.clients import make_client
from maas.backends.aws.registry import DynamoRegistry
from maas.domain import Signature
from maas.errors import InvalidInput
from maas.ports import ArtifactStore, Registry, Validator
from maas.settings import ENV_BUCKET, ENV_ENDPOINT, ENV_TABLE, Settings


class LazyValidator:
    """The sandboxed validator, imported on first use: the inference function never validates, and
    importing onnx would only lengthen its cold start."""

    def __init__(self, settings: Settings):
        self._limits = settings.limits
        self._real: Validator | None = None

    def validate(self, path: Path) -> Signature:
        if self._real is None:
            from maas.inference.validation import SubprocessValidator

            self._real = SubprocessValidator(self._limits)
        return self._real.validate(path)


class AwsBackend:
    """Registry, artifact store and validator on AWS (``maas.ports.Backend``)."""

    def __init__(self, settings: Settings, *, bucket: str, table: str, s3: Any = None, dynamodb: Any = None,
                 validator: Validator | None = None, endpoint_url: str | None = None):
        self.settings = settings
        self.bucket = bucket
        self.table = table
        self.s3 = s3 if s3 is not None else make_client("s3", endpoint_url=endpoint_url)
        self.dynamodb = dynamodb if dynamodb is not None else make_client("dynamodb", endpoint_url=endpoint_url)
        self.registry: Registry = DynamoRegistry(self.dynamodb, table,
                                                 page_size_max=settings.limits.page_size_max)
        self.artifacts: ArtifactStore = S3ArtifactStore(self.s3, bucket, settings.limits)
        self.validator: Validator = validator if validator is not None else LazyValidator(settings)

    @classmethod
    def from_env(cls, settings: Settings | None = None, **kwargs: Any) -> AwsBackend:
        """Built from ``MAAS_BUCKET`` and ``MAAS_TABLE`` (set by the CDK stack on every function)."""
        missing = [name for name in (ENV_BUCKET, ENV_TABLE) if not os.environ.get(name)]
        if missing:
            raise InvalidInput(f"{missing[0]} is not set: the AWS backend needs the bucket and table names",
                               field=missing[0])
        return cls(settings or Settings.from_env(), bucket=os.environ[ENV_BUCKET], table=os.environ[ENV_TABLE],
                   endpoint_url=os.environ.get(ENV_ENDPOINT) or None, **kwargs)

    def close(self) -> None:
        """Nothing to release: boto3 clients hold only pooled connections."""


__all__ = ["ENV_BUCKET", "ENV_ENDPOINT", "ENV_TABLE", "AwsBackend"]
