"""Every CLI command against a real `maas serve` (the CLI runs in-process, the server in a subprocess)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from maas.examples import example_model_path
from tests.models import scale_model

pytestmark = pytest.mark.e2e


def test_models_lifecycle(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert "created" in run("models", "create", "cli-m", "--description", "from the CLI", "--tag", "team=risk").lower()
    listed = json.loads(run("--json", "models", "list"))
    assert "cli-m" in [m["name"] for m in listed]
    shown = json.loads(run("--json", "models", "show", "cli-m"))
    assert shown["model"]["tags"] == {"team": "risk"}
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(scale_model(3.0))
    pushed = json.loads(run("--json", "models", "push", "cli-m", str(model_file)))
    assert pushed["status"] == "READY" and pushed["version"] == 1
    assert "READY" in run("versions", "cli-m")
    run("models", "create", "cli-m", code=1)
    run("models", "delete", "cli-m", "--yes")
    run("models", "show", "cli-m", code=1)


def test_alias_deploy_predict_status_rollback(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for factor in (1.0, 2.0):
        path = tmp_path / f"{factor}.onnx"
        path.write_bytes(scale_model(factor))
        run("models", "push", "cli-d", str(path))
    run("alias", "set", "cli-d", "champion", "2")
    assert "champion" in run("alias", "list", "cli-d")
    run("deploy", "cli-d", "1")
    run("deploy", "cli-d", "champion")
    answer = json.loads(run("--json", "predict", "cli-d", "--data", '{"x": [[1, 1, 1, 1]]}'))
    assert answer["model_version"] == "2" and answer["outputs"][0]["data"] == [2, 2, 2, 2]
    status = json.loads(run("--json", "status", "cli-d"))
    assert status["route"]["stable_version"] == 2
    assert [d["status"] for d in status["deployments"]] == ["SUCCEEDED", "SUCCEEDED"]
    assert "rolled back" in run("rollback", "cli-d")
    assert json.loads(run("--json", "status", "cli-d"))["route"]["stable_version"] == 1
    run("rollback", "cli-d", "--to", "2")
    assert json.loads(run("--json", "status", "cli-d"))["route"]["stable_version"] == 2
    run("alias", "delete", "cli-d", "champion")
    assert "champion" not in run("alias", "list", "cli-d")
    run("deploy", "cli-d", "7", code=1)
    run("predict", "cli-d", "--data", "{broken", code=2)


def test_tokens(run) -> None:  # type: ignore[no-untyped-def]
    created = json.loads(run("--json", "tokens", "create", "cli-app", "--scope", "invoke", "--model", "iris"))
    assert created["token"].startswith("maas_") and created["model"] == "iris"
    assert "cli-app" in run("tokens", "list")
    run("tokens", "revoke", created["id"])
    listed = json.loads(run("--json", "tokens", "list"))
    assert next(t for t in listed if t["id"] == created["id"])["revoked"] is True
    run("tokens", "create", "bad", "--scope", "root", code=2)


def test_errors_are_one_line(run) -> None:  # type: ignore[no-untyped-def]
    output = run("--token", "maas_" + "x" * 43, "models", "list", code=1)
    assert output.strip().count("\n") == 0 and "401" in output
    missing = run("models", "push", "nope", str(example_model_path().parent / "missing.onnx"), code=2)
    # click's usage error is boxed by rich and wrapped at the terminal width (long paths wrap)
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", missing).split())
    assert "does not exist" in flat and "Traceback" not in missing
    rejected = run("models", "push", "cli-bad", str(Path(__file__)), code=1)
    assert "422" in rejected and rejected.strip().count("\n") == 0
    assert json.loads(run("--json", "versions", "cli-bad"))[0]["status"] == "FAILED"


def test_server_text_is_never_read_as_markup(run) -> None:  # type: ignore[no-untyped-def]
    run("models", "create", "cli-markup", "--description", "[/] [bold]not bold[/bold]")
    listed = run("models", "list")
    assert "[/]" in listed and "[bold]not bold[/bold]" in listed
    assert "[/]" in run("models", "show", "cli-markup")


def test_bad_inputs_and_urls_are_one_line_errors(run) -> None:  # type: ignore[no-untyped-def]
    run("models", "push", "cli-iris", str(example_model_path()))
    run("deploy", "cli-iris", "1")
    shaped = run("predict", "cli-iris", "--data", '{"features": {"a": 1}}', code=2)
    assert "Traceback" not in shaped
    bad_url = run("--url", "http://[::1", "models", "list", code=1)
    assert bad_url.strip().count("\n") == 0 and "Traceback" not in bad_url
