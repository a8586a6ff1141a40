"""The ``Forecaster``: series in, LLMTIME prompts through our generation loop under the grammar,
forecasts on the original scale out. ``predict`` and validation call it on the data module's
batches; users call ``predict`` (arrays) or ``predict_df`` (a long-format DataFrame) on their own
series, with a trained adapter (``from_checkpoint``) or a base model alone (``from_model``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_llmtime.config import DEFAULT_MODEL, EncodingArgs, ForecastArgs, LoRAArgs, as_args
from lit_llmtime.data.prompts import prompt_batches, scale_alphas
from lit_llmtime.data.series import (
    ID_COLUMN,
    TIME_COLUMN,
    SeriesSet,
    from_arrays,
    series_from_frame,
)
from lit_llmtime.forecasting.metrics import QUANTILE_LEVELS
from lit_llmtime.model.base import build_model
from lit_llmtime.model.checkpoint import load_adapter, model_settings, read_checkpoint
from lit_llmtime.model.flops import FlopModel, run_flop_model
from lit_llmtime.model.generate import (
    Forecasts,
    Generation,
    GenerationShape,
    StepProgress,
    batch_grammar,
    decode_forecasts,
    generate,
    generation_shape,
    static_generation,
)
from lit_llmtime.text.grammar import LLMTimeGrammar
from lit_llmtime.text.tokenizers import OFFLINE_TOKENIZER, load_tokenizer

Progress = Callable[[LLMTimeGrammar, int, float], None]


@dataclass
class ForecastResult:
    """Forecasts of a batch of trajectories on the original scale, with what they are compared to
    and what generating them took. Arrays are (B, ...) in the batch's order."""

    index: np.ndarray  # (B,) trajectory indices
    time: np.ndarray  # (T,) the data set's time axis
    prompt: np.ndarray  # (B, P, V) observed steps
    truth: np.ndarray  # (B, H, V) the steps that followed
    alpha: np.ndarray  # (B,) LLMTIME scales
    forecast: np.ndarray  # (B, H, V) median over samples
    lower: np.ndarray  # (B, H, V) 5% quantile
    upper: np.ndarray  # (B, H, V) 95% quantile
    samples: np.ndarray  # (B, S, H, V)
    valid_share: np.ndarray  # (B,) share of generated steps that parsed
    texts: list[str]  # first sample's generated text per trajectory
    shape: GenerationShape  # the most the generation could compute (what the budget charged)
    new_tokens: int  # tokens generated per row
    seconds: float
    references: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (B, H, V)
    flops: float = 0.0  # what the generation cost (the FLOP budget callback sets it)
    variables: tuple[str, ...] = ()  # the batch's variable names

    @classmethod
    def of(cls, batch: dict, future: torch.Tensor, shape: GenerationShape, generation: Generation,
           decoded: Forecasts, references=()) -> ForecastResult:  # fmt: skip
        """The result of generating ``batch``, with the ``references`` that apply to its prompts."""
        from lit_llmtime.forecasting.references import reference_applies, reference_forecast  # scipy, only when asked

        prompts, time_axis = batch["prompt"].cpu().numpy(), batch["time"].cpu().numpy()
        horizon = future.shape[1]
        return cls(
            index=batch["index"].cpu().numpy(), time=time_axis, prompt=prompts, truth=future.cpu().numpy(),
            alpha=batch["alpha"].cpu().numpy(), forecast=decoded.forecast, lower=decoded.lower, upper=decoded.upper,
            samples=decoded.samples, valid_share=decoded.valid_share, texts=decoded.texts, shape=shape,
            new_tokens=generation.tokens.shape[1], seconds=generation.seconds,
            references={name: reference_forecast(name, prompts, time_axis, horizon) for name in references
                        if reference_applies(name, prompts)},
            variables=tuple(batch["variables"]),
        )  # fmt: skip

    @property
    def tokens(self) -> int:
        return self.shape.rows * self.new_tokens

    def predictions(self) -> dict:
        """As the dict that ``evaluation`` merges, saves and summarises."""
        arrays = ("index", "time", "prompt", "truth", "alpha", "forecast", "lower", "upper", "samples", "valid_share")
        result = {name: getattr(self, name) for name in arrays}
        return result | {
            "texts": self.texts,
            "references": self.references,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "flops": self.flops,
            "variables": tuple(self.variables),
        }


