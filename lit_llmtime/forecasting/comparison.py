"""Where the LLM stands against each reference forecaster: the paired difference of per-series
MAE with a bootstrap interval over series (so "beats X" is a claim with an interval), and the
error by steps ahead (where a rollout goes wrong)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import bootstrap

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
MIN_SERIES = 10  # below it a percentile interval is about the range of the differences: no verdict


def paired_difference(
    model_errors, reference_errors, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> dict[str, float]:
    """Mean over series of ``model - reference`` (negative: the model is better) and its
    percentile bootstrap interval, series resampled with their pairs kept together. Series where
    either error is undefined are left out; fewer than two series give no interval."""
    differences = np.asarray(model_errors, dtype=np.float64) - np.asarray(reference_errors, dtype=np.float64)
    differences = differences[np.isfinite(differences)]
    mean = float(differences.mean()) if len(differences) else math.nan
    low = high = math.nan
    if len(differences) > 1 and np.ptp(differences) > 0:
        interval = bootstrap(
            (differences,),
            np.mean,
            n_resamples=resamples,
            confidence_level=level,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        low, high = float(interval.low), float(interval.high)
    elif len(differences) > 1:  # every series differs by the same amount: no spread to resample
        low = high = mean
    return {"difference": mean, "low": low, "high": high, "series": len(differences)}


def verdict(entry: dict[str, float]) -> str:
    """``better`` or ``worse`` when the interval excludes zero, else ``no clear difference``;
    ``too few series`` below ``MIN_SERIES`` (each of the intervals is 95% on its own: with several
    references and variables, one in twenty of them may exclude zero by chance)."""
    if entry["series"] < MIN_SERIES:
        return "too few series"
    if entry["high"] < 0:
        return "better"
    if entry["low"] > 0:
        return "worse"
    return "no clear difference"


def compare_to_references(
    summary: dict[str, Any], resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> dict[str, dict[str, dict[str, float]]]:
    """For each reference in a ``summarise`` result and each variable: the LLM's paired MAE
    difference with its interval (the same series, in the same order, for both)."""
    variables = summary["variables"]
    model = summary["model"]["per_trajectory"]
    result = {}
    for name, reference in summary["references"].items():
        per = reference["per_trajectory"]
        result[name] = {
            variable: paired_difference(
                [model[i][variable]["mae"] for i in model],
                [per[i][variable]["mae"] for i in model],
                resamples,
                seed,
                level,
            )
            | {"level": level, "resamples": resamples, "seed": seed}
            for variable in variables
        }
    return result


def error_by_horizon(truth: np.ndarray, forecast: np.ndarray) -> np.ndarray:
    """(H, V) mean absolute error over series at each step ahead of (N, H, V) forecasts."""
    return np.abs(np.asarray(forecast, dtype=np.float64) - np.asarray(truth, dtype=np.float64)).mean(axis=0)
