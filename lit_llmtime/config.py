"""Typed groups of run settings. LightningCLI turns each into a YAML section and ``--help`` text
(``model.lora.rank: 8``, ``data.encoding.decimals: 2``), as LitGPT does with its argument classes."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

TRANSFORMS = ("none", "log")  # data.encoding.transform: lit_llmtime.text.codec writes them
REFERENCE_FORECASTERS = ("persistence", "auto_arima", "auto_ets", "auto_theta", "log_var", "lotka_volterra")
_said: set[str] = set()


def deprecated(old: str, new: str) -> None:
    """Say once per process, in one line on stderr, that ``old`` is now ``new`` (``old`` still works)."""
    if old not in _said:
        _said.add(old)
        print(f"lit-llmtime: {old} is deprecated, use {new} (the old name still works for now)", file=sys.stderr)


DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


@dataclass
class EncodingArgs:
    """How trajectories become LLMTIME text. Owned by the data module and linked to the model, so
    training windows, validation and forecast prompts are always written the same way.

    Args:
        decimals: decimals kept for every value.
        scale_from: where each series' scale alpha comes from: ``dataset`` (one alpha from the
            training split, kept in checkpoints: leak-free, the default), ``prompt`` (its first
            ``prompt_steps`` steps: leak-free, per series, for files whose series differ in
            magnitude) or ``trajectory`` (all its steps, as the report: a look-ahead, since the
            forecast's own future sets its prompt's scale; ``configs/qwen2.5-0.5b/look-ahead.yaml``).
        prompt_steps: time steps given to the model when forecasting (and the span of ``prompt``).
        transform: ``none`` (the scaled value ``v``, as LLMTIME) or ``log`` (``sign(v) log(1 + |v| /
            0.01)``, inverted on decoding: growth by a factor becomes a step of fixed size, as in
            Lotka-Volterra dynamics, and troughs keep as many digits as peaks).
    """

    decimals: int = 2
    scale_from: Literal["trajectory", "prompt", "dataset"] = "dataset"
    prompt_steps: int = 50
    transform: Literal["none", "log"] = "none"

    def __post_init__(self) -> None:
        if self.decimals < 0:
            raise ValueError(f"encoding.decimals must be >= 0, got {self.decimals}")
        if self.prompt_steps < 2:
            raise ValueError(f"encoding.prompt_steps must be >= 2, got {self.prompt_steps}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"encoding.transform must be one of {TRANSFORMS}, got {self.transform!r}")


@dataclass
class ForecastValidationArgs:
    """Forecasts at every validation: forecast skill beside the token loss, since the loss can fall
    while forecasts get worse. Logged as ``val/forecast/*`` (MAE, MASE, R² per species, a figure),
    charged to the FLOP budget like the rest of validation and predicted by ``lit-llmtime flops``.

    Args:
        trajectories: validation trajectories forecast each time, the first ones of the validation
            split, in one generation batch (0: none).
        horizon: steps forecast after each prompt of ``encoding.prompt_steps`` steps.
    """

    trajectories: int = 8
    horizon: int = 50

    def __post_init__(self) -> None:
        if self.trajectories < 0 or self.horizon < 1:
            raise ValueError(
                "forecast_validation.trajectories must be >= 0 and horizon >= 1, "
                f"got {self.trajectories}, {self.horizon}"
            )


@dataclass
class LoRAArgs:
    """LoRA adapters (Hu et al., 2021) on the frozen base model.

    Args:
        rank: LoRA rank r.
        alpha: the update is scaled by alpha / r; defaults to r (scale 1, the coursework skeleton).
        dropout: dropout on the LoRA path's input.
        targets: linear layers adapted in every block.
        train_lm_head_bias: add a trainable zero-initialised lm_head bias (the coursework skeleton;
            the report trained only A and B).
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    train_lm_head_bias: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")


@dataclass
class OptimArgs:
    """The optimiser: Adam (AdamW with weight decay) over the trainable parameters.

    Args:
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay; 0 gives the report's plain Adam.
        warmup_steps: linear warm-up steps.
        schedule: ``constant`` after warm-up, or ``cosine`` decay to 0 over the run.
    """

    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class ForecastArgs:
    """Forecasting in ``predict``: generation settings and the forecasters compared with the model.

    Args:
        horizon: time steps generated after each prompt.
        num_samples: forecasts per trajectory; 1 is greedy, more are sampled and summarised by
            their median and a 5-95% band.
        temperature: sampling temperature (``num_samples > 1``).
        top_p: nucleus sampling threshold (``num_samples > 1``).
        constrained: ``grammar`` (every step is one number per variable, ``x,y;``, with the encoding's decimals,
            so every step parses), ``alphabet`` (only LLMTIME characters) or ``none``.
        max_integer_digits: integer digits a generated number may have under ``grammar`` (an outer
            limit; ``max_prompt_multiple`` is the one that bites).
        max_prompt_multiple: under ``grammar``, a generated value may reach at most this multiple of
            the largest (absolute, scaled) value of that variable in its series' prompt; None: only
            ``max_integer_digits`` bounds it. Real trajectories' later peaks reach up to 1.96x their
            prompt's largest value (1.37x at the 95th percentile), simulated ones up to 2.07x (prey)
            and 2.84x (predator) that variable's, so 3 leaves them room.
        reference_forecasters: classical forecasters run on the same prompts and scored on the
            same steps: ``persistence``, statsforecast's ``auto_arima``, ``auto_ets``,
            ``auto_theta`` (per variable, no season), ``log_var`` (a VAR on log values, order
            1-3 by AIC) and ``lotka_volterra`` (the ODE fitted to the prompt; two variables).
        compile: ``auto`` (on CUDA), ``on`` or ``off``: a preallocated KV cache and a per-token step
            compiled with ``torch.compile`` (CUDA graphs), instead of a growing cache run eagerly.
        forecast_steps: deprecated name of ``horizon``.
    """

    horizon: int = 50
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    constrained: Literal["grammar", "alphabet", "none"] = "grammar"
    max_integer_digits: int = 3
    max_prompt_multiple: float | None = 3.0
    reference_forecasters: list[str] = field(default_factory=lambda: list(REFERENCE_FORECASTERS))
    compile: Literal["auto", "on", "off"] = "auto"
    forecast_steps: int | None = None

    def __post_init__(self) -> None:
        if self.forecast_steps is not None:
            deprecated("forecast.forecast_steps", "forecast.horizon")
            self.horizon, self.forecast_steps = self.forecast_steps, None
        if self.horizon < 1 or self.num_samples < 1:
            raise ValueError(
                f"forecast.horizon and forecast.num_samples must be >= 1, got {self.horizon} and {self.num_samples}"
            )
        if self.max_prompt_multiple is not None and not self.max_prompt_multiple > 0:
            raise ValueError(f"forecast.max_prompt_multiple must be > 0 or null, got {self.max_prompt_multiple}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"forecast.temperature must be > 0 and forecast.top_p in (0, 1], got {self.temperature}, {self.top_p}"
            )
        unknown = sorted(set(self.reference_forecasters) - set(REFERENCE_FORECASTERS))
        if unknown:
            raise ValueError(f"unknown reference forecasters {unknown}; choose from {list(REFERENCE_FORECASTERS)}")


Args = TypeVar("Args")


def as_args(cls: type[Args], value: Any) -> Args:
    """A settings group as its own copy of the dataclass, from an instance (a signature default is one
    shared object), a dict (checkpoint hyperparameters) or a parsed config's Namespace."""
    if isinstance(value, cls):
        return copy.deepcopy(value)
    return cls(**(value.as_dict() if hasattr(value, "as_dict") else dict(value)))
