"""The LLM against each reference: paired bootstrap intervals and the error by steps ahead."""

import numpy as np
import pytest

from lit_llmtime.forecasting.comparison import error_by_horizon, paired_difference, verdict
from lit_llmtime.forecasting.evaluation import markdown_table, summarise, summary_lines


def numpy_percentile_bootstrap(differences: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """The textbook percentile bootstrap of a mean, written out: series drawn with replacement."""
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), (resamples, len(differences)))].mean(axis=1)
    return tuple(np.percentile(means, [2.5, 97.5]))


def test_the_interval_is_the_percentile_bootstrap_of_the_mean_paired_difference():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.2, 1.0, 60)
    model = reference - 0.1 + rng.normal(0, 0.15, 60)  # better on average, worse on some series
    entry = paired_difference(model, reference)
    assert entry["difference"] == pytest.approx(np.mean(model - reference))
    assert entry["series"] == 60
    low, high = numpy_percentile_bootstrap(model - reference, 20_000, seed=1)
    spread = np.std(model - reference) / np.sqrt(60)  # the mean's standard error
    # 2,000 resamples place a 2.5% tail to about 0.06 of it; a 90% interval would miss by 0.3
    assert entry["low"] == pytest.approx(low, abs=0.25 * spread)
    assert entry["high"] == pytest.approx(high, abs=0.25 * spread)
    assert entry["high"] < 0 and verdict(entry) == "better"
    assert paired_difference(model, reference) == entry  # a fixed seed: the same interval every time
    swapped = paired_difference(reference, model)
    assert verdict(swapped) == "worse" and swapped["low"] == pytest.approx(-entry["high"], abs=0.25 * spread)


def test_no_clear_difference_undefined_series_and_constant_differences():
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 1, 40)
    assert verdict(paired_difference(noise, np.zeros(40))) == "no clear difference"
    with_nan = paired_difference([1.0, np.nan, 3.0, 2.0], [0.5, 0.5, 0.5, np.inf])
    assert with_nan["series"] == 2 and with_nan["difference"] == pytest.approx(1.5)
    constant = paired_difference(np.arange(12.0) + 1, np.arange(12.0))
    assert (constant["low"], constant["high"]) == (1.0, 1.0) and verdict(constant) == "worse"
    assert np.isnan(paired_difference([1.0], [0.0])["low"])
    few = paired_difference([0.1, 0.2, 0.3], [1.0, 1.1, 1.2])  # three series, each better: no claim from three
    assert few["high"] < 0 and verdict(few) == "too few series"


def test_predict_metrics_carry_the_intervals_and_the_error_by_steps_ahead(tmp_path):
    rng = np.random.default_rng(3)
    truth = rng.uniform(1, 3, (30, 5, 2))
    close, far = truth + rng.normal(0, 0.05, truth.shape), truth + rng.normal(0, 0.5, truth.shape)
    predictions = {
        "index": np.arange(30), "truth": truth, "forecast": close, "valid_share": np.ones(30), "prompt": truth,
        "samples": close[:, None], "flops": 1.0, "seconds": 0.1, "tokens": 8.0, "variables": ("prey", "predator"),
        "references": {"persistence": far, "auto_arima": close},
    }  # fmt: skip
    summary = summarise(predictions)
    assert summary["horizon"]["persistence"]["predator"] == pytest.approx(error_by_horizon(truth, far)[:, 1].tolist())
    assert np.abs(far - truth)[:, 4, 0].mean() == pytest.approx(summary["horizon"]["persistence"]["prey"][4])
    against = summary["comparison"]["persistence"]["prey"]
    per_series = np.abs(close - truth).mean(axis=1)[:, 0] - np.abs(far - truth).mean(axis=1)[:, 0]
    assert against["difference"] == pytest.approx(per_series.mean()) and verdict(against) == "better"
    assert verdict(summary["comparison"]["auto_arima"]["prey"]) == "no clear difference"  # the same forecasts
    lines = summary_lines(summary, tmp_path / "metrics.md", []).splitlines()
    (row,) = [line for line in lines if line.strip().startswith("LLM - persistence ")]
    assert row.count("better") == 2 and f"{against['difference']:+.4f}" in row
    table = markdown_table(summary)
    assert "## The LLM against each reference" in table and "| auto_arima | +0.0000 [+0.0000, +0.0000]" in table
