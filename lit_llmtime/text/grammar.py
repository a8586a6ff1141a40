"""Constrained decoding for LLMTIME text as a batched DFA, so every forecast has exactly ``steps``
steps that parse: per token one gather says what each sequence may write next, one moves it on.

State encoding: ``state = step * S + local``, ``local`` in 0..S-1 being the place inside one step
(field, then: start / after ``-`` / after a leading ``0`` / k integer digits / j decimals), so the
step count lives in the state. Two terminal states follow: DONE = ``steps * S`` (finished, only eos
from then on) and ENDED = DONE + 1 (eos written early, which only modes ``alphabet`` and ``none``
allow). A token that a state does not allow leaves the state as it is.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

DIGITS = "0123456789"
EOS = "<eos>"  # key for the tokenizer's end-of-text in the one-step tables
_ENDED = -1  # one-step table target for an early eos


class LLMTimeGrammar:
    """Tracks ``batch_size`` sequences that must write ``steps`` LLMTIME steps and then eos."""

    def __init__(
        self,
        tokenizer,
        batch_size: int,
        steps: int,
        decimals: int = 2,
        max_integer_digits: int = 3,
        allow_negative: bool = False,
        n_variables: int = 2,
        mode: Literal["grammar", "alphabet", "none"] = "grammar",
        device: torch.device | str | None = None,
        max_values: torch.Tensor | list[float] | None = None,
    ) -> None:
        if mode not in ("grammar", "alphabet", "none"):
            raise ValueError(f"mode must be 'grammar', 'alphabet' or 'none', got {mode!r}")
        limits = {"batch_size": 1, "steps": 1, "decimals": 0, "max_integer_digits": 1, "n_variables": 1}
        for name, value in zip(limits, (batch_size, steps, decimals, max_integer_digits, n_variables), strict=True):
            if value < limits[name]:
                raise ValueError(f"{name} must be >= {limits[name]}, got {value}")
        self.mode, self.steps = mode, steps
        self.chars = [*DIGITS, ".", ",", ";", *("-" if allow_negative else ""), EOS]
        self.token_ids = torch.tensor(single_token_ids(tokenizer, self.chars), device=device)
        k = len(self.chars)
        # vocab id -> column of token_ids; anything else (also ids past the tokenizer) -> column k, "other"
        self.column = torch.full((max(len(tokenizer), int(self.token_ids.max()) + 1) + 1,), k, device=device)
        self.column[self.token_ids] = torch.arange(k, device=device)
        if mode == "grammar":
            rows = _step_table(decimals, max_integer_digits, allow_negative, n_variables)
        else:
            rows = [{char: 0 for char in self.chars} | {";": 1, EOS: _ENDED}]
        self.step_states = len(rows)
        self.transition, self.allowed_table = self._tile(rows, device)
        self.done, self.ended = len(self.transition) - 2, len(self.transition) - 1
        #: most tokens one step can take in mode "grammar" (so a loop needs at most steps * this + 1)
        self.max_step_tokens = n_variables * (
            allow_negative + max_integer_digits + (decimals + 1 if decimals else 0) + 1
        )
        self.state = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.bound = None
        if mode == "grammar" and max_values is not None:
            self.bound = ValueBound(max_values, decimals, _step_table_places(decimals, max_integer_digits, n_variables),
                                    batch_size, device)  # fmt: skip

    def _tile(self, rows: list[dict[str, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(transition, allowed) over all states from the one-step table ``rows`` (char -> next local state)."""
        size, k = len(rows), len(self.chars)
        next_local = torch.arange(size)[:, None].repeat(1, k + 1)  # a token not allowed: stay
        allowed = torch.zeros(size, k, dtype=torch.bool)
        for state, row in enumerate(rows):
            for char, target in row.items():
                next_local[state, self.chars.index(char)], allowed[state, self.chars.index(char)] = target, True
        done = self.steps * size  # next_local == size is the next step's start, which after the last step is DONE
        offsets = torch.arange(self.steps)[:, None, None] * size
        transition = torch.where(next_local == _ENDED, done + 1, next_local + offsets).reshape(-1, k + 1)
        terminal = torch.tensor([[done], [done + 1]]).repeat(1, k + 1)
        only_eos = torch.zeros(2, k, dtype=torch.bool)
        only_eos[:, -1] = True
        allowed = torch.cat([allowed.repeat(self.steps, 1), only_eos])
        return torch.cat([transition, terminal]).to(device), allowed.to(device)

    def allowed(self) -> torch.BoolTensor:
        """(batch, K): which of ``token_ids`` each sequence may write next."""
        allowed = self.allowed_table[self.state]
        if self.bound is not None:
            allowed[:, : len(DIGITS)] &= self.bound.digits_allowed(self.state % self.step_states)
        return allowed

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (batch, V) over the vocab or (batch, K) over ``token_ids``, -inf where not allowed."""
        if self.mode == "none":
            return scores
        allowed = self.allowed()
        if scores.shape[-1] == len(self.token_ids):
            return scores.masked_fill(~allowed, -math.inf)
        masked = torch.full_like(scores, -math.inf)
        masked[:, self.token_ids] = scores[:, self.token_ids].masked_fill(~allowed, -math.inf)
        return masked

    def advance(self, tokens: torch.LongTensor) -> None:
        """Move each sequence on by the vocab id (batch,) it just wrote."""
        column = self.column[tokens.clamp(0, len(self.column) - 1)]
        if self.bound is not None:
            self.bound.advance(self.state % self.step_states, column, self.chars)
        self.state = self.transition[self.state, column]

    @property
    def finished(self) -> torch.BoolTensor:
        """(batch,): wrote ``steps`` complete steps (from then on only eos is allowed)."""
        return self.state == self.done

    @property
    def steps_written(self) -> torch.LongTensor:
        """(batch,): complete steps each sequence has written."""
        return torch.clamp(self.state // self.step_states, max=self.steps)

    @property
    def stopped(self) -> torch.BoolTensor:
        """(batch,): finished, or wrote eos early (modes alphabet/none): nothing more to generate."""
        return self.state >= self.done


def single_token_ids(tokenizer, chars: list[str]) -> list[int]:
    """Vocab ids of ``chars`` (EOS last), or ValueError if a character is not exactly one token."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id; the grammar needs one to end a forecast")
    ids = []
    for char in chars[:-1]:
        encoded = tokenizer(char, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(
                f"tokenizer splits {char!r} into {encoded}; LLMTIME decoding needs one token per character"
            )
        ids.append(encoded[0])
    return ids + [tokenizer.eos_token_id]


def _step_table(decimals: int, max_integer_digits: int, allow_negative: bool, n_variables: int) -> list[dict]:
    """One step as a list of states, each a dict allowed char -> next state (``len`` = next step's start)."""
    fraction_states = decimals + 1 if decimals else 0  # after ".", then after each decimal
    per_field = 3 + max_integer_digits + fraction_states  # start, after "-", after a leading "0", then the rest
    rows: list[dict] = []
    for field in range(n_variables):
        start = field * per_field
        sign, zero, integer = start + 1, start + 2, start + 3  # integer: after one integer digit
        fraction = integer + max_integer_digits  # after "."
        separator = {"," if field < n_variables - 1 else ";": start + per_field}
        number_end = {".": fraction} if decimals else separator
        first_digit = {"0": zero} | {d: integer for d in DIGITS[1:]}
        rows += [first_digit | ({"-": sign} if allow_negative else {}), first_digit, number_end]
        for k in range(1, max_integer_digits + 1):  # after k integer digits, the first one not 0
            rows.append(({d: integer + k for d in DIGITS} if k < max_integer_digits else {}) | number_end)
        for j in range(fraction_states):  # after "." and j decimals
            rows.append({d: fraction + j + 1 for d in DIGITS} if j < decimals else separator)
    return rows


def _step_table_places(
    decimals: int, max_integer_digits: int, n_variables: int
) -> tuple[list[int], list[int], list[int]]:
    """For each state of one step (``_step_table``'s order): the integer digits its number has so far
    (-1 past them), the decimals it has so far (-1 before the ".") and the variable it writes."""
    fraction_states = decimals + 1 if decimals else 0
    integer = [0, 0, 1, *range(1, max_integer_digits + 1), *[-1] * fraction_states]  # start, "-", "0", k digits
    fraction = [-1] * (3 + max_integer_digits) + list(range(fraction_states))
    field = [variable for variable in range(n_variables) for _ in integer]
    return integer * n_variables, fraction * n_variables, field


class ValueBound:
    """Keeps every number a row writes at most its bound in absolute value (the largest scaled value
    of that variable in its series' prompt times a multiple; one bound per row, or one per row and
    variable), digit by digit: a number with fewer integer digits than the bound is below it; one
    with as many compares its digits with the bound's as they come.

    Per row it tracks, for the number being written, how its integer digits so far compare with the
    bound's first as many (less, equal, greater: they may still end a shorter, smaller number) and,
    in its decimals, whether it still equals the bound so far (then no decimal may exceed the bound's)."""

    LESS, EQUAL, GREATER = 0, 1, 2

    def __init__(
        self, max_values, decimals: int, places: tuple[list[int], list[int], list[int]], rows: int, device
    ) -> None:
        variables = max(places[2]) + 1
        values = torch.as_tensor(max_values, dtype=torch.float64).cpu()
        if values.ndim == 1 and len(values) == rows:  # one bound for all of a row's variables
            values = values[:, None].expand(rows, variables)
        if values.shape != (rows, variables) or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError(
                f"max_values must be {rows} (or {rows} x {variables}) finite values >= 0, got {values.tolist()}"
            )
        scaled = torch.floor(values.flatten() * 10**decimals + 1e-6).long()  # the bound on the written digits' grid
        integer_part, fraction_part = scaled // 10**decimals, scaled % 10**decimals
        texts = [str(int(v)) for v in integer_part]
        width = max(len(text) for text in texts)
        self.integer_digits = torch.tensor([len(text) for text in texts], device=device).reshape(rows, variables)
        self.integer = torch.tensor(
            [[int(c) for c in text.ljust(width, "0")] for text in texts], device=device
        ).reshape(rows, variables, width)
        self.fraction = torch.tensor(
            [[int(c) for c in str(int(v)).zfill(decimals)] if decimals else [] for v in fraction_part], device=device
        ).reshape(rows, variables, decimals)
        self.integer_places, self.fraction_places, self.fields = (torch.tensor(p, device=device) for p in places)
        self.compare = torch.full((rows,), self.EQUAL, device=device)
        self.tight = torch.zeros(rows, dtype=torch.bool, device=device)
        self.rows = torch.arange(rows, device=device)
        self.digit_values = torch.arange(10, device=device)

    def digits_allowed(self, local: torch.Tensor) -> torch.BoolTensor:
        """(rows, 10): the digits each row may write next without passing its bound."""
        written, decimal, field = self.integer_places[local], self.fraction_places[local], self.fields[local]
        allowed = torch.ones(len(local), 10, dtype=torch.bool, device=local.device)
        # an integer digit: free while the number stays shorter than the bound, compared at its length
        integer_digits = self.integer_digits[self.rows, field]
        last = written + 1 == integer_digits
        bound_digit = self.integer[self.rows, field, written.clamp(0, self.integer.shape[2] - 1)]
        at_length = (self.compare == self.LESS)[:, None] | (
            (self.compare == self.EQUAL)[:, None] & (self.digit_values[None] <= bound_digit[:, None])
        )
        integer_ok = torch.where(last[:, None], at_length, (written + 1 < integer_digits)[:, None])
        allowed = torch.where((written >= 0)[:, None], integer_ok, allowed)
        if self.fraction.shape[2]:  # a decimal: at most the bound's while the number equals it so far
            place = decimal.clamp(0, self.fraction.shape[2] - 1)
            under = self.digit_values[None] <= self.fraction[self.rows, field, place][:, None]
            allowed = torch.where(((decimal >= 0) & self.tight)[:, None], under, allowed)
        return allowed

    def advance(self, local: torch.Tensor, column: torch.Tensor, chars: list[str]) -> None:
        """Update the comparison with what each row just wrote (``column`` of ``chars``) from ``local``."""
        written, decimal, field = self.integer_places[local], self.fraction_places[local], self.fields[local]
        digit = column < 10
        value = column.clamp(max=9)
        bound_digit = self.integer[self.rows, field, written.clamp(0, self.integer.shape[2] - 1)]
        compared = torch.where(
            value < bound_digit, self.LESS, torch.where(value == bound_digit, self.EQUAL, self.GREATER)
        )
        integer_digit = digit & (written >= 0) & (self.compare == self.EQUAL)
        self.compare = torch.where(integer_digit, compared, self.compare)
        if self.fraction.shape[2]:
            bound_decimal = self.fraction[self.rows, field, decimal.clamp(0, self.fraction.shape[2] - 1)]
            self.tight &= ~(digit & (decimal >= 0)) | (value == bound_decimal)
        point = column == chars.index(".")
        integer_digits = self.integer_digits[self.rows, field]
        self.tight = torch.where(point, (written == integer_digits) & (self.compare == self.EQUAL), self.tight)
        separator = (column == chars.index(",")) | (column == chars.index(";"))
        self.compare = torch.where(separator, torch.full_like(self.compare, self.EQUAL), self.compare)
        self.tight &= ~separator
