"""``LocalStack``: a synthesized maas stage, running on 127.0.0.1.

Start-up, in order: moto's server (an operator user with full rights does the setup, as the account
owner would with ``cdk deploy``); the template's resources made from their own properties (buckets,
table, topic, log groups, roles and policies, alarms, the state machine); the functions' pools, each
with credentials of its own role; IAM enforcement switched on; the API front; the first admin token,
minted by ``maas admin bootstrap`` with the operator's credentials. What the template declares but
the local stack does not run (bucket and topic resource policies, dashboards, metric filters, access
logs, KMS) is listed in ``skipped``."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from infra.local import iam
from infra.local.cloudwatch import put_metrics, with_percentiles
from infra.local.functions import FunctionPool, FunctionSpec, InvokeResult, function_name, specs
from infra.local.gateway import RestApi, asgi
from infra.local.sagemaker import SageMakerSim, install
from infra.local.template import ACCOUNT, REGION, Assembly, Physical, Resolver, Unresolvable

OPERATOR = "maas-local-operator"
#: the access key moto's Step Functions interpreter signs its Lambda calls with
STATES_ACCESS_KEY = "ak"
_DYNAMODB_CALLS = ("put_item", "update_item", "delete_item", "get_item", "query", "scan", "batch_write_item",
                   "transact_write_items", "transact_get_items", "batch_get_item")


def serialize_moto_dynamodb(setattr_: Callable[..., None]) -> None:
    """DynamoDB applies each request (a transaction too) atomically; moto's in-memory tables do not
    under threads (a cancelled transaction restores a snapshot over other threads' writes). One lock
    around each request restores DynamoDB's atomicity (``setattr_`` records what it replaces)."""
    from moto.dynamodb.models import DynamoDBBackend

    lock = threading.RLock()
    for name in _DYNAMODB_CALLS:
        original = getattr(DynamoDBBackend, name)

        def locked(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with lock:
                return _original(*args, **kwargs)

        setattr_(DynamoDBBackend, name, functools.wraps(original)(locked))
_NOT_RUN = {"AWS::S3::BucketPolicy", "AWS::SNS::TopicPolicy", "AWS::CloudWatch::Dashboard", "AWS::Logs::MetricFilter",
            "AWS::KMS::Key", "Custom::S3AutoDeleteObjects", "AWS::ApiGateway::Deployment", "AWS::Lambda::Permission",
            "AWS::Lambda::LayerVersion", "AWS::CDK::Metadata"}


class Patches:
    """``setattr`` that remembers what it replaced, undone in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def setattr(self, owner: Any, name: str, value: Any, raising: bool = True) -> None:
        if raising and not hasattr(owner, name):
            raise AttributeError(f"{owner!r} has no attribute {name}")
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


_MISSING = object()


def _physical_name(stack_name: str, logical_id: str, limit: int = 63) -> str:
    return f"{stack_name}-{logical_id}".lower()[:limit]


class LocalStack:
    """One stage of a cloud assembly, run locally. ``start()``, then ``url``, ``token``; ``stop()``."""

    def __init__(self, assembly: Assembly, *, port: int = 4566, workdir: Path,
                 sagemaker_update_seconds: float = 2.0, log: Callable[[str], None] | None = None) -> None:
        self.assembly = assembly
        self.port = port
        self.workdir = workdir
        self.resolver = Resolver(assembly.stack_name)
        self.audit = iam.Audit()
        self.pools: dict[str, FunctionPool] = {}
        self.skipped: list[str] = []
        self.lost_logs: dict[str, str] = {}
        self.sagemaker = SageMakerSim(workdir=workdir / "sagemaker", on_update="delayed",
                                      update_seconds=sagemaker_update_seconds)
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._exit = ExitStack()
        self._patches = Patches()
        self._server: Any = None
        self._uvicorn: Any = None
        self.moto_url = ""
        self.url = ""
        self.token = ""
        self.api: RestApi | None = None
        self._operator: dict[str, str] = {}
        self._operator_arn = ""
        self._role_documents: dict[str, list[dict[str, Any]]] = {}
        self.state_machine_role = ""

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> LocalStack:
        try:
            self._start_moto()
            self._create_resources()
            self._start_functions()
            self._exit.enter_context(iam.enforced(self.audit, lambda: {self._operator_arn},
                                                  {STATES_ACCESS_KEY: self._state_machine_principal}))
            self._start_front()
            self.token = self._bootstrap()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for pool in self.pools.values():
            pool.stop()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        self._exit.close()
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._patches.undo()

    # -- moto ---------------------------------------------------------------------------------------

    def _start_moto(self) -> None:
        from moto.core.config import default_user_config
        from moto.server import ThreadedMotoServer

        default_user_config["stepfunctions"] = {"execute_state_machine": True}
        default_user_config["lambda"] = {"use_docker": False}
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.moto_url = f"http://{host}:{port}"
        os.environ["MOTO_PORT"] = str(port)  # moto's Step Functions calls Lambda through its own server
        serialize_moto_dynamodb(self._patches.setattr)
        self._patch_lambda_invoke()
        install(self.sagemaker, self._patches.setattr)
        with_percentiles(self._patches.setattr)
        iam_client = self._client("iam", {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"})
        user = iam_client.create_user(UserName=OPERATOR)["User"]
        iam_client.put_user_policy(UserName=OPERATOR, PolicyName="administrator", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam_client.create_access_key(UserName=OPERATOR)["AccessKey"]
        self._operator = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
        self._operator_arn = user["Arn"]

    def _client(self, service: str, credentials: dict[str, str] | None = None) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.moto_url, region_name=REGION,
                            **(credentials or self._operator))

    def _patch_lambda_invoke(self) -> None:
        from moto.awslambda.models import LambdaBackend
        from moto.awslambda_simple.models import LambdaSimpleBackend

        stack = self

        def invoke(self: Any, function_name: str, qualifier: Any, body: Any, headers: Any,
                   response_headers: dict[str, str]) -> bytes:
            pool = stack.function(function_name)
            result = pool.invoke(json.loads(body) if body else {})
            if result.error is not None:
                response_headers["x-amz-function-error"] = "Unhandled"
                return json.dumps(result.error).encode()
            return result.payload

        for backend in (LambdaBackend, LambdaSimpleBackend):
            self._patches.setattr(backend, "invoke", invoke)

    def function(self, name_or_arn: str) -> FunctionPool:
        name = name_or_arn.split(":function:")[-1].split(":")[0]
        for pool in self.pools.values():
            if pool.spec.name == name or pool.spec.logical_id == name:
                return pool
        raise KeyError(f"no function {name_or_arn}")

    # -- the template's resources -------------------------------------------------------------------

    def _create_resources(self) -> None:
        pending = dict(self.assembly.resources)
        creators: dict[str, Callable[[str, dict[str, Any]], Physical]] = {
            "AWS::S3::Bucket": self._bucket, "AWS::DynamoDB::Table": self._table, "AWS::SNS::Topic": self._topic,
            "AWS::Logs::LogGroup": self._log_group, "AWS::IAM::Role": self._role, "AWS::IAM::Policy": self._policy,
            "AWS::Lambda::Function": self._function_physical, "AWS::ApiGateway::RestApi": self._rest_api,
            "AWS::ApiGateway::Stage": lambda _id, p: Physical(p["StageName"]),
            "AWS::StepFunctions::StateMachine": self._state_machine, "AWS::CloudWatch::Alarm": self._alarm,
            "AWS::Events::Rule": self._rule,
        }
        while pending:
            progress = False
            for logical_id, body in list(pending.items()):
                kind = body["Type"]
                creator = creators.get(kind)
                try:
                    if creator is None:
                        physical = Physical(logical_id, {"Arn": f"arn:aws:local:{REGION}:{ACCOUNT}:{logical_id}"})
                        if kind not in _NOT_RUN and not kind.startswith("AWS::ApiGateway::"):
                            self.skipped.append(f"{logical_id} ({kind})")
                    else:
                        properties = self.resolver.resolve(body.get("Properties", {}), logical_id)
                        physical = creator(logical_id, properties)
                except Unresolvable:
                    continue
                self.resolver.physical[logical_id] = physical
                del pending[logical_id]
                progress = True
            if not progress:
                names = ", ".join(sorted(pending))
                raise Unresolvable(f"cannot order the creation of: {names}")

    def _bucket(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        name = properties.get("BucketName") or _physical_name(self.assembly.stack_name, logical_id)
        s3 = self._client("s3")
        s3.create_bucket(Bucket=name)
        if properties.get("VersioningConfiguration", {}).get("Status") == "Enabled":
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return Physical(name, {"Arn": f"arn:aws:s3:::{name}", "DomainName": f"{name}.s3.amazonaws.com"})

    def _table(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        name = properties.get("TableName") or _physical_name(self.assembly.stack_name, logical_id, 255)
        dynamodb = self._client("dynamodb")
        arguments = {key: properties[key] for key in ("AttributeDefinitions", "KeySchema", "BillingMode",
                                                      "GlobalSecondaryIndexes") if key in properties}
        dynamodb.create_table(TableName=name, **arguments)
        ttl = properties.get("TimeToLiveSpecification")
        if ttl:
            dynamodb.update_time_to_live(TableName=name, TimeToLiveSpecification=ttl)
        arn = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{name}"
        return Physical(name, {"Arn": arn, "StreamArn": f"{arn}/stream/local"})

    def _topic(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        name = properties.get("TopicName") or _physical_name(self.assembly.stack_name, logical_id, 256)
        arn = self._client("sns").create_topic(Name=name)["TopicArn"]
        return Physical(arn, {"TopicArn": arn, "TopicName": name})

    def _log_group(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        name = properties.get("LogGroupName") or f"/local/{self.assembly.stack_name}/{logical_id}"
        self._client("logs").create_log_group(logGroupName=name)
        return Physical(name, {"Arn": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{name}:*"})

    def _role(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        name = properties.get("RoleName") or _physical_name(self.assembly.stack_name, logical_id, 64)
        client = self._client("iam")
        role = client.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(
            properties["AssumeRolePolicyDocument"]))["Role"]
        for index, policy in enumerate(properties.get("Policies", [])):
            client.put_role_policy(RoleName=name, PolicyName=policy.get("PolicyName", f"inline{index}"),
                                   PolicyDocument=json.dumps(policy["PolicyDocument"]))
            self._role_documents.setdefault(role["Arn"], []).append(policy["PolicyDocument"])
        if not logical_id.startswith("Custom"):  # CDK's deploy-time providers never run locally
            for arn in properties.get("ManagedPolicyArns", []):
                self.skipped.append(f"{logical_id}: managed policy {arn} (not granted locally)")
        self._role_documents.setdefault(role["Arn"], [])
        return Physical(name, {"Arn": role["Arn"], "RoleId": role["RoleId"]})

    def _policy(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        client = self._client("iam")
        for role_name in properties.get("Roles", []):
            client.put_role_policy(RoleName=role_name, PolicyName=properties["PolicyName"],
                                   PolicyDocument=json.dumps(properties["PolicyDocument"]))
            arn = f"arn:aws:iam::{ACCOUNT}:role/{role_name}"
            self._role_documents.setdefault(arn, []).append(properties["PolicyDocument"])
        return Physical(properties["PolicyName"])

    def _function_physical(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        name = function_name(self.assembly.stack_name, logical_id)
        return Physical(name, {"Arn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"})

    def _rest_api(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        return Physical("local", {"RootResourceId": "root"})

    def _state_machine(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        name = properties.get("StateMachineName") or f"{logical_id}-local"
        self.state_machine_role = properties["RoleArn"]
        arn = self._client("stepfunctions").create_state_machine(
            name=name, definition=properties["DefinitionString"], roleArn=properties["RoleArn"])["stateMachineArn"]
        return Physical(arn, {"Arn": arn, "Name": name})

    def _alarm(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        name = properties.get("AlarmName") or _physical_name(self.assembly.stack_name, logical_id, 255)
        arguments = {key: properties[key] for key in (
            "MetricName", "Namespace", "Statistic", "Period", "EvaluationPeriods", "Threshold", "ComparisonOperator",
            "TreatMissingData", "Dimensions", "Metrics", "DatapointsToAlarm", "AlarmActions", "AlarmDescription",
            "ExtendedStatistic") if key in properties}
        try:
            self._client("cloudwatch").put_metric_alarm(AlarmName=name, **arguments)
        except Exception as error:  # moto's alarm model is narrower than CloudWatch's
            self.skipped.append(f"{logical_id}: alarm not created ({error})")
        return Physical(name, {"Arn": f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{name}"})

    def _rule(self, logical_id: str, properties: dict[str, Any]) -> Physical:
        name = properties.get("Name") or _physical_name(self.assembly.stack_name, logical_id, 64)
        return Physical(name, {"Arn": f"arn:aws:events:{REGION}:{ACCOUNT}:rule/{name}"})

    # -- functions ----------------------------------------------------------------------------------

    def _credentials(self, role_arn: str, session: str) -> dict[str, str]:
        answer = self._client("sts").assume_role(RoleArn=role_arn, RoleSessionName=session[:64],
                                                 DurationSeconds=43200)["Credentials"]
        return {"AWS_ACCESS_KEY_ID": answer["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": answer["SecretAccessKey"],
                "AWS_SESSION_TOKEN": answer["SessionToken"]}

    def _start_functions(self) -> None:
        base = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
            "AWS_ENDPOINT_URL": self.moto_url, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12", "AWS_XRAY_SDK_ENABLED": "false",
            "AWS_XRAY_CONTEXT_MISSING": "IGNORE_ERROR", "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": str(self.workdir / "home"),
        }
        for spec in specs(self.assembly, self.resolver, self.workdir / "functions", base):
            pool = FunctionPool(spec, functools.partial(self._credentials, spec.role_arn, spec.name),
                                on_result=self._after_invoke)
            self.pools[spec.arn] = pool

    def _after_invoke(self, spec: FunctionSpec, result: InvokeResult) -> None:
        """CloudWatch Logs' side of an invocation: EMF lines become metrics, as on AWS, when the
        function's role could write its logs at all."""
        if result.log_error is not None:
            if spec.name not in self.lost_logs:
                self._log(f"local stack: {spec.name} cannot write its logs ({result.log_error}); on AWS its "
                          "logs and EMF metrics would be lost the same way")
            self.lost_logs[spec.name] = result.log_error
            return
        metrics = [line for line in result.lines if line.startswith("{") and '"_aws"' in line]
        if metrics:
            put_metrics(self._client("cloudwatch"), metrics)

    def _state_machine_principal(self) -> tuple[str, list[dict[str, Any]]]:
        """Step Functions invokes the task functions as the state machine's role."""
        return self.state_machine_role, self._role_documents.get(self.state_machine_role, [])

    # -- the front ----------------------------------------------------------------------------------

    def _start_front(self) -> None:
        import uvicorn

        self.api = RestApi(self.assembly, self.resolver, self.pools)
        config = uvicorn.Config(asgi(self.api, self._local_route), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off", timeout_keep_alive=30)
        self._uvicorn = uvicorn.Server(config)
        thread = threading.Thread(target=self._uvicorn.run, name="local-api-gateway", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the local API front did not start on 127.0.0.1:{self.port}")
            time.sleep(0.05)
        port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{port}/{self.api.stage}"

    def _local_route(self, method: str, path: str, body: bytes) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """``/_local/...``: what the console of a real account would show or do."""
        def answer(status: int, value: Any) -> tuple[int, list[tuple[str, str]], bytes]:
            return status, [("content-type", "application/json")], json.dumps(value, default=str).encode()

        parts = path.strip("/").split("/")
        if parts[1:] == ["health"]:
            return answer(200, {"url": self.url, "functions": len(self.pools)})
        if parts[1:] == ["iam", "denied"]:
            return answer(200, [d.__dict__ for d in self.audit.denied()])
        if parts[1:] == ["logs", "lost"]:
            return answer(200, self.lost_logs)
        if parts[1:] == ["iam", "simulate"] and method == "POST":
            request = json.loads(body or b"{}")
            role = self.function(request["function"]).spec.role_arn
            allowed = iam.evaluate(self._role_documents.get(role, []), request["action"], request["resource"],
                                   request.get("context"))
            return answer(200, {"role": role, "allowed": allowed})
        if parts[1:] == ["invariants"]:
            return answer(200, self.invariant_violations())
        if len(parts) == 4 and parts[1] == "rules" and parts[3] == "run" and method == "POST":
            return answer(*self.run_rule(parts[2]))
        if parts[1:] == ["sagemaker"] and method == "GET":
            return answer(200, self.endpoints())
        if parts[1:] == ["sagemaker"] and method == "POST":
            settings = json.loads(body or b"{}")
            if "update_seconds" in settings:
                self.sagemaker.update_seconds = float(settings["update_seconds"])
            return answer(200, {"update_seconds": self.sagemaker.update_seconds})
        return answer(404, {"message": f"no local route {path}"})

    def endpoints(self) -> dict[str, dict[str, Any]]:
        """Each SageMaker endpoint: its status, config, and the maas version its model serves."""
        backend = self.sagemaker.backend()
        found = {}
        for name, endpoint in backend.endpoints.items():
            config = backend.endpoint_configs.get(endpoint.endpoint_config_name)
            model = backend._models.get(config.production_variants[0]["ModelName"]) if config else None
            environment = (model.primary_container or {}).get("Environment", {}) if model else {}
            found[name] = {"status": endpoint.endpoint_status, "config": endpoint.endpoint_config_name,
                           "version": environment.get("MAAS_MODEL_VERSION"),
                           "pending": endpoint.pending_deployment_summary}
        return found

    def run_rule(self, name: str) -> tuple[int, Any]:
        """A scheduled rule's targets, invoked now the way EventBridge would (its resource policy checked)."""
        for logical_id, properties in self.assembly.of_type("AWS::Events::Rule"):
            physical = self.resolver.physical[logical_id]
            if name not in (logical_id, physical.ref):
                continue
            results = []
            for target in properties.get("Targets", []):
                arn = self.resolver.resolve(target["Arn"], logical_id)
                assert self.api is not None
                if not self.api._may_invoke(arn, physical.attributes["Arn"], "events.amazonaws.com"):
                    results.append({"target": arn, "error": "EventBridge may not invoke it (no permission)"})
                    continue
                event = {"version": "0", "id": str(uuid.uuid4()), "detail-type": "Scheduled Event",
                         "source": "aws.events", "account": ACCOUNT, "region": REGION,
                         "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "resources": [physical.attributes["Arn"]], "detail": {}}
                result = self.function(arn).invoke(event)
                results.append({"target": arn, "error": result.error,
                                "payload": None if result.error else result.json()})
            return 200, results
        return 404, {"message": f"no rule {name}"}

    def invariant_violations(self) -> list[str]:
        """The registry's invariants, checked with the operator's rights (``maas.services.invariants``)."""
        from maas.backends.aws import AwsBackend
        from maas.services.invariants import check_invariants
        from maas.settings import Settings

        table, bucket = self.registry()
        backend = AwsBackend(Settings.from_env(self.workdir / "operator"), bucket=bucket, table=table,
                             s3=self._client("s3"), dynamodb=self._client("dynamodb"))
        return check_invariants(backend.registry, backend.artifacts)

    # -- the first token ----------------------------------------------------------------------------

    def registry(self) -> tuple[str, str]:
        table = bucket = ""
        for logical_id, body in self.assembly.resources.items():
            if body["Type"] == "AWS::DynamoDB::Table":
                table = self.resolver.physical[logical_id].ref
            if body["Type"] == "AWS::S3::Bucket" and "Versioning" in json.dumps(body.get("Properties", {})):
                bucket = self.resolver.physical[logical_id].ref
        return table, bucket

    def _bootstrap(self) -> str:
        table, bucket = self.registry()
        environment = {**os.environ, "AWS_ENDPOINT_URL": self.moto_url, "AWS_DEFAULT_REGION": REGION,
                       "AWS_ACCESS_KEY_ID": self._operator["aws_access_key_id"],
                       "AWS_SECRET_ACCESS_KEY": self._operator["aws_secret_access_key"],
                       "MAAS_HOME": str(self.workdir / "operator")}
        environment.pop("AWS_SESSION_TOKEN", None)
        environment.pop("AWS_PROFILE", None)
        completed = subprocess.run(
            [sys.executable, "-m", "maas", "admin", "bootstrap", "--table", table, "--bucket", bucket,
             "--url", self.url, "--region", REGION, "--quiet"],
            capture_output=True, text=True, env=environment, check=False, timeout=120)
        if completed.returncode != 0:
            raise RuntimeError(f"maas admin bootstrap failed: {completed.stdout}{completed.stderr}")
        return completed.stdout.strip().splitlines()[-1]

