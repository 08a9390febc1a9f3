"""The three wire formats as folds over engine output: chat, legacy completions, Responses.

A formatter turns engine callbacks (start, text pieces, finish, error) into the events of a
session's log, as (SSE data, SSE event name) pairs, and folds stored events back into the
non-streamed API object. `dumps` is the one writer of SSE data. Formatters know no engine.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any, Protocol

from schemas import error_body
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
    piece of a `channel` ("content" or "reasoning"), `finish()` (reason: stop, length,
    cancelled, interrupted) or `error()` at the end, each ending with `[DONE]`.
    `result()` folds stored event data into the non-streamed API object; `live_result()` gives
    the same from the formatter's running fold when the log's start is gone (memory-only mode).
    """

    kind: str

    def observe(self, data: str) -> None: ...

    def created(self) -> list[Out]: ...

    def start(self) -> list[Out]: ...

    def delta(self, text: str, channel: str = "content") -> list[Out]: ...

    def finish(self, reason: str, usage: dict[str, Any] | None) -> list[Out]: ...

    def error(self, message: str) -> list[Out]: ...

    def result(self, s: Session, datas: list[str]) -> dict[str, Any]: ...

    def live_result(self, s: Session) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------
# Chat completions
# ---------------------------------------------------------------------------------------------


class ChatFormatter:
    """Builds the events of a chat session's log (OpenAI `chat.completion.chunk`).

    Every formatter is a function of the stored session (plus, for stateful ones, the events
    it has seen through `observe`), so the server rebuilds it after a restart. Methods return
    the events to append, as (data, event-name) pairs: `created()` when the session is made,
    `start()` when generation begins, `delta()` per text piece, `finish()`/`error()` at the
    end; `result()` folds the stored events into the non-streamed object.
    Chat terminal events: a chunk with `finish_reason`, the usage chunk when
    `stream_options.include_usage` was set, then `[DONE]` (OpenAI API reference, chat streaming).
    """

    kind = "chat.completion"

    def __init__(self, s: Session):
        self.include_usage = bool((s.request.get("stream_options") or {}).get("include_usage"))
        self.base = {"id": f"chatcmpl-{s.id}", "object": "chat.completion.chunk",
                     "created": int(s.created), "model": s.model,
                     "system_fingerprint": SYSTEM_FINGERPRINT}
        # A running fold of what this formatter emitted: the result when the log's start was
        # evicted (memory-only mode). Valid for sessions generated in this process.
        self.texts: dict[str, list[str]] = {"content": [], "reasoning": []}
        self.finish_reason: str | None = None

    def observe(self, data: str) -> None:
        """Stateless: nothing to rebuild from stored events."""

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> Out:
        return self._wrap({"index": 0, "delta": delta, "logprobs": None,
                           "finish_reason": finish_reason})

    def _wrap(self, choice: dict[str, Any]) -> Out:
        chunk = {**self.base, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return dumps(chunk), None

    def _final(self, reason: str) -> Out:
        """The chunk that carries `finish_reason`."""
        return self._chunk({}, reason)

    @staticmethod
    def _texts(choice: dict[str, Any]) -> tuple[str, str]:
        """(content, reasoning) text of one stored chunk's choice."""
        return (choice["delta"].get("content") or "",
                choice["delta"].get("reasoning_content") or "")

    def created(self) -> list[Out]:
        return []

    def start(self) -> list[Out]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, text: str, channel: str = "content") -> list[Out]:
        """A content chunk, or for channel "reasoning" a `reasoning_content` chunk (vLLM's
        field)."""
        self.texts["reasoning" if channel == "reasoning" else "content"].append(text)
        return [self._chunk({"reasoning_content" if channel == "reasoning" else "content": text})]

    def finish(self, reason: str, usage: dict[str, Any] | None) -> list[Out]:
        self.finish_reason = reason
        out = [self._final(reason)]
        if self.include_usage and usage is not None:
            out.append((dumps({**self.base, "choices": [], "usage": usage}), None))
        return out + [DONE]

    def error(self, message: str) -> list[Out]:
        return [(dumps(error_body(500, message)), None), DONE]

    def result(self, s: Session, datas: list[str]) -> dict[str, Any]:
        """The non-streamed `chat.completion` object, folded from the session's events."""
        text, reasoning, finish_reason = [], [], None
        for data in datas:
            if data == "[DONE]" or data.startswith('{"error"'):
                continue
            for choice in json.loads(data).get("choices", []):
                content, thought = self._texts(choice)
                text.append(content)
                reasoning.append(thought)
                finish_reason = choice.get("finish_reason") or finish_reason
        return self._object(s, text, reasoning, finish_reason)

    def live_result(self, s: Session) -> dict[str, Any]:
        """The same object from the running fold, without reading the log."""
        return self._object(s, self.texts["content"], self.texts["reasoning"], self.finish_reason)

    def _object(self, s: Session, text: list[str], reasoning: list[str],
                finish_reason: str | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(text), "refusal": None}
        if any(reasoning):
            message["reasoning_content"] = "".join(reasoning)
        return {"id": self.base["id"], "object": "chat.completion", "created": self.base["created"],
                "model": self.base["model"], "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": finish_reason}],
                "usage": s.usage}


# ---------------------------------------------------------------------------------------------
# Legacy completions
# ---------------------------------------------------------------------------------------------


