"""`lit-llmtime forecast` charged through the generation gate."""

import pytest

from lit_llmtime.budget.ledger import Ledger


def test_a_forecast_settles_each_finished_batch_and_keeps_a_failed_ones_bound(tmp_path):
    from types import SimpleNamespace

    from lit_llmtime.app.forecast_command import forecast_gate
    from lit_llmtime.budget.gates import settled
    from lit_llmtime.model.configs import model_config
    from lit_llmtime.model.flops import FlopModel
    from lit_llmtime.model.generate import GenerationShape

    model = FlopModel(model_config("tiny-chars"))
    shape = GenerationShape(rows=2, prompt_tokens=40, max_new_tokens=30, head_rows=14)
    bound, actual = shape.flops(model), shape.flops(model, 12)  # a batch that wrote 12 of its 30 tokens
    forecaster = SimpleNamespace(flop_model=model)
    with settled(forecast_gate(forecaster, str(tmp_path / "a.jsonl"), 1e15, "done", {})) as gate:
        assert gate.charge([], "no batch") == 0 and gate.charged == 0  # nothing to run (limit_predict_batches=0)
        assert gate.charge([bound], "a batch") == 1
        gate.finished(bound, actual)
    (record,) = Ledger(tmp_path / "a.jsonl").records()
    assert record["status"] == "finished" and record["flops"] == pytest.approx(actual) and actual < bound
    with (
        pytest.raises(RuntimeError),
        settled(forecast_gate(forecaster, str(tmp_path / "b.jsonl"), 1e15, "cut", {})) as gate,
    ):
        gate.charge([bound], "a batch")
        gate.finished(bound, actual)
        gate.charge([bound], "a batch")  # the second batch fails while it runs: its work may be done, its bound stays
        raise RuntimeError("out of memory")
    (record,) = Ledger(tmp_path / "b.jsonl").records()
    assert record["status"] == "failed: RuntimeError" and record["flops"] == pytest.approx(actual + bound)
