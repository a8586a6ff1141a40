"""Forecasting: constrained generation of LLMTIME text with the KV cache, decoding, metrics and
classical reference forecasters (persistence and a fitted Lotka-Volterra ODE)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import least_squares
from scipy.sparse import block_diag
from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from lit_llmtime.flops import FlopModel
from lit_llmtime.llmtime import STEP_SEPARATOR, decode, encode
from lit_llmtime.simulate import integrate

SPECIES = ("prey", "predator")


def llmtime_token_ids(tokenizer, allow_negative: bool = False) -> list[int]:
    """Token ids of the LLMTIME alphabet (digits, ``.``, ``,``, ``;``, optionally ``-``) and end-of-text."""
    alphabet = "0123456789.,;" + ("-" if allow_negative else "")
    ids = []
    for char in alphabet:
        encoded = tokenizer(char, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(f"tokenizer splits {char!r} into {encoded}; LLMTIME needs one token per character")
        ids.append(encoded[0])
    return ids + [tokenizer.eos_token_id]


class AllowedTokens(LogitsProcessor):
    """Constrained decoding: every token outside ``allowed_ids`` gets probability zero."""

    def __init__(self, allowed_ids: Sequence[int]) -> None:
        self.allowed = torch.tensor(sorted(set(allowed_ids)))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed.to(scores.device)
        masked = torch.full_like(scores, -math.inf)
        masked[:, allowed] = scores[:, allowed]
        return masked


class StepsComplete(StoppingCriteria):
    """Done for a sequence once it has generated ``steps`` step separators."""

    def __init__(self, separator_id: int, steps: int, prompt_length: int) -> None:
        self.separator_id, self.steps, self.prompt_length = separator_id, steps, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return (input_ids[:, self.prompt_length :] == self.separator_id).sum(dim=1) >= self.steps


@dataclass
class Forecasts:
    """Forecasts for a batch of trajectories (all arrays on the original scale)."""

    forecast: np.ndarray  # (B, H, 2): median over samples; NaN where no sample gave a value
    lower: np.ndarray  # (B, H, 2): 5% quantile over samples
    upper: np.ndarray  # (B, H, 2): 95% quantile over samples
    samples: np.ndarray  # (B, S, H, 2)
    valid_share: np.ndarray  # (B,): share of sampled steps that parsed
    alpha: np.ndarray  # (B,): scale of each prompt
    texts: list[str]  # first sample's generated text per trajectory
    flops: float  # FLOP model cost of the whole batch
    seconds: float


@torch.no_grad()
def generate_forecasts(
    model,
    tokenizer,
    prompts: np.ndarray,
    horizon: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 0.9,
    decimals: int = 2,
    constrained: bool = True,
    flop_model: FlopModel | None = None,
) -> Forecasts:
    """Continue each (P, 2) prompt by ``horizon`` steps with one batched ``generate`` call.

    Prompts are left-padded (with an attention mask), scaled by their own alpha and end with
    ``;`` so the model writes the next step. Greedy when ``num_samples == 1``; otherwise sampled
    with ``temperature`` and ``top_p``, summarised by the median and a 5-95% band.
    """
    start = time.perf_counter()
    prompts = np.asarray(prompts, dtype=np.float64)
    encoded = [encode(p, decimals=decimals, name=f"prompt {i}") for i, p in enumerate(prompts)]
    alphas = np.array([alpha for _, alpha in encoded])
    texts = [text + STEP_SEPARATOR for text, _ in encoded]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    device = next(model.parameters()).device
    input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    prompt_length = input_ids.shape[1]
    tokens_per_step = math.ceil(attention_mask.sum(1).max().item() / prompts.shape[1])
    separator = tokenizer(STEP_SEPARATOR, add_special_tokens=False)["input_ids"][0]
    processors = LogitsProcessorList()
    if constrained:
        processors.append(AllowedTokens(llmtime_token_ids(tokenizer, allow_negative=bool((prompts < 0).any()))))
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if num_samples > 1 else {}
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=horizon * (tokens_per_step + 4),
        num_return_sequences=num_samples,
        logits_processor=processors,
        stopping_criteria=StoppingCriteriaList([StepsComplete(separator, horizon, prompt_length)]),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
        **({"do_sample": False} | sampling),
    )
    generated = output[:, prompt_length:]
    decoded_texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    batch = len(prompts)
    samples = np.stack(
        [decode(text, alphas[i // num_samples], steps=horizon).values for i, text in enumerate(decoded_texts)]
    ).reshape(batch, num_samples, horizon, prompts.shape[2])
    valid = ~np.isnan(samples).any(axis=-1)  # (B, S, H)
    with warnings.catch_warnings():  # all-NaN columns (no sample parsed) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        forecast = np.nanmedian(samples, axis=1)
        lower, upper = np.nanquantile(samples, 0.05, axis=1), np.nanquantile(samples, 0.95, axis=1)
    flops = 0.0
    if flop_model is not None:
        flops = len(generated) * flop_model.generation(prompt_length, generated.shape[1])
    return Forecasts(
        forecast=forecast,
        lower=lower,
        upper=upper,
        samples=samples,
        valid_share=valid.mean(axis=(1, 2)),
        alpha=alphas,
        texts=decoded_texts[::num_samples],
        flops=flops,
        seconds=time.perf_counter() - start,
    )


def metrics(truth: np.ndarray, forecast: np.ndarray) -> dict[str, dict[str, float]]:
    """MSE, MAE and R^2 per species over the steps where ``forecast`` has a value (torchmetrics)."""
    result = {}
    for k, name in enumerate(SPECIES):
        mask = ~np.isnan(forecast[:, k])
        if mask.sum() < 2:
            result[name] = {"mse": math.nan, "mae": math.nan, "r2": math.nan}
            continue
        y, p = torch.as_tensor(truth[mask, k]), torch.as_tensor(forecast[mask, k])
        result[name] = {
            "mse": mean_squared_error(p, y).item(),
            "mae": mean_absolute_error(p, y).item(),
            "r2": r2_score(p, y).item(),
        }
    return result


# -- reference forecasters ---------------------------------------------------------------------
def persistence(prompts: np.ndarray, horizon: int) -> np.ndarray:
    """Repeat the last observed value of each (N, P, 2) prompt: (N, horizon, 2)."""
    return np.repeat(np.asarray(prompts, dtype=np.float64)[:, -1:], horizon, axis=1)


def fit_lotka_volterra(prompts: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Least-squares fit of ``a, b, c, d`` of ``x' = a x - b x y, y' = c x y - d y`` to each of
    (N, P, 2) prompts; returns (N, 4).

    Starts from the linear regression of log-derivatives (``d log x/dt = a - b y``,
    ``d log y/dt = c x - d``), then refines by integrating the ODEs from the first observations.
    All trajectories are fitted as one problem with a block-sparse Jacobian, so each refinement
    step is a handful of vectorised ODE solves rather than one per trajectory.
    """
    prompts = np.asarray(prompts, dtype=np.float64)
    n, steps, _ = prompts.shape
    x, y = np.maximum(prompts[..., 0], 1e-9), np.maximum(prompts[..., 1], 1e-9)
    dlogx, dlogy = np.gradient(np.log(x), time, axis=1), np.gradient(np.log(y), time, axis=1)
    guess = np.empty((n, 4))
    for i in range(n):
        (a, minus_b), *_ = np.linalg.lstsq(np.stack([np.ones(steps), y[i]], 1), dlogx[i], rcond=None)
        (c, minus_d), *_ = np.linalg.lstsq(np.stack([x[i], np.ones(steps)], 1), dlogy[i], rcond=None)
        guess[i] = [a, -minus_b, c, -minus_d]
    guess = np.log(np.clip(np.abs(guess), 1e-4, 10.0))
    scale = prompts.std(axis=1, keepdims=True) + 1e-9

    def residuals(log_params: np.ndarray) -> np.ndarray:
        solution = _integrate(np.exp(log_params.reshape(n, 4)), prompts[:, 0], time)
        if solution is None:
            return np.full(prompts.size, 1e3)
        return ((solution - prompts) / scale).ravel()

    sparsity = block_diag([np.ones((steps * 2, 4))] * n, format="csr")
    fit = least_squares(residuals, guess.ravel(), jac_sparsity=sparsity, method="trf", x_scale="jac", max_nfev=100)
    return np.exp(fit.x.reshape(n, 4))


