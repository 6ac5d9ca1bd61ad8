#!/usr/bin/env python3
"""CDK entry point (``cdk.json``: ``"app": "python app.py"``): stage config from context -> MaasStack ->
cdk-nag checks. No logic here: see ``infra/stack.py``.

    npx cdk synth                      # dev stage
    npx cdk deploy -c maas:stage=prod  # prod: data retained, reserved concurrency, longer retention
"""

from infra.stack import build_app

app, _stack = build_app()
app.synth()
