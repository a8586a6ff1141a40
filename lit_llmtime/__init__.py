"""lit-llmtime: LoRA fine-tuning of Qwen2.5 on LLMTIME-encoded Lotka-Volterra series, under a FLOP budget."""

__version__ = "0.1.0"
