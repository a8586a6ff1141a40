"""One markdown report of a study: the ledger (Table 6), sweep tables (2, 3), loss curves of the
final run (figures 3, 4) and the forecast tables and figures (tables 4, 5, figure 5)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_llmtime.budget.ledger import DEFAULT_BUDGET, Ledger
from lit_llmtime.io import write_text_atomic


def read_scalars(log_dir: str | Path, tag: str) -> tuple[list[int], list[float]]:
    """Steps and values of one scalar from a run's TensorBoard event files."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return [], []
    scalars = events.Scalars(tag)
    return [s.step for s in scalars], [s.value for s in scalars]


def plot_loss_curves(log_dir: str | Path, folder: Path) -> list[Path]:
    """Figure 3 (whole run) and figure 4 (second half) of training loss, validation loss dashed."""
    from lit_llmtime.forecasting.plots import plt, save_figure

    steps, train = read_scalars(log_dir, "train/loss")
    val_steps, val = read_scalars(log_dir, "val/loss")
    if not steps:
        raise ValueError(f"{log_dir}: no train/loss in its TensorBoard events")
    paths = []
    for name, start in (("loss_curve.png", 0), ("loss_curve_second_half.png", steps[-1] // 2)):
        fig, ax = plt.subplots(figsize=(8, 4))
        keep = [i for i, s in enumerate(steps) if s >= start]
        ax.plot([steps[i] for i in keep], [train[i] for i in keep], label="training loss")
        if val:
            ax.plot(val_steps, val, "o--", color="tab:red", label="validation loss")
            ax.axhline(val[-1], color="tab:red", linestyle=":", label=f"final validation loss {val[-1]:.4f}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("cross-entropy")
        ax.legend()
        fig.tight_layout()
        paths.append(save_figure(fig, folder / name))
    return paths


def build_report(
    ledger: str | Path,
    out: str | Path,
    budget: float = DEFAULT_BUDGET,
    sweeps: list[str] | None = None,
    final_run: str | None = None,
    forecast: str | None = None,
) -> Path:
    """Write ``<out>/report.md`` with its figures next to it."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    sections = ["# lit-llmtime report", "", "## FLOP ledger (Table 6)", "", Ledger(ledger).table(budget)]
    for sweep in sweeps or []:
        path = Path(sweep)
        path = path / "sweep.md" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: sweep table not found (run `lit-llmtime sweep` first)")
        sections += [path.read_text().replace("# Sweep", "## Sweep", 1)]
    if final_run:
        curves = plot_loss_curves(final_run, folder)
        sections += ["## Final run: loss curves (figures 3 and 4)", ""]
        sections += [f"![{p.stem}]({p.name})" for p in curves] + [""]
    if forecast:
        source = Path(forecast)
        metrics = source / "metrics.md"
        if not metrics.is_file():
            raise FileNotFoundError(f"{metrics}: no forecast metrics (run `lit-llmtime predict` first)")
        sections += ["## Forecasts (tables 4 and 5, figure 5)", "", metrics.read_text().replace("## ", "### ")]
        for png in [*sorted(source.glob("error_by_horizon.png")), *sorted(source.glob("forecast_*.png"))]:
            shutil.copyfile(png, folder / png.name)
            sections += [f"![{png.stem}]({png.name})", ""]
    return write_text_atomic(folder / "report.md", "\n".join(sections) + "\n")
