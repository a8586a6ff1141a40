"""``lit-llmtime forecast``: forecast every series of a data file with a trained adapter (or a
base model), charged to the FLOP ledger as ``predict`` is, written as a long CSV (or parquet)
with figures beside it, and scored when the file holds the truth (``context_steps``)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_llmtime.budget.gates import GenerationGate, RunRecord, SharedBudget, run_config, settled
from lit_llmtime.budget.ledger import DEFAULT_BUDGET, DEFAULT_LEDGER, Budget
from lit_llmtime.config import REFERENCE_FORECASTERS, ForecastArgs
from lit_llmtime.data.series import ID_COLUMN, TABLE_SUFFIXES, TIME_COLUMN, SeriesSet, load_series, write_table
from lit_llmtime.forecasting.evaluation import markdown_table, summarise, summary_lines
from lit_llmtime.forecasting.forecaster import Forecaster, Prediction, future_times, prediction_frame
from lit_llmtime.forecasting.references import reference_applies, reference_forecast
from lit_llmtime.io import write_text_atomic
from lit_llmtime.model.checkpoint import model_settings
from lit_llmtime.model.generate import GenerationShape


def split_context(series: SeriesSet, context_steps: int, horizon: int) -> tuple[SeriesSet, list[np.ndarray]]:
    """Each series' first ``context_steps`` as the context and its next ``horizon`` as the truth."""
    for name, values in zip(series.ids, series.values, strict=True):
        if len(values) < context_steps + horizon:
            raise ValueError(
                f"{series.source}: series {name} has {len(values)} steps, fewer than context_steps={context_steps} "
                f"+ horizon={horizon}"
            )
    context = SeriesSet([v[:context_steps] for v in series.values], [t[:context_steps] for t in series.time],
                        series.variables, series.ids, series.source)  # fmt: skip
    return context, [v[context_steps : context_steps + horizon] for v in series.values]


def forecast_gate(forecaster: Forecaster, ledger: str | None, budget: float, name: str, config: dict) -> GenerationGate:
    """The generation gate of a forecast run: charged as ``predict`` is, recorded as
    ``<name>/forecast/version_<time>`` with the same fields."""
    authority = Budget(ledger, budget)
    record = RunRecord(authority, name, "exact")
    record.start(name, "forecast", time.strftime("%Y%m%dT%H%M%S"), lambda: {"config": config})
    return GenerationGate(SharedBudget(authority), record, forecaster.flop_model)


