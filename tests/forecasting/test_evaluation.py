"""Forecast results scored: the model and the references on the same steps."""

import numpy as np
import pytest

from lit_llmtime.forecasting.evaluation import summarise


def test_llm_and_references_are_scored_on_the_same_steps():
    rng = np.random.default_rng(0)
    truth, forecast = rng.uniform(0.5, 3, (3, 8, 2)), rng.uniform(0.5, 3, (3, 8, 2))
    prompt = rng.uniform(0.5, 3, (3, 6, 2))
    predictions = {
        "index": np.array([4, 9, 12]), "truth": truth, "forecast": forecast, "valid_share": np.array([1, 5 / 8, 1]),
        "prompt": prompt, "samples": forecast[:, None], "references": {"persistence": forecast}, "flops": 1.0,
        "seconds": 0.1, "tokens": 10.0, "variables": ("prey", "predator"),
    }  # fmt: skip
    summary = summarise(predictions)
    for row, index in enumerate((4, 9, 12)):
        for k, species in enumerate(("prey", "predator")):
            y, p = truth[row, :, k], forecast[row, :, k]
            got = summary["model"]["per_trajectory"][index][species]
            assert got["mse"] == pytest.approx(np.mean((p - y) ** 2))
            assert got["mae"] == pytest.approx(np.mean(np.abs(p - y)))
            assert got["r2"] == pytest.approx(1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))
            assert got["mase"] == pytest.approx(got["mae"] / np.mean(np.abs(np.diff(prompt[row, :, k]))))
            assert "crps" not in got  # one sample: no probabilistic scores
            assert summary["references"]["persistence"]["per_trajectory"][index][species] == got
    mean_r2 = np.mean([summary["model"]["per_trajectory"][i]["prey"]["r2"] for i in (4, 9, 12)])
    assert summary["model"]["mean"]["prey"]["r2"] == pytest.approx(mean_r2)
    assert summary["model"]["mean"]["valid_share"] == pytest.approx((2 + 5 / 8) / 3)
    assert summary["generation"]["tokens_per_second"] == pytest.approx(100.0)


def test_the_printed_table_says_why_the_ode_reference_is_exact_on_simulated_data(tmp_path):
    from lit_llmtime.forecasting.evaluation import LOTKA_VOLTERRA_NOTE, summary_lines

    rng = np.random.default_rng(1)
    truth = rng.uniform(0.5, 3, (2, 4, 2))
    predictions = {
        "index": np.array([0, 1]), "truth": truth, "forecast": truth + 0.1, "valid_share": np.ones(2),
        "prompt": truth, "samples": (truth + 0.1)[:, None], "flops": 1.0, "seconds": 0.1, "tokens": 8.0,
        "references": {"persistence": truth + 0.2, "lotka_volterra": truth}, "variables": ("prey", "predator"),
    }  # fmt: skip
    lines = summary_lines(summarise(predictions), tmp_path / "metrics.md", []).splitlines()
    (ode,) = [line for line in lines if line.strip().startswith("lotka_volterra ")]
    assert [float(v) for v in ode.split()[1:]] == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # MAE, MASE, R² per variable
    assert lines[lines.index(ode) + 1] == f"  ({LOTKA_VOLTERRA_NOTE})"
    llm = next(line for line in lines if line.strip().startswith("LLM "))
    assert float(llm.split()[1]) == pytest.approx(0.1)
