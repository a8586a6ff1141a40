"""Named Qwen2 architectures, as litgpt's ``Config.from_name``: the real Qwen2.5-0.5B (for offline
FLOP counts and meta-device checks) and the tiny random models that tests and benchmarks build, so
that none of them writes a config out."""

from __future__ import annotations

from typing import Any


def qwen2(vocab: int, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, **fields: Any) -> dict[str, Any]:
    """The Qwen2Config fields of an architecture, its sizes in the order of a model card's table."""
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
    ) | fields  # fmt: skip


CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen2.5-0.5B-Instruct's config.json (its architecture; the weights come from the Hub or a file)
    "qwen2.5-0.5b": qwen2(
        151936,
        896,
        4864,
        24,
        14,
        2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    # 16 wide on the 16-token character tokenizer, where token ids do not matter (the real
    # 151,936-row output layer would be 99.8% of the FLOPs)
    "tiny-chars": qwen2(16, 16, 32, 1, 2, 1, tie_word_embeddings=True),
    # the same shape on Qwen2.5's real vocabulary, where its token ids matter
    "tiny-qwen": qwen2(151936, 16, 32, 1, 2, 1, tie_word_embeddings=True),
    # two layers, 64 wide, Qwen2.5's vocabulary: generation and timing benchmarks
    "small-qwen": qwen2(151936, 64, 128, 2, 4, 2, tie_word_embeddings=True),
    # two layers, 32 wide, a 300-token vocabulary: LoRA and GGUF round trips
    "tiny-300": qwen2(300, 32, 64, 2, 4, 2, tie_word_embeddings=True),
    # d=4, 1 layer, 2 query heads and 1 key/value head of width 2, MLP 8, vocabulary 10: FLOPs by hand
    "flops-by-hand": qwen2(10, 4, 8, 1, 2, 1),
}


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The Qwen2Config fields of architecture ``name`` (a copy), with ``overrides``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose from {sorted(CONFIGS)}")
    return CONFIGS[name] | overrides
