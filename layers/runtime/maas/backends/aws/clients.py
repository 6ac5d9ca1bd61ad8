"""AWS clients made once per process (per Lambda container), with bounded retries.

They are botocore's low-level clients, exactly what ``boto3.client`` returns without boto3 itself:
importing boto3 pulls s3transfer and its resource model (~0.1-0.2 s of every cold start) for transfer
helpers and resources this package never uses.

botocore's ``standard`` retry mode retries throttles and transient errors with exponential backoff
and full jitter; ``max_attempts`` bounds it so a request fails (429/503) well inside API Gateway's
29-second limit instead of hanging."""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

import botocore.session
from botocore.config import Config

MAX_ATTEMPTS = 4


def client_config(**overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "retries": {"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        "connect_timeout": 3,
        "read_timeout": 20,
        "max_pool_connections": 32,
    }
    settings.update(overrides)
    return Config(**settings)


@cache
def session() -> botocore.session.Session:
    return botocore.session.get_session()


def make_client(service: str, *, endpoint_url: str | None = None, **config: Any) -> Any:
    """A client for ``service`` (``s3``, ``dynamodb``...); ``endpoint_url`` points at a local
    emulator (tests use moto's server on 127.0.0.1)."""
    cfg = client_config(**config)
    if service == "s3":
        cfg = cfg.merge(Config(signature_version="s3v4"))  # presigned URLs must be SigV4
    return session().create_client(service, endpoint_url=endpoint_url, config=cfg)


class LazyClient:
    """A client made on first use. Making one loads the service's JSON model (S3's is the largest,
    ~50-70 ms of a cold start): the inference function answers a model already in its ``/tmp`` cache
    with DynamoDB alone, so its S3 client waits until an artifact must be fetched."""

    def __init__(self, service: str, **kwargs: Any):
        self._service = service
        self._kwargs = kwargs
        self._client: Any = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = make_client(self._service, **self._kwargs)
                client = self._client
        return getattr(client, name)
