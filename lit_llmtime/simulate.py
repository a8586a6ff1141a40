"""Synthetic Lotka-Volterra data in the coursework file's layout, for users without the file."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from scipy.integrate import solve_ivp

from lit_llmtime.io import atomic_path

# The real data's fitted parameters are correlated: its time-averaged prey (= d/c on a closed
# orbit) is about 1.7 and predator (= a/b) about 0.57, which independent draws from the fitted
# 5-95% ranges miss (they give a prey mean near 0.8). So we draw b and c from those ranges and
# the two equilibria directly; this reproduces the real means (prey 1.7, predator 0.59).
B_RANGE = (0.14, 0.44)
C_RANGE = (0.08, 0.16)
PREY_EQUILIBRIUM_RANGE = (0.9, 2.6)  # d / c
PREDATOR_EQUILIBRIUM_RANGE = (0.35, 0.85)  # a / b
INITIAL_RANGE = (0.8, 1.2)
T_MAX = 200.0


def lotka_volterra(t: float, state: np.ndarray, a, b, c, d) -> np.ndarray:
    """``x' = a x - b x y, y' = c x y - d y`` for many systems at once (state = [x..., y...])."""
    x, y = np.split(state, 2)
    return np.concatenate([a * x - b * x * y, c * x * y - d * y])


def sample_parameters(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw ``n`` parameter sets ``a, b, c, d`` with statistics like the real data's."""
    b = rng.uniform(*B_RANGE, n)
    c = rng.uniform(*C_RANGE, n)
    a = b * rng.uniform(*PREDATOR_EQUILIBRIUM_RANGE, n)
    d = c * rng.uniform(*PREY_EQUILIBRIUM_RANGE, n)
    return {"a": a, "b": b, "c": c, "d": d}


def integrate(parameters: dict[str, np.ndarray], initial: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Solve all systems in one vectorised ODE call; returns (n, len(time), 2) float64."""
    n = initial.shape[0]
    solution = solve_ivp(
        lotka_volterra,
        (float(time[0]), float(time[-1])),
        np.concatenate([initial[:, 0], initial[:, 1]]),
        t_eval=time,
        args=(parameters["a"], parameters["b"], parameters["c"], parameters["d"]),
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
