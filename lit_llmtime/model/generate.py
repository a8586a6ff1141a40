"""Generation: our own loop (KV cache, LLMTIME grammar, greedy or sampled), what it computes at
most (the FLOP budget charges it beforehand), and decoding of the generated text. The
``Forecaster`` (forecaster.py) puts them together."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, StaticCache

from lit_llmtime.config import EncodingArgs, ForecastArgs
from lit_llmtime.model.flops import FlopModel
from lit_llmtime.text.codec import decode, transformed
from lit_llmtime.text.grammar import LLMTimeGrammar

PROMPT_PAD, CACHE_PAD = 64, 256  # static cache (compiled generation): prompt and capacity multiples


@dataclass  # not frozen: Lightning rebuilds dataclasses in step outputs (apply_to_collection)
class GenerationShape:
    """What a batch's generation computes at most: the FLOP budget charges it before it runs."""

    rows: int  # prompts x samples
    prompt_tokens: int  # padded prompt length
    max_new_tokens: int
    head_rows: int | None  # output-matrix rows computed per new token (None: the whole vocabulary)
    cache_tokens: int | None = None  # a static cache's capacity, attended whole at every step
    prefills: int | None = None  # prompts run through the model once each (None: every row, static cache)

    def flops(self, flop_model: FlopModel, new_tokens: int | None = None) -> float:
        """FLOPs of this generation: at most, or with ``new_tokens`` tokens written per row."""
        tokens = self.max_new_tokens if new_tokens is None else new_tokens
        if self.rows == 0:
            return 0.0
        prefills = self.rows if self.prefills is None else self.prefills
        return prefills * flop_model.generation(
            self.prompt_tokens,
            tokens,
            head_rows=self.head_rows,
            cache_tokens=self.cache_tokens,
            continuations=self.rows // prefills,
        )


def static_generation(compile: str, on_cuda: bool) -> bool:
    """Whether generation runs on a static KV cache with a compiled step (``forecast.compile``:
    ``on``, ``off``, or ``auto``: on CUDA)."""
    return compile == "on" or (compile == "auto" and on_cuda)


