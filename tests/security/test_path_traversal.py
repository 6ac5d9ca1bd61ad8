"""Attack class 4: path traversal through identifiers (MLflow CVE-2023-1177, CVE-2024-1483 and kin:
a name or version that becomes ``../../something`` in a storage path).

Every identifier a URL carries (model names, versions, aliases, upload ids, deployment ids, token
ids) is attacked with ``../``, percent-encoded dots and slashes (single and double), backslashes, NUL,
absolute paths and unicode look-alikes (fullwidth dots and solidus, one-dot leaders, division slash),
through every operation, with the admin token and a body that would work: the answer is 422 (or 404
where the decoded path can no longer match a route) as problem+json, and nothing changes, neither
the registry, nor the store root, nor the decoy tree beside it. The same strings go straight to the
domain validators (``maas.domain.names``) and the local artifact store's upload-id check, which every
storage path is built from. Hypothesis generates the combinations (bounded, derandomized)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maas.backends.local.artifacts import check_upload_id
from maas.domain.names import check_alias_name, check_model_name, check_token_name, check_version_number
from maas.errors import InvalidInput
from tests.security.conftest import (
    PROBLEM,
    Stack,
    openapi_operations,
    registry_state,
    request_parts,
    targets,
    tree_state,
)

OPERATIONS = openapi_operations()
#: (method, path, placeholder): every identifier of every operation, one at a time.
SLOTS = [(method, path, slot) for method, path in OPERATIONS for slot in re.findall(r"\{(\w+)\}", path)]
PIECES = [
    "..", "../", "..\\", "/", "\\", ".", "%2e%2e", "%2E%2E%2F", "%2f", "%5c", "%252e%252e%252f", "%00", "\x00",
    "..%2f", "..;/", "/etc/passwd", "C:\\Windows", "~", "\uff0e\uff0e\uff0f",  # fullwidth "../"
    "\u2024\u2024", "\u2025", "\u2215", "\u2044", "\u29f8", "\uff3c", "\u0430", "\u0131",  # look-alikes
    "%c0%ae%c0%ae/", "\u202e", "\t", " ", "\n", "%", "registry.db", "outside", "secret.txt",
]
CLASSICS = ["../outside/secret.txt", "..", "%2e%2e", "..%2f..%2foutside", "..\\..\\outside", "m\x00",
            "/etc/passwd", "\uff0e\uff0e\uff0fm", "m\u2215..\u2215..", "%252e%252e%252f", "1/../2", "champion/..",
            "\u0430lias", "m%00.onnx", "\\\\server\\share"]
#: What the validators accept: plain ASCII, no separators, no dots that could form ``..``.
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]*")


def attacks() -> st.SearchStrategy[str]:
    """Traversal pieces mixed with innocent text: the nasty part may hide anywhere in the string."""
    innocent = st.text(alphabet="abcz019-_.", max_size=6)
    return st.lists(st.one_of(st.sampled_from(PIECES), innocent), min_size=1, max_size=6).map("".join).filter(
        lambda value: re.search(r"[^a-z0-9-]", value) is not None)  # else it may be a legitimate name


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Iterator[TestClient]:
    with stack.client(stack.admin) as client:
        yield client


def everything(stack: Stack) -> tuple[object, object, object]:
    """The registry, every file of the sandbox (the store root and its decoy sibling) and, on AWS,
    every object version in the bucket (a traversal there is a key outside the store's prefixes)."""
    objects: list[tuple[str, str]] = []
    if stack.kind == "aws":
        listing = stack.backend.s3.list_object_versions(Bucket=stack.backend.bucket)
        objects = sorted((v["Key"], v["VersionId"]) for v in listing.get("Versions", []) + listing.get(
            "DeleteMarkers", []))
    return registry_state(stack.backend), tree_state(stack.sandbox), objects


def attack(stack: Stack, admin: TestClient, method: str, path: str, slot: str, value: str) -> None:
    """One request with ``value`` in the ``slot`` of the URL, percent-encoded whole (dots too) so no
    client normalizes it away: the server gets the request line a raw HTTP client would send
    (``/models/m/aliases/..``), decodes ``%2F`` into ``/``, and must refuse it."""
    values = targets(stack) | {slot: quote(value, safe="").replace(".", "%2E")}
    url, body, content_type = request_parts(method, path, values)
    headers = {} if content_type is None else {"Content-Type": content_type}
    answer = admin.request(method, url, content=body or None, headers=headers)
    # 422: the identifier is refused; 404/405: once decoded, the path matches no route (or another
    # route's path with other methods). Never a success, never a crash.
    assert answer.status_code in (404, 405, 422), (method, path, slot, value, answer.status_code, answer.text)
    assert answer.headers["content-type"].startswith(PROBLEM), answer.text


def test_every_identifier_is_attacked() -> None:
    assert {slot for _, _, slot in SLOTS} == {"name", "version", "alias", "upload_id", "deployment_id", "token_id"}


@pytest.mark.parametrize(("method", "path", "slot"), SLOTS)
def test_classic_traversals_are_refused_everywhere(stack: Stack, admin: TestClient, method: str, path: str,
                                                   slot: str) -> None:
    before = everything(stack)
    for value in CLASSICS if stack.kind == "local" else CLASSICS[:6]:
        attack(stack, admin, method, path, slot, value)
    assert everything(stack) == before


@pytest.fixture(scope="module")
def local_admin(local_stack: Stack) -> Iterator[TestClient]:
    with local_stack.client(local_stack.admin) as client:
        yield client


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much,
                                 HealthCheck.too_slow])
