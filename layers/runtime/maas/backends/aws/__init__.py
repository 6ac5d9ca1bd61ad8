"""The AWS backend: S3 (versioned) for artifacts, DynamoDB (one table) for the registry.

Imports boto3; only composition roots (Lambda handlers, the CLI) import this package."""

from maas.backends.aws.backend import ENV_BUCKET, ENV_TABLE, AwsBackend

__all__ = ["ENV_BUCKET", "ENV_TABLE", "AwsBackend"]
