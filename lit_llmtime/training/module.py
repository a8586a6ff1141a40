"""The LightningModule: Qwen2.5 (frozen) + our LoRA layers, trained as a causal LM on LLMTIME text
and forecasting with the LLMTIME grammar."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from lit_llmtime.config import DEFAULT_MODEL, EncodingArgs, ForecastArgs, LoRAArgs, OptimArgs, as_args
from lit_llmtime.data.windows import IGNORE_INDEX
from lit_llmtime.forecasting.forecaster import Forecaster, ForecastResult
from lit_llmtime.forecasting.skill import ForecastSkill
from lit_llmtime.model.base import build_model, llmtime_head_rows
from lit_llmtime.model.checkpoint import check_adapter
from lit_llmtime.model.flops import Accounting, FlopModel, run_flop_model
from lit_llmtime.model.generate import GenerationShape, StepProgress, static_generation
from lit_llmtime.model.lora import count_trainable, trainable_state_dict
from lit_llmtime.model.loss import evaluation_losses, training_loss
from lit_llmtime.text.tokenizers import OFFLINE_TOKENIZER, load_tokenizer


def optimizer_and_schedule(params: list[nn.Parameter], optim: OptimArgs, total_steps: int) -> dict[str, Any]:
    """Adam (AdamW with weight decay) and a per-step schedule: linear warm-up over
    ``optim.warmup_steps``, then constant or (``cosine``) decaying to 0 at ``total_steps``."""
    if optim.weight_decay > 0:
        optimizer = torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=optim.learning_rate)

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "cosine":
            progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    scheduler = LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LLMTimeLoRA(L.LightningModule):
    """Qwen2.5 with LoRA on chosen projections, trained on LLMTIME token windows; forecasts in ``predict``.

    Args:
        model_name_or_path: Hub id, local folder or ``.gguf`` file of the pretrained model.
        model_config: Qwen2Config fields of a small randomly initialised model (tests, quickstart);
            when given, ``model_name_or_path`` is not loaded.
        init_seed: seed of the random weights when ``model_config`` is given.
        torch_dtype: dtype of the frozen base (float32 on CPU, bfloat16 on GPU); LoRA stays float32.
        tokenizer: tokenizer of the data (linked from the data module).
        lora: the LoRA adapters.
        optim: the optimiser and learning-rate schedule.
        forecast: generation and reference forecasters in ``predict``.
        encoding: how the data was written as text (linked from the data module).
        output_vocab: output rows the training loss computes: ``full`` (all 151,936, as the report)
            or ``llmtime`` (the 14 LLMTIME characters and end-of-text: about a quarter fewer FLOPs
            per step for Qwen2.5-0.5B). Validation reports the full-vocabulary loss either way
            (``val/loss``), and with ``llmtime`` also the loss over those rows (``val/loss_llmtime``).
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        model_config: dict[str, Any] | None = None,
        init_seed: int = 0,
        torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        tokenizer: str = OFFLINE_TOKENIZER,
        lora: LoRAArgs = LoRAArgs(),  # noqa: B008 (jsonargparse reads the group from it)
        optim: OptimArgs = OptimArgs(),  # noqa: B008
        forecast: ForecastArgs = ForecastArgs(),  # noqa: B008
        encoding: EncodingArgs = EncodingArgs(),  # noqa: B008
        output_vocab: Literal["full", "llmtime"] = "full",
    ) -> None:
        super().__init__()
        self.lora, self.optim = as_args(LoRAArgs, lora), as_args(OptimArgs, optim)
        self.forecast, self.encoding = as_args(ForecastArgs, forecast), as_args(EncodingArgs, encoding)
        # Plain values, so checkpoints load with weights_only. The forecast settings describe a predict
        # call, not the trained weights: a checkpoint must not override them (LightningCLI applies a
        # checkpoint's hyperparameters over the config).
        plain = {name: asdict(getattr(self, name)) for name in ("lora", "optim", "encoding")}
        self.save_hyperparameters({
            "model_name_or_path": model_name_or_path, "model_config": model_config, "init_seed": init_seed,
            "torch_dtype": torch_dtype, "tokenizer": tokenizer, "output_vocab": output_vocab, **plain,
        })  # fmt: skip
        self.model = build_model(model_name_or_path, model_config, init_seed, torch_dtype, tokenizer, self.lora)
        self.val_loss, self.val_loss_llmtime, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_forecast = ForecastSkill()
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.budget_refused_batch = False  # set by FlopBudget: this batch is not paid for
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._forecaster: tuple[tuple, Forecaster] | None = None
        rows = llmtime_head_rows(self.tokenizer) if output_vocab == "llmtime" else None
        self.register_buffer("head_rows", rows, persistent=False)

    @property
    def trainable_parameters(self) -> int:
        return count_trainable(self)

    def flop_model(self, accounting: Accounting = "exact") -> FlopModel:
        """What this model's steps, batches and generations cost (the FLOP budget charges by it)."""
        return run_flop_model(self.model.config, self.lora, self.hparams.output_vocab, accounting)

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """FLOPs of one training step on ``batch`` (forward and backward), as Lightning's
        ``ThroughputMonitor`` and nanoGPT's ``estimate_mfu`` take them."""
        return self.flop_model().train_step(*batch["input_ids"].shape)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, tokens, vocab)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _hidden_and_targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states of every position that predicts a token, and that token (flattened)."""
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        hidden = hidden.last_hidden_state[:, :-1]
        return hidden.reshape(-1, hidden.size(-1)), batch["labels"][:, 1:].reshape(-1)

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> int | None:
        """Skip the batch (Lightning's -1) that the FLOP budget refused just before it (the budget
        also stops training; it refuses min_steps and min_epochs, which would defer that stop)."""
        refused, self.budget_refused_batch = self.budget_refused_batch, False  # one batch, not every later fit
        return -1 if refused else None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled tokens, the output layer applied in chunks."""
        hidden, targets = self._hidden_and_targets(batch)
        loss = training_loss(hidden, self.model.get_output_embeddings(), targets, self.head_rows)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], metric: MeanMetric, restricted: MeanMetric | None) -> None:
        hidden, targets = self._hidden_and_targets(batch)
        full, rows_only = evaluation_losses(hidden, self.model.get_output_embeddings(), targets, self.head_rows)
        count = (targets != IGNORE_INDEX).sum()
        metric.update(full / count.clamp(min=1), count)  # token-weighted: the mean over every labelled token
        if restricted is not None and rows_only is not None:
            restricted.update(rows_only / count.clamp(min=1), count)

    def on_validation_epoch_start(self) -> None:
        # fresh state in this pass's grad mode (a validate() before fit() left inference tensors)
        self.val_loss.reset()
        self.val_loss_llmtime.reset()
        self.val_forecast.reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> ForecastResult | None:
        """Token loss on the windows (loader 0); forecasts of the validation prompts (loader 1)."""
        if dataloader_idx == 0:
            self._evaluate(batch, self.val_loss, self.val_loss_llmtime)
            return None
        result = self.forecaster(batch)  # as far as the batch's horizon
        self.val_forecast.update(result)
        return result

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_loss("val", self.val_loss)
        if self.val_loss_llmtime.update_count:
            self.log("val/loss_llmtime", self.val_loss_llmtime.compute(), sync_dist=False)
            self.val_loss_llmtime.reset()
        if self.val_forecast.update_count:
            self.val_forecast.log_to(self)

    def on_test_epoch_start(self) -> None:
        self.test_loss.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, None)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_loss("test", self.test_loss)

    def _log_epoch_loss(self, stage: str, metric: MeanMetric) -> None:
        if metric.update_count == 0:
            return
        loss = metric.compute()  # synchronised across devices
        metric.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{stage}/perplexity", loss.exp(), sync_dist=False)
        if stage == "val" and not self.trainer.sanity_checking:
            self.log("hp_metric", loss, sync_dist=False)

    def on_fit_start(self) -> None:
        if self.logger is not None:
            self.logger.log_metrics({"model/trainable_parameters": self.trainable_parameters}, step=0)

    # -- forecasting ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The data's tokenizer (loaded on first use: only forecasting needs it)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def compiled_generation(self) -> bool:
        """Static KV cache and a compiled decoding step (``forecast.compile``; ``auto``: on CUDA)."""
        return static_generation(self.forecast.compile, self.device.type == "cuda")

    @property
    def forecaster(self) -> Forecaster:
        """This model's forecaster (the adapters used as they are, never merged), made once per
        device and forecast settings, so a batch's budget charge and its generation share one plan."""
        key = (self.device, id(self.forecast), getattr(self, "dataset_alpha", None), getattr(self, "variables", None))
        if self._forecaster is None or self._forecaster[0] != key:
            self._forecaster = (key, Forecaster.from_module(self))
        return self._forecaster[1]

    def generation_shape(self, batch: dict[str, torch.Tensor]) -> GenerationShape:
        """What forecasting this batch computes at most (the FLOP budget charges it beforehand):
        validation prompts carry their horizon, predict prompts go ``forecast.horizon``."""
        return self.forecaster.shape(batch)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> ForecastResult:
        """Forecast ``forecast.horizon`` steps of each trajectory from its prompt."""
        horizon = self.forecast.horizon
        show = self.trainer.progress_bar_callback is not None and self.trainer.is_global_zero
        with StepProgress(horizon, f"forecast batch {batch_idx}", disable=not show) as progress:
            return self.forecaster(batch, horizon, self.forecast.reference_forecasters, progress)

    def configure_optimizers(self) -> dict[str, Any]:
        total = max(1, self.trainer.estimated_stepping_batches) if self.optim.schedule == "cosine" else 1
        return optimizer_and_schedule([p for p in self.parameters() if p.requires_grad], self.optim, total)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter: a rank-8 Qwen2.5-0.5B checkpoint is a few MB, not 2 GB. With it,
        the training split's scale (which ``scale_from: dataset`` forecasts need) and the names of
        the variables it was trained on (``Forecaster.from_checkpoint`` names its forecasts by them)."""
        keep = set(trainable_state_dict(self))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        data = self.trainer.datamodule  # saving: a trainer is attached
        if getattr(data, "dataset_alpha", None) is not None:
            checkpoint["dataset_alpha"] = float(data.dataset_alpha)
        if getattr(data, "variables", None) is not None:
            checkpoint["variables"] = list(data.variables)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_adapter(set(trainable_state_dict(self)), checkpoint["state_dict"])
