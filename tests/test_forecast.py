import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from lit_llmtime.cli import lightning_cli, main
from lit_llmtime.evaluation import load_npz
from lit_llmtime.forecast import (
    AllowedTokens,
    generate_forecasts,
    llmtime_token_ids,
    lotka_volterra_forecast,
    metrics,
    persistence,
    reference_forecast,
)
from lit_llmtime.ledger import Ledger
from lit_llmtime.model import build_base_model
from lit_llmtime.simulate import simulate

# initializer_range 1.0 makes a random model's greedy text varied (with 0.02 it repeats one token)
RANDOM = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, initializer_range=1.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def random_model():
    return build_base_model("unused", RANDOM, torch.float32, init_seed=0).eval()


@pytest.fixture(scope="module")
def prompts():
    trajectories, _ = simulate(n=5, seed=7)
    return trajectories[:, :20]


def test_constrained_decoding_allows_only_the_llmtime_alphabet(random_model, tokenizer, prompts):
    allowed = set(llmtime_token_ids(tokenizer))
    assert allowed == {*range(15, 25), 11, 13, 26, tokenizer.eos_token_id}
    inputs = tokenizer("1.00,2.00;", return_tensors="pt", add_special_tokens=False)
    free = random_model.generate(**inputs, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert not set(free[0, inputs["input_ids"].shape[1] :].tolist()) <= allowed  # garbage without constraints
    constrained = random_model.generate(
        **inputs, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([AllowedTokens(allowed)]),
    )  # fmt: skip
    assert set(constrained[0, inputs["input_ids"].shape[1] :].tolist()) <= allowed
    result = generate_forecasts(random_model, tokenizer, prompts, horizon=4, num_samples=3, temperature=1.5)
    assert all(set(text) <= set("0123456789.,;") for text in result.texts)


def test_batched_and_one_at_a_time_greedy_forecasts_agree(random_model, tokenizer, prompts):
    batched = generate_forecasts(random_model, tokenizer, prompts, horizon=5)
    assert len(set(batched.texts)) > 1  # the texts differ, so the comparison means something
    for i in range(len(prompts)):
        single = generate_forecasts(random_model, tokenizer, prompts[i : i + 1], horizon=5)
        assert single.texts[0] == batched.texts[i]
        np.testing.assert_array_equal(single.forecast[0], batched.forecast[i])


class FixedText(torch.nn.Module):
    """A stand-in model whose ``generate`` appends a fixed text, to test decoding of its output."""

    def __init__(self, tokenizer, text: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, self.ids.expand(len(input_ids), -1)], dim=1)


def test_fewer_valid_steps_are_reported_not_hidden(tokenizer):
    prompt = np.tile([[1.0, 2.0]], (10, 1))[None]  # alpha = 0.2: text "5.00,10.00;..."
    result = generate_forecasts(FixedText(tokenizer, "5.00,10.00;;7.5;5.00,5.00"), tokenizer, prompt, horizon=4)
    np.testing.assert_allclose(result.forecast[0], [[1.0, 2.0], [np.nan] * 2, [np.nan] * 2, [1.0, 1.0]])
    assert result.valid_share[0] == 0.5
    scores = metrics(np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [2.0, 3.0]]), result.forecast[0])
    assert scores["prey"]["mse"] == pytest.approx(0.5) and scores["predator"]["mae"] == pytest.approx(1.0)
    nothing = generate_forecasts(FixedText(tokenizer, ";;;;"), tokenizer, prompt, horizon=4)
    assert nothing.valid_share[0] == 0 and np.isnan(metrics(np.ones((4, 2)), nothing.forecast[0])["prey"]["r2"])


def test_persistence_errors_on_a_hand_made_series():
    prompt = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    truth = np.array([[5.0, 4.0], [3.0, 8.0]])
    forecast = persistence(prompt, 2)[0]
    np.testing.assert_array_equal(forecast, [[3.0, 4.0], [3.0, 4.0]])
    scores = metrics(truth, forecast)
    assert (scores["prey"]["mse"], scores["prey"]["mae"]) == (2.0, 1.0)  # errors 2, 0
    assert (scores["predator"]["mse"], scores["predator"]["mae"]) == (8.0, 2.0)  # errors 0, 4
    assert scores["prey"]["r2"] == pytest.approx(1 - 4 / 2)  # 1 - SSE / SST = 1 - (4 + 0) / (1 + 1)


def test_ode_forecaster_recovers_clean_simulated_futures():
    trajectories, time = simulate(n=30, seed=11)
    forecast = lotka_volterra_forecast(trajectories[:, :50], time, 50)
    r2 = [
        metrics(t[50:], f)[s]["r2"] for t, f in zip(trajectories, forecast, strict=True) for s in ("prey", "predator")
    ]
    assert min(r2) > 0.99
    with pytest.raises(ValueError, match="unknown reference forecaster 'arima'"):
        reference_forecast("arima", trajectories[:, :50], time, 50)


