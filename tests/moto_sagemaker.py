"""The SageMaker stand-in (``infra.local.sagemaker``) as a pytest fixture: patched into moto for one
test, its models downloaded under the test's tmp dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.local.sagemaker import ACCOUNT, SageMakerSim, install

__all__ = ["ACCOUNT", "SageMakerSim", "sagemaker_sim"]


@pytest.fixture
def sagemaker_sim(moto: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[SageMakerSim]:
    """The simulation, patched into moto for one test (needs the ``moto`` fixture's mock)."""
    sim = SageMakerSim(workdir=tmp_path / "sagemaker")
    install(sim, monkeypatch.setattr)
    yield sim
