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
