"""One resolved run configuration: predicted FLOPs equal the ledger's, whatever the loop settings."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from lit_llmtime.app.cli import main
from lit_llmtime.app.run import resolve_run, run_identity
from lit_llmtime.budget.ledger import Ledger
from lit_llmtime.budget.plan import plan_evaluate, plan_fit, world_size
from lit_llmtime.data.simulate import simulate, write_h5
from lit_llmtime.model.configs import model_config
from lit_llmtime.text.tokenizers import CHARACTER_TOKENIZER

CONFIGS = Path(__file__).parents[2] / "configs"
FINAL = ["--config", str(CONFIGS / "qwen2.5-0.5b/default.yaml"), "--config", str(CONFIGS / "qwen2.5-0.5b/final.yaml")]


@pytest.fixture
def tiny_config(tmp_path, monkeypatch):
    """The quickstart config with a 16-wide model and a 40-trajectory data file, in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    write_h5("lv.h5", *simulate(n=40, seed=3))
    config = yaml.safe_load((Path(__file__).parents[1] / "tiny-qwen.yaml").read_text())
    config["model"]["model_config"] = model_config("tiny-chars")
    config["data"].update(
        data_path="lv.h5", tokenizer=CHARACTER_TOKENIZER, simulate_if_missing=False, val_size=6, test_size=4,
        context_length=64,
    )  # fmt: skip
    config["data"]["forecast_validation"] = {"trajectories": 0}  # their own test below
    config["trainer"].update(enable_progress_bar=False, enable_model_summary=False)
    config["flop_budget"]["ledger"] = "ledger.jsonl"
    Path("tiny.yaml").write_text(yaml.safe_dump(config))
    return ["--config", "tiny.yaml"]


def ledger_flops() -> float:
    (record,) = Ledger("ledger.jsonl").records()
    return record["flops"]


def test_flops_command_reads_overrides_and_equals_the_ledger(tiny_config, capsys):
    args = [*tiny_config, "--model.lora.rank", "16", "--trainer.max_steps=6", "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=2"]  # fmt: skip
    main(["flops", *args])
    printed = float(re.search(r"whole fit\s+(\S+)", capsys.readouterr().out).group(1))
    rank4 = plan_fit(resolve_run(["fit", *args[:2], "--trainer.max_steps=6", "--trainer.val_check_interval=3",
                                  "--trainer.limit_val_batches=2"]))  # fmt: skip
    main(["fit", *args])
    assert ledger_flops() == pytest.approx(printed, rel=1e-4)  # printed to 5 digits
    assert ledger_flops() == pytest.approx(plan_fit(resolve_run(["fit", *args])).flops, rel=1e-12)
    assert ledger_flops() > rank4.flops  # rank 16's adapters cost more than the YAML's rank 8


