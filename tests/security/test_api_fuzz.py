"""Attack class 7: whatever a client can send, the API answers within its contract (schemathesis).

schemathesis reads the app's own OpenAPI document and calls every operation in-process (ASGI, no
network) with generated requests, valid and invalid, as an admin over a seeded store (local, and AWS under moto
with fewer examples), then
chains operations statefully where it can derive links from the document (a created model's name
feeding the routes that take one). Two checks, on every response: no 5xx (``not_a_server_error``)
and the response matches what the document promises for that status (``response_schema_conformance``).

Bounded for CI: the examples per operation and the stateful steps are capped so the module stays
well under a minute on two cores, and generation is derandomized so a failure reproduces."""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from maas.api import create_app
from maas.services.tokens import TokenService
from tests.functions import REPO
from tests.models import InProcessValidator
from tests.security.conftest import Stack, _local_stack, make_sandbox, openapi_operations, seed, targets

OPERATIONS: list[tuple[str, str]] = openapi_operations()
#: statuses answered per operation: the last test proves the fuzzer got past validation and 404s
SEEN: dict[tuple[str, str], set[int]] = defaultdict(set)
#: What no answer may contain (the error-hygiene suite's list, applied to everything the fuzzer provokes)
LEAKS = ("Traceback", 'File "', "/tmp/", "site-packages", str(REPO))
#: The LEAKS that some request to the current store carried: the store may echo them back legitimately.
ECHOED: set[str] = set()


@schemathesis.check
def no_internals_leak(ctx: Any, response: Any, case: Any) -> bool | None:
    """No traceback, filesystem path or repository path in a body or a header, unless a request to the
    same store carried it (a model described as "Traceback" is answered with its description, then and
    on every later read; schemathesis draws such strings from this very module)."""
    text = response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    sent = " ".join(str(part) for part in (case.path_parameters, case.query, case.body, case.headers))
    ECHOED.update(leak for leak in LEAKS if leak in sent)
    for leak in LEAKS:
        if leak in text and leak not in ECHOED:
            raise AssertionError(f"{case.method} {case.path} answered {response.status_code} containing {leak!r}")
    return None


CHECKS = [not_a_server_error, response_schema_conformance, no_internals_leak]
#: Examples per operation and stateful runs, by backend: moto makes every AWS call ~10x slower, and
#: the API code above the backend is the same, so the AWS run is a smaller sample of the same space.
EXAMPLES_PER_OPERATION = {"local": 30, "aws": 8}
STATEFUL_EXAMPLES = {"local": 30, "aws": 8}
HYPOTHESIS = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
                      print_blob=True)


@pytest.fixture(scope="module")
def fuzzed(stack: Stack) -> Stack:
    return stack


@pytest.fixture(scope="module")
def api_schema(fuzzed: Stack) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed.app)


@pytest.fixture(scope="module")
def admin_headers(fuzzed: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {fuzzed.admin}"}


def fuzz_order(operation: tuple[str, str]) -> tuple[int, str, str]:
    """Reads and creations first, deletions last (the model itself at the very end), so the seeded
    objects the generated requests are aimed at live as long as possible."""
    method, path = operation
    return (2 if path == "/models/{name}" and method == "DELETE" else 1 if method == "DELETE" else 0, path, method)


FUZZ_ORDER = sorted(OPERATIONS, key=lambda operation: fuzz_order(operation))


@pytest.mark.parametrize(("method", "path"), FUZZ_ORDER)
def test_every_operation_keeps_its_contract(api_schema: Any, fuzzed: Stack, admin_headers: dict[str, str],
                                            method: str, path: str) -> None:
    """Valid requests, invalid ones, and valid ones aimed at the seeded model (so inference, commits,
    deploys and optimizations run on a real READY version instead of answering 404)."""
    operation = api_schema[path][method]
    real = {key: value for key, value in targets(fuzzed).items() if "{" + key + "}" in path}
    strategies = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
    if real:
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=real))

    @given(case=st.one_of(strategies))
    @settings(HYPOTHESIS, max_examples=EXAMPLES_PER_OPERATION[fuzzed.kind])
    def run(case: Any) -> None:
        response = case.call_and_validate(headers=admin_headers, checks=CHECKS)
        SEEN[(method, path)].add(response.status_code)

    run()