def cache_capacity(prompt_tokens: int, max_new_tokens: int) -> int:
    """Positions of the static cache for a (padded) prompt and the tokens to write after it."""
    return -(-(prompt_tokens + max_new_tokens) // CACHE_PAD) * CACHE_PAD


def batch_grammar(
    tokenizer, batch: dict, forecast: ForecastArgs, encoding: EncodingArgs, steps: int | None = None
) -> LLMTimeGrammar:
    """The decoding constraint of a batch of prompts (one row per prompt and sample), for ``steps``
    steps (default ``forecast.horizon``): numbers with the encoding's decimals, the value bound
    written as its transform writes values."""
    bounded = forecast.max_prompt_multiple is not None
    return LLMTimeGrammar(
        tokenizer,
        batch_size=len(batch["input_ids"]) * forecast.num_samples,
        steps=forecast.horizon if steps is None else steps,
        decimals=encoding.decimals,
        max_integer_digits=forecast.max_integer_digits,
        allow_negative=bool((batch["prompt"] < 0).any()),
        n_variables=batch["prompt"].shape[-1],
        mode=forecast.constrained,
        device=batch["input_ids"].device,
        max_values=largest_values(batch, forecast, encoding.transform) if bounded else None,
    )


def largest_values(batch: dict, forecast: ForecastArgs, transform: str = "none") -> torch.Tensor:
    """(rows, variables), per generated row (prompt by prompt, ``num_samples`` each) and variable:
    the most a value may reach, ``max_prompt_multiple`` times the largest absolute scaled value of
    that variable in its prompt, as written in text (after the encoding's ``transform``)."""
    prompt = torch.nan_to_num(batch["prompt"].detach().cpu().abs().double(), nan=0.0)  # left-padded with NaN
    alpha = batch["alpha"].detach().cpu().double()[:, None]
    largest = forecast.max_prompt_multiple * prompt.amax(dim=1) / alpha
    return torch.from_numpy(transformed(largest.numpy(), transform)).repeat_interleave(forecast.num_samples, dim=0)


def generation_shape(input_ids: torch.Tensor, grammar: LLMTimeGrammar, static: bool) -> GenerationShape:
    """What generating a batch computes at most: every step written with the longest numbers."""
    length = input_ids.shape[1]
    prompt_tokens = length + (-length % PROMPT_PAD if static else 0)  # the static cache's padding (see _Decoder)
    max_new_tokens = grammar.steps * grammar.max_step_tokens
    return GenerationShape(
        rows=len(grammar.state),
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        head_rows=None if grammar.mode == "none" else len(grammar.token_ids),
        cache_tokens=cache_capacity(prompt_tokens, max_new_tokens) if static else None,
        prefills=None if static else len(input_ids),
    )


@dataclass
class Generation:
    """Tokens generated for a batch, and what it took (for FLOP counts and tokens per second)."""

    tokens: torch.Tensor  # (rows, new_tokens): rows = prompts x samples, prompt by prompt
    prompt_tokens: int  # padded prompt length
    head_rows: int | None  # output-matrix rows computed per new token (None: the whole vocabulary)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.numel() / max(self.seconds, 1e-9)


def _head_logits(head: nn.Module, hidden: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """float32 logits of ``hidden`` (rows, d), only for ``columns`` of the vocabulary when given."""
    if columns is None or not isinstance(head, nn.Linear):
        logits = head(hidden)
        return (logits if columns is None else logits[:, columns]).float()
    weight = head.weight[columns]
    bias = None if head.bias is None else head.bias[columns]
    return nn.functional.linear(hidden, weight, bias).float()


def _choose(scores: torch.Tensor, temperature: float, top_p: float, sample: bool, generator) -> torch.Tensor:
    """Greedy (argmax) or nucleus sampling over ``scores`` that are -inf where not allowed."""
    if not sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest set reaching top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    pick = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)


@torch.no_grad()
def next_token_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, columns: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 logits (rows, vocab or columns) for the token after left-padded ``input_ids``: the
    prefill of ``generate`` itself, so a test can hold it against validation's logits."""
    decoder = _Decoder(model, input_ids, attention_mask, max_new_tokens=0, static=False, compile=False)
    return _head_logits(model.get_output_embeddings(), decoder.prefill(), columns)


class _Decoder:
    """One new token per row through the model and its cache: a dynamic cache that grows, or
    (``static``) a preallocated one with every shape fixed, so ``torch.compile`` (CUDA graphs)
    compiles the step once. Prompts are left-padded to a multiple of ``PROMPT_PAD`` and the cache to one of
    ``CACHE_PAD``, so batches of similar prompts reuse the compiled step."""

    def __init__(self, model: nn.Module, input_ids, attention_mask, max_new_tokens: int, static: bool, compile: bool):
        self.decoder = model.get_decoder()
        if static:
            pad = -input_ids.shape[1] % PROMPT_PAD
            input_ids = nn.functional.pad(input_ids, (pad, 0), value=0)
            attention_mask = nn.functional.pad(attention_mask, (pad, 0), value=0)
        self.input_ids, self.length, self.static = input_ids, input_ids.shape[1], static
        if static:
            capacity = cache_capacity(self.length, max_new_tokens)
            self.cache = StaticCache(config=model.config, max_cache_len=capacity)
            self.mask = attention_mask.new_zeros(len(input_ids), capacity)
            self.mask[:, : self.length] = attention_mask
        else:
            self.cache, self.mask = DynamicCache(config=model.config), attention_mask
        self.position = (attention_mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        self._step = torch.compile(self._forward, mode="reduce-overhead") if compile else self._forward

    def _forward(self, tokens, mask, positions, cache_position):
        # the cache is the 4th positional argument (past_key_values or cache across transformers versions)
        kwargs = {"cache_position": cache_position} if self.static else {}
        return self.decoder(tokens, mask, positions, self.cache, use_cache=True, **kwargs).last_hidden_state[:, -1]

    def prefill(self) -> torch.Tensor:
        """Hidden state after each prompt (not compiled: its shape varies with the prompts)."""
        positions = (self.mask[:, : self.length].cumsum(-1) - 1).clamp(min=0)
        cache_position = torch.arange(self.length, device=self.input_ids.device)
        return self._forward(self.input_ids, self.mask, positions, cache_position)

    def repeat(self, times: int) -> None:
        """Give every prompt ``times`` adjacent rows (samples), each with a copy of its prefilled
        cache (dynamic cache only)."""
        self.cache.batch_repeat_interleave(times)
        self.mask = self.mask.repeat_interleave(times, dim=0)
        self.position = self.position.repeat_interleave(times, dim=0)

    def step(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        """Hidden state after the ``index``-th new token (0-based) of every row."""
        if self.static:
            self.mask[:, self.length + index] = 1
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=1)
        self.position = self.position + 1
        cache_position = torch.tensor([self.length + index], device=tokens.device)
        return self._step(tokens[:, None], self.mask, self.position, cache_position)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    grammar: LLMTimeGrammar,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    progress: Callable[[LLMTimeGrammar, int, float], None] | None = None,
    static: bool = False,
    compile: bool = False,
) -> Generation:
    """Continue left-padded prompts until the grammar says every row has its steps.

    Our own loop rather than ``generate``: nothing from a model folder's generation_config
    (sampling, repetition penalty, top-k) can change a forecast; the grammar masks the scores
    before temperature and top-p; and only the output rows the grammar can allow are computed.
    ``num_samples > 1`` samples that many continuations per prompt (adjacent rows: with the growing
    cache they share the prompt's one prefill, with a static one each row prefills); 1 is greedy.
    ``progress`` is called after every token with the grammar, the tokens so far and the seconds.
    ``static`` uses a preallocated KV cache and ``compile`` compiles the per-token step (CUDA).
    """
    start = time.perf_counter()
    head, static = model.get_output_embeddings(), static or compile
    if num_samples > 1 and static:  # a static cache is allocated for every row before the prefill
        input_ids = input_ids.repeat_interleave(num_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
    columns = grammar.token_ids.to(input_ids.device) if grammar.mode != "none" else None
    decoder = _Decoder(model, input_ids, attention_mask, max_new_tokens, static, compile)
    logits = _head_logits(head, decoder.prefill(), columns)
    if num_samples > 1 and not static:  # one prefill (and head) per prompt, copied to each sample
        decoder.repeat(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
    tokens = []
    for index in range(max_new_tokens):
        chosen = _choose(grammar.mask(logits), temperature, top_p, num_samples > 1, generator)
        token = columns[chosen] if columns is not None else chosen
        grammar.advance(token)
        tokens.append(token)
        if progress is not None:
            progress(grammar, len(tokens) * len(token), time.perf_counter() - start)
        if bool(grammar.stopped.all()):
            break
        logits = _head_logits(head, decoder.step(token, index), columns)
    generated = torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(len(grammar.state), 0)
    head_rows = None if columns is None else len(columns)
    return Generation(generated, decoder.length, head_rows, time.perf_counter() - start)


class StepProgress:
    """A progress bar over the forecast steps that every row has written, with tokens per second
    (a context manager that closes it; ``disable``: no bar; None: no bar unless on a terminal)."""

    def __init__(self, steps: int, description: str, disable: bool | None = False) -> None:
        self.bar = tqdm(total=steps, desc=description, unit="step", leave=False, dynamic_ncols=True, disable=disable)

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exception) -> None:
        self.close()

    def __call__(self, grammar: LLMTimeGrammar, tokens: int, seconds: float) -> None:
        if self.bar.disable:
            return
        self.bar.update(int(grammar.steps_written.min()) - self.bar.n)
        self.bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):.0f} tokens/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Forecasts:
    """Forecasts for a batch of trajectories, on the original scale. Steps that did not parse
    (possible only without the grammar) are filled with the last valid value before them (or the
    prompt's last value), so every step is scored; ``valid_share`` says how many parsed."""

    forecast: np.ndarray  # (B, H, D): median over samples
    lower: np.ndarray  # (B, H, D): 5% quantile over samples
    upper: np.ndarray  # (B, H, D): 95% quantile over samples
    samples: np.ndarray  # (B, S, H, D), filled
    valid: np.ndarray  # (B, S, H): the step parsed
    texts: list[str]  # first sample's generated text per trajectory

    @property
    def valid_share(self) -> np.ndarray:
        """(B,): share of sampled steps that parsed."""
        return self.valid.mean(axis=(1, 2))