@dataclass
class Prediction:
    """Forecasts of N series ``horizon`` steps ahead, on the original scale."""

    variables: tuple[str, ...]
    median: np.ndarray  # (N, H, D): the median over samples (greedy: the forecast itself)
    quantile_levels: tuple[float, ...]
    quantiles: np.ndarray  # (N, Q, H, D): the samples' empirical quantiles at quantile_levels
    samples: np.ndarray  # (N, S, H, D)
    texts: list[str]  # each series' first sample as generated
    valid_share: np.ndarray  # (N,): share of generated steps that parsed (1.0 under the grammar)
    alpha: np.ndarray  # (N,): each series' LLMTIME scale
    flops: float  # what generating cost (0.0 without a FLOP model)
    flops_bound: float  # the most it could have cost: what a budget charges before generating
    tokens: int  # tokens generated, all rows
    seconds: float

    @classmethod
    def of(cls, variables, levels, alphas: np.ndarray, batches: list, flop_model: FlopModel | None) -> Prediction:
        """The forecasts of generated ``batches`` of (shape, generation, decoded forecasts)."""
        levels = tuple(float(level) for level in levels)
        samples = np.concatenate([decoded.samples for _, _, decoded in batches])
        return cls(
            variables=tuple(variables),
            median=np.concatenate([decoded.forecast for _, _, decoded in batches]),
            quantile_levels=levels,
            quantiles=np.moveaxis(np.quantile(samples, levels, axis=1), 0, 1),
            samples=samples,
            texts=[text for _, _, decoded in batches for text in decoded.texts],
            valid_share=np.concatenate([decoded.valid_share for _, _, decoded in batches]),
            alpha=np.asarray(alphas, dtype=np.float64),
            flops=sum(generated_flops(shape, generation, flop_model) for shape, generation, _ in batches),
            flops_bound=sum(shape.flops(flop_model) for shape, _, _ in batches) if flop_model is not None else 0.0,
            tokens=sum(generation.tokens.numel() for _, generation, _ in batches),
            seconds=sum(generation.seconds for _, generation, _ in batches),
        )


def generated_flops(shape: GenerationShape, generation: Generation, flop_model: FlopModel | None) -> float:
    """What a generation cost by ``flop_model`` (0.0 without one)."""
    return 0.0 if flop_model is None else shape.flops(flop_model, generation.tokens.shape[1])


def future_times(time: np.ndarray, horizon: int) -> np.ndarray:
    """``horizon`` time stamps after a series' ``time``, at its inferred step (timestamps: the
    inferred frequency, else the median step; numbers: the median step, 1 for one point)."""
    import pandas as pd

    if np.issubdtype(time.dtype, np.datetime64):
        index = pd.DatetimeIndex(time)
        frequency = pd.infer_freq(index) if len(index) >= 3 else None
        if frequency is not None:
            return pd.date_range(index[-1], periods=horizon + 1, freq=frequency)[1:].to_numpy()
        step = np.median(np.diff(time)) if len(time) > 1 else np.timedelta64(1, "D")
        return time[-1] + step * np.arange(1, horizon + 1)
    step = float(np.median(np.diff(time))) if len(time) > 1 else 1.0
    return float(time[-1]) + step * np.arange(1, horizon + 1)


def check_future(batch: dict, horizon: int) -> torch.Tensor:
    """The batch's (B, horizon, D) truth, or ValueError naming a trajectory that ends sooner."""
    future = batch["future"][:, :horizon]
    known = (~torch.isnan(future).any(dim=-1)).sum(dim=1)
    if future.shape[1] < horizon or bool((known < horizon).any()):
        row = int(torch.argmin(known)) if len(known) else 0
        steps = int(known[row]) if len(known) else 0
        raise ValueError(
            f"trajectory {int(batch['index'][row])} has {steps} steps after the prompt, fewer than the {horizon} "
            "to forecast (forecast.horizon)"
        )
    return future


