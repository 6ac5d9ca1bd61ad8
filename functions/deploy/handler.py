"""Deploy-side Lambda tasks (one entry per task). Today: the scheduled store cleanup; the deploy
workflow's steps join here as Step Functions tasks.

``cleanup`` is the AWS half of "nothing orphaned": uploads that never committed expire (the bucket's
lifecycle rule on ``uploads/`` is the backstop), PENDING versions past the upload TTL become FAILED
and are removed a TTL later, and artifacts no version references are deleted (a delete marker: the
bytes stay recoverable as a noncurrent S3 version for the stage's retention)."""

from __future__ import annotations

from typing import Any

from maas.backends.aws import AwsBackend
from maas.backends.aws.telemetry import get_logger, get_tracer, metrics
from maas.services.cleanup import CleanupService
from maas.settings import Settings

SERVICE = "maas-deploy"
logger = get_logger(SERVICE)
tracer = get_tracer(SERVICE)

settings = Settings.from_env()
backend = AwsBackend.from_env(settings)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def cleanup(event: dict[str, Any], context: Any) -> dict[str, Any]:
    report = CleanupService(backend.registry, backend.artifacts, settings.limits).run()
    summary = {
        "expired_versions": [f"{model}/{version}" for model, version in report.expired_versions],
        "removed_failed": [f"{model}/{version}" for model, version in report.removed_failed],
        "removed_uploads": report.removed_uploads,
        "removed_artifacts": report.removed_blobs,
    }
    counts = {key: len(value) for key, value in summary.items()}
    for key, count in counts.items():
        # e.g. CleanupRemovedArtifacts: a steady climb means pushes are being abandoned
        metrics.add_metric(name="Cleanup" + key.title().replace("_", ""), unit="Count", value=count)
    logger.info("cleanup finished", extra={"counts": counts})
    return summary
