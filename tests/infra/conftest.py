"""The CDK stacks, synthesized once per test session with bundling skipped (a placeholder asset per
layer): building a stack costs seconds, asserting on it milliseconds."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")

from aws_cdk.assertions import Template

from infra.config import StageConfig
from infra.stack import MaasStack, build_app

REPO = Path(__file__).resolve().parents[2]
SKIP_BUNDLING = {"aws:cdk:bundling-stacks": []}


def cdk_context(**extra: Any) -> dict[str, Any]:
    """cdk.json's context (what `npx cdk synth` passes to app.py) plus ``extra``."""
    context: dict[str, Any] = json.loads((REPO / "cdk.json").read_text())["context"]
    return {**context, **SKIP_BUNDLING, **extra}


class Synthesized:
    """A synthesized stage: the stack object, its template as a dict, and CDK's assertion helper."""

    def __init__(self, stack: MaasStack, template: dict[str, Any]):
        self.stack = stack
        self.config: StageConfig = stack.config
        self.raw = template
        self.template = Template.from_json(template)

    def resources(self, kind: str) -> dict[str, dict[str, Any]]:
        return {name: body for name, body in self.raw["Resources"].items() if body["Type"] == kind}

    def logical_id(self, construct: Any) -> str:
        return self.stack.get_logical_id(construct.node.default_child)


#: what opting a stage into container pools looks like in cdk.json (or `-c 'maas:stages={...}'`)
WITH_POOLS = {"maas:stages": {"dev": {"container_pools": True}}}


def synthesize(stage: str, **extra: Any) -> Synthesized:
    app, stack = build_app(cdk_context(**{"maas:stage": stage}, **extra), nag=False)
    assembly = app.synth()
    return Synthesized(stack, assembly.get_stack_by_name(stack.stack_name).template)


@pytest.fixture(scope="session")
def dev() -> Iterator[Synthesized]:
    yield synthesize("dev")


@pytest.fixture(scope="session")
def prod() -> Iterator[Synthesized]:
    yield synthesize("prod")


@pytest.fixture(scope="session")
def pools() -> Iterator[Synthesized]:
    """dev with container pools on: the image inference pool and the SageMaker GPU image."""
    yield synthesize("dev", **WITH_POOLS)
