"""Lightning callbacks: the FLOP budget that gates every batch and generation of a run, and the
writer of forecasts, metrics and figures."""

from __future__ import annotations

import itertools
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_llmtime.evaluation import load_npz, merge_predictions, save_npz, summary_lines, write_forecast_outputs
from lit_llmtime.flops import Accounting, FlopModel
from lit_llmtime.ledger import DEFAULT_BUDGET, DEFAULT_LEDGER, Budget, BudgetExhausted
from lit_llmtime.plan import batch_sizes, forecast_pass_flops, limit_batches, run_flop_model
from lit_llmtime.signals import Interrupted, StopSignals, first_signal


def all_reduce_sum(trainer: L.Trainer, values: list[float]) -> list[float]:
    """``values`` summed over all ranks, in float64.

    On CPU (gloo) it waits until the process group's worker thread has let go of the tensor: since
    torch 2.x that thread takes the GIL to drop a Python tensor, and a process that starts to exit
    first is aborted ("terminate called without an active exception"), one DDP exit in five in
    tests. The worker's hold shows in the tensor's Python reference count.
    """
    tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    references = sys.getrefcount(tensor)
    summed = trainer.strategy.reduce(tensor, reduce_op="sum").tolist()
    deadline = time.monotonic() + 1.0
    while tensor.device.type == "cpu" and sys.getrefcount(tensor) > references and time.monotonic() < deadline:
        time.sleep(0)  # hands the GIL to the worker
    return summed


def flop_model_for(module: L.LightningModule, accounting: Accounting = "exact") -> FlopModel:
    """The FLOP model of an ``LLMTimeLoRA`` (``plan.run_flop_model`` of its base config and settings)."""
    return run_flop_model(module.model.config, module.lora, module.hparams.output_vocab, accounting)


def built_model(hparams: dict[str, Any]) -> str:
    """What the module built, for the ledger: its model path, or a random model's shape."""
    shape = hparams.get("model_config")
    if not shape:
        return hparams.get("model_name_or_path")
    fields = ", ".join(f"{k}={shape[k]}" for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k in shape)
    return f"random Qwen2 ({fields}, init_seed={hparams.get('init_seed')})"


def remove_empty_log_dir(trainer: L.Trainer) -> None:
    """Remove the logger's version folder (and its run folder, then empty) if it holds nothing but
    event files without events."""
    folder = Path(getattr(trainer.logger, "log_dir", None) or "")
    if not trainer.is_global_zero or not folder.name.startswith("version_") or not folder.is_dir():
        return
    files = list(folder.iterdir())
    if all(f.name.startswith("events.out.tfevents.") and f.stat().st_size < 200 for f in files):
        for f in files:
            f.unlink()
        folder.rmdir()
        if not any(folder.parent.iterdir()):  # the run name's folder, if this was its first version
            folder.parent.rmdir()


