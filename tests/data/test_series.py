"""Any multivariate series: files in and out, their errors, training and forecasting 3 and 1
variables, and the Python forecaster against ``lit-llmtime predict``."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lit_llmtime.app.cli import main
from lit_llmtime.budget.ledger import Ledger
from lit_llmtime.data.series import DataFileError, from_arrays, load_series, save_series
from lit_llmtime.data.simulate import simulate
from lit_llmtime.forecasting.evaluation import load_npz
from lit_llmtime.forecasting.forecaster import Forecaster, future_times


def ragged(n: int = 20, species: int = 3, seed: int = 5):
    """``n`` simulated series of ``species`` variables, cut to lengths 60-100 (different)."""
    trajectories, time = simulate(n=n, steps=100, seed=seed, species=species)
    lengths = np.random.default_rng(seed).integers(60, 101, n)
    names = ("prey", "predator", "rival.2")[:species]  # a "." as in "pm2.5": no module name may hold it
    return from_arrays([t[:k] for t, k in zip(trajectories, lengths, strict=False)], [time[:k] for k in lengths], names,
                       [f"s{i}" for i in range(n)])  # fmt: skip


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_round_trip_series_of_different_lengths(tmp_path, suffix):
    series = ragged()
    loaded = load_series(save_series(tmp_path / f"lv{suffix}", series))
    assert loaded.variables == ("prey", "predator", "rival.2") and loaded.ids == series.ids
    assert [len(v) for v in loaded.values] == [len(v) for v in series.values] and len(set(loaded.lengths)) > 1
    for a, b, ta, tb in zip(loaded.values, series.values, loaded.time, series.time, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)


@pytest.mark.parametrize("suffix", [".npy", ".h5"])
def test_arrays_round_trip(tmp_path, suffix):
    trajectories, time = simulate(n=6, steps=30, seed=2, species=3)
    series = from_arrays(trajectories, [time] * 6, ("prey", "predator", "rival"))
    loaded = load_series(save_series(tmp_path / f"lv{suffix}", series))
    np.testing.assert_array_equal(np.stack(loaded.values), trajectories.astype(np.float64))
    if suffix == ".h5":  # names and time travel in the h5 layout; a .npy is numbers only
        assert loaded.variables == ("prey", "predator", "rival")
        np.testing.assert_array_equal(loaded.common_time(), time)
    else:
        assert loaded.variables == ("x0", "x1", "x2") and loaded.common_time().tolist() == list(range(30))


def test_a_table_without_ids_is_one_series_sorted_by_time(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("time,count\n3,30\n1,10\n2,20\n")
    series = load_series(path)
    assert series.ids == ["0"] and series.variables == ("count",)
    assert series.values[0][:, 0].tolist() == [10, 20, 30] and series.time[0].tolist() == [1, 2, 3]
    path.write_text("time,count\n2026-01-01T02:00:00+02:00,1\n2026-01-01T01:00:00Z,2\n2026-01-01T02:00:00Z,3\n")
    (times,) = load_series(path).time  # time zones: one clock, UTC
    np.testing.assert_array_equal(times, np.array(["2026-01-01T00:00", "2026-01-01T01:00", "2026-01-01T02:00"], "M8"))
    np.testing.assert_array_equal(future_times(times, 2), np.array(["2026-01-01T03:00", "2026-01-01T04:00"], "M8"))


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("series_id,time,a\n0,0,1\n0,1,2\n", {"target": ["a", "b"]},
         r"no column \['b'\] \(columns: \['series_id', 'time', 'a'\]\)"),
        ("series_id,time,a\n0,0,1\n0,1,x\n0,2,3\n", {}, "column 'a', line 3: 'x' is not a number"),
        ("series_id,time,a\n0,0,1\n0,1,\n", {}, r"column 'a', line 3: missing or non-finite value \(nan\)"),
        ("series_id,time,a\n0,0,1\n0,1,inf\n", {}, r"column 'a', line 3: missing or non-finite value \(inf\)"),
        ("series_id,time,a\n0,0,1\n0,1,2\n1,0,5\n", {}, "series 1 has 1 steps; at least 2 needed"),
        ("series_id,time,a\n0,0,1\n0,0,2\n", {}, r"series 0 has time 0 twice \(line 2 and line 3\)"),
        ("series_id,time,a\n0,x,1\n0,y,2\n", {}, "column 'time' holds neither numbers nor times"),
        ("series_id,time,a\n0,2026-01-01,1\n0,,2\n", {}, "column 'time', line 3: missing time"),
        ("series_id,time,a\n0,0,1\n0,1,2\n", {"id_column": "item"}, "no id_column 'item'"),
    ],
)  # fmt: skip
def test_bad_tables_name_the_file_column_and_row(tmp_path, text, options, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataFileError, match=rf"^{path}: .*{message}"):
        load_series(path, **options)


def test_bad_files_give_their_one_line_through_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("ragged.npy", np.array([np.ones((3, 2)), np.ones((4, 2))], dtype=object))
    Path("data.txt").write_text("1,2\n")
    save_series("good.csv", ragged(n=2))
    cases = {
        ("ragged.npy", "--model_name_or_path"): "ragged.npy: not a numeric numpy array",
        ("data.txt", "--model_name_or_path"): "data.txt: unknown data file type '.txt'; use one of .h5, .hdf5, .npy",
        ("absent.csv", "--model_name_or_path"): "absent.csv: data file not found",
        # a data file as the checkpoint
        ("good.csv", "--ckpt_path"): "good.csv: not a readable checkpoint, truncated or not a checkpoint",
    }
    for (name, model), message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["forecast", "--input", name, "--horizon", "3", model, "good.csv"])
        assert str(exit_info.value).startswith(f"lit-llmtime: error: {message}")
        assert "\n" not in str(exit_info.value)


def write_config(run, model_config: dict | None = None, **data) -> list[str]:
    """The tiny run's config with other data (and model shape) settings."""
    config = yaml.safe_load(Path(run[1]).read_text())
    config["data"].update(data)
    config["model"]["model_config"].update(model_config or {})
    Path("tiny.yaml").write_text(yaml.safe_dump(config))
    return run


