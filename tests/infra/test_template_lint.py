"""The synthesized templates pass cfn-lint with no errors and no warnings (the template's own metadata
ignores only W3005, CDK's redundant DependsOn), and `sam validate --lint` accepts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.functional.test_sam_events import SAM
from tests.infra.conftest import Synthesized

CFN_LINT = Path(sys.executable).parent / "cfn-lint"


def write(synth: Synthesized, tmp_path: Path) -> Path:
    path = tmp_path / f"maas-{synth.config.name}.template.json"
    path.write_text(json.dumps(synth.raw, indent=1))
    return path


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_cfn_lint_is_clean(stage: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    template = write(request.getfixturevalue(stage), tmp_path)
    completed = subprocess.run([str(CFN_LINT), str(template)], capture_output=True, text=True, timeout=300,
                               check=False)
    # cfn-lint's exit code is a bit mask: 2 errors, 4 warnings, 8 informational
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_sam_validate_lint_accepts_the_template(dev: Synthesized, tmp_path: Path) -> None:
    template = write(dev, tmp_path)
    completed = subprocess.run([str(SAM), "validate", "--lint", "-t", str(template)], capture_output=True,
                               text=True, timeout=300, check=False, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "is a valid SAM Template" in completed.stdout + completed.stderr


def test_cfn_lint_is_clean_on_the_account_stack(dev: Synthesized, tmp_path: Path) -> None:
    from aws_cdk import Stack
    from aws_cdk.assertions import Template

    (account,) = [dependency for dependency in dev.stack.dependencies if isinstance(dependency, Stack)]
    path = tmp_path / f"{account.stack_name}.template.json"
    path.write_text(json.dumps(Template.from_stack(account).to_json(), indent=1))
    completed = subprocess.run([str(CFN_LINT), str(path)], capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_sam_build_needs_no_docker_on_a_default_stage(tmp_path: Path) -> None:
    """Zip functions only by default: `sam build` packages every function from its asset without a
    container runtime (DOCKER_HOST points nowhere, so any attempt to use one fails the build)."""
    from infra.local.synth import synthesize

    out = synthesize(tmp_path / "cdk.out", "dev")
    completed = subprocess.run(
        [str(SAM), "build", "-t", "maas-dev.template.json", "--build-dir", str(tmp_path / "build")],
        capture_output=True, text=True, timeout=600, check=False, cwd=out,
        env={**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock",
             "SAM_CLI_TELEMETRY": "0"})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Build Succeeded" in completed.stdout + completed.stderr
    built = {path.name for path in (tmp_path / "build").iterdir() if path.is_dir()}
    assert {"FunctionsApi45DE0CE2", "FunctionsInference5E6B1817", "FunctionsAuthorizer453D4F28"} <= built, built
