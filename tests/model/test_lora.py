import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from lit_llmtime.model.base import build_base_model
from lit_llmtime.model.configs import model_config
from lit_llmtime.model.lora import (
    LoRALinear,
    apply_lora,
    count_trainable,
    lora_layers,
    merge_lora,
    save_peft_adapter,
    unmerge_lora,
)

TINY = model_config("tiny-300")


def tiny_model(dtype=torch.float32):
    return build_base_model("unused", TINY, dtype, init_seed=0).eval()


def randomize_lora(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def test_zero_init_b_keeps_the_base_model():
    base, adapted = tiny_model(), tiny_model()
    wrapped = apply_lora(adapted, rank=4)
    assert wrapped == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    torch.testing.assert_close(adapted(IDS).logits, base(IDS).logits, rtol=0, atol=0)
    layer = adapted.model.layers[0].self_attn.q_proj
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (32, 4) and layer.scaling == 1.0
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0


def test_forward_matches_the_formula():
    linear = torch.nn.Linear(6, 5)
    layer = LoRALinear(linear, rank=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    expected = linear(x) + (x @ layer.lora_A.T) @ layer.lora_B.T * 2.0
    torch.testing.assert_close(layer(x), expected)


def test_merge_unmerge_round_trip():
    model = tiny_model()
    apply_lora(model, rank=4)
    randomize_lora(model)
    before = model.model.layers[0].self_attn.q_proj.base.weight.clone()
    unmerged = model(IDS).logits
    merge_lora(model)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.base.weight, before)
    torch.testing.assert_close(model(IDS).logits, unmerged, atol=1e-5, rtol=1e-5)
    merge_lora(model)  # idempotent
    unmerge_lora(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base.weight, before, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(IDS).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_only_lora_parameters_receive_gradients():
    model = tiny_model().train()
    apply_lora(model, rank=4)
    randomize_lora(model)
    model(IDS, labels=IDS).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, _ in model.named_parameters() if "lora_" in name}
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in with_grad)


def test_real_qwen2_5_config_rank_8_has_540672_trainable_parameters():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**model_config("qwen2.5-0.5b")))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    apply_lora(model, rank=8)
    assert count_trainable(model) == 540_672  # (8*896 + 896*8) + (8*896 + 128*8), times 24 layers


def test_lm_head_bias_option():
    model = tiny_model()
    apply_lora(model, rank=2, train_lm_head_bias=True)
    assert count_trainable(model) == 2 * (2 * 32 + 32 * 2 + 2 * 32 + 16 * 2) + 300
    assert model.lm_head.bias.requires_grad and model.lm_head.bias.abs().sum() == 0


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r"LoRA targets \['qkv'\] match no linear layer; available: .*'q_proj'"):
        apply_lora(tiny_model(), targets=["q_proj", "qkv"])


def test_bfloat16_base_with_float32_adapter():
    model = tiny_model(torch.bfloat16)
    apply_lora(model, rank=4)
    randomize_lora(model)
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    logits = model(IDS).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_peft_export_gives_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    ours = tiny_model()
    apply_lora(ours, targets=["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    randomize_lora(ours, seed=3)
    folder = save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, ["down_proj", "q_proj", "v_proj"])
    theirs = peft.PeftModel.from_pretrained(tiny_model(), folder).eval()
    expected = ours(IDS).logits
    assert not torch.allclose(expected, tiny_model()(IDS).logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(theirs(IDS).logits, expected, atol=1e-5, rtol=0)
