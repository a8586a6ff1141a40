import h5py
import numpy as np

from lit_llmtime.data.simulate import sample_self_limitation, simulate, write_h5


def test_simulated_file_has_the_coursework_layout(tmp_path):
    trajectories, time = simulate(n=20, steps=100, seed=0)
    path = write_h5(tmp_path / "lv.h5", trajectories, time)
    with h5py.File(path) as f:
        assert sorted(f.keys()) == ["time", "trajectories"]
        assert f["trajectories"].dtype == np.float32 and f["trajectories"].shape == (20, 100, 2)
        assert f["time"].dtype == np.float64
        np.testing.assert_array_equal(f["time"][()], np.linspace(0, 200, 100))
        assert len(f.attrs) == 0
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    assert np.array_equal(simulate(n=5, seed=4)[0], simulate(n=5, seed=4)[0])


def test_simulated_statistics_match_the_real_file():
    """REFERENCE.md's figures of the coursework file: values, initial conditions, and the damped or
    growing oscillations (the prey's largest value over steps 51-100 against steps 1-50)."""
    trajectories, _ = simulate(n=1000, steps=100, seed=0)
    prey, predator = trajectories[..., 0], trajectories[..., 1]
    assert np.all(trajectories > 0) and np.all(np.isfinite(trajectories))
    assert np.all((trajectories[:, 0] >= 0.8) & (trajectories[:, 0] <= 1.2))
    assert 1.5 < prey.mean() < 1.9 and 0.5 < predator.mean() < 0.65  # real 1.70, 0.57
    assert 0.3 < predator.std() < 0.45 and 0.9 < prey.std() < 1.6  # real 0.38, 1.44
    assert 8 < prey.max() < 25 and 3 < predator.max() < 8  # real 13.74, 4.77
    assert prey.min() < 0.02 and predator.min() < 0.001  # real 0.0021, 0.00004: deep troughs
    ratio = prey[:, 50:].max(axis=1) / prey[:, :50].max(axis=1)
    np.testing.assert_allclose(np.percentile(ratio, [5, 50, 95]), [0.64, 0.88, 1.37], atol=0.06)


def test_self_limitation_follows_the_fitted_distribution():
    e = sample_self_limitation(100_000, np.random.default_rng(0))
    np.testing.assert_allclose(np.percentile(e, [50, 95]), [0.0053, 0.026], atol=5e-4)
    assert (
        e.min() == -0.005 and 0.07 < np.mean(e == -0.005) < 0.08
    )  # floored: 7.5% grow as fast as the real file allows
