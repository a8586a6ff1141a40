"""The FLOP budget's parts, each with one job, that the ``FlopBudget`` callback puts together: the
budget as every rank of a run sees it (rank 0 decides, one all-reduce), the run's record in the
ledger, the most an evaluation pass or a predict can cost, and the checkpoint kept on a stop."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def run_config(model: dict[str, Any], data: dict[str, Any], devices: int, **extra: Any) -> dict[str, Any]:
    """The ``config`` a run record shows: the model and data settings that say what it computes
    (``model``: the module's settings, as a checkpoint keeps them; ``data``: the data module's)."""
    lora, optim = model.get("lora") or {}, model.get("optim") or {}
    return {
        "model_name_or_path": built_model(model),
        "lora_rank": lora.get("rank"),
        "learning_rate": optim.get("learning_rate"),
        "context_length": data.get("context_length"),
        "batch_size": data.get("batch_size"),
        "devices": devices,
    } | extra


def trainer_details(trainer: L.Trainer, stage: str) -> dict[str, Any]:
    """What a Lightning run's record shows: its settings, validation loss and log folder."""
    module, data_hparams = trainer.lightning_module, getattr(trainer.datamodule, "hparams", {})
    val_loss = trainer.callback_metrics.get("val/loss")
    return {
        "config": run_config(dict(module.hparams), data_hparams, trainer.world_size),
        "val_loss": None if val_loss is None or stage not in ("fit", "validate") else float(val_loss),
        "log_dir": getattr(trainer.logger, "log_dir", None),  # not trainer.log_dir: a collective
    }


class RunRecord:
    """A run's record in the ledger: its id ``<name>/<stage>/version_<version>`` (a fit's
    ``<name>/version_<version>``; kept in checkpoints, so a resumed run continues its record), what
    it is and where it stands, and what the budget cut (said once, kept in the status). Every kind
    of run (fit, validate, test, predict, ``lit-llmtime forecast``) writes the same fields. Written
    by one process only (``writer``); a failure to write is a warning, as the others do not wait.

    Args:
        authority: the ledger's budget.
        run_name: the run's name (default: the one ``start`` is given).
        accounting: the FLOP model's accounting, recorded with the run.
    """

    def __init__(self, authority: Budget, run_name: str | None, accounting: Accounting) -> None:
        self.authority, self.run_name, self.accounting = authority, run_name, accounting
        self.run_id: str | None = None
        self.stage = "fit"
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.cut: str | None = None
        self.writer = True
        self.details: Callable[[], dict[str, Any]] = dict

    def start(self, name: str, stage: str, version: Any, details: Callable[[], dict[str, Any]], writer: bool = True):
        """Name the run unless a checkpoint already did; ``details()`` gives its ``config``,
        ``val_loss`` and ``log_dir`` whenever the record is written."""
        self.stage, self.details, self.writer = stage, details, writer
        if self.run_id is None:
            self.run_name = self.run_name or name
            where = f"{self.run_name}/{stage}" if stage != "fit" else self.run_name
            self.run_id = f"{where}/version_{version}"

    def start_trainer(self, trainer: L.Trainer, stage: str) -> None:
        """``start`` a Lightning run: named by its logger's name and version."""
        logger = trainer.logger
        version = logger.version if logger else self.started
        self.start(logger.name if logger else "run", stage, version, partial(trainer_details, trainer, stage),
                   trainer.is_global_zero)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "started": self.started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.stage == "fit":  # evaluating a checkpoint is a run of its own, not the training run
            self.run_id, self.started = state_dict["run_id"], state_dict.get("started", self.started)

    def refuse(self, what: str, cost: float) -> None:
        """Record that the budget refused ``what`` (which needs ``cost`` FLOPs) and raise
        ``BudgetExhausted`` (on every rank alike), in the one shape every refusal has."""
        error = self.authority.refusal(what, cost)
        self.cut = str(error)
        self.describe(f"refused: {self.cut}")
        raise error

    def describe(self, status: str) -> None:
        if not self.writer:
            return
        try:
            self._write(status)
        except (OSError, ValueError) as error:
            rank_zero_warn(f"FlopBudget: could not describe the run in the ledger: {error}")

    def _write(self, status: str) -> None:
        if self.cut is not None and not status.startswith(("refused", "shrunk")):
            status = f"{status} ({self.cut})"
        details = {"config": {}, "val_loss": None, "log_dir": None} | self.details()
        self.authority.ledger.update(
            self.run_id, name=self.run_name, stage=self.stage, status=status, accounting=self.accounting,
            started=self.started, **details,
        )  # fmt: skip


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
    if trainer.world_size > 1 and bounds:
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
            self.record.refuse(stage, bound)
        self.record.describe("running")

    def charge(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, forecast: bool = False) -> float:
        """Charge a batch on every device before it runs (a forward pass, or a forecast's bound); its cost."""
        local = self.flop_model.batch_forward(*batch["input_ids"].shape)
        if forecast:
            local = module.generation_shape(batch).flops(self.flop_model)
        (cost,) = self.shared.sum([local])
        stage = self.record.stage
        if not self.shared.charge(self.record.run_id, cost, stage if stage != "fit" else "validate"):
            self.record.refuse(f"a {stage} batch", cost)
        self.forecast_charged = cost
        return cost

    def refund_forecast(self, result) -> float:
        """Refund what a batch of validation forecasts (its ``ForecastResult``) did not generate; the refund."""
        (spent,) = self.shared.sum([result.shape.flops(self.flop_model, result.new_tokens)])
        unused = self.forecast_charged - spent
        self.shared.refund(self.record.run_id, unused, "validate")
        return unused


