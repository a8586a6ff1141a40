"""The base model: one resolver from a model argument (Hub id, folder, ``.gguf`` file, or the
fields of a random Qwen2) to its architecture (offline, for FLOP counts) or its weights, and the
network LoRA adapts (``build_model``), as the LightningModule trains it and a Forecaster runs it."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config

from lit_llmtime.config import DEFAULT_MODEL, LoRAArgs
from lit_llmtime.hub import load_from_hub
from lit_llmtime.model.configs import model_config as named_config
from lit_llmtime.model.gguf import check_tokenizer_agrees, gguf_config, is_gguf, load_gguf_model
from lit_llmtime.model.lora import apply_lora
from lit_llmtime.text.codec import ALPHABET
from lit_llmtime.text.grammar import EOS, single_token_ids
from lit_llmtime.text.tokenizers import load_tokenizer


def random_config(model_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Qwen2Config fields of a randomly initialised model, or None for pretrained weights (an
    empty ``model_config`` means pretrained, as no field is given)."""
    return dict(model_config) if model_config else None


def base_config(model_name_or_path: str, model_config: dict[str, Any] | None) -> Any:
    """The architecture behind a model argument, without loading weights (offline for Qwen2.5-0.5B)."""
    if (fields := random_config(model_config)) is not None:
        return fields
    if model_name_or_path == DEFAULT_MODEL:
        return named_config("qwen2.5-0.5b")
    if is_gguf(model_name_or_path):
        return gguf_config(model_name_or_path)
    return load_from_hub(AutoConfig.from_pretrained, model_name_or_path)


def build_base_model(
    model_name_or_path: str,
    model_config: dict[str, Any] | None,
    dtype: torch.dtype,
    init_seed: int = 0,
    tokenizer: str | None = None,
) -> PreTrainedModel:
    """Pretrained weights (Hub id, folder or ``.gguf`` file), or a randomly initialised Qwen2 from
    ``model_config``.

    Random weights come from ``init_seed``, so a checkpoint holding only the adapter reloads onto
    the very same base model. A GGUF file's own tokenizer must agree with ``tokenizer`` on the
    LLMTIME alphabet.
    """
    if (fields := random_config(model_config)) is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return AutoModelForCausalLM.from_config(Qwen2Config(**fields), dtype=dtype)
    if is_gguf(model_name_or_path):
        if tokenizer is not None:
            check_tokenizer_agrees(model_name_or_path, load_tokenizer(tokenizer))
        return load_gguf_model(model_name_or_path, dtype)
    return load_from_hub(AutoModelForCausalLM.from_pretrained, model_name_or_path, dtype=dtype)


def build_model(
    model_name_or_path: str = DEFAULT_MODEL,
    model_config: dict[str, Any] | None = None,
    init_seed: int = 0,
    torch_dtype: str = "float32",
    tokenizer: str | None = None,
    lora: LoRAArgs | None = None,
) -> PreTrainedModel:
    """The base model with LoRA layers in place (B at zero, so it computes the base model until
    trained), in train mode (``from_pretrained`` leaves eval mode; Qwen2 has no dropout)."""
    lora = lora or LoRAArgs()
    network = build_base_model(model_name_or_path, model_config, getattr(torch, torch_dtype), init_seed, tokenizer)
    apply_lora(network, lora.targets, lora.rank, lora.alpha, lora.dropout, lora.train_lm_head_bias)
    return network.train()


def llmtime_head_rows(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Output rows of the LLMTIME characters and end-of-text: all a forecast (or its loss) needs."""
    return torch.tensor(single_token_ids(tokenizer, [*ALPHABET, EOS]))