class FlopBudget(L.Callback):
    """Gates every FLOP of a run on one budget that all runs of a ledger share (``ledger.Budget``).

    - Training: before each batch its cost (every device's batch, counted once) is charged
      durably; a batch that does not fit is not run and training stops there. While validation is
      on, one validation pass stays reserved, so the validation after a budget stop is paid for.
    - A budget stop ends cleanly: the last step is validated (when validation is on and the epoch
      validates) and checkpointed. SIGINT and SIGTERM (Ctrl-C, cluster pre-emption) are noted
      and carried in the all-reduce before each batch: every rank stops at the same batch, the
      last completed step is checkpointed and ``signals.Interrupted`` raised (exit 130 or 143).
    - ``validate``/``test`` reserve their whole pass before the first batch and refuse to start
      if it does not fit; ``predict`` forecasts only the batches the budget can pay for (charged
      at their longest possible generation, the unused part refunded) and says what it cut.

    The count is global across devices and nodes: each rank's batch cost is summed, rank 0 alone
    asks the ledger and every rank follows its answer. The run id travels in checkpoints, so a
    resumed run continues its record.

    Args:
        budget: FLOPs allowed across all runs in the ledger (the coursework: 1e17).
        ledger: JSON-lines ledger shared by all experiments; None keeps the budget for this run only.
        run_name: name of this run in the ledger (default: the logger's name).
        accounting: ``exact`` or ``coursework`` FLOP model (training, evaluation and generation alike).
    """

    def __init__(
        self,
        budget: float = DEFAULT_BUDGET,
        ledger: str | None = DEFAULT_LEDGER,
        run_name: str | None = None,
        accounting: Accounting = "exact",
    ) -> None:
        self.authority = Budget(ledger, budget)
        self.run_name = run_name
        self.accounting = accounting
        self.run_id: str | None = None
        self.run_flops = 0.0  # this run, all stages, all devices, in this process
        self.stopped_for_budget = False
        self.cut: str | None = None  # what the budget cut, said once and kept in the ledger
        self.val_reserve = 0.0  # fit: one validation pass, held back while training
        self._largest_step = 0.0
        self._stage = "fit"
        self._started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.signals = StopSignals()

    # -- set-up and state ----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.flop_model = flop_model_for(pl_module, self.accounting)
        self._stage = stage = getattr(stage, "value", stage)  # Lightning passes a str enum
        if self.run_id is None:
            logger = trainer.logger
            name = self.run_name or (logger.name if logger else "run")
            version = logger.version if logger else self._started
            self.run_id = f"{name}/{stage}/version_{version}" if stage != "fit" else f"{name}/version_{version}"
            self.run_name = name
        if stage == "predict":
            self._shrink_predict(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "started": self._started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage == "fit":  # evaluating a checkpoint is a run of its own, not the training run
            self.run_id, self._started = state_dict["run_id"], state_dict.get("started", self._started)

    # -- the gate ------------------------------------------------------------------------------
    def _global_sum(self, trainer: L.Trainer, value: float) -> float:
        return value if trainer.world_size == 1 else all_reduce_sum(trainer, [value])[0]

    def _rank_zero(self, trainer: L.Trainer, decide) -> float:
        """``decide()`` (a number or a truth value) on rank 0, the only rank that touches the ledger;
        its answer on every rank. If it fails (an unreadable ledger, a full disk), every rank
        raises: none waits forever. One all-reduce of two numbers, as cheap as a collective gets."""
        answer, error = 0.0, None
        if trainer.is_global_zero:
            try:
                answer = float(decide() or 0.0)
            except (OSError, ValueError) as failure:
                error = failure
        if trainer.world_size > 1:
            answer, failed = all_reduce_sum(trainer, [answer, float(error is not None)])  # others add zeros
            if failed and error is None:
                error = RuntimeError("FlopBudget: rank 0 could not use the ledger (its error says why)")
        if error is not None:
            raise error
        return answer

    def _charge(self, trainer: L.Trainer, cost: float, kind: str, steps: int = 0, reserve: float | None = None):
        return self._rank_zero(trainer, lambda: self.authority.charge(self.run_id, cost, kind, steps, reserve))

    def _refuse(self, trainer: L.Trainer, message: str) -> None:
        self.cut = message
        self._describe(trainer, f"refused: {message}")
        raise BudgetExhausted(f"FLOP budget: {message}")

    # -- training ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._describe(trainer, "running")
        if trainer.limit_val_batches and trainer.datamodule is not None:
            loaders = trainer.datamodule.val_dataloader()
            self.val_reserve = self._validation_bound(trainer, pl_module, loaders, trainer.limit_val_batches)
        if not self._rank_zero(trainer, lambda: self.authority.reserve(self.run_id, self.val_reserve)):
            self._refuse(trainer, f"fit needs {self.val_reserve:.3e} FLOPs for a validation pass; "
                                  f"{self.authority.available():.3e} left")  # fmt: skip

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        local = [self.flop_model.train_step(*batch["input_ids"].shape), *self.signals.flags()]
        cost, *signals = local if trainer.world_size == 1 else all_reduce_sum(trainer, local)
        if signum := first_signal(signals):
            self._save_last(trainer)
            self._describe(trainer, f"stopped: {signal.Signals(signum).name}")
            raise Interrupted(signum, f"step {trainer.global_step} saved")
        self._step_cost = cost
        self._completes_step = self._step_ends_at(trainer, batch_idx)
        if self._charge(trainer, cost, "train", int(self._completes_step), reserve=self.val_reserve):
            self.run_flops += cost
            self._largest_step = max(self._largest_step, cost)
            return
        # Reached only when the previous batch was just validated, or another run spent the budget
        # since: this batch is not run and training stops.
        self._stop(trainer, f"stopped before step {trainer.global_step + 1}, which costs {cost:.3e} FLOPs")
        trainer.should_stop = True  # LLMTimeLoRA.on_train_batch_start then skips this batch

    @staticmethod
    def _step_ends_at(trainer: L.Trainer, batch_idx: int) -> bool:
        """Whether this batch completes an optimizer step (gradient accumulation)."""
        return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """At the end of an optimizer step, stop if the next whole step cannot be paid for:
        Lightning then validates these weights (out of the reserve) before it stops."""
        if self.stopped_for_budget:
            return
        self._log(pl_module, **{"flops/step": self._step_cost})
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        if 0 <= trainer.max_steps <= trainer.global_step or (
            last_epoch and batch_idx + 1 >= trainer.num_training_batches
        ):
            return  # done anyway
        if not self._completes_step:
            return  # never stop inside an accumulation: its batches are paid for
        step = trainer.accumulate_grad_batches * self._largest_step
        if not self._rank_zero(trainer, lambda: self.authority.allow(step + self.val_reserve)):
            self._stop(trainer, f"stopped after step {trainer.global_step}: the next costs {step:.3e} FLOPs")
            trainer.should_stop = True

    def _stop(self, trainer: L.Trainer, what: str) -> None:
        self.stopped_for_budget = True
        if not trainer.fit_loop._can_stop_early:  # a spent budget outranks min_steps and min_epochs
            what += f" (before min_steps={trainer.fit_loop.min_steps}, min_epochs={trainer.fit_loop.min_epochs})"
            trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = None, None
        available = self._rank_zero(trainer, self.authority.available)
        self.cut = f"{what}; {available:.3e} left beside the validation reserve of {self.val_reserve:.3e}"
        rank_zero_info(f"FlopBudget: {self.cut}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopped_for_budget:
            self._save_last(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rank_zero(trainer, lambda: self.authority.reserve(self.run_id, 0.0))
        self._describe(trainer, "stopped: budget" if self.stopped_for_budget else "finished")

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.install()  # after the Trainer registered its SIGTERM handler, which this replaces

    on_train_start = on_sanity_check_start

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.run_id is None:  # failed before set-up: nothing charged, no record; no empty log folder
            remove_empty_log_dir(trainer)
            return
        if isinstance(exception, SIGTERMException) and self._stage == "fit":  # before this callback's handler
            self._save_last(trainer)  # pre-empted: keep what was paid for
            self._describe(trainer, "stopped: SIGTERM")
        elif isinstance(exception, Interrupted) and self._stage != "fit":
            self._describe(trainer, f"stopped: {signal.Signals(exception.signum).name}")
        elif not isinstance(exception, BudgetExhausted | Interrupted):
            self._describe(trainer, f"failed: {type(exception).__name__}")

    def _save_last(self, trainer: L.Trainer) -> None:
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath is not None:
            trainer.save_checkpoint(Path(callback.dirpath) / "last.ckpt")

    # -- validation and test -------------------------------------------------------------------
    def _validation_bound(self, trainer: L.Trainer, pl_module: L.LightningModule, loaders, limit: int | float) -> float:
        """FLOPs of one pass (``limit``: Lightning's ``limit_*_batches``) on every device: the
        windows at full batches, and the validation forecasts (a second loader) at their longest."""
        loaders = list(loaders) if isinstance(loaders, list | tuple) else [loaders]
        windows, total = loaders[0], 0.0
        if len(windows.dataset):
            tokens = windows.dataset[0]["input_ids"].shape[-1]
            sizes = batch_sizes(len(windows.dataset), windows.batch_size, trainer.world_size)
            total += (
                limit_batches(len(sizes), limit)
                * trainer.world_size
                * self.flop_model.batch_forward(windows.batch_size, tokens)
            )
        if len(loaders) > 1 and limit_batches(1, limit):
            total += self._forecast_bound(trainer, pl_module, loaders[1])
        return total

    def _forecast_bound(self, trainer: L.Trainer, pl_module: L.LightningModule, loader) -> float:
        """The most the validation forecasts (one batch of every prompt) can cost on all devices,
        a distributed sampler's padding included."""
        batch = next(iter(loader))
        per_prompt = pl_module.generation_shape(batch).flops(self.flop_model) / len(batch["input_ids"])
        return forecast_pass_flops(per_prompt, len(loader.dataset), trainer.world_size)

    def _reserve_pass(self, trainer: L.Trainer, pl_module: L.LightningModule, loaders) -> None:
        if self._stage == "fit":
            return  # fit keeps its pass reserved while training
        limit = trainer.limit_test_batches if self._stage == "test" else trainer.limit_val_batches
        bound = self._validation_bound(trainer, pl_module, loaders, limit)
        if not self._rank_zero(trainer, lambda: self.authority.reserve(self.run_id, bound)):
            self._refuse(trainer, f"{self._stage} needs {bound:.3e} FLOPs; {self.authority.available():.3e} left")
        self._describe(trainer, "running")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stage != "fit":
            self.signals.install(immediate=True)  # nothing to save: stop at once
        self._reserve_pass(trainer, pl_module, trainer.val_dataloaders)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.install(immediate=True)
        self._reserve_pass(trainer, pl_module, trainer.test_dataloaders)

    def _charge_forward(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, forecast: bool = False):
        """Charge an evaluation batch before it runs: a forward pass, or (``forecast``) the longest
        generation of a batch of validation prompts, whose unused part is refunded after it."""
        local = self.flop_model.batch_forward(*batch["input_ids"].shape)
        if forecast:
            local = pl_module.generation_shape(batch).flops(self.flop_model)
        cost = self._global_sum(trainer, local)
        if not self._charge(trainer, cost, self._stage if self._stage != "fit" else "validate"):
            self._refuse(trainer, f"a {self._stage} batch costs {cost:.3e} FLOPs beyond what is left")
        self.run_flops += cost
        self._forecast_charged = cost

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._charge_forward(trainer, pl_module, batch, forecast=dataloader_idx == 1)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Refund what a batch of validation forecasts did not generate."""
        if dataloader_idx != 1:
            return
        spent = self._global_sum(trainer, outputs.shape.flops(self.flop_model, outputs.new_tokens))
        unused = self._forecast_charged - spent
        self._rank_zero(trainer, lambda: self.authority.refund(self.run_id, unused, "validate"))
        self.run_flops -= unused

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._charge_forward(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(pl_module)
        self._describe(trainer, "running" if self._stage == "fit" else "finished")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stage != "fit":
            self._rank_zero(trainer, lambda: self.authority.reserve(self.run_id, 0.0))

    on_test_end = on_validation_end

    # -- prediction ----------------------------------------------------------------------------
    def _shrink_predict(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forecast only as many batches as the budget can pay for, charged at their longest before
        any runs (ranks may hold different numbers of batches, so nothing is settled per batch).
        On one device each batch is charged its own bound; on several, every global batch is
        charged as if each rank held the costliest batch."""
        loader = trainer.datamodule.predict_dataloader()
        bounds = [pl_module.generation_shape(batch).flops(self.flop_model) for batch in loader]
        if trainer.world_size > 1:
            batches = len(batch_sizes(len(loader.dataset), loader.batch_size, trainer.world_size))
            bounds = [trainer.world_size * max(bounds)] * batches
        bounds = bounds[: limit_batches(len(bounds), trainer.limit_predict_batches)]  # what the user asked for
        costs = list(itertools.accumulate(bounds))
        affordable = int(self._rank_zero(trainer, lambda: sum(cost <= self.authority.available() for cost in costs)))
        charge = costs[affordable - 1] if affordable else 0.0
        if affordable == 0 or not self._charge(trainer, charge, "generate"):
            self._refuse(trainer, f"predict needs {bounds[0]:.3e} FLOPs for its first batch; "
                                  f"{self.authority.available():.3e} left")  # fmt: skip
        if affordable < len(bounds):
            trainer.limit_predict_batches = affordable
            self.cut = f"forecasting {affordable} of {len(bounds)} batches (the budget pays for no more)"
            rank_zero_info(f"FlopBudget: {self.cut}")
        self._charged_for_predict = charge
        self._generated = 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.install(immediate=True)
        self._describe(trainer, "running")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """What the generation cost goes into its result (``flops``), for the forecast files."""
        outputs.flops = outputs.shape.flops(self.flop_model, outputs.new_tokens)
        self._generated += outputs.flops

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refund what the generation did not use."""
        spent = self._global_sum(trainer, self._generated)
        self._rank_zero(
            trainer, lambda: self.authority.refund(self.run_id, self._charged_for_predict - spent, "generate")
        )
        self.run_flops += spent
        self._describe(trainer, f"shrunk: {self.cut}" if self.cut else "finished")

    # -- reporting -----------------------------------------------------------------------------
    def _log(self, pl_module: L.LightningModule, **extra: float) -> None:
        total = self.authority.spent() if pl_module.trainer.is_global_zero else 0.0
        metrics = {"flops/total": total, "flops/run": self.run_flops, "flops/budget_used": total / self.budget}
        for name, value in (metrics | extra).items():
            pl_module.log(name, value, sync_dist=False, rank_zero_only=True)

    @property
    def budget(self) -> float:
        return self.authority.budget

    def _describe(self, trainer: L.Trainer, status: str) -> None:
        """The run's record in the ledger: what it is and where it stands (rank 0 only; a failure
        to write it is a warning, as the other ranks do not wait for it)."""
        if not trainer.is_global_zero:
            return
        try:
            self._write_description(trainer, status)
        except (OSError, ValueError) as error:
            rank_zero_warn(f"FlopBudget: could not describe the run in the ledger: {error}")

    def _write_description(self, trainer: L.Trainer, status: str) -> None:
        module, data = trainer.lightning_module, trainer.datamodule
        data_hparams = getattr(data, "hparams", {})
        val_loss = trainer.callback_metrics.get("val/loss")
        self.authority.ledger.update(
            self.run_id,
            name=self.run_name,
            stage=self._stage,
            status=status if self.cut is None or status.startswith(("refused", "shrunk")) else f"{status} ({self.cut})",
            config={
                "model_name_or_path": built_model(module.hparams),
                "lora_rank": module.lora.rank,
                "learning_rate": module.optim.learning_rate,
                "context_length": data_hparams.get("context_length"),
                "batch_size": data_hparams.get("batch_size"),
                "devices": trainer.world_size,
            },
            val_loss=None if val_loss is None or self._stage not in ("fit", "validate") else float(val_loss),
            log_dir=getattr(trainer.logger, "log_dir", None),  # not trainer.log_dir: a collective
            accounting=self.accounting,
            started=self._started,
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
        if trainer.world_size > 1:
            if predictions:  # a rank may have had nothing to forecast
                merged = merge_predictions([result.predictions() for result in predictions])
                save_npz(folder / f"rank{trainer.global_rank}.npz", merged)
            trainer.strategy.barrier()
            if not trainer.is_global_zero:
                return
            files = [folder / f"rank{r}.npz" for r in range(trainer.world_size)]
            predictions = [load_npz(path) for path in files if path.is_file()]
            for path in files:
                path.unlink(missing_ok=True)
        if not predictions:
            return
        part = merge_predictions([p if isinstance(p, dict) else p.predictions() for p in predictions])
        summary = write_forecast_outputs(folder, part, trainer.logger, self.max_figures)
        figures = sorted(folder.glob("forecast_*.png"))
        print(summary_lines(summary, folder / "metrics.md", figures), flush=True)
