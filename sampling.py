"""Logits to the next token: what one request asks of sampling, penalties, per-row seeds,
logprobs.

`RowSampler` is one sequence's sampling inside a batch: its own processors, its own
`torch.Generator` and its own grammar matcher (structured output), so a row's output depends on
its seed and its logits only, never on which other rows share the batch. `Grammar` compiles a
constraint (JSON schema or Lark) with llguidance into token masks. Pure: unit-testable without
a model.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

import llguidance
import llguidance.hf
import torch

log = logging.getLogger("resumable.sampling")


# ---------------------------------------------------------------------------------------------
# Per-request sampling parameters
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """What one generation needs besides its prompt; token counts are in tokens."""

    max_new_tokens: int
    temperature: float
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    stop: list[str] | None = None
    n: int = 1  # choices per prompt
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus top k
    grammar: "Grammar | None" = None  # structured output: every row's tokens must match it


# ---------------------------------------------------------------------------------------------
# Structured output: grammars as token masks (llguidance)
# ---------------------------------------------------------------------------------------------

# JSON as json.dumps writes it (", " and ": "), with no free whitespace: a small model given
# flexible whitespace can spend its whole budget on newlines inside a constrained object.
# `oneOf` is enforced as `anyOf` (Pydantic's discriminated unions, whose branches exclude each
# other by a const tag, would otherwise be refused).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                "coerce_one_of": True}


class GrammarError(ValueError):
    """A constraint llguidance cannot enforce (unsupported JSON-schema keywords, a bad grammar);
    the message names what (e.g. 'Unimplemented keys: ["not"]')."""


_TOKENIZERS: dict[tuple[int, int], llguidance.LLTokenizer] = {}


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face tokenizer, built once per tokenizer (~0.4 s for a
    49k vocabulary). `vocab_size` is the logits' width (the embedding rows, which may exceed
    the tokenizer's length); the grammar's end is any of `eos_ids`."""
    key = (id(tokenizer), vocab_size)
    table = _TOKENIZERS.get(key)
    if table is None:
        eos = sorted(i for i in eos_ids if i < vocab_size) or None
        table = _TOKENIZERS[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                                eos_token=eos)
    return table


class Grammar:
    """A compiled constraint: a Lark grammar (which may embed `%json {...}` schemas) checked
    against the tokenizer once; each row gets its own matcher (`for_row`).

    Raises GrammarError when llguidance reports an error, e.g. JSON-schema keywords it does not
    implement: they would be silently ignored otherwise, and output would not match.
    """

    def __init__(self, lark: str, table: llguidance.LLTokenizer):
        self.lark = lark
        # Compiled once: the matcher reports errors and warnings (ignored keywords) itself.
        self.matcher = llguidance.LLMatcher(table, llguidance.LLMatcher.grammar_from_lark(lark))
        problems = ([self.matcher.get_error()] if self.matcher.is_error()
                    else self.matcher.get_grammar_warnings())
        if problems:
            raise GrammarError("; ".join(problems))

    @staticmethod
    def json_schema(schema: dict[str, Any]) -> str:
        """A Lark rule body matching JSON valid against `schema` (JSON_OPTIONS formatting)."""
        return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})

    def for_row(self) -> llguidance.LLMatcher:
        return self.matcher.deep_copy()


_BITS = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)


def grammar_mask(matcher: llguidance.LLMatcher, vocab_size: int) -> torch.Tensor:
    """The tokens `matcher` allows next, as a bool tensor (vocab_size,) on the CPU.

    Unpacked here rather than with llguidance.torch's helper, which is torch.compile'd: ~17 s
    of C++ compiling on the first request, and no compiler at all on many Windows machines.
    """
    words = (vocab_size + 31) // 32
    bitmask = torch.empty(words, dtype=torch.int32)
    matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    # int32 -> int64 sign-extends, which keeps bit 31 where `& (1 << 31)` finds it.
    return ((bitmask.to(torch.int64).unsqueeze(-1) & _BITS) != 0).flatten()[:vocab_size]


