"""Hyperparameter sweeps: stages of grids over a base config, each run a normal ``lit-llmtime fit``
charged to one FLOP ledger; resumable, and a run that cannot fit the budget is skipped."""

from __future__ import annotations

import csv
import io
import itertools
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_llmtime.app.run import newest_checkpoint, resolve_run, run_identity
from lit_llmtime.budget.ledger import DEFAULT_BUDGET, DEFAULT_LEDGER, Budget, Ledger
from lit_llmtime.budget.plan import plan_fit
from lit_llmtime.budget.signals import Interrupted
from lit_llmtime.io import write_text_atomic

FINISHED = ("finished", "stopped: budget")
REUSABLE = ("done", "done before", "would run")  # a later run with the same configuration reuses these


@dataclass
class Run:
    """One fit of a sweep: its name, stage and the dotted overrides of the base config."""

    name: str
    stage: str
    overrides: dict[str, Any]
    status: str = "pending"
    predicted_flops: float = 0.0
    record: dict[str, Any] | None = field(default=None, repr=False)
    identity: dict[str, Any] | None = field(default=None, repr=False)


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file (``name``, ``base``, ``stages``; optional ``budget``, ``ledger``,
    ``reserve``: FLOPs the sweep must leave for later work such as the final run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: sweep file not found")
    spec = yaml.safe_load(path.read_text()) or {}
    for key in ("name", "base", "stages"):
        if key not in spec:
            raise ValueError(f"{path}: missing '{key}'")
    base = Path(spec["base"])
    if not base.is_file():
        raise FileNotFoundError(f"{path}: base config {base} not found")
    for i, stage in enumerate(spec["stages"]):
        if "name" not in stage:
            raise ValueError(f"{path}: stage {i} has no 'name'")
        runs = stage.get("runs") or []
        if not isinstance(runs, list) or not all(isinstance(r, dict) and r for r in runs):
            raise ValueError(f"{path}: stage '{stage['name']}', 'runs' must be a list of non-empty mappings")
        for key, values in (stage.get("grid") or {}).items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: stage '{stage['name']}', grid key '{key}' needs a non-empty list")
    spec.setdefault("ledger", DEFAULT_LEDGER)
    spec.setdefault("budget", DEFAULT_BUDGET)
    spec.setdefault("reserve", 0.0)
    return spec


def _value_name(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def stage_runs(spec: dict[str, Any], stage: dict[str, Any], best: dict[str, Any] | None) -> list[Run]:
    """The runs of one stage: its ``grid`` (every combination) or its explicit ``runs`` list, on top
    of the sweep's and the stage's fixed overrides and, for ``inherit_best`` keys, the values of
    the best run so far."""
    inherited = list(stage.get("inherit_best") or [])
    fixed = dict(spec.get("overrides") or {}) | dict(stage.get("overrides") or {})
    for key in inherited:
        if best is None:
            raise ValueError(f"stage '{stage['name']}' inherits {key} from the best run, but no run has finished")
        fixed[key] = best[key]
    grid = stage.get("grid") or {}
    choices = stage.get("runs") or [
        dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())
    ]
    runs = []
    for choice in choices:
        overrides = fixed | choice
        label = "-".join(
            f"{k.rsplit('.', 1)[-1]}={_value_name(v)}" for k, v in overrides.items() if k in choice or k in inherited
        )
        runs.append(Run(f"{spec['name']}-{stage['name']}-{label or 'run'}", stage["name"], overrides))
    return runs


def resolved(spec: dict[str, Any], run: Run) -> Any:
    """The resolved configuration the run's ``fit`` will have (same arguments, same parser)."""
    return resolve_run(_arguments(spec, run, None))


def _arguments(spec: dict[str, Any], run: Run, checkpoint: Path | None) -> list[str]:
    args = [
        "fit", "--config", str(spec["base"]),
        f"--trainer.logger.init_args.name={run.name}",
        f"--flop_budget.run_name={run.name}",
        f"--flop_budget.ledger={spec['ledger']}",
        f"--flop_budget.budget={spec['budget']}",
    ]  # fmt: skip
    args += [
        f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        for key, value in run.overrides.items()
    ]
    if checkpoint is not None:
        args.append(f"--ckpt_path={checkpoint}")
    return args


def _finished_record(ledger: Ledger, name: str) -> dict[str, Any] | None:
    done = [
        r
        for r in ledger.records()
        if r.get("name") == name and r.get("stage") == "fit" and str(r.get("status")).startswith(FINISHED)
    ]
    return done[-1] if done else None


def run_sweep(path: str | Path, dry_run: bool = False) -> list[Run]:
    """Run every stage of a sweep, skipping completed runs and runs the budget cannot afford; a run
    whose resolved configuration equals an earlier run's is not trained again but reuses it."""
    spec = load_sweep(path)
    ledger = Ledger(spec["ledger"])
    budget = Budget(ledger, spec["budget"])
    runs: list[Run] = []
    planned = 0.0  # a dry run's would-be spending
    for stage in spec["stages"]:
        best = best_overrides(runs)
        if best is None and stage.get("inherit_best") and dry_run:
            best = assumed_best(runs)
            if best is None:
                print(f"[sweep] stage {stage['name']} depends on the best run and none is planned: not planned")
                break
            print(f"[sweep] stage {stage['name']}: assuming the best run so far is the costliest, {best[1].name}")
            best = best[0]
        for run in stage_runs(spec, stage, best):
            config = resolved(spec, run)
            run.identity = run_identity(config)
            same = next((r for r in runs if r.identity == run.identity and r.status in REUSABLE), None)
            runs.append(run)
            if same is not None:  # e.g. the context study's own context length: reuse, as the report did
                run.status, run.record = f"same as {same.name}", same.record
                print(f"[sweep] {run.name}: same configuration as {same.name}, reused (0 FLOPs)")
                continue
            record = _finished_record(ledger, run.name)
            if record is not None:
                run.status, run.record = "done before", record
                print(f"[sweep] {run.name}: already completed ({record['steps']} steps), skipped")
                continue
            run.predicted_flops = plan_fit(config).flops
            left = budget.available() - float(spec["reserve"]) - planned
            if run.predicted_flops > left:
                run.status = "skipped: budget"
                print(f"[sweep] {run.name}: needs {run.predicted_flops:.3e} FLOPs, only {left:.3e} left: skipped")
                continue
            if dry_run:
                planned += run.predicted_flops
                run.status = "would run"
                print(f"[sweep] {run.name}: would run ({run.predicted_flops:.3e} FLOPs)")
                continue
            resume = newest_checkpoint(run.name, missing_ok=True)
            print(
                f"[sweep] {run.name}: running ({run.predicted_flops:.3e} FLOPs predicted)"
                + (f", resuming {resume}" if resume else ""),
                flush=True,
            )
            returncode = run_child([sys.executable, "-m", "lit_llmtime.app.cli", *_arguments(spec, run, resume)])
            run.record = _finished_record(ledger, run.name)
            if returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # the run saved its last step
                run.status = f"stopped by {signal.Signals(returncode - 128).name}"
                write_results(spec, runs)
                raise Interrupted(returncode - 128, f"{run.name} saved its last step; run the sweep again to go on")
            if returncode != 0 or run.record is None:
                run.status = f"failed (exit {returncode})"
                print(f"[sweep] {run.name}: FAILED with exit code {returncode}; going on", flush=True)
            else:
                run.status = "done"
    if dry_run:
        print(f"[sweep] the runs that would run cost {planned:.3e} FLOPs in all")
    write_results(spec, runs)
    return runs


def run_child(command: list[str]) -> int:
    """Run ``command`` and return its exit code. Its signals are its own: Ctrl-C reaches it from
    the terminal (the sweep ignores it meanwhile, so it neither dies first nor kills the run) and
    a SIGTERM to the sweep is passed on, so the run saves its last step."""
    child = subprocess.Popen(command)
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum)),
    }
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def assumed_best(runs: list[Run]) -> tuple[dict[str, Any], Run] | None:
    """For a dry run, where no run has a validation loss yet: the costliest planned run, so the
    plan of the stages that inherit from it is an upper bound."""
    planned = [r for r in runs if r.status in REUSABLE]
    if not planned:
        return None
    costliest = max(planned, key=lambda r: r.predicted_flops)
    return costliest.overrides, costliest


