"""The FLOP budget's parts, each with one job, that the ``FlopBudget`` callback puts together: the
budget as every rank of a run sees it (rank 0 decides, one all-reduce), the run's record in the
ledger, the most an evaluation pass or a predict can cost, and the checkpoint kept on a stop."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_llmtime.budget.ledger import Budget, BudgetExhausted
from lit_llmtime.budget.plan import batch_sizes, forecast_pass_flops, limit_batches
from lit_llmtime.model.flops import Accounting, FlopModel


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


class SharedBudget:
    """A ledger ``Budget`` as every rank of a run sees it: rank 0 alone reads and writes the
    ledger, and one all-reduce of two numbers gives every rank its answer. A failure on rank 0 (an
    unreadable ledger, a full disk) is raised on every rank, so none waits forever.

    Args:
        authority: the ledger's budget.
        is_zero: whether this process is rank 0.
        reduce: sums a list of numbers over the ranks (None: a run of one process).
    """

    def __init__(
        self, authority: Budget, is_zero: bool = True, reduce: Callable[[list[float]], list[float]] | None = None
    ):
        self.authority, self.is_zero, self.reduce = authority, is_zero, reduce

    @classmethod
    def of(cls, authority: Budget, trainer: L.Trainer) -> SharedBudget:
        reduce = None if trainer.world_size == 1 else partial(all_reduce_sum, trainer)
        return cls(authority, trainer.is_global_zero, reduce)

    def sum(self, values: list[float]) -> list[float]:
        """Each of ``values`` summed over the ranks."""
        return list(values) if self.reduce is None else self.reduce(list(values))

    def decide(self, decide: Callable[[], Any]) -> float:
        """``decide()`` (a number or a truth value) on rank 0; its answer on every rank."""
        answer, error = 0.0, None
        if self.is_zero:
            try:
                answer = float(decide() or 0.0)
            except (OSError, ValueError) as failure:
                error = failure
        if self.reduce is not None:
            answer, failed = self.reduce([answer, float(error is not None)])  # the other ranks add zeros
            if failed and error is None:
                error = RuntimeError("FlopBudget: rank 0 could not use the ledger (its error says why)")
        if error is not None:
            raise error
        return answer

    def charge(self, run_id: str, cost: float, kind: str, steps: int = 0, reserve: float | None = None) -> bool:
        return bool(self.decide(lambda: self.authority.charge(run_id, cost, kind, steps, reserve)))

    def reserve(self, run_id: str, flops: float) -> bool:
        return bool(self.decide(lambda: self.authority.reserve(run_id, flops)))

    def refund(self, run_id: str, flops: float, kind: str) -> None:
        self.decide(lambda: self.authority.refund(run_id, flops, kind))

    def allow(self, cost: float) -> bool:
        return bool(self.decide(lambda: self.authority.allow(cost)))

    def available(self) -> float:
        return self.decide(self.authority.available)


def refuse_deferred_stops(trainer: L.Trainer) -> None:
    """ValueError if the trainer promises ``min_steps`` or ``min_epochs``: Lightning would defer a
    budget stop until they are met, and a spent budget must be able to stop training at any step."""
    steps, epochs = trainer.fit_loop.min_steps, trainer.fit_loop.min_epochs
    promised = {"min_steps": steps} if steps is not None else {}  # even 0: Lightning then sets min_epochs=1
    promised |= {"min_epochs": epochs} if epochs and not (steps is not None and epochs == 1) else {}
    if promised:
        settings = ", ".join(f"{name}={value}" for name, value in promised.items())
        raise ValueError(
            f"FLOP budget: trainer {settings} cannot be promised under a FLOP budget, which must be able to "
            "stop training at any step; leave it out (max_steps and max_epochs still bound the run)"
        )


def built_model(hparams: dict[str, Any]) -> str:
    """What the module built, for the ledger: its model path, or a random model's shape."""
    shape = hparams.get("model_config")
    if not shape:
        return hparams.get("model_name_or_path")
    fields = ", ".join(f"{k}={shape[k]}" for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k in shape)
    return f"random Qwen2 ({fields}, init_seed={hparams.get('init_seed')})"


