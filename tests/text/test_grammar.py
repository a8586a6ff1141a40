"""LLMTimeGrammar: hand-written prefixes, random and adversarial logits, K-column scores and the other
modes (a real model generating under it: tests/model/test_generate.py)."""

import re

import pytest
import torch

from lit_llmtime.text.codec import decode
from lit_llmtime.text.grammar import LLMTimeGrammar

VOCAB = 151936  # Qwen2.5's embedding rows (the tokenizer has fewer ids)
EOS = "<eos>"


def char_ids(tokenizer, text: str) -> list[int]:
    """One id per character: the tokenizer itself would merge ``;;``, ``..`` or ``,-`` into one token."""
    return [tokenizer(char, add_special_tokens=False)["input_ids"][0] for char in text]


def allowed_chars(grammar: LLMTimeGrammar, row: int = 0) -> str:
    """The characters row ``row`` may write next, in alphabet order, eos as ``<eos>``."""
    return "".join(char for char, ok in zip(grammar.chars, grammar.allowed()[row].tolist(), strict=True) if ok)


def write(grammar: LLMTimeGrammar, tokenizer, text: str) -> None:
    """Advance every row by the characters of ``text``."""
    for token in char_ids(tokenizer, text):
        grammar.advance(torch.full_like(grammar.state, token))


def number_pattern(decimals: int, max_integer_digits: int, allow_negative: bool) -> str:
    """Regex of one number as the encoder writes it (no ``05.3``, exactly ``decimals`` decimals)."""
    sign = "-?" if allow_negative else ""
    fraction = rf"\.\d{{{decimals}}}" if decimals else ""
    return rf"{sign}(0|[1-9]\d{{0,{max_integer_digits - 1}}}){fraction}"


def drive(grammar: LLMTimeGrammar, tokenizer, bias: str | None, sample: bool, full_vocab: bool) -> torch.Tensor:
    """Random scores (``bias`` strongly preferred) over the K columns or the full vocab, masked; argmax or
    sample until all rows are finished, then one more token each. Returns the (batch, length) vocab ids."""
    generator = torch.Generator().manual_seed(0)
    batch, columns = len(grammar.state), grammar.token_ids.tolist()
    favourite = [] if bias is None else [tokenizer.eos_token_id] if bias == EOS else char_ids(tokenizer, bias)
    favourite = [columns.index(token) for token in favourite if token in columns]
    # the rest of the vocab outscores the alphabet, so only the mask keeps it out (drawn once: randn is slow)
    background = torch.randn(batch, VOCAB, generator=generator) + 3.0 if full_vocab else None

    def pick() -> torch.Tensor:
        scores = torch.randn(batch, len(columns), generator=generator)
        scores[:, favourite] += 10.0
        if full_vocab:
            scores = background.index_copy(1, grammar.token_ids, scores)
        masked = grammar.mask(scores)
        choice = torch.multinomial(masked.softmax(-1), 1, generator=generator)[:, 0] if sample else masked.argmax(-1)
        token = choice if full_vocab else grammar.token_ids[choice]
        grammar.advance(token)
        return token

    tokens = []
    while not grammar.finished.all():
        assert len(tokens) < grammar.steps * grammar.max_step_tokens
        tokens.append(pick())
    tokens.append(pick())  # finished rows may write only eos
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize(
    "prefix, expected",
    [
        ("", "0123456789"),
        ("0", "."),
        ("7", "0123456789."),
        ("12", "0123456789."),
        ("123", "."),
        ("1.", "0123456789"),
        ("1.2", "0123456789"),
        ("1.23", ","),
        ("1.23,", "0123456789"),
        ("1.23,0.50", ";"),
        ("1.23,0.50;", "0123456789"),
        ("1.23,0.50;4.00,567.89", ";"),
        ("1.23,0.50;4.00,567.89;", EOS),
        ("1.23,0.50;4.00,567.89;" + EOS, EOS),
    ],
)
def test_allowed_after_prefix(tokenizer, prefix, expected):
    grammar = LLMTimeGrammar(tokenizer, batch_size=2, steps=2)
    text = prefix.removesuffix(EOS)
    write(grammar, tokenizer, text)
    if prefix.endswith(EOS):
        grammar.advance(torch.full((2,), tokenizer.eos_token_id))
    assert allowed_chars(grammar, 0) == allowed_chars(grammar, 1) == expected
    assert grammar.finished.tolist() == [text.count(";") == 2] * 2


