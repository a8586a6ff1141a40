"""The FLOP budget: exact stops, resume without double counting, DDP, the ledger and its table."""

import json
import threading
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_llmtime.app.cli import main
from lit_llmtime.budget.callback import FlopBudget
from lit_llmtime.budget.gates import SharedBudget
from lit_llmtime.budget.ledger import Budget, Ledger, LedgerError
from lit_llmtime.config import ForecastValidationArgs, LoRAArgs, OptimArgs
from lit_llmtime.data.module import SeriesDataModule
from lit_llmtime.model.configs import model_config
from lit_llmtime.text.tokenizers import CHARACTER_TOKENIZER
from lit_llmtime.training.module import LLMTimeLoRA

CONTEXT, BATCH = 32, 2  # the tiny module's windows


def make(data_path):
    """The conftest's tiny model (16-token character vocabulary) with rank-2 adapters, and its data."""
    model = LLMTimeLoRA(model_config=model_config("tiny-chars"), tokenizer=CHARACTER_TOKENIZER, lora=LoRAArgs(rank=2),
                        optim=OptimArgs(learning_rate=1e-3))  # fmt: skip
    data = SeriesDataModule(
        data_path=str(data_path), tokenizer=CHARACTER_TOKENIZER, context_length=CONTEXT, batch_size=BATCH,
        val_size=4, test_size=4, forecast_validation=ForecastValidationArgs(trajectories=0),
    )  # fmt: skip
    return model, data


def step_cost(model, devices=1):
    return devices * model.flop_model().train_step(BATCH, CONTEXT)


def trainer(tmp_path, budget_callback, max_steps=100, more_callbacks=(), **kwargs):
    kwargs = {"devices": 1, "limit_val_batches": 0, "enable_checkpointing": False, "logger": False} | kwargs
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=max_steps, callbacks=[budget_callback, *more_callbacks],
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("slack", [0.0, 0.5, -1.0])
def test_budget_for_k_steps_stops_after_exactly_k(tmp_path, small_h5, slack):
    model, data = make(small_h5)
    cost = step_cost(model)
    k = 3 if slack >= 0 else 2  # a budget one FLOP short of 3 steps allows only 2
    budget = FlopBudget(
        budget=3 * cost + slack * cost if slack >= 0 else 3 * cost - 1, ledger=str(tmp_path / "l.jsonl")
    )
    fit = trainer(tmp_path, budget)
    fit.fit(model, data)
    assert fit.global_step == k
    assert budget.run_flops == k * cost <= budget.budget and budget.stopped_for_budget
    record = Ledger(tmp_path / "l.jsonl").get(budget.run_id)
    assert (record["steps"], record["flops"]) == (k, k * cost)
    assert record["status"].startswith(f"stopped: budget (stopped after step {k}")


def test_validation_and_logging_are_counted(tmp_path, small_h5):
    from lightning.pytorch.loggers import CSVLogger

    model, data = make(small_h5)
    budget = FlopBudget(budget=1e15, ledger=str(tmp_path / "l.jsonl"))
    fit = trainer(tmp_path, budget, max_steps=4, limit_val_batches=2, val_check_interval=4, num_sanity_val_steps=0,
                  logger=CSVLogger(tmp_path), log_every_n_steps=1)  # fmt: skip
    fit.fit(model, data)
    forward = model.flop_model().batch_forward(BATCH, CONTEXT)
    assert budget.run_flops == 4 * step_cost(model) + 2 * forward
    assert fit.callback_metrics["flops/total"].item() == pytest.approx(budget.run_flops)
    assert fit.callback_metrics["flops/budget_used"].item() == pytest.approx(budget.run_flops / 1e15)


