"""Settings come from MAAS_* variables, and a bad value is one clear error naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from maas.errors import InvalidInput
from maas.settings import Settings


def test_environment_overrides_limits_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAAS_HOME", str(tmp_path))
    monkeypatch.setenv("MAAS_MAX_MODEL_BYTES", "1024")
    monkeypatch.setenv("MAAS_VALIDATION_TIMEOUT_S", "2.5")
    settings = Settings.from_env()
    assert settings.home == tmp_path
    assert settings.limits.max_model_bytes == 1024 and settings.limits.validation_timeout_s == 2.5
    assert Settings.from_env(tmp_path / "other").home == tmp_path / "other"


@pytest.mark.parametrize("value", ["abc", "-1", "0"])
def test_bad_limit_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MAAS_MAX_REQUEST_BYTES", value)
    with pytest.raises(InvalidInput) as raised:
        Settings.from_env()
    assert raised.value.field == "MAAS_MAX_REQUEST_BYTES"
