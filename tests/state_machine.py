"""The deploy state machine's Amazon States Language exactly as ``infra/deploy_workflow.py`` builds it,
with the Lambda ARNs of the caller's choice (moto's functions): what a moto Step Functions run executes,
so the contract test runs the real definition, not a copy of it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return str(separator).join(_text(part) for part in parts)
    raise AssertionError(f"unresolved CloudFormation value in the definition: {value!r}")


def deploy_definition(function_arns: Mapping[str, str]) -> str:
    """ASL of the deploy workflow whose step ``name`` invokes ``function_arns[name]``."""
    from aws_cdk import App, Stack
    from aws_cdk import aws_lambda as lambda_
    from aws_cdk.assertions import Template

    from infra.config import DEV
    from infra.deploy_workflow import DeployWorkflow

    stack = Stack(App(), "DeployWorkflowOnly")
    functions = {name: lambda_.Function.from_function_arn(stack, f"Step-{name}", arn)
                 for name, arn in function_arns.items()}
    DeployWorkflow(stack, "DeployWorkflow", config=DEV, functions=functions)
    resources = Template.from_stack(stack).to_json()["Resources"]
    (machine,) = [r for r in resources.values() if r["Type"] == "AWS::StepFunctions::StateMachine"]
    definition = _text(machine["Properties"]["DefinitionString"])
    json.loads(definition)  # valid JSON, no placeholders left
    return definition
