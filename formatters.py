"""The three wire formats as folds over engine output: chat, legacy completions, Responses.

A formatter turns engine callbacks (start, text pieces, finish, error) into the events of a
session's log, as (SSE data, SSE event name) pairs, and folds stored events back into the
non-streamed API object. `dumps` is the one writer of SSE data. Formatters know no engine.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Any, Protocol

from schemas import error_body, prompt_count
from settings import settings
from store import Session

log = logging.getLogger("resumable.formatters")


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


SYSTEM_FINGERPRINT = "resumable-1"


def usage_object(prompt_tokens: int, completion_tokens: int,
                 reasoning_tokens: int = 0) -> dict[str, Any]:
    """OpenAI `usage`; `completion_tokens_details.reasoning_tokens` counts tokens inside
    `<think>…</think>` (they are part of `completion_tokens`)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


# JSON leaves these raw with ensure_ascii=False, but line-based SSE readers (Python's
# str.splitlines, some proxies) split lines on them and so cut an event in two. Escaped, the
# JSON is the same value. C0 controls are escaped by json itself.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps(obj: Any) -> str:
    """Compact JSON for SSE `data` and stored events: UTF-8 text kept readable, but no character
    that any line-based reader takes for a line break (WHATWG SSE splits only on CR/LF)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)


Out = tuple[str, "str | None"]  # one event: (SSE data, SSE event name or None)


DONE: Out = ("[DONE]", None)


class Formatter(Protocol):
    """The contract the runtime relies on; ChatFormatter, CompletionFormatter and
    ResponsesFormatter satisfy it. A formatter is built from the stored session alone
    (`Formatter(s)`), so a restart rebuilds it; stateful ones then `observe` the stored events.

    Event builders return the events to append, as (SSE data, SSE event name) pairs:
    `created()` when the session is made, `start()` when generation begins, `delta()` per text
    piece of a `channel` ("content" or "reasoning") of choice `index`, with the logprob entries
    of the tokens behind it (chat shape: {token, logprob, bytes, top_logprobs}), and
    `choice_finish()` when one of several choices ends; `finish()` (reason: stop, length,
    cancelled, interrupted; choices still open end with it) or `error()` at the end, each
    ending with `[DONE]`. `result()` folds stored event data into the non-streamed API object;
    `live_result()` gives the same from the formatter's running fold when the log's start is
    gone (memory-only mode).
    """

    kind: str

    def observe(self, data: str) -> None: ...

    def created(self) -> list[Out]: ...

    def start(self) -> list[Out]: ...

    def delta(self, text: str, channel: str = "content", index: int = 0,
              logprobs: list[dict[str, Any]] | None = None) -> list[Out]: ...

    def choice_finish(self, index: int, reason: str) -> list[Out]: ...

    def finish(self, reason: str, usage: dict[str, Any] | None) -> list[Out]: ...

    def error(self, message: str) -> list[Out]: ...

    def result(self, s: Session, datas: list[str]) -> dict[str, Any]: ...

    def live_result(self, s: Session) -> dict[str, Any]: ...


class ChoiceFold:
    """What one choice has said so far: text per channel, tool calls (chat shape), logprob
    entries, finish_reason."""

    def __init__(self):
        self.texts: dict[str, list[str]] = {"content": [], "reasoning": []}
        self.tool_calls: list[dict[str, Any]] = []
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None

    def add_tool_call(self, delta: dict[str, Any]) -> None:
        """Fold one `delta.tool_calls[i]` (the first of a call carries its id and name)."""
        if delta.get("id"):
            self.tool_calls.append({"id": delta["id"], "type": "function",
                                    "function": {"name": delta["function"]["name"],
                                                 "arguments": ""}})
        if self.tool_calls:
            self.tool_calls[-1]["function"]["arguments"] += (
                delta.get("function") or {}).get("arguments") or ""


def call_id(session_id: str, index: int, k: int) -> str:
    """The id of choice `index`'s `k`-th tool call: derived from the session, so a replay or
    a restart's rebuild gives the same id (OpenAI's look like `call_...`)."""
    return f"call_{session_id}_{index}_{k}"


# ---------------------------------------------------------------------------------------------
# Chat completions
# ---------------------------------------------------------------------------------------------


class ChatFormatter:
    """Builds the events of a chat session's log (OpenAI `chat.completion.chunk`).

    Every formatter is a function of the stored session (plus, for stateful ones, the events
    it has seen through `observe`), so the server rebuilds it after a restart.
    With `n` > 1 the choices' chunks interleave, each chunk carrying one choice by `index`;
    each choice ends with its own `finish_reason` chunk.
    Chat terminal events: the `finish_reason` chunks, the usage chunk when
    `stream_options.include_usage` was set, then `[DONE]` (OpenAI API reference, chat streaming).
    Logprobs (`logprobs: true`) ride on each chunk as `{"content": [...], "refusal": null}`.
    """

    kind = "chat.completion"

    def __init__(self, s: Session):
        self.include_usage = bool((s.request.get("stream_options") or {}).get("include_usage"))
        self.session_id = s.id
        self.base = {"id": f"chatcmpl-{s.id}", "object": "chat.completion.chunk",
                     "created": int(s.created), "model": s.model,
                     "system_fingerprint": SYSTEM_FINGERPRINT}
        self.choices = self._choice_count(s.request)
        self.with_logprobs = self._wants_logprobs(s.request)
        # A running fold of what this formatter emitted: the result when the log's start was
        # evicted (memory-only mode). Valid for sessions generated in this process.
        self.folds = [ChoiceFold() for _ in range(self.choices)]

    @staticmethod
    def _choice_count(request: dict[str, Any]) -> int:
        return request.get("n") or 1

    @staticmethod
    def _wants_logprobs(request: dict[str, Any]) -> bool:
        return bool(request.get("logprobs"))

    def observe(self, data: str) -> None:
        """Fold one stored event into the running state (after a restart), so that what this
        formatter appends next continues it: texts, tool calls (their count numbers the next
        call and its id), logprobs, and which choices ended (`finish` ends only the others)."""
        if data == "[DONE]" or data.startswith('{"error"'):
            return
        for choice in json.loads(data).get("choices", []):
            self._fold(self.folds, choice)

    def _fold(self, folds: list[ChoiceFold], choice: dict[str, Any]) -> None:
        """Add one stored chunk's choice to `folds`."""
        if not 0 <= choice.get("index", 0) < len(folds):
            return
        fold = folds[choice.get("index", 0)]
        content, thought = self._texts(choice)
        fold.texts["content"].append(content)
        fold.texts["reasoning"].append(thought)
        for call in (choice.get("delta") or {}).get("tool_calls") or []:
            fold.add_tool_call(call)
        fold.logprobs += self._entries(choice)
        fold.finish_reason = fold.finish_reason or choice.get("finish_reason")

    def _logprobs(self, entries: list[dict[str, Any]] | None, index: int, text: str) -> Any:
        return {"content": entries, "refusal": None} if entries else None

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None, index: int = 0,
               logprobs: list[dict[str, Any]] | None = None) -> Out:
        return self._wrap({"index": index, "delta": delta,
                           "logprobs": self._logprobs(logprobs, index, ""),
                           "finish_reason": finish_reason})

    def _wrap(self, choice: dict[str, Any]) -> Out:
        chunk = {**self.base, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return dumps(chunk), None

    def _final(self, reason: str, index: int) -> Out:
        """The chunk that carries `finish_reason`."""
        return self._chunk({}, reason, index)

    @staticmethod
    def _texts(choice: dict[str, Any]) -> tuple[str, str]:
        """(content, reasoning) text of one stored chunk's choice."""
        return (choice["delta"].get("content") or "",
                choice["delta"].get("reasoning_content") or "")

    @staticmethod
    def _entries(choice: dict[str, Any]) -> list[dict[str, Any]]:
        """The logprob entries (chat shape) of one stored chunk's choice."""
        return ((choice.get("logprobs") or {}).get("content")) or []

    def created(self) -> list[Out]:
        return []

    def start(self) -> list[Out]:
        return [self._chunk({"role": "assistant", "content": ""}, index=i)
                for i in range(self.choices)]

    def delta(self, text: str, channel: str = "content", index: int = 0,
              logprobs: list[dict[str, Any]] | None = None) -> list[Out]:
        """A content chunk; for channel "reasoning" a `reasoning_content` chunk (vLLM's
        field); for "tool_call" the first `delta.tool_calls` chunk of a call (id, name, empty
        arguments) and for "tool_arguments" the next piece of its arguments (OpenAI API
        reference, chat streaming: tool_calls)."""
        fold = self.folds[index]
        fold.logprobs += logprobs or []
        if channel == "tool_call":
            call = {"index": len(fold.tool_calls), "id": call_id(self.session_id, index,
                                                                 len(fold.tool_calls)),
                    "type": "function", "function": {"name": text, "arguments": ""}}
            fold.add_tool_call(call)
            return [self._chunk({"tool_calls": [call]}, None, index, logprobs)]
        if channel == "tool_arguments":
            call = {"index": len(fold.tool_calls) - 1, "function": {"arguments": text}}
            fold.add_tool_call(call)
            return [self._chunk({"tool_calls": [call]}, None, index, logprobs)]
        fold.texts["reasoning" if channel == "reasoning" else "content"].append(text)
        field = "reasoning_content" if channel == "reasoning" else "content"
        return [self._chunk({field: text}, None, index, logprobs)]

    def choice_finish(self, index: int, reason: str) -> list[Out]:
        if self.folds[index].finish_reason is not None:
            return []
        self.folds[index].finish_reason = reason
        return [self._final(reason, index)]

    def finish(self, reason: str, usage: dict[str, Any] | None) -> list[Out]:
        out = [ev for i in range(self.choices) for ev in self.choice_finish(i, reason)]
        if self.include_usage and usage is not None:
            out.append((dumps({**self.base, "choices": [], "usage": usage}), None))
        return out + [DONE]

    def error(self, message: str) -> list[Out]:
        return [(dumps(error_body(500, message)), None), DONE]

    def result(self, s: Session, datas: list[str]) -> dict[str, Any]:
        """The non-streamed `chat.completion` object, folded from the session's events."""
        folds = [ChoiceFold() for _ in range(self.choices)]
        for data in datas:
            if data == "[DONE]" or data.startswith('{"error"'):
                continue
            for choice in json.loads(data).get("choices", []):
                self._fold(folds, choice)
        return self._object(s, folds)

    def live_result(self, s: Session) -> dict[str, Any]:
        """The same object from the running fold, without reading the log."""
        return self._object(s, self.folds)

    def _object(self, s: Session, folds: list[ChoiceFold]) -> dict[str, Any]:
        choices = []
        for i, fold in enumerate(folds):
            content = "".join(fold.texts["content"])
            message = {"role": "assistant",
                       "content": None if fold.tool_calls and not content else content,
                       "refusal": None, "annotations": []}  # as OpenAI's live API sends
            if fold.tool_calls:
                message["tool_calls"] = copy.deepcopy(fold.tool_calls)
            if any(fold.texts["reasoning"]):
                message["reasoning_content"] = "".join(fold.texts["reasoning"])
            logprobs = ({"content": fold.logprobs, "refusal": None} if self.with_logprobs
                        else None)
            choices.append({"index": i, "message": message, "logprobs": logprobs,
                            "finish_reason": fold.finish_reason})
        return {"id": self.base["id"], "object": "chat.completion", "created": self.base["created"],
                "model": self.base["model"], "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices, "usage": s.usage}


# ---------------------------------------------------------------------------------------------
# Legacy completions
# ---------------------------------------------------------------------------------------------


class CompletionFormatter(ChatFormatter):
    """Events of a legacy completions session (OpenAI `text_completion` chunks).

    Choices are `n` per prompt, prompt by prompt (choice index = prompt index * n + j).
    Reasoning, if a thinking model emits any, is kept inline: legacy completions have no field
    for it. `echo` puts the prompt text first (the request stores it as `_echo_texts`).
    Logprobs (`logprobs: k`) use the legacy shape: tokens, token_logprobs, top_logprobs (one
    {token: logprob} per position) and text_offset.
    """

    kind = "text_completion"

    def __init__(self, s: Session):
        super().__init__(s)
        r = s.request
        echo = (r.get("_echo_texts") or [r.get("_echo_text")]) if r.get("echo") else None
        n = r.get("n") or 1
        self.echo_texts = [echo[i // n] if echo and i // n < len(echo) else None
                           for i in range(self.choices)]
        self.offsets = [0] * self.choices  # characters of each choice's text so far
        self.base = {"id": f"cmpl-{s.id}", "object": "text_completion", "created": int(s.created),
                     "model": s.model, "system_fingerprint": SYSTEM_FINGERPRINT}

    @staticmethod
    def _choice_count(request: dict[str, Any]) -> int:
        return (request.get("n") or 1) * prompt_count(request.get("prompt"))

    @staticmethod
    def _wants_logprobs(request: dict[str, Any]) -> bool:
        return request.get("logprobs") is not None

    def _logprobs(self, entries: list[dict[str, Any]] | None, index: int, text: str) -> Any:
        """The legacy logprobs object of the tokens behind `text`; they join the choice's fold
        too. `text_offset` counts characters of the choice's text (echo included); a token
        that completes a character another token began starts inside this piece's text.
        `top_logprobs` has the sampled token besides the top ones, as OpenAI's."""
        start = self.offsets[index]
        self.offsets[index] += len(text)
        if not entries:
            return None
        offsets, pos = [], start
        for e in entries:
            offsets.append(min(pos, start + len(text)))
            pos += len(e["token"])
        legacy = {"tokens": [e["token"] for e in entries],
                  "token_logprobs": [e["logprob"] for e in entries],
                  "top_logprobs": [{**{t["token"]: t["logprob"] for t in e["top_logprobs"]},
                                    e["token"]: e["logprob"]} for e in entries],
                  "text_offset": offsets}
        self.folds[index].logprobs += [
            {"token": e["token"], "logprob": e["logprob"], "top_logprobs": top, "offset": offset}
            for e, top, offset in zip(entries, legacy["top_logprobs"], offsets)]
        return legacy

    def observe(self, data: str) -> None:
        """As chat's, and each choice's character offset (for `text_offset`) too."""
        super().observe(data)
        if data == "[DONE]" or data.startswith('{"error"'):
            return
        for choice in json.loads(data).get("choices", []):
            if 0 <= choice.get("index", 0) < len(self.offsets):
                self.offsets[choice.get("index", 0)] += len(choice.get("text") or "")

    def _text(self, text: str, finish_reason: str | None = None, index: int = 0,
              logprobs: list[dict[str, Any]] | None = None) -> Out:
        return self._wrap({"text": text, "index": index,
                           "logprobs": self._logprobs(logprobs, index, text),
                           "finish_reason": finish_reason})

    def _final(self, reason: str, index: int) -> Out:
        return self._text("", reason, index)

    @staticmethod
    def _texts(choice: dict[str, Any]) -> tuple[str, str]:
        return choice["text"], ""

    @staticmethod
    def _entries(choice: dict[str, Any]) -> list[dict[str, Any]]:
        lp = choice.get("logprobs")
        if not lp:
            return []
        return [{"token": t, "logprob": v, "top_logprobs": top, "offset": o}
                for t, v, top, o in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                        lp["text_offset"])]

    def start(self) -> list[Out]:
        out = []
        for i, echo in enumerate(self.echo_texts):
            if echo:
                self.folds[i].texts["content"].append(echo)
                out.append(self._text(echo, index=i))
        return out

    def delta(self, text: str, channel: str = "content", index: int = 0,
              logprobs: list[dict[str, Any]] | None = None) -> list[Out]:
        self.folds[index].texts["content"].append(text)
        return [self._text(text, None, index, logprobs)]

    def _object(self, s: Session, folds: list[ChoiceFold]) -> dict[str, Any]:
        choices = []
        for i, fold in enumerate(folds):
            lp = None
            if self.with_logprobs:
                lp = {"tokens": [e["token"] for e in fold.logprobs],
                      "token_logprobs": [e["logprob"] for e in fold.logprobs],
                      "top_logprobs": [e["top_logprobs"] for e in fold.logprobs],
                      "text_offset": [e["offset"] for e in fold.logprobs]}
            choices.append({"text": "".join(fold.texts["content"]), "index": i, "logprobs": lp,
                            "finish_reason": fold.finish_reason})
        return {**self.base, "choices": choices, "usage": s.usage}


# ---------------------------------------------------------------------------------------------
# The Responses API
# ---------------------------------------------------------------------------------------------


# finish_reason -> (terminal event, response status, incomplete_details)
RESPONSE_ENDINGS = {
    "stop": ("response.completed", "completed", None),
    "length": ("response.incomplete", "incomplete", {"reason": "max_output_tokens"}),
    "cancelled": ("response.cancelled", "cancelled", None),
    "interrupted": ("response.incomplete", "incomplete", {"reason": "interrupted"}),
    "tool_calls": ("response.completed", "completed", None),
}


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat-style usage to the Responses API's `usage` shape."""
    if usage is None:
        return None
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage.get(
                "completion_tokens_details", {}).get("reasoning_tokens", 0)},
            "total_tokens": usage["total_tokens"]}


