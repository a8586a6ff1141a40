"""Lightning callbacks: the FLOP budget that stops training before it is exceeded, and the
writer of forecasts, metrics and figures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lit_llmtime.evaluation import load_npz, merge_predictions, save_npz, write_forecast_outputs
from lit_llmtime.flops import Accounting, FlopModel
from lit_llmtime.ledger import DEFAULT_LEDGER, Ledger


def flop_model_for(module: L.LightningModule, accounting: Accounting = "exact") -> FlopModel:
    """The FLOP model of an ``LLMTimeLoRA``'s base config and LoRA settings."""
    hp = module.hparams
    return FlopModel(
        module.model.config,
        lora_rank=hp.lora_rank,
        lora_targets=hp.lora_targets,
        lm_head_bias=hp.train_lm_head_bias,
        accounting=accounting,
    )


class FlopBudget(L.Callback):
    """Counts the FLOPs of every training, validation and prediction batch and refuses any
    training step that would take the ledger's total past ``budget``.

    The count is global: each rank's batches are summed across devices, and every rank takes the
    same stop decision at the same step. The run's count is saved in checkpoints and kept in the
    ledger under one run id, so a resumed run continues it without counting anything twice.

    Args:
        budget: FLOPs allowed across all runs in the ledger (the coursework: 1e17).
        ledger: JSON-lines ledger shared by all experiments; None keeps no ledger.
        run_name: name of this run in the ledger (default: the logger's name).
        accounting: ``exact`` or ``coursework`` FLOP model.
        ledger_every_n_steps: how often the ledger record is refreshed during training.
    """

    def __init__(
        self,
        budget: float = 1e17,
        ledger: str | None = DEFAULT_LEDGER,
        run_name: str | None = None,
        accounting: Accounting = "exact",
        ledger_every_n_steps: int = 10,
    ) -> None:
        self.budget = float(budget)
        self.ledger = Ledger(ledger) if ledger else None
        self.run_name = run_name
        self.accounting = accounting
        self.ledger_every_n_steps = ledger_every_n_steps
        self.run_id: str | None = None
        self.run_flops = 0.0  # this run, all stages, all devices
        self.steps = 0
        self.other_runs = 0.0  # everything else in the ledger
        self.stopped_for_budget = False
        self._pending = 0.0  # this rank's evaluation FLOPs not yet summed across devices
        self._stage = "fit"
        self._started = time.strftime("%Y-%m-%dT%H:%M:%S")

    @property
    def total(self) -> float:
        """FLOPs of every run in the ledger, this one included."""
        return self.other_runs + self.run_flops

    # -- set-up and state ----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.flop_model = flop_model_for(pl_module, self.accounting)
        self._stage = stage
        if self.run_id is None:
            logger = trainer.logger
            name = self.run_name or (logger.name if logger else "run")
            version = logger.version if logger else self._started
            self.run_id = f"{name}/{stage}/version_{version}" if stage != "fit" else f"{name}/version_{version}"
            self.run_name = name
        self._sync_with_ledger()

    def _sync_with_ledger(self) -> None:
        if self.ledger is None:
            return
        self.other_runs = self.ledger.total(exclude=self.run_id)
        record = self.ledger.get(self.run_id)
        if record is not None:  # resumed: the ledger may hold more than the checkpoint (a kill after it)
            self.run_flops = max(self.run_flops, float(record["flops"]))
            self.steps = max(self.steps, int(record.get("steps", 0)))

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_flops": self.run_flops, "steps": self.steps, "started": self._started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage != "fit":  # evaluating a checkpoint is a run of its own, not the training run
            return
        self.run_id = state_dict["run_id"]
        self.run_flops = float(state_dict["run_flops"])
        self.steps = int(state_dict["steps"])
        self._started = state_dict.get("started", self._started)
        self._sync_with_ledger()

    # -- counting ------------------------------------------------------------------------------
    def _global_sum(self, trainer: L.Trainer, pl_module: L.LightningModule, value: float) -> float:
        if trainer.world_size == 1:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=pl_module.device)
        return float(trainer.strategy.reduce(tensor, reduce_op="sum"))

    def _log(self, pl_module: L.LightningModule, **extra: float) -> None:
        metrics = {
            "flops/total": self.total,
            "flops/run": self.run_flops,
            "flops/budget_used": self.total / self.budget,
        }
        metrics.update(extra)
        for name, value in metrics.items():
            pl_module.log(name, value, sync_dist=False, rank_zero_only=True)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        cost = self._global_sum(trainer, pl_module, self.flop_model.train_step(*batch["input_ids"].shape))
        if self.total + cost > self.budget:
            self.stopped_for_budget = True
            trainer.should_stop = True  # LLMTimeLoRA.on_train_batch_start then skips this step
            rank_zero_info(
                f"FlopBudget: stopping before step {trainer.global_step + 1}: it costs {cost:.3e} FLOPs and "
                f"{self.total:.3e} of {self.budget:.3e} are spent ({self.budget - self.total:.3e} left)"
            )
            return
        self.run_flops += cost
        self.steps += 1
        self._step_cost = cost

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.stopped_for_budget:
            return
        self._log(pl_module, **{"flops/step": self._step_cost})
        if self.steps % self.ledger_every_n_steps == 0:
            self._write(trainer, "running")

    def _count_forward(self, batch: Any) -> None:
        self._pending += self.flop_model.batch_forward(*batch["input_ids"].shape)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count_forward(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count_forward(batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Prediction steps report their own cost (generation) as ``outputs["flops"]``."""
        if isinstance(outputs, dict) and "flops" in outputs:
            self._pending += float(outputs["flops"])

    def _settle(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_flops += self._global_sum(trainer, pl_module, self._pending)
        self._pending = 0.0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._settle(trainer, pl_module)
        self._log(pl_module)
        self._write(trainer, "running" if self._stage == "fit" else "finished")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_epoch_end(trainer, pl_module)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._settle(trainer, pl_module)
        self._write(trainer, "finished")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, "stopped: budget" if self.stopped_for_budget else "finished")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._write(trainer, f"failed: {type(exception).__name__}")

    def _write(self, trainer: L.Trainer, status: str) -> None:
        if self.ledger is None or not trainer.is_global_zero:
            return
        hp = trainer.lightning_module.hparams
        config = {
            key: hp.get(key)
            for key in ("model_name_or_path", "lora_rank", "learning_rate", "context_length", "batch_size")
        }
        config["devices"] = trainer.world_size
        val_loss = trainer.callback_metrics.get("val/loss")
        self.ledger.upsert(
            {
                "val_loss": None if val_loss is None else float(val_loss),
                "log_dir": getattr(trainer.logger, "log_dir", None),  # not trainer.log_dir: a collective
                "run_id": self.run_id,
                "name": self.run_name,
                "stage": self._stage,
                "status": status,
                "config": config,
                "steps": self.steps,
                "flops": self.run_flops,
                "accounting": self.accounting,
                "started": self._started,
            }
        )


class ForecastWriter(BasePredictionWriter):
    """Writes ``predict``'s forecasts under the run's log folder: ``predictions.npz``,
    ``metrics.json``, ``metrics.md`` (like the report's tables 4 and 5) and PNG figures (like
    figures 2 and 5), which also go to TensorBoard. Under several devices each rank writes its
    part and rank 0 merges them once.

    Args:
        output_dir: folder for the files (default: ``<log dir>/forecast``).
        max_figures: figures are drawn for at most this many trajectories.
    """

    def __init__(self, output_dir: str | None = None, max_figures: int = 12) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.max_figures = max_figures

    def _folder(self, trainer: L.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "forecast"

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        folder = self._folder(trainer)
        part = merge_predictions(predictions)
        if trainer.world_size > 1:
            save_npz(folder / f"rank{trainer.global_rank}.npz", part)
            trainer.strategy.barrier()
            if not trainer.is_global_zero:
                return
            parts = [load_npz(folder / f"rank{r}.npz") for r in range(trainer.world_size)]
            part = merge_predictions(parts)
            for r in range(trainer.world_size):
                (folder / f"rank{r}.npz").unlink()
        write_forecast_outputs(folder, part, trainer.logger, self.max_figures)
        rank_zero_info(f"ForecastWriter: wrote {len(part['index'])} forecasts to {folder}")
