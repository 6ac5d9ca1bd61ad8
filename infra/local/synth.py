"""The cloud assembly the local stack runs: ``app.py``'s app with cdk.json's context, synthesized
in-process (what ``npx cdk synth`` runs) with layer bundling skipped (the local environment provides
the dependency layers' packages; the runtime layer's source is the package itself)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SKIP_BUNDLING: dict[str, list[str]] = {"aws:cdk:bundling-stacks": []}


def context(stage: str, *, pools: bool = False, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = json.loads((REPO / "cdk.json").read_text())["context"]
    # the CLI's default: each asset-backed resource names its asset directory (what `sam build` reads)
    values = {**values, **SKIP_BUNDLING, "aws:cdk:enable-asset-metadata": True, "maas:stage": stage, **extra}
    if pools:
        values["maas:stages"] = {stage: {"container_pools": True}}
    return values


def synthesize(outdir: Path, stage: str, *, pools: bool = False) -> Path:
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")
    from aws_cdk import App

    from infra.stack import build_app

    outdir.mkdir(parents=True, exist_ok=True)
    app, _ = build_app(context(stage, pools=pools), nag=False, outdir=str(outdir))
    assert isinstance(app, App)
    app.synth()
    return outdir
