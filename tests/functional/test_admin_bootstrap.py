"""``maas admin bootstrap``: the first admin token of a deployed stack, minted with AWS credentials.

Runs the real CLI (typer's ``CliRunner``) against the AWS backend under moto: the token must land in
the DynamoDB registry and authenticate there with the admin scope."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from maas.cli.main import app
from maas.domain import Scope
from maas.services.tokens import TokenService
from tests.conftest import TEST_BUCKET, TEST_TABLE

runner = CliRunner()
API_URL = "https://abc123.execute-api.us-east-1.amazonaws.com/"
TOKEN_LINE = re.compile(r"^maas_[A-Za-z0-9_-]{32,}$")
TABLE_ARGS = ["--table", TEST_TABLE, "--bucket", TEST_BUCKET]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in ("MAAS_URL", "MAAS_TOKEN", "MAAS_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "home"))
    from maas.backends.aws import clients

    clients.session.cache_clear()  # credentials resolved by an earlier test must not leak in (or out)
    yield
    clients.session.cache_clear()


def bootstrap(*args: str) -> Any:
    return runner.invoke(app, ["admin", "bootstrap", *args])


def secret_of(output: str) -> str:
    lines = [line for line in output.splitlines() if TOKEN_LINE.match(line)]
    assert len(lines) == 1, output
    return lines[0]


def create_stack(name: str, outputs: dict[str, str]) -> None:
    import boto3

    template = {
        "Resources": {"Topic": {"Type": "AWS::SNS::Topic"}},
        "Outputs": {key: {"Value": value} for key, value in outputs.items()},
    }
    boto3.client("cloudformation").create_stack(StackName=name, TemplateBody=json.dumps(template))


def assert_one_error_line(result: Any, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # handled, not escaped


# -- minting ----------------------------------------------------------------------------------------


def test_table_and_bucket_mint_an_admin_token(aws_backend: Any, tmp_path: Path) -> None:
    result = bootstrap(*TABLE_ARGS, "--url", API_URL)
    assert result.exit_code == 0, result.output
    secret = secret_of(result.stdout)
    token = TokenService(aws_backend.registry).authenticate(f"Bearer {secret}")
    assert token.scopes == (Scope.ADMIN,) and token.model is None and not token.revoked
    assert TokenService.require(token, Scope.ADMIN)
    assert token.created_by.startswith("bootstrap:arn:aws:")  # the caller identity, from STS
    assert f"export MAAS_URL={API_URL}" in result.stdout
    assert f"export MAAS_TOKEN={secret}" in result.stdout
    assert not (tmp_path / "home").exists()  # nothing on disk without --save


def test_stack_outputs_give_table_bucket_and_url(aws_backend: Any) -> None:
    create_stack("maas-dev", {"ApiUrl": API_URL, "RegistryTableName": TEST_TABLE, "ModelBucketName": TEST_BUCKET})
    result = bootstrap("--stack", "maas-dev", "--region", "us-east-1")
    assert result.exit_code == 0, result.output
    secret = secret_of(result.stdout)
    assert TokenService(aws_backend.registry).authenticate(f"Bearer {secret}").scopes == (Scope.ADMIN,)
    assert f"API URL: {API_URL}" in result.stdout
    assert f"export MAAS_URL={API_URL}" in result.stdout
    assert "stack maas-dev" in result.stdout


def test_caller_identity_failure_falls_back_to_aws(aws_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto.sts.models import STSBackend

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("STS is down")

    monkeypatch.setattr(STSBackend, "get_caller_identity", broken)
    result = bootstrap(*TABLE_ARGS, "--quiet")
    assert result.exit_code == 0, result.output
    token = TokenService(aws_backend.registry).authenticate(f"Bearer {result.stdout.strip()}")
    assert token.created_by == "bootstrap:aws"


def test_second_bootstrap_is_refused_unless_force(aws_backend: Any) -> None:
    first = bootstrap(*TABLE_ARGS, "--quiet")
    assert first.exit_code == 0, first.output
    existing = aws_backend.registry.list_tokens()[0]

    again = bootstrap(*TABLE_ARGS)
    assert_one_error_line(again, "already holds 1 live admin token", existing.id, "--force")
    assert len(aws_backend.registry.list_tokens()) == 1

    forced = bootstrap(*TABLE_ARGS, "--force", "--name", "recovery")
    assert forced.exit_code == 0, forced.output
    assert existing.id in forced.stderr and "--force" in forced.stderr  # the warning names the old one
    tokens = TokenService(aws_backend.registry)
    assert tokens.authenticate(f"Bearer {secret_of(forced.stdout)}").name == "recovery"
    assert tokens.authenticate(f"Bearer {first.stdout.strip()}").id == existing.id  # the old one still works


def test_revoked_or_narrower_tokens_do_not_block_bootstrap(aws_backend: Any) -> None:
    tokens = TokenService(aws_backend.registry)
    revoked, _ = tokens.create("old-admin", ["admin"])
    aws_backend.registry.revoke_token(revoked.id)
    tokens.create("deployer", ["deploy"])
    tokens.create("fraud-admin", ["admin"], model="fraud")
    result = bootstrap(*TABLE_ARGS, "--quiet")
    assert result.exit_code == 0, result.output


# -- output -----------------------------------------------------------------------------------------


def test_quiet_prints_only_the_token(aws_backend: Any) -> None:
    result = bootstrap(*TABLE_ARGS, "--url", API_URL, "-q")
    assert result.exit_code == 0, result.output
    assert TOKEN_LINE.match(result.stdout.rstrip("\n"))
    assert result.stdout.count("\n") == 1
    assert result.stderr == ""


def test_json_output(aws_backend: Any) -> None:
    result = runner.invoke(app, ["--json", "admin", "bootstrap", *TABLE_ARGS])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["table"] == TEST_TABLE and body["bucket"] == TEST_BUCKET and body["url"] is None
    assert body["scopes"] == ["admin"] and body["saved_to"] is None
    assert TokenService(aws_backend.registry).authenticate(f"Bearer {body['token']}").id == body["id"]


def test_save_writes_the_cli_token_file_0600(aws_backend: Any, tmp_path: Path) -> None:
    result = bootstrap(*TABLE_ARGS, "--save", "--quiet")
    assert result.exit_code == 0, result.output
    path = tmp_path / "home" / "admin-token"
    assert path.read_text(encoding="utf-8").strip() == result.stdout.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    from maas.client.client import resolve_token

    assert resolve_token(None, home=tmp_path / "home") == result.stdout.strip()  # what the CLI and SDK use


def test_save_never_overwrites_an_existing_token_file(aws_backend: Any, tmp_path: Path) -> None:
    home = tmp_path / "elsewhere"
    home.mkdir()
    (home / "admin-token").write_text("maas_local_server_token\n", encoding="utf-8")
    result = bootstrap(*TABLE_ARGS, "--save", "--home", str(home))
    assert_one_error_line(result, str(home / "admin-token"), "already exists")
    assert (home / "admin-token").read_text(encoding="utf-8") == "maas_local_server_token\n"
    assert aws_backend.registry.list_tokens() == []  # checked before minting: no orphan token


# -- errors: one line, exit 1, no traceback ---------------------------------------------------------


def test_missing_stack(moto: None) -> None:
    assert_one_error_line(bootstrap("--stack", "maas-nope"), "stack 'maas-nope' not found", "us-east-1")


def test_stack_without_the_outputs(moto: None) -> None:
    create_stack("not-maas", {"Something": "else"})
    assert_one_error_line(bootstrap("--stack", "not-maas"), "'not-maas'", "RegistryTableName", "ModelBucketName")


def test_stack_pointing_at_a_missing_table(moto: None) -> None:
    create_stack("half", {"RegistryTableName": "gone", "ModelBucketName": TEST_BUCKET})
    assert_one_error_line(bootstrap("--stack", "half"), "DynamoDB table 'gone' not found")


def test_missing_table(moto: None) -> None:
    assert_one_error_line(bootstrap("--table", "nope", "--bucket", TEST_BUCKET), "DynamoDB table 'nope' not found")


def test_table_that_is_not_a_maas_registry(moto: None) -> None:
    import boto3

    boto3.client("dynamodb").create_table(
        TableName="other", BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
    )
    assert_one_error_line(bootstrap("--table", "other", "--bucket", TEST_BUCKET), "'other' is not a maas registry")


def test_no_credentials(aws_credentials: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert_one_error_line(bootstrap("--stack", "maas-dev"), "no AWS credentials")
    assert_one_error_line(bootstrap(*TABLE_ARGS), "no AWS credentials")


def test_unknown_profile(aws_credentials: None) -> None:
    assert_one_error_line(bootstrap("--stack", "maas-dev", "--profile", "nope"), "nope", "--profile")


def test_stack_or_table_is_required() -> None:
    result = bootstrap("--table", TEST_TABLE)
    assert result.exit_code == 2
    assert "--stack" in result.output and "--bucket" in result.output


# -- the command line itself ------------------------------------------------------------------------


def test_help_explains_with_examples() -> None:
    result = runner.invoke(app, ["admin", "bootstrap", "--help"])
    assert result.exit_code == 0
    for word in ("--stack", "--table", "--bucket", "--url", "--profile", "--region", "--force", "--save",
                 "--quiet", "Example", "maas admin bootstrap --stack"):
        assert word in result.output
    assert "bootstrap" in runner.invoke(app, ["admin", "--help"]).output


def test_cli_start_up_does_not_import_boto3() -> None:
    code = "import sys, maas.cli.main; sys.exit(int(any(m in sys.modules for m in ('boto3', 'botocore'))))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