class Forecaster:
    """Forecasts with a causal LM: LLMTIME prompts, our generation loop under the LLMTIME grammar,
    decoded back to the original scale (reference forecasters on the same prompts on request).

    Args:
        model: a Hugging Face causal LM (LoRA layers in place or not).
        tokenizer: the tokenizer the prompts are written with.
        forecast: generation settings (samples, temperature, top-p, grammar).
        encoding: how series become text (decimals; ``scale_from``: see ``data.prompts.scale_alphas``).
        compile: a static KV cache and a compiled per-token step (CUDA).
        flop_model: the model's FLOP model, so ``predict`` reports what generating cost.
        dataset_alpha: the training split's scale, for models trained with ``scale_from: dataset``.
        variables: the variables an adapter was trained on: contexts must have as many, and
            forecasts are named by them (default: any number, named as the data names them).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        forecast: ForecastArgs,
        encoding: EncodingArgs,
        compile: bool = False,
        flop_model: FlopModel | None = None,
        dataset_alpha: float | None = None,
        variables: tuple[str, ...] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.settings, self.encoding = model, tokenizer, forecast, encoding
        self.compile, self.flop_model, self.dataset_alpha = compile, flop_model, dataset_alpha
        self.variables = None if variables is None else tuple(variables)
        self._planned: tuple[tuple, tuple[LLMTimeGrammar, GenerationShape]] | None = None

    @classmethod
    def from_module(cls, module, forecast: ForecastArgs | None = None) -> Forecaster:
        """The forecaster of an ``LLMTimeLoRA`` (adapters used as they are, never merged)."""
        return cls(
            module.model, module.tokenizer, forecast or module.forecast, module.encoding, module.compiled_generation(),
            module.flop_model(), getattr(module, "dataset_alpha", None), getattr(module, "variables", None),
        )  # fmt: skip

    @classmethod
    def from_settings(
        cls,
        settings: dict[str, Any],
        forecast: ForecastArgs | dict | None = None,
        device: str | torch.device = "cpu",
        adapter: str | Path | None = None,
        dataset_alpha: float | None = None,
        variables: tuple[str, ...] | None = None,
    ) -> Forecaster:
        """A model built from ``LLMTimeLoRA``'s settings (``model_name_or_path``, ``model_config``,
        ``init_seed``, ``torch_dtype``, ``tokenizer``, ``output_vocab``, ``lora``, ``encoding``), with
        the ``adapter`` of a checkpoint loaded onto it."""
        lora = as_args(LoRAArgs, settings.get("lora") or LoRAArgs())
        tokenizer = settings.get("tokenizer") or OFFLINE_TOKENIZER
        network = build_model(
            settings.get("model_name_or_path") or DEFAULT_MODEL, settings.get("model_config"),
            settings.get("init_seed", 0), settings.get("torch_dtype", "float32"), tokenizer, lora,
        )  # fmt: skip
        if adapter is not None:
            load_adapter(network, adapter)
        network = network.to(device).eval()
        forecast = as_args(ForecastArgs, forecast or ForecastArgs())
        return cls(
            network, load_tokenizer(tokenizer), forecast,
            as_args(EncodingArgs, settings.get("encoding") or EncodingArgs()),
            static_generation(forecast.compile, torch.device(device).type == "cuda"),
            run_flop_model(network.config, lora, settings.get("output_vocab", "full")), dataset_alpha, variables,
        )  # fmt: skip

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        model_name_or_path: str | None = None,
        forecast: ForecastArgs | dict | None = None,
        device: str | torch.device = "cpu",
    ) -> Forecaster:
        """A trained adapter on its base model: the checkpoint's settings (encoding, LoRA, base model;
        ``model_name_or_path`` where the base model is now), ``forecast`` for the generation."""
        settings = model_settings(path)
        if model_name_or_path is not None:
            settings["model_name_or_path"] = model_name_or_path
        checkpoint = read_checkpoint(path)
        return cls.from_settings(
            settings, forecast, device, path, checkpoint.get("dataset_alpha"), checkpoint.get("variables")
        )

    @classmethod
    def from_model(
        cls,
        model_name_or_path: str = DEFAULT_MODEL,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        encoding: EncodingArgs | dict | None = None,
        forecast: ForecastArgs | dict | None = None,
        device: str | torch.device = "cpu",
        **model_args: Any,
    ) -> Forecaster:
        """A base model with no adapter (the untrained baseline); ``model_args`` as ``LLMTimeLoRA``'s
        (``init_seed``, ``torch_dtype``, ``output_vocab``)."""
        settings = {"model_name_or_path": model_name_or_path, "model_config": model_config, "tokenizer": tokenizer,
                    "encoding": encoding, "lora": LoRAArgs(targets=[])} | model_args  # fmt: skip
        return cls.from_settings(settings, forecast, device)

    # -- batches of the data module (predict, validation) --------------------------------------
    def horizon(self, batch: dict) -> int:
        """Steps to forecast: the batch's own ``horizon`` (validation forecasts), else ``forecast.horizon``."""
        return int(batch["horizon"]) if "horizon" in batch else self.settings.horizon

    def shape(self, batch: dict, horizon: int | None = None) -> GenerationShape:
        """What forecasting this batch computes at most (the FLOP budget charges it beforehand;
        a trajectory too short to score is refused here, before anything is charged)."""
        horizon = self.horizon(batch) if horizon is None else horizon
        check_future(batch, horizon)
        return self._plan(batch, horizon, self.settings)[1]

    def _plan(self, batch: dict, horizon: int, settings: ForecastArgs) -> tuple[LLMTimeGrammar, GenerationShape]:
        """A batch's grammar (fresh) and what generating it computes at most. The plan ``shape``
        made for a batch (the budget's charge) is the one its generation then uses: built once."""
        key = (batch["input_ids"], horizon, settings)
        if self._planned is not None and all(a is b for a, b in zip(self._planned[0], key, strict=True)):
            plan, self._planned = self._planned[1], None
            return plan
        grammar = batch_grammar(self.tokenizer, batch, settings, self.encoding, horizon)
        self._planned = (key, (grammar, generation_shape(batch["input_ids"], grammar, self.compile)))
        return self._planned[1]

    def __call__(
        self,
        batch: dict,
        horizon: int | None = None,
        references: tuple[str, ...] | list[str] = (),
        progress: Progress | None = None,
        generator: torch.Generator | None = None,
    ) -> ForecastResult:
        """Forecast ``horizon`` steps (default: see ``horizon``) of every prompt in ``batch``."""
        horizon = self.horizon(batch) if horizon is None else horizon
        future = check_future(batch, horizon)
        shape, generation, decoded = self.generate_batch(batch, horizon, self.settings, progress, generator)
        return ForecastResult.of(batch, future, shape, generation, decoded, references)

    def generate_batch(
        self,
        batch: dict,
        horizon: int,
        settings: ForecastArgs,
        progress: Progress | None = None,
        generator: torch.Generator | None = None,
        before: Callable[[GenerationShape], None] | None = None,
    ) -> tuple[GenerationShape, Generation, Forecasts]:
        """Generate and decode ``horizon`` steps after each left-padded prompt of ``batch``
        (``input_ids``, ``attention_mask``, (B, P, D) ``prompt`` and (B,) ``alpha``); ``before``
        sees what it will compute at most, first (and may refuse by raising)."""
        grammar, shape = self._plan(batch, horizon, settings)
        self._planned = None  # a grammar is used up by generating
        if before is not None:
            before(shape)
        generation = generate(
            self.model, batch["input_ids"], batch["attention_mask"], grammar, shape.max_new_tokens,
            settings.num_samples, settings.temperature, settings.top_p, generator=generator, progress=progress,
            compile=self.compile, static=self.compile,
        )  # fmt: skip
        texts = self.tokenizer.batch_decode(generation.tokens, skip_special_tokens=True)
        alphas, prompts = batch["alpha"].cpu().numpy(), batch["prompt"].cpu().numpy()
        return shape, generation, decode_forecasts(texts, alphas, prompts, horizon, self.encoding.transform)

    # -- users' series -------------------------------------------------------------------------
    def predict(
        self,
        context,
        horizon: int,
        num_samples: int | None = None,
        quantile_levels: tuple[float, ...] | list[float] = QUANTILE_LEVELS,
        alpha: float | list[float] | np.ndarray | None = None,
        batch_size: int = 16,
        generator: torch.Generator | None = None,
        before_batch: Callable[[GenerationShape], None] | None = None,
        after_batch: Callable[[float], None] | None = None,
        progress: bool = False,
    ) -> Prediction:
        """Forecast ``horizon`` steps after each context: a (T, D) or (N, T, D) array, a list of
        (T_i, D) arrays of different lengths (1-D: one variable; arrays take the adapter's variable
        names) or a ``SeriesSet``. ``alpha`` overrides the scales (``scale_alphas``), ``num_samples``
        the configured samples (1: greedy); ``before_batch`` sees each batch's FLOP bound before it
        runs (a budget's charge), ``after_batch`` its cost; ``progress``: a bar (on a terminal)."""
        series = context if isinstance(context, SeriesSet) else from_arrays(context, source="context")
        if self.variables is not None and len(self.variables) == len(series.variables) and series is not context:
            series.variables = self.variables
        if horizon < 1 or batch_size < 1:
            raise ValueError(f"horizon and batch_size must be >= 1, got {horizon} and {batch_size}")
        if self.variables is not None and len(self.variables) != len(series.variables):
            raise ValueError(
                f"this adapter was trained on {len(self.variables)} variables {self.variables}; "
                f"the context has {len(series.variables)}"
            )
        values = series.values
        alphas = (
            scale_alphas(values, self.encoding, self.dataset_alpha, contexts=True)
            if alpha is None
            else np.broadcast_to(np.asarray(alpha, dtype=np.float64), (len(values),))
        )
        settings = self.settings if num_samples is None else replace(self.settings, num_samples=num_samples)
        device = next(self.model.parameters()).device
        done = []
        batches = prompt_batches(self.tokenizer, series, alphas, self.encoding, batch_size, device)
        for number, batch in enumerate(batches, start=1):
            description = f"forecast batch {number} of {-(-len(values) // batch_size)}"
            with StepProgress(horizon, description, disable=None if progress else True) as bar:  # None: a terminal's
                shape, generation, decoded = self.generate_batch(batch, horizon, settings, bar, generator, before_batch)
            done.append((shape, generation, decoded))
            if after_batch is not None:
                after_batch(generated_flops(shape, generation, self.flop_model))
        return Prediction.of(series.variables, quantile_levels, alphas, done, self.flop_model)

    def predict_df(
        self,
        df,
        horizon: int,
        id_column: str = ID_COLUMN,
        timestamp_column: str = TIME_COLUMN,
        target: list[str] | None = None,
        num_samples: int | None = None,
        quantile_levels: tuple[float, ...] | list[float] = QUANTILE_LEVELS,
        **predict_args: Any,
    ):
        """Forecast every series of a long-format DataFrame (as Chronos' ``predict_df``): one row
        per series and future time stamp (continued at each series' inferred frequency), a column
        per variable (the median) and ``<variable>_<level>`` per quantile level."""
        series = series_from_frame(df, id_column, timestamp_column, target, source="DataFrame")
        prediction = self.predict(series, horizon, num_samples, quantile_levels, **predict_args)
        return prediction_frame(series, prediction, id_column, timestamp_column)


def prediction_frame(series: SeriesSet, prediction: Prediction, id_column: str = ID_COLUMN,
                     time_column: str = TIME_COLUMN, times: list[np.ndarray] | None = None):  # fmt: skip
    """A long DataFrame of ``prediction``: series id, time (``times``, default: each series' own
    continued), the median per variable and its quantiles as ``<variable>_<level>``."""
    import pandas as pd

    horizon = prediction.median.shape[1]
    frames = []
    for row, name in enumerate(series.ids):
        columns: dict[str, Any] = {
            id_column: name,
            time_column: future_times(series.time[row], horizon) if times is None else times[row],
        }
        for k, variable in enumerate(series.variables):
            columns[variable] = prediction.median[row, :, k]
            for q, level in enumerate(prediction.quantile_levels):
                columns[f"{variable}_{level:g}"] = prediction.quantiles[row, q, :, k]
        frames.append(pd.DataFrame(columns))
    return pd.concat(frames, ignore_index=True)
