"""A run's FLOP cost predicted from its config, before anything is loaded (for ``flops``, the
pre-fit budget check and sweeps)."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import yaml

from lit_llmtime.callbacks import FlopBudget
from lit_llmtime.data import LotkaVolterraDataModule
from lit_llmtime.flops import Accounting, FlopModel
from lit_llmtime.model import DEFAULT_MODEL, QWEN2_5_0_5B_CONFIG, LLMTimeLoRA


def defaults(cls: type) -> dict[str, Any]:
    """The keyword defaults of ``cls.__init__``."""
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def run_arguments(config: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """Model, data, trainer and flop_budget arguments of a LightningCLI config dict, defaults filled in."""
    return (
        defaults(LLMTimeLoRA) | (config.get("model") or {}),
        defaults(LotkaVolterraDataModule) | (config.get("data") or {}),
        config.get("trainer") or {},
        defaults(FlopBudget) | (config.get("flop_budget") or {}),
    )


def load_config(path: str | Path) -> dict[str, Any]:
    """A LightningCLI YAML as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config not found")
    return yaml.safe_load(path.read_text()) or {}


def base_config(model_name_or_path: str, model_config: dict | None) -> dict | object:
    """The architecture behind a model argument, without loading weights (offline for Qwen2.5-0.5B)."""
    if model_config is not None:
        return model_config
    if model_name_or_path == DEFAULT_MODEL:
        return QWEN2_5_0_5B_CONFIG
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_name_or_path)


def flop_model_from_args(model: dict, accounting: Accounting = "exact") -> FlopModel:
    """FLOP model of ``LLMTimeLoRA`` arguments."""
    return FlopModel(
        base_config(model["model_name_or_path"], model.get("model_config")),
        lora_rank=model["lora_rank"],
        lora_targets=model["lora_targets"],
        lm_head_bias=model["train_lm_head_bias"],
        accounting=accounting,
    )


def step_flops(model: dict, data: dict, devices: int = 1, accounting: Accounting = "exact") -> float:
    """FLOPs of one full training step on ``devices`` devices."""
    return devices * flop_model_from_args(model, accounting).train_step(data["batch_size"], data["context_length"])


def validation_flops(config: dict[str, Any], accounting: Accounting = "exact") -> float:
    """FLOPs of every validation pass of a fit (sanity check included); reads the data file."""
    model, data_args, trainer, _ = run_arguments(config)
    data = LotkaVolterraDataModule(**data_args)
    data.prepare_data()
    data.setup("fit")
    batch_size = data_args["batch_size"]
    val_batches = math.ceil(len(data.datasets["val"]) / batch_size)
    limit = trainer.get("limit_val_batches")
    if isinstance(limit, int):
        val_batches = min(val_batches, limit)
    steps = int(trainer.get("max_steps", -1))
    interval = trainer.get("val_check_interval")
    passes = steps // interval if isinstance(interval, int) else max(1, steps // max(1, len(data.train_dataloader())))
    sanity = min(trainer.get("num_sanity_val_steps", 2), val_batches)
    forward = flop_model_from_args(model, accounting).batch_forward(batch_size, data_args["context_length"])
    return (passes * val_batches + sanity) * forward


def fit_flops(config: dict[str, Any], accounting: Accounting = "exact") -> float:
    """FLOPs of a whole fit: ``max_steps`` full training steps plus its validation passes."""
    model, data, trainer, _ = run_arguments(config)
    steps = int(trainer.get("max_steps", -1))
    if steps <= 0:
        raise ValueError("predicting a fit's cost needs trainer.max_steps")
    devices = trainer.get("devices", 1) if isinstance(trainer.get("devices", 1), int) else 1
    return steps * step_flops(model, data, devices, accounting) + validation_flops(config, accounting)
