"""LLMTIME text codec: (steps, variables) arrays <-> "x,y;x,y;..." digit strings.

Each trajectory is divided by its own scale ``alpha = max over variables of p95 / 10`` so
most values land in [0, 10], rounded to ``decimals`` places, variables joined by ``,`` and time
steps by ``;``. The decimal point is kept (Qwen2.5 tokenizes every digit on its own anyway).
With ``transform="log"`` the scaled value ``v`` is written as ``sign(v) log(1 + |v| / 0.01)``: a
log above a floor of a thousandth of the scale's 95th percentile (zeros and signs stay defined),
so growth and decay by a factor become steps of a fixed size (Lotka-Volterra dynamics are linear
in logs) and troughs keep as many digits as peaks; decoding inverts the transform, so the
rounding error becomes relative (half a step of the log: about 5% of a value at one decimal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lit_llmtime.config import TRANSFORMS

VARIABLE_SEPARATOR = ","
STEP_SEPARATOR = ";"
ALPHABET = "0123456789.,;-"  # every character LLMTIME text can hold
LOG_FLOOR = 0.01  # scaled units: below it ``log`` is linear, so 0 is written as 0


def _log(v: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.log1p(np.abs(v) / LOG_FLOOR)


def _exp(t: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # a huge generated number decodes to inf (``decode`` marks it invalid)
        return np.sign(t) * np.expm1(np.abs(t)) * LOG_FLOOR


CODECS = {"none": (lambda v: v, lambda t: t), "log": (_log, _exp)}  # transform -> (written from scaled, inverse)


def _codec(transform: str) -> tuple:
    if transform not in CODECS:
        raise ValueError(f"unknown encoding transform {transform!r}; choose from {TRANSFORMS}")
    return CODECS[transform]


def transformed(scaled: np.ndarray, transform: str = "none") -> np.ndarray:
    """The values written as text: ``scaled`` itself or ``sign(v) log(1 + |v| / LOG_FLOOR)``."""
    return _codec(transform)[0](scaled)


def untransformed(written: np.ndarray, transform: str = "none") -> np.ndarray:
    """The inverse of ``transformed``: scaled values from the values read in text."""
    return _codec(transform)[1](written)


def scale_alpha(trajectory: np.ndarray, percentile: float = 95.0) -> float:
    """Per-trajectory scale: the largest per-variable ``percentile`` divided by 10."""
    trajectory = check_trajectory(trajectory)
    alpha = float(np.max(np.percentile(np.abs(trajectory), percentile, axis=0))) / 10.0
    if alpha == 0.0:  # e.g. a series that is zero but for a few spikes
        alpha = float(np.max(np.abs(trajectory))) / 10.0
    return alpha


def check_trajectory(trajectory: np.ndarray, name: str = "trajectory") -> np.ndarray:
    """Return ``trajectory`` as float64 (steps, variables), or raise ValueError naming ``name``."""
    array = np.asarray(trajectory, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: expected shape (steps, variables), got {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(f"{name}: non-finite value {array[tuple(bad)]} at step {bad[0]}, variable {bad[1]}")
    if not np.any(array):
        raise ValueError(f"{name}: all values are zero, so no scale can be computed")
    return array


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float, or raise ValueError if it is not a positive finite number."""
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    return alpha


def format_values(scaled: np.ndarray, decimals: int = 2) -> str:
    """Join already scaled (steps, variables) values into LLMTIME text."""
    rounded = np.round(scaled, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    return STEP_SEPARATOR.join(VARIABLE_SEPARATOR.join(f"{value:.{decimals}f}" for value in step) for step in rounded)


def encode(
    trajectory: np.ndarray,
    alpha: float | None = None,
    decimals: int = 2,
    name: str = "trajectory",
    transform: str = "none",
) -> tuple[str, float]:
    """Encode one trajectory; returns the text and the alpha used (computed if not given)."""
    array = check_trajectory(trajectory, name)
    alpha = scale_alpha(array) if alpha is None else check_alpha(alpha)
    return format_values(transformed(array / alpha, transform), decimals), alpha


def global_alpha(trajectories, percentile: float = 95.0) -> float:
    """One scale for a whole data set ((N, steps, variables), or a list of (steps, variables)
    series of different lengths), by the same rule as ``scale_alpha``."""
    return scale_alpha(np.concatenate([np.asarray(t, dtype=np.float64) for t in trajectories]), percentile)


@dataclass
class Decoded:
    """Values parsed from (possibly messy) generated text.

    ``values`` has one row per step found (or exactly ``steps`` rows when asked); rows that could
    not be parsed are NaN. ``n_valid`` counts the rows that parsed completely.
    """

    values: np.ndarray
    n_valid: int

    @property
    def valid(self) -> np.ndarray:
        """Boolean mask of the rows that parsed completely."""
        return ~np.isnan(self.values).any(axis=1)


def _parse_step(step: str, n_variables: int) -> list[float] | None:
    fields = step.split(VARIABLE_SEPARATOR)
    if len(fields) != n_variables:
        return None
    try:
        values = [float(field) for field in fields]
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


def decode(text: str, alpha: float, n_variables: int = 2, steps: int | None = None, transform: str = "none") -> Decoded:
    """Parse LLMTIME text back to the original scale; never raises on malformed text.

    Empty steps, steps with a missing or extra value, unparsable numbers (``1..2``) and trailing
    junk become NaN rows. A trailing separator does not open a new step. With ``steps``, the
    result is cut or NaN-padded to exactly that many rows.
    """
    alpha = check_alpha(alpha)
    pieces = text.strip().split(STEP_SEPARATOR)
    if pieces and pieces[-1].strip() == "":
        pieces = pieces[:-1]
    if steps is not None:
        pieces = pieces[:steps]
    rows = [_parse_step(piece.strip(), n_variables) for piece in pieces]
    n_rows = len(rows) if steps is None else steps
    values = np.full((n_rows, n_variables), np.nan)
    for i, row in enumerate(rows):
        if row is not None:
            values[i] = row
    values = untransformed(values, transform) * alpha
    overflow = ~np.isfinite(values).all(axis=1) & ~np.isnan(values).any(axis=1)  # a huge number under ``log``
    values[overflow] = np.nan
    return Decoded(values, sum(row is not None for row in rows) - int(overflow.sum()))
