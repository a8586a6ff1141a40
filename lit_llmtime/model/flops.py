"""FLOP model of a Qwen2 forward pass with the coursework's Table 1 costs.

Additions, subtractions, negations, multiplications and divisions cost 1; exponentials,
logarithms, square roots, sines and cosines cost 10; a (m x n) @ (n x p) product costs
m * p * (2n - 1). Training costs 3 x forward (backward = 2 x forward, the report's rule).

Two accountings:
- ``coursework``: the report's section 4 formulas exactly (Q, K and V each d x d, an additive
  position term, SwiGLU 14 FLOPs per hidden unit, LoRA adapters d -> r -> d).
- ``exact``: the same costs on the real architecture: grouped-query K/V widths, q/k/v biases,
  rotary embeddings, scaled and masked scores, residual additions, rsqrt-based RMSNorm, LoRA with
  the true in/out widths. Padding positions are computed by the model, so they are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from lit_llmtime.config import LoRAArgs
from lit_llmtime.text.codec import ALPHABET

Accounting = Literal["exact", "coursework"]
COSTS = {"add": 1, "mul": 1, "div": 1, "exp": 10, "sqrt": 10, "trig": 10}


@dataclass(frozen=True)
class Ops:
    """Counts of primitive operations; ``flops`` weighs them with Table 1."""

    add: float = 0
    mul: float = 0
    div: float = 0
    exp: float = 0
    sqrt: float = 0
    trig: float = 0

    @property
    def flops(self) -> float:
        return sum(COSTS[f.name] * getattr(self, f.name) for f in fields(self))

    def __add__(self, other: Ops) -> Ops:
        return Ops(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __mul__(self, factor: float) -> Ops:
        return Ops(*(getattr(self, f.name) * factor for f in fields(self)))

    __rmul__ = __mul__


def matmul(m: float, n: float, p: float) -> Ops:
    """(m x n) @ (n x p): m*p*n multiplications and m*p*(n-1) additions."""
    return Ops(mul=m * p * n, add=m * p * (n - 1))


@dataclass(frozen=True)
class Architecture:
    """The shape facts of a Qwen2 model that its FLOPs depend on."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> Architecture:
        """From a transformers config object or a dict of its fields."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        heads = get("num_attention_heads")
        return cls(
            hidden_size=get("hidden_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            head_dim=get("head_dim") or get("hidden_size") // heads,
        )


class FlopModel:
    """FLOPs of forward passes, training steps and generation for one model + LoRA setup.

    Args:
        config: transformers Qwen2 config (or a dict of its fields).
        lora_rank: LoRA rank; 0 for no adapters.
        lora_targets: adapted linear layers of every block.
        lm_head_bias: whether the lm_head carries the optional trainable bias.
        accounting: ``exact`` or ``coursework`` (see the module docstring).
        train_head_rows: output rows the training loss computes (None: the whole vocabulary; 15
            for the LLMTIME head). Evaluation always computes them all.
    """

    def __init__(
        self,
        config: Any,
        lora_rank: int = 0,
        lora_targets: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
        lm_head_bias: bool = False,
        accounting: Accounting = "exact",
        train_head_rows: int | None = None,
    ) -> None:
        if accounting not in ("exact", "coursework"):
            raise ValueError(f"unknown FLOP accounting {accounting!r}; use 'exact' or 'coursework'")
        self.arch = Architecture.from_config(config)
        self.lora_rank = lora_rank
        self.lora_targets = tuple(lora_targets)
        self.lm_head_bias = lm_head_bias
        self.accounting = accounting
        self.train_head_rows = train_head_rows

    # -- widths ------------------------------------------------------------------------------
    def _linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of a block, as this accounting sees it."""
        a = self.arch
        d, ff = a.hidden_size, a.intermediate_size
        q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        if self.accounting == "coursework":
            q = kv = d
        return {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, ff),
            "up_proj": (d, ff),
            "down_proj": (ff, d),
        }

    # -- pieces --------------------------------------------------------------------------------
    def _rmsnorm(self, n: float) -> Ops:
        d = self.arch.hidden_size
        if self.accounting == "coursework":  # square, sum, sqrt, divide, scale
            return Ops(mul=2 * n * d, add=n * (d - 1), div=n * d, sqrt=n)
        # square, sum, mean, + eps, rsqrt (sqrt and inverse), x * rsqrt, * gamma
        return Ops(mul=3 * n * d, add=n * (d - 1) + n, div=2 * n, sqrt=n)

    def _attention_core(self, queries: float, keys: float) -> dict[str, Ops]:
        """Scores, softmax and value mixing of ``queries`` new tokens over ``keys`` positions."""
        a = self.arch
        h, dh = a.num_attention_heads, a.head_dim
        scores = matmul(queries, dh, keys) * h
        if self.accounting == "exact":  # 1/sqrt(dh) scaling and the additive causal mask
            scores = scores + Ops(mul=h * queries * keys, add=h * queries * keys)
        softmax = Ops(exp=queries * keys, add=queries * (keys - 1), div=queries * keys) * h
        values = matmul(queries, keys, dh) * h
        return {"attention_scores": scores, "softmax": softmax, "attention_values": values}

    def _swiglu(self, n: float) -> Ops:
        ff = self.arch.intermediate_size
        if self.accounting == "coursework":  # exp, divide, add, 2 multiplications per hidden unit
            return Ops(exp=n * ff, div=n * ff, add=n * ff, mul=2 * n * ff)
        # silu(g) = g / (1 + exp(-g)): negate, exp, add, divide; then * up
        return Ops(exp=n * ff, div=n * ff, add=2 * n * ff, mul=n * ff)

    def _lora(self, n: float, fan_in: int, fan_out: int) -> Ops:
        r = self.lora_rank
        if self.accounting == "coursework":  # the report: d -> r -> d, scale and residual add
            d = self.arch.hidden_size
            return Ops(mul=2 * n * d * r + n * d, add=2 * n * d * r + n * d)
        return matmul(n, fan_in, r) + matmul(n, r, fan_out) + Ops(mul=n * fan_out, add=n * fan_out)

    def _block(self, n: float, keys: float) -> dict[str, Ops]:
        """One transformer block for ``n`` new tokens attending over ``keys`` positions."""
        a = self.arch
        d = a.hidden_size
        parts: dict[str, Ops] = {"rmsnorm": self._rmsnorm(n) * 2}
        for name, (fan_in, fan_out) in self._linear_shapes().items():
            parts[name] = matmul(n, fan_in, fan_out)
            if self.accounting == "exact" and name in ("q_proj", "k_proj", "v_proj"):
                parts[name] = parts[name] + Ops(add=n * fan_out)  # bias
            if self.lora_rank and name in self.lora_targets:
                parts["lora"] = parts.get("lora", Ops()) + self._lora(n, fan_in, fan_out)
        if self.accounting == "exact":
            rotated = n * (a.num_attention_heads + a.num_key_value_heads) * a.head_dim
            parts["rope"] = Ops(mul=2 * rotated, add=rotated)  # x*cos + rotate_half(x)*sin
            parts["residual"] = Ops(add=2 * n * d)
        parts.update(self._attention_core(n, keys))
        parts["swiglu"] = self._swiglu(n)
        return parts

    # -- public --------------------------------------------------------------------------------
    def forward_breakdown(
        self, tokens: int, keys: int | None = None, logits: int | None = None, head_rows: int | None = None
    ) -> dict[str, Ops]:
        """Operation counts per component for one sequence.

        ``tokens`` new tokens attend over ``keys`` positions (default: themselves, causal
        attention computed densely as the kernels do); ``logits`` positions go through the output
        projection (default: all new tokens), over ``head_rows`` rows of it (default: the whole
        vocabulary; fewer when only the LLMTIME alphabet's rows are computed).
        """
        a = self.arch
        n, keys = tokens, tokens if keys is None else keys
        logits = tokens if logits is None else logits
        rows = a.vocab_size if head_rows is None else head_rows
        parts: dict[str, Ops] = {"embeddings": Ops()}  # a table look-up
        if self.accounting == "coursework":
            parts["positions"] = Ops(add=n * a.hidden_size)
        else:  # rotary angles: position * inverse frequency, then cos and sin, once per forward
            half = n * a.head_dim / 2
            parts["positions"] = Ops(mul=half, trig=2 * half)
        for name, ops in self._block(n, keys).items():
            parts[name] = parts.get(name, Ops()) + ops * a.num_hidden_layers
        parts["final_norm"] = self._rmsnorm(n)
        parts["lm_head"] = matmul(logits, a.hidden_size, rows)
        if self.lm_head_bias:
            parts["lm_head_bias"] = Ops(add=logits * rows)
        return parts

    def forward(
        self, tokens: int, keys: int | None = None, logits: int | None = None, head_rows: int | None = None
    ) -> float:
        """FLOPs of one sequence's forward pass (see ``forward_breakdown``)."""
        return sum(ops.flops for ops in self.forward_breakdown(tokens, keys, logits, head_rows).values())

    def batch_forward(self, batch_size: int, tokens: int) -> float:
        """FLOPs of a forward pass over a (batch_size, tokens) batch."""
        return batch_size * self.forward(tokens)

    def train_step(self, batch_size: int, tokens: int) -> float:
        """FLOPs of one batch's forward and backward: 3 x forward (through the training head's rows)."""
        return 3 * batch_size * self.forward(tokens, head_rows=self.train_head_rows)

    def generation(
        self,
        prompt_tokens: int,
        new_tokens: int,
        kv_cache: bool = True,
        head_rows: int | None = None,
        cache_tokens: int | None = None,
        continuations: int = 1,
    ) -> float:
        """FLOPs of generating ``new_tokens`` after a prompt, ``continuations`` times (samples).

        With the KV cache: one prefill of the prompt (logits for its last position only), its cache
        copied to every continuation, then one forward per further token over the cache; the last
        token needs no forward after it. A preallocated (static) cache of ``cache_tokens`` positions
        is attended whole, masked, by the prefill and by every step. Without a cache, every new
        token re-runs the whole sequence so far.
        """
        if new_tokens <= 0:
            return 0.0
        if kv_cache:
            steps = sum(
                self.forward(1, keys=cache_tokens or prompt_tokens + step, head_rows=head_rows)
                for step in range(1, new_tokens)
            )
            return self.forward(prompt_tokens, keys=cache_tokens, logits=1, head_rows=head_rows) + continuations * steps
        return continuations * sum(
            self.forward(prompt_tokens + step, logits=1, head_rows=head_rows) for step in range(new_tokens)
        )


def run_flop_model(
    architecture: Any, lora: LoRAArgs, output_vocab: str = "full", accounting: Accounting = "exact"
) -> FlopModel:
    """The FLOP model of a run: its base architecture (a config or dict), LoRA settings, training
    output rows and accounting. The plan (from a config) and the budget (from a module) both use it."""
    return FlopModel(
        architecture,
        lora_rank=lora.rank,
        lora_targets=lora.targets,
        lm_head_bias=lora.train_lm_head_bias,
        accounting=accounting,
        train_head_rows=len(ALPHABET) + 1 if output_vocab == "llmtime" else None,  # + end-of-text
    )