@given(target=st.sampled_from(SLOTS), value=attacks())
def test_generated_traversals_are_refused(local_stack: Stack, local_admin: TestClient,
                                          target: tuple[str, str, str], value: str) -> None:
    before = everything(local_stack)
    attack(local_stack, local_admin, *target, value)
    assert everything(local_stack) == before


#: Where the local store writes (DESIGN.md 4, ``maas.backends.local``): everything else is a surprise.
STORE_LAYOUT = re.compile(
    r"home/(registry\.db(-wal|-shm|-journal)?|\.lock|server\.lock|admin-token"
    r"|artifacts(/uploads(/[0-9a-f]{32}(\.reserved|\.meta)?)?|/blobs(/sha256(/[0-9a-f]{2}(/[0-9a-f]{64})?)?)?)?)")


def test_legitimate_writes_stay_in_their_places(local_stack: Stack, local_admin: TestClient) -> None:
    """The other half of "nothing outside the root changes": a model with the longest, oddest valid
    name is created, uploaded, committed, aliased, deployed and deleted; every path that appeared or
    changed is one the store's layout names, and the decoy sibling is untouched."""
    from tests.conftest import push
    from tests.models import scale_model

    name = "0-" + "a" * 59 + "-"
    before = tree_state(local_stack.sandbox)
    push(local_admin, name, scale_model(7.0))
    assert local_admin.put(f"/models/{name}/aliases/a-{'b' * 61}", json={"version": 1}).status_code == 200
    assert local_admin.post(f"/models/{name}/deployments", json={"version": 1}).status_code == 201
    after = tree_state(local_stack.sandbox)
    assert local_admin.delete(f"/models/{name}", params={"force": "true"}).status_code == 204
    finally_ = tree_state(local_stack.sandbox)
    for state in (after, finally_):
        touched = {path for path in set(before) | set(state) if before.get(path) != state.get(path)}
        assert touched, "the push wrote nothing?"
        assert all(STORE_LAYOUT.fullmatch(path) for path in touched), sorted(touched)
        assert {k: v for k, v in state.items() if k.startswith("outside")} == \
            {k: v for k, v in before.items() if k.startswith("outside")}


# --- the validators every storage key is built from ---------------------------------------------------

VALIDATORS: dict[str, Callable[[str], str]] = {
    "model": check_model_name, "alias": check_alias_name, "token": check_token_name, "upload": check_upload_id}


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(value=attacks())
def test_validators_refuse_every_traversal(value: str) -> None:
    for kind, check in VALIDATORS.items():
        try:
            check(value)
        except InvalidInput as refused:
            assert refused.field, kind
            continue
        # Token names may hold dots and spaces (they are labels, never paths), nothing else.
        assert kind == "token" and SAFE.fullmatch(value), (kind, value)
    with pytest.raises(InvalidInput):
        check_version_number(value)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(value=st.text(max_size=80))
def test_whatever_the_validators_accept_is_a_safe_path_segment(value: str) -> None:
    """The other direction, over arbitrary unicode: an accepted name is one plain path segment."""
    for check in (check_model_name, check_alias_name, check_upload_id):
        try:
            accepted = check(value)
        except InvalidInput:
            continue
        assert accepted == value and accepted.isascii() and SAFE.fullmatch(accepted), accepted
        assert "/" not in accepted and "\\" not in accepted and ".." not in accepted and accepted != "."
        assert Path(accepted).name == accepted and len(Path(accepted).parts) == 1


@pytest.mark.parametrize("value", ["1", "999999999"])
def test_versions_are_plain_numbers(value: str) -> None:
    assert check_version_number(value) == int(value)
    for bad in ("0", "-1", "1e3", "0x1", " 1", "1 ", "\uff11", "\u0661", "1000000000", "1.0", "+1", "01/.."):
        with pytest.raises(InvalidInput):
            check_version_number(bad)
