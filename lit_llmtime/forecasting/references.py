"""Classical forecasters run on the same prompts as the LLM and scored on the same steps:
persistence, and the Lotka-Volterra ODE (with prey self-limitation) fitted to each prompt."""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares
from scipy.sparse import block_diag

from lit_llmtime.config import REFERENCE_FORECASTERS
from lit_llmtime.data.simulate import integrate


def persistence(prompts: np.ndarray, horizon: int) -> np.ndarray:
    """Repeat the last observed value of each (N, P, D) prompt: (N, horizon, D)."""
    return np.repeat(np.asarray(prompts, dtype=np.float64)[:, -1:], horizon, axis=1)


def fit_lotka_volterra(prompts: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Least-squares fit of ``a, b, c, d, e`` of ``x' = a x - b x y - e x^2, y' = c x y - d y``
    (Lotka-Volterra with prey self-limitation, the family of the real data and of ``simulate``) to
    each of (N, P, 2) prompts; returns (N, 5).

    Starts from the linear regression of log-derivatives (``d log x/dt = a - b y - e x``,
    ``d log y/dt = c x - d``), then refines by integrating the ODEs from the first observations.
    All trajectories are fitted as one problem with a block-sparse Jacobian, so each refinement
    step is a handful of vectorised ODE solves rather than one per trajectory. ``a, b, c, d`` are
    fitted as logarithms (they are positive), ``e`` as it is (it can be negative: growing cycles).
    """
    prompts = np.asarray(prompts, dtype=np.float64)
    n, steps, _ = prompts.shape
    x, y = np.maximum(prompts[..., 0], 1e-9), np.maximum(prompts[..., 1], 1e-9)
    dlogx, dlogy = np.gradient(np.log(x), time, axis=1), np.gradient(np.log(y), time, axis=1)
    guess = np.empty((n, 5))
    for i in range(n):
        (a, minus_b, minus_e), *_ = np.linalg.lstsq(np.stack([np.ones(steps), y[i], x[i]], 1), dlogx[i], rcond=None)
        (c, minus_d), *_ = np.linalg.lstsq(np.stack([x[i], np.ones(steps)], 1), dlogy[i], rcond=None)
        guess[i] = [*np.log(np.clip(np.abs([a, -minus_b, c, -minus_d]), 1e-4, 10.0)), np.clip(-minus_e, -0.1, 0.1)]
    scale = prompts.std(axis=1, keepdims=True) + 1e-9

    def residuals(packed: np.ndarray) -> np.ndarray:
        solution = _integrate(_unpack(packed.reshape(n, 5)), prompts[:, 0], time)
        if solution is None:
            return np.full(prompts.size, 1e3)
        return ((solution - prompts) / scale).ravel()

    sparsity = block_diag([np.ones((steps * 2, 5))] * n, format="csr")
    fit = least_squares(residuals, guess.ravel(), jac_sparsity=sparsity, method="trf", x_scale="jac", max_nfev=100)
    return _unpack(fit.x.reshape(n, 5))


def _unpack(packed: np.ndarray) -> np.ndarray:
    """(N, 5) fitted values (log a, log b, log c, log d, e) as parameters (a, b, c, d, e)."""
    return np.concatenate([np.exp(packed[:, :4]), packed[:, 4:]], axis=1)


def _integrate(params: np.ndarray, initial: np.ndarray, time: np.ndarray) -> np.ndarray | None:
    """Solve (N,) systems with (N, 5) parameters from (N, 2) initial states; (N, T, 2) or None."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            solution = integrate(dict(zip("abcde", params.T, strict=True)), initial, time)
    except RuntimeError:
        return None
    return solution if np.all(np.isfinite(solution)) else None


def lotka_volterra_forecast(prompts: np.ndarray, time: np.ndarray, horizon: int) -> np.ndarray:
    """Fit the ODE to each (N, P, 2) prompt (observed at ``time[:P]``) and integrate it ``horizon``
    steps on from its last observation; persistence where the fit cannot be integrated."""
    prompts = np.asarray(prompts, dtype=np.float64)
    steps = prompts.shape[1]
    params = fit_lotka_volterra(prompts, time[:steps])
    future = _integrate(params, prompts[:, -1], time[steps - 1 : steps + horizon])
    return persistence(prompts, horizon) if future is None else future[:, 1:]


def reference_applies(name: str, prompts: np.ndarray) -> bool:
    """Whether a reference forecaster can forecast these (N, P, D) prompts: the Lotka-Volterra ODE
    needs two non-negative variables, fully observed (prompts of one length)."""
    if name != "lotka_volterra":
        return True
    return prompts.shape[-1] == 2 and bool(np.all(np.isfinite(prompts))) and bool(np.all(prompts >= 0))


def reference_forecast(name: str, prompts: np.ndarray, time: np.ndarray, horizon: int) -> np.ndarray:
    """Forecast (N, P, 2) prompts with a named reference forecaster: (N, horizon, 2)."""
    if name == "persistence":
        return persistence(prompts, horizon)
    if name == "lotka_volterra":
        return lotka_volterra_forecast(prompts, time, horizon)
    raise ValueError(f"unknown reference forecaster {name!r}; choose from {REFERENCE_FORECASTERS}")
