"""A run: the LightningCLI that ``fit``/``validate``/``test``/``predict`` use, and the resolved
configuration of a run (YAML + command-line overrides + defaults) through that same parser."""

from __future__ import annotations

import atexit
import logging
import os
import random
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lit_llmtime.app.console import quiet_lightning, use_project_console
from lit_llmtime.budget.callback import FlopBudget
from lit_llmtime.budget.ledger import Budget
from lit_llmtime.budget.plan import step_flops
from lit_llmtime.config import EncodingArgs, deprecated
from lit_llmtime.data.module import SeriesDataModule
from lit_llmtime.forecasting.writer import ForecastWriter
from lit_llmtime.io import atomic_path
from lit_llmtime.model.checkpoint import read_checkpoint
from lit_llmtime.training.module import LLMTimeLoRA

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
CHECKPOINT_ROOT = Path("checkpoints")
TRAINER_DEFAULTS = {
    "logger": lazy_instance(TensorBoardLogger, save_dir="lightning_logs", name="llmtime", default_hp_metric=False),
}
ENCODING_FIELDS = tuple(field.name for field in fields(EncodingArgs))


def newest_checkpoint(name: str, dirpath: str | None = None, missing_ok: bool = False) -> Path | None:
    """What ``--ckpt_path last`` means: the newest ``last*.ckpt`` in ``--checkpoint.dirpath`` when
    it is set, else ``checkpoints/<name>/version_<newest>/last.ckpt``."""
    if dirpath:
        found = sorted(Path(dirpath).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        where = f"{dirpath}/last*.ckpt"
    else:
        found = sorted(
            CHECKPOINT_ROOT.glob(f"{name}/version_*/last.ckpt"),
            key=lambda p: int(p.parent.name.removeprefix("version_")),
        )
        where = f"{CHECKPOINT_ROOT}/{name}/version_*/last.ckpt"
    if not found and not missing_ok:
        raise FileNotFoundError(f"--ckpt_path last: no {where} (run fit first)")
    return found[-1] if found else None


def best_checkpoint(name: str, dirpath: str | None = None) -> Path:
    """The best checkpoint of the newest run of ``name`` by its ``checkpoint.monitor`` (e.g.
    ``val/forecast/mase``): what ``--ckpt_path best`` means. Its last.ckpt names it."""
    last = newest_checkpoint(name, dirpath)
    states = read_checkpoint(last).get("callbacks", {})
    best = [state["best_model_path"] for key, state in states.items() if key.startswith("ModelCheckpoint")]
    if not best or not best[0] or not Path(best[0]).is_file():
        raise FileNotFoundError(
            f"--ckpt_path best: {last} names no best checkpoint (set checkpoint.monitor, e.g. val/forecast/mase)"
        )
    return Path(best[0])


def logger_name(config: Namespace) -> str:
    """The TensorBoard run name of a parsed config (where its checkpoints go)."""
    logger = config.trainer.logger
    if isinstance(logger, Namespace):
        return logger.init_args.get("name") or "lightning_logs"
    return getattr(logger, "name", None) or "llmtime"


class LitLLMTimeCLI(LightningCLI):
    """LightningCLI whose data module owns the tokenizer and the text encoding, and drives the model's."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        for name in ENCODING_FIELDS:
            parser.link_arguments(f"data.encoding.{name}", f"model.encoding.{name}")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/loss", "checkpoint.mode": "min", "checkpoint.save_last": True})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(FlopBudget, "flop_budget")
        parser.add_lightning_class_args(ForecastWriter, "forecast_writer")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then turn ``--ckpt_path last`` (or ``best``) into the newest (or best) checkpoint of
        the run name, before LightningCLI reads its hyperparameters (LoRA rank, output head, ...);
        note the model settings the user gave, so ``before_instantiate_classes`` can say what the
        checkpoint's hyperparameters changed (or refuse); and refuse an unreadable checkpoint."""
        super().parse_arguments(parser, args)
        given = sys.argv[1:] if args is None else args
        self._args = [str(arg) for arg in given] if isinstance(given, list | tuple) else []  # for the checkpoint
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        self._user_model = None if config is None else config.model.clone()
        if config is None or not config.get("ckpt_path"):
            return
        dirpath = config.checkpoint.get("dirpath")
        if config.ckpt_path == "best" and subcommand != "fit":
            config.ckpt_path = str(best_checkpoint(logger_name(config), dirpath))
            rank_zero_info(f"--ckpt_path best: {config.ckpt_path}")
        elif config.ckpt_path == "last":
            found = newest_checkpoint(logger_name(config), dirpath, missing_ok=subcommand == "fit")
            verb = "resuming" if subcommand == "fit" else "using"  # fit: the newest run of this name, if any
            rank_zero_info(f"--ckpt_path last: {verb} {found}" if found else "--ckpt_path last: none yet, fresh start")
            config.ckpt_path = None if found is None else str(found)
        if config.ckpt_path:
            check_readable_checkpoint(config.ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.ckpt_path and Path(config.ckpt_path).is_file():
            reconcile_with_checkpoint(config, self._user_model, *user_set_model_keys(self._args, config))
        if self.subcommand != "fit" and config.ckpt_path:
            adopt_checkpoint(config)
        if self.subcommand == "fit" and config.flop_budget.ledger:
            refuse_unaffordable(config)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Lightning's trainer, saving checkpoints atomically (a kill while saving leaves the previous one)."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        use_project_console(trainer)
        if self.subcommand != "fit":  # only fit saves checkpoints; restoring the callback's state only warns
            trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
            # and Lightning's advice to pass it back does not apply (a fit resume keeps the warning)
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")
        return trainer

    def before_fit(self) -> None:
        """Checkpoints go to ``checkpoints/<logger name>/version_<n>``, next to the TensorBoard run's name."""
        callback, logger = self.trainer.checkpoint_callback, self.trainer.logger
        if callback is not None and callback.dirpath is None and logger is not None:
            callback.dirpath = str(CHECKPOINT_ROOT / logger.name / f"version_{logger.version}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but atomic: a run killed while saving keeps its previous
    ``last.ckpt`` instead of a truncated one, so it can always resume."""

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


# A checkpoint's settings that define its weights: another value cannot load them.
WEIGHT_DEFINING = ("model_config", "init_seed", "tokenizer", "output_vocab", "lora.rank", "lora.alpha",
                   "lora.targets", "lora.train_lm_head_bias")  # fmt: skip
# Settings that say where the base model is, how to run it or how to go on training: the user's win.
USERS_CHOICE = ("model_name_or_path", "torch_dtype", "lora.dropout", "optim")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        value = asdict(value) if is_dataclass(value) else value
        if isinstance(value, dict) and key != "model_config":
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def user_set_model_keys(args: list[str], config: Namespace) -> tuple[set[str], set[str]]:
    """The model settings (e.g. ``lora.rank``) this run's command line sets, and those its
    ``--config`` files set."""
    typed = {arg[len("--model.") :].split("=")[0] for arg in args if arg.startswith("--model.")}
    if any(arg.startswith("--data.tokenizer") for arg in args):
        typed.add("tokenizer")
    files = set()
    for path in config.get("config") or []:
        loaded = yaml.safe_load(Path(str(path)).read_text()) or {}
        files |= set(_flat(loaded.get("model") or {}))
        if "tokenizer" in (loaded.get("data") or {}):
            files.add("tokenizer")
    return typed, files


def reconcile_with_checkpoint(config: Namespace, user: Namespace, typed: set[str], in_files: set[str]) -> None:
    """Settle the model settings against the checkpoint's (which LightningCLI applied), one line
    each: a weight-defining setting typed on this command line with another value is refused (one
    from a config file gives way, as when the fit overrode it); where the base model lives, its
    dtype, dropout and the optimiser settings are the user's."""
    trained = read_checkpoint(config.ckpt_path).get("hyper_parameters", {})
    mine = _flat(user.as_dict())
    for key, value in _flat(trained).items():
        if key.startswith(("encoding.", "_")) or key not in mine or mine[key] == value:
            continue  # the encoding: adopt_checkpoint
        if key in WEIGHT_DEFINING and key in typed:
            raise ValueError(
                f"{config.ckpt_path} was trained with model.{key}={value!r}, but this run sets {mine[key]!r}: "
                f"its weights need {value!r} (set that, or leave --model.{key} out)"
            )
        if key.startswith(USERS_CHOICE) and key in typed | in_files:
            config.model[key] = mine[key]
            rank_zero_info(f"{config.ckpt_path}: trained with model.{key}={value!r}; using {mine[key]!r} as set")
        elif key in WEIGHT_DEFINING:
            rank_zero_info(f"{config.ckpt_path}: using its model.{key}={value!r}, not {mine[key]!r}")


def adopt_checkpoint(config: Namespace) -> None:
    """Evaluate a checkpoint on text written as it was trained on: the checkpoint's encoding
    replaces the config's."""
    trained = read_checkpoint(config.ckpt_path).get("hyper_parameters", {})
    encoding = trained.get("encoding")
    if not encoding:
        return
    encoding = asdict(EncodingArgs()) | encoding  # a field newer than the checkpoint: it was trained with the default
    for name in ENCODING_FIELDS:
        if config.data.encoding[name] != encoding[name]:
            rank_zero_info(
                f"{config.ckpt_path}: trained with encoding.{name}={encoding[name]!r}; using it instead of "
                f"{config.data.encoding[name]!r}"
            )
            config.data.encoding[name] = config.model.encoding[name] = encoding[name]


def refuse_unaffordable(config: Namespace) -> None:
    """Refuse a fit that cannot afford even one step, before the data or the model are loaded."""
    budget = Budget(config.flop_budget.ledger, config.flop_budget.budget)
    step = step_flops(config)
    if not budget.allow(step):
        raise budget.refusal("one training step of this run", step)


# The data module's class paths a config's ``data.class_path`` may name (the first is the old name).
DATA_CLASS_PATHS = ("lit_llmtime.data.LotkaVolterraDataModule", "lit_llmtime.data.SeriesDataModule",
                    "lit_llmtime.data.module.SeriesDataModule")  # fmt: skip


def without_data_class_path(args: list[str]) -> list[str]:
    """``args`` with every ``--config`` file whose ``data`` names the data module by ``class_path``
    (as a subclass-mode config does; the old name says it is deprecated) replaced by a copy whose
    ``data`` is its ``init_args``, which is how LightningCLI reads this project's data section."""
    rewritten = list(args)
    for position, arg in enumerate(args):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path is None and position and args[position - 1] in ("--config", "-c"):
            path = arg
        if path is None or not Path(path).is_file():
            continue
        config = yaml.safe_load(Path(path).read_text())
        data = config.get("data") if isinstance(config, dict) else None
        if not isinstance(data, dict) or data.get("class_path") not in DATA_CLASS_PATHS:
            continue
        if data["class_path"] == DATA_CLASS_PATHS[0]:
            deprecated(f"{path}: data.class_path {DATA_CLASS_PATHS[0]}", DATA_CLASS_PATHS[1])
        config["data"] = dict(data.get("init_args") or {}) | {
            key: value for key, value in data.items() if key not in ("class_path", "init_args")
        }
        handle, copy = tempfile.mkstemp(prefix=f"{Path(path).stem}-", suffix=".yaml")
        with os.fdopen(handle, "w") as file:
            yaml.safe_dump(config, file)
        atexit.register(Path(copy).unlink, missing_ok=True)
        rewritten[position] = f"--config={copy}" if arg.startswith("--config=") else copy
    return rewritten


def lightning_cli(args: list[str] | None = None, cli_class: type[LightningCLI] = LitLLMTimeCLI) -> LightningCLI:
    """Run ``fit``/``validate``/``test``/``predict`` with ``args`` (None: ``sys.argv``; a YAML via ``--config``)."""
    quiet_lightning()
    given = sys.argv[1:] if args is None else list(args)
    rewritten = without_data_class_path(given)
    if rewritten != given:  # args of our own, not sys.argv's: Lightning's warning about that does not apply
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return cli_class(
        LLMTimeLoRA,
        SeriesDataModule,
        args=args if rewritten == given else rewritten,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lit-llmtime"},
    )


def check_readable_checkpoint(path: str) -> None:
    """FileNotFoundError or ValueError naming a local ``path`` that is missing or not a checkpoint
    torch can read (a truncated file, a data file), before LightningCLI reads its hyperparameters
    with a bare traceback. Lightning's own names (``hpc``, ``registry``) and URLs are left to it."""
    if path not in ("hpc", "registry") and "://" not in path:
        read_checkpoint(path)


@contextmanager
def quiet_seeding() -> Iterator[None]:
    """No "Seed set to 0" line from a seeding that ``kept_random_state`` undoes."""
    logger = logging.getLogger("lightning.fabric.utilities.seed")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


@contextmanager
def kept_random_state() -> Iterator[None]:
    """Python's, numpy's and torch's random generators, and Lightning's seed variables, as they
    were before the block (which may seed them)."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    variables = {name: os.environ.get(name) for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        for name, value in variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Resolved(Exception):
    """Carries a parsed configuration out of LightningCLI before anything is instantiated."""

    def __init__(self, config: Namespace) -> None:
        self.config = config


class _ResolveOnly(LitLLMTimeCLI):
    def before_instantiate_classes(self) -> None:
        raise _Resolved(self.config[self.subcommand])


def resolve_run(args: list[str]) -> Namespace:
    """The resolved configuration of a run, e.g. ``["fit", "--config", "x.yaml", "--model.lora.rank=16"]``:
    exactly what that command would run with, parsed by the same parser, with nothing loaded."""
    try:
        with warnings.catch_warnings(), kept_random_state(), quiet_seeding():  # LightningCLI seeds: resolving must not
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args are not sys.argv
            lightning_cli(list(args), cli_class=_ResolveOnly)
    except _Resolved as resolved:
        return resolved.config
    raise AssertionError("LightningCLI returned without reaching instantiation")


# Settings that name or display a run without changing what it computes.
NOT_IDENTITY = (
    "config",
    "ckpt_path",
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "flop_budget.run_name",
    "forecast_writer",
    "checkpoint.dirpath",
    "data.num_workers",
)


def run_identity(config: Namespace) -> dict[str, Any]:
    """What a run computes: its resolved configuration without names and display settings, so two
    runs with equal identities train the same model."""
    flat = config.clone()
    for key in NOT_IDENTITY:
        if key in flat:
            del flat[key]
    # seed_everything: true is resolved to the seed LightningCLI chose, as the run itself will be
    return {key: str(value) for key, value in sorted(flat.items())}