def _integrate(params: np.ndarray, initial: np.ndarray, time: np.ndarray) -> np.ndarray | None:
    """Solve (N,) systems with (N, 4) parameters from (N, 2) initial states; (N, T, 2) or None."""
    try:
        return integrate(dict(zip("abcd", params.T, strict=True)), initial, time)
    except RuntimeError:
        return None


def lotka_volterra_forecast(prompts: np.ndarray, time: np.ndarray, horizon: int) -> np.ndarray:
    """Fit the ODE to each (N, P, 2) prompt (observed at ``time[:P]``) and integrate it ``horizon``
    steps on from its last observation; persistence where the fit cannot be integrated."""
    prompts = np.asarray(prompts, dtype=np.float64)
    steps = prompts.shape[1]
    params = fit_lotka_volterra(prompts, time[:steps])
    future = _integrate(params, prompts[:, -1], time[steps - 1 : steps + horizon])
    return persistence(prompts, horizon) if future is None else future[:, 1:]


REFERENCE_FORECASTERS = ("persistence", "lotka_volterra")


def reference_forecast(name: str, prompts: np.ndarray, time: np.ndarray, horizon: int) -> np.ndarray:
    """Forecast (N, P, 2) prompts with a named reference forecaster: (N, horizon, 2)."""
    if name == "persistence":
        return persistence(prompts, horizon)
    if name == "lotka_volterra":
        return lotka_volterra_forecast(prompts, time, horizon)
    raise ValueError(f"unknown reference forecaster {name!r}; choose from {REFERENCE_FORECASTERS}")
