"""A training step at the real Qwen2.5-0.5B size on the CPU (random weights): ours with the full
output layer, ours with the LLMTIME head, and HF PEFT LoRA with transformers' own loss, on the same
batch. Each variant runs in a fresh process, so peak memory is its own.

    python benchmarks/training_step.py [--tokens 256] [--steps 4]

Prints a markdown table: median step time and peak memory of the step (peak resident memory
during the steps less the resident memory before them), and both as ratios to PEFT's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("peft", "ours-full", "ours-llmtime")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_variant(variant: str, tokens: int, steps: int) -> dict:
    """One variant's step times and step memory (run in its own process)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lit_llmtime.config import LoRAArgs
    from lit_llmtime.model.configs import model_config
    from lit_llmtime.training.module import LLMTimeLoRA

    torch.manual_seed(0)
    alphabet = torch.tensor([*range(15, 25), 13, 11, 26])  # digits . , ; as Qwen2.5 token ids
    ids = alphabet[torch.randint(0, len(alphabet), (1, tokens))]  # LLMTIME characters, as the data
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if variant == "peft":
        from peft import LoraConfig, get_peft_model

        model = AutoModelForCausalLM.from_config(Qwen2Config(**model_config("qwen2.5-0.5b")), dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

        def loss() -> torch.Tensor:
            return model(**batch).loss
    else:
        module = LLMTimeLoRA(
            model_config=model_config("qwen2.5-0.5b"), lora=LoRAArgs(rank=8), output_vocab=variant.removeprefix("ours-")
        )
        module.log = lambda *args, **kwargs: None
        model = module

        def loss() -> torch.Tensor:
            return module.training_step(batch, 0)

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    step()  # warm-up: allocator and Adam state
    before = rss_kib("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "peak_mib": (rss_kib("VmHWM:") - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.steps)))
        return
    results = {}
    for variant in VARIANTS:
        command = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--tokens",
            str(args.tokens),
            "--steps",
            str(args.steps),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    peft = results["peft"]
    print(f"Batch 1 x {args.tokens} tokens, LoRA rank 8 on q_proj and v_proj, float32, Adam; median of {args.steps}")
    print("steps after one warm-up.\n")
    print("| variant | step time | step peak memory | time / PEFT | memory / PEFT |")
    print("|---|---:|---:|---:|---:|")
    for variant, r in results.items():
        print(
            f"| {variant} | {r['median_s']:.2f} s | {r['peak_mib']:.0f} MiB | "
            f"{r['median_s'] / peft['median_s']:.2f} | {r['peak_mib'] / peft['peak_mib']:.2f} |"
        )


if __name__ == "__main__":
    main()