def best_overrides(runs: list[Run]) -> dict[str, Any] | None:
    """Overrides of the completed run with the lowest validation loss."""
    scored = [r for r in runs if r.record is not None and r.record.get("val_loss") is not None]
    return min(scored, key=lambda r: r.record["val_loss"]).overrides if scored else None


def write_results(spec: dict[str, Any], runs: list[Run]) -> Path:
    """``reports/<sweep name>/sweep.csv`` and ``sweep.md`` (tables like the report's 2 and 3)."""
    folder = Path(spec.get("out", Path("reports") / spec["name"]))
    budget = float(spec["budget"])
    keys = sorted({k for r in runs for k in r.overrides})
    rows = []
    for run in runs:
        record = run.record or {}
        rows.append(
            {
                "run": run.name, "stage": run.stage, **{k: run.overrides.get(k) for k in keys}, "status": run.status,
                "steps": record.get("steps", 0), "flops": record.get("flops", 0.0),
                "budget_percent": 100 * record.get("flops", 0.0) / budget, "val_loss": record.get("val_loss"),
            }
        )  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["run"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(folder / "sweep.csv", buffer.getvalue())
    write_text_atomic(folder / "sweep.md", markdown_tables(spec, runs, rows, keys))
    return folder


def markdown_tables(spec: dict[str, Any], runs: list[Run], rows: list[dict[str, Any]], keys: list[str]) -> str:
    """One table per stage: the grid's parameters, steps, share of the budget and validation loss."""
    lines = [f"# Sweep {spec['name']}", ""]
    for stage in spec["stages"]:
        stage_rows = [row for row in rows if row["stage"] == stage["name"]]
        varied = [k for k in keys if len({str(row[k]) for row in stage_rows}) > 1]
        lines += [f"## Stage {stage['name']}", ""]
        lines.append("| " + " | ".join([*varied, "status", "steps", "FLOPs", "% budget", "val loss"]) + " |")
        lines.append("|" + "---|" * (len(varied) + 5))
        for row in stage_rows:
            loss = "n/a" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
            cells = [_value_name(row[k]) for k in varied]
            cells += [row["status"], str(row["steps"]), f"{row['flops']:.3e}", f"{row['budget_percent']:.4f}%", loss]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    best = best_overrides(runs)
    if best is not None:
        name = next(r.name for r in runs if r.overrides is best)
        searched = {
            k for stage in spec["stages"] for k in [*(stage.get("grid") or {}), *(stage.get("inherit_best") or [])]
        }
        chosen = ", ".join(f"{k}={_value_name(v)}" for k, v in best.items() if k in searched)
        lines += [f"**Best:** {name} ({chosen})", ""]
    return "\n".join(lines)
