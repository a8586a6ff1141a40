"""Our generation loop: the grammar, greedy and sampled, static and dynamic caches, decoding."""

import json

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from lit_llmtime.data.prompts import collate_prompts
from lit_llmtime.data.simulate import simulate
from lit_llmtime.forecasting.metrics import score
from lit_llmtime.model.base import build_base_model
from lit_llmtime.model.configs import model_config
from lit_llmtime.model.generate import decode_forecasts, fill_invalid, generate
from lit_llmtime.text.codec import decode, encode
from lit_llmtime.text.grammar import LLMTimeGrammar

# initializer_range 1.0 makes a random model's greedy text varied (with 0.02 it repeats one token)
RANDOM = model_config("small-qwen", initializer_range=1.0)


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


def test_static_cache_generation_equals_the_dynamic_cache(random_model, tokenizer, prompts):
    results = []
    for static in (False, True):
        grammar = LLMTimeGrammar(tokenizer, len(prompts["input_ids"]), steps=4)
        generation = generate(random_model, prompts["input_ids"], prompts["attention_mask"], grammar, 56, static=static)
        results.append(generation)
    assert torch.equal(results[0].tokens, results[1].tokens)
    assert results[1].prompt_tokens % 64 == 0 and results[1].prompt_tokens >= results[0].prompt_tokens


def test_samples_share_one_prefill_and_sample_as_if_each_had_its_own(random_model, tokenizer, prompts):
    from lit_llmtime.model.flops import FlopModel
    from lit_llmtime.model.generate import generation_shape

    results, shapes = [], []
    for static in (False, True):  # the static cache prefills every row itself
        grammar = LLMTimeGrammar(tokenizer, 3 * len(prompts["input_ids"]), steps=4)
        shapes.append(generation_shape(prompts["input_ids"], grammar, static))
        results.append(
            generate(
                random_model,
                prompts["input_ids"],
                prompts["attention_mask"],
                grammar,
                56,
                num_samples=3,
                temperature=2.0,
                generator=torch.Generator().manual_seed(0),
                static=static,
            ).tokens  # fmt: skip
        )
    assert torch.equal(results[0], results[1]) and len(results[0]) == 15
    assert len({tuple(row.tolist()) for row in results[0][:3]}) > 1  # a prompt's samples differ
    flop_model, prompt = FlopModel(RANDOM, lora_rank=0), shapes[0].prompt_tokens
    new = shapes[0].max_new_tokens
    steps = sum(flop_model.forward(1, keys=prompt + step, head_rows=shapes[0].head_rows) for step in range(1, new))
    prefill = flop_model.forward(prompt, logits=1, head_rows=shapes[0].head_rows)
    assert shapes[0].flops(flop_model) == pytest.approx(5 * prefill + 15 * steps, rel=1e-12)


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


def test_forecasts_stay_within_the_multiple_of_their_prompts_largest_value(random_model, tokenizer, prompts):
    from lit_llmtime.config import EncodingArgs, ForecastArgs
    from lit_llmtime.model.generate import batch_grammar, largest_values

    settings = ForecastArgs(horizon=6, max_prompt_multiple=1.5, num_samples=2, temperature=3.0)
    unbounded_settings = ForecastArgs(horizon=6, max_prompt_multiple=None, num_samples=2)
    unbounded = batch_grammar(tokenizer, prompts, unbounded_settings, EncodingArgs())
    assert unbounded.bound is None
    bounds = largest_values(prompts, settings)
    scaled = [
        np.nanmax(np.abs(p.numpy()), axis=0) / a for p, a in zip(prompts["prompt"], prompts["alpha"], strict=True)
    ]
    np.testing.assert_allclose(bounds.numpy(), np.repeat(1.5 * np.array(scaled), 2, axis=0))  # (rows, variables)
    logged = largest_values(prompts, settings, transform="log")  # the same bound, as the log encoding writes it
    np.testing.assert_allclose(logged.numpy(), np.log1p(bounds.numpy() / 0.01))
    grammar = batch_grammar(tokenizer, prompts, settings, EncodingArgs(decimals=2))
    generation = generate(
        random_model, prompts["input_ids"], prompts["attention_mask"], grammar, 6 * grammar.max_step_tokens,
        num_samples=2, temperature=3.0, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    texts = tokenizer.batch_decode(generation.tokens, skip_special_tokens=True)
    for text, bound in zip(texts, bounds.tolist(), strict=True):
        values = decode(text, alpha=1.0, steps=6).values
        assert np.all(np.abs(values) <= np.array(bound) + 1e-9) and not np.isnan(values).any()
