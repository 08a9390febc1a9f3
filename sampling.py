"""Logits to the next token: what one request asks of sampling, penalties, per-row seeds,
logprobs.

`RowSampler` is one sequence's sampling inside a batch: its own processors and its own
`torch.Generator`, so a row's output depends on its seed and its logits only, never on which
other rows share the batch. Pure: unit-testable without a model.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

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

    @property
    def plain(self) -> bool:
        """Greedy with nothing to change the logits and no logprobs: a batched argmax will do."""
        return (self.greedy and self.seen is None and not self.penalize and self.bias is None
                and self.generated >= self.min_new and self.p.logprobs is None)

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
        """Record a token chosen for this row (by `__call__` or a batched argmax)."""
        self.generated += 1
        if self.seen is not None:
            self.seen.add(token)
        if self.penalize:
            self.counts[token] = self.counts.get(token, 0) + 1

    def _process(self, logits: torch.Tensor) -> torch.Tensor:
        scores = logits
        if self.seen:
            ids = torch.tensor(list(self.seen), device=scores.device)
            picked = scores[ids]
            rp = self.p.repetition_penalty
            scores = scores.clone()
            scores[ids] = torch.where(picked < 0, picked * rp, picked / rp)
        if self.penalize and self.counts:
            # logits[t] -= count[t] * frequency + (count[t] > 0) * presence (OpenAI API reference)
            ids = torch.tensor(list(self.counts.keys()), device=scores.device)
            counts = torch.tensor(list(self.counts.values()), device=scores.device,
                                  dtype=scores.dtype)
            scores = scores.clone()
            scores[ids] -= self.p.frequency_penalty * counts + self.p.presence_penalty
        if self.bias is not None:
            ids, values = self.bias
            if ids.device != scores.device or values.dtype != scores.dtype:
                self.bias = ids, values = ids.to(scores.device), values.to(scores.device,
                                                                            scores.dtype)
            scores = scores.clone()
            scores[ids] += values
        if self.generated < self.min_new and self.eos_ids:
            scores = scores.clone()
            scores[[i for i in self.eos_ids if i < len(scores)]] = -math.inf
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
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if p.min_p:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if self.generator is None or self.generator.device != probs.device:
            self.generator = torch.Generator(device=probs.device)
            self.generator.manual_seed(self.seed)
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
