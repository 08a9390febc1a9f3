"""Token ids to typed text pieces: pure, unit-tested without a model.

`IncrementalDecoder` (UTF-8-safe deltas), `StopMatcher` (OpenAI `stop`), `ReasoningParser`
(`<think>` blocks), `ToolCallParser` (tool calls in the content, by `ToolFormat`), and
`TextPipeline`, the four chained for one sequence: `push(token_id) -> [(channel, text)]` with
channel `content`, `reasoning`, `tool_call` (a call begins; text is the function name) or
`tool_arguments` (an increment of the current call's arguments JSON).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

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


def partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (but is not all of it): what a
    matcher must hold back until the next piece says whether the tag follows."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1)
                 if text.endswith(tag[:k])), 0)


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
        keep = max(partial_tail(buf, s) for s in self.stops)
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
            keep = partial_tail(buf, THINK_CLOSE)
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
# Tool calls
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes tool calls, named as vLLM names its tool parsers.

    `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one tag per call
    (Hermes 2 Pro, Qwen2.5, Qwen3, Qwen3-VL chat templates). `smollm2`: one tag holding a JSON
    list of calls, `<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>` (the
    format SmolLM2-Instruct was trained on; its template has no tools, so the server writes the
    tool prompt). The parser reads either body shape under either name; `listed` decides the
    shape the server asks for and enforces (grammar).
    """

    name: str
    listed: bool
    open: str = "<tool_call>"
    close: str = "</tool_call>"


TOOL_FORMATS = {"hermes": ToolFormat("hermes", listed=False),
                "smollm2": ToolFormat("smollm2", listed=True)}


class _JsonScan:
    """Finds where one JSON value ends in text fed piece by piece (tracks strings, escapes and
    nesting; a bare number or literal ends before the first delimiter after it)."""

    def __init__(self):
        self.depth, self.in_string, self.escape, self.started = 0, False, False, False

    def feed(self, text: str) -> int | None:
        """The index in `text` just past the value's end, or None if it has not ended."""
        for i, c in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
            elif self.started and self.depth == 0 and (c in ",:}]" or c.isspace()):
                return i  # a bare literal (number, true, null) ends before its delimiter
            elif c == '"':
                self.in_string = self.started = True
            elif c in "{[":
                self.depth += 1
                self.started = True
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
            elif not c.isspace():
                self.started = True
        return None


# The start of a call written name first: from here on its arguments can stream.
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