class CompletionFormatter(ChatFormatter):
    """Events of a legacy completions session (OpenAI `text_completion` chunks).

    Reasoning, if a thinking model emits any, is kept inline: legacy completions have no field
    for it. `echo` puts the prompt text first (the request stores it as `_echo_text`).
    """

    kind = "text_completion"

    def __init__(self, s: Session):
        super().__init__(s)
        self.echo_text = s.request.get("_echo_text") if s.request.get("echo") else None
        self.base = {"id": f"cmpl-{s.id}", "object": "text_completion", "created": int(s.created),
                     "model": s.model, "system_fingerprint": SYSTEM_FINGERPRINT}

    def _text(self, text: str, finish_reason: str | None = None) -> Out:
        return self._wrap({"text": text, "index": 0, "logprobs": None,
                           "finish_reason": finish_reason})

    def _final(self, reason: str) -> Out:
        return self._text("", reason)

    @staticmethod
    def _texts(choice: dict[str, Any]) -> tuple[str, str]:
        return choice["text"], ""

    def start(self) -> list[Out]:
        if not self.echo_text:
            return []
        self.texts["content"].append(self.echo_text)
        return [self._text(self.echo_text)]

    def delta(self, text: str, channel: str = "content") -> list[Out]:
        self.texts["content"].append(text)
        return [self._text(text)]

    def _object(self, s: Session, text: list[str], reasoning: list[str],
                finish_reason: str | None) -> dict[str, Any]:
        return {**self.base, "choices": [{"text": "".join(text), "index": 0, "logprobs": None,
                                          "finish_reason": finish_reason}], "usage": s.usage}


# ---------------------------------------------------------------------------------------------
# The Responses API
# ---------------------------------------------------------------------------------------------


# finish_reason -> (terminal event, response status, incomplete_details)
RESPONSE_ENDINGS = {
    "stop": ("response.completed", "completed", None),
    "length": ("response.incomplete", "incomplete", {"reason": "max_output_tokens"}),
    "cancelled": ("response.cancelled", "cancelled", None),
    "interrupted": ("response.incomplete", "incomplete", {"reason": "interrupted"}),
}


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat-style usage to the Responses API's `usage` shape."""
    if usage is None:
        return None
    return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage.get(
                "completion_tokens_details", {}).get("reasoning_tokens", 0)},
            "total_tokens": usage["total_tokens"]}


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
        self.pending = 0
        self.response: dict[str, Any] = {
            "id": f"resp_{s.id}", "object": "response", "created_at": int(s.created),
            "status": "queued", "background": bool(r.get("background")), "error": None,
            "incomplete_details": None, "instructions": r.get("instructions"),
            "max_output_tokens": r.get("max_output_tokens"), "model": s.model, "output": [],
            "parallel_tool_calls": False, "previous_response_id": r.get("previous_response_id"),
            "reasoning": {"effort": (r.get("reasoning") or {}).get("effort"), "summary": None},
            "store": r.get("store", True), "temperature": r.get("temperature"),
            "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [],
            "top_p": r.get("top_p"), "truncation": "disabled", "usage": None,
            "user": r.get("user"), "metadata": r.get("metadata") or {}}

    # --- the fold ----------------------------------------------------------------------------

    def observe(self, data: str) -> None:
        """Apply one stored event to the state (used to rebuild after a restart)."""
        if data != "[DONE]":
            self._apply(json.loads(data))

    def _apply(self, ev: dict[str, Any]) -> None:
        event_type, output = ev["type"], self.response["output"]
        if event_type in ("response.output_text.delta", "response.reasoning_text.delta"):
            output[ev["output_index"]]["content"][ev["content_index"]]["text"] += ev["delta"]
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

    def _close_item(self, status: str) -> list[Out]:
        item = self._open()
        if item is None:
            return []
        index, part = len(self.response["output"]) - 1, item["content"][0]
        reasoning = item["type"] == "reasoning"
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        done = (self._ev("response.reasoning_text.done", **where, text=part["text"]) if reasoning
                else self._ev("response.output_text.done", **where, text=part["text"], logprobs=[]))
        return [done, self._ev("response.content_part.done", **where, part=dict(part)),
                self._ev("response.output_item.done", output_index=index,
                         item={**copy.deepcopy(item), "status": status})]

    def delta(self, text: str, channel: str = "content") -> list[Out]:
        self.pending = 0
        reasoning = channel == "reasoning"
        out: list[Out] = []
        item = self._open()
        if item is None or (item["type"] == "reasoning") != reasoning:
            out += self._close_item("completed") + self._open_item(reasoning)
            item = self._open()
        where = {"item_id": item["id"], "output_index": len(self.response["output"]) - 1,
                 "content_index": 0}
        if reasoning:
            out.append(self._ev("response.reasoning_text.delta", **where, delta=text))
        else:
            out.append(self._ev("response.output_text.delta", **where, delta=text, logprobs=[]))
        return out

    def finish(self, reason: str, usage: dict[str, Any] | None) -> list[Out]:
        self.pending = 0
        event, status, incomplete = RESPONSE_ENDINGS[reason]
        out = self._close_item("completed" if status == "completed" else "incomplete")
        out.append(self._ev(event, response=self._snapshot(
            status, usage=response_usage(usage), incomplete_details=incomplete)))
        return out + [DONE]

    def error(self, message: str) -> list[Out]:
        self.pending = 0
        out = self._close_item("incomplete")
        out.append(self._ev("response.failed", response=self._snapshot(
            "failed", error={"code": "server_error", "message": message})))
        return out + [DONE]


FORMATTERS = {f.kind: f for f in (ChatFormatter, CompletionFormatter, ResponsesFormatter)}
