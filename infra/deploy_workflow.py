"""The deploy workflow on AWS: a Standard Step Functions state machine generated from the step list in
``maas.services.deploy`` (the same steps the local backend runs in-process).

For each forward step, in order, one Lambda task (its function is ``functions/deploy/handler.py``'s entry
of the same name) that retries the step's transient errors (named after ``maas.errors`` classes, which
is what a Python Lambda reports as the error name) and catches everything else into the rollback task,
with the error at ``$.failure``. Rollback then ends in a Fail state, so a rolled-back deploy is a failed
execution in the console and in the ``ExecutionsFailed`` alarm.

The traffic loop comes from the same module: a Wait of ``WAIT_SECONDS_PATH`` seconds after
``WAIT_AFTER`` (the bake, or a SageMaker poll interval: no Lambda is billed while it waits), and a
Choice after ``LOOP_CHOICE_AFTER`` that goes on when ``DONE_PATH`` is true and otherwise returns to
``LOOP_START`` (the next canary/linear step)."""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import ArnFormat, Duration, RemovalPolicy, Stack
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from infra.config import StageConfig, log_retention
from maas.services.deploy import (
    DONE_PATH,
    EXECUTION_TIMEOUT_SECONDS,
    LOOP_CHOICE_AFTER,
    LOOP_START,
    ROLLBACK,
    WAIT_AFTER,
    WAIT_SECONDS_PATH,
    WORKFLOW,
    StepSpec,
)

FAILED_STATE = "DeployFailed"
#: Where a rollback that could not finish ends (its retries spent, or an error it cannot retry): the
#: deployment may still send traffic to the new version, so an alarm counts these (infra.monitoring).
ROLLBACK_FAILED_STATE = "RollbackFailed"
SUCCEEDED_STATE = "Deployed"
#: the first state: a deployment's input goes to the first step; ``undo_endpoint`` to ``UNDO_STATE``
START_STATE = "Start"
UNDO_PATH = "$.undo_endpoint"
UNDO_STATE = "UndoEndpoint"
UNDONE_STATE = "EndpointRestored"
WAIT_STATE = "Bake"
CHOICE_STATE = "TrafficFullyShifted"
FAILURE_PATH = "$.failure"  # where Catch puts {"Error", "Cause"}: StepInput.failure
EXECUTION_TIMEOUT = Duration.seconds(EXECUTION_TIMEOUT_SECONDS)  # deploys bake at most MAX_TOTAL_BAKE_SECONDS


def state_name_of(name: str) -> str:
    """``smoke_test`` -> ``SmokeTest``: the state's name in the console and in the contract test."""
    return "".join(part.title() for part in name.split("_"))


def state_name(step: StepSpec) -> str:
    return state_name_of(step.name.value)


