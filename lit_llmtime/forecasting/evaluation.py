"""Forecast results: merging batches and ranks, metrics over a set, and the files predict writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lit_llmtime.data.series import default_variables
from lit_llmtime.forecasting.comparison import (
    LEVEL,
    MIN_SERIES,
    RESAMPLES,
    compare_to_references,
    error_by_horizon,
    verdict,
)
from lit_llmtime.forecasting.metrics import POINT_METRICS, SAMPLE_METRICS, nanmean, score
from lit_llmtime.io import atomic_path, write_text_atomic

ARRAYS = ("index", "prompt", "truth", "forecast", "lower", "upper", "samples", "valid_share", "alpha")


def merge_predictions(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate predict outputs (batches or ranks), sorted by trajectory index, duplicates
    (from a distributed sampler's padding) dropped."""
    merged: dict[str, Any] = {key: np.concatenate([p[key] for p in parts]) for key in ARRAYS}
    merged["texts"] = [text for p in parts for text in p["texts"]]
    common = [name for name in parts[0]["references"] if all(name in p["references"] for p in parts)]
    merged["references"] = {  # a reference that could not forecast every batch (negative values) is left out
        name: np.concatenate([p["references"][name] for p in parts]) for name in common
    }
    _, first = np.unique(merged["index"], return_index=True)
    order = first[np.argsort(merged["index"][first])]
    result = {key: merged[key][order] for key in ARRAYS}
    result["texts"] = [merged["texts"][i] for i in order]
    result["references"] = {name: values[order] for name, values in merged["references"].items()}
    result["time"] = parts[0]["time"]
    result["variables"] = tuple(parts[0]["variables"])
    for key in ("flops", "seconds", "tokens"):
        result[key] = float(sum(p[key] for p in parts))
    return result


def save_npz(path: str | Path, predictions: dict[str, Any]) -> Path:
    """Write merged predictions to ``.npz`` atomically (references as ``ref_<name>``)."""
    arrays = {key: predictions[key] for key in ARRAYS}
    arrays.update({f"ref_{name}": values for name, values in predictions["references"].items()})
    arrays.update(
        texts=np.array(predictions["texts"]),
        time=predictions["time"],
        variables=np.array(predictions["variables"]),
        flops=np.float64(predictions["flops"]),
        seconds=np.float64(predictions["seconds"]),
        tokens=np.float64(predictions["tokens"]),
    )
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def load_npz(path: str | Path) -> dict[str, Any]:
    """Read what ``save_npz`` wrote."""
    with np.load(path) as data:
        result: dict[str, Any] = {key: data[key] for key in ARRAYS}
        result["references"] = {key[4:]: data[key] for key in data.files if key.startswith("ref_")}
        result["texts"] = data["texts"].tolist()
        result["time"] = data["time"]
        named = "variables" in data.files
        result["variables"] = tuple(data["variables"].tolist()) if named else default_variables(data["truth"].shape[-1])
        for key in ("flops", "seconds", "tokens"):
            result[key] = float(data[key])
    return result


def summarise(predictions: dict[str, Any]) -> dict[str, Any]:
    """Metrics per trajectory and variable and their means, for the LLM and each reference
    forecaster: MSE, MAE, R² and MASE, and for a sampled LLM forecast also CRPS and the weighted
    quantile loss; the MAE at each step ahead (``horizon``) and, for each reference, the LLM's
    paired MAE difference with a bootstrap interval over the series (``comparison``)."""
    variables = tuple(predictions["variables"])

    def table(forecasts: np.ndarray, samples: np.ndarray | None = None) -> dict[str, Any]:
        rows = zip(predictions["index"], predictions["truth"], forecasts, predictions["prompt"], strict=True)
        per = {
            int(i): score(t, f, p, None if samples is None else samples[row], variables)
            for row, (i, t, f, p) in enumerate(rows)
        }
        names = list(next(iter(per.values()))[variables[0]]) if per else list(POINT_METRICS)
        mean = {v: {m: nanmean([per[i][v][m] for i in per]) for m in names} for v in variables}
        return {"per_trajectory": per, "mean": mean}

    summary = {"variables": list(variables), "model": table(predictions["forecast"], predictions["samples"])}
    for i, share in zip(predictions["index"], predictions["valid_share"], strict=True):
        summary["model"]["per_trajectory"][int(i)]["valid_share"] = float(share)
    summary["model"]["mean"]["valid_share"] = float(np.mean(predictions["valid_share"]))
    summary["references"] = {name: table(values) for name, values in predictions["references"].items()}
    forecasts = {"LLM": predictions["forecast"]} | predictions["references"]
    summary["horizon"] = {
        name: dict(zip(variables, error_by_horizon(predictions["truth"], values).T.tolist(), strict=True))
        for name, values in forecasts.items()
    }
    summary["comparison"] = compare_to_references(summary)
    summary["generation"] = {
        "flops": predictions["flops"],
        "seconds": predictions["seconds"],
        "tokens": predictions["tokens"],
        "tokens_per_second": predictions["tokens"] / max(predictions["seconds"], 1e-9),
    }
    return summary


