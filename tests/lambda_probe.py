"""The bomb corpus through the inference Lambda's handler, in a process of its own, under moto:
``python -m tests.lambda_probe WORKDIR`` prints one JSON line of outcomes.

Its own process because the engine's arena cap is process-wide and, on Lambda, follows the function's
memory (``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``, set here to 1024: a 320 MiB cap). Deploys are made with
the services the API would use; requests are API Gateway events with an invoke token.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

LAMBDA_MEMORY_MB = 1024
ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(LAMBDA_MEMORY_MB),
    "MAAS_MAX_INFERENCE_SECONDS": "2", "MAAS_MAX_OUTPUT_BYTES": str(16 * 1024 * 1024),
}


def main(workdir: Path) -> dict[str, Any]:
    os.environ.update(ENVIRONMENT)
    for variable in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        os.environ.pop(variable, None)
    import boto3
    from moto import mock_aws

    from maas.backends.aws import AwsBackend
    from maas.backends.aws.table import create_table
    from maas.domain import UploadPlan
    from maas.inference.memory import resident_bytes
    from maas.services.deployments import DeploymentService
    from maas.services.models import ModelService
    from maas.services.tokens import TokenService
    from maas.settings import Settings
    from tests.bombs import corpus
    from tests.conftest import TEST_BUCKET, TEST_TABLE
    from tests.functions import LambdaContext, api_event, load_handler
    from tests.models import InProcessValidator

    os.environ.update({"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_HOME": str(workdir / "home"),
                       "MAAS_ARTIFACT_CACHE_DIR": str(workdir / "artifact-cache")})
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=TEST_BUCKET)
        s3.put_bucket_versioning(Bucket=TEST_BUCKET, VersioningConfiguration={"Status": "Enabled"})
        create_table(boto3.client("dynamodb"), TEST_TABLE)
        settings = Settings.from_env(workdir / "home")
        backend = AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE,
                             validator=InProcessValidator(settings.limits))
        models = ModelService(backend.registry, backend.artifacts, backend.validator, settings.limits)
        deployments = DeploymentService(backend.registry, models)
        token = TokenService(backend.registry).create("app", ["invoke"])[1]
        bombs = corpus()
        for bomb in bombs:
            name = bomb.name.replace("_", "-")
            plan = UploadPlan(size=len(bomb.model), sha256=hashlib.sha256(bomb.model).hexdigest())
            models.create_model(name)
            pending = models.begin_version(name, plan=plan)
            backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(bomb.model), len(bomb.model))
            models.commit_version(name, pending.version.version, sha256=plan.sha256 or "", size=len(bomb.model))
            deployments.deploy(name, 1)

        module = load_handler("inference")

        def call(name: str, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            body = json.dumps({"inputs": inputs}).encode()
            event = api_event("v2_http_json_infer_default", model=name, token=token, body=body,
                              path=f"/v2/models/{name}/infer")
            before = resident_bytes()
            started = time.monotonic()
            raw = module.handler(event, LambdaContext(memory_limit_in_mb=LAMBDA_MEMORY_MB))
            payload = base64.b64decode(raw["body"]) if raw["isBase64Encoded"] else raw["body"].encode()
            answer = json.loads(payload)
            return {"status": raw["statusCode"], "type": str(answer.get("type", "")).rsplit("/", 1)[-1],
                    "detail": answer.get("detail", ""), "outputs": answer.get("outputs"),
                    "seconds": time.monotonic() - started, "rss_before": before, "rss_after": resident_bytes()}

        report: dict[str, Any] = {"bombs": {}}
        for bomb in bombs:
            name = bomb.name.replace("_", "-")
            report["bombs"][bomb.name] = {"bound": bomb.bound, "harmless": call(name, bomb.harmless),
                                          "hostile": call(name, bomb.hostile), "again": call(name, bomb.harmless)}
        from maas.inference.memory import MEMORY

        report["cap"] = MEMORY.cap
        return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
