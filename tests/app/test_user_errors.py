"""A user's mistake ends in one line that names the file or value, leaves the ledger's bytes as
they were and writes nothing half-done (through ``lit-llmtime``'s entry point, tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from lit_llmtime.app.cli import main
from lit_llmtime.budget.ledger import Ledger


def fails(args: list[str]) -> str:
    """The one line ``lit-llmtime ARGS`` exits with."""
    with pytest.raises(SystemExit) as failed:
        main(args)
    (line,) = str(failed.value).splitlines()
    return line


@pytest.fixture
def trained(run):
    """The tiny run after a 2-step fit: its arguments and checkpoint."""
    main(["fit", *run, "--trainer.max_steps=2"])
    return run, next(Path("checkpoints").rglob("last.ckpt"))


def test_mistakes_with_a_checkpoint_are_one_line_and_spend_nothing(trained, caplog):
    run, checkpoint = trained
    before = Path(run.ledger).read_bytes()
    Path("cut.ckpt").write_bytes(checkpoint.read_bytes()[:5000])
    assert fails(["validate", *run, "--ckpt_path=cut.ckpt"]).startswith(
        "lit-llmtime: error: cut.ckpt: not a readable checkpoint, truncated or not a checkpoint ("
    )
    assert fails(["validate", *run, f"--ckpt_path={checkpoint}", "--model.lora.rank=4"]) == (
        f"lit-llmtime: error: {checkpoint} was trained with model.lora.rank=8, but this run sets 4: "
        "its weights need 8 (set that, or leave --model.lora.rank out)"
    )
    assert fails(["fit", *run, f"--ckpt_path={checkpoint}", "--model.output_vocab=llmtime"]).endswith(
        "was trained with model.output_vocab='full', but this run sets 'llmtime': its weights need 'full' "
        "(set that, or leave --model.output_vocab out)"
    )
    assert fails(["predict", *run, "--data.predict_indices=[]"]) == (
        "lit-llmtime: error: data.predict_indices is empty: name at least one trajectory, or leave it out"
    )
    assert Path(run.ledger).read_bytes() == before
    # A setting that says how to run the weights, not what they are: the user's wins, in one line.
    caplog.set_level("INFO")
    main(["validate", *run, f"--ckpt_path={checkpoint}", "--model.optim.learning_rate=0.5"])
    assert f"{checkpoint}: trained with model.optim.learning_rate=0.02; using 0.5 as set" in caplog.text


def test_a_run_that_fails_before_setup_leaves_no_record_and_no_folder(run):
    assert fails(["fit", *run, "--data.data_path=missing.h5"]).startswith("lit-llmtime: error: missing.h5: data file")
    assert not Path(run.ledger).exists() and list(Path("lightning_logs").iterdir()) == []  # no empty version_0


def test_negative_populations_are_refused_with_their_sample_and_step(run):
    with h5py.File("lv.h5", "r+") as f:
        trajectories = f["trajectories"][()]
        trajectories[7, 12, 1] = -0.25
        f["trajectories"][...] = trajectories
    assert fails(["fit", *run]) == (
        "lit-llmtime: error: lv.h5: trajectory 7, step 12, variable 1 is -0.25: populations cannot be negative "
        "(the LLMTIME grammar and the Lotka-Volterra reference assume >= 0)"
    )


def test_fit_does_not_need_a_forecast_setting_that_only_forecasting_uses(run):
    main(["fit", *run, "--trainer.max_steps=1", "--data.encoding.prompt_steps=100"])  # trajectories of 100 steps
    (record,) = Ledger(run.ledger).records()
    assert record["status"] == "finished" and record["steps"] == 1
    built = "random Qwen2 (hidden_size=16, num_hidden_layers=1, vocab_size=16, init_seed=0)"
    assert record["config"]["model_name_or_path"] == built  # not the Hub id it was not loaded from
    assert fails(["predict", *run, "--data.encoding.prompt_steps=100", "--ckpt_path=last"]) == (
        "lit-llmtime: error: lv.h5: encoding.prompt_steps=100 leaves nothing to forecast in trajectories of 100 steps"
    )


def test_a_refund_larger_than_the_charges_stops_a_run_with_its_line(run):
    Path(run.ledger).write_text(json.dumps({"event": "charge", "run_id": "x", "kind": "predict", "flops": -1e9}) + "\n")
    assert fails(["fit", *run]).startswith("lit-llmtime: error: ledger.jsonl, line 1: not a ledger record (a refund")
    assert not Path("checkpoints").exists()  # the run never started


def test_resolving_a_run_leaves_this_process_unseeded(run):
    """``lit-llmtime flops`` and the sweep resolve runs through LightningCLI, which seeds; without
    overriding its private ``_set_seed``, the random state is kept around it instead."""
    import random

    import numpy as np
    import torch

    from lit_llmtime.app.run import resolve_run

    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    config = resolve_run(["fit", *run, "--seed_everything=7"])
    assert config.seed_everything == 7
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