LOOK_AHEAD_NOTE = (
    "look-ahead scale (scale_from: trajectory): each prompt was scaled by a number computed from its "
    "future too, which a forecast of new data cannot have"
)


LABELS = {"mse": "MSE", "mae": "MAE", "r2": "R²", "mase": "MASE", "crps": "CRPS", "wql": "WQL"}


def markdown_table(summary: dict[str, Any]) -> str:
    """Per-trajectory and mean metrics (like the report's tables 4 and 5), references included."""
    variables = summary["variables"]
    names = [m for m in (*POINT_METRICS, *SAMPLE_METRICS) if m in summary["model"]["mean"][variables[0]]]
    columns = " | ".join(f"{v} {LABELS[m]}" for v in variables for m in names)
    header = f"| sample | valid steps | {columns} |"
    rule = "|---|---:|" + "---:|" * (len(variables) * len(names))
    lines = ["## LLM forecast", "", header, rule]
    if summary.get("scale_from") == "trajectory":
        lines[1:1] = ["", f"*{LOOK_AHEAD_NOTE[0].upper()}{LOOK_AHEAD_NOTE[1:]}.*"]

    def cells(m: dict[str, Any]) -> str:
        return " | ".join(f"{m[v][k]:.4f}" if k in m[v] else "" for v in variables for k in names)

    for index, m in summary["model"]["per_trajectory"].items():
        lines.append(f"| {index} | {100 * m['valid_share']:.0f}% | {cells(m)} |")
    mean = summary["model"]["mean"]
    lines.append(f"| **mean** | {100 * mean['valid_share']:.0f}% | {cells(mean)} |")
    lines += ["", "## Mean over the same samples, all forecasters", "", header.replace("valid steps", "forecaster")]
    lines.append(rule.replace("|---:|", "|---|", 1))
    lines.append(f"| all | LLM | {cells(mean)} |")
    for name, ref in summary["references"].items():
        lines.append(f"| all | {name} | {cells(ref['mean'])} |")
    lines += comparison_table(summary)
    generation = summary["generation"]
    lines += [
        "",
        "Every forecast step is scored; a step that did not parse (possible only without the grammar) counts as the "
        "last valid value before it. All forecasters are scored on the same steps. MASE divides the MAE by the "
        "prompt's mean one-step change (the naive forecast's in-sample error); CRPS (from the samples) and WQL "
        "(the weighted quantile loss at 0.1 ... 0.9) score sampled forecasts.",
        "",
        f"Generation: {generation['tokens']:.0f} tokens in {generation['seconds']:.1f} s "
        f"({generation['tokens_per_second']:.1f} tokens/s), {generation['flops']:.3e} FLOPs.",
    ]
    return "\n".join(lines) + "\n"


def interval_cell(entry: dict[str, float]) -> str:
    """``-0.123 [-0.200, -0.050]``: a paired difference and its interval."""
    return f"{entry['difference']:+.4f} [{entry['low']:+.4f}, {entry['high']:+.4f}]"


def comparison_table(summary: dict[str, Any]) -> list[str]:
    """Markdown lines: for each reference and variable, the LLM's mean MAE minus the reference's
    over the same series, with its bootstrap interval and what it says."""
    if not summary.get("comparison"):
        return []
    variables = summary["variables"]
    lines = [
        "",
        "## The LLM against each reference",
        "",
        "Mean over the series of the LLM's MAE minus the reference's (negative: the LLM is better), "
        f"with a {100 * LEVEL:.0f}% percentile bootstrap interval ({RESAMPLES} resamples of series, pairs kept, "
        f"fixed seed); *better* or *worse* only when the interval excludes zero, over at least {MIN_SERIES} series.",
        "",
        "| reference | " + " | ".join(f"{v}: LLM − reference [interval] | {v}" for v in variables) + " |",
        "|---|" + "---:|---|" * len(variables),
    ]
    for name, entries in summary["comparison"].items():
        cells = " | ".join(f"{interval_cell(entries[v])} | {verdict(entries[v])}" for v in variables)
        lines.append(f"| {name} | {cells} |")
    return lines