class ToolCallParser:
    """Splits content into text and tool calls: `feed(text) -> [(channel, text)]`.

    Channels: `content`; `tool_call` (a call begins, text = the function name); and
    `tool_arguments` (the next piece of that call's arguments, exactly the JSON text the model
    wrote, so the pieces join to the arguments string). A call written `{"name": ..,
    "arguments": ..}` streams its arguments as they come; any other key order is read whole
    when its object closes. Text that only looks like a call (the open tag followed by no JSON
    object, a function not in `names`, JSON that does not parse) is given back as content.
    """

    def __init__(self, fmt: ToolFormat, names: set[str], limit: int | None = None):
        self.fmt, self.names, self.limit = fmt, names, limit
        self.ended = False  # `limit` calls were made: the turn is over (OpenAI's
        # parallel_tool_calls=false); what the model writes after them is dropped
        self.state = "text"
        self.buf = ""  # unconsumed text
        self.raw = ""  # text since the open tag, given back as content if no call comes of it
        self.calls_in_tag = 0
        self.listed = False
        self.obj, self.obj_scan, self.args_scan = "", _JsonScan(), None
        self.whole = self.args_done = False
        self.between = False  # just after a call's close tag
        self.calls = 0

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while self.buf and not self.ended and getattr(self, "_" + self.state)(out):
            pass
        return out

    def flush(self) -> list[tuple[str, str]]:
        """At the end of generation: an unfinished tag with no call yet is content."""
        out: list[tuple[str, str]] = []
        if self.ended or (self.between and not self.buf.strip()):
            text = ""
        elif self.state == "text":
            text = self.buf
        elif self.calls_in_tag == 0:
            text = self.raw + self.obj + self.buf
        else:
            text = ""
        self.buf = ""
        if text:
            out.append(("content", text))
        return out

    # --- states: each consumes from self.buf; True when it made progress ---------------------

    def _text(self, out: list[tuple[str, str]]) -> bool:
        if self.between:
            # Whitespace after a call's close tag separates calls (Qwen writes "\n"): dropped
            # before another open tag or the end, kept before other text.
            rest = self.buf.lstrip()
            if not rest or (self.fmt.open.startswith(rest) and rest != self.fmt.open):
                return False  # all whitespace, or maybe the next open tag: wait
            self.between = False
            if rest.startswith(self.fmt.open):
                self.buf = rest
        at = self.buf.find(self.fmt.open)
        if at >= 0:
            if at:
                out.append(("content", self.buf[:at]))
            self.raw, self.buf = self.fmt.open, self.buf[at + len(self.fmt.open):]
            self.state, self.calls_in_tag, self.listed = "body", 0, False
            self.obj = ""
            return True
        keep = partial_tail(self.buf, self.fmt.open)
        if len(self.buf) > keep:
            out.append(("content", self.buf[:len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep:]
        return False

    def _body(self, out: list[tuple[str, str]]) -> bool:
        """After the open tag (or a list's comma): a call object, or `[` opening a list."""
        stripped = self.buf.lstrip()
        if not stripped:
            self.raw, self.buf = self.raw + self.buf, ""
            return False
        self.raw += self.buf[:len(self.buf) - len(stripped)]
        if stripped[0] == "[" and not self.listed and self.calls_in_tag == 0:
            self.listed, self.raw, self.buf = True, self.raw + "[", stripped[1:]
            return True
        if stripped[0] == "]" and self.listed:  # an empty list: "no call needed"
            self.state, self.buf = "after", stripped
            return True
        if stripped[0] != "{":
            return self._give_back(out, stripped)
        self.state, self.buf = "object", stripped
        self.obj, self.obj_scan, self.args_scan = "", _JsonScan(), None
        self.whole = self.args_done = False
        return True

    def _object(self, out: list[tuple[str, str]]) -> bool:
        """Inside one call's object: stream its arguments once the name is known."""
        end = self.obj_scan.feed(self.buf)
        piece, self.buf = (self.buf, "") if end is None else (self.buf[:end], self.buf[end:])
        start = len(self.obj)
        self.obj += piece
        if self.args_scan is None and not self.whole:
            head = _CALL_HEAD.match(self.obj)
            value = self.obj[head.end():].lstrip() if head else ""
            if value:
                try:
                    name = json.loads(head.group(1))
                except ValueError:  # e.g. a raw control character: not a name we offered
                    name = None
                # Arguments written as a JSON string are decoded whole, not streamed raw.
                if name in self.names and value[0] != '"':
                    self._begin_call(out, name)
                    self.args_scan, start = _JsonScan(), len(self.obj) - len(value)
                else:
                    self.whole = True
        if self.args_scan is not None and not self.args_done and start < len(self.obj):
            text = self.obj[start:]
            stop = self.args_scan.feed(text)
            if stop is not None:
                text, self.args_done = text[:stop], True
            if text:
                out.append(("tool_arguments", text))
        if end is None:
            return False
        if self.args_scan is None:  # not streamable: read the whole object
            return self._whole_object(out)
        self._call_done()
        return True

    def _whole_object(self, out: list[tuple[str, str]]) -> bool:
        try:
            call = json.loads(self.obj)
        except ValueError:
            call = None
        if not (isinstance(call, dict) and call.get("name") in self.names):
            return self._give_back(out, self.obj + self.buf, consumed=False)
        arguments = call.get("arguments", call.get("parameters", {}))
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        # Decoded JSON may hold a lone surrogate ("\ud800"), which no UTF-8 writer takes.
        arguments = arguments.encode("utf-8", "replace").decode("utf-8")
        self._begin_call(out, call["name"])
        out.append(("tool_arguments", arguments))
        self._call_done()
        return True

    def _call_done(self) -> None:
        self.state = "after"
        self.ended = self.limit is not None and self.calls >= self.limit

    def _begin_call(self, out: list[tuple[str, str]], name: str) -> None:
        out.append(("tool_call", name))
        self.calls_in_tag += 1
        self.calls += 1

    def _after(self, out: list[tuple[str, str]]) -> bool:
        """After a call's object: `,` or `]` in a list, then the close tag."""
        stripped = self.buf.lstrip()
        if not stripped:
            self.buf = ""
            return False
        if self.listed and stripped[0] == ",":
            self.state, self.buf = "body", stripped[1:]
            return True
        if self.listed and stripped[0] == "]":
            self.listed, self.buf = False, stripped[1:]
            return True
        close = self.fmt.close
        if stripped.startswith(close):
            self.state, self.buf, self.between = "text", stripped[len(close):], True
            return True
        if close.startswith(stripped):
            self.buf = stripped
            return False  # maybe the close tag, split
        # Something else after a call: plain text again.
        self.state, self.buf = "text", stripped
        return True

    def _give_back(self, out: list[tuple[str, str]], rest: str, consumed: bool = True) -> bool:
        """Not a tool call after all: what was held is content; scanning resumes after the
        open tag (another tag may follow)."""
        if self.calls_in_tag:
            self.state, self.buf = "text", rest
            return True
        held = self.raw
        self.state, self.buf = "text", held[len(self.fmt.open):] + rest
        out.append(("content", self.fmt.open))
        return True


# ---------------------------------------------------------------------------------------------
# One sequence's text: decoder -> stop matcher -> reasoning parser -> tool-call parser
# ---------------------------------------------------------------------------------------------


class TextPipeline:
    """Token ids of one generated sequence to typed text pieces.

    `push(token_id)` -> [(channel, text)], channel "content" or "reasoning"; `flush()` at the
    end. `stopped` turns True once a stop string matched (the engine then ends the sequence);
    `reasoning_tokens` counts tokens that opened, continued or closed the think block.
    `starts_in_reasoning=None` means no reasoning split (everything is content); `tools`, a
    parser for the content's tool calls (`tool_call` and `tool_arguments` pieces).
    """

    def __init__(self, tokenizer, stop: list[str] | None, starts_in_reasoning: bool | None,
                 tools: ToolCallParser | None = None):
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(stop)
        self.parser = None if starts_in_reasoning is None else ReasoningParser(starts_in_reasoning)
        self.tools = tools
        self.reasoning_tokens = 0

    @property
    def stopped(self) -> bool:
        """A stop string matched, or the tool-call limit was reached: the sequence ends."""
        return self.matcher.stopped or (self.tools is not None and self.tools.ended)

    @property
    def answering(self) -> bool:
        """Past any reasoning: what follows is the answer (content or tool calls)."""
        return self.parser is None or self.parser.state == "content"

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
            parts = [("content", text)] if text else []
        else:
            parts = self.parser.feed(text) + (self.parser.flush() if final else [])
        if self.tools is None:
            return parts
        out: list[tuple[str, str]] = []
        for channel, piece in parts:
            out += self.tools.feed(piece) if channel == "content" else [(channel, piece)]
        return out + (self.tools.flush() if final else [])
