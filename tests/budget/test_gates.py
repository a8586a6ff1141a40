"""The FLOP budget as a hard gate: crashes (kill -9, SIGTERM), concurrent runs, DDP through the real
entry point, the clean stop, refusing validate and shrinking predict, and the ledger's durability."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_llmtime.app.cli import main
from lit_llmtime.app.run import AtomicCheckpointIO
from lit_llmtime.budget.ledger import Budget, Ledger
from lit_llmtime.forecasting.evaluation import load_npz
from lit_llmtime.io import UMASK, write_text_atomic
from lit_llmtime.model.flops import FlopModel

CONFIGS = Path(__file__).parents[2] / "configs"


def spawn(args: list[str]) -> subprocess.Popen:
    """``lit-llmtime`` as a separate process (its own process group, so it can be killed whole)."""
    command = [str(Path(sys.executable).with_name("lit-llmtime")), *args]
    return subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_steps(steps: int, process: subprocess.Popen, ledger: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while sum(r["steps"] for r in Ledger(ledger).records()) < steps:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never got that far"
        time.sleep(0.02)


def checkpoint_step(path: str | Path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


@pytest.mark.processes
def test_kill_9_loses_no_paid_step_and_resume_continues_the_record(run):
    process = spawn(["fit", *run, "--trainer.max_steps=60"])
    wait_for_steps(8, process, run.ledger)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    (record,) = Ledger(run.ledger).records()
    saved = checkpoint_step(next(Path("checkpoints").rglob("last.ckpt")))
    charged = record["steps"]
    assert saved <= charged <= saved + 1  # charged before computing, checkpointed after: within one step
    assert record["flops"] == pytest.approx(charged * run.step_flops, rel=1e-12)

    main(["fit", *run, "--trainer.max_steps=60", "--ckpt_path=last"])
    (resumed,) = Ledger(run.ledger).records()  # the same record, continued
    recomputed = charged - saved  # the step that was paid for but not checkpointed ran twice
    assert resumed["run_id"] == record["run_id"] and resumed["steps"] == 60 + recomputed
    assert resumed["flops"] == pytest.approx((60 + recomputed) * run.step_flops, rel=1e-12)  # an uninterrupted run: 60
    assert resumed["status"] == "finished"


@pytest.mark.processes
def test_two_processes_on_one_ledger_never_pass_the_budget(run):
    k = 12
    budget = [f"--flop_budget.budget={k * run.step_flops * (1 + 1e-9)}", "--trainer.max_steps=100"]
    first = spawn(["fit", *run, *budget, "--trainer.logger.init_args.name=first"])
    second = spawn(["fit", *run, *budget, "--trainer.logger.init_args.name=second"])
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    records = Ledger(run.ledger).records()
    assert sorted(r["name"] for r in records) == ["first", "second"]
    assert sum(r["steps"] for r in records) == k  # together exactly the k steps the budget pays for
    assert Ledger(run.ledger).total() <= k * run.step_flops * (1 + 1e-9)
    assert all(r["status"].startswith("stopped: budget") for r in records)
    for line in Path(run.ledger).read_text().splitlines():  # every line whole
        json.loads(line)


CHARGE_UNITS = """
import os, sys
from lit_llmtime.budget.ledger import Budget
budget = Budget(sys.argv[1], 50.0)
print(sum(budget.charge(f"worker-{os.getpid()}", 1.0, "train", steps=1) for _ in range(40)))
"""


@pytest.mark.processes
def test_concurrent_charges_stop_exactly_at_the_budget(tmp_path):
    path = str(tmp_path / "ledger.jsonl")  # 4 processes (the ledger alone, no Lightning) ask for 40 units each
    workers = [subprocess.Popen([sys.executable, "-c", CHARGE_UNITS, path], stdout=subprocess.PIPE) for _ in range(4)]
    granted = sum(int(worker.communicate(timeout=60)[0]) for worker in workers)
    assert granted == 50 and Ledger(path).total() == 50.0  # 160 asked, 50 granted, none lost


@pytest.mark.processes
def test_reservations_of_dead_processes_are_reclaimed(tmp_path):
    path = tmp_path / "ledger.jsonl"
    reserve = "from lit_llmtime.budget.ledger import Budget; assert Budget({path!r}, 100.0).reserve({name!r}, 60.0)"
    subprocess.run([sys.executable, "-c", reserve.format(path=str(path), name="gone")], check=True)  # dies holding 60
    budget = Budget(path, 100.0)
    assert budget.available() == 100.0  # its reservation went with it
    alive = subprocess.Popen(
        [sys.executable, "-c", reserve.format(path=str(path), name="alive") + "; print(1, flush=True); import time; "
         "time.sleep(60)"], stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert alive.stdout.readline().strip() == b"1"  # it holds 60 now
        assert budget.available() == 40.0 and not budget.reserve("mine", 70.0)
        assert budget.reserve("mine", 30.0) and budget.available() == 40.0  # our own reservation is ours to spend
        assert not budget.charge("mine", 50.0, "train") and budget.charge("mine", 35.0, "train")
        assert budget.ledger.my_reservation()["flops"] == 0.0  # the charge was paid out of it
    finally:
        alive.kill()
        alive.wait()
    assert budget.available() == 65.0  # the killed process's 60 are free again
    # a reservation by a pid that now belongs to another process (it started at another time) is dead too
    ghost = {"event": "reserve", "run_id": "ghost", "flops": 50.0, "time": time.time(), "host": socket.gethostname(),
             "pid": os.getpid(), "start": -1}  # fmt: skip
    with budget.ledger.locked():
        budget.ledger.append(ghost)
    assert budget.available() == 65.0


def test_budget_stop_checkpoints_and_validates_the_last_step(run):
    # validation of 2 batches every 3 steps, after a 2-batch sanity check; one pass stays reserved
    budget = 2 * run.forward_flops + 7 * run.step_flops + 2 * 2 * run.forward_flops + 2 * run.forward_flops
    main(["fit", *run, "--trainer.max_steps=100", "--trainer.limit_val_batches=2", "--trainer.val_check_interval=3",
          "--trainer.num_sanity_val_steps=2", f"--flop_budget.budget={budget * (1 + 1e-9)}"])  # fmt: skip
    (record,) = Ledger(run.ledger).records()
    assert record["steps"] == 7 and record["status"].startswith("stopped: budget (stopped after step 7")
    assert record["flops"] == pytest.approx(budget, rel=1e-12) and record["flops"] <= budget * (1 + 1e-9)
    assert checkpoint_step(next(Path("checkpoints").rglob("last.ckpt"))) == 7
    events = EventAccumulator(record["log_dir"])
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [2, 5, 6]  # every 3 steps, then the last step
    assert record["val_loss"] == pytest.approx(events.Scalars("val/loss")[-1].value)


def test_validate_refuses_and_predict_shrinks_when_the_ledger_is_full(run, capsys):
    main(["fit", *run, "--trainer.max_steps=2"])
    spent = Ledger(run.ledger).total()
    with pytest.raises(SystemExit) as refused:
        main(
            [
                "validate",
                *run,
                "--ckpt_path=last",
                "--trainer.limit_val_batches=2",
                f"--flop_budget.budget={spent + run.forward_flops}",
            ]
        )
    assert "FLOP budget: validate needs" in str(refused.value)
    assert Ledger(run.ledger).total() == spent  # nothing ran, nothing charged

    # predict 5 trajectories in batches of 2 (3 batches); the budget pays for 2 at their longest
    bound = 2 * FlopModel(run.model_config, lora_rank=8).generation(prompt_length(run), 3 * 2 * 7, head_rows=14)
    budget = spent + 2.2 * bound  # batches of 2, 2 and 1: the third does not fit
    main(["predict", *run, "--ckpt_path=last", "--model.forecast.horizon=3", "--data.predict_batch_size=2",
          "--model.forecast.reference_forecasters=[persistence]", f"--flop_budget.budget={budget}"])  # fmt: skip
    assert "Forecasts of 4 trajectories" in capsys.readouterr().out  # 2 batches of 2
    (written,) = Path("lightning_logs").rglob("predictions.npz")
    assert np.load(written)["index"].tolist() == [34, 35, 36, 37]
    predict = next(r for r in Ledger(run.ledger).records() if r["stage"] == "predict")
    assert predict["status"] == "shrunk: forecasting 2 of 3 batches (the budget pays for no more)"
    assert spent < Ledger(run.ledger).total() <= budget


def prompt_length(run) -> int:
    """The longest prompt (tokens) of the run's predict set."""
    from lit_llmtime.data.module import SeriesDataModule

    config = yaml.safe_load(Path(run[1]).read_text())["data"]
    data = SeriesDataModule(**config)
    data.setup("predict")
    return max(len(ids) for ids in data.datasets["predict"].token_ids)


