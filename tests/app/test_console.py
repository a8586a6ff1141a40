"""What a newcomer sees: FLOPs by the budget's FLOP model, steps of max_steps, no noise."""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from lit_llmtime.app.cli import main
from lit_llmtime.app.console import StepProgressBar


def test_the_console_counts_flops_and_steps_and_stays_quiet(run, caplog, capfd):
    caplog.set_level("INFO")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", *run, "--trainer.max_steps=3", "--trainer.enable_model_summary=true"])
        main(["predict", *run, "--ckpt_path=last", "--model.forecast.horizon=2",
              "--model.forecast.reference_forecasters=[persistence]"])  # fmt: skip
    step = run.step_flops
    assert f"FLOPs per training step (the budget's FLOP model, all devices): {step:.4e}" in caplog.text
    said = caplog.text + capfd.readouterr().err + "\n".join(str(w.message) for w in caught)
    noises = ("Total FLOPs", "in eval mode", "The dirpath has changed", "Tip: For seamless", "LeafSpec", "Be aware")
    for noise in noises:
        assert noise not in said


def test_the_progress_bar_reads_steps_not_epochs_of_minus_one(monkeypatch):
    assert callable(RichProgressBar._get_train_description)  # the private method overridden: renamed, this fails
    monkeypatch.setattr(ProgressBar, "get_metrics", lambda self, trainer, module: {"v_num": 0, "train/loss": 1.5})

    class Trainer:  # a max_steps run, as Lightning 2.6 sets it up
        max_epochs, max_steps, global_step, training = -1, 150, 40, True

    bar = StepProgressBar()
    bar._trainer = Trainer()
    assert bar._get_train_description(0).strip() == "Epoch 0"  # Lightning's: "Epoch 0/-2"
    assert bar.get_metrics(Trainer(), None) == {"step": "40/150", "train/loss": 1.5}
