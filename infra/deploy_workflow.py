"""The deploy workflow on AWS: a Standard Step Functions state machine generated from the step list in
``maas.services.deploy`` (the same steps the local backend runs in-process).

For each forward step, in order, one Lambda task (its function is ``functions/deploy/handler.py``'s entry
of the same name) that retries the step's transient errors (named after ``maas.errors`` classes, which
is what a Python Lambda reports as the error name) and catches everything else into the rollback task,
with the error at ``$.failure``. Rollback then ends in a Fail state, so a rolled-back deploy is a failed
execution in the console and in the ``ExecutionsFailed`` alarm."""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from infra.config import StageConfig, log_retention
from maas.services.deploy import ROLLBACK, WORKFLOW, StepSpec

FAILED_STATE = "DeployFailed"
SUCCEEDED_STATE = "Deployed"
FAILURE_PATH = "$.failure"  # where Catch puts {"Error", "Cause"}: StepInput.failure
EXECUTION_TIMEOUT = Duration.days(1)


def state_name(step: StepSpec) -> str:
    """``smoke_test`` -> ``SmokeTest``: the state's name in the console and in the contract test."""
    return "".join(part.title() for part in step.name.value.split("_"))


class DeployWorkflow(Construct):
    """``state_machine`` and its ``log_group``."""

    def __init__(self, scope: Construct, construct_id: str, *, config: StageConfig,
                 functions: Mapping[str, lambda_.IFunction]) -> None:
        super().__init__(scope, construct_id)
        missing = [step.name.value for step in (*WORKFLOW, ROLLBACK) if step.name.value not in functions]
        if missing:
            raise ValueError(f"no Lambda function for deploy step(s): {', '.join(missing)}")

        rollback = self._task(ROLLBACK, functions)
        rollback.next(sfn.Fail(self, FAILED_STATE, error="DeployFailed",
                               cause="a deploy step failed; the deployment was rolled back"))
        first: sfn.IChainable | None = None
        previous: tasks.LambdaInvoke | None = None
        for step in WORKFLOW:
            task = self._task(step, functions)
            task.add_catch(rollback, errors=[sfn.Errors.ALL], result_path=FAILURE_PATH)
            if previous is None:
                first = task
            else:
                previous.next(task)
            previous = task
        assert first is not None and previous is not None, "WORKFLOW has no steps"
        previous.next(sfn.Succeed(self, SUCCEEDED_STATE))

        self.log_group = logs.LogGroup(
            self, "Logs", retention=log_retention(config.log_retention_days),
            removal_policy=RemovalPolicy.RETAIN if config.retain_data else RemovalPolicy.DESTROY,
        )
        self.state_machine = sfn.StateMachine(
            self, "StateMachine",
            state_machine_name=f"maas-{config.name}-deploy",
            state_machine_type=sfn.StateMachineType.STANDARD,
            definition_body=sfn.DefinitionBody.from_chainable(first),
            timeout=EXECUTION_TIMEOUT,
            tracing_enabled=True,
            logs=sfn.LogOptions(destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=True),
            comment="maas deploy: " + " -> ".join(state_name(step) for step in WORKFLOW)
                    + f", any failure -> {state_name(ROLLBACK)}",
        )

    def _task(self, step: StepSpec, functions: Mapping[str, lambda_.IFunction]) -> tasks.LambdaInvoke:
        task = tasks.LambdaInvoke(
            self, state_name(step),
            lambda_function=functions[step.name.value],
            payload_response_only=True,  # the step's return value is the next state's input
            retry_on_service_exceptions=True,
            comment=step.description,
        )
        if step.retry_on:
            task.add_retry(errors=list(step.retry_on), interval=Duration.seconds(2), max_attempts=4,
                           backoff_rate=2, jitter_strategy=sfn.JitterType.FULL)
        return task
