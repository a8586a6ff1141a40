"""The LightningModule ``LLMTimeLoRA``: loss steps, forecast skill at validation, forecasts in predict."""