def forecast_file(
    input: str,
    horizon: int,
    out: str = "forecasts.csv",
    ckpt_path: str | None = None,
    model_name_or_path: str | None = None,
    context_steps: int | None = None,
    num_samples: int = 1,
    id_column: str = ID_COLUMN,
    time_column: str = TIME_COLUMN,
    target: list[str] | None = None,
    batch_size: int = 16,
    ledger: str | None = DEFAULT_LEDGER,
    budget: float = DEFAULT_BUDGET,
    max_figures: int = 12,
    device: str = "auto",
    references: list[str] | None = None,
) -> dict[str, Any]:
    """Forecast every series of a data file (CSV, parquet, npy, h5) and write them as a table.

    Args:
        input: the data file (see `data.data_path`: a long table of series id, time and variables).
        horizon: steps to forecast after each series.
        out: the forecasts (.csv or .parquet): series id, time, each variable's median and its
            quantiles; figures `<out>_<series>.png` beside it.
        ckpt_path: a trained adapter (a fit's checkpoint) with the settings it was trained with.
        model_name_or_path: where the base model is (default: the checkpoint's); alone, a base
            model without an adapter.
        context_steps: use each series' first this many steps as the context and score the
            forecast against the steps after them (metrics beside the forecasts); default: the
            whole series is the context and the forecast continues past its end.
        num_samples: forecasts per series: 1 is greedy, more are sampled (median and quantiles).
        id_column: the table's series id column.
        time_column: the table's time column (numbers or timestamps).
        target: the table's columns to forecast (default: all others; a checkpoint's model expects
            as many as it was trained on).
        batch_size: series per generation batch.
        ledger: the FLOP ledger the generation is charged to.
        budget: the FLOP budget.
        max_figures: figures are drawn for at most this many series.
        device: where the model runs: ``auto`` (the GPU when there is one, with the static KV cache
            and the compiled step as ``forecast.compile: auto``), ``cpu``, ``cuda``, ``cuda:1`` ...
        references: the reference forecasters scored beside the model with ``context_steps``
            (default: all that apply, as ``forecast.reference_forecasters``).

    Returns what was written and, with ``context_steps``, the metrics summary.
    """
    from lit_llmtime.forecasting.plots import plot_forecast, save_figure

    out_path = Path(out)
    if out_path.suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(f"{out}: the forecasts are a table: name a .csv or .parquet file")
    if ckpt_path is None and model_name_or_path is None:
        raise ValueError("forecast needs --ckpt_path (a trained adapter) or --model_name_or_path (a base model alone)")
    references = ForecastArgs(reference_forecasters=list(references or REFERENCE_FORECASTERS)).reference_forecasters
    series = load_series(input, id_column, time_column, target)
    forecast = ForecastArgs(num_samples=num_samples)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device here")
    except RuntimeError as error:  # not a device name
        raise ValueError(f"--device {device}: {error}") from error
    if ckpt_path is not None:
        forecaster = Forecaster.from_checkpoint(ckpt_path, model_name_or_path, forecast, device)
    else:
        forecaster = Forecaster.from_model(model_name_or_path, forecast=forecast, device=device)
    context, truth = (series, None) if context_steps is None else split_context(series, context_steps, horizon)
    times = (
        [future_times(t, horizon) for t in context.time]
        if truth is None
        else [t[context_steps : context_steps + horizon] for t in series.time]
    )  # before generating: a time axis that cannot be continued stops the run before it is paid for
    settings = model_settings(ckpt_path) if ckpt_path is not None else {"model_name_or_path": model_name_or_path}
    config = run_config(settings, {"batch_size": batch_size}, devices=1, input=str(input), horizon=horizon)
    running: list[float] = []  # the bound of the batch being generated

    def charge(shape: GenerationShape) -> None:
        running.append(shape.flops(forecaster.flop_model))
        gate.charge(running[-1:], "forecast's next batch")

    with settled(forecast_gate(forecaster, ledger, budget, out_path.stem, config)) as gate:
        prediction = forecaster.predict(
            context, horizon, batch_size=batch_size, before_batch=charge,
            after_batch=lambda flops: gate.finished(running.pop(), flops), progress=True,
        )  # fmt: skip

    write_table(out_path, prediction_frame(context, prediction, id_column, time_column, times))
    lower, upper = np.quantile(prediction.samples, [0.05, 0.95], axis=1)  # the figures' 5-95% band, as predict's
    axes = [np.concatenate(pair) for pair in zip(context.time, times, strict=True)]  # each series' prompt + horizon
    figures = []
    for row, name in enumerate(context.ids[:max_figures]):
        figure = plot_forecast(
            axes[row], context.values[row], None if truth is None else truth[row], prediction.median[row], lower[row],
            upper[row], title=f"series {name}", variables=series.variables,
        )  # fmt: skip
        safe = re.sub(r"[^\w.-]", "_", name)  # a series id is not always a file name
        figures.append(save_figure(figure, out_path.with_name(f"{out_path.stem}_{safe}.png")))
    written: dict[str, Any] = {"forecasts": out_path, "figures": figures, "prediction": prediction}
    valid = 100 * float(np.mean(prediction.valid_share))
    print(f"forecast {len(context)} series {horizon} steps ahead ({valid:.0f}% of steps parsed): {out_path}")
    if truth is not None:
        written["summary"] = summary = summarise(_as_predictions(context, truth, prediction, horizon, axes, references))
        metrics = write_text_atomic(out_path.with_name(f"{out_path.stem}_metrics.md"), markdown_table(summary))
        also = write_text_atomic(metrics.with_suffix(".json"), json.dumps(summary, indent=2))
        print(summary_lines(summary, metrics, figures, also=also.name))
    else:
        print("figures: " + ", ".join(str(f) for f in figures[:4]) + (" ..." if len(figures) > 4 else ""))
    print(f"generation: {prediction.flops:.3e} FLOPs charged to {ledger or 'no ledger'}")
    return written


def _as_predictions(context: SeriesSet, truth: list, prediction: Prediction, horizon: int, times, references) -> dict:
    """The dict ``evaluation.summarise`` scores, with the ``references`` that apply (the ODE only on
    numeric time axes, each series' prompt and horizon ``times``)."""
    prompts, time = np.stack(context.values), np.stack(times)
    numeric = np.issubdtype(time.dtype, np.number)
    names = [n for n in references if reference_applies(n, prompts) and (numeric or n != "lotka_volterra")]
    return {
        "index": np.arange(len(context)), "truth": np.stack(truth), "forecast": prediction.median, "prompt": prompts,
        "samples": prediction.samples, "valid_share": prediction.valid_share, "variables": context.variables,
        "references": {name: reference_forecast(name, prompts, time, horizon) for name in names},
        "flops": prediction.flops, "seconds": prediction.seconds, "tokens": prediction.tokens,
    }  # fmt: skip