@pytest.mark.parametrize(
    "decimals, allow_negative, prefix, expected",
    [
        (2, True, "", "0123456789-"),
        (2, True, "-", "0123456789"),
        (2, True, "-0", "."),
        (2, True, "1.23,", "0123456789-"),
        (0, False, "0", ","),
        (0, False, "12", "0123456789,"),
        (0, False, "12,345", ";"),
        (3, False, "1.23", "0123456789"),
        (3, False, "1.234", ","),
    ],
)
def test_allowed_options(tokenizer, decimals, allow_negative, prefix, expected):
    grammar = LLMTimeGrammar(tokenizer, 1, steps=1, decimals=decimals, allow_negative=allow_negative)
    write(grammar, tokenizer, prefix)
    assert allowed_chars(grammar) == expected


def test_token_ids_and_foreign_tokens(tokenizer):
    grammar = LLMTimeGrammar(tokenizer, 4, steps=1, allow_negative=True)
    assert grammar.token_ids.tolist() == [*range(15, 25), 13, 11, 26, 12, tokenizer.eos_token_id]
    write(grammar, tokenizer, "4.")
    before = grammar.state.clone()
    # a word, a padded-vocab id past the tokenizer, a label pad, and "," which is not allowed here
    grammar.advance(torch.tensor([char_ids(tokenizer, "a")[0], VOCAB - 1, -100, 11]))
    assert torch.equal(grammar.state, before)


CONFIGS = [  # decimals, max_integer_digits, allow_negative, n_variables
    (2, 3, False, 2),
    (2, 3, True, 2),
    (3, 2, False, 2),
    (0, 3, True, 2),
    (1, 1, False, 3),
]


def check_forecasts(tokenizer, config, bias, sample, full_vocab, steps=3, batch=16) -> None:
    """Drive a grammar with random scores and check every row is exactly ``steps`` well-formed steps, then eos."""
    decimals, max_integer_digits, allow_negative, n_variables = config
    grammar = LLMTimeGrammar(tokenizer, batch, steps, decimals, max_integer_digits, allow_negative, n_variables)
    tokens = drive(grammar, tokenizer, bias, sample, full_vocab)
    number = number_pattern(decimals, max_integer_digits, allow_negative)
    step = ",".join([number] * n_variables) + ";"
    eos = tokenizer.eos_token_id
    texts = []
    for row in tokens.tolist():
        end = row.index(eos)
        assert set(row[end:]) == {eos}  # eos only at the end, and then only eos
        text = tokenizer.decode(row[:end])
        assert re.fullmatch(f"({step}){{{steps}}}", text), text
        parsed = decode(text, alpha=1.0, n_variables=n_variables)
        assert parsed.values.shape == (steps, n_variables) and parsed.n_valid == steps
        texts.append(text)
    numbers = re.split("[,;]", "".join(texts))[:-1]
    assert len(numbers) == batch * steps * n_variables
    assert all(len(n.split(".")[-1]) == decimals for n in numbers if decimals)
    negatives = [n for n in numbers if n.startswith("-")]
    if not allow_negative:
        assert not negatives
    elif bias == "-":
        assert len(negatives) > len(numbers) / 2 if sample else negatives == numbers
    elif bias is None:
        assert negatives
    if bias == "9" and not sample:  # the longest integer allowed, and no longer
        assert all(n.split(".")[0] == "9" * max_integer_digits for n in numbers)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "d{}-int{}-neg{:d}-vars{}".format(*c))
