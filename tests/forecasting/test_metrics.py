import math

import numpy as np
import pytest

from lit_llmtime.forecasting.metrics import QUANTILE_LEVELS, naive_scale, nanmean, score, weighted_quantile_loss


def test_mase_divides_by_the_prompts_one_step_naive_error():
    prompt = np.array([[1.0, 5.0], [2.0, 5.0], [4.0, 5.0]])  # prey steps 1, 2; predator flat
    np.testing.assert_allclose(naive_scale(prompt), [1.5, 0.0])
    truth, forecast = np.array([[5.0, 5.0], [6.0, 5.0]]), np.array([[4.0, 5.0], [9.0, 6.0]])
    scores = score(truth, forecast, prompt)
    assert scores["x0"]["mae"] == 2.0 and scores["x0"]["mase"] == pytest.approx(2.0 / 1.5)
    assert math.isnan(scores["x1"]["mase"])  # a flat prompt has no scale
    assert nanmean([1.0, math.nan, 3.0]) == 2.0 and math.isnan(nanmean([math.nan]))


def test_crps_and_quantile_loss_from_samples_against_their_definitions():
    rng = np.random.default_rng(0)
    truth = rng.uniform(1, 3, (6, 2))
    samples = truth[None] + rng.normal(0, 0.5, (20, 6, 2))
    scores = score(truth, np.median(samples, axis=0), truth[:3], samples)
    for k, species in enumerate(("x0", "x1")):
        x, y = samples[:, :, k], truth[:, k]
        # CRPS = E|X - y| - E|X - X'| / 2 per step (the ensemble form), averaged over the steps
        crps = np.mean(np.abs(x - y).mean(0) - 0.5 * np.abs(x[:, None] - x[None]).mean((0, 1)))
        assert scores[species]["crps"] == pytest.approx(crps, rel=1e-9)
        q = np.quantile(x, QUANTILE_LEVELS, axis=0)
        losses = [
            2 * np.sum(np.maximum(t * (y - q[i]), (t - 1) * (y - q[i]))) / np.sum(y)
            for i, t in enumerate(QUANTILE_LEVELS)
        ]
        assert scores[species]["wql"] == pytest.approx(np.mean(losses), rel=1e-9)
    assert "crps" not in score(truth, truth, truth, samples[:1])  # one sample: a point forecast


def test_a_perfect_forecast_scores_zero_and_a_sure_one_has_no_spread():
    truth = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 2.0]])
    samples = np.repeat(truth[None], 4, axis=0)
    scores = score(truth, truth, truth, samples)
    assert all(scores[s][m] == 0.0 for s in scores for m in ("mse", "mae", "mase", "crps", "wql"))
    assert scores["x0"]["r2"] == 1.0
    assert weighted_quantile_loss(truth[:, 0], samples[:, :, 0] + 1.0) == pytest.approx(
        0.5
    )  # mean of 1 - t over the levels
