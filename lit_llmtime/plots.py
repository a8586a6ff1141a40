"""Figures like the report's: encode-decode check (fig. 1), forecasts vs truth (figs. 2 and 5)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lit_llmtime.io import atomic_path  # noqa: E402
from lit_llmtime.metrics import SPECIES  # noqa: E402

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
) -> Figure:
    """Prey and predator panels: prompt and truth, the forecast (and its 5-95% band), references."""
    steps = len(prompt)
    future = time[steps : steps + len(truth)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    for k, (ax, name) in enumerate(zip(axes, SPECIES, strict=True)):
        ax.axvspan(time[0], time[steps - 1], color="0.92", label="prompt")
        ax.plot(time[:steps], prompt[:, k], color=COLORS["truth"])
        ax.plot(future, truth[:, k], color=COLORS["truth"], label="truth")
        if lower is not None and upper is not None and not np.allclose(lower, upper, equal_nan=True):
            ax.fill_between(future, lower[:, k], upper[:, k], color=COLORS["forecast"], alpha=0.2, label="5-95%")
        ax.plot(future, forecast[:, k], color=COLORS["forecast"], marker=".", label="LLM forecast")
        for ref_name, values in (references or {}).items():
            ax.plot(future, values[:, k], color=COLORS.get(ref_name), linestyle="--", label=ref_name)
        ax.set_title(f"{title} {name}".strip())
        ax.set_xlabel("time")
    axes[0].set_ylabel("population")
    axes[1].legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


def plot_errors(time: np.ndarray, truth: np.ndarray, forecast: np.ndarray, title: str = "") -> Figure:
    """Absolute forecast errors per species (report fig. 1b style)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), sharex=True)
    for k, (ax, name) in enumerate(zip(axes, SPECIES, strict=True)):
        ax.plot(time, np.abs(forecast[:, k] - truth[:, k]), color="tab:red", marker=".")
        ax.set_title(f"{title} |error| {name}".strip())
        ax.set_xlabel("time")
    fig.tight_layout()
    return fig


def plot_encode_check(time: np.ndarray, trajectory: np.ndarray, decoded: np.ndarray, index: int) -> Figure:
    """Report fig. 1: the trajectory, its encode-decode round trip, and their absolute difference."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    for k, name in enumerate(SPECIES):
        axes[0, k].plot(time, trajectory[:, k], color="black", label="original")
        axes[0, k].plot(time, decoded[:, k], color="tab:orange", linestyle="--", label="decoded")
        axes[0, k].set_title(f"sample {index}: {name}")
        axes[1, k].plot(time, np.abs(decoded[:, k] - trajectory[:, k]), color="tab:red")
        axes[1, k].set_title(f"|decoded - original| {name}")
        axes[1, k].set_xlabel("time")
    axes[0, 1].legend()
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save as PNG atomically and close the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