class GenerationGate:
    """Generation under the budget, for ``predict`` and ``lit-llmtime forecast`` alike: batches are
    charged at their longest before they run (the affordable first ones of those offered; none
    affordable: refused), what finished batches did not use is refunded when the run settles, and
    a batch that was running when a run failed stays charged at its bound (its work may be done)."""

    def __init__(self, shared: SharedBudget, record: RunRecord, flop_model: FlopModel) -> None:
        self.shared, self.record, self.flop_model = shared, record, flop_model
        self.charged = self.running = self.generated = 0.0

    def charge(self, bounds: list[float], what: str) -> int:
        """Charge the first of ``bounds`` (each batch's most, on every device) that the budget pays
        for; how many. None of them: refused (``what`` names the first batch)."""
        if not bounds:  # nothing to run (limit_predict_batches=0)
            return 0
        costs = list(itertools.accumulate(bounds))
        available = self.shared.authority.available
        affordable = int(self.shared.decide(lambda: sum(cost <= available() for cost in costs)))
        if affordable == 0 or not self.shared.charge(self.record.run_id, costs[affordable - 1], "generate"):
            self.record.refuse(what, bounds[0])
        self.charged += costs[affordable - 1]
        self.running += costs[affordable - 1]
        return affordable

    def finished(self, bound: float, flops: float) -> float:
        """A batch charged at ``bound`` finished, having cost ``flops`` on this device; its cost."""
        self.running -= bound
        self.generated += flops
        return flops

    def settle(self, failed: bool = False) -> float:
        """Refund what the finished batches did not use (after a failure, the running batch's
        bound stays charged; without one, everything not generated comes back); what was spent."""
        (spent,) = self.shared.sum([self.generated])
        kept = self.running if failed else 0.0
        self.shared.refund(self.record.run_id, self.charged - kept - spent, "generate")
        return spent + kept


@contextmanager
def settled(gate: GenerationGate) -> Iterator[GenerationGate]:
    """Generate through ``gate``, then settle it and describe the run: finished, or (when the block
    raises) refused or failed, with what was computed kept charged. A run's own error is the one
    raised: a failure to settle after it is only said."""
    try:
        yield gate
    except BaseException as error:
        refused = isinstance(error, BudgetExhausted)
        try:
            gate.settle(failed=True)
            gate.record.describe(f"refused: {error}" if refused else f"failed: {type(error).__name__}")
        except (OSError, ValueError) as failure:
            print(f"lit-llmtime: could not settle the run in the ledger: {failure}", file=sys.stderr)
        raise
    gate.settle()
    gate.record.describe("finished")


class PredictGate(GenerationGate):
    """``predict`` under the budget: only the batches it can pay for, all charged at their longest
    before any runs (``predict_bounds``; ``limit_predict_batches``, the Trainer's public limit, cuts
    the rest), the unused part refunded at the end."""

    def shrink(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        bounds = predict_bounds(trainer, module, self.flop_model)
        affordable = self.charge(bounds, "predict's first batch")
        if affordable < len(bounds):
            trainer.limit_predict_batches = affordable
            self.record.cut = f"forecasting {affordable} of {len(bounds)} batches (the budget pays for no more)"
            rank_zero_info(f"FlopBudget: {self.record.cut}")

    def generated_by(self, result) -> float:
        """What a batch's generation (its ``ForecastResult``) cost on this device."""
        bound = result.shape.flops(self.flop_model)
        return self.finished(bound, result.shape.flops(self.flop_model, result.new_tokens))


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
