"""Reading a lit-llmtime checkpoint: each file read once per process, with one set of errors, and
its adapter loaded onto a freshly built model."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_llmtime.model.lora import trainable_state_dict

# What LLMTimeLoRA saves as hyperparameters: the settings its weights depend on.
MODEL_SETTINGS = frozenset(
    {"model_name_or_path", "model_config", "init_seed", "torch_dtype", "tokenizer", "output_vocab", "lora", "optim",
     "encoding"}
)  # fmt: skip
ADAPTER_PREFIX = "model."  # the LightningModule holds the network as ``model``
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, IndexError, KeyError, TypeError,
              ValueError)  # fmt: skip
NOT_READABLE = "not a readable checkpoint, truncated or not a checkpoint"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (read once while the file is unchanged; do not modify it), or
    FileNotFoundError / ValueError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    stat = path.stat()
    return _read(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as error:  # a truncated file, a CSV, an array, a text file: each fails its own way
        raise ValueError(f"{path}: {NOT_READABLE} ({error})") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: {NOT_READABLE} (it holds a {type(checkpoint).__name__})")
    return checkpoint


def model_settings(path: str | Path) -> dict[str, Any]:
    """A copy of the model settings (hyperparameters) a checkpoint was trained with."""
    hparams = read_checkpoint(path).get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise ValueError(f"{path}: not a lit-llmtime checkpoint (no hyperparameters)")
    unknown = sorted(set(hparams) - MODEL_SETTINGS)
    if unknown:
        raise ValueError(f"{path}: not a lit-llmtime checkpoint (hyperparameters {unknown} are not LLMTimeLoRA's)")
    return dict(hparams)


def check_adapter(needed: set[str], state_dict: dict[str, torch.Tensor]) -> None:
    """ValueError if ``state_dict`` lacks adapter tensors a model needs (other LoRA targets)."""
    missing = sorted(needed - set(state_dict))
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} adapter tensors this model needs (e.g. {missing[0]}); "
            "was it trained with other LoRA targets?"
        )


def load_adapter(network: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's adapter (its only tensors) into ``network`` (built with the same settings)."""
    state = {
        key.removeprefix(ADAPTER_PREFIX): value
        for key, value in read_checkpoint(path)["state_dict"].items()
        if key.startswith(ADAPTER_PREFIX)
    }
    check_adapter(set(trainable_state_dict(network)), state)
    network.load_state_dict(state, strict=False)
