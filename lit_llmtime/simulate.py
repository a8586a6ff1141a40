"""Synthetic Lotka-Volterra data in the coursework file's layout, for users without the file.

The real trajectories are not closed orbits: most oscillations damp and some grow. Whole-trajectory
fits say why (REFERENCE.md): the prey limits itself, ``x' = a x - b x y - e x^2`` with ``e`` mostly
small and positive (damping towards the equilibrium) and sometimes negative (growing cycles). The
simulator draws ``e`` from that fitted distribution, so forecasting it is as hard as the real file.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from scipy.integrate import solve_ivp

from lit_llmtime.io import atomic_path

# The real data's fitted parameters are correlated: its time-averaged prey (about d/c) is about
# 1.7 and predator (about a/b) about 0.57, which independent draws from the fitted 5-95% ranges
# miss (they give a prey mean near 0.8). So we draw b and c from those ranges and the two
# equilibria directly; this reproduces the real means.
B_RANGE = (0.14, 0.44)
C_RANGE = (0.08, 0.16)
PREY_EQUILIBRIUM_RANGE = (0.9, 2.6)  # d / c
PREDATOR_EQUILIBRIUM_RANGE = (0.35, 0.85)  # (a - e d / c) / b
# Prey self-limitation e: a split normal whose 5th / 50th / 95th percentiles are the real file's
# log-derivative fits (-0.0065 / 0.0053 / 0.026, REFERENCE.md), floored at -0.005: below it cycles
# grow past the real file's largest values within 100 steps (prey max 29 at -0.008, real 13.7).
SELF_LIMITATION_MEDIAN = 0.0053
SELF_LIMITATION_SPREAD = ((0.0053 + 0.0065) / 1.645, (0.026 - 0.0053) / 1.645)  # below, above the median
SELF_LIMITATION_FLOOR = -0.005
INITIAL_RANGE = (0.8, 1.2)
T_MAX = 200.0


def lotka_volterra(t: float, state: np.ndarray, a, b, c, d, e=0.0) -> np.ndarray:
    """``x' = a x - b x y - e x^2, y' = c x y - d y`` for many systems at once (state = [x..., y...])."""
    x, y = np.split(state, 2)
    return np.concatenate([a * x - b * x * y - e * x * x, c * x * y - d * y])


def sample_self_limitation(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` prey self-limitation terms ``e`` from the real file's fitted distribution."""
    z = rng.standard_normal(n)
    below, above = SELF_LIMITATION_SPREAD
    return np.maximum(SELF_LIMITATION_MEDIAN + z * np.where(z < 0, below, above), SELF_LIMITATION_FLOOR)


def sample_parameters(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw ``n`` parameter sets ``a, b, c, d, e`` with statistics like the real data's."""
    b = rng.uniform(*B_RANGE, n)
    c = rng.uniform(*C_RANGE, n)
    prey_equilibrium = rng.uniform(*PREY_EQUILIBRIUM_RANGE, n)
    predator_equilibrium = rng.uniform(*PREDATOR_EQUILIBRIUM_RANGE, n)
    e = sample_self_limitation(n, rng)
    d = c * prey_equilibrium
    a = b * predator_equilibrium + e * prey_equilibrium
    return {"a": a, "b": b, "c": c, "d": d, "e": e}


def integrate(parameters: dict[str, np.ndarray], initial: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Solve all systems in one vectorised ODE call; returns (n, len(time), 2) float64.
    ``parameters`` holds ``a, b, c, d`` and optionally ``e`` (0: the classic model)."""
    n = initial.shape[0]
    e = parameters.get("e", np.zeros(n))
    solution = solve_ivp(
        lotka_volterra,
        (float(time[0]), float(time[-1])),
        np.concatenate([initial[:, 0], initial[:, 1]]),
        t_eval=time,
        args=(parameters["a"], parameters["b"], parameters["c"], parameters["d"], e),
        method="DOP853",
        rtol=1e-9,
        atol=1e-12,
    )
    if not solution.success:
        raise RuntimeError(f"ODE solver failed: {solution.message}")
    return np.stack([solution.y[:n], solution.y[n:]], axis=-1)


def simulate(n: int = 1000, steps: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(trajectories (n, steps, 2) float32, time (steps,) float64)`` like the real file."""
    if n < 1 or steps < 2:
        raise ValueError(f"need n >= 1 and steps >= 2, got n={n}, steps={steps}")
    rng = np.random.default_rng(seed)
    time = np.linspace(0.0, T_MAX, steps)
    initial = rng.uniform(*INITIAL_RANGE, size=(n, 2))
    trajectories = integrate(sample_parameters(n, rng), initial, time)
    return trajectories.astype(np.float32), time


def write_h5(path: str | Path, trajectories: np.ndarray, time: np.ndarray) -> Path:
    """Write ``trajectories`` and ``time`` datasets atomically (temp file, then rename)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("trajectories", data=trajectories)
        f.create_dataset("time", data=time)
    return Path(path)
