"""Shared fixtures: the real Qwen2.5 tokenizer (offline), small simulated data files, and the
arguments of a tiny ``lit-llmtime`` run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_llmtime.data.simulate import simulate, write_h5
from lit_llmtime.model.configs import model_config
from lit_llmtime.model.flops import FlopModel
from lit_llmtime.text.tokenizers import CHARACTER_TOKENIZER, OFFLINE_TOKENIZER, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(OFFLINE_TOKENIZER)


@pytest.fixture(scope="session")
def small_h5(tmp_path_factory):
    """40 simulated trajectories of 100 steps, in the coursework layout."""
    path = tmp_path_factory.mktemp("data") / "lv_small.h5"
    return write_h5(path, *simulate(n=40, steps=100, seed=1))


class TinyRun(list):
    """``lit-llmtime`` arguments of a tiny run, with what its tests need to know about it."""

    ledger, context, batch, lora_rank = "ledger.jsonl", 32, 2, 8
    model_config = model_config("tiny-chars")

    @property
    def forward_flops(self) -> float:
        """One validation batch of the tiny run."""
        return self.batch * FlopModel(self.model_config, lora_rank=self.lora_rank).forward(self.context)

    @property
    def step_flops(self) -> float:
        """One training batch of the tiny run (forward and backward)."""
        return 3 * self.forward_flops


@pytest.fixture
def run(tmp_path, monkeypatch) -> TinyRun:
    """``lit-llmtime`` arguments of a tiny fit in a scratch folder: 16-wide model on the character
    tokenizer, 40 trajectories, context 32, no validation unless asked, a checkpoint every step,
    the ledger ``ledger.jsonl``."""
    monkeypatch.chdir(tmp_path)
    write_h5("lv.h5", *simulate(n=40, seed=3))
    config = yaml.safe_load((Path(__file__).parent / "tiny-qwen.yaml").read_text())
    config["model"]["model_config"] = TinyRun.model_config
    config["model"]["lora"] = {"rank": TinyRun.lora_rank, "targets": ["q_proj", "v_proj"]}
    config["data"]["encoding"] = {"decimals": 2}
    config["data"].update(
        data_path="lv.h5", tokenizer=CHARACTER_TOKENIZER, simulate_if_missing=False, val_size=6, test_size=4,
        context_length=TinyRun.context, batch_size=TinyRun.batch,
        predict_indices=[34, 35, 36, 37, 38], forecast_validation={"trajectories": 0},
    )  # fmt: skip
    config["trainer"].update(
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        val_check_interval=None, log_every_n_steps=1,
    )  # fmt: skip
    config["checkpoint"] = {"every_n_train_steps": 1, "save_last": True, "save_top_k": 0, "monitor": None}
    config["flop_budget"] = {"ledger": TinyRun.ledger}
    Path("tiny.yaml").write_text(yaml.safe_dump(config))
    return TinyRun(["--config", "tiny.yaml"])


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """Under pytest-xdist (``-n 2``) each worker computes on one thread: two workers of two threads
    each on two cores would only take turns."""
    import os

    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    yield
