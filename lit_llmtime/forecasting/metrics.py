"""Forecast scores per variable: MSE, MAE, R² (the report's), MASE (the forecasting field's
scale-free point score) and, for sampled forecasts, CRPS and the weighted quantile loss (the
probabilistic scores Chronos and LLMTime report)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score
from torchmetrics.functional.regression import continuous_ranked_probability_score

from lit_llmtime.data.series import default_variables

POINT_METRICS = ("mse", "mae", "r2", "mase")
SAMPLE_METRICS = ("crps", "wql")
QUANTILE_LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def naive_scale(prompt: np.ndarray) -> np.ndarray:
    """(V,) mean absolute one-step change over a (P, V) prompt: the in-sample error of the naive
    forecast, which MASE divides by (Hyndman and Koehler, 2006). Rows of NaN (the left padding of
    a shorter prompt) are not steps."""
    prompt = np.asarray(prompt, dtype=np.float64)
    return np.abs(np.diff(prompt[~np.isnan(prompt).any(axis=1)], axis=0)).mean(axis=0)


def weighted_quantile_loss(truth: np.ndarray, samples: np.ndarray, levels=QUANTILE_LEVELS) -> float:
    """Mean over ``levels`` of ``2 sum |pinball loss| / sum |truth|`` for (H,) ``truth`` and (S, H)
    ``samples`` (the quantiles are the samples' empirical ones), as Chronos reports it."""
    truth = np.asarray(truth, dtype=np.float64)
    quantiles = np.quantile(samples, levels, axis=0)  # (Q, H)
    levels = np.asarray(levels)[:, None]
    pinball = np.maximum(levels * (truth - quantiles), (levels - 1) * (truth - quantiles))
    return float(2 * pinball.sum(axis=1).mean() / max(np.abs(truth).sum(), 1e-12))


def score(
    truth: np.ndarray,
    forecast: np.ndarray,
    prompt: np.ndarray,
    samples: np.ndarray | None = None,
    variables: tuple[str, ...] | None = None,
) -> dict[str, dict[str, float]]:
    """Scores per variable (named by ``variables``; default x0, x1, ...) of one (H, V) forecast
    against its (H, V) truth; ``prompt`` (P, V) scales MASE. With (S, H, V) ``samples`` and S > 1,
    also CRPS (from the samples) and the weighted quantile loss at 0.1 ... 0.9."""
    if np.isnan(forecast).any():
        raise ValueError("forecast has NaN steps: fill them (fill_invalid) before scoring")
    scale = naive_scale(prompt)
    result = {}
    for k, name in enumerate(variables or default_variables(truth.shape[-1])):
        y, p = torch.as_tensor(truth[:, k], dtype=torch.float64), torch.as_tensor(forecast[:, k], dtype=torch.float64)
        mae = mean_absolute_error(p, y).item()
        scores = {
            "mse": mean_squared_error(p, y).item(),
            "mae": mae,
            "r2": r2_score(p, y).item() if len(y) > 1 else math.nan,
            "mase": mae / scale[k] if scale[k] > 0 else math.nan,
        }
        if samples is not None and samples.shape[0] > 1:
            ensemble = torch.as_tensor(samples[:, :, k], dtype=torch.float64).T  # (H, S)
            scores["crps"] = continuous_ranked_probability_score(ensemble, y).item()
            scores["wql"] = weighted_quantile_loss(truth[:, k], samples[:, :, k])
        result[name] = scores
    return result


def nanmean(values) -> float:
    """Mean of the finite values (NaN when there are none): one undefined score (R² of a flat
    truth) does not hide the others."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
