"""Deploys as Step Functions executions (``maas.ports.DeployExecutor`` on AWS).

The state machine (built in ``infra/`` from ``maas.services.deploy.WORKFLOW``) runs the steps as
Lambda tasks of ``functions/deploy``; starting it is all the API does, so a deploy answers at once
with the deployment IN_PROGRESS. The execution is named after the deployment: Step Functions keeps
execution names unique per state machine, so starting a deploy twice never runs two workflows."""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from maas.backends.aws.errors import aws_errors, error_code
from maas.domain import Deployment
from maas.errors import Conflict
from maas.services.deploy import StepInput

WHAT = "the deploy workflow"
#: the execution that rolls a cancelled deployment's endpoint back is named ``<deployment id>-undo``
UNDO_SUFFIX = "-undo"


class StepFunctionsExecutor:
    """Starts one execution of the deploy state machine per deployment."""

    def __init__(self, client: Any, state_machine_arn: str):
        self.client = client
        self.state_machine_arn = state_machine_arn

    def execution_arn(self, deployment_id: str) -> str:
        """``arn:...:stateMachine:<name>`` -> ``arn:...:execution:<name>:<deployment id>``."""
        head, sep, name = self.state_machine_arn.rpartition(":stateMachine:")
        if not sep:
            return f"{self.state_machine_arn}:{deployment_id}"
        return f"{head}:execution:{name}:{deployment_id}"

    @staticmethod
    def execution_input(deployment: Deployment) -> str:
        return json.dumps(StepInput(model=deployment.model, deployment_id=deployment.id).dump(), sort_keys=True,
                          separators=(",", ":"))

    def start(self, deployment: Deployment) -> Deployment:
        payload = self.execution_input(deployment)
        with aws_errors(WHAT):
            try:
                self.client.start_execution(stateMachineArn=self.state_machine_arn, name=deployment.id,
                                            input=payload)
            except ClientError as error:
                # Same name and input while it runs: Step Functions answers as for the first call.
                # Once it finished (or with another input) it refuses: the same input is still "started".
                if error_code(error) != "ExecutionAlreadyExists":
                    raise
                self._check_same_input(deployment, payload)
        return deployment

    def cancel(self, deployment: Deployment) -> None:
        """Stop the deployment's execution (a manual rollback): its Wait ends now instead of after the
        bake. Already finished or never started: nothing to do."""
        with aws_errors(WHAT):
            try:
                self.client.stop_execution(executionArn=self.execution_arn(deployment.id), error="Cancelled",
                                           cause="the deployment was rolled back by hand")
            except ClientError as error:
                if error_code(error) not in ("ExecutionDoesNotExist", "ValidationException"):
                    raise

    def undo_endpoint(self, deployment: Deployment) -> None:
        """Start the state machine's endpoint-only branch (``undo_endpoint`` in the input): its
        rollback task retries until SageMaker accepts the update back. One per deployment."""
        payload = json.dumps(StepInput(model=deployment.model, deployment_id=deployment.id, undo_endpoint=True)
                             .dump(), sort_keys=True, separators=(",", ":"))
        with aws_errors(WHAT):
            try:
                self.client.start_execution(stateMachineArn=self.state_machine_arn,
                                            name=f"{deployment.id}{UNDO_SUFFIX}", input=payload)
            except ClientError as error:
                if error_code(error) != "ExecutionAlreadyExists":
                    raise

    def _check_same_input(self, deployment: Deployment, payload: str) -> None:
        described = self.client.describe_execution(executionArn=self.execution_arn(deployment.id))
        try:
            existing = json.loads(described.get("input") or "null")
        except ValueError:
            existing = None
        if existing != json.loads(payload):
            raise Conflict(f"a deploy workflow for deployment {deployment.id} already ran with other input")


__all__ = ["StepFunctionsExecutor"]
