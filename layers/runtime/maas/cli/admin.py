"""``maas admin``: operator commands that act on a deployed stack with the operator's own AWS credentials.

``maas admin bootstrap`` mints the first admin token of a ``cdk deploy``-ed stack straight into its
DynamoDB registry (no API call, so no token is needed to get one). boto3 and the AWS backend are
imported inside the command: the rest of the CLI starts without them.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from maas.cli import CliError, stderr_console
from maas.domain import Scope, Token

#: CloudFormation outputs of the maas CDK stack that ``--stack`` reads.
OUTPUT_URL = "ApiUrl"
OUTPUT_TABLE = "RegistryTableName"
OUTPUT_BUCKET = "ModelBucketName"
#: the local server's admin token file (``maas serve`` writes it; the CLI and SDK read it)
ADMIN_TOKEN_FILE = "admin-token"
#: what the CLI and the SDK read (``maas.cli.main`` options, ``maas.client.client``)
ENV_URL = "MAAS_URL"
ENV_TOKEN = "MAAS_TOKEN"

admin_app = typer.Typer(
    help="Operator commands that use your AWS credentials directly (no maas token needed).",
    no_args_is_help=True,
)


@dataclass(frozen=True)
class Target:
    """Where the token goes: the registry table, the model bucket and the API URL (when known)."""

    table: str
    bucket: str
    url: str | None
    region: str
    stack: str | None = None


# -- AWS access -------------------------------------------------------------------------------------


def _aws_error(error: Exception, what: str) -> CliError:
    """One line naming what failed and why, for any botocore failure."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return CliError("no AWS credentials found: configure them (`aws configure`, `aws sso login`, "
                        "AWS_PROFILE or --profile) and retry")
    if isinstance(error, ProfileNotFound):
        return CliError(f"{error}: check --profile / AWS_PROFILE against your AWS config")
    if isinstance(error, NoRegionError):
        return CliError("no AWS region: pass --region, set AWS_REGION, or set a region in your AWS profile")
    if isinstance(error, EndpointConnectionError):
        return CliError(f"cannot reach {what}: {error}")
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        code = str(details.get("Code") or "error")
        message = str(details.get("Message") or "").strip()
        if code in ("ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId",
                    "UnrecognizedClientException", "InvalidSignatureException"):
            return CliError(f"AWS rejected your credentials ({code}): refresh them and retry")
        if "AccessDenied" in code:
            return CliError(f"AWS denied access to {what} ({code}): {message}")
        return CliError(f"{what} failed ({code}): {message}" if message else f"{what} failed ({code})")
    return CliError(f"{what} failed: {error}")


def _client_factory(profile: str | None, region: str | None) -> Callable[[str], Any]:
    """Clients with the backend's retry and timeout settings (``maas.backends.aws.clients``), from the
    default credential chain, or from ``profile``; ``region`` overrides the configured one."""
    from maas.backends.aws import clients

    overrides: dict[str, Any] = {"region_name": region} if region else {}
    if profile is None:
        return lambda service: clients.make_client(service, **overrides)

    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=profile)  # raises ProfileNotFound

    def make(service: str) -> Any:
        config = clients.client_config(**overrides)
        if service == "s3":
            config = config.merge(Config(signature_version="s3v4"))
        return session.client(service, config=config)

    return make


def _stack_outputs(cloudformation: Any, stack: str) -> tuple[str, dict[str, str]]:
    """``(status, outputs)`` of ``stack``; a missing stack is one clear error."""
    from botocore.exceptions import BotoCoreError, ClientError

    region = cloudformation.meta.region_name
    try:
        stacks = cloudformation.describe_stacks(StackName=stack)["Stacks"]
    except ClientError as error:
        message = str(error.response.get("Error", {}).get("Message", ""))
        if "does not exist" in message:
            raise CliError(f"CloudFormation stack {stack!r} not found in {region}: check --stack, --region "
                           "and --profile (or pass --table and --bucket)") from None
        raise _aws_error(error, f"CloudFormation stack {stack!r}") from None
    except BotoCoreError as error:
        raise _aws_error(error, "CloudFormation") from None
    if not stacks:
        raise CliError(f"CloudFormation stack {stack!r} not found in {region}")
    found = stacks[0]
    outputs = {str(item.get("OutputKey")): str(item.get("OutputValue") or "") for item in found.get("Outputs") or []}
    return str(found.get("StackStatus") or ""), outputs