@pytest.mark.processes
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_the_last_step_exits_non_zero_and_resume_continues(run, signum, code):
    process = spawn(["fit", *run, "--trainer.max_steps=60"])
    wait_for_steps(6, process, run.ledger)
    os.killpg(process.pid, signum)  # Ctrl-C reaches the whole process group too
    assert process.wait(timeout=60) == code
    (record,) = Ledger(run.ledger).records()
    saved = checkpoint_step(next(Path("checkpoints").rglob("last.ckpt")))
    name = signal.Signals(signum).name
    assert record["status"] == f"stopped: {name}" and saved == record["steps"]  # every paid step kept
    assert process.stderr.read().decode().splitlines()[-1] == f"lit-llmtime: stopped by {name}; step {saved} saved"
    if signum == signal.SIGINT:
        return  # resuming is the same for both
    main(["fit", *run, "--trainer.max_steps=60", "--ckpt_path=last"])
    (resumed,) = Ledger(run.ledger).records()
    assert resumed["steps"] == 60 and resumed["flops"] == pytest.approx(60 * run.step_flops, rel=1e-12)


def test_ckpt_path_last_looks_where_this_run_saves(run, caplog):
    main(["fit", *run, "--trainer.max_steps=3"])  # an older run of the same name, in checkpoints/
    main(["fit", *run, "--trainer.max_steps=2", "--checkpoint.dirpath=elsewhere"])
    caplog.set_level("INFO")
    main(["fit", *run, "--trainer.max_steps=4", "--checkpoint.dirpath=elsewhere", "--ckpt_path=last"])
    assert "--ckpt_path last: resuming elsewhere/last.ckpt" in caplog.text
    assert sorted(p.name for p in Path("elsewhere").glob("last*")) == ["last.ckpt"]  # no last-v1.ckpt beside it
    assert checkpoint_step("elsewhere/last.ckpt") == 4
    assert checkpoint_step(next(Path("checkpoints").rglob("last.ckpt"))) == 3  # the other run is untouched


