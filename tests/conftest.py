"""Shared fixtures: the real Qwen2.5 tokenizer (offline) and small simulated data files."""

from __future__ import annotations

import pytest

from lit_llmtime.data import OFFLINE_TOKENIZER, load_tokenizer
from lit_llmtime.simulate import simulate, write_h5


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(OFFLINE_TOKENIZER)


@pytest.fixture(scope="session")
def small_h5(tmp_path_factory):
    """40 simulated trajectories of 100 steps, in the coursework layout."""
    path = tmp_path_factory.mktemp("data") / "lv_small.h5"
    return write_h5(path, *simulate(n=40, steps=100, seed=1))