class RunRecord:
    """A run's record in the ledger: its id (kept in checkpoints, so a resumed run continues its
    record), what it is and where it stands, and what the budget cut (said once, kept in the
    status). Written by rank 0 only; a failure to write it is a warning, as the other ranks do not
    wait for it."""

    def __init__(self, authority: Budget, run_name: str | None, accounting: Accounting) -> None:
        self.authority, self.run_name, self.accounting = authority, run_name, accounting
        self.run_id: str | None = None
        self.stage = "fit"
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.cut: str | None = None

    def start(self, trainer: L.Trainer, stage: str) -> None:
        """Name the run (the logger's name and version) unless a checkpoint already did."""
        self.stage = stage
        if self.run_id is None:
            logger = trainer.logger
            name = self.run_name or (logger.name if logger else "run")
            version = logger.version if logger else self.started
            self.run_id = f"{name}/{stage}/version_{version}" if stage != "fit" else f"{name}/version_{version}"
            self.run_name = name

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "started": self.started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.stage == "fit":  # evaluating a checkpoint is a run of its own, not the training run
            self.run_id, self.started = state_dict["run_id"], state_dict.get("started", self.started)

    def refuse(self, trainer: L.Trainer, message: str) -> None:
        """Record what the budget refused and raise ``BudgetExhausted`` (on every rank alike)."""
        self.cut = message
        self.describe(trainer, f"refused: {message}")
        raise BudgetExhausted(f"FLOP budget: {message}")

    def describe(self, trainer: L.Trainer, status: str) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self._write(trainer, status)
        except (OSError, ValueError) as error:
            rank_zero_warn(f"FlopBudget: could not describe the run in the ledger: {error}")

    def _write(self, trainer: L.Trainer, status: str) -> None:
        module, data_hparams = trainer.lightning_module, getattr(trainer.datamodule, "hparams", {})
        val_loss = trainer.callback_metrics.get("val/loss")
        if self.cut is not None and not status.startswith(("refused", "shrunk")):
            status = f"{status} ({self.cut})"
        self.authority.ledger.update(
            self.run_id,
            name=self.run_name,
            stage=self.stage,
            status=status,
            config={
                "model_name_or_path": built_model(module.hparams),
                "lora_rank": module.lora.rank,
                "learning_rate": module.optim.learning_rate,
                "context_length": data_hparams.get("context_length"),
                "batch_size": data_hparams.get("batch_size"),
                "devices": trainer.world_size,
            },
            val_loss=None if val_loss is None or self.stage not in ("fit", "validate") else float(val_loss),
            log_dir=getattr(trainer.logger, "log_dir", None),  # not trainer.log_dir: a collective
            accounting=self.accounting,
            started=self.started,
        )


def evaluation_bound(trainer: L.Trainer, module: L.LightningModule, flop_model: FlopModel, loaders, limit) -> float:
    """FLOPs of one validation or test pass (``limit``: Lightning's ``limit_*_batches``) on every
    device: the windows at full batches, and the validation forecasts (a second loader, one batch
    of every prompt, a distributed sampler's padding included) at their longest."""
    loaders = list(loaders) if isinstance(loaders, list | tuple) else [loaders]
    windows, total = loaders[0], 0.0
    if len(windows.dataset):
        tokens = windows.dataset[0]["input_ids"].shape[-1]
        sizes = batch_sizes(len(windows.dataset), windows.batch_size, trainer.world_size)
        per_batch = trainer.world_size * flop_model.batch_forward(windows.batch_size, tokens)
        total += limit_batches(len(sizes), limit) * per_batch
    if len(loaders) > 1 and limit_batches(1, limit):
        batch = next(iter(loaders[1]))
        per_prompt = module.generation_shape(batch).flops(flop_model) / len(batch["input_ids"])
        total += forecast_pass_flops(per_prompt, len(loaders[1].dataset), trainer.world_size)
    return total


def predict_bounds(trainer: L.Trainer, module: L.LightningModule, flop_model: FlopModel) -> list[float]:
    """The most each predict batch (``limit_predict_batches`` of them) can cost on every device: on
    one device each batch's own bound; on several, every global batch as if each rank held the
    costliest (ranks may hold different batches, so nothing is settled batch by batch)."""
    loader = trainer.datamodule.predict_dataloader()
    bounds = [module.generation_shape(batch).flops(flop_model) for batch in loader]
    if trainer.world_size > 1:
        batches = len(batch_sizes(len(loader.dataset), loader.batch_size, trainer.world_size))
        bounds = [trainer.world_size * max(bounds)] * batches
    return bounds[: limit_batches(len(bounds), trainer.limit_predict_batches)]


