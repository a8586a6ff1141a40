"""What a run prints: a model summary that counts FLOPs with the project's FLOP model, a progress
bar in steps of ``max_steps``, and none of the lines that only a Lightning release can fix."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info


class FlopSummary(ModelSummary):
    """Lightning's model summary without its FLOPs column, which reads 0 for a model without an
    ``example_input_array``; the FLOPs of one training step by the FLOP model the budget charges."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        budget = next((c for c in trainer.callbacks if hasattr(c, "flop_model")), None)
        data = getattr(trainer.datamodule, "hparams", {})
        self._step = None
        if budget is not None and "batch_size" in data and "context_length" in data:
            self._step = budget.flop_model.train_step(data["batch_size"], data["context_length"]) * trainer.world_size
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs: Any) -> None:  # fmt: skip
        rows = [
            f"  {name:<18s} {kind:<18s} {params:>8s}  {mode}"
            for name, kind, params, mode in zip(
                *(dict(summary_data)[c] for c in ("Name", "Type", "Params", "Mode")), strict=True
            )
        ]
        lines = [
            f"  {'Name':<18s} {'Type':<18s} {'Params':>8s}  Mode",
            *rows,
            f"Trainable parameters: {trainable_parameters:,} of {total_parameters:,} "
            f"({100 * trainable_parameters / max(total_parameters, 1):.3f}%), {model_size:,.1f} MB",
        ]
        if self._step is not None:
            lines.append(f"FLOPs per training step (the budget's FLOP model, all devices): {self._step:.4e}")
        rank_zero_info("\n".join(lines))


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading ``step 40/150`` and the loss for a ``max_steps`` run
    instead of ``Epoch 0/-2`` and ``v_num``."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if trainer.max_steps > 0 and trainer.training:
            items = {"step": f"{trainer.global_step}/{trainer.max_steps}", **items}
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        # The one private Lightning method overridden here (tests/app/test_console.py fails if it is
        # renamed): Lightning 2.6 writes "Epoch 0/-2" when max_epochs is -1, as for a max_steps run.
        return f"Epoch {current_epoch}" + (f"/{self.trainer.max_epochs - 1}" if self.trainer.max_epochs > 0 else "")


def use_project_console(trainer: L.Trainer) -> None:
    """Swap the Trainer's default rich progress bar and model summary for the project's."""
    for position, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            trainer.callbacks[position] = StepProgressBar()
        elif type(callback) in (ModelSummary, RichModelSummary):
            trainer.callbacks[position] = FlopSummary()


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Filter what only a Lightning release can fix: its advertisement for litlogger on every run,
    and a deprecation torch raises inside Lightning's own pytree helper."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTip())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
