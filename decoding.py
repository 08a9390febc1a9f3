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


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte (SmolLM2, Qwen, Llama 3 use it)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()


def token_piece(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """One token for logprobs: (its text, its own bytes).

    The text is `decode([id])` (a token holding part of a UTF-8 character shows U+FFFD); the
    bytes are the token's exact bytes where the vocabulary says them (byte-level BPE, or
    SentencePiece byte-fallback `<0xNN>`), so a client can join a character split across
    tokens (OpenAI API reference, `logprobs.content[].bytes`); else the text's UTF-8.
    """
    text = tokenizer.decode([token_id])
    raw = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(raw, str) and raw:
        if len(raw) == 6 and raw.startswith("<0x") and raw.endswith(">"):
            try:
                return text, [int(raw[3:5], 16)]
            except ValueError:
                pass
        if token_id not in getattr(tokenizer, "all_special_ids", ()) and all(
                c in _BYTE_LEVEL for c in raw):
            return text, [_BYTE_LEVEL[c] for c in raw]
    return text, list(text.encode("utf-8"))


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


# ---------------------------------------------------------------------------------------------
# One sequence's text: decoder -> stop matcher -> reasoning parser
# ---------------------------------------------------------------------------------------------


class TextPipeline:
    """Token ids of one generated sequence to typed text pieces.

    `push(token_id)` -> [(channel, text)], channel "content" or "reasoning"; `flush()` at the
    end. `stopped` turns True once a stop string matched (the engine then ends the sequence);
    `reasoning_tokens` counts tokens that opened, continued or closed the think block.
    `starts_in_reasoning=None` means no reasoning split (everything is content).
    """

    def __init__(self, tokenizer, stop: list[str] | None, starts_in_reasoning: bool | None):
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(stop)
        self.parser = None if starts_in_reasoning is None else ReasoningParser(starts_in_reasoning)
        self.reasoning_tokens = 0

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def push(self, token_id: int) -> list[tuple[str, str]]:
        before = self.parser.state if self.parser is not None else None
        parts = self._split(self.matcher.feed(self.decoder.push(token_id)))
        if self.parser is not None and "reasoning" in (before, self.parser.state):
            self.reasoning_tokens += 1
        return parts

    def flush(self) -> list[tuple[str, str]]:
        return self._split(self.matcher.feed(self.decoder.flush()) + self.matcher.flush(),
                           final=True)

    def _split(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        if self.parser is None:
            return [("content", text)] if text else []
        return self.parser.feed(text) + (self.parser.flush() if final else [])