class EvaluationGate:
    """Validation and test under the budget: ``validate`` and ``test`` reserve their whole pass
    before its first batch and are refused if it does not fit (``fit`` keeps its pass reserved
    while it trains); every batch is charged before it runs, a batch of validation forecasts at
    its longest generation, whose unused part is refunded after it."""

    def __init__(self, shared: SharedBudget, record: RunRecord, flop_model: FlopModel) -> None:
        self.shared, self.record, self.flop_model = shared, record, flop_model
        self.forecast_charged = 0.0

    def reserve_pass(self, trainer: L.Trainer, module: L.LightningModule, loaders) -> None:
        stage = self.record.stage
        limit = trainer.limit_test_batches if stage == "test" else trainer.limit_val_batches
        bound = evaluation_bound(trainer, module, self.flop_model, loaders, limit)
        if not self.shared.reserve(self.record.run_id, bound):
            self.record.refuse(
                trainer, f"{stage} needs {bound:.3e} FLOPs; {self.shared.authority.available():.3e} left"
            )
        self.record.describe(trainer, "running")

    def charge(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, forecast: bool = False) -> float:
        """Charge a batch on every device before it runs (a forward pass, or a forecast's bound); its cost."""
        local = self.flop_model.batch_forward(*batch["input_ids"].shape)
        if forecast:
            local = module.generation_shape(batch).flops(self.flop_model)
        (cost,) = self.shared.sum([local])
        stage = self.record.stage
        if not self.shared.charge(self.record.run_id, cost, stage if stage != "fit" else "validate"):
            self.record.refuse(trainer, f"a {stage} batch costs {cost:.3e} FLOPs beyond what is left")
        self.forecast_charged = cost
        return cost

    def refund_forecast(self, result) -> float:
        """Refund what a batch of validation forecasts (its ``ForecastResult``) did not generate; the refund."""
        (spent,) = self.shared.sum([result.shape.flops(self.flop_model, result.new_tokens)])
        unused = self.forecast_charged - spent
        self.shared.refund(self.record.run_id, unused, "validate")
        return unused


class PredictGate:
    """``predict`` under the budget: only the batches it can pay for, all charged at their longest
    before any runs (``predict_bounds``; ``limit_predict_batches``, the Trainer's public limit, cuts
    the rest), the unused part refunded at the end."""

    def __init__(self, shared: SharedBudget, record: RunRecord, flop_model: FlopModel) -> None:
        self.shared, self.record, self.flop_model = shared, record, flop_model
        self.charged = self.generated = 0.0

    def shrink(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        bounds = predict_bounds(trainer, module, self.flop_model)
        costs = list(itertools.accumulate(bounds))
        available = self.shared.authority.available
        affordable = int(self.shared.decide(lambda: sum(cost <= available() for cost in costs)))
        self.charged = costs[affordable - 1] if affordable else 0.0
        if affordable == 0 or not self.shared.charge(self.record.run_id, self.charged, "generate"):
            self.record.refuse(
                trainer, f"predict needs {bounds[0]:.3e} FLOPs for its first batch; {available():.3e} left"
            )
        if affordable < len(bounds):
            trainer.limit_predict_batches = affordable
            self.record.cut = f"forecasting {affordable} of {len(bounds)} batches (the budget pays for no more)"
            rank_zero_info(f"FlopBudget: {self.record.cut}")

    def generated_by(self, result) -> float:
        """What a batch's generation (its ``ForecastResult``) cost on this device."""
        flops = result.shape.flops(self.flop_model, result.new_tokens)
        self.generated += flops
        return flops

    def settle(self) -> float:
        """Refund what the generation did not use; what it used on every device."""
        (spent,) = self.shared.sum([self.generated])
        self.shared.refund(self.record.run_id, self.charged - spent, "generate")
        return spent


def save_last(trainer: L.Trainer) -> None:
    """Checkpoint the last completed step as ``last.ckpt`` where the run's checkpoints go."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath is not None:
        trainer.save_checkpoint(Path(callback.dirpath) / "last.ckpt")


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
