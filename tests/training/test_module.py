"""End to end through the real entry point: fit, resume, validate, DDP and config errors."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_llmtime.app.cli import lightning_cli, main
from lit_llmtime.text.tokenizers import CHARACTER_TOKENIZER

CONFIG = str(Path(__file__).parents[1] / "tiny-qwen.yaml")


def quick_args(data_path, *extra):
    """The quickstart config, shrunk to seconds: 48 short windows per epoch, few steps, on the
    character tokenizer (16 output rows instead of 151,936: token ids do not matter here)."""
    return [
        "--config", CONFIG, f"--data.tokenizer={CHARACTER_TOKENIZER}", "--model.model_config.vocab_size=16",
        f"--data.data_path={data_path}", "--data.simulate_n=40", "--data.val_size=6", "--data.test_size=4",
        "--data.context_length=64", "--trainer.limit_val_batches=3", "--trainer.log_every_n_steps=1",
        "--data.forecast_validation.trajectories=3", "--data.forecast_validation.horizon=4",
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


def test_fit_logs_validation_forecasts_from_step_0(fitted):
    root, _ = fitted
    log_dir = root / "lightning_logs" / "quickstart" / "version_0"
    for species in ("prey", "predator"):
        for name in ("mae", "mase", "r2", "mse"):
            assert [step for step, _ in scalars(log_dir, f"val/forecast/{name}_{species}")] == [0, 14, 29]
    assert [value for _, value in scalars(log_dir, "val/forecast/valid_share")] == [1.0, 1.0, 1.0]
    mase = {step: value for step, value in scalars(log_dir, "val/forecast/mase")}
    for step, value in mase.items():
        by_species = [dict(scalars(log_dir, f"val/forecast/mase_{s}"))[step] for s in ("prey", "predator")]
        assert value == pytest.approx(sum(by_species) / 2, rel=1e-5)  # each trajectory's mean, averaged
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [image.step for image in events.Images("val/forecast")] == [0, 15, 30]  # after 0, 15, 30 steps


def test_validate_forecasts_as_the_forecaster_does(fitted, monkeypatch):
    import numpy as np

    from lit_llmtime.forecasting.metrics import score
    from lit_llmtime.forecasting.references import reference_forecast

    root, _ = fitted
    monkeypatch.chdir(root)
    last = "checkpoints/quickstart/version_0/last.ckpt"
    cli = lightning_cli(["validate", *quick_args("data/lv.h5"), f"--ckpt_path={last}"])
    _, prompts = cli.datamodule.val_dataloader()
    result = cli.model.forecaster(next(iter(prompts)), horizon=4)  # greedy: the very forecasts validate made
    assert list(result.index) == list(cli.datamodule.splits["val"][:3]) and result.forecast.shape == (3, 4, 2)
    rows = list(zip(result.truth, result.forecast, result.prompt, strict=True))
    for species in ("prey", "predator"):
        for name in ("mae", "mase", "r2"):
            expected = np.nanmean([score(t, f, p, variables=result.variables)[species][name] for t, f, p in rows])
            logged = cli.trainer.callback_metrics[f"val/forecast/{name}_{species}"].item()
            assert logged == pytest.approx(expected, rel=1e-5)
    for k, species in enumerate(("prey", "predator")):  # the references beside it, on the same series and steps
        persistence = np.abs(result.prompt[:, -1:, k] - result.truth[:, :, k]).mean()
        logged = cli.trainer.callback_metrics[f"val/reference/persistence/mae_{species}"].item()
        assert logged == pytest.approx(persistence, rel=1e-5)
        var = np.abs(reference_forecast("log_var", result.prompt, result.time, 4)[..., k] - result.truth[..., k])
        assert cli.trainer.callback_metrics[f"val/reference/log_var/mae_{species}"].item() == pytest.approx(var.mean())
    sampled = lightning_cli(
        ["validate", *quick_args("data/lv.h5"), f"--ckpt_path={last}", "--model.forecast.num_samples=3"]
    )
    metrics = sampled.trainer.callback_metrics
    assert all(metrics[f"val/forecast/{name}_{s}"].item() > 0 for name in ("crps", "wql") for s in ("prey", "predator"))


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


def test_best_checkpoint_by_forecast_skill(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = quick_args("data/lv.h5", "--trainer.max_steps=12", "--trainer.val_check_interval=3",
                      "--checkpoint.monitor=val/forecast/mase", "--checkpoint.mode=min")  # fmt: skip
    lightning_cli(["fit", *args])
    mase = scalars(tmp_path / "lightning_logs" / "quickstart" / "version_0", "val/forecast/mase")[1:]  # not step 0
    best_step = min(mase, key=lambda pair: pair[1])[0] + 1  # logged at the step index, saved after it
    cli = lightning_cli(["validate", *args, "--ckpt_path=best"])
    assert torch.load(cli.config.validate.ckpt_path, weights_only=True)["global_step"] == best_step
    assert cli.trainer.callback_metrics["val/forecast/mase"].item() == pytest.approx(min(v for _, v in mase), rel=1e-5)
