"""``predict``'s forecasts written to files: arrays, metrics tables and figures."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from lit_llmtime.forecasting.evaluation import (
    load_npz,
    merge_predictions,
    save_npz,
    summary_lines,
    write_forecast_outputs,
)


class ForecastWriter(BasePredictionWriter):
    """Writes ``predict``'s forecasts under the run's log folder: ``predictions.npz``,
    ``metrics.json``, ``metrics.md`` (like the report's tables 4 and 5) and PNG figures (like
    figures 2 and 5), which also go to TensorBoard. Under several devices each rank writes its
    part and rank 0 merges them once.

    Args:
        output_dir: folder for the files (default: ``<log dir>/forecast``).
        max_figures: figures are drawn for at most this many trajectories.
    """

    def __init__(self, output_dir: str | None = None, max_figures: int = 12) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.max_figures = max_figures

    def _folder(self, trainer: L.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "forecast"

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        folder = self._folder(trainer)
        if trainer.world_size > 1:
            if predictions:  # a rank may have had nothing to forecast
                merged = merge_predictions([result.predictions() for result in predictions])
                save_npz(folder / f"rank{trainer.global_rank}.npz", merged)
            trainer.strategy.barrier()
            if not trainer.is_global_zero:
                return
            files = [folder / f"rank{r}.npz" for r in range(trainer.world_size)]
            predictions = [load_npz(path) for path in files if path.is_file()]
            for path in files:
                path.unlink(missing_ok=True)
        if not predictions:
            return
        part = merge_predictions([p if isinstance(p, dict) else p.predictions() for p in predictions])
        scale_from = getattr(getattr(pl_module, "encoding", None), "scale_from", None)
        summary = write_forecast_outputs(folder, part, trainer.logger, self.max_figures, scale_from)
        figures = sorted(folder.glob("forecast_*.png"))
        print(summary_lines(summary, folder / "metrics.md", figures), flush=True)
