"""Prompts see no future: one scale rule and one prompt builder for the data module and the Forecaster."""

from __future__ import annotations

import numpy as np
import pytest

from lit_llmtime.config import EncodingArgs
from lit_llmtime.data.module import SeriesDataModule
from lit_llmtime.data.prompts import prompt_batches
from lit_llmtime.data.series import from_arrays
from lit_llmtime.data.simulate import simulate
from lit_llmtime.forecasting.forecaster import Forecaster
from lit_llmtime.model.configs import model_config
from lit_llmtime.text.tokenizers import CHARACTER_TOKENIZER


def prompts_of(path, scale_from: str) -> tuple[SeriesDataModule, list[list[int]], list[list[int]]]:
    """The data module of ``path`` and the token ids of its predict and validation-forecast prompts."""
    data = SeriesDataModule(
        data_path=str(path), tokenizer=CHARACTER_TOKENIZER, encoding=EncodingArgs(scale_from=scale_from),
        context_length=64, val_size=6, test_size=4, predict_indices=[38, 39], forecast_validation={"trajectories": 6},
    )  # fmt: skip
    data.setup("fit")
    data.setup("predict")
    return data, data.datasets["predict"].token_ids, data.datasets["val_forecast"].token_ids


@pytest.mark.parametrize("scale_from", ["dataset", "prompt", "trajectory"])
def test_a_prompt_is_unchanged_when_only_its_own_future_changes(tmp_path, scale_from):
    values, _ = simulate(n=40, seed=3)
    np.save(tmp_path / "a.npy", values)
    data, predict, validation = prompts_of(tmp_path / "a.npy", scale_from)
    changed = values.copy()
    for index in (39, *data.splits["val"]):  # a predicted series and every validation series: their futures
        changed[index, 50:] *= 3.0
    np.save(tmp_path / "b.npy", changed)
    _, predict_b, validation_b = prompts_of(tmp_path / "b.npy", scale_from)
    leak_free = scale_from != "trajectory"
    assert (predict_b == predict) == leak_free and (validation_b == validation) == leak_free
    assert predict_b[0] == predict[0]  # series 38 is unchanged either way


def test_the_forecaster_writes_the_data_modules_prompts(tmp_path):
    """A context (a series' first 50 steps) through ``Forecaster.predict`` is the prompt ``predict``
    writes for that series: the same scale (the training split's) and the same text."""
    values, _ = simulate(n=40, seed=3)
    np.save(tmp_path / "a.npy", values)
    data, predict, _ = prompts_of(tmp_path / "a.npy", "dataset")
    forecaster = Forecaster.from_model(
        model_config=model_config("tiny-chars"), tokenizer=CHARACTER_TOKENIZER, encoding=EncodingArgs()
    )
    forecaster.dataset_alpha = data.dataset_alpha
    contexts = [values[38, :50], values[39, :50]]
    prediction = forecaster.predict(contexts, horizon=2)
    np.testing.assert_array_equal(prediction.alpha, data.alphas[[38, 39]])
    (batch,) = prompt_batches(data.tokenizer, from_arrays(contexts), prediction.alpha, data.encoding, 16, "cpu")
    assert [
        row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ] == predict
    with pytest.raises(ValueError, match="scale_from=dataset needs the training split's scale"):
        Forecaster.from_model(model_config=model_config("tiny-chars"), tokenizer=CHARACTER_TOKENIZER).predict(
            contexts, horizon=2
        )


def test_the_log_transform_reaches_every_text_and_decoding_undoes_it(tmp_path):
    from lit_llmtime.text.codec import decode, encode

    values, _ = simulate(n=40, seed=3)
    np.save(tmp_path / "a.npy", values)
    encoding = EncodingArgs(transform="log", decimals=1)
    data = SeriesDataModule(
        data_path=str(tmp_path / "a.npy"), tokenizer=CHARACTER_TOKENIZER, encoding=encoding, context_length=64,
        val_size=6, test_size=4, predict_indices=[38],
    )  # fmt: skip
    data.setup("fit")
    data.setup("predict")
    (prompt_ids,) = data.datasets["predict"].token_ids
    expected = encode(values[38, :50], alpha=data.alphas[38], decimals=1, transform="log")[0] + ";"
    assert data.tokenizer.decode(prompt_ids) == expected
    first = np.log1p(values[38, 0] / data.alphas[38] / 0.01)  # log(1 + v / 0.01) of the first step's scaled values
    assert expected.startswith(f"{first[0]:.1f},{first[1]:.1f};")
    first_window = data.tokenizer.decode([t for t in data.datasets["train"][0]["input_ids"].tolist() if t != 0])
    train = data.splits["train"][0]
    assert first_window.startswith(encode(values[train], alpha=data.alphas[train], decimals=1, transform="log")[0][:40])
    forecaster = Forecaster.from_model(model_config=model_config("tiny-chars"), tokenizer=CHARACTER_TOKENIZER,
                                       encoding=encoding)  # fmt: skip
    forecaster.dataset_alpha = data.dataset_alpha
    prediction = forecaster.predict([values[38, :50]], horizon=3)
    decoded = decode(prediction.texts[0], prediction.alpha[0], steps=3, transform="log").values
    np.testing.assert_allclose(prediction.median[0], decoded)  # the text's values, back on the data's scale
    assert np.all(prediction.median[0] <= 3.0 * values[38, :50].max() * (1 + 0.06))  # the bound, as values
