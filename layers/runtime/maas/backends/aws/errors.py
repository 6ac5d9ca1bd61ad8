"""AWS errors as maas errors: one translation for every S3 and DynamoDB call.

Throttles become 429 with ``Retry-After`` (the caller should slow down), outages and transient
faults 503 (retry later); botocore has already retried both with jittered backoff (see
``maas.backends.aws.clients``). Messages never carry bucket or table names, ARNs or request ids:
those stay in the logs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from maas.errors import MaasError, Throttled, Unavailable

log = logging.getLogger("maas.aws")

P = ParamSpec("P")
R = TypeVar("R")

THROTTLE_CODES = frozenset({
    "ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded",
    "ProvisionedThroughputExceededException", "TooManyRequestsException", "SlowDown",
    "RequestThrottled", "RequestThrottledException", "LimitExceededException",
})
UNAVAILABLE_CODES = frozenset({
    "ServiceUnavailable", "InternalError", "InternalServerError", "InternalFailure",
    "ServiceUnavailableException", "RequestTimeout", "RequestTimeoutException",
    "TransactionInProgressException",
})


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def is_throttle(error: BaseException) -> bool:
    return isinstance(error, ClientError) and error_code(error) in THROTTLE_CODES


def translate(error: ClientError | BotoCoreError, what: str) -> MaasError:
    """The maas error a failed AWS call becomes. ``what`` names the operation for the user
    ("the registry", "model storage") without naming the resource."""
    if isinstance(error, ClientError):
        code = error_code(error)
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in THROTTLE_CODES or status == 429:
            return Throttled(f"{what} is receiving too many requests; retry in a moment", retry_after=1)
        if code in UNAVAILABLE_CODES or status >= 500:
            return Unavailable(f"{what} is temporarily unavailable; retry in a moment", retry_after=2)
        log.error("unexpected AWS error from %s: %s", what, code or status)
        return Unavailable(f"{what} refused the request ({code or status}); the operator should check "
                           "the deployment", retry_after=5)
    log.error("AWS call to %s failed: %s", what, type(error).__name__)
    return Unavailable(f"{what} could not be reached; retry in a moment", retry_after=2)


@contextmanager
def aws_errors(what: str) -> Iterator[None]:
    """Translate any AWS error raised inside the block (maas errors pass through untouched)."""
    try:
        yield
    except (ClientError, BotoCoreError) as error:
        raise translate(error, what) from None


def translated(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator form of :func:`aws_errors` for adapter methods."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with aws_errors(what):
                return function(*args, **kwargs)

        return wrapper

    return decorate
