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


def two_predators(t: float, state: np.ndarray, a, b, c, d, e, b2, c2, d2) -> np.ndarray:
    """One prey and two predators competing for it: ``x' = a x - b x y - b2 x z - e x^2,
    y' = c x y - d y, z' = c2 x z - d2 z`` (state = [x..., y..., z...])."""
    x, y, z = np.split(state, 3)
    return np.concatenate([a * x - b * x * y - b2 * x * z - e * x * x, c * x * y - d * y, c2 * x * z - d2 * z])


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


def simulate(n: int = 1000, steps: int = 100, seed: int = 0, species: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(trajectories (n, steps, species) float32, time (steps,) float64)``: for 2 species
    like the real file; 1, its prey alone; 3, the prey with a second predator that competes for it
    (drawn after the first's parameters, so the prey-predator draws are those of 2 species)."""
    if n < 1 or steps < 2 or species not in (1, 2, 3):
        raise ValueError(f"need n >= 1, steps >= 2 and species 1, 2 or 3, got n={n}, steps={steps}, species={species}")
    rng = np.random.default_rng(seed)
    time = np.linspace(0.0, T_MAX, steps)
    initial = rng.uniform(*INITIAL_RANGE, size=(n, 2))
    parameters = sample_parameters(n, rng)
    if species < 3:
        return integrate(parameters, initial, time)[..., :species].astype(np.float32), time
    second = {"b2": rng.uniform(*B_RANGE, n), "c2": rng.uniform(*C_RANGE, n)}
    second["d2"] = second["c2"] * rng.uniform(*PREY_EQUILIBRIUM_RANGE, n)
    state = np.concatenate([initial[:, 0], initial[:, 1], rng.uniform(*INITIAL_RANGE, n) / 2])
    args = tuple(parameters[k] for k in "abcde") + (second["b2"], second["c2"], second["d2"])
    solution = solve_ivp(
        two_predators, (0.0, T_MAX), state, t_eval=time, args=args, method="DOP853", rtol=1e-9, atol=1e-12
    )
    if not solution.success:
        raise RuntimeError(f"ODE solver failed: {solution.message}")
    return np.stack(np.split(solution.y, 3), axis=-1).astype(np.float32), time


SPECIES_NAMES = {1: ("prey",), 2: ("prey", "predator"), 3: ("prey", "predator", "predator_2")}


def write_h5(path: str | Path, trajectories: np.ndarray, time: np.ndarray) -> Path:
    """Write ``trajectories`` and ``time`` datasets atomically (temp file, then rename)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("trajectories", data=trajectories)
        f.create_dataset("time", data=time)
        if trajectories.shape[-1] != 2:  # the coursework layout names none; others are named
            f["trajectories"].attrs["variables"] = list(SPECIES_NAMES[trajectories.shape[-1]])
    return Path(path)


def write_simulation(path: str | Path, trajectories: np.ndarray, time: np.ndarray) -> Path:
    """Write a simulation in the format of ``path``'s suffix: the coursework h5 layout, or any
    other ``series.save_series`` writes (a long CSV or parquet table, an (N, T, D) ``.npy``)."""
    if Path(path).suffix.lower() in (".h5", ".hdf5"):
        return write_h5(path, trajectories, time)
    from lit_llmtime.data.series import from_arrays, save_series

    names = SPECIES_NAMES[trajectories.shape[-1]]
    return save_series(path, from_arrays(trajectories, [time] * len(trajectories), names))
