"""Qwen2 checkpoints in llama.cpp's GGUF format, as plain trainable transformers models.

transformers reads and de-quantises GGUF files, but the model it returns is marked quantised: it
refuses ``save_pretrained``, reports itself untrainable and carries a quantiser. We copy its weights
into a fresh ``Qwen2ForCausalLM`` instead. The file's config and tokenizer come from its header,
which we read ourselves: gguf-py's reader, behind transformers' GGUF config path, takes seconds to
walk a 151,936-token vocabulary.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

from lit_llmtime.text.codec import ALPHABET

ARCHITECTURE = "qwen2"

# GGUF metadata value types: fixed-size scalars (struct formats), and the two variable-size ones.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# `qwen2.*` metadata key -> Qwen2Config field, as in transformers' GGUF_CONFIG_MAPPING["qwen2"].
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "context_length": "max_position_embeddings",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
_REQUIRED_CONFIG_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
_TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}


def is_gguf(name_or_path: str | Path) -> bool:
    """Whether this names a ``.gguf`` file (by suffix), rather than a Hub id or a model folder."""
    return str(name_or_path).lower().endswith(".gguf")


def _read_value(blob: mmap.mmap, pos: int, kind: int) -> tuple[Any, int]:
    """One metadata value at ``pos`` and the offset after it; an array is returned as its length."""
    if kind == _STRING:
        (length,) = struct.unpack_from("<Q", blob, pos)
        return blob[pos + 8 : pos + 8 + length].decode("utf-8", errors="replace"), pos + 8 + length
    if kind == _ARRAY:
        item_kind, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item_kind in _SCALAR_FORMATS:
            return count, pos + count * struct.calcsize(_SCALAR_FORMATS[item_kind])
        if item_kind == _STRING:  # the vocabulary and merges: skip, 300k strings in a real Qwen2 file
            for _ in range(count):
                pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
            return count, pos
        for _ in range(count):
            _, pos = _read_value(blob, pos, item_kind)
        return count, pos
    if kind not in _SCALAR_FORMATS:
        raise ValueError(f"unknown GGUF metadata value type {kind}")
    return struct.unpack_from(_SCALAR_FORMATS[kind], blob, pos)[0], pos + struct.calcsize(_SCALAR_FORMATS[kind])


def _read_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The metadata (arrays as their lengths) and tensor names of a qwen2 GGUF file, without its tensor data.

    Raises FileNotFoundError or ValueError, naming the file, when it is missing, not GGUF or not qwen2.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    with path.open("rb") as file:
        if file.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it does not start with the magic bytes 'GGUF')")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            try:
                (version,) = struct.unpack_from("<I", blob, 4)
                if version not in (2, 3):
                    raise ValueError(f"GGUF version {version} is not supported (only 2 and 3)")
                tensor_count, kv_count = struct.unpack_from("<QQ", blob, 8)
                pos, metadata = 24, {}
                for _ in range(kv_count):
                    key, pos = _read_value(blob, pos, _STRING)
                    (kind,) = struct.unpack_from("<I", blob, pos)
                    metadata[key], pos = _read_value(blob, pos + 4, kind)
                tensor_names = []
                for _ in range(tensor_count):
                    name, pos = _read_value(blob, pos, _STRING)
                    (n_dims,) = struct.unpack_from("<I", blob, pos)
                    pos += 4 + 8 * n_dims + 4 + 8  # dims, ggml type, data offset
                    tensor_names.append(name)
            except (struct.error, ValueError) as error:
                raise ValueError(f"{path}: unreadable GGUF header ({error})") from error
    architecture = metadata.get("general.architecture")
    if architecture != ARCHITECTURE:
        raise ValueError(
            f"{path}: GGUF architecture is {architecture!r}; only {ARCHITECTURE!r} (Qwen2 / Qwen2.5) is supported"
        )
    return metadata, tensor_names


def gguf_config(path: str | Path) -> Qwen2Config:
    """The Qwen2 config a GGUF file's metadata describes, without reading its weights (for FLOP planning).

    Mirrors transformers' own GGUF config for qwen2 (tied embeddings when there is no ``output.weight``,
    vocabulary size from the token list), in a fraction of a second rather than several seconds.
    """
    path = Path(path)
    metadata, tensor_names = _read_header(path)
    missing = [f"qwen2.{key}" for key in _REQUIRED_CONFIG_KEYS if f"qwen2.{key}" not in metadata]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    fields = {field: metadata[f"qwen2.{key}"] for key, field in _CONFIG_KEYS.items() if f"qwen2.{key}" in metadata}
    fields.setdefault("vocab_size", metadata.get("tokenizer.ggml.tokens"))
    if fields["vocab_size"] is None:
        raise ValueError(f"{path}: GGUF metadata has neither qwen2.vocab_size nor tokenizer.ggml.tokens")
    for key, field in _TOKEN_ID_KEYS.items():
        if f"tokenizer.ggml.{key}" in metadata:
            fields[field] = metadata[f"tokenizer.ggml.{key}"]
    return Qwen2Config(tie_word_embeddings="output.weight" not in tensor_names, **fields)


def load_gguf_model(path: str | Path, dtype: torch.dtype) -> PreTrainedModel:
    """A plain ``Qwen2ForCausalLM`` in ``dtype`` holding a qwen2 GGUF file's de-quantised weights.

    transformers de-quantises the file into float32, but marks that model quantised (no ``save_pretrained``,
    not trainable); its weights go into a fresh model from the same config, which behaves like one loaded
    from safetensors. Untied files (with ``output.weight``) and tied ones both load.
    """
    path = Path(path)
    # Validates the file; handing it over spares transformers a config pass through gguf-py (seconds).
    config = gguf_config(path)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32
    )
    state_dict = quantised.state_dict()
    del quantised
    model = Qwen2ForCausalLM.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype)
    del state_dict
    model.config.name_or_path = str(path)
    return model


def gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored in a qwen2 GGUF file.

    Same tokenizer as ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``, which picks
    ``Qwen2Tokenizer`` for a qwen2 file but first re-reads the whole header through gguf-py (seconds).
    """
    path = Path(path)
    metadata, _ = _read_header(path)
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path}: the GGUF file holds no tokenizer (no tokenizer.ggml.tokens metadata)")
    return Qwen2Tokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def check_tokenizer_agrees(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise ValueError unless the GGUF file's tokenizer gives ``tokenizer``'s ids to the LLMTIME alphabet
    and to the eos token, so the model's embedding rows mean what our encoded text expects."""
    stored = gguf_tokenizer(path)
    disagreements = []
    for char in ALPHABET:
        expected = tokenizer.encode(char, add_special_tokens=False)
        found = stored.encode(char, add_special_tokens=False)
        if expected != found:
            disagreements.append(f"{char!r}: {found} in the file, {expected} in the tokenizer")
    if stored.eos_token_id != tokenizer.eos_token_id:
        disagreements.append(
            f"eos token id: {stored.eos_token_id} in the file, {tokenizer.eos_token_id} in the tokenizer"
        )
    if disagreements:
        raise ValueError(f"{path}: the GGUF file's tokenizer disagrees with ours on " + "; ".join(disagreements))