def write_forecast_outputs(
    folder: str | Path, predictions: dict[str, Any], logger=None, max_figures: int = 12, scale_from: str | None = None
) -> dict:
    """predictions.npz, metrics.json, metrics.md and figures; figures also to a TensorBoard logger.
    Forecasts made with the look-ahead scale (``scale_from: trajectory``) say so in every table and title."""
    from lit_llmtime.forecasting.plots import plot_errors, plot_forecast, plot_horizon, save_figure

    folder = Path(folder)
    save_npz(folder / "predictions.npz", predictions)
    summary = summarise(predictions) | ({"scale_from": scale_from} if scale_from else {})
    look_ahead = " (look-ahead scale)" if scale_from == "trajectory" else ""
    write_text_atomic(folder / "metrics.json", json.dumps(summary, indent=2))
    write_text_atomic(folder / "metrics.md", markdown_table(summary))
    time, steps = predictions["time"], predictions["prompt"].shape[1]
    future = time[steps : steps + predictions["truth"].shape[1]]
    experiment = getattr(logger, "experiment", None)
    horizon = plot_horizon(summary["horizon"], summary["variables"], f"{len(predictions['index'])} series{look_ahead}")
    if experiment is not None and hasattr(experiment, "add_figure"):
        experiment.add_figure("errors/by_horizon", horizon, close=False)
    save_figure(horizon, folder / "error_by_horizon.png")
    for row, index in enumerate(predictions["index"][:max_figures]):
        references = {name: values[row] for name, values in predictions["references"].items()}
        figures = {
            "forecast": plot_forecast(
                time,
                predictions["prompt"][row],
                predictions["truth"][row],
                predictions["forecast"][row],
                predictions["lower"][row],
                predictions["upper"][row],
                references,
                title=f"sample {index}{look_ahead}",
                variables=predictions.get("variables"),
            ),  # fmt: skip
            "errors": plot_errors(
                future,
                predictions["truth"][row],
                predictions["forecast"][row],
                f"sample {index}",
                predictions.get("variables"),
            ),  # fmt: skip
        }
        for kind, fig in figures.items():
            if experiment is not None and hasattr(experiment, "add_figure"):
                experiment.add_figure(f"{kind}/sample_{index}", fig, close=False)
            save_figure(fig, folder / f"{kind}_{index}.png")
    return summary


LOTKA_VOLTERRA_NOTE = (
    "lotka_volterra fits the equations lit-llmtime simulate integrates: exact on simulated data, "
    "the bar to reach on real data"
)


def summary_lines(
    summary: dict[str, Any], metrics: Path, figures: list[Path], also: str = "metrics.json, predictions.npz"
) -> str:
    """What predict prints at the end: the mean metrics of every forecaster and where the files are."""
    rows = {"LLM": summary["model"]["mean"]} | {name: ref["mean"] for name, ref in summary["references"].items()}
    variables = summary["variables"]
    short = {"predator": "pred."}  # the coursework's columns as they always were
    headers = [f"{short.get(v, v)} {m}" for v in variables for m in ("MAE", "MASE", "R2")]
    widths = [max(9, len(h)) for h in headers]
    lines = [
        f"Forecasts of {len(summary['model']['per_trajectory'])} trajectories "
        f"({100 * summary['model']['mean']['valid_share']:.0f}% of the LLM's steps parsed), means:",
        f"  {'forecaster':16s} " + " ".join(f"{h:>{w}s}" for h, w in zip(headers, widths, strict=True)),
    ]
    for name, mean in rows.items():
        cells = [mean[v][m] for v in variables for m in ("mae", "mase", "r2")]
        lines.append(f"  {name:16s} " + " ".join(f"{value:{w}.4f}" for value, w in zip(cells, widths, strict=True)))
    if "lotka_volterra" in rows:
        lines.append(f"  ({LOTKA_VOLTERRA_NOTE})")
    if summary.get("comparison"):
        lines.append(f"  LLM MAE minus each reference's, mean over the series [{100 * LEVEL:.0f}% bootstrap interval]:")
        for name, entries in summary["comparison"].items():
            cells = "  ".join(f"{v} {interval_cell(entries[v])} {verdict(entries[v])}" for v in variables)
            lines.append(f"  LLM - {name:16s} {cells}")
    if summary.get("scale_from") == "trajectory":
        lines.append(f"  ({LOOK_AHEAD_NOTE})")
    lines.append(f"metrics: {metrics} (and {also})")
    lines.append("figures: " + (", ".join(str(f) for f in figures[:4]) + (" ..." if len(figures) > 4 else "")))
    return "\n".join(lines)