def _resolve_target(make: Callable[[str], Any], *, stack: str | None, table: str | None, bucket: str | None,
                    url: str | None) -> Target:
    from botocore.exceptions import BotoCoreError

    if stack is None:
        if not table or not bucket:
            raise typer.BadParameter("pass --stack NAME (reads the stack's outputs), or both --table and --bucket",
                                     param_hint="--stack / --table / --bucket")
        try:
            region = make("dynamodb").meta.region_name
        except BotoCoreError as error:
            raise _aws_error(error, "DynamoDB") from None
        return Target(table=table, bucket=bucket, url=url, region=region)
    try:
        cloudformation = make("cloudformation")
    except BotoCoreError as error:
        raise _aws_error(error, "CloudFormation") from None
    status, outputs = _stack_outputs(cloudformation, stack)
    # Explicit options win over the stack's outputs (e.g. --url for a custom domain).
    table = table or outputs.get(OUTPUT_TABLE) or None
    bucket = bucket or outputs.get(OUTPUT_BUCKET) or None
    url = url or outputs.get(OUTPUT_URL) or None
    missing = [key for key, value in ((OUTPUT_TABLE, table), (OUTPUT_BUCKET, bucket)) if not value]
    if missing:
        hint = ("wait for the deployment to finish" if status.endswith("_IN_PROGRESS")
                else "is it a maas stack? Deploy it with the maas CDK app, or pass --table and --bucket")
        raise CliError(f"CloudFormation stack {stack!r} ({status or 'unknown status'}) has no "
                       f"{' or '.join(missing)} output: {hint}")
    assert table is not None and bucket is not None
    return Target(table=table, bucket=bucket, url=url, region=cloudformation.meta.region_name, stack=stack)


def _check_table(dynamodb: Any, target: Target) -> None:
    """The registry table exists and looks like maas's (before anything is written)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from maas.backends.aws.table import GSI, PK, SK

    try:
        table = dynamodb.describe_table(TableName=target.table)["Table"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            raise CliError(f"DynamoDB table {target.table!r} not found in {target.region}: check --table / "
                           "--stack and --region") from None
        raise _aws_error(error, f"DynamoDB table {target.table!r}") from None
    except BotoCoreError as error:
        raise _aws_error(error, "DynamoDB") from None
    keys = {item.get("AttributeName"): item.get("KeyType") for item in table.get("KeySchema") or []}
    indexes = {item.get("IndexName") for item in table.get("GlobalSecondaryIndexes") or []}
    if keys != {PK: "HASH", SK: "RANGE"} or GSI not in indexes:
        raise CliError(f"DynamoDB table {target.table!r} is not a maas registry (expected keys {PK}/{SK} and "
                       f"index {GSI}): check --table / --stack")


def _caller(make: Callable[[str], Any]) -> str:
    """The caller's ARN for ``created_by``; ``aws`` when STS cannot say (never fatal)."""
    try:
        return str(make("sts").get_caller_identity()["Arn"]) or "aws"
    except Exception:
        return "aws"


def _is_live_admin(token: Token) -> bool:
    return not token.revoked and token.model is None and Scope.ADMIN in token.scopes


# -- output -----------------------------------------------------------------------------------------