def rank_pid(process: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of a DDP run's rank ``rank`` (> 0): a process the launcher started with LOCAL_RANK set."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
            try:
                if f"LOCAL_RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                    return int(child)
            except OSError:
                continue  # a short-lived helper that has gone
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started")


@pytest.mark.processes
@pytest.mark.timeout(240)  # a hang must fail, not block CI
def test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step(run):
    process = spawn(["fit", *run, "--trainer.max_steps=200", "--trainer.devices=2", "--trainer.strategy=ddp",
                     "--trainer.accelerator=cpu"])  # fmt: skip
    rank1 = rank_pid(process, 1)
    wait_for_steps(3, process, run.ledger)
    os.kill(rank1, signal.SIGTERM)  # the rank that is not rank 0 (Lightning's handler hung them all); the
    # signal that reaches every rank (a scheduler's) is the same flag set on each: test_a_signal_checkpoints...
    assert process.wait(timeout=120) == 143, process.stderr.read().decode()[-3000:]
    (record,) = Ledger(run.ledger).records()
    saved = checkpoint_step(next(Path("checkpoints").rglob("last.ckpt")))
    assert record["status"] == "stopped: SIGTERM" and saved == record["steps"] < 200
    assert record["flops"] == pytest.approx(saved * 2 * run.step_flops, rel=1e-12)  # both ranks stopped at one batch


@pytest.mark.processes
def test_ddp_through_the_entry_point_validates_charges_the_global_count_once_and_predicts(run):
    process = spawn(["fit", *run, "--trainer.max_steps=3", "--trainer.devices=2", "--trainer.strategy=ddp",
                     "--trainer.accelerator=cpu", "--trainer.limit_val_batches=2",
                     "--trainer.val_check_interval=3"])  # fmt: skip
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-3000:]
    (record,) = Ledger(run.ledger).records()
    assert record["config"]["devices"] == 2 and record["steps"] == 3
    # both ranks' batches, counted once: 3 training steps and one validation pass of 2 batches per rank
    assert record["flops"] == pytest.approx(3 * 2 * run.step_flops + 2 * 2 * run.forward_flops, rel=1e-12)
    assert checkpoint_step(next(Path("checkpoints").rglob("last.ckpt"))) == 3
    events = EventAccumulator(record["log_dir"])
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [2] and events.Scalars("val/loss")[0].value == pytest.approx(
        record["val_loss"]
    )
    # predict on the same two processes: the sampler's padding duplicate dropped, the ranks' files merged once
    process = spawn(["predict", *run, "--ckpt_path=last", "--trainer.devices=2", "--trainer.strategy=ddp",
                     "--trainer.accelerator=cpu", "--model.forecast.horizon=3",
                     "--model.forecast.reference_forecasters=[persistence]"])  # fmt: skip
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-3000:]
    (written_path,) = Path("lightning_logs").rglob("predictions.npz")
    assert load_npz(written_path)["index"].tolist() == [34, 35, 36, 37, 38] and not list(
        written_path.parent.glob("rank*")
    )
    predict = next(r for r in Ledger(run.ledger).records() if r["stage"] == "predict")
    assert predict["status"] == "finished" and predict["config"]["devices"] == 2 and predict["flops"] > 0


def test_written_files_keep_normal_permissions(tmp_path):
    text = write_text_atomic(tmp_path / "a.txt", "x")
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, tmp_path / "c.ckpt")
    for path in (text, tmp_path / "c.ckpt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
