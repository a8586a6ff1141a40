"""One script for a session with a GPU: the real Qwen2.5-0.5B architecture (random weights: the Hub is
out of reach there, and speed does not depend on the values), bfloat16 base, LoRA rank 8 on q/v.

    python benchmarks/gpu.py            # about 2 minutes on one H100-class GPU

Measures, at context 768 and batch 4: training step time (median), peak memory and model-FLOP
utilisation (exact-accounting FLOPs of the step / time / the chip's dense bf16 peak) for the full
and the LLMTIME output head, and which loss ran (liger-kernel's fused kernel or our chunked one);
generation tokens per second for 16 prompts of 50 steps, eager and compiled (static KV cache and a
CUDA-graph step: the compiling call, then the steady state); and the whole study's predicted wall
time (the sweep and the final run, about 9e16 FLOPs) from the step rate. Prints a markdown table.

On a GPU machine without a package index that has torch, transformers and Lightning: run
``benchmarks/gpu_wheels.sh`` here first (it downloads the few other wheels the package needs into
``benchmarks/wheels``, git-ignored), carry that folder, and there

    pip install --no-index --no-deps benchmarks/wheels/*.whl && pip install --no-deps --no-build-isolation -e .
    python benchmarks/gpu.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lit_llmtime.config import LoRAArgs
from lit_llmtime.model.configs import model_config
from lit_llmtime.model.generate import generate
from lit_llmtime.model.loss import loss_path
from lit_llmtime.text.grammar import LLMTimeGrammar
from lit_llmtime.training.module import LLMTimeLoRA

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense, without sparsity
STUDY_FLOPS = 9.2e16  # README, "Reproduce the report"


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def train(output_vocab: str, steps: int) -> dict:
    torch.manual_seed(0)
    module = LLMTimeLoRA(
        model_config=model_config("qwen2.5-0.5b"),
        torch_dtype="bfloat16",
        lora=LoRAArgs(rank=8),
        output_vocab=output_vocab,
    ).cuda()
    module.log = lambda *args, **kwargs: None
    alphabet = torch.tensor([*range(15, 25), 13, 11, 26], device="cuda")  # digits . , ; as Qwen2.5 token ids
    ids = alphabet[torch.randint(0, len(alphabet), (4, 768), device="cuda")]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, step).backward()
        optimizer.step()
        torch.cuda.synchronize()
        if step >= 5:  # warm-up
            times.append(time.perf_counter() - start)
    step_flops = module.flop_model().train_step(4, 768)
    median = statistics.median(times)
    hidden = torch.zeros(1, module.model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    return {
        "median_s": median,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "flops": step_flops,
        "mfu": step_flops / median / peak_flops(),
        "loss": loss_path(hidden, module.model.get_output_embeddings()),
        "module": module,
    }


@torch.no_grad()
def tokens_per_second(module: LLMTimeLoRA, compile: bool, prompts: int = 16, steps: int = 50) -> tuple[float, float]:
    """Generation speed on one batch: (tokens per second of the first call, of the second). With
    ``compile`` the first call includes compiling the step, the second is the steady state."""
    ids = torch.randint(15, 25, (prompts, 500), device="cuda")
    ids[:, 4::5] = 26  # a ';' now and then, as in LLMTIME text
    speeds = []
    for _ in range(2):
        grammar = LLMTimeGrammar(module.tokenizer, prompts, steps, device="cuda")
        generation = generate(module.model.eval(), ids, torch.ones_like(ids), grammar, steps * grammar.max_step_tokens,
                              static=compile, compile=compile)  # fmt: skip
        torch.cuda.synchronize()
        speeds.append(generation.tokens_per_second)
    return speeds[0], speeds[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    full = train("full", args.steps)
    del full["module"]  # freed before the second model is measured
    torch.cuda.empty_cache()
    small = train("llmtime", args.steps)
    eager = tokens_per_second(small["module"], compile=False)
    compiled = tokens_per_second(small["module"], compile=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; context 768, batch 4, bf16 base, LoRA rank 8\n")
    print("| measure | full head | llmtime head |")
    print("|---|---:|---:|")
    step_ms = f"{full['median_s'] * 1e3:.1f} ms | {small['median_s'] * 1e3:.1f} ms"
    print(f"| training step (median of {args.steps}) | {step_ms} |")
    print(f"| peak memory | {full['peak_gib']:.1f} GiB | {small['peak_gib']:.1f} GiB |")
    print(f"| FLOPs per step (exact) | {full['flops']:.3e} | {small['flops']:.3e} |")
    print(f"| model-FLOP utilisation | {100 * full['mfu']:.1f}% | {100 * small['mfu']:.1f}% |")
    print(f"| loss | {full['loss']} | {small['loss']} |")
    rate = full["flops"] / full["median_s"]
    print(
        "\nGeneration, 16 prompts of 500 tokens, 50 steps, grammar, KV cache (tokens/s): "
        f"eager {eager[0]:.0f} then {eager[1]:.0f}; compiled {compiled[0]:.0f} (compiling) then {compiled[1]:.0f}."
    )
    print(f"The whole study ({STUDY_FLOPS:.1e} FLOPs of training at {rate / 1e12:.0f} TFLOP/s): "
          f"{STUDY_FLOPS / rate / 60:.1f} minutes.")  # fmt: skip


if __name__ == "__main__":
    main()
