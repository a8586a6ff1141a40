"""Forecast skill at validation: mean scores of the validation forecasts, logged beside the loss."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric

from lit_llmtime.forecasting.forecaster import ForecastResult
from lit_llmtime.forecasting.metrics import score
from lit_llmtime.forecasting.references import reference_forecast

VALIDATION_REFERENCES = ("persistence", "log_var")  # milliseconds a series: cheap at every validation


def first_forecast_figure(result: ForecastResult, step: int):
    """The figure of a batch's first forecast (validation's, in TensorBoard)."""
    from lit_llmtime.forecasting.plots import plot_forecast

    return plot_forecast(
        result.time, result.prompt[0], result.truth[0], result.forecast[0], result.lower[0], result.upper[0],
        title=f"validation sample {result.index[0]}, step {step}", variables=result.variables,
    )  # fmt: skip


class ForecastSkill(nn.Module):
    """Mean forecast scores over validation trajectories, synchronised across devices: MAE, MSE,
    R² and MASE per variable (``mae_prey``), MASE over all variables (a checkpoint can be chosen by
    it), the share of steps that parsed, and with sampling CRPS and the weighted quantile loss.
    The per-variable means are made at the first update, when the variables' names are known
    (every rank forecasts the same variables, so they synchronise alike). Beside them, the MAE of
    the cheap references on the same series (``val/reference/<name>/mae_<variable>``): the lines
    the LLM's curve has to go below."""

    def __init__(self) -> None:
        super().__init__()
        self.means = nn.ModuleDict({key: MeanMetric(nan_strategy="ignore") for key in ("mase", "valid_share")})
        self.figure: ForecastResult | None = None

    @property
    def update_count(self) -> int:
        return self.means["mase"].update_count

    def _mean(self, key: str) -> MeanMetric:
        """The mean named ``key``, made on first use on the device of the others."""
        slot = key.replace(".", "·")  # a module name cannot hold "." (a column "pm2.5")
        if slot not in self.means:
            self.means[slot] = MeanMetric(nan_strategy="ignore").to(self.means["mase"].device)
        return self.means[slot]

    def update(self, result: ForecastResult) -> None:
        self.figure = self.figure or result  # the pass's first forecasts, drawn in TensorBoard
        for row in range(len(result.index)):
            scores = score(
                result.truth[row], result.forecast[row], result.prompt[row], result.samples[row], result.variables
            )
            for variable, values in scores.items():
                for name, value in values.items():
                    self._mean(f"{name}_{variable}").update(value)
            self.means["mase"].update(float(np.mean([values["mase"] for values in scores.values()])))
            self.means["valid_share"].update(float(result.valid_share[row]))
        horizon = result.truth.shape[1]
        for name in VALIDATION_REFERENCES:
            forecasts = reference_forecast(name, result.prompt, result.time, horizon)
            errors = np.abs(forecasts - result.truth).mean(axis=1)  # (N, V)
            for k, variable in enumerate(result.variables):
                self._mean(f"reference/{name}/mae_{variable}").update(torch.from_numpy(errors[:, k]))

    def compute(self) -> dict[str, torch.Tensor]:
        return {key.replace("·", "."): metric.compute() for key, metric in self.means.items()}

    def log_to(self, module: L.LightningModule) -> None:
        """Log the means as ``val/forecast/*`` and the pass's first forecast as the figure
        ``val/forecast``, and reset; in the sanity check (which Lightning does not log), straight to
        the logger at step 0: the skill of the weights before training."""
        skill = {  # the references' under val/reference/*
            f"val/{name}" if name.startswith("reference/") else f"val/forecast/{name}": value
            for name, value in self.compute().items()
        }
        result = self.figure
        self.reset()
        trainer, logger = module.trainer, module.logger
        if not trainer.sanity_checking:
            for name, value in skill.items():
                module.log(name, value, sync_dist=False)
        elif logger is not None and trainer.is_global_zero:
            logger.log_metrics({name: float(value) for name, value in skill.items()}, step=0)
        experiment = getattr(logger, "experiment", None)
        if result is not None and trainer.is_global_zero and hasattr(experiment, "add_figure"):
            experiment.add_figure("val/forecast", first_forecast_figure(result, module.global_step), module.global_step)

    def reset(self) -> None:
        self.figure = None
        for metric in self.means.values():
            metric.reset()
