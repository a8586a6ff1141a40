"""Classical forecasters run on the same prompts as the LLM and scored on the same steps: what a
practitioner runs first (persistence; statsforecast's AutoARIMA, AutoETS and AutoTheta per
variable; a vector autoregression on log values) and the Lotka-Volterra ODE (with prey
self-limitation) fitted to each prompt. Each sees a prompt alone, never its future."""

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
    """Fit the ODE to each (N, P, 2) prompt (observed at ``time[:P]``, or at its own row of an
    (N, P + horizon) ``time``) and integrate it ``horizon`` steps on from its last observation;
    persistence where the fit cannot be integrated."""
    prompts, time = np.asarray(prompts, dtype=np.float64), np.asarray(time, dtype=np.float64)
    if time.ndim == 2:  # series on different time axes: one fit per axis
        axes, group = np.unique(time, axis=0, return_inverse=True)
        forecasts = np.empty((len(prompts), horizon, prompts.shape[-1]))
        for index, axis in enumerate(axes):
            rows = group.ravel() == index
            forecasts[rows] = lotka_volterra_forecast(prompts[rows], axis, horizon)
        return forecasts
    steps = prompts.shape[1]
    params = fit_lotka_volterra(prompts, time[:steps])
    future = _integrate(params, prompts[:, -1], time[steps - 1 : steps + horizon])
    return persistence(prompts, horizon) if future is None else future[:, 1:]


STATSFORECAST_MODELS = {"auto_arima": "AutoARIMA", "auto_ets": "AutoETS", "auto_theta": "AutoTheta"}


def statsforecast_forecast(name: str, prompts: np.ndarray, horizon: int) -> np.ndarray:
    """statsforecast's ``AutoARIMA``, ``AutoETS`` or ``AutoTheta`` (no season) fitted to each
    variable of each (N, P, D) prompt alone (left-padding NaN dropped): (N, horizon, D) means."""
    import statsforecast.models  # statsforecast: imported only when asked

    model = getattr(statsforecast.models, STATSFORECAST_MODELS[name])(season_length=1)
    prompts = np.asarray(prompts, dtype=np.float64)
    forecasts = np.empty((len(prompts), horizon, prompts.shape[-1]))
    for row, prompt in enumerate(prompts):
        for variable in range(prompts.shape[-1]):
            series = prompt[:, variable][np.isfinite(prompt[:, variable])]
            forecasts[row, :, variable] = model.forecast(y=series, h=horizon)["mean"]
    return forecasts


def log_transform(values: np.ndarray) -> tuple:
    """The transform a VAR is fitted in and its inverse: log for positive series, log1p where a
    value is 0 (populations that died out), the values themselves where one is -1 or below."""
    if np.all(values > 0):
        return np.log, np.exp
    if np.all(values > -1):
        return np.log1p, np.expm1
    return (lambda v: v), (lambda v: v)


def fit_var(series: np.ndarray, order: int) -> tuple[np.ndarray, float]:
    """Least-squares VAR(``order``) with an intercept on (T, D) ``series``: the (1 + order * D, D)
    coefficients and the Akaike criterion (log det of the residual covariance + 2 k / T)."""
    steps, width = series.shape
    rows = np.stack([np.concatenate([[1.0], *(series[t - lag] for lag in range(1, order + 1))])
                     for t in range(order, steps)])  # fmt: skip
    targets = series[order:]
    coefficients, *_ = np.linalg.lstsq(rows, targets, rcond=None)
    residuals = targets - rows @ coefficients
    covariance = residuals.T @ residuals / len(targets)
    _, logdet = np.linalg.slogdet(covariance + 1e-12 * np.eye(width))
    return coefficients, logdet + 2 * coefficients.size / len(targets)


def log_var_forecast(prompts: np.ndarray, horizon: int, order: int | None = None, max_order: int = 3) -> np.ndarray:
    """A vector autoregression on the log of each (N, P, D) prompt (``log_transform``), its order
    chosen from 1..``max_order`` by the Akaike criterion on the prompt (or ``order``), rolled out
    ``horizon`` steps: (N, horizon, D); persistence where the rollout is not finite."""
    prompts = np.asarray(prompts, dtype=np.float64)
    forecasts = persistence(prompts, horizon)
    for row, prompt in enumerate(prompts):
        prompt = prompt[np.all(np.isfinite(prompt), axis=1)]
        forward, inverse = log_transform(prompt)
        series = forward(prompt)
        orders = [order] if order else [p for p in range(1, max_order + 1) if len(series) - p > 1 + p * series.shape[1]]
        if not orders:
            continue
        coefficients = min((fit_var(series, p) + (p,) for p in orders), key=lambda fit: fit[1])
        weights, _, chosen = coefficients
        history = list(series[-chosen:])
        for _ in range(horizon):
            lags = np.concatenate([[1.0], *(history[-lag] for lag in range(1, chosen + 1))])
            history.append(lags @ weights)
        with np.errstate(over="ignore", invalid="ignore"):
            rollout = inverse(np.array(history[chosen:]))
        if np.all(np.isfinite(rollout)):
            forecasts[row] = rollout
    return forecasts


def reference_applies(name: str, prompts: np.ndarray) -> bool:
    """Whether a reference forecaster can forecast these (N, P, D) prompts: the Lotka-Volterra ODE
    needs two non-negative variables, fully observed (prompts of one length)."""
    if name != "lotka_volterra":
        return True
    return prompts.shape[-1] == 2 and bool(np.all(np.isfinite(prompts))) and bool(np.all(prompts >= 0))


def reference_forecast(name: str, prompts: np.ndarray, time: np.ndarray, horizon: int) -> np.ndarray:
    """Forecast (N, P, D) prompts with a named reference forecaster: (N, horizon, D)."""
    if name == "persistence":
        return persistence(prompts, horizon)
    if name == "lotka_volterra":
        return lotka_volterra_forecast(prompts, time, horizon)
    if name in STATSFORECAST_MODELS:
        return statsforecast_forecast(name, prompts, horizon)
    if name == "log_var":
        return log_var_forecast(prompts, horizon)
    raise ValueError(f"unknown reference forecaster {name!r}; choose from {REFERENCE_FORECASTERS}")
