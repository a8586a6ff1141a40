"""Token windows for causal LM training: fixed-length chunks of each series' LLMTIME tokens, with
padding masked out of attention and loss."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # label value that cross-entropy skips


def window_starts(length: int, context_length: int, stride: int, cover_end: bool = True) -> list[int]:
    """Where the windows over a ``length``-token sequence start: every ``stride`` tokens while a
    whole window fits, then (``cover_end``) one window flush with the end. No window lies inside
    another and none is mostly padding (the coursework skeleton's trailing windows were). Without
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
