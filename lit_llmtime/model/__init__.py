"""The network: base model resolver, LoRA, loss, GGUF files, FLOP model, generation loop, checkpoints."""