@pytest.mark.parametrize(
    "loop",
    [
        # 5 batches an epoch; 2 batches an optimizer step (the epoch's last batch steps alone)
        ["--trainer.accumulate_grad_batches=2", "--trainer.max_steps=4", "--trainer.val_check_interval=3"],
        ["--trainer.limit_val_batches=0.5", "--trainer.max_steps=4", "--trainer.val_check_interval=2"],
        ["--trainer.val_check_interval=0.5", "--trainer.check_val_every_n_epoch=1", "--trainer.max_epochs=2",
         "--trainer.max_steps=-1"],
        ["--trainer.check_val_every_n_epoch=2", "--trainer.val_check_interval=null", "--trainer.max_epochs=3",
         "--trainer.max_steps=-1"],
        ["--model.output_vocab=llmtime", "--trainer.max_steps=4", "--trainer.val_check_interval=2"],
    ],
    ids=["accumulate", "limit_val_share", "val_interval_share", "every_2_epochs", "llmtime_head"],
)  # fmt: skip
def test_predicted_fit_flops_equal_the_ledger(tiny_config, loop):
    args = ["fit", *tiny_config, "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=3", *loop]
    plan = plan_fit(resolve_run(args))
    main(args)
    assert plan.val_passes >= 1 and plan.train_batches >= 4
    assert ledger_flops() == pytest.approx(plan.flops, rel=1e-12)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_predicted_validate_and_test_flops_equal_the_ledger(tiny_config, capsys, stage):
    main(["fit", *tiny_config, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    limit = "--trainer.limit_val_batches=3" if stage == "validate" else "--trainer.limit_test_batches=0.5"
    args = [*tiny_config, limit, "--data.forecast_validation.trajectories=2", "--data.forecast_validation.horizon=2",
            "--model.forecast.max_integer_digits=1"]  # fmt: skip
    batches, planned = plan_evaluate(resolve_run([stage, *args]), stage)
    main(["flops", *args])
    assert f"{stage}, one pass".ljust(20) + f" {planned:.4e}  ({batches} batches a device" in capsys.readouterr().out
    main([stage, *args, "--ckpt_path=last"])
    record = next(r for r in Ledger("ledger.jsonl").records() if r["stage"] == stage)
    events = [json.loads(line) for line in Path("ledger.jsonl").read_text().splitlines()]
    charged = sum(
        e["flops"] for e in events if e["event"] == "charge" and e["run_id"] == record["run_id"] and e["flops"] > 0
    )
    assert charged == pytest.approx(planned, rel=1e-12)
    assert batches == (3 if stage == "validate" else 8)  # limit 3 of the validation batches; half of 16 test batches
    if stage == "test":  # no forecasts: nothing refunded
        assert record["flops"] == pytest.approx(planned, rel=1e-12)


def test_plan_counts_loop_settings_by_hand(tiny_config):
    windows = {"train": 100, "val": 23}  # 25 training batches of 4, 6 validation batches (the last of 3)
    base = ["fit", *tiny_config, "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=1.0"]
    every_10 = plan_fit(
        resolve_run([*base, "--trainer.max_steps=30", "--trainer.val_check_interval=10"]), None, windows
    )
    assert (every_10.train_batches, every_10.optimizer_steps, every_10.val_passes) == (30, 30, 3)
    accumulate = plan_fit(
        resolve_run([*base, "--trainer.max_steps=30", "--trainer.accumulate_grad_batches=4",
                     "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=2"]), None, windows
    )  # fmt: skip
    # 25 batches = 7 optimizer steps an epoch (6 of 4 batches, the last alone): 30 steps take 4 epochs and
    # 2 more steps (8 batches); validation at the end of epochs 2 and 4
    assert (accumulate.train_batches, accumulate.optimizer_steps, accumulate.val_passes) == (4 * 25 + 8, 30, 2)
    assert accumulate.val_batches == 2 * 6


def test_world_size_follows_lightning_device_settings():
    from jsonargparse import Namespace

    assert world_size(Namespace(devices=2, num_nodes=3, accelerator="cpu")) == 6
    assert world_size(Namespace(devices="auto", num_nodes=1, accelerator="cpu")) == 1
    assert world_size(Namespace(devices="0,1,3", num_nodes=1, accelerator="gpu")) == 3
    assert world_size(Namespace(devices=[0, 1], num_nodes=2, accelerator="gpu")) == 4


def test_resolved_config_has_typed_groups_and_identity_ignores_names():
    config = resolve_run(["fit", *FINAL, "--model.lora.alpha=16"])
    assert (config.model.lora.rank, config.model.lora.alpha, config.model.optim.learning_rate) == (8, 16.0, 1e-4)
    assert config.model.encoding == config.data.encoding  # linked, not repeated
    renamed = resolve_run(
        ["fit", *FINAL, "--model.lora.alpha=16",
         "--trainer.logger.init_args.name=other", "--flop_budget.run_name=other"]
    )  # fmt: skip
    assert run_identity(renamed) == run_identity(config)
    changed = resolve_run(["fit", *FINAL, "--data.encoding.decimals=3"])
    assert run_identity(changed) != run_identity(config)
    assert changed.model.encoding.decimals == 3


def test_sweep_dry_run_marks_the_context_twin_as_reused(tmp_path, monkeypatch, capsys):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    write_h5("data/lotka_volterra_data.h5", *simulate(n=1000, seed=0))
    main(["sweep", "--config", "configs/qwen2.5-0.5b/sweep.yaml", "--dry_run", "true"])
    out = capsys.readouterr().out
    reused = [line for line in out.splitlines() if "reused" in line]
    assert len(reused) == 1 and "-context-" in reused[0] and "context_length=512: same configuration as" in reused[0]
    assert "rank=8-learning_rate=5e-05" in reused[0]  # the costliest lora run, assumed best in a dry run
    planned = sum(float(x) for x in re.findall(r"would run \((\S+) FLOPs\)", out))
    assert f"cost {planned:.3e} FLOPs in all" in out
    assert len(re.findall(r": would run \(", out)) == 6 + 2  # the 512 twin is not counted


def test_predict_encodes_prompts_as_the_checkpoint_was_trained(tiny_config):
    main(["fit", *tiny_config, "--data.encoding.decimals=3", "--model.lora.rank=4", "--trainer.max_steps=2",
          "--trainer.limit_val_batches=1",
          "--trainer.val_check_interval=2"])  # fmt: skip
    from lit_llmtime.app.run import lightning_cli

    cli = lightning_cli(
        ["predict", *tiny_config, "--ckpt_path=last", "--data.predict_indices=[36]",
         "--model.forecast.horizon=3", "--model.forecast.reference_forecasters=[persistence]"]
    )  # fmt: skip
    assert cli.datamodule.encoding.decimals == 3 and cli.model.encoding.decimals == 3
    assert cli.model.lora.rank == 4  # `last` is resolved before the checkpoint's settings are read
    prompt = cli.datamodule.tokenizer.decode(cli.datamodule.datasets["predict"].token_ids[0])
    assert re.fullmatch(r"(\d+\.\d{3},\d+\.\d{3};){50}", prompt)
    from lit_llmtime.forecasting.evaluation import load_npz

    (written,) = Path("lightning_logs").rglob("predictions.npz")
    (text,) = load_npz(written)["texts"]
    assert re.fullmatch(r"(-?\d+\.\d{3},-?\d+\.\d{3};){3}", text)


def test_planned_generation_is_what_predict_charges_before_it_runs(tiny_config, capsys):
    from lit_llmtime.budget.plan import plan_predict

    args = [*tiny_config, "--data.predict_indices=[35, 36, 37]", "--data.predict_batch_size=2",
            "--model.forecast.horizon=4", "--model.forecast.reference_forecasters=[persistence]"]  # fmt: skip
    trajectories, bound = plan_predict(resolve_run(["predict", *args]))
    main(["flops", *args, "--trainer.max_steps=2"])
    assert f"predict, at most     {bound:.4e}  (3 trajectories, 4 steps each)" in capsys.readouterr().out
    main(["predict", *args])
    events = [json.loads(line) for line in Path("ledger.jsonl").read_text().splitlines()]
    charges = [e["flops"] for e in events if e.get("kind") == "generate"]
    assert trajectories == 3 and charges[0] == pytest.approx(bound, rel=1e-12)  # charged whole, before generating
    assert 0 < sum(charges) <= bound  # and what was not used came back (nothing, if every number was longest)


def test_static_cache_generation_is_planned_as_the_budget_charges_it(tiny_config):
    """``forecast.compile: on`` (as ``auto`` on CUDA): the plan and the budget's charge attend the
    whole preallocated cache, which the eager path's count does not."""
    from lit_llmtime.app.run import lightning_cli
    from lit_llmtime.budget.plan import plan_predict

    args = [*tiny_config, "--data.predict_indices=[35, 36, 37]", "--data.predict_batch_size=2",
            "--model.forecast.horizon=4", "--model.forecast.compile=on"]  # fmt: skip
    _, planned = plan_predict(resolve_run(["predict", *args]))
    cli = lightning_cli(["validate", *args, "--trainer.limit_val_batches=0"])  # builds the module; forecasts nothing
    cli.datamodule.setup("predict")
    flop_model = cli.model.flop_model("exact")
    shapes = [cli.model.generation_shape(batch) for batch in cli.datamodule.predict_dataloader()]
    assert all(shape.cache_tokens % 256 == 0 and shape.prompt_tokens % 64 == 0 for shape in shapes)
    assert planned == pytest.approx(sum(shape.flops(flop_model) for shape in shapes), rel=1e-12)
    eager = [cli.model.generation_shape(batch) for batch in cli.datamodule.predict_dataloader()]
    for shape in eager:
        shape.cache_tokens = None
    assert planned > sum(shape.flops(flop_model) for shape in eager)  # the whole cache costs more


def test_validation_forecasts_are_predicted_charged_before_they_run_and_refunded(tiny_config, capsys):
    args = [
        "fit",
        *tiny_config,
        "--trainer.limit_train_batches=5",
        "--trainer.limit_val_batches=3",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--data.forecast_validation.trajectories=2",
        "--data.forecast_validation.horizon=3",
        "--model.forecast.num_samples=2",
        "--model.forecast.temperature=10",
        "--model.forecast.max_integer_digits=10",
        "--model.forecast.horizon=2",
    ]  # fmt: skip  (predict's horizon: validation goes 3)
    plan = plan_fit(resolve_run(args))
    main(["flops", *args[1:]])
    assert f"of it, forecasts   {plan.val_forecast_flops:.4e}" in capsys.readouterr().out
    main(args)
    events = [json.loads(line) for line in Path("ledger.jsonl").read_text().splitlines()]
    charges = [e["flops"] for e in events if e.get("event") == "charge"]
    refunds = [-flops for flops in charges if flops < 0]
    # the sanity check and two validations forecast: each charged at its longest (10 integer digits a
    # number), and what the longest of its rows, sampled hot, did not write refunded
    assert plan.val_passes == 2 and plan.val_forecast_flops > 0 and len(refunds) == 3
    assert sum(flops for flops in charges if flops > 0) == pytest.approx(plan.flops, rel=1e-12)
    assert ledger_flops() == pytest.approx(plan.flops - sum(refunds), rel=1e-12)
    assert 0 < sum(refunds) < plan.val_forecast_flops
