"""The FLOP ledger: one JSON line per run, so one budget covers every experiment (report Table 6)."""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lit_llmtime.io import write_text_atomic

DEFAULT_LEDGER = "lightning_logs/flop_ledger.jsonl"


class LedgerError(ValueError):
    """The ledger file cannot be read."""


class Ledger:
    """Records ``{"run_id", "name", "stage", "config", "steps", "flops", "status", ...}`` by run id.

    Each update rewrites the file atomically under a lock, so a killed run leaves the ledger as
    of its last update and two runs sharing a ledger do not lose each other's records.
    """

    def __init__(self, path: str | Path = DEFAULT_LEDGER) -> None:
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                float(record["flops"]), record["run_id"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise LedgerError(f"{self.path}, line {number}: not a ledger record ({error})") from error
            records.append(record)
        return records

    def get(self, run_id: str) -> dict[str, Any] | None:
        return next((r for r in self.records() if r["run_id"] == run_id), None)

    def total(self, exclude: str | None = None) -> float:
        """FLOPs of every recorded run (but ``exclude``)."""
        return sum(float(r["flops"]) for r in self.records() if r["run_id"] != exclude)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def upsert(self, record: dict[str, Any]) -> None:
        """Insert or replace the record with ``record["run_id"]``."""
        record = {**record, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with self._locked():
            records = [r for r in self.records() if r["run_id"] != record["run_id"]] + [record]
            records.sort(key=lambda r: r.get("started", ""))
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def table(self, budget: float) -> str:
        """The ledger as the report's Table 6 (markdown)."""
        lines = [
            "| Experiment | Stage | Status | Training steps | Total FLOPs | % Budget used |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in self.records():
            lines.append(
                f"| {r.get('name', r['run_id'])} | {r.get('stage', '')} | {r.get('status', '')} | "
                f"{r.get('steps', 0)} | {float(r['flops']):.3e} | {100 * float(r['flops']) / budget:.4f}% |"
            )
        spent = self.total()
        lines.append(f"| **Total used** | | | | {spent:.3e} | **{100 * spent / budget:.4f}%** |")
        lines.append(f"| **Remaining** | | | | {budget - spent:.3e} | **{100 * (budget - spent) / budget:.4f}%** |")
        return "\n".join(lines) + "\n"
