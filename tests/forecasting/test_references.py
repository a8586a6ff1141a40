import numpy as np
import pytest

from lit_llmtime.data.simulate import integrate, sample_parameters, simulate
from lit_llmtime.forecasting.metrics import score
from lit_llmtime.forecasting.references import (
    fit_lotka_volterra,
    lotka_volterra_forecast,
    persistence,
    reference_forecast,
)


def test_persistence_errors_on_a_hand_made_series():
    prompt = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    truth = np.array([[5.0, 4.0], [3.0, 8.0]])
    forecast = persistence(prompt, 2)[0]
    np.testing.assert_array_equal(forecast, [[3.0, 4.0], [3.0, 4.0]])
    scores = score(truth, forecast, prompt[0])
    assert (scores["x0"]["mse"], scores["x0"]["mae"]) == (2.0, 1.0)  # errors 2, 0
    assert (scores["x1"]["mse"], scores["x1"]["mae"]) == (8.0, 2.0)  # errors 0, 4
    assert scores["x0"]["r2"] == pytest.approx(1 - 4 / 2)  # 1 - SSE / SST = 1 - (4 + 0) / (1 + 1)
    assert scores["x0"]["mase"] == pytest.approx(1.0 / 2.0)  # the prompt's one-step change is 2


def test_ode_forecaster_recovers_damped_and_growing_futures():
    trajectories, time = simulate(n=30, seed=11)
    forecast = lotka_volterra_forecast(trajectories[:, :50], time, 50)
    r2 = [score(t[50:], f, t[:50])[s]["r2"] for t, f in zip(trajectories, forecast, strict=True) for s in ("x0", "x1")]
    assert min(r2) > 0.99
    with pytest.raises(ValueError, match="unknown reference forecaster 'arima'"):
        reference_forecast("arima", trajectories[:, :50], time, 50)


def test_ode_fit_recovers_the_self_limitation_term_of_either_sign():
    time = np.linspace(0, 200, 100)
    parameters = sample_parameters(6, np.random.default_rng(5))
    parameters["e"] = np.array([-0.004, -0.001, 0.0, 0.003, 0.01, 0.02])
    trajectories = integrate(parameters, np.full((6, 2), 1.0), time)
    fitted = fit_lotka_volterra(trajectories[:, :50], time[:50])
    expected = np.stack([parameters[name] for name in "abcde"], axis=1)
    np.testing.assert_allclose(fitted[:, :4], expected[:, :4], rtol=1e-3)
    np.testing.assert_allclose(fitted[:, 4], expected[:, 4], atol=1e-4)


def test_statsforecast_references_equal_the_librarys_own_forecasts():
    import pandas as pd
    from statsforecast import StatsForecast
    from statsforecast.models import AutoARIMA, AutoETS, AutoTheta

    from lit_llmtime.forecasting.references import reference_forecast

    values, time = simulate(n=3, steps=100, seed=2)
    prompts = values[:, :40].astype(np.float64)
    frame = pd.DataFrame(
        [
            {"unique_id": f"{n}-{d}", "ds": t, "y": prompts[n, t, d]}
            for n in range(3)
            for d in range(2)
            for t in range(40)
        ]
    )
    for name, model in (("auto_arima", AutoARIMA), ("auto_ets", AutoETS), ("auto_theta", AutoTheta)):
        theirs = StatsForecast(models=[model(season_length=1)], freq=1).forecast(df=frame, h=7)
        ours = reference_forecast(name, prompts, time, 7)
        for n in range(3):
            for d in range(2):
                column = theirs[theirs["unique_id"] == f"{n}-{d}"].iloc[:, -1].to_numpy()
                np.testing.assert_allclose(ours[n, :, d], column, rtol=1e-6, atol=1e-9)
        assert not np.allclose(ours, persistence(prompts, 7))  # not the last value repeated


def test_log_var_equals_statsmodels_var_on_log_values():
    from statsmodels.tsa.api import VAR

    from lit_llmtime.forecasting.references import log_var_forecast, reference_forecast

    values, time = simulate(n=2, steps=100, seed=4)
    prompts = values[:, :50].astype(np.float64)
    for order in (1, 2, 3):
        ours = log_var_forecast(prompts, 10, order=order)
        for n in range(2):
            fit = VAR(np.log(prompts[n])).fit(order, trend="c")
            expected = np.exp(fit.forecast(np.log(prompts[n, -order:]), steps=10))
            np.testing.assert_allclose(ours[n], expected, rtol=1e-8)
    chosen = reference_forecast("log_var", prompts, time, 10)  # the order the AIC picks: one of those
    assert any(np.allclose(chosen, log_var_forecast(prompts, 10, order=p)) for p in (1, 2, 3))
    dead = prompts.copy()
    dead[0, -20:, 1] = 0.0  # a predator that died out: log1p, still finite and non-negative in the mean
    assert np.all(np.isfinite(log_var_forecast(dead, 10)))


def test_ode_forecaster_fits_each_series_on_its_own_time_axis():
    """Series sampled at different times: each is fitted and integrated on its own axis (a shared
    uniform axis would misplace the irregularly sampled ones; a rescaled one the rates absorb)."""
    parameters = sample_parameters(4, np.random.default_rng(3))
    uniform, irregular = np.linspace(0, 100, 100), 150 * np.linspace(0, 1, 100) ** 1.5
    trajectories = np.concatenate(
        [integrate({k: v[:2] for k, v in parameters.items()}, np.full((2, 2), 1.0), uniform),
         integrate({k: v[2:] for k, v in parameters.items()}, np.full((2, 2), 1.0), irregular)]
    )  # fmt: skip
    times = np.stack([uniform, uniform, irregular, irregular])
    forecast = lotka_volterra_forecast(trajectories[:, :50], times, 50)
    np.testing.assert_allclose(forecast, trajectories[:, 50:], rtol=1e-2, atol=1e-3)
    shared = lotka_volterra_forecast(trajectories[:, :50], uniform, 50)  # the irregular series on the uniform axis
    assert np.abs(shared[2:] - trajectories[2:, 50:]).max() > 0.1