@pytest.mark.parametrize("bias", [None, EOS, "-", ";", "9"])
@pytest.mark.parametrize("sample", [False, True], ids=["argmax", "sample"])
def test_random_k_column_scores_always_parse(tokenizer, config, bias, sample):
    check_forecasts(tokenizer, config, bias, sample, full_vocab=False)


@pytest.mark.parametrize("bias", [None, EOS, "-"])
def test_random_full_vocab_scores_always_parse(tokenizer, bias):
    # argmax only: multinomial over 151936 ids is slow, and sampling from the masked vocab is sampling from
    # the masked K columns (test_k_column_scores_match_full_vocab)
    check_forecasts(tokenizer, CONFIGS[1], bias, sample=False, full_vocab=True)


def test_k_column_scores_match_full_vocab(tokenizer):
    full, narrow = (LLMTimeGrammar(tokenizer, 8, steps=4, allow_negative=True) for _ in range(2))
    generator = torch.Generator().manual_seed(1)
    while not full.finished.all():
        scores = torch.randn(8, VOCAB, generator=generator)
        masked_full, masked_narrow = full.mask(scores), narrow.mask(scores[:, narrow.token_ids])
        torch.testing.assert_close(masked_full.softmax(-1)[:, full.token_ids], masked_narrow.softmax(-1))
        token = masked_full.argmax(-1)
        assert torch.equal(token, narrow.token_ids[masked_narrow.argmax(-1)])
        full.advance(token)
        narrow.advance(token)
        assert torch.equal(full.state, narrow.state)
    assert narrow.finished.all()


def test_alphabet_mode_constrains_characters_only(tokenizer):
    grammar = LLMTimeGrammar(tokenizer, 1, steps=3, mode="alphabet")
    for char in "1..2;;":
        assert allowed_chars(grammar) == "0123456789.,;" + EOS
        write(grammar, tokenizer, char)
    assert not grammar.finished.item()
    write(grammar, tokenizer, ";")
    assert grammar.finished.item() and allowed_chars(grammar) == EOS
    masked = grammar.mask(torch.zeros(1, VOCAB))
    assert torch.isfinite(masked).nonzero()[:, 1].tolist() == [tokenizer.eos_token_id]
    strict = LLMTimeGrammar(tokenizer, 1, steps=3)
    assert ";" not in allowed_chars(strict)
    write(strict, tokenizer, "1.")
    assert "." not in allowed_chars(strict)


def test_early_eos_stops_without_finishing(tokenizer):
    grammar = LLMTimeGrammar(tokenizer, 2, steps=2, mode="alphabet")
    grammar.advance(torch.tensor([26, tokenizer.eos_token_id]))
    assert grammar.finished.tolist() == [False, False] and grammar.stopped.tolist() == [False, True]
    assert allowed_chars(grammar, 1) == EOS
    grammar.advance(torch.tensor([26, 26]))
    assert grammar.finished.tolist() == [True, False] and grammar.stopped.all()


def test_none_mode_leaves_scores_and_counts_steps(tokenizer):
    grammar = LLMTimeGrammar(tokenizer, 2, steps=2, mode="none")
    scores = torch.randn(2, VOCAB)
    assert grammar.mask(scores) is scores
    word = char_ids(tokenizer, "a")[0]
    for row0, row1 in [(word, 26), (26, VOCAB - 1), (12, 12), (26, 26)]:
        assert not grammar.finished.any()
        grammar.advance(torch.tensor([row0, row1]))
    assert grammar.finished.tolist() == [True, True]


class SplittingTokenizer:
    """Stands in for a tokenizer that writes ``5`` as two tokens."""

    eos_token_id = 0

    def __len__(self):
        return 100

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1, 2] if text == "5" else [ord(text)]}


