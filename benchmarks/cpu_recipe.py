"""LoRA fine-tuning against the untrained model on held-out simulated trajectories (opt-in, slow).

Runs, through the ``lit-llmtime`` command, ``configs/qwen2.5-0.5b/cpu-finetune.yaml`` on a real
pretrained Qwen2.5 0.5B: forecasts of the config's predict series (the whole test split, 100) by
the untrained model, the LoRA fit, then forecasts by every checkpoint it saved; prints one
markdown table (mean MAE, MASE and R² per species, wall time). About two hours and a quarter on 2
CPU cores (a fit of about 90 minutes, then about 20 minutes per predict).

    python benchmarks/cpu_recipe.py ~/.cache/lit-llmtime/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DATA = "data/simulated_lotka_volterra.h5"
LEDGER = "lightning_logs/cpu-recipe/flop_ledger.jsonl"
NAME = "qwen2.5-0.5b-cpu-finetune"


def run(*args: str) -> float:
    """Run ``lit-llmtime ARGS``; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "lit-llmtime"), *args], check=True)
    return time.perf_counter() - start


def newest_forecast() -> Path:
    return max(Path("lightning_logs", NAME).glob("version_*/forecast/metrics.json"), key=lambda p: p.stat().st_mtime)


def row(label: str, mean: dict, seconds: float | None) -> str:
    cells = [f"{mean[s][m]:.3f}" for m in ("mae", "mase", "r2") for s in ("prey", "predator")]
    return f"| {label} | " + " | ".join(cells) + f" | {'' if seconds is None else f'{seconds:.0f} s'} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model_name_or_path: a .gguf file, Hub id or folder")
    parser.add_argument("--skip-fit", action="store_true", help="forecast with the checkpoints already there")
    args = parser.parse_args()
    if not Path(DATA).is_file():
        run("simulate", "--out", DATA, "--seed", "0")
    common = [
        "--config", "configs/qwen2.5-0.5b/default.yaml",
        "--config", "configs/qwen2.5-0.5b/cpu-finetune.yaml", f"--model.model_name_or_path={args.model}",
        f"--data.data_path={DATA}", f"--flop_budget.ledger={LEDGER}", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    rows = []
    seconds = run("predict", *common)
    summary = json.loads(newest_forecast().read_text())
    rows.append(row("untrained", summary["model"]["mean"], seconds))
    references = {name: ref["mean"] for name, ref in summary["references"].items()}
    if not args.skip_fit:
        rows.append(f"| fit: {run('fit', *common):.0f} s | | | | | | | |")
    folder = max(Path("checkpoints", NAME).glob("version_*"), key=lambda p: int(p.name.removeprefix("version_")))
    for checkpoint in sorted(folder.glob("*step=*.ckpt"), key=lambda p: int(p.stem.split("step=")[1])):
        seconds = run("predict", *common, f"--ckpt_path={checkpoint}")
        step = checkpoint.stem.split("step=")[1]
        rows.append(row(f"LoRA, {step} steps", json.loads(newest_forecast().read_text())["model"]["mean"], seconds))
    rows += [row(name, mean, None) for name, mean in references.items()]
    header = "| forecaster | MAE prey | MAE predator | MASE prey | MASE predator | R² prey | R² predator | wall time |"
    print("\n".join([header, "|---|" + "---:|" * 7, *rows]))


if __name__ == "__main__":
    main()