def function_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A request's function tool as the Response object lists it (every field present)."""
    return {"type": "function", "name": tool.get("name"),
            "description": tool.get("description"), "parameters": tool.get("parameters"),
            "strict": tool.get("strict")}


def text_format(text: Any) -> dict[str, Any]:
    """The Response object's `text.format`: the request's, else plain text."""
    fmt = text.get("format") if isinstance(text, dict) else None
    return fmt if isinstance(fmt, dict) else {"type": "text"}


class ResponsesFormatter:
    """Events of a Responses API session (OpenAI API reference, Responses streaming events).

    `sequence_number` is the session event index; the SSE `event` field is the event type.
    Its state, the response object with its output items, is a fold over its own events
    (`observe`), so the live path, a restart's replay and `GET /v1/responses/{id}` share one
    code path. Text goes into a `message` item with one `output_text` part; thinking goes into
    a `reasoning` item with one `reasoning_text` part (`response.reasoning_text.delta`).
    The stream ends with `response.completed`, `.incomplete` (max_output_tokens, interrupted),
    `.cancelled` or `.failed`, then `[DONE]` as every session stream does (docs/wire-contract.md).
    """

    kind = "response"

    def __init__(self, s: Session):
        self.s, r = s, s.request
        self.pending, self.counted_from = 0, s.next_index
        self.with_logprobs = "message.output_text.logprobs" in (r.get("include") or [])
        self.response: dict[str, Any] = {
            "id": f"resp_{s.id}", "object": "response", "created_at": int(s.created),
            "status": "queued", "background": bool(r.get("background")), "error": None,
            "incomplete_details": None, "instructions": r.get("instructions"),
            "max_output_tokens": r.get("max_output_tokens"), "model": s.model, "output": [],
            "parallel_tool_calls": r.get("parallel_tool_calls") is not False,
            "previous_response_id": r.get("previous_response_id"),
            "reasoning": {"effort": (r.get("reasoning") or {}).get("effort"), "summary": None},
            "store": r.get("store", True),
            # The values generation used (the spec types them as numbers, never null).
            "temperature": (r["temperature"] if r.get("temperature") is not None
                            else settings.temperature),
            "top_p": r["top_p"] if r.get("top_p") is not None else 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "top_logprobs": r.get("top_logprobs") or 0,
            "text": {"format": text_format(r.get("text")), "verbosity": "medium"},
            "tool_choice": r.get("tool_choice") or ("auto" if r.get("tools") else "none"),
            "tools": [function_tool(t) for t in r.get("tools") or []],
            "max_tool_calls": r.get("max_tool_calls"),
            "truncation": "disabled", "completed_at": None,
            "service_tier": r.get("service_tier") or "default",
            "metadata": r.get("metadata") or {},
            # Null until known / when not given, as OpenAI's live API sends them and the Open
            # Responses schema requires them (OpenAI's OpenAPI document, stricter than its own
            # API, types them as never null).
            "usage": None, "safety_identifier": r.get("safety_identifier"),
            "prompt_cache_key": r.get("prompt_cache_key")}
        if r.get("user") is not None:
            self.response["user"] = r["user"]

    # --- the fold ----------------------------------------------------------------------------

    def observe(self, data: str) -> None:
        """Apply one stored event to the state (used to rebuild after a restart)."""
        if data != "[DONE]":
            self._apply(json.loads(data))

    def _apply(self, ev: dict[str, Any]) -> None:
        event_type, output = ev["type"], self.response["output"]
        if event_type == "response.function_call_arguments.delta":
            output[ev["output_index"]]["arguments"] += ev["delta"]
        elif event_type in ("response.output_text.delta", "response.reasoning_text.delta"):
            part = output[ev["output_index"]]["content"][ev["content_index"]]
            part["text"] += ev["delta"]
            if ev.get("logprobs"):
                part["logprobs"] = part.get("logprobs", []) + ev["logprobs"]
        elif event_type == "response.output_item.added":
            output.append(copy.deepcopy(ev["item"]))
        elif event_type == "response.content_part.added":
            output[ev["output_index"]]["content"].append(dict(ev["part"]))
        elif event_type == "response.output_item.done":
            output[ev["output_index"]] = copy.deepcopy(ev["item"])
        elif "response" in ev:
            self.response = {**ev["response"], "output": output}

    def current(self) -> dict[str, Any]:
        """The response object as of the events seen so far."""
        return {**self.response, "output": copy.deepcopy(self.response["output"])}

    def result(self, s: Session, datas: list[str]) -> dict[str, Any]:
        fold = ResponsesFormatter(s)
        for data in datas:
            fold.observe(data)
        return fold.current()

    def live_result(self, s: Session) -> dict[str, Any]:
        return self.current()

    # --- events ------------------------------------------------------------------------------

    def _ev(self, event_type: str, **fields: Any) -> Out:
        # sequence_number is the index the event gets: the log's next index plus the events
        # made since the log last grew (one sink call may ask for several parts' events
        # before it appends them together).
        if self.s.next_index != self.counted_from:
            self.counted_from, self.pending = self.s.next_index, 0
        payload = {"type": event_type, "sequence_number": self.s.next_index + self.pending,
                   **fields}
        self.pending += 1
        data = dumps(payload)  # serialized before the fold mutates anything it shares
        self._apply(payload)
        return data, event_type

    def _snapshot(self, status: str, **fields: Any) -> dict[str, Any]:
        return {**self.current(), "status": status, **fields}

    def created(self) -> list[Out]:
        self.pending = 0
        return [self._ev("response.created", response=self._snapshot("queued"))]

    def start(self) -> list[Out]:
        self.pending = 0
        return [self._ev("response.in_progress", response=self._snapshot("in_progress"))]

    def _open(self) -> dict[str, Any] | None:
        output = self.response["output"]
        return output[-1] if output and output[-1]["status"] == "in_progress" else None

    def _open_item(self, reasoning: bool) -> list[Out]:
        index = len(self.response["output"])
        if reasoning:
            item = {"id": f"rs_{self.s.id}_{index}", "type": "reasoning", "summary": [],
                    "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": f"msg_{self.s.id}_{index}", "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self._ev("response.output_item.added", output_index=index, item=item),
                self._ev("response.content_part.added", item_id=item["id"], output_index=index,
                         content_index=0, part=part)]

    def _open_call(self, name: str) -> list[Out]:
        output = self.response["output"]
        calls = sum(1 for item in output if item["type"] == "function_call")
        item = {"id": f"fc_{self.s.id}_{len(output)}", "type": "function_call",
                "status": "in_progress", "call_id": call_id(self.s.id, 0, calls), "name": name,
                "arguments": ""}
        return [self._ev("response.output_item.added", output_index=len(output), item=item)]

    def _close_item(self, status: str) -> list[Out]:
        item = self._open()
        if item is None:
            return []
        index = len(self.response["output"]) - 1
        if item["type"] == "function_call":
            return [self._ev("response.function_call_arguments.done", item_id=item["id"],
                             output_index=index, name=item["name"],
                             arguments=item["arguments"]),
                    self._ev("response.output_item.done", output_index=index,
                             item={**copy.deepcopy(item), "status": status})]
        part = item["content"][0]
        reasoning = item["type"] == "reasoning"
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        done = (self._ev("response.reasoning_text.done", **where, text=part["text"]) if reasoning
                else self._ev("response.output_text.done", **where, text=part["text"],
                              logprobs=part.get("logprobs", [])))
        return [done, self._ev("response.content_part.done", **where, part=dict(part)),
                self._ev("response.output_item.done", output_index=index,
                         item={**copy.deepcopy(item), "status": status})]

    def delta(self, text: str, channel: str = "content", index: int = 0,
              logprobs: list[dict[str, Any]] | None = None) -> list[Out]:
        """Text of the one output (`index` is always 0: Responses has no `n`); a tool call
        is a `function_call` item whose arguments stream as
        `response.function_call_arguments.delta` events."""
        reasoning = channel == "reasoning"
        out: list[Out] = []
        item = self._open()
        if channel == "tool_call":
            return self._close_item("completed") + self._open_call(text)
        if channel == "tool_arguments":
            return [self._ev("response.function_call_arguments.delta", item_id=item["id"],
                             output_index=len(self.response["output"]) - 1, delta=text)]
        if item is None or item["type"] != ("reasoning" if reasoning else "message"):
            out += self._close_item("completed") + self._open_item(reasoning)
            item = self._open()
        where = {"item_id": item["id"], "output_index": len(self.response["output"]) - 1,
                 "content_index": 0}
        if reasoning:
            out.append(self._ev("response.reasoning_text.delta", **where, delta=text))
        else:
            out.append(self._ev("response.output_text.delta", **where, delta=text,
                                logprobs=(logprobs or []) if self.with_logprobs else []))
        return out

    def choice_finish(self, index: int, reason: str) -> list[Out]:
        return []  # one output: `finish` ends it

    def finish(self, reason: str, usage: dict[str, Any] | None) -> list[Out]:
        self.pending = 0
        event, status, incomplete = RESPONSE_ENDINGS[reason]
        out = self._close_item("completed" if status == "completed" else "incomplete")
        done = {"completed_at": int(time.time())} if status == "completed" else {}
        out.append(self._ev(event, response=self._snapshot(
            status, usage=response_usage(usage), incomplete_details=incomplete, **done)))
        return out + [DONE]

    def error(self, message: str) -> list[Out]:
        self.pending = 0
        out = self._close_item("incomplete")
        out.append(self._ev("response.failed", response=self._snapshot(
            "failed", error={"code": "server_error", "message": message})))
        return out + [DONE]


FORMATTERS = {f.kind: f for f in (ChatFormatter, CompletionFormatter, ResponsesFormatter)}
