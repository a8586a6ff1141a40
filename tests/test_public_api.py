"""The names users import from the package's top, and the old names that still work."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lit_llmtime


def test_the_public_api_imports_from_the_top():
    from lit_llmtime import Forecaster, LLMTimeLoRA, SeriesDataModule, load_series, simulate
    from lit_llmtime.data.module import SeriesDataModule as defined
    from lit_llmtime.forecasting.forecaster import Forecaster as forecaster

    assert Forecaster is forecaster and SeriesDataModule is defined
    assert LLMTimeLoRA.__module__ == "lit_llmtime.training.module" and callable(load_series) and callable(simulate)
    assert sorted(dir(lit_llmtime)) == sorted(lit_llmtime.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        lit_llmtime.Nothing  # noqa: B018


def test_importing_the_package_loads_no_torch():
    """``lit-llmtime --help`` stays fast: the public names are imported on first use."""
    code = "import sys, lit_llmtime; print('torch' in sys.modules, 'lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False"] * 2


def test_old_names_work_with_one_deprecation_line(capsys, monkeypatch):
    from lit_llmtime import config
    from lit_llmtime.config import ForecastArgs

    monkeypatch.setattr(config, "_said", set())  # each is said once per process
    from lit_llmtime.data import LotkaVolterraDataModule, SeriesDataModule

    assert LotkaVolterraDataModule is SeriesDataModule
    assert ForecastArgs(forecast_steps=7).horizon == 7 and ForecastArgs(forecast_steps=8).forecast_steps is None
    said = capsys.readouterr().err.splitlines()
    assert said == [
        "lit-llmtime: lit_llmtime.data.LotkaVolterraDataModule is deprecated, use lit_llmtime.data.SeriesDataModule "
        "(the old name still works for now)",
        "lit-llmtime: forecast.forecast_steps is deprecated, use forecast.horizon (the old name still works for now)",
    ]