@pytest.mark.parametrize("species", [3, 1])
def test_series_of_3_and_1_variables_train_and_forecast_through_the_cli_and_python(run, species):
    suffix = ".csv" if species == 3 else ".npy"  # different lengths in a table; one (N, T, 1) array
    series = ragged(species=species) if species == 3 else from_arrays(simulate(n=20, seed=4, species=1)[0])
    save_series(f"series{suffix}", series)
    write_config(run, data_path=f"series{suffix}", val_size=3, test_size=3, predict_indices=None,
                 forecast_validation={"trajectories": 2, "horizon": 3})  # fmt: skip
    main(["fit", *run, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2"])
    (record,) = Ledger(run.ledger).records()
    assert record["steps"] == 2 and np.isfinite(record["val_loss"])
    checkpoint = next(Path("checkpoints").rglob("last.ckpt"))

    main(["forecast", "--ckpt_path", str(checkpoint), "--input", f"series{suffix}", "--horizon", "4",
          "--out", "out/forecasts.csv", "--context_steps", "50", "--ledger", run.ledger,
          "--device", "cpu", *(["--references", "[persistence, log_var]"] if species == 3 else [])])  # fmt: skip
    table = pd.read_csv("out/forecasts.csv")
    names = series.variables
    assert list(table.columns[:3]) == ["series_id", "time", names[0]] and f"{names[-1]}_0.9" in table.columns
    assert len(table) == 4 * len(series) and table[list(names)].notna().all().all()
    forecast = next(r for r in Ledger(run.ledger).records() if r["stage"] == "forecast")
    assert forecast["run_id"].startswith("forecasts/forecast/version_") and set(forecast) == set(record)  # as fit's
    assert forecast["config"]["lora_rank"] == record["config"]["lora_rank"] and forecast["config"]["horizon"] == 4
    summary = yaml.safe_load(Path("out/forecasts_metrics.json").read_text())
    assert summary["variables"] == list(names) and summary["model"]["mean"]["valid_share"] == 1.0
    everything = {"persistence", "auto_arima", "auto_ets", "auto_theta", "log_var"}  # no ODE for one variable
    assert set(summary["references"]) == ({"persistence", "log_var"} if species == 3 else everything)
    assert Path("out/forecasts_s0.png" if species == 3 else "out/forecasts_0.png").stat().st_size > 10_000

    if species == 3:  # a predict that would run past a series' end is refused before it is charged
        spent = Ledger(run.ledger).total()
        shortest = int(np.argmin(series.lengths))
        with pytest.raises(SystemExit, match=rf"trajectory {shortest} has {series.lengths[shortest] - 50} steps after"):
            main(["predict", *run, "--ckpt_path=last", f"--data.predict_indices=[{shortest}]",
                  "--model.forecast.horizon=60"])  # fmt: skip
        assert Ledger(run.ledger).total() == spent

    forecaster = Forecaster.from_checkpoint(checkpoint)
    same = forecaster.predict([v[:50] for v in series.values], horizon=4)  # what the command generated
    assert forecast["status"] == "finished" and forecast["flops"] == same.flops > 0  # charged, less the refund
    if species == 1:  # a budget that pays for the first of two batches: that batch is kept, at its cost
        first = forecaster.predict([v[:50] for v in series.values[:10]], horizon=4)
        spent = Ledger(run.ledger).total()
        with pytest.raises(SystemExit, match="FLOP budget: forecast's next batch needs .* FLOPs; .* left"):
            main(["forecast", "--ckpt_path", str(checkpoint), "--input", f"series{suffix}", "--horizon", "4",
                  "--out", "out/cut.csv", "--context_steps", "50", "--ledger", run.ledger, "--batch_size", "10",
                  f"--budget={spent + 1.5 * first.flops_bound}", "--device", "cpu"])  # fmt: skip
        cut = next(r for r in Ledger(run.ledger).records() if r["name"] == "cut")
        assert cut["status"].startswith("refused: FLOP budget") and cut["flops"] == pytest.approx(first.flops)
        assert not Path("out/cut.csv").exists()  # nothing half-written
    contexts = [v[:k] for v, k in zip(series.values[:3], (50, 41, 60), strict=True)]  # a list of different lengths
    costs = []  # what each batch cost, as a budget settles it
    prediction = forecaster.predict(contexts, horizon=4, num_samples=2, quantile_levels=(0.1, 0.5, 0.9),
                                    batch_size=2, after_batch=costs.append)  # fmt: skip
    assert len(costs) == 2 and sum(costs) == pytest.approx(prediction.flops)
    assert prediction.variables == names and prediction.median.shape == (3, 4, species)
    assert prediction.quantiles.shape == (3, 3, 4, species) and prediction.samples.shape == (3, 2, 4, species)
    assert prediction.valid_share.tolist() == [1.0, 1.0, 1.0]
    assert 0 < prediction.flops <= prediction.flops_bound
    texts = [text.removesuffix(";").split(";") for text in prediction.texts]  # every step ends in ";"
    assert all(len(steps) == 4 and all(len(step.split(",")) == species for step in steps) for steps in texts)


def test_python_forecasts_equal_predict_to_the_last_digit(run):
    write_config(run, model_config={"initializer_range": 1.0})  # a random model whose greedy texts vary
    main(["fit", *run, "--trainer.max_steps=3"])
    main(["predict", *run, "--ckpt_path=last", "--model.forecast.horizon=6",
          "--model.forecast.reference_forecasters=[persistence]"])  # fmt: skip
    (written,) = Path("lightning_logs").rglob("predictions.npz")
    predicted = load_npz(written)
    forecaster = Forecaster.from_checkpoint(next(Path("checkpoints").rglob("last.ckpt")))
    trajectories = load_series("lv.h5").values
    contexts = [trajectories[i][:50] for i in predicted["index"]]
    prediction = forecaster.predict(contexts, horizon=6, alpha=predicted["alpha"], batch_size=2)  # predict's batches
    assert prediction.texts == predicted["texts"] and len(set(prediction.texts)) > 1
    np.testing.assert_array_equal(prediction.median, predicted["forecast"])
    assert prediction.flops == predicted["flops"]  # the same FLOP model and generation shapes


def test_predict_df_continues_each_series_at_its_frequency(run):
    main(["fit", *run, "--trainer.max_steps=1"])
    forecaster = Forecaster.from_checkpoint(next(Path("checkpoints").rglob("last.ckpt")))
    trajectories, _ = simulate(n=2, steps=30, seed=9)
    frames = [
        pd.DataFrame({"item": name, "date": pd.date_range("2026-01-01", periods=30, freq=freq),
                      "prey": t[:, 0], "predator": t[:, 1]})
        for name, freq, t in zip(("daily", "weekly"), ("D", "W-MON"), trajectories, strict=False)
    ]  # fmt: skip
    out = forecaster.predict_df(pd.concat(frames), 3, id_column="item", timestamp_column="date")
    assert out["item"].tolist() == ["daily"] * 3 + ["weekly"] * 3
    expected = [
        *pd.date_range("2026-01-31", periods=3, freq="D"),
        *pd.date_range(frames[1].date.iloc[-1], periods=4, freq="W-MON")[1:],
    ]
    assert list(out["date"]) == expected
    assert {"prey", "prey_0.5", "predator", "predator_0.9"} <= set(out.columns) and out["prey"].notna().all()
    assert future_times(np.array([0.0, 0.5, 1.0]), 2).tolist() == [1.5, 2.0]
    with pytest.raises(DataFileError, match="DataFrame: no column \\['rival'\\]"):
        forecaster.predict_df(frames[0], 3, id_column="item", timestamp_column="date", target=["prey", "rival"])
    assert torch.is_grad_enabled()  # forecasting leaves the caller's autograd state alone
    with pytest.raises(ValueError, match=r"trained on 2 variables \('prey', 'predator'\); the context has 3"):
        forecaster.predict(np.ones((20, 3)), horizon=2)