class SwappableApp:
    """The ASGI app the stateful fuzzer calls, replaced before each sequence by a freshly seeded store.
    Hypothesis needs a sequence's draws to depend on the sequence alone: on a store shared by every
    sequence, the same requests get other answers as state piles up, the links (and so the rules
    allowed) differ, and Hypothesis stops with FlakyStrategyDefinition."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def fresh_stack(kind: str, root: Path, exits: contextlib.ExitStack) -> Stack:
    """A new seeded store of ``kind`` under ``root``: a local home, or a bucket and a table of their
    own in the AWS mock the module's stack already runs (starting another mock would wipe that one)."""
    if kind == "local":
        return exits.enter_context(contextlib.contextmanager(_local_stack)(root))
    import boto3

    from maas.backends.aws import AwsBackend
    from maas.backends.aws.table import create_table

    sandbox, settings = make_sandbox(root)
    name = f"maas-fuzz-{root.name}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    create_table(boto3.client("dynamodb"), name)
    backend = AwsBackend(settings, bucket=name, table=name, validator=InProcessValidator(settings))
    stack = Stack("aws", backend, settings, create_app(backend, settings), {}, sandbox)
    stack.tokens["admin"] = TokenService(backend.registry).create("root", ["admin"])[1]
    seed(stack)
    return stack


def test_stateful_sequences_keep_the_contract(fuzzed: Stack, tmp_path: Path) -> None:
    """Sequences along the links schemathesis derives from the document (a model's name from
    ``POST /models`` or ``GET /models`` into every route that takes one, versions into version routes,
    deployment ids into ``GET /deployments/{id}``), the same checks after every step, each sequence on
    a store of its own seeded like the module's."""
    app = SwappableApp(fuzzed.app)
    machine = schemathesis.openapi.from_asgi("/openapi.json", app).as_state_machine()
    calls: list[tuple[str, int]] = []
    current = {"stack": fuzzed}
    counter = itertools.count()

    with contextlib.ExitStack() as exits:

        class Fuzzer(machine):  # type: ignore[misc, valid-type]
            def setup(self) -> None:
                stack = fresh_stack(fuzzed.kind, tmp_path / f"s{next(counter)}", exits)
                ECHOED.clear()
                current["stack"] = stack
                app.app = stack.app

            def get_call_kwargs(self, case: Any) -> dict[str, Any]:
                return {"headers": {"Authorization": f"Bearer {current['stack'].admin}"}}

            def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
                calls.append((f"{case.method} {case.path}", response.status_code))
                case.validate_response(response, checks=CHECKS)

        examples = STATEFUL_EXAMPLES[fuzzed.kind]
        Fuzzer.run(settings=settings(HYPOTHESIS, max_examples=examples, stateful_step_count=8))
    chained = {operation for operation, status in calls if "{" in operation and status < 400}
    assert len(calls) >= examples and chained, calls[:50]


def test_the_fuzzer_reached_real_work() -> None:
    """Without this, a fuzzer answered only 401/404/422 would pass while testing nothing."""
    assert set(SEEN) == set(OPERATIONS), set(OPERATIONS) - set(SEEN)
    succeeded = {operation for operation, statuses in SEEN.items() if any(200 <= s < 300 for s in statuses)}
    # Generated tensors rarely fit the model's signature, but they reach the decoder and the checks.
    assert SEEN[("POST", "/v2/models/{name}/infer")] & {400, 413, 422}
    for operation in [("GET", "/models/{name}"), ("POST", "/models"), ("GET", "/v2/models/{name}/versions/{version}")]:
        assert operation in succeeded, (operation, SEEN[operation])
    assert len(succeeded) >= len(OPERATIONS) // 2, {op: SEEN[op] for op in set(OPERATIONS) - succeeded}