def test_sampled_forecasts_have_a_band(random_model, tokenizer, prompts):
    torch.manual_seed(0)
    result = generate_forecasts(random_model, tokenizer, prompts, horizon=4, num_samples=4, temperature=1.0)
    assert result.samples.shape == (5, 4, 4, 2)
    ok = ~np.isnan(result.forecast)
    assert np.all(result.lower[ok] <= result.forecast[ok]) and np.all(result.forecast[ok] <= result.upper[ok])


def test_predict_through_the_cli_writes_everything(small_h5, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
    cli = lightning_cli(
        [
            "predict", "--config", config, f"--data.data_path={small_h5}", "--data.val_size=6",
            "--data.test_size=4", "--data.predict_indices=[3, 5, 37]", "--model.prompt_steps=20",
            "--model.forecast_steps=6", "--trainer.enable_progress_bar=false",
        ]
    )  # fmt: skip
    folder = Path(cli.trainer.log_dir) / "forecast"
    written = load_npz(folder / "predictions.npz")
    assert written["index"].tolist() == [3, 5, 37]
    assert written["forecast"].shape == (3, 6, 2) and written["prompt"].shape == (3, 20, 2)
    assert set(written["references"]) == {"persistence", "lotka_volterra"}
    summary = json.loads((folder / "metrics.json").read_text())
    for row, index in enumerate(written["index"]):
        for name, values in {"lotka_volterra": written["references"]["lotka_volterra"], "persistence": None}.items():
            forecast = values[row] if values is not None else np.repeat(written["prompt"][row, -1:], 6, axis=0)
            error = forecast[:, 0] - written["truth"][row, :, 0]
            reference = summary["references"][name]["per_trajectory"][str(index)]["prey"]
            assert reference["mse"] == pytest.approx(np.mean(error**2))
            assert reference["mae"] == pytest.approx(np.mean(np.abs(error)))
    assert summary["model"]["mean"]["valid_share"] == pytest.approx(written["valid_share"].mean())
    assert "| **mean** |" in (folder / "metrics.md").read_text()
    for index in (3, 5, 37):
        for kind in ("forecast", "errors"):
            png = (folder / f"{kind}_{index}.png").read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (record,) = Ledger("lightning_logs/quickstart/flop_ledger.jsonl").records()
    assert record["stage"] == "predict" and record["flops"] == pytest.approx(written["flops"]) and record["flops"] > 0


def test_encode_check_writes_figure_one(small_h5, tmp_path, capsys):
    out = tmp_path / "check.png"
    main(["encode-check", "--index", "3", "--data", str(small_h5), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "max |decoded - original|" in capsys.readouterr().out


def test_summary_metrics_equal_numpy(tmp_path):
    from lit_llmtime.evaluation import summarise

    rng = np.random.default_rng(0)
    truth, forecast = rng.uniform(0.5, 3, (3, 8, 2)), rng.uniform(0.5, 3, (3, 8, 2))
    forecast[1, 2:5] = np.nan  # three steps that did not parse
    predictions = {
        "index": np.array([4, 9, 12]), "truth": truth, "forecast": forecast, "valid_share": np.array([1, 5 / 8, 1]),
        "references": {}, "flops": 1.0, "seconds": 0.1,
    }  # fmt: skip
    summary = summarise(predictions)
    for row, index in enumerate((4, 9, 12)):
        for k, species in enumerate(("prey", "predator")):
            ok = ~np.isnan(forecast[row, :, k])
            y, p = truth[row, ok, k], forecast[row, ok, k]
            got = summary["model"]["per_trajectory"][index][species]
            assert got["mse"] == pytest.approx(np.mean((p - y) ** 2))
            assert got["mae"] == pytest.approx(np.mean(np.abs(p - y)))
            assert got["r2"] == pytest.approx(1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))
    mean_r2 = np.mean([summary["model"]["per_trajectory"][i]["prey"]["r2"] for i in (4, 9, 12)])
    assert summary["model"]["mean"]["prey"]["r2"] == pytest.approx(mean_r2)
    assert summary["model"]["mean"]["valid_share"] == pytest.approx((2 + 5 / 8) / 3)


def test_predict_on_two_processes_merges_once(small_h5, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
    lightning_cli(
        [
            "predict", "--config", config, f"--data.data_path={small_h5}", "--data.val_size=6",
            "--data.test_size=4", "--data.predict_indices=[1, 2, 3, 4, 5]", "--data.batch_size=2",
            "--model.prompt_steps=20", "--model.forecast_steps=3", "--model.reference_forecasters=[persistence]",
            "--trainer.enable_progress_bar=false", "--trainer.devices=2", "--trainer.strategy=ddp_spawn",
        ]
    )  # fmt: skip
    (written_path,) = Path("lightning_logs").rglob("predictions.npz")  # spawned ranks choose the version
    folder = written_path.parent
    written = load_npz(written_path)
    assert written["index"].tolist() == [1, 2, 3, 4, 5]  # the sampler's padding duplicate is dropped
    assert not list(folder.glob("rank*.npz"))
