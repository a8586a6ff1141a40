"""The LightningModule: Qwen2.5 (frozen) + our LoRA layers, trained as a causal LM on LLMTIME text."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config

from lit_llmtime.callbacks import flop_model_for
from lit_llmtime.data import IGNORE_INDEX, OFFLINE_TOKENIZER, load_tokenizer
from lit_llmtime.forecast import REFERENCE_FORECASTERS, generate_forecasts, reference_forecast
from lit_llmtime.lora import apply_lora, count_trainable, merge_lora, trainable_state_dict, unmerge_lora

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"

# Qwen2.5-0.5B-Instruct's architecture (its config.json), for FLOP counts and meta-device checks.
QWEN2_5_0_5B_CONFIG = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)


def build_base_model(
    model_name_or_path: str, model_config: dict[str, Any] | None, dtype: torch.dtype, init_seed: int = 0
) -> PreTrainedModel:
    """Pretrained weights (Hub id or folder), or a randomly initialised Qwen2 from ``model_config``.

    Random weights come from ``init_seed``, so a checkpoint holding only the adapter reloads onto
    the very same base model.
    """
    if model_config is None:
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return AutoModelForCausalLM.from_config(Qwen2Config(**model_config), dtype=dtype)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over labelled positions, and how many there were."""
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (targets != IGNORE_INDEX).sum()
    return loss / count.clamp(min=1), count


class LLMTimeLoRA(L.LightningModule):
    """Qwen2.5 with LoRA on chosen projections, trained on LLMTIME token windows.

    Args:
        model_name_or_path: Hub id or local folder of the pretrained model.
        model_config: Qwen2Config fields of a small randomly initialised model (tests, quickstart);
            when given, ``model_name_or_path`` is not loaded.
        init_seed: seed of the random weights when ``model_config`` is given.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (update scaled by alpha / r); defaults to r.
        lora_dropout: dropout on the LoRA path's input.
        lora_targets: names of the linear layers to adapt in every block.
        train_lm_head_bias: add a trainable zero-initialised lm_head bias (the coursework skeleton).
        learning_rate: Adam learning rate.
        weight_decay: Adam(W) weight decay; 0 gives the report's plain Adam.
        warmup_steps: linear learning-rate warm-up steps.
        lr_schedule: ``constant`` after warm-up, or ``cosine`` decay to 0 over the run.
        torch_dtype: dtype of the frozen base (float32 on CPU, bfloat16 on GPU); LoRA stays float32.
        tokenizer: tokenizer of the data (linked from the data module).
        context_length: tokens per training window (linked from the data module).
        batch_size: windows per batch per device (linked from the data module).
        prompt_steps: time steps given to the model in ``predict``.
        forecast_steps: time steps it must generate.
        num_samples: forecasts sampled per trajectory; 1 is greedy, more give a median and 5-95% band.
        temperature: sampling temperature when ``num_samples > 1``.
        top_p: nucleus sampling threshold when ``num_samples > 1``.
        constrained: allow only LLMTIME characters and end-of-text while generating.
        reference_forecasters: classical forecasters run on the same prompts for comparison
            (``persistence``, ``lotka_volterra``).
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        model_config: dict[str, Any] | None = None,
        init_seed: int = 0,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_targets: list[str] = ["q_proj", "v_proj"],  # noqa: B006 (jsonargparse needs a list)
        train_lm_head_bias: bool = False,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        tokenizer: str = OFFLINE_TOKENIZER,
        context_length: int = 512,
        batch_size: int = 4,
        prompt_steps: int = 50,
        forecast_steps: int = 50,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_p: float = 0.9,
        constrained: bool = True,
        reference_forecasters: list[str] = ["persistence", "lotka_volterra"],  # noqa: B006
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        unknown = sorted(set(reference_forecasters) - set(REFERENCE_FORECASTERS))
        if unknown:
            raise ValueError(f"unknown reference forecasters {unknown}; choose from {list(REFERENCE_FORECASTERS)}")
        self.model = build_base_model(model_name_or_path, model_config, getattr(torch, torch_dtype), init_seed)
        apply_lora(self.model, lora_targets, lora_rank, lora_alpha, lora_dropout, train_lm_head_bias)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.strict_loading = False  # checkpoints hold only the trainable tensors

    @property
    def trainable_parameters(self) -> int:
        return count_trainable(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, tokens, vocab)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_lm_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> int | None:
        """Skip the step when a callback (the FLOP budget) asked to stop before it."""
        return -1 if self.trainer.should_stop else None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, count = self._loss(batch)
        self.val_loss.update(loss, count)  # token-weighted: the mean over every labelled token

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_loss("val", self.val_loss)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, count = self._loss(batch)
        self.test_loss.update(loss, count)

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
    def on_predict_start(self) -> None:
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        self.flop_model = flop_model_for(self)
        merge_lora(self.model)  # one matrix per projection while generating

    def on_predict_end(self) -> None:
        unmerge_lora(self.model)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """Forecast ``forecast_steps`` steps of each trajectory from its first ``prompt_steps``."""
        hp = self.hparams
        trajectories = batch["trajectory"].cpu().numpy()
        time = batch["time"][0].cpu().numpy()
        if trajectories.shape[1] < hp.prompt_steps + hp.forecast_steps:
            raise ValueError(
                f"trajectories have {trajectories.shape[1]} steps, fewer than prompt_steps + forecast_steps "
                f"= {hp.prompt_steps + hp.forecast_steps}"
            )
        prompts = trajectories[:, : hp.prompt_steps]
        truth = trajectories[:, hp.prompt_steps : hp.prompt_steps + hp.forecast_steps]
        result = generate_forecasts(
            self.model, self.tokenizer, prompts, hp.forecast_steps, hp.num_samples, hp.temperature, hp.top_p,
            constrained=hp.constrained, flop_model=self.flop_model,
        )  # fmt: skip
        references = {
            name: reference_forecast(name, prompts, time, hp.forecast_steps) for name in hp.reference_forecasters
        }
        return {
            "index": batch["index"].cpu().numpy(),
            "time": time,
            "prompt": prompts,
            "truth": truth,
            "references": references,
            **{k: getattr(result, k) for k in ("forecast", "lower", "upper", "samples", "valid_share", "alpha")},
            "texts": result.texts,
            "flops": result.flops,
            "seconds": result.seconds,
        }

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        hp = self.hparams
        if hp.weight_decay > 0:
            optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=hp.learning_rate)
        total = max(1, self.trainer.estimated_stepping_batches) if hp.lr_schedule == "cosine" else 1

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.lr_schedule == "cosine":
                progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter: a rank-8 Qwen2.5-0.5B checkpoint is a few MB, not 2 GB."""
        keep = set(trainable_state_dict(self))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(set(trainable_state_dict(self)) - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} adapter tensors this model needs (e.g. {missing[0]}); "
                "was it trained with other LoRA targets?"
            )
