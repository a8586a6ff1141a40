"""lit-llmtime: LoRA fine-tuning of Qwen2.5 to forecast time series written as LLMTIME text, under
a FLOP budget, with PyTorch Lightning.

The public API (imported on first use, so ``lit-llmtime --help`` stays fast)::

    from lit_llmtime import Forecaster, LLMTimeLoRA, SeriesDataModule, load_series, simulate
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
PUBLIC = {
    "Forecaster": "lit_llmtime.forecasting.forecaster",
    "Prediction": "lit_llmtime.forecasting.forecaster",
    "LLMTimeLoRA": "lit_llmtime.training.module",
    "SeriesDataModule": "lit_llmtime.data.module",
    "SeriesSet": "lit_llmtime.data.series",
    "load_series": "lit_llmtime.data.series",
    "save_series": "lit_llmtime.data.series",
    "from_arrays": "lit_llmtime.data.series",
    "simulate": "lit_llmtime.data.simulate",
    "FlopModel": "lit_llmtime.model.flops",
    "LoRALinear": "lit_llmtime.model.lora",
    "FlopBudget": "lit_llmtime.budget.callback",
}
__all__ = [*PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in PUBLIC:
        return getattr(import_module(PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
