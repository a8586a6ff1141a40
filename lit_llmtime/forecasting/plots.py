"""Figures like the report's: encode-decode check (fig. 1), forecasts vs truth (figs. 2 and 5)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lit_llmtime.data.series import default_variables  # noqa: E402
from lit_llmtime.io import atomic_path  # noqa: E402

COLORS = {"truth": "black", "forecast": "tab:blue", "persistence": "tab:gray", "lotka_volterra": "tab:green"}


def plot_forecast(
    time: np.ndarray,
    prompt: np.ndarray,
    truth: np.ndarray,
    forecast: np.ndarray,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    references: dict[str, np.ndarray] | None = None,
    title: str = "",
    variables: tuple[str, ...] | None = None,
) -> Figure:
    """A panel per variable (prey and predator): the prompt, the truth after it (``truth`` None:
    not known), the forecast (and its 5-95% band) and references. ``time`` covers the prompt's
    steps and then the forecast's."""
    steps, horizon = len(prompt), len(forecast)
    future = time[steps : steps + horizon]
    variables = variables or default_variables(prompt.shape[1])
    fig, axes = _panels(len(variables), 4)
    for k, (ax, name) in enumerate(zip(axes, variables, strict=True)):
        ax.axvspan(time[0], time[steps - 1], color="0.92", label="prompt")
        ax.plot(time[:steps], prompt[:, k], color=COLORS["truth"])
        if truth is not None:
            ax.plot(future, truth[:, k], color=COLORS["truth"], label="truth")
        if lower is not None and upper is not None and not np.allclose(lower, upper, equal_nan=True):
            ax.fill_between(future, lower[:, k], upper[:, k], color=COLORS["forecast"], alpha=0.2, label="5-95%")
        ax.plot(future, forecast[:, k], color=COLORS["forecast"], marker=".", label="LLM forecast")
        for ref_name, values in (references or {}).items():
            ax.plot(future, values[:, k], color=COLORS.get(ref_name), linestyle="--", label=ref_name)
        ax.set_title(f"{title} {name}".strip())
        ax.set_xlabel("time")
    axes[0].set_ylabel("population" if tuple(variables) == ("prey", "predator") else "value")
    axes[-1].legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


def _panels(count: int, height: float) -> tuple[Figure, list]:
    """A row of ``count`` panels sharing the time axis (two for prey and predator)."""
    fig, axes = plt.subplots(1, count, figsize=(6 * count, height), sharex=True, squeeze=False)
    return fig, list(axes[0])


def plot_errors(
    time: np.ndarray, truth: np.ndarray, forecast: np.ndarray, title: str = "", variables: tuple[str, ...] | None = None
) -> Figure:
    """Absolute forecast errors per variable (report fig. 1b style)."""
    variables = variables or default_variables(truth.shape[1])
    fig, axes = _panels(len(variables), 3.5)
    for k, (ax, name) in enumerate(zip(axes, variables, strict=True)):
        ax.plot(time, np.abs(forecast[:, k] - truth[:, k]), color="tab:red", marker=".")
        ax.set_title(f"{title} |error| {name}".strip())
        ax.set_xlabel("time")
    fig.tight_layout()
    return fig


def plot_horizon(errors: dict[str, dict[str, list[float]]], variables, title: str = "") -> Figure:
    """Mean absolute error at each step ahead, a line per forecaster (``errors[name][variable]``)
    and a panel per variable: where each rollout goes wrong."""
    fig, axes = _panels(len(variables), 3.5)
    for ax, variable in zip(axes, variables, strict=True):
        for name, per_variable in errors.items():
            values = per_variable[variable]
            color = COLORS["forecast"] if name == "LLM" else COLORS.get(name)
            style = "-" if name == "LLM" else "--"
            ax.plot(np.arange(1, len(values) + 1), values, style, color=color, label=name)
        ax.set_title(f"{title} MAE by steps ahead: {variable}".strip())
        ax.set_xlabel("steps ahead")
    axes[0].set_ylabel("mean absolute error")
    axes[-1].legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def plot_encode_check(
    time: np.ndarray, trajectory: np.ndarray, decoded: np.ndarray, index: int, variables: tuple[str, ...] | None = None
) -> Figure:
    """Report fig. 1: the trajectory, its encode-decode round trip, and their absolute difference."""
    variables = variables or default_variables(trajectory.shape[1])
    fig, axes = plt.subplots(2, len(variables), figsize=(6 * len(variables), 7), sharex=True, squeeze=False)
    for k, name in enumerate(variables):
        axes[0, k].plot(time, trajectory[:, k], color="black", label="original")
        axes[0, k].plot(time, decoded[:, k], color="tab:orange", linestyle="--", label="decoded")
        axes[0, k].set_title(f"sample {index}: {name}")
        axes[1, k].plot(time, np.abs(decoded[:, k] - trajectory[:, k]), color="tab:red")
        axes[1, k].set_title(f"|decoded - original| {name}")
        axes[1, k].set_xlabel("time")
    axes[0, -1].legend()
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save as PNG atomically and close the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
