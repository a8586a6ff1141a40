"""A run's FLOP cost predicted from its resolved configuration (``run.resolve_run``), before any
weights are loaded: how many batches train, how many validate, and what generation may cost.

The loop follows Lightning's own rules (``val_check_interval`` as batches or a share of the
epoch, ``check_val_every_n_epoch``, ``limit_*_batches`` as counts or shares, sanity checks,
gradient accumulation, ``max_steps``/``max_epochs``, distributed samplers' padding), so the
prediction equals what the FLOP budget charges when the run is not stopped early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lit_llmtime.config import (
    EncodingArgs,
    ForecastArgs,
    ForecastValidationArgs,
    LoRAArgs,
    as_args,
)
from lit_llmtime.model.base import base_config
from lit_llmtime.model.flops import Accounting, FlopModel, run_flop_model


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    """``namespace.key`` for jsonargparse Namespaces and dicts alike."""
    value = namespace.get(key, default) if hasattr(namespace, "get") else getattr(namespace, key, default)
    return default if value is None else value


def flop_model_of(config: Any, accounting: Accounting | None = None) -> FlopModel:
    """The FLOP model of a resolved run configuration (its model and LoRA settings)."""
    model = config.model
    return run_flop_model(
        base_config(model.model_name_or_path, model.model_config),
        as_args(LoRAArgs, model.lora),
        model.output_vocab,
        accounting or config.flop_budget.accounting,
    )


def on_cuda(trainer: Any) -> bool:
    """Whether a run of these trainer settings runs on CUDA devices."""
    accelerator = str(_get(trainer, "accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def world_size(trainer: Any) -> int:
    """Processes of a run: devices per node x nodes (``auto`` counts the GPUs, else 1)."""
    devices, accelerator = _get(trainer, "devices", "auto"), str(_get(trainer, "accelerator", "auto"))
    gpus = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
    if isinstance(devices, str):
        devices = devices.strip()
        if devices == "auto":
            devices = gpus or 1
        elif "," in devices:
            devices = len([d for d in devices.split(",") if d.strip()])
        else:
            devices = int(devices)
    if isinstance(devices, list | tuple):
        devices = len(devices)
    if devices == -1:
        devices = gpus or 1
    return int(devices) * int(_get(trainer, "num_nodes", 1))


def limit_batches(batches: int, limit: int | float | None) -> int:
    """Lightning's ``limit_*_batches``: a count, or a share of the batches."""
    if limit is None:
        return batches
    if isinstance(limit, bool):
        raise ValueError(f"limit must be a number of batches or a share, got {limit}")
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def batch_sizes(windows: int, batch_size: int, ranks: int) -> list[int]:
    """Batch sizes on each rank: a distributed sampler pads every rank to ceil(windows / ranks)."""
    per_rank = math.ceil(windows / ranks)
    return [batch_size] * (per_rank // batch_size) + ([per_rank % batch_size] if per_rank % batch_size else [])


@dataclass
class FitPlan:
    """What a fit will compute, counted on one rank; FLOPs summed over all ranks."""

    ranks: int
    train_batches: int
    optimizer_steps: int
    val_passes: int
    val_batches: int  # windows, all passes, sanity check included
    train_flops: float
    val_flops: float  # validation forecasts included
    val_forecast_flops: float = 0.0  # the validation forecasts' part, at their longest

    @property
    def flops(self) -> float:
        return self.train_flops + self.val_flops


def plan_fit(config: Any, accounting: Accounting | None = None, windows: dict[str, int] | None = None) -> FitPlan:
    """Walk a fit's loop as Lightning does and add up its FLOPs.

    ``windows`` (training and validation windows) is read from the data set when not given.
    """
    trainer, data = config.trainer, config.data
    ranks = world_size(trainer)
    windows = windows or count_windows(config)
    forecast_pass = (
        validation_forecast_bound(config, accounting) if limit_batches(1, _get(trainer, "limit_val_batches")) else 0.0
    )
    flop_model = flop_model_of(config, accounting)
    context, batch_size = data.context_length, data.batch_size
    train_sizes = batch_sizes(windows["train"], batch_size, ranks)
    train_sizes = train_sizes[: limit_batches(len(train_sizes), _get(trainer, "limit_train_batches"))]
    val_sizes = batch_sizes(windows["val"], batch_size, ranks)
    val_sizes = val_sizes[: limit_batches(len(val_sizes), _get(trainer, "limit_val_batches"))]
    per_batch_train = {size: ranks * flop_model.train_step(size, context) for size in set(train_sizes)}
    val_pass = sum(ranks * flop_model.batch_forward(size, context) for size in val_sizes) + forecast_pass

    max_steps = _get(trainer, "max_steps", -1)
    max_epochs = _get(trainer, "max_epochs", None)
    if max_epochs is None:
        max_epochs = -1 if max_steps != -1 else 1000  # Lightning's default when neither is set
    if max_steps == -1 and max_epochs == -1:
        raise ValueError("an endless run (max_steps and max_epochs both -1) has no predictable cost")
    accumulate = _get(trainer, "accumulate_grad_batches", 1)
    every_n_epochs = trainer.get("check_val_every_n_epoch", 1) if hasattr(trainer, "get") else 1
    interval = _get(trainer, "val_check_interval", 1.0)
    validating = bool(val_sizes) and len(train_sizes) > 0
    check_batch = interval if isinstance(interval, int) else max(1, int(len(train_sizes) * interval))

    sanity = _get(trainer, "num_sanity_val_steps", 2)
    sanity_batches = (len(val_sizes) if sanity == -1 else min(sanity, len(val_sizes))) if validating else 0
    val_flops = sum(ranks * flop_model.batch_forward(size, context) for size in val_sizes[:sanity_batches])
    forecast_flops = forecast_pass if sanity_batches else 0.0  # the sanity check forecasts too
    val_flops += forecast_flops
    train_flops, steps, batches, passes, epoch = 0.0, 0, 0, 0, 0
    while (max_epochs == -1 or epoch < max_epochs) and train_sizes and (max_steps == -1 or steps < max_steps):
        for index, size in enumerate(train_sizes):
            train_flops += per_batch_train[size]
            batches += 1
            if (index + 1) % accumulate == 0 or index + 1 == len(train_sizes):
                steps += 1
            epoch_checks = every_n_epochs is None or (epoch + 1) % every_n_epochs == 0
            iteration = batches - 1 if every_n_epochs is None else index
            if validating and epoch_checks and (iteration + 1) % check_batch == 0:
                passes += 1
                val_flops += val_pass
                forecast_flops += forecast_pass
            if max_steps != -1 and steps >= max_steps:
                break
        epoch += 1
    val_batches = sanity_batches + passes * len(val_sizes)
    return FitPlan(ranks, batches, steps, passes, val_batches, train_flops, val_flops, forecast_flops)


_prepared: dict[str, Any] = {}  # a sweep plans many runs on the same data


def prepared_data(config: Any, stage: str):
    """The run's data module set up for ``stage`` (its file simulated first if the config would):
    one per data configuration and file version, so planning a sweep reads and tokenizes once."""
    from lit_llmtime.data.module import SeriesDataModule

    arguments = config.data.as_dict() if hasattr(config.data, "as_dict") else dict(config.data)
    arguments["encoding"] = as_args(EncodingArgs, arguments["encoding"])
    if "forecast_validation" in arguments:
        arguments["forecast_validation"] = as_args(ForecastValidationArgs, arguments["forecast_validation"])
    data = SeriesDataModule(**arguments)
    data.prepare_data()
    path = Path(arguments["data_path"])
    key = repr((sorted(arguments.items()), path.resolve(), path.stat().st_mtime_ns if path.is_file() else None))
    data = _prepared.setdefault(key, data)
    data.setup(stage)
    return data


def count_windows(config: Any) -> dict[str, int]:
    """Training, validation and test windows of a run's data."""
    data = prepared_data(config, "fit")
    return {split: len(data.datasets[split]) for split in ("train", "val", "test")}


def plan_evaluate(config: Any, stage: str, accounting: Accounting | None = None) -> tuple[int, float]:
    """Batches (per rank) and FLOPs on every device of one ``validate`` or ``test`` pass: the
    windows as the budget charges them, batch by batch, and for ``validate`` the validation
    forecasts at their longest (what is charged before they run; the unused part is refunded)."""
    if stage not in ("validate", "test"):
        raise ValueError(f"stage must be 'validate' or 'test', got {stage!r}")
    trainer, data = config.trainer, config.data
    ranks, split = world_size(trainer), "val" if stage == "validate" else "test"
    limit = _get(trainer, f"limit_{split}_batches")
    sizes = batch_sizes(count_windows(config)[split], data.batch_size, ranks)
    sizes = sizes[: limit_batches(len(sizes), limit)]
    flop_model = flop_model_of(config, accounting)
    total = sum(ranks * flop_model.batch_forward(size, data.context_length) for size in sizes)
    if stage == "validate" and limit_batches(1, limit):
        total += validation_forecast_bound(config, accounting)
    return len(sizes), total


def forecast_pass_flops(per_prompt: float, prompts: int, ranks: int) -> float:
    """FLOPs of forecasting ``prompts`` prompts split over ``ranks`` devices at ``per_prompt`` each,
    counting the prompts a distributed sampler repeats so every rank holds as many."""
    return ranks * math.ceil(prompts / ranks) * per_prompt


def validation_forecast_bound(config: Any, accounting: Accounting | None = None) -> float:
    """The most one pass of validation forecasts (``data.forecast_validation``) can cost on every
    device, a distributed sampler's padding included: what the budget charges before it runs."""
    if not as_args(ForecastValidationArgs, config.data.forecast_validation).trajectories:
        return 0.0
    from lit_llmtime.model.generate import batch_grammar, generation_shape, static_generation

    data = prepared_data(config, "validate")
    loaders = data.val_dataloader()
    if not isinstance(loaders, list):
        return 0.0
    batch = next(iter(loaders[1]))
    forecast = as_args(ForecastArgs, config.model.forecast)
    grammar = batch_grammar(data.tokenizer, batch, forecast, data.encoding, batch["horizon"])
    shape = generation_shape(batch["input_ids"], grammar, static_generation(forecast.compile, on_cuda(config.trainer)))
    per_prompt = shape.flops(flop_model_of(config, accounting)) / len(batch["input_ids"])
    return forecast_pass_flops(per_prompt, len(loaders[1].dataset), world_size(config.trainer))


def plan_predict(config: Any, accounting: Accounting | None = None) -> tuple[int, float]:
    """Trajectories a ``predict`` of this configuration forecasts, and the most its generation can
    cost (every step written with the longest numbers: what the budget charges before it runs; a
    static cache, as on CUDA, pads each prompt and is attended whole)."""
    from lit_llmtime.model.generate import batch_grammar, generation_shape, static_generation

    data = prepared_data(config, "predict")
    forecast, flop_model = as_args(ForecastArgs, config.model.forecast), flop_model_of(config, accounting)
    static = static_generation(forecast.compile, on_cuda(config.trainer))
    total = 0.0
    for batch in data.predict_dataloader():
        grammar = batch_grammar(data.tokenizer, batch, forecast, data.encoding)
        total += generation_shape(batch["input_ids"], grammar, static).flops(flop_model)
    return len(data.datasets["predict"]), total


def step_flops(config: Any, accounting: Accounting | None = None) -> float:
    """FLOPs of one full training batch on every rank (what the budget checks before a step)."""
    data = config.data
    return world_size(config.trainer) * flop_model_of(config, accounting).train_step(
        data.batch_size, data.context_length
    )
