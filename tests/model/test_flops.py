import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, Qwen2Config

from lit_llmtime.model.configs import model_config
from lit_llmtime.model.flops import FlopModel, Ops, matmul

# d=4, 1 layer, 2 query heads and 1 key/value head of width 2, MLP 8, vocabulary 10.
TINY = model_config("flops-by-hand")


def test_table_1_costs_and_matmul():
    assert Ops(add=1, mul=2, div=3, exp=4, sqrt=5, trig=6).flops == 1 + 2 + 3 + 40 + 50 + 60
    assert matmul(2, 3, 5).flops == 2 * 5 * (2 * 3 - 1)


def test_coursework_accounting_by_hand():
    # n = 3 tokens:
    #   positions            n*d adds                                    = 12
    #   RMSNorm, each        2nd mul + n(d-1) add + nd div + 10n sqrt     = 24 + 9 + 12 + 30 = 75; 3 of them = 225
    #   Q, K, V, O (d x d)   3*4*(2*4-1) each                             = 84 * 4 = 336
    #   gate, up             3*8*(2*4-1) each                             = 168 * 2 = 336
    #   down                 3*4*(2*8-1)                                  = 180
    #   scores, per head     3*3*(2*2-1) = 27                             = 54
    #   softmax, per head    10*9 exp + 3*2 add + 9 div = 105             = 210
    #   values, per head     3*2*(2*3-1) = 30                             = 60
    #   SwiGLU               n*ff*14 = 24*14                              = 336
    #   lm_head              3*10*(2*4-1)                                 = 210
    model = FlopModel(TINY, accounting="coursework")
    assert model.forward(3) == 12 + 225 + 336 + 336 + 180 + 54 + 210 + 60 + 336 + 210 == 1959
    # LoRA rank 1 on q and v: (2*n*d*r + n*d) multiplications and as many additions each = 36 + 36
    assert FlopModel(TINY, lora_rank=1, accounting="coursework").forward(3) == 1959 + 2 * 72
    assert FlopModel(TINY, accounting="coursework").train_step(batch_size=2, tokens=3) == 3 * 2 * 1959


def test_exact_accounting_by_hand():
    #   rotary angles        n*dh/2 mul + 2 * n*dh/2 trig = 3 + 60        = 63
    #   RMSNorm, each        3nd mul + n(d-1)+n add + 2n div + 10n sqrt   = 36 + 12 + 6 + 30 = 84; 3 of them = 252
    #   q (4 wide) + bias    84 + 12                                      = 96
    #   k, v (2 wide) + bias 3*2*(2*4-1) + 6 = 48 each                    = 96
    #   o                    3*4*(2*4-1)                                  = 84
    #   gate, up, down       as coursework                                = 336 + 180
    #   rope on q and k      3 * (2 + 1) * 2 = 18 elements, 2 mul + 1 add = 54
    #   residual adds        2nd                                          = 24
    #   scores + scale, mask 54 + 18 + 18                                 = 90
    #   softmax, values      as coursework                                = 210 + 60
    #   SwiGLU               g / (1 + exp(-g)) * up: neg, exp, add, div, mul = 14 per unit, 24 units = 336
    #   lm_head                                                           = 210
    expected = 63 + 252 + 96 + 96 + 84 + 336 + 180 + 54 + 24 + 90 + 210 + 60 + 336 + 210
    assert FlopModel(TINY).forward(3) == expected == 2091
    # LoRA rank 1 on q (4 -> 1 -> 4) and v (4 -> 1 -> 2), with scale and residual add:
    #   q: 3*1*(2*4-1) + 3*4*(2*1-1) + 12 + 12 = 21 + 12 + 24 = 57;  v: 21 + 6 + 12 = 39
    assert FlopModel(TINY, lora_rank=1).forward(3) == 2091 + 57 + 39
    assert FlopModel(TINY, lm_head_bias=True).forward(3) == 2091 + 3 * 10


