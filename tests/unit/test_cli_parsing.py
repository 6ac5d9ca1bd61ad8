"""The CLI's parsing and error reporting, and the SDK's request building, without a maas server.

HTTP is faked with ``httpx.MockTransport`` where a flow needs answers (push, errors); nothing listens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from maas.cli.main import app, parse_data
from maas.client import Client, MaasClientError, build_infer_request
from maas.client.client import resolve_token
from maas.examples import EXAMPLE_REQUEST

NOWHERE = "http://127.0.0.1:9"  # discard port: nothing listens there

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("MAAS_URL", "MAAS_TOKEN", "MAAS_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "home"))


def invoke(*args: str, input: str | None = None) -> Any:
    return runner.invoke(app, list(args), input=input)


# -- help -----------------------------------------------------------------------------------------

COMMANDS: list[tuple[list[str], list[str]]] = [
    ([], ["--url", "--token", "--home", "--json", "models", "deploy", "predict", "serve", "demo"]),
    (["serve"], ["--host", "--port", "--home", "Example"]),
    (["demo"], ["--once", "--port", "Example"]),
    (["models"], ["create", "list", "show", "delete", "push", "optimize"]),
    (["models", "create"], ["name", "--description", "--tag", "Example"]),
    (["models", "list"], ["Example"]),
    (["models", "show"], ["name", "Example"]),
    (["models", "delete"], ["name", "--force", "--yes", "Example"]),
    (["models", "push"], ["name", "file", "--description", "--optimize", "--tolerance", "Example"]),
    (["models", "optimize"], ["name", "version", "--tolerance", "Example"]),
    (["versions"], ["name", "Example"]),
    (["alias"], ["set", "list", "delete"]),
    (["alias", "set"], ["name", "alias", "version", "Example"]),
    (["alias", "list"], ["name", "Example"]),
    (["alias", "delete"], ["name", "alias", "Example"]),
    (["deploy"], ["name", "version", "--strategy", "all_at_once", "Example"]),
    (["rollback"], ["name", "--to", "Example"]),
    (["status"], ["name", "Example"]),
    (["predict"], ["name", "--data", "--version", "Example"]),
    (["tokens"], ["create", "list", "revoke"]),
    (["tokens", "create"], ["name", "--scope", "--model", "Example"]),
    (["tokens", "list"], ["Example"]),
    (["tokens", "revoke"], ["ID", "Example"]),
]


@pytest.mark.parametrize(("command", "expected"), COMMANDS, ids=lambda c: " ".join(c) if c else "root")
def test_help_exits_0_and_names_arguments(command: list[str], expected: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    text = result.output.lower()
    for word in expected:
        assert word.lower() in text, f"{word!r} missing from `maas {' '.join(command)} --help`"


def test_version_flag() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.startswith("maas ")


def test_no_arguments_shows_usage() -> None:
    result = invoke()
    assert result.exit_code in (0, 2)
    assert "Usage" in result.output


# -- errors: one line, exit 1, no traceback -------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["models", "list"],
        ["status", "iris"],
        ["versions", "iris"],
        ["predict", "iris", "--data", '{"features": [[1, 2, 3, 4]]}'],
        ["deploy", "iris", "3"],
        ["tokens", "list"],
    ],
)
def test_no_server_is_one_error_line_and_exit_1(command: list[str]) -> None:
    result = invoke("--url", NOWHERE, "--token", "t", *command)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: Cannot connect: no maas server at {NOWHERE}; start one with `maas serve`"]
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, MaasClientError)  # handled, not escaped


def test_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_URL", NOWHERE + "/")
    result = invoke("models", "list")
    assert result.exit_code == 1
    assert f"no maas server at {NOWHERE};" in result.stderr


def test_invalid_usage_exits_2() -> None:
    assert invoke("deploy", "iris").exit_code == 2  # missing VERSION
    assert invoke("tokens", "create", "app", "--scope", "root").exit_code == 2
    assert invoke("deploy", "iris", "3", "--strategy", "yolo").exit_code == 2
    assert invoke("alias", "set", "iris", "champion", "three").exit_code == 2
    assert invoke("models", "push", "iris", "/definitely/not/here.onnx").exit_code == 2
    assert invoke("no-such-command").exit_code == 2


def test_tag_needs_key_value() -> None:
    result = invoke("--url", NOWHERE, "models", "create", "fraud", "--tag", "oops")
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.output


def test_delete_asks_for_confirmation() -> None:
    result = invoke("--url", NOWHERE, "models", "delete", "fraud", input="n\n")
    assert result.exit_code == 1
    assert "Cannot connect" not in result.output  # aborted before any request


def test_server_errors_print_status_title_and_detail() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return problem(404, "Not found", "model 'x' not found")

    client = Client("http://maas.test", "t", transport=httpx.MockTransport(handler))
    with pytest.raises(MaasClientError) as caught:
        client.get_model("x")
    assert str(caught.value) == "404 Not found: model 'x' not found"
    assert caught.value.status == 404


# -- --data ---------------------------------------------------------------------------------------


def test_data_inline_json() -> None:
    assert parse_data('{"features": [[1, 2]]}') == {"features": [[1, 2]]}


def test_data_from_file(tmp_path: Path) -> None:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(EXAMPLE_REQUEST))
    assert parse_data(f"@{path}") == EXAMPLE_REQUEST


def test_data_from_stdin() -> None:
    def fake_predict(self: Client, name: str, inputs: Any, version: Any = None) -> dict[str, Any]:
        return {"model_name": name, "echo": inputs, "version": version}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Client, "predict", fake_predict)
        result = invoke("predict", "iris", "--data", "@-", "--version", "2", input='{"features": [[1]]}')
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"model_name": "iris", "echo": {"features": [[1]]}, "version": 2}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON"),
        ("42", "expected a JSON object"),
        ("@/definitely/not/here.json", "cannot read"),
    ],
)
def test_bad_data_is_a_usage_error(data: str, message: str) -> None:
    result = invoke("--url", NOWHERE, "predict", "iris", "--data", data)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_invalid_shorthand_is_a_usage_error() -> None:
    result = invoke("--url", NOWHERE, "predict", "iris", "--data", "[1, 2]")
    assert result.exit_code == 2
    assert "OIP input objects" in result.output


# -- shorthand -> OIP -----------------------------------------------------------------------------


def test_full_request_is_passed_through() -> None:
    assert build_infer_request(EXAMPLE_REQUEST) == EXAMPLE_REQUEST


def test_list_of_inputs_is_wrapped() -> None:
    inputs = EXAMPLE_REQUEST["inputs"]
    assert build_infer_request(inputs) == {"inputs": inputs}


def test_numpy_arrays_keep_dtype_and_shape() -> None:
    request = build_infer_request(
        {
            "features": np.arange(8, dtype=np.float32).reshape(2, 4),
            "ids": np.array([1, 2], dtype=np.int64),
            "mask": np.array([[True], [False]]),
            "half": np.zeros((1,), dtype=np.float16),
        }
    )
    by_name = {item["name"]: item for item in request["inputs"]}
    assert by_name["features"] == {
        "name": "features",
        "shape": [2, 4],
        "datatype": "FP32",
        "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
    }
    assert by_name["ids"]["datatype"] == "INT64" and by_name["ids"]["shape"] == [2]
    assert by_name["mask"]["datatype"] == "BOOL" and by_name["mask"]["data"] == [True, False]
    assert by_name["half"]["datatype"] == "FP16"


def test_lists_take_the_signature_datatype() -> None:
    request = build_infer_request({"features": [[5.1, 3.5, 1.4, 0.2]]}, {"features": "FP32"})
    (tensor,) = request["inputs"]
    assert tensor["datatype"] == "FP32"
    assert tensor["shape"] == [1, 4]
    assert tensor["data"] == pytest.approx([5.1, 3.5, 1.4, 0.2])


def test_lists_without_signature_use_numpy_inference() -> None:
    request = build_infer_request({"x": [[1, 2], [3, 4]], "y": [0.5], "s": [["a", "b"]]})
    by_name = {item["name"]: item for item in request["inputs"]}
    assert by_name["x"]["datatype"] == "INT64" and by_name["x"]["shape"] == [2, 2]
    assert by_name["y"]["datatype"] == "FP64"
    assert by_name["s"] == {"name": "s", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}


def test_bytes_arrays_become_strings() -> None:
    request = build_infer_request({"text": np.array([b"hi", b"there"], dtype=object)})
    assert request["inputs"][0]["datatype"] == "BYTES"
    assert request["inputs"][0]["data"] == ["hi", "there"]


def test_an_input_named_inputs_is_still_shorthand() -> None:
    request = build_infer_request({"inputs": [[1.0, 2.0]]}, {"inputs": "FP32"})
    assert request["inputs"][0]["name"] == "inputs"
    assert request["inputs"][0]["shape"] == [1, 2]


@pytest.mark.parametrize("bad", [{}, [1, 2], "text", {"x": np.array([1 + 2j])}])
def test_unusable_inputs_raise_value_error(bad: Any) -> None:
    with pytest.raises(ValueError):
        build_infer_request(bad)


def test_predict_fetches_signature_for_shorthand() -> None:
    seen: list[tuple[str, str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body))
        if request.url.path == "/v2/models/iris/versions/champion":
            spec = {"name": "features", "datatype": "FP32", "shape": [-1, 4]}
            return httpx.Response(200, json={"name": "iris", "inputs": [spec]})
        return httpx.Response(200, json={"model_name": "iris", "model_version": "3", "outputs": []})

    client = Client("http://maas.test", "t", transport=httpx.MockTransport(handler))
    answer = client.predict("iris", {"features": [[1, 2, 3, 4]]}, version="champion")
    assert answer["model_version"] == "3"
    method, path, body = seen[-1]
    assert (method, path) == ("POST", "/v2/models/iris/versions/champion/infer")
    assert body["inputs"][0]["datatype"] == "FP32"
    assert body["inputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]


# -- SDK plumbing ---------------------------------------------------------------------------------


def problem(status: int, title: str, detail: str, field: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if field:
        body["field"] = field
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json"})


def test_error_from_problem_and_from_text() -> None:
    detail = "version 3 is referenced by alias 'champion'"
    err = MaasClientError.from_response(problem(409, "Conflict", detail))
    assert str(err) == "409 Conflict: version 3 is referenced by alias 'champion'"
    err = MaasClientError.from_response(problem(422, "Invalid input", "must be FP32", field="inputs[0]"))
    assert (err.status, err.field) == (422, "inputs[0]")
    assert str(err) == "422 Invalid input: must be FP32 (field: inputs[0])"
    err = MaasClientError.from_response(httpx.Response(502, text="<html>\n Bad gateway\n</html>"))
    assert str(err) == "502 Bad Gateway: <html> Bad gateway </html>"


def test_token_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert resolve_token(None) is None
    home.mkdir()
    (home / "admin-token").write_text("maas_file\n")
    assert resolve_token(None) == "maas_file"
    monkeypatch.setenv("MAAS_TOKEN", "maas_env")
    assert resolve_token(None) == "maas_env"
    assert resolve_token("maas_explicit") == "maas_explicit"
    monkeypatch.delenv("MAAS_TOKEN")
    other = tmp_path / "other"
    other.mkdir()
    (other / "admin-token").write_text("maas_other")
    assert resolve_token(None, home=other) == "maas_other"


class FakeServer:
    """Just enough of the management API for ``push``, recording every request."""

    def __init__(self, upload_url: str, *, model_exists: bool = False):
        self.upload_url = upload_url
        self.model_exists = model_exists
        self.requests: list[httpx.Request] = []
        self.uploaded = b""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/models" and request.method == "POST":
            if self.model_exists:
                return problem(409, "Conflict", "model 'iris' already exists")
            return httpx.Response(201, json={"name": "iris"})
        if path == "/models/iris/versions" and request.method == "POST":
            upload = {"upload_id": "u1", "url": self.upload_url, "headers": {"x-amz-meta": "1"}}
            pending = {"version": 4, "status": "PENDING"}
            return httpx.Response(201, json={"version": pending, "upload": {**upload, "method": "PUT"}})
        if path.endswith("/u1") and request.method == "PUT":
            self.uploaded = request.read()
            return httpx.Response(200, json={"upload_id": "u1"})
        if path == "/models/iris/versions/4/commit":
            body = json.loads(request.content)
            return httpx.Response(200, json={"version": 4, "status": "READY", **body})
        return problem(404, "Not found", f"no route {path}")


def _push(tmp_path: Path, server: FakeServer, **kwargs: Any) -> tuple[dict[str, Any], bytes, list[Any]]:
    payload = bytes(range(256)) * 9000  # > 2 upload chunks
    path = tmp_path / "model.onnx"
    path.write_bytes(payload)
    calls: list[tuple[int, int]] = []
    progress: Callable[[int, int], None] = lambda sent, total: calls.append((sent, total))  # noqa: E731
    with Client("http://maas.test", "secret", transport=httpx.MockTransport(server)) as client:
        version = client.push("iris", path, progress=progress, **kwargs)
    return version, payload, calls


def test_push_to_a_relative_upload_url(tmp_path: Path) -> None:
    server = FakeServer("/uploads/u1", model_exists=True)  # 409 on create is fine
    version, payload, calls = _push(tmp_path, server, description="retrained")
    assert version["status"] == "READY"
    assert version["sha256"] == hashlib.sha256(payload).hexdigest()
    assert version["size"] == len(payload)
    assert server.uploaded == payload
    upload = next(r for r in server.requests if r.method == "PUT")
    assert str(upload.url) == "http://maas.test/uploads/u1"
    assert upload.headers["authorization"] == "Bearer secret"
    assert upload.headers["content-length"] == str(len(payload))
    assert "transfer-encoding" not in upload.headers
    assert upload.headers["x-amz-meta"] == "1"
    assert calls[0] == (0, len(payload)) and calls[-1] == (len(payload), len(payload))
    assert [sent for sent, _ in calls] == sorted(sent for sent, _ in calls)
    create_version = next(r for r in server.requests if r.url.path == "/models/iris/versions")
    assert json.loads(create_version.content) == {"description": "retrained", "size": len(payload),
                                                  "sha256": hashlib.sha256(payload).hexdigest()}


def test_push_to_a_presigned_url_sends_no_maas_token(tmp_path: Path) -> None:
    server = FakeServer("https://bucket.s3.amazonaws.com/models/iris/u1?X-Amz-Signature=abc")
    version, payload, _ = _push(tmp_path, server)
    assert version["sha256"] == hashlib.sha256(payload).hexdigest()
    upload = next(r for r in server.requests if r.method == "PUT")
    assert upload.url.host == "bucket.s3.amazonaws.com"
    assert upload.url.params["X-Amz-Signature"] == "abc"
    assert "authorization" not in upload.headers
    assert all(r.headers.get("authorization") == "Bearer secret" for r in server.requests if r is not upload)


def test_push_without_create_does_not_create(tmp_path: Path) -> None:
    server = FakeServer("/uploads/u1")
    _push(tmp_path, server, create=False)
    assert not any(r.url.path == "/models" for r in server.requests)


def test_client_sends_json_and_paginates() -> None:
    pages = {None: {"items": [{"name": "a"}], "next_cursor": "c2"}, "c2": {"items": [{"name": "b"}]}}
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/models":
            return httpx.Response(200, json=pages[request.url.params.get("cursor")])
        if request.url.path == "/models/iris/deployments":
            return httpx.Response(201, json=json.loads(request.content))
        return httpx.Response(204)

    with Client("http://maas.test/", "t", transport=httpx.MockTransport(handler)) as client:
        assert [m["name"] for m in client.list_models(limit=1)] == ["a", "b"]
        assert client.deploy("iris", "3", bake_seconds=None, target="lambda") == {
            "version": 3,
            "strategy": "all_at_once",
            "target": "lambda",
        }
        assert client.deploy("iris", "champion")["version"] == "champion"
        client.delete_model("iris", force=True)
    assert seen[0].url.params["limit"] == "1"
    assert seen[-1].url.params["force"] == "true"
    assert seen[-1].method == "DELETE"


def test_admin_token_from_the_environment_is_a_fallback(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from maas.client.client import resolve_token

    monkeypatch.delenv("MAAS_TOKEN", raising=False)
    monkeypatch.setenv("MAAS_ADMIN_TOKEN", "maas_from_admin_env")
    assert resolve_token(None, tmp_path) == "maas_from_admin_env"
    monkeypatch.setenv("MAAS_TOKEN", "maas_from_token_env")
    assert resolve_token(None, tmp_path) == "maas_from_token_env"
    assert resolve_token("explicit", tmp_path) == "explicit"


@pytest.mark.parametrize(("datatype", "value", "says"), [
    ("FP32", [1.0, 1e40], "out of the range of FP32"),  # numpy would send inf (with only a warning)
    ("FP16", [70000.0], "out of the range of FP16"),
    ("INT8", [1, 300], "out of the range of INT8"),  # numpy would refuse, or wrap from a float
    ("UINT8", [-1.0], "out of the range of UINT8"),
    ("INT32", [1.5], "whole numbers"),  # numpy would truncate to 1
    ("INT64", [float("inf")], "finite"),
    ("FP32", [1.0, None], "None is not a FP32 value"),  # numpy would send NaN
])
def test_the_sdk_never_casts_a_value_out_of_its_datatype(datatype: str, value: list[Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        build_infer_request({"x": value}, {"x": datatype})


def test_the_sdk_casts_values_that_fit_their_datatype() -> None:
    request = build_infer_request({"x": [[1, 2.0], [3, 4]], "n": [1.0, 255.0]}, {"x": "FP32", "n": "UINT8"})
    by_name = {item["name"]: item for item in request["inputs"]}
    assert by_name["x"] == {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
    assert by_name["n"]["datatype"] == "UINT8" and by_name["n"]["data"] == [1, 255]
