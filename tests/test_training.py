"""End to end through the real entry point: fit, resume, validate, DDP and config errors."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_llmtime.cli import lightning_cli, main

CONFIG = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")


def quick_args(data_path, *extra):
    """The quickstart config, shrunk to seconds: 48 short windows per epoch, few steps."""
    return [
        "--config", CONFIG,
        f"--data.data_path={data_path}", "--data.simulate_n=40", "--data.val_size=6", "--data.test_size=4",
        "--data.context_length=64", "--trainer.limit_val_batches=3", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra,
    ]  # fmt: skip


def scalars(log_dir, tag):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One 30-step fit in a scratch folder, shared by the checks below."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cli = lightning_cli(
            ["fit", *quick_args("data/lv.h5", "--trainer.max_steps=30", "--trainer.val_check_interval=15")]
        )
    return root, cli


def test_fit_lowers_the_loss_and_logs_to_tensorboard(fitted):
    root, cli = fitted
    log_dir = root / "lightning_logs" / "quickstart" / "version_0"
    assert list(log_dir.glob("events.out.tfevents.*")) and (log_dir / "config.yaml").is_file()
    losses = [value for _, value in scalars(log_dir, "train/loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    val = scalars(log_dir, "val/loss")
    assert [step for step, _ in val] == [14, 29]
    assert val[1][1] < val[0][1]
    assert scalars(log_dir, "hp_metric")[-1][1] == pytest.approx(val[1][1])
    assert scalars(log_dir, "val/perplexity")[-1][1] == pytest.approx(torch.tensor(val[1][1]).exp().item(), rel=1e-5)
    assert (
        scalars(log_dir, "model/trainable_parameters")[0][1]
        == cli.model.trainable_parameters
        == 2
        * (
            8 * 64 + 64 * 8 + 8 * 64 + 32 * 8  # two layers of q (A 8x64, B 64x8) and v (A 8x64, B 32x8)
        )
    )
    assert scalars(log_dir, "lr-Adam")[0][1] == pytest.approx(0.02)


def test_checkpoint_holds_only_the_adapter(fitted):
    root, cli = fitted
    last = root / "checkpoints" / "quickstart" / "version_0" / "last.ckpt"
    assert last.stat().st_size < 200_000  # the whole tiny model would be ~40 MB
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 30
    assert set(checkpoint["state_dict"]) == {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert all("lora_" in name for name in checkpoint["state_dict"])


def test_validate_reloads_the_adapter_and_reproduces_the_val_loss(fitted, monkeypatch):
    root, _ = fitted
    monkeypatch.chdir(root)
    last = "checkpoints/quickstart/version_0/last.ckpt"
    cli = lightning_cli(["validate", *quick_args("data/lv.h5"), f"--ckpt_path={last}"])
    end_of_fit = scalars(root / "lightning_logs" / "quickstart" / "version_0", "val/loss")[-1][1]
    assert cli.trainer.callback_metrics["val/loss"].item() == pytest.approx(end_of_fit, rel=1e-5)
    untrained = lightning_cli(["validate", *quick_args("data/lv.h5")])
    assert untrained.trainer.callback_metrics["val/loss"].item() > end_of_fit + 0.1


def test_resume_continues_at_the_right_step(fitted, monkeypatch):
    root, _ = fitted
    monkeypatch.chdir(root)
    last = "checkpoints/quickstart/version_0/last.ckpt"
    cli = lightning_cli(
        [
            "fit",
            *quick_args("data/lv.h5", "--trainer.max_steps=34", "--trainer.val_check_interval=15"),
            f"--ckpt_path={last}",
        ]
    )
    assert cli.trainer.global_step == 34
    log_dir = Path(cli.trainer.logger.log_dir)
    assert [step for step, _ in scalars(log_dir, "train/loss")] == [30, 31, 32, 33]
    resumed = torch.load(root / "checkpoints" / "quickstart" / log_dir.name / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 34


def test_ddp_spawn_on_two_cpu_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = quick_args("data/lv.h5", "--trainer.max_steps=4", "--trainer.val_check_interval=4")
    cli = lightning_cli(["fit", *args, "--trainer.devices=2", "--trainer.strategy=ddp_spawn"])
    assert cli.trainer.world_size == 2
    checkpoint = torch.load(tmp_path / "checkpoints" / "quickstart" / "version_0" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert len(scalars(tmp_path / "lightning_logs" / "quickstart" / "version_0", "val/loss")) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.lora.targets=[q_proj, qkv_proj]"], "LoRA targets ['qkv_proj'] match no linear layer"),
        (["--data.context_length=5"], "context_length=5 is shorter than one time step"),
        (["--data.simulate_if_missing=false"], "absent.h5: data file not found"),
    ],
)
def test_wrong_configs_stop_before_training(tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *quick_args("absent.h5", *extra)])
    assert message in str(exit_info.value)
    assert not (tmp_path / "checkpoints").exists()