def test_resume_does_not_double_count(tmp_path, small_h5):
    ledger_path = str(tmp_path / "l.jsonl")
    model, data = make(small_h5)
    cost = step_cost(model)
    first = FlopBudget(budget=1e15, ledger=ledger_path)
    fit = trainer(tmp_path, first, max_steps=3)
    fit.fit(model, data)
    fit.save_checkpoint(tmp_path / "step3.ckpt")
    run_id = first.run_id
    # resume to 5 steps: the run's record grows to 5 steps, it is not 3 + 5
    model, data = make(small_h5)
    resumed = FlopBudget(budget=1e15, ledger=ledger_path)
    trainer(tmp_path, resumed, max_steps=5).fit(model, data, ckpt_path=tmp_path / "step3.ckpt")
    assert resumed.run_id == run_id
    assert Ledger(ledger_path).get(run_id)["flops"] == 5 * cost
    # a run killed after its checkpoint has spent more than the checkpoint says: the ledger keeps
    # that, and resuming from the older checkpoint adds only the new steps
    model, data = make(small_h5)
    again = FlopBudget(budget=1e15, ledger=ledger_path)
    trainer(tmp_path, again, max_steps=4).fit(model, data, ckpt_path=tmp_path / "step3.ckpt")
    assert Ledger(ledger_path).get(run_id)["flops"] == 5 * cost + 1 * cost
    assert len(Ledger(ledger_path).records()) == 1


def test_other_runs_in_the_ledger_share_the_budget(tmp_path, small_h5):
    ledger = Ledger(tmp_path / "l.jsonl")
    model, data = make(small_h5)
    cost = step_cost(model)
    assert Budget(ledger, 1e30).charge("earlier", 10 * cost, "train", steps=10)
    budget = FlopBudget(budget=12 * cost, ledger=str(ledger.path))
    fit = trainer(tmp_path, budget)
    fit.fit(model, data)
    assert fit.global_step == 2 and ledger.total() == 12 * cost


@pytest.mark.processes
def test_ddp_two_processes_stop_on_the_same_global_step(tmp_path, small_h5):
    model, data = make(small_h5)
    cost = step_cost(model, devices=2)  # both ranks' batches count
    ledger_path = tmp_path / "l.jsonl"
    budget = FlopBudget(budget=3 * cost, ledger=str(ledger_path))
    fit = trainer(tmp_path, budget, devices=2, strategy="ddp_spawn", enable_checkpointing=True)
    fit.fit(model, data)
    records = Ledger(ledger_path).records()
    assert len(records) == 1
    assert (records[0]["steps"], records[0]["flops"], records[0]["config"]["devices"]) == (3, 3 * cost, 2)
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert checkpoint["global_step"] == 3


def test_cli_refuses_a_run_when_the_ledger_is_spent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Budget("lightning_logs/quickstart/flop_ledger.jsonl", 1e17).charge("big", 1e17 - 1e6, "train")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(Path(__file__).parents[2] / "configs/quickstart.yaml")])
    assert "FLOP budget: one training step of this run needs" in str(exit_info.value)
    assert "; 1.000e+06 of 1.000e+17 left (ledger lightning_logs/quickstart/flop_ledger.jsonl)" in str(exit_info.value)
    assert not (tmp_path / "data").exists()  # refused before the data or model were touched


def test_ledger_table_sums_match_records(tmp_path, capsys):
    ledger = Ledger(tmp_path / "l.jsonl")
    for i, flops in enumerate([1e15, 2.5e15, 4e14]):
        Budget(ledger, 1e17).charge(f"r{i}", flops, "train", steps=10 * i)
        ledger.update(f"r{i}", name=f"run {i}", stage="fit")
    Budget(ledger, 1e17).charge("r1", 0.5e15, "validate")  # charges add up per run
    assert ledger.total() == 1e15 + 3e15 + 4e14
    main(["ledger", "--path", str(ledger.path), "--budget", "1e17"])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| run")]
    assert len(rows) == 3 and "| run 1 | fit |  | 10 | 3.000e+15 | 3.0000% |" in table
    assert "| **Total used** | | | | 4.400e+15 | **4.4000%** |" in table
    assert "| **Remaining** | | | | 9.560e+16 | **95.6000%** |" in table