@pytest.mark.parametrize(
    "tokenizer_, kwargs, message",
    [
        (SplittingTokenizer(), {}, "splits '5' into"),
        (None, {"mode": "free"}, "mode must be"),
        (None, {"steps": 0}, "steps must be >= 1"),
        (None, {"max_integer_digits": 0}, "max_integer_digits must be >= 1"),
    ],
)
def test_bad_arguments(tokenizer, tokenizer_, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLMTimeGrammar(tokenizer_ or tokenizer, **({"batch_size": 2, "steps": 2} | kwargs))


def accepts(grammar: LLMTimeGrammar, tokenizer, text: str, row: int = 0) -> bool:
    """Whether ``grammar`` lets row ``row`` write ``text`` (every row writes it)."""
    for char in text:
        if char not in allowed_chars(grammar, row):
            return False
        write(grammar, tokenizer, char)
    return True


@pytest.mark.parametrize(
    "text, ok",
    [
        ("12.34,0.00;", True),  # the bound itself
        ("12.35,", False),  # one hundredth above
        ("13", False),  # the second integer digit already passes it
        ("9.99,12.34;", True),
        ("99", False),
        ("123", False),
        ("0.50,11.99;", True),
        ("-12.34,-3.10;", True),  # a magnitude, either sign
        ("-12.4", False),
    ],
)
def test_values_are_bounded_by_a_multiple_of_the_prompts_largest(tokenizer, text, ok):
    grammar = LLMTimeGrammar(tokenizer, 1, steps=1, allow_negative=True, max_values=[12.34])
    assert accepts(grammar, tokenizer, text) == ok


def test_the_bound_is_per_row_and_holds_for_any_walk(tokenizer):
    bounds = [0.07, 3.0, 12.34, 150.5, 999.99]
    grammar = LLMTimeGrammar(tokenizer, len(bounds), steps=40, max_values=bounds)
    generator = torch.Generator().manual_seed(0)
    texts = [""] * len(bounds)
    while not bool(grammar.stopped.all()):  # random allowed tokens: every walk the grammar lets through
        scores = torch.rand(len(bounds), len(grammar.token_ids), generator=generator)
        chosen = grammar.mask(scores).argmax(-1)
        grammar.advance(grammar.token_ids[chosen])
        texts = [t + grammar.chars[c] for t, c in zip(texts, chosen.tolist(), strict=True)]
    for text, bound in zip(texts, bounds, strict=True):
        values = [float(v) for step in text.split(";")[:-1] for v in step.split(",")]
        assert len(values) == 80 and max(values) <= bound and max(values) > bound / 20  # bounded, not squashed
    with pytest.raises(ValueError, match=r"max_values must be 5 \(or 5 x 2\) finite values"):
        LLMTimeGrammar(tokenizer, 5, steps=1, max_values=[1.0, 2.0])


def test_each_variable_has_its_own_bound(tokenizer):
    """A predator whose prompt never passed 2.13 may not ramp to the prey's 3 x 9.95 (a real
    fine-tuned rollout did): one bound per row and variable."""
    bounds = [[29.85, 6.39], [0.5, 40.0]]
    grammar = LLMTimeGrammar(tokenizer, 2, steps=30, max_values=bounds)
    generator = torch.Generator().manual_seed(1)
    texts = ["", ""]
    while not bool(grammar.stopped.all()):
        chosen = grammar.mask(torch.rand(2, len(grammar.token_ids), generator=generator)).argmax(-1)
        grammar.advance(grammar.token_ids[chosen])
        texts = [t + grammar.chars[c] for t, c in zip(texts, chosen.tolist(), strict=True)]
    for text, (first, second) in zip(texts, bounds, strict=True):
        steps = [[float(v) for v in step.split(",")] for step in text.split(";")[:-1]]
        assert len(steps) == 30
        assert max(s[0] for s in steps) <= first and max(s[1] for s in steps) <= second
        assert max(s[1] for s in steps) > second / 20  # bounded, not squashed
    assert accepts(LLMTimeGrammar(tokenizer, 1, steps=1, max_values=[[29.85, 6.39]]), tokenizer, "29.85,6.39;")
    assert not accepts(LLMTimeGrammar(tokenizer, 1, steps=1, max_values=[[29.85, 6.39]]), tokenizer, "6.39,6.40")
