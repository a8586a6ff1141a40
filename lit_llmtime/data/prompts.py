"""Forecast prompts: the one place a series' scale is chosen (``scale_alphas``) and its first steps
are written as an LLMTIME prompt ending in ``;`` (``prompt_texts``), batched left-padded for
generation. The data module (validation, predict) and the ``Forecaster`` (users' series) both call it."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from lit_llmtime.config import EncodingArgs
from lit_llmtime.data.series import SeriesSet, default_variables
from lit_llmtime.text.codec import STEP_SEPARATOR, encode, scale_alpha


def scale_alphas(
    series: list[np.ndarray], encoding: EncodingArgs, dataset_alpha: float | None = None, contexts: bool = False
) -> np.ndarray:
    """Each series' LLMTIME scale under ``encoding.scale_from``: ``dataset``, the training split's one
    ``dataset_alpha``; ``prompt``, its first ``prompt_steps`` steps; ``trajectory``, all its steps
    (a look-ahead when the series goes on past its prompt). ``contexts``: the series are forecast
    contexts, nothing but prompts, so all their steps are the prompt's."""
    if encoding.scale_from == "dataset":
        if dataset_alpha is None:
            raise ValueError("scale_from=dataset needs the training split's scale (alpha), which this model lacks")
        return np.full(len(series), float(dataset_alpha))
    span = encoding.prompt_steps if encoding.scale_from == "prompt" and not contexts else None
    return np.array([scale_alpha(values[:span]) for values in series], dtype=np.float64)


def encode_trajectories(
    trajectories: list[np.ndarray], alphas: np.ndarray, encoding: EncodingArgs, indices=None
) -> list[str]:
    """LLMTIME texts of ``trajectories`` at the given scales (named by ``indices`` in errors)."""
    indices = range(len(trajectories)) if indices is None else indices
    return [
        encode(
            trajectory, alpha=alpha, decimals=encoding.decimals, name=f"sample {index}", transform=encoding.transform
        )[0]
        for index, trajectory, alpha in zip(indices, trajectories, alphas, strict=True)
    ]


def prompt_texts(prompts: list[np.ndarray], alphas: np.ndarray, encoding: EncodingArgs, names=None) -> list[str]:
    """Each prompt's LLMTIME text, ending in ``;`` so that the model writes the next step."""
    return [text + STEP_SEPARATOR for text in encode_trajectories(prompts, alphas, encoding, names)]


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


def prompt_batches(tokenizer, series: SeriesSet, alphas: np.ndarray, encoding: EncodingArgs, batch_size: int, device):
    """Batches of ``batch_size`` series as LLMTIME prompts (ending in ``;``): left-padded token ids
    and, left-padded with NaN alike, the (B, longest, D) values, with their scales."""
    texts = prompt_texts(series.values, alphas, encoding, series.ids)
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for start in range(0, len(texts), batch_size):
        rows = list(range(start, min(start + batch_size, len(texts))))
        input_ids, attention_mask = left_padded([token_ids[r] for r in rows], tokenizer.pad_token_id)
        longest = max(len(series.values[r]) for r in rows)
        prompt = np.full((len(rows), longest, len(series.variables)), np.nan)
        for row, r in enumerate(rows):
            prompt[row, longest - len(series.values[r]) :] = series.values[r]
        yield {
            "input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "prompt": torch.from_numpy(prompt), "alpha": torch.from_numpy(alphas[rows].copy()),
        }  # fmt: skip