# ---------------------------------------------------------------------------------------------
# One row of a batch: processors, sampling, logprobs
# ---------------------------------------------------------------------------------------------

# OpenAI reports a token the model rules out as -9999.0, never -inf (not JSON).
MIN_LOGPROB = -9999.0


def row_seed(seed: int | None, choice: int) -> int:
    """The generator seed of choice `choice` of a request: `seed` itself for choice 0 (so n=1
    and the first of n agree), `seed + choice` for the others (distinct choices), a random one
    without a seed. Kept in 0..2**63-1."""
    if seed is None:
        return secrets.randbits(63)
    return (seed + choice) % (1 << 63)


def token_seed(seed: int, position: int) -> int:
    """The generator seed for drawing generated token `position` (0-based) of a row seeded
    `seed`: a splitmix64 step, so neighbouring positions and rows get unrelated streams."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # manual_seed takes 0..2**63-1 on every device


class RowSampler:
    """Picks one sequence's next tokens from its logits, with its own generator.

    Order as transformers' `generate`: repetition_penalty (prompt and output tokens), OpenAI
    presence/frequency penalties (output tokens), logit_bias, min_tokens (EOS masked), then
    temperature, top_k, top_p, min_p and a draw from this row's generator; temperature 0 is
    greedy. Logprobs are the model's own distribution (log_softmax of the raw logits, before
    any processor: vLLM's default `raw_logprobs`).

    `decode(id) -> (text, bytes)` renders a token for logprobs (decoding.token_piece). Call `__call__` with logits (vocab,)
    float32 on any device; returns (token_id, logprob entry or None). The entry has the chat
    shape of the OpenAI API reference: {token, logprob, bytes, top_logprobs: [{token, logprob,
    bytes}]}.
    """

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_ids: set[int],
                 seed: int, decode: Callable[[int], tuple[str, list[int]]]):
        self.p, self.eos_ids, self.decode = params, sorted(eos_ids), decode
        self.seed = seed
        self.generator: torch.Generator | None = None
        # Below 1e-5 dividing by the temperature overflows: treat as greedy (as vLLM does).
        self.greedy = params.temperature < 1e-5
        self.seen = set(prompt_ids) if params.repetition_penalty not in (None, 1.0) else None
        self.penalize = bool(params.presence_penalty or params.frequency_penalty)
        self.counts: dict[int, int] = {}  # output token -> times generated
        # logit_bias as (ids, values) tensors, made once, moved to the logits' device once
        self.bias = ((torch.tensor(list(params.logit_bias.keys())),
                      torch.tensor(list(params.logit_bias.values())))
                     if params.logit_bias else None)
        self.generated = 0
        self.min_new = params.max_new_tokens if params.ignore_eos else params.min_tokens
        self.matcher = params.grammar.for_row() if params.grammar is not None else None
        # False while a thinking model reasons: the grammar constrains the answer after it
        # (the engine turns it on at `</think>`, as vLLM's structured output does).
        self.grammar_on = True

    @property
    def plain(self) -> bool:
        """Greedy with nothing to change the logits and no logprobs: a batched argmax will do."""
        return (self.greedy and self.seen is None and not self.penalize and self.bias is None
                and self.generated >= self.min_new and self.p.logprobs is None
                and self.matcher is None)

    def __call__(self, logits: torch.Tensor) -> tuple[int, dict[str, Any] | None]:
        entry = None
        if self.p.logprobs is not None:
            raw = torch.log_softmax(logits, dim=-1)
        scores = self._process(logits)
        if self.greedy:
            token = int(torch.argmax(scores))
        else:
            token = self._draw(scores)
        if self.p.logprobs is not None:
            entry = self._entry(raw, token)
        self.accept(token)
        return token, entry

    def accept(self, token: int) -> None:
        """Record a token chosen for this row (by `__call__` or a batched argmax). Raises
        GrammarError if the row's grammar does not allow it (a bug: the mask forbade it)."""
        if (self.matcher is not None and self.grammar_on
                and not self.matcher.consume_token(token)):
            raise GrammarError(f"token {token} does not match the grammar: "
                               f"{self.matcher.get_error()}")
        self.generated += 1
        if self.seen is not None:
            self.seen.add(token)
        if self.penalize:
            self.counts[token] = self.counts.get(token, 0) + 1

    def _process(self, logits: torch.Tensor) -> torch.Tensor:
        hold_eos = self.generated < self.min_new and bool(self.eos_ids)
        if not (self.seen or (self.penalize and self.counts) or self.bias is not None
                or hold_eos or (self.matcher is not None and self.grammar_on)):
            return logits
        scores = logits.clone()  # one copy per token; the processors below work in place
        if self.seen:
            ids = torch.tensor(list(self.seen), device=scores.device)
            picked = scores[ids]
            rp = self.p.repetition_penalty
            scores[ids] = torch.where(picked < 0, picked * rp, picked / rp)
        if self.penalize and self.counts:
            # logits[t] -= count[t] * frequency + (count[t] > 0) * presence (OpenAI API reference)
            ids = torch.tensor(list(self.counts.keys()), device=scores.device)
            counts = torch.tensor(list(self.counts.values()), device=scores.device,
                                  dtype=scores.dtype)
            scores[ids] -= self.p.frequency_penalty * counts + self.p.presence_penalty
        if self.bias is not None:
            ids, values = self.bias
            if ids.device != scores.device or values.dtype != scores.dtype:
                self.bias = ids, values = ids.to(scores.device), values.to(scores.device,
                                                                            scores.dtype)
            scores[ids] += values
        if hold_eos:
            scores[[i for i in self.eos_ids if i < len(scores)]] = -math.inf
        if self.matcher is not None and self.grammar_on:
            # Last, so nothing after it can lift a token the grammar forbids.
            forbidden = ~grammar_mask(self.matcher, scores.shape[-1]).to(scores.device)
            scores.masked_fill_(forbidden, -math.inf)
            # The grammar wins over min_tokens and logit_bias when they leave nothing it
            # allows. Only they can: checked only then (the check syncs a GPU every token).
            if (hold_eos or self.bias is not None) and not bool(torch.isfinite(scores).any()):
                scores = logits.masked_fill(forbidden, -math.inf)
        return scores

    def _draw(self, scores: torch.Tensor) -> int:
        p = self.p
        scores = scores / p.temperature
        if p.top_k and p.top_k > 0 and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        probs = torch.softmax(scores, dim=-1)
        if p.top_p is not None and p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest set whose mass reaches top_p (the top token always stays)
            drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= p.top_p
            drop[0] = False  # (a top_p that rounds to 0 in the logits' dtype would drop it)
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if p.min_p:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if self.generator is None or self.generator.device != probs.device:
            self.generator = torch.Generator(device=probs.device)
        # Seeded per token from (row seed, token position), not once per row: the draw of
        # token k then depends on nothing but k, so a generation continued after a crash
        # (prompt + k tokens re-prefilled) draws exactly what the first run would have.
        self.generator.manual_seed(token_seed(self.seed, self.generated))
        total = float(probs.sum())
        if not math.isfinite(total) or total <= 0.0:
            # Extreme settings (repetition_penalty 1e-300: scores overflow to inf, softmax
            # to NaN) leave no distribution to draw from; the most likely token is what
            # they tend to, and torch.multinomial would raise instead.
            return int(torch.nan_to_num(scores, nan=-math.inf).argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _entry(self, raw: torch.Tensor, token: int) -> dict[str, Any]:
        def item(t: int, lp: float) -> dict[str, Any]:
            text, raw = self.decode(t)
            return {"token": text, "logprob": max(lp, MIN_LOGPROB), "bytes": raw}
        entry = item(token, float(raw[token]))
        top: list[dict[str, Any]] = []
        if self.p.logprobs:
            values, ids = torch.topk(raw, self.p.logprobs)
            top = [item(int(t), float(v)) for v, t in zip(values.tolist(), ids.tolist())]
        entry["top_logprobs"] = top
        return entry