def test_coursework_anchors_from_the_report():
    final = FlopModel(model_config("qwen2.5-0.5b"), lora_rank=8, accounting="coursework")
    assert final.train_step(4, 768) * 6000 == pytest.approx(6.224e16, rel=0.005)  # report: 6.23e16, 62.25%
    default = FlopModel(model_config("qwen2.5-0.5b"), lora_rank=4, accounting="coursework")
    assert default.train_step(4, 512) * 600 == pytest.approx(4.06e15, rel=0.005)


def test_monotonic_in_rank_and_context():
    for accounting in ("exact", "coursework"):
        by_rank = [
            FlopModel(model_config("qwen2.5-0.5b"), lora_rank=r, accounting=accounting).forward(512)
            for r in (0, 2, 4, 8)
        ]
        assert by_rank == sorted(by_rank) and len(set(by_rank)) == 4
        model = FlopModel(model_config("qwen2.5-0.5b"), lora_rank=8, accounting=accounting)
        by_context = [model.forward(n) for n in (128, 512, 768)]
        assert by_context == sorted(by_context) and len(set(by_context)) == 3


def test_kv_cache_generation_is_cheaper_and_consistent():
    model = FlopModel(model_config("qwen2.5-0.5b"), lora_rank=8)
    cached, uncached = model.generation(500, 500), model.generation(500, 500, kv_cache=False)
    assert cached < uncached / 100
    # one new token is just the prefill, and each further token attends over one more position
    assert model.generation(500, 1) == model.forward(500, logits=1)
    assert model.generation(500, 3) == model.forward(500, logits=1) + model.forward(1, keys=501) + model.forward(
        1, keys=502
    )
    assert model.generation(500, 1, kv_cache=False) == model.generation(500, 1)
    # samples share one prefill: 4 continuations of 3 tokens pay the prompt once and the steps 4 times
    steps = model.forward(1, keys=501) + model.forward(1, keys=502)
    assert model.generation(500, 3, continuations=4) == model.forward(500, logits=1) + 4 * steps


def test_breakdown_lists_every_component():
    parts = FlopModel(model_config("qwen2.5-0.5b"), lora_rank=8, lm_head_bias=True).forward_breakdown(64)
    assert set(parts) == {
        "embeddings", "positions", "rmsnorm", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
        "down_proj", "lora", "rope", "residual", "attention_scores", "softmax", "attention_values", "swiglu",
        "final_norm", "lm_head", "lm_head_bias",
    }  # fmt: skip
    assert parts["embeddings"].flops == 0
    with pytest.raises(ValueError, match="unknown FLOP accounting 'fast'"):
        FlopModel(TINY, accounting="fast")


def test_matrix_multiplies_agree_with_torch_flop_counter():
    """FlopCounterMode counts 2*m*n*p per product where Table 1 gives m*p*(2n-1), so ours is lower by
    m*p per product (under 0.1% at these widths); it skips softmax, norms and element-wise work,
    which we compare against only the matrix-multiply part."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            Qwen2Config(**model_config("qwen2.5-0.5b")), attn_implementation="eager"
        )
    model = model.to_empty(device="cpu")  # real tensors with garbage values: FLOPs do not depend on them
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.zeros(1, 64, dtype=torch.long), use_cache=False)
    parts = FlopModel(model_config("qwen2.5-0.5b")).forward_breakdown(64)
    products = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    ours = sum(parts[name].flops for name in products)
    ours += sum(parts[name].flops for name in ("attention_scores", "attention_values"))
    ours -= 2 * 14 * 64 * 64  # minus the score scaling and mask additions (14 heads, 64 x 64 scores)
    ours -= sum(64 * width for width in (896, 128, 128))  # minus q/k/v bias additions (addmm counts none)
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert ours < counter.get_total_flops()


def test_a_static_cache_is_attended_whole_by_the_prefill_and_every_step():
    model = FlopModel(model_config("qwen2.5-0.5b"))
    static = model.generation(512, 20, cache_tokens=1280)
    assert static == model.forward(512, keys=1280, logits=1) + 19 * model.forward(1, keys=1280)
    assert static > model.generation(512, 20)  # the eager path attends only the keys written so far
