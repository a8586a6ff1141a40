"""The ``FlopBudget`` callback: the FLOP budget that gates every batch and generation of a run, made
of the parts in ``gates.py``."""

from __future__ import annotations

import signal
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_llmtime.budget.gates import (
    EvaluationGate,
    PredictGate,
    RunRecord,
    SharedBudget,
    evaluation_bound,
    refuse_deferred_stops,
    remove_empty_log_dir,
    save_last,
)
from lit_llmtime.budget.ledger import DEFAULT_BUDGET, DEFAULT_LEDGER, Budget, BudgetExhausted
from lit_llmtime.budget.signals import Interrupted, StopSignals, first_signal
from lit_llmtime.model.flops import Accounting


class FlopBudget(L.Callback):
    """Gates every FLOP of a run on one budget that all runs of a ledger share (``ledger.Budget``),
    out of the parts in ``gates.py``: ``SharedBudget`` (rank 0 decides, every rank follows, one
    all-reduce), ``RunRecord`` (the ledger record, kept in checkpoints so a resumed run continues
    it), ``EvaluationGate`` (validate and test reserve their pass, every batch is charged before it
    runs) and ``PredictGate`` (only the batches the budget pays for, at their longest, refunded).

    Training, here: each batch's cost (every device's, counted once) is charged durably before it
    runs; one that does not fit is not run and training stops, its last step validated (one pass
    stays reserved) and checkpointed. ``min_steps`` and ``min_epochs`` are refused: nothing may
    defer a budget stop. SIGINT and SIGTERM are noted and carried in the all-reduce before each
    batch, so every rank stops at the same batch, saves it and raises ``signals.Interrupted``.

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
        self.accounting = accounting
        self.record = RunRecord(self.authority, run_name, accounting)
        self.run_flops = 0.0  # this run, all stages, all devices, in this process
        self.stopped_for_budget = False
        self.val_reserve = 0.0  # fit: one validation pass, held back while training
        self._largest_step = 0.0
        self.signals = StopSignals()

    @property
    def budget(self) -> float:
        return self.authority.budget

    @property
    def run_id(self) -> str | None:
        return self.record.run_id

    # -- set-up and state ----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes a str enum
        if stage == "fit":  # before the run exists: refused, nothing is charged or recorded
            refuse_deferred_stops(trainer)
        self.flop_model = pl_module.flop_model(self.accounting)
        self.shared = SharedBudget.of(self.authority, trainer)
        self.record.start_trainer(trainer, stage)
        self.evaluation = EvaluationGate(self.shared, self.record, self.flop_model)
        self.prediction = PredictGate(self.shared, self.record, self.flop_model)
        if stage == "predict":
            self.prediction.shrink(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return self.record.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.record.load_state_dict(state_dict)

    # -- training ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record.describe("running")
        if trainer.limit_val_batches and trainer.datamodule is not None:
            loaders = trainer.datamodule.val_dataloader()
            self.val_reserve = evaluation_bound(trainer, pl_module, self.flop_model, loaders, trainer.limit_val_batches)
        if not self.shared.reserve(self.run_id, self.val_reserve):
            self.record.refuse("fit's validation pass", self.val_reserve)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        cost, *signals = self.shared.sum([self.flop_model.train_step(*batch["input_ids"].shape), *self.signals.flags()])
        if signum := first_signal(signals):
            save_last(trainer)
            self.record.describe(f"stopped: {signal.Signals(signum).name}")
            raise Interrupted(signum, f"step {trainer.global_step} saved")
        self._step_cost = cost
        self._completes_step = self._step_ends_at(trainer, batch_idx)
        if self.shared.charge(self.run_id, cost, "train", int(self._completes_step), reserve=self.val_reserve):
            self.run_flops += cost
            self._largest_step = max(self._largest_step, cost)
            return
        # Reached only when the previous batch was just validated, or another run spent the budget
        # since: this batch is not run and training stops.
        self._stop(f"stopped before step {trainer.global_step + 1}, which costs {cost:.3e} FLOPs")
        trainer.should_stop = True
        pl_module.budget_refused_batch = True  # LLMTimeLoRA.on_train_batch_start then skips it (Lightning's -1)

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
        if not self.shared.allow(step + self.val_reserve):
            self._stop(f"stopped after step {trainer.global_step}: the next costs {step:.3e} FLOPs")
            trainer.should_stop = True

    def _stop(self, what: str) -> None:
        """Note a budget stop (``trainer.should_stop``, which no min_steps or min_epochs defers: see ``setup``)."""
        self.stopped_for_budget = True
        available = self.shared.available()
        self.record.cut = f"{what}; {available:.3e} left beside the validation reserve of {self.val_reserve:.3e}"
        rank_zero_info(f"FlopBudget: {self.record.cut}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopped_for_budget:
            save_last(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shared.reserve(self.run_id, 0.0)
        self.record.describe("stopped: budget" if self.stopped_for_budget else "finished")

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.install()  # after the Trainer registered its SIGTERM handler, which this replaces

    on_train_start = on_sanity_check_start

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        stage = self.record.stage
        if self.run_id is None:  # failed before set-up: nothing charged, no record; no empty log folder
            remove_empty_log_dir(trainer)
        elif isinstance(exception, SIGTERMException) and stage == "fit":  # before this callback's handler
            save_last(trainer)  # pre-empted: keep what was paid for
            self.record.describe("stopped: SIGTERM")
        elif isinstance(exception, Interrupted) and stage != "fit":
            self.record.describe(f"stopped: {signal.Signals(exception.signum).name}")
        elif not isinstance(exception, BudgetExhausted | Interrupted):
            self.record.describe(f"failed: {type(exception).__name__}")

    # -- validation and test (budget.EvaluationGate) ------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.record.stage != "fit":  # fit keeps its pass reserved while it trains
            self.signals.install(immediate=True)  # nothing to save: stop at once
            self.evaluation.reserve_pass(trainer, pl_module, trainer.val_dataloaders)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.install(immediate=True)
        self.evaluation.reserve_pass(trainer, pl_module, trainer.test_dataloaders)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.run_flops += self.evaluation.charge(trainer, pl_module, batch, forecast=dataloader_idx == 1)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx == 1:  # forecasts: what they did not generate comes back
            self.run_flops -= self.evaluation.refund_forecast(outputs)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.run_flops += self.evaluation.charge(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(pl_module)
        self.record.describe("running" if self.record.stage == "fit" else "finished")

    on_test_epoch_end = on_validation_epoch_end

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.record.stage != "fit":
            self.shared.reserve(self.run_id, 0.0)

    on_test_end = on_validation_end

    # -- prediction (budget.PredictGate) -------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.install(immediate=True)
        self.record.describe("running")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """What the generation cost goes into its result (``flops``), for the forecast files."""
        outputs.flops = self.prediction.generated_by(outputs)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_flops += self.prediction.settle()
        self.record.describe(f"shrunk: {self.record.cut}" if self.record.cut else "finished")

    # -- reporting -----------------------------------------------------------------------------
    def _log(self, pl_module: L.LightningModule, **extra: float) -> None:
        total = self.authority.spent() if pl_module.trainer.is_global_zero else 0.0
        metrics = {"flops/total": total, "flops/run": self.run_flops, "flops/budget_used": total / self.budget}
        for name, value in (metrics | extra).items():
            pl_module.log(name, value, sync_dist=False, rank_zero_only=True)
