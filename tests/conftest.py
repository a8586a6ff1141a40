"""Shared fixtures: the real Qwen2.5 tokenizer (offline), small simulated data files, and the
arguments of a tiny ``lit-llmtime`` run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_llmtime.data.simulate import simulate, write_h5
from lit_llmtime.text.tokenizers import CHARACTER_TOKENIZER, OFFLINE_TOKENIZER, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(OFFLINE_TOKENIZER)


@pytest.fixture(scope="session")
def small_h5(tmp_path_factory):
    """40 simulated trajectories of 100 steps, in the coursework layout."""
    path = tmp_path_factory.mktemp("data") / "lv_small.h5"
    return write_h5(path, *simulate(n=40, steps=100, seed=1))


# A 16-wide Qwen2 on the 16-token character tokenizer: where token ids do not matter, the real
# 151,936-row output layer would be 99.8% of the model's FLOPs.
TINY = dict(
    vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, tie_word_embeddings=True,
)  # fmt: skip
CONTEXT, BATCH = 32, 2
LEDGER = "ledger.jsonl"


@pytest.fixture
def run(tmp_path, monkeypatch):
    """``lit-llmtime`` arguments of a tiny fit in a scratch folder: 16-wide model on the character
    tokenizer, 40 trajectories,
    context 32, no validation unless asked, a checkpoint every step, the ledger ``ledger.jsonl``."""
    monkeypatch.chdir(tmp_path)
    write_h5("lv.h5", *simulate(n=40, seed=3))
    config = yaml.safe_load((Path(__file__).parents[1] / "configs/quickstart.yaml").read_text())
    config["model"]["model_config"] = TINY
    config["data"].update(
        data_path="lv.h5", tokenizer=CHARACTER_TOKENIZER, simulate_if_missing=False, val_size=6, test_size=4,
        context_length=CONTEXT, batch_size=BATCH,
        predict_indices=[34, 35, 36, 37, 38], forecast_validation={"trajectories": 0},
    )  # fmt: skip
    config["trainer"].update(
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        val_check_interval=None, log_every_n_steps=1,
    )  # fmt: skip
    config["checkpoint"] = {"every_n_train_steps": 1, "save_last": True, "save_top_k": 0, "monitor": None}
    config["flop_budget"] = {"ledger": LEDGER}
    Path("tiny.yaml").write_text(yaml.safe_dump(config))
    return ["--config", "tiny.yaml"]
