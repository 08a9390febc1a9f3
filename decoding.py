"""Token ids to typed text pieces: pure, unit-tested without a model.

`IncrementalDecoder` (UTF-8-safe deltas), `StopMatcher` (OpenAI `stop`), `ReasoningParser`
(`<think>` blocks), and `TextPipeline`, the three chained for one sequence:
`push(token_id) -> [(channel, text)]` with channel `content` or `reasoning`.
"""

from __future__ import annotations

import logging

log = logging.getLogger("resumable.decoding")


# ---------------------------------------------------------------------------------------------
# Incremental detokenizing
# ---------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turns token ids, one at a time, into text deltas without splitting a UTF-8 character.

    Decodes a short window of recent tokens and holds text back while it ends in U+FFFD (an
    incomplete byte sequence), as vLLM's and TGI's detokenizers do. The concatenation of all
    deltas plus `flush()` equals `tokenizer.decode(all_ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


# ---------------------------------------------------------------------------------------------
# Stop sequences
# ---------------------------------------------------------------------------------------------


class StopMatcher:
    """Applies OpenAI `stop` sequences to streamed text.

    Text that could be the start of a stop sequence is held back until it is known not to be;
    the stop sequence itself is never emitted (OpenAI API reference, `stop`).
    """

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Returns the text safe to emit now; sets `stopped` once a stop sequence appeared."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(hits)]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail, once generation ended without a stop sequence."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out


# ---------------------------------------------------------------------------------------------
# Reasoning blocks
# ---------------------------------------------------------------------------------------------


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_tail: str) -> bool:
    """True when the rendered prompt leaves a `<think>` block open (Qwen3 Thinking templates
    write `<|im_start|>assistant\n<think>\n` themselves), so generation starts in reasoning."""
    return prompt_tail.rfind(THINK_OPEN) > prompt_tail.rfind(THINK_CLOSE)


class ReasoningParser:
    """Splits streamed text into reasoning (inside `<think>…</think>`) and content.

    Tags split across pieces are held back until complete; the tags themselves and the newlines
    right after them are dropped. Without `</think>` everything after the opening is reasoning.
    `feed` returns [(channel, text)] with channel "reasoning" or "content", in order.
    """

    def __init__(self, starts_in_reasoning: bool):
        self.state = "reasoning" if starts_in_reasoning else "start"
        self.held = ""
        self.strip_newlines = starts_in_reasoning

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buf = self.held + text
        self.held = ""
        while buf:
            if self.state == "start":
                # Only a `<think>` at the very start of the output opens a block.
                stripped = buf.lstrip()
                if THINK_OPEN.startswith(stripped) and len(stripped) < len(THINK_OPEN):
                    self.held = buf
                    return out
                if stripped.startswith(THINK_OPEN):
                    self.state, self.strip_newlines = "reasoning", True
                    buf = stripped[len(THINK_OPEN):]
                else:
                    self.state = "content"
                continue
            if self.strip_newlines:
                buf = buf.lstrip("\n")
                if not buf:
                    return out
                self.strip_newlines = False
            if self.state == "content":
                out.append(("content", buf))
                return out
            end = buf.find(THINK_CLOSE)
            if end >= 0:
                if end:
                    out.append(("reasoning", buf[:end]))
                self.state, self.strip_newlines = "content", True
                buf = buf[end + len(THINK_CLOSE):]
                continue
            keep = next((k for k in range(min(len(THINK_CLOSE) - 1, len(buf)), 0, -1)
                         if buf.endswith(THINK_CLOSE[:k])), 0)
            if len(buf) > keep:
                out.append(("reasoning", buf[:len(buf) - keep]))
            self.held = buf[len(buf) - keep:]
            return out
        return out

    def flush(self) -> list[tuple[str, str]]:
        """What is held back once generation ended (an unfinished tag is kept as text)."""
        held, self.held = self.held, ""
        if not held:
            return []
        return [("reasoning" if self.state == "reasoning" else "content", held)]
