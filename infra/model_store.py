"""Where models and the registry live: the versioned S3 bucket and the DynamoDB table.

Nothing here grants access: ``infra.stack`` gives each function the actions it needs."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.config import StageConfig

# The key layout the AWS backend writes (maas.backends.aws.table; tests check the two agree).
PARTITION_KEY = "pk"
SORT_KEY = "sk"
INDEX_NAME = "gsi1"
INDEX_PARTITION_KEY = "gsi1pk"
INDEX_SORT_KEY = "gsi1sk"
#: Items carrying it expire (idempotency keys; maas.backends.aws.table.TTL_ATTRIBUTE).
TIME_TO_LIVE_ATTRIBUTE = "ttl"
# Key prefixes of the bucket (maas.backends.aws.artifacts).
MODELS_PREFIX = "models/"
UPLOADS_PREFIX = "uploads/"


class ModelStore(Construct):
    """``bucket``: model artifacts, versioned so a delete or an overwrite never loses bytes (a committed
    version is pinned by its S3 version id); ``table``: the registry; ``access_logs``: the bucket's
    server access logs."""

    def __init__(self, scope: Construct, construct_id: str, *, config: StageConfig) -> None:
        super().__init__(scope, construct_id)
        removal = RemovalPolicy.RETAIN if config.retain_data else RemovalPolicy.DESTROY
        auto_delete = not config.retain_data

        self.access_logs = s3.Bucket(
            self, "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
            removal_policy=removal,
            auto_delete_objects=auto_delete,
            lifecycle_rules=[s3.LifecycleRule(id="expire-access-logs", expiration=Duration.days(365))],
        )

        self.bucket = s3.Bucket(
            self, "Models",
            versioned=True,
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="models-bucket/",
            removal_policy=removal,
            auto_delete_objects=auto_delete,
            lifecycle_rules=[
                # Multipart uploads a client abandoned cost storage until aborted.
                s3.LifecycleRule(id="abort-incomplete-multipart",
                                 abort_incomplete_multipart_upload_after=Duration.days(1)),
                # Uploads that never committed: cleanup removes them after the upload TTL (24 h); this is
                # the backstop if cleanup is not running.
                s3.LifecycleRule(id="expire-uncommitted-uploads", prefix=UPLOADS_PREFIX,
                                 expiration=Duration.days(config.upload_expiry_days),
                                 noncurrent_version_expiration=Duration.days(1)),
                # Deleting a model only adds a delete marker: its bytes stay recoverable as a noncurrent
                # version for the stage's retention, then go.
                s3.LifecycleRule(id="keep-deleted-models", prefix=MODELS_PREFIX,
                                 noncurrent_version_expiration=Duration.days(config.noncurrent_version_days),
                                 expired_object_delete_marker=True),
            ],
        )

        self.table = dynamodb.Table(
            self, "Registry",
            partition_key=dynamodb.Attribute(name=PARTITION_KEY, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=SORT_KEY, type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True),
            deletion_protection=config.retain_data,
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            time_to_live_attribute=TIME_TO_LIVE_ATTRIBUTE,
            removal_policy=removal,
        )
        self.table.add_global_secondary_index(
            index_name=INDEX_NAME,
            partition_key=dynamodb.Attribute(name=INDEX_PARTITION_KEY, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=INDEX_SORT_KEY, type=dynamodb.AttributeType.STRING),
            projection_type=dynamodb.ProjectionType.ALL,
        )
