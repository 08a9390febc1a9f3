"""Logits to the next token: what one request asks of sampling, and OpenAI's penalties.

Pure pieces the engine applies inside `generate`; unit-testable without a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

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


# ---------------------------------------------------------------------------------------------
# OpenAI penalties and logit_bias
# ---------------------------------------------------------------------------------------------


class OpenAIPenalties(LogitsProcessor):
    """presence_penalty, frequency_penalty and logit_bias as the OpenAI API reference defines
    them: logits[t] -= count[t] * frequency + (count[t] > 0) * presence, then += bias[t].
    Counts are over generated tokens only (as vLLM does). scores: (batch, vocab) floats."""

    def __init__(self, prompt_len: int, presence: float, frequency: float,
                 logit_bias: dict[int, float]):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency
        self.bias_ids = torch.tensor(list(logit_bias.keys()), dtype=torch.long)
        self.bias_values = torch.tensor(list(logit_bias.values()))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len:]
        if (self.presence or self.frequency) and generated.shape[1]:
            counts = torch.zeros_like(scores).scatter_add_(
                1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        if len(self.bias_ids):
            scores = scores.clone()
            scores[:, self.bias_ids.to(scores.device)] += self.bias_values.to(scores.device, scores.dtype)
        return scores