def test_bad_ledger_is_a_clear_error(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps({"run_id": "a", "flops": 1}) + "\n{oops\n")
    with pytest.raises(LedgerError, match=r"l.jsonl, line 2: not a ledger record"):
        Ledger(path).total()


def test_flops_command_predicts_the_report_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).parents[2] / "configs"
    final = [
        "--config",
        str(configs / "qwen2.5-0.5b/default.yaml"),
        "--config",
        str(configs / "qwen2.5-0.5b/final.yaml"),
    ]
    main(["flops", *final, "--accounting", "coursework"])
    out = capsys.readouterr().out
    assert "6000 training steps   6.2243e+16  (62.2434% of the budget" in out  # the report: 6.23e16, 62.25%
    assert "validation and epoch ends not predicted" in out  # no data file here


@pytest.mark.parametrize("promise", [{"min_steps": 10}, {"min_epochs": 2}])
def test_min_steps_or_epochs_under_a_budget_are_refused_before_anything_runs(tmp_path, small_h5, promise):
    model, data = make(small_h5)  # a spent budget must be able to stop training; Lightning would defer it
    budget = FlopBudget(budget=3 * step_cost(model), ledger=str(tmp_path / "l.jsonl"))
    name, value = next(iter(promise.items()))
    with pytest.raises(ValueError, match=f"trainer {name}={value} cannot be promised under a FLOP budget"):
        trainer(tmp_path, budget, **promise).fit(model, data)
    assert Ledger(tmp_path / "l.jsonl").records() == [] and budget.run_id is None


def two_ranks(ranks: list[SharedBudget], work):
    """Run ``work(shared)`` on two simulated ranks at once (their ``SharedBudget``s, whose
    all-reduce becomes a thread barrier); each rank's answer or the exception it raised."""
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def reduce(rank, values):
        slots[rank] = values
        barrier.wait()
        summed = [a + b for a, b in zip(*slots, strict=True)]
        barrier.wait()  # both have read the slots
        return summed

    def run(rank, shared):
        try:
            results[rank] = work(shared)
        except Exception as error:  # noqa: BLE001 (the test looks at it)
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank, shared)) for rank, shared in enumerate(ranks)]
    for rank, shared in enumerate(ranks):
        shared.reduce = lambda values, rank=rank: reduce(rank, values)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    return results


def test_shared_budget_asks_the_ledger_on_rank_zero_only_and_every_rank_follows(tmp_path):
    ledger_path = tmp_path / "l.jsonl"
    asked = []

    class Counting(Budget):
        def available(self):
            asked.append(1)
            return super().available()

    ranks = [SharedBudget(Counting(ledger_path, 10.0), is_zero=True), SharedBudget(Counting(ledger_path, 10.0), False)]

    def charge(shared):
        return shared.sum([3.0])[0], shared.charge("run", 4.0, "train"), shared.charge("run", 7.0, "train")

    assert two_ranks(ranks, charge) == [(6.0, True, False), (6.0, True, False)]  # 3 + 3; 4 fits, then 7 does not
    assert Ledger(ledger_path).total() == 4.0 and len(asked) == 2  # charged once, asked on rank 0 alone

    def broken(shared):
        return shared.decide(lambda: (_ for _ in ()).throw(OSError("disk full")))

    zero, one = two_ranks(ranks, broken)
    assert isinstance(zero, OSError) and str(zero) == "disk full"
    assert isinstance(one, RuntimeError) and "rank 0 could not use the ledger" in str(one)  # nobody waits for ever


class StopAtStep(L.Callback):
    """What EarlyStopping does: asks to stop, which Lightning defers until min_steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= 2:
            trainer.should_stop = True


@pytest.mark.timeout(60)  # the failure was an endless loop of empty epochs
def test_without_a_budget_a_stop_deferred_by_min_steps_trains_on(tmp_path, small_h5):
    model, data = make(small_h5)  # the module skips only the batches the budget refused
    fit = trainer(tmp_path, StopAtStep(), min_steps=5, limit_train_batches=4, logger=False)
    fit.fit(model, data)
    assert fit.global_step == 5
