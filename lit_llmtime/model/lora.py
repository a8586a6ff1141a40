"""Low-rank adaptation (Hu et al., 2021) of a frozen ``nn.Linear``, written out in plain PyTorch.

      x ──────────────┐
      │               │
┌─────▼─────┐   ┌─────▼─────┐
│  W (frozen)│   │ A (r x in)│   trainable, kaiming init
└─────┬─────┘   └─────┬─────┘
      │         ┌─────▼─────┐
      │         │ B (out x r)│   trainable, zero init: starts as the base model
      │         └─────┬─────┘
      └──── + ◄── * alpha / r
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lit_llmtime.io import atomic_path, write_text_atomic


class LoRALinear(nn.Module):
    """``base(x) + dropout(x) @ A.T @ B.T * (alpha / r)`` with ``base`` frozen.

    A and B stay float32 whatever dtype the base layer has (e.g. bfloat16), so small updates
    are not lost to rounding.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A as the coursework skeleton (kaiming normal, linear gain), B zero."""
        nn.init.kaiming_normal_(self.lora_A, nonlinearity="linear")
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update ``B @ A * alpha / r`` (out, in), float32."""
        return self.lora_B @ self.lora_A * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        update = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return out + (update * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (fast inference); no-op if already merged."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight; no-op if not merged."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(
    model: nn.Module,
    targets: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    train_lm_head_bias: bool = False,
) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name ends in one of ``targets``.

    With ``train_lm_head_bias`` a zero-initialised trainable bias is added to ``lm_head`` (as the
    coursework skeleton does; the report trained only A and B). Returns the wrapped module names.
    """
    model.requires_grad_(False)
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(targets) - linear_names)
    if unknown:
        raise ValueError(f"LoRA targets {unknown} match no linear layer; available: {sorted(linear_names)}")
    wrapped = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    if train_lm_head_bias:
        head = model.get_output_embeddings()
        if head.bias is None:
            weight = head.weight
            head.bias = nn.Parameter(torch.zeros(head.out_features, device=weight.device, dtype=weight.dtype))
        head.bias.requires_grad_(True)
    return wrapped


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """All LoRA layers of ``model``."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer of ``model`` into its base weight."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora``."""
    for layer in lora_layers(model):
        layer.unmerge()


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable tensors (LoRA A/B, optional lm_head bias): an adapter is a few MB."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_peft_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``PeftModel.from_pretrained``."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("model has no LoRA layers to export")
    head = model.get_output_embeddings()
    if head is not None and head.bias is not None and head.bias.requires_grad:
        raise ValueError("PEFT's LoRA format has no place for the trained lm_head bias; train without it to export")
    first = next(iter(layers.values()))
    if any((m.rank, m.alpha) != (first.rank, first.alpha) for m in layers.values()):
        raise ValueError("PEFT export needs one rank and alpha for all LoRA layers")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.rank,
        "lora_alpha": first.alpha if not math.isclose(first.alpha, round(first.alpha)) else int(first.alpha),
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "adapter_model.safetensors") as tmp:
        save_file(tensors, tmp)
    write_text_atomic(folder / "adapter_config.json", json.dumps(config, indent=2))
    return folder