class DeployWorkflow(Construct):
    """``state_machine``, its ``log_group`` and ``executions_arn`` (a pattern matching its executions)."""

    def __init__(self, scope: Construct, construct_id: str, *, config: StageConfig,
                 functions: Mapping[str, lambda_.IFunction]) -> None:
        super().__init__(scope, construct_id)
        missing = [step.name.value for step in (*WORKFLOW, ROLLBACK) if step.name.value not in functions]
        if missing:
            raise ValueError(f"no Lambda function for deploy step(s): {', '.join(missing)}")

        rollback = self._task(ROLLBACK, functions)
        rollback.next(sfn.Fail(self, FAILED_STATE, error="DeployFailed",
                               cause="a deploy step failed; the deployment was rolled back"))
        rollback_failed = sfn.Fail(self, ROLLBACK_FAILED_STATE, error="RollbackFailed",
                                   cause="the rollback could not finish: the model may still send traffic to "
                                         "the new version; roll it back by hand (maas rollback)")
        rollback.add_catch(rollback_failed, errors=[sfn.Errors.ALL], result_path=FAILURE_PATH)
        # A manual rollback whose endpoint was still updating: the same rollback task, on its own branch
        # (retrying until SageMaker accepts the update back), ending in success.
        undo = self._task(ROLLBACK, functions, name=UNDO_STATE)
        undo.add_catch(rollback_failed, errors=[sfn.Errors.ALL], result_path=FAILURE_PATH)
        undo.next(sfn.Succeed(self, UNDONE_STATE))
        tasks = {step.name: self._task(step, functions) for step in WORKFLOW}
        for task in tasks.values():
            task.add_catch(rollback, errors=[sfn.Errors.ALL], result_path=FAILURE_PATH)
        succeeded = sfn.Succeed(self, SUCCEEDED_STATE)
        for index, step in enumerate(WORKFLOW):
            following: sfn.IChainable = (tasks[WORKFLOW[index + 1].name] if index + 1 < len(WORKFLOW)
                                         else succeeded)
            if step.name == WAIT_AFTER:
                wait = sfn.Wait(self, WAIT_STATE, time=sfn.WaitTime.seconds_path(WAIT_SECONDS_PATH),
                                comment="bake: let the version take its share of traffic")
                tasks[step.name].next(wait)
                wait.next(following)
            elif step.name == LOOP_CHOICE_AFTER:
                choice = sfn.Choice(self, CHOICE_STATE, comment="all traffic shifted and healthy?")
                tasks[step.name].next(choice)
                choice.when(sfn.Condition.boolean_equals(DONE_PATH, True), following)
                choice.otherwise(tasks[LOOP_START])
            else:
                tasks[step.name].next(following)
        first = (sfn.Choice(self, START_STATE, comment="a deploy, or a manual rollback's endpoint undo?")
                 .when(sfn.Condition.and_(sfn.Condition.is_present(UNDO_PATH),
                                          sfn.Condition.boolean_equals(UNDO_PATH, True)), undo)
                 .otherwise(tasks[WORKFLOW[0].name]))

        self.log_group = logs.LogGroup(
            self, "Logs", retention=log_retention(config.log_retention_days),
            removal_policy=RemovalPolicy.RETAIN if config.retain_data else RemovalPolicy.DESTROY,
        )
        name = f"maas-{config.name}-deploy"
        #: every execution of this state machine (each is named after its deployment id)
        self.executions_arn = Stack.of(self).format_arn(
            service="states", resource="execution", resource_name=f"{name}:*",
            arn_format=ArnFormat.COLON_RESOURCE_NAME)
        self.state_machine = sfn.StateMachine(
            self, "StateMachine",
            state_machine_name=name,
            state_machine_type=sfn.StateMachineType.STANDARD,
            definition_body=sfn.DefinitionBody.from_chainable(first),
            timeout=EXECUTION_TIMEOUT,
            tracing_enabled=True,
            logs=sfn.LogOptions(destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=True),
            comment="maas deploy: " + " -> ".join(state_name(step) for step in WORKFLOW)
                    + f" (looping back to {state_name_of(LOOP_START)} until all traffic is shifted)"
                    + f", any failure -> {state_name(ROLLBACK)}; a manual rollback of an updating endpoint -> "
                    + UNDO_STATE,
        )

    def _task(self, step: StepSpec, functions: Mapping[str, lambda_.IFunction],
              name: str | None = None) -> tasks.LambdaInvoke:
        task = tasks.LambdaInvoke(
            self, name or state_name(step),
            lambda_function=functions[step.name.value],
            payload_response_only=True,  # the step's return value is the next state's input
            retry_on_service_exceptions=True,
            comment=step.description,
        )
        if step.retry_on:
            task.add_retry(errors=list(step.retry_on), interval=Duration.seconds(step.retry_interval_s),
                           max_attempts=step.retry_attempts, backoff_rate=2, jitter_strategy=sfn.JitterType.FULL,
                           max_delay=(Duration.seconds(step.retry_max_delay_s) if step.retry_max_delay_s
                                      else None))
        return task