def _save_token(path: Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(secret + "\n")


def _show(target: Target, token: Token, secret: str, *, saved: Path | None, as_json: bool, quiet: bool) -> None:
    if quiet:
        typer.echo(secret)
        return
    if as_json:
        typer.echo(orjson.dumps({
            "token": secret, "id": token.id, "name": token.name, "scopes": [s.value for s in token.scopes],
            "created_by": token.created_by, "url": target.url, "stack": target.stack, "table": target.table,
            "bucket": target.bucket, "region": target.region, "saved_to": str(saved) if saved else None,
        }, option=orjson.OPT_INDENT_2).decode())
        return
    where = f"stack {target.stack}, " if target.stack else ""
    typer.echo(f"admin token {token.id} ({token.name}) created in {where}table {target.table} ({target.region}) "
               f"by {token.created_by}:")
    typer.echo("")
    typer.echo(secret)
    typer.echo("")
    typer.echo(f"API URL: {target.url or 'unknown (pass --url, or use --stack to read it)'}")
    if saved is not None:
        typer.echo(f"saved to {saved} (mode 0600); the CLI and SDK use it when {ENV_TOKEN} is unset")
    typer.echo("It is shown only this once: keep it in a secret store. Use it with:")
    typer.echo(f"  export {ENV_URL}={shlex.quote(target.url) if target.url else '<API URL>'}")
    typer.echo(f"  export {ENV_TOKEN}={shlex.quote(secret)}")
    typer.echo("then, for example: maas models list    (narrower tokens: maas tokens create NAME --scope invoke)")


# -- the command ------------------------------------------------------------------------------------


@admin_app.command("bootstrap")
def bootstrap(
    ctx: typer.Context,
    stack: Annotated[
        str | None, typer.Option("--stack", help="CloudFormation stack name; its outputs give table, bucket, URL.")
    ] = None,
    table: Annotated[
        str | None, typer.Option("--table", help="Registry DynamoDB table (instead of --stack).")
    ] = None,
    bucket: Annotated[
        str | None, typer.Option("--bucket", help="Model S3 bucket (instead of --stack; with --table).")
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="API URL to print (default: the stack's ApiUrl output).")
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="AWS profile (default: the standard credential chain).")
    ] = None,
    region: Annotated[
        str | None, typer.Option("--region", help="AWS region (default: the profile's or AWS_REGION).")
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Label of the new token.")] = "admin",
    force: Annotated[
        bool,
        typer.Option("--force", help="Mint even if a live admin token exists (recovery when it is lost)."),
    ] = False,
    save: Annotated[
        bool,
        typer.Option("--save", help="Also write the token to <home>/admin-token (mode 0600) for the CLI/SDK."),
    ] = False,
    home: Annotated[
        Path | None, typer.Option("--home", help="Where --save writes (default: MAAS_HOME or ~/.maas).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the token (for scripts).")] = False,
) -> None:
    """Mint the first admin token of a deployed stack, with your own AWS credentials.

    Writes the token straight into the stack's DynamoDB registry (no API call) and prints it once.

    Refused when a live admin token already exists, unless --force (when it is lost; then revoke it with `maas tokens revoke ID`).

    Nothing is written to disk unless --save. AWS permissions needed: cloudformation:DescribeStacks (with --stack), dynamodb:DescribeTable, Query and PutItem on the table; sts:GetCallerIdentity is optional (it records who created the token).

    Example: maas admin bootstrap --stack maas-dev --profile prod --region eu-west-1

    Example: export MAAS_TOKEN=$(maas admin bootstrap --table maas-dev-registry --bucket maas-dev-models -q)
    """  # noqa: E501
    from botocore.exceptions import BotoCoreError

    from maas.backends.aws import AwsBackend
    from maas.services.tokens import TokenService
    from maas.settings import Settings

    state_home = getattr(ctx.obj, "home", None)
    settings = Settings.from_env(home if home is not None else state_home)
    as_json = bool(getattr(ctx.obj, "json", False))
    try:
        make = _client_factory(profile, region)
    except BotoCoreError as error:
        raise _aws_error(error, "AWS") from None
    target = _resolve_target(make, stack=stack, table=table, bucket=bucket, url=url)
    try:
        backend = AwsBackend(settings, bucket=target.bucket, table=target.table,
                             s3=make("s3"), dynamodb=make("dynamodb"))
    except BotoCoreError as error:
        raise _aws_error(error, "AWS") from None
    _check_table(backend.dynamodb, target)

    admins = [token for token in backend.registry.list_tokens() if _is_live_admin(token)]
    if admins and not force:
        listed = ", ".join(f"{token.id} ({token.name})" for token in admins[:5])
        raise CliError(f"table {target.table!r} already holds {len(admins)} live admin token(s): {listed}; "
                       "use that token, or pass --force to mint another if it is lost")
    save_path = settings.home / ADMIN_TOKEN_FILE if save else None
    if save_path is not None and save_path.exists():
        raise CliError(f"{save_path} already exists (a local `maas serve` admin token?); move it away or "
                       "choose another directory with --home")
    if admins:
        stderr_console().print(
            f"warning: {len(admins)} live admin token(s) already exist ({', '.join(t.id for t in admins)}); "
            "minting another because of --force. Revoke a lost one with `maas tokens revoke ID`.",
            style="yellow", markup=False, soft_wrap=True)

    token, secret = TokenService(backend.registry).create(name, [Scope.ADMIN.value],
                                                          created_by=f"bootstrap:{_caller(make)}")
    save_error: str | None = None
    if save_path is not None:
        try:
            _save_token(save_path, secret)
        except OSError as exc:
            save_path, save_error = None, f"the token was created but not saved ({exc.strerror or exc}): copy it now"
    _show(target, token, secret, saved=save_path, as_json=as_json, quiet=quiet)
    if save_error:
        raise CliError(save_error)


__all__ = ["OUTPUT_BUCKET", "OUTPUT_TABLE", "OUTPUT_URL", "admin_app", "bootstrap"]