def fill_invalid(values: np.ndarray, last_observed: np.ndarray) -> np.ndarray:
    """Replace NaN rows of (H, V) ``values`` with the last valid row before them (the stated
    scoring rule for steps that did not parse); ``last_observed`` (V,) stands before the first."""
    filled = np.array(values, dtype=np.float64)
    previous = np.asarray(last_observed, dtype=np.float64)
    for row in filled:
        invalid = np.isnan(row)
        row[invalid] = previous[invalid]
        previous = row
    return filled


def decode_forecasts(
    texts: list[str], alphas: np.ndarray, prompts: np.ndarray, horizon: int, transform: str = "none"
) -> Forecasts:
    """Parse ``len(alphas) * S`` generated texts (S samples per prompt, prompt by prompt); each
    (P, D) prompt's last row stands before the first step (prompts of different lengths are
    left-padded with NaN, so the last row is always observed)."""
    batch, variables = len(alphas), prompts.shape[-1]
    samples_per_prompt = len(texts) // batch
    samples = np.empty((batch, samples_per_prompt, horizon, variables))
    valid = np.empty((batch, samples_per_prompt, horizon), dtype=bool)
    for row, text in enumerate(texts):
        b, s = divmod(row, samples_per_prompt)
        decoded = decode(text, alphas[b], n_variables=variables, steps=horizon, transform=transform)
        valid[b, s] = decoded.valid
        samples[b, s] = fill_invalid(decoded.values, prompts[b, -1])
    return Forecasts(
        forecast=np.median(samples, axis=1),
        lower=np.quantile(samples, 0.05, axis=1),
        upper=np.quantile(samples, 0.95, axis=1),
        samples=samples,
        valid=valid,
        texts=texts[::samples_per_prompt],
    )
