"""The upstream engine: generation by another OpenAI-compatible server, sessions kept here.

With UPSTREAM_URL set (`http://127.0.0.1:8080/v1`: llama.cpp's `llama-server`, vLLM, SGLang,
Ollama, or another instance of this server), each generation is one streaming request
upstream (`stream_options.include_usage`), and every chunk it sends becomes sink calls of the
same shape the local engine makes (text parts per channel, logprob entries, choice and job
endings). So event ids, resume, replay after a restart, cancel, auto-cancel, the three wire
formats, background responses and `previous_response_id` work unchanged above this file.

Sections: the request sent upstream (built from the client's body) -> the client (models,
readiness, errors) -> reading an upstream stream -> the engine (the seam of engine.py:
`has_room()`, `submit(job)`, `stats()`, `start()`, `stop()`).

Cancel closes the upstream connection: vLLM aborts a request whose client disconnects
(`vllm/entrypoints/utils.py`, `with_cancellation`/`listen_for_disconnect`), and llama.cpp's
server stops a task whose streaming client has gone (`tools/server`, `is_connection_closed`
checked between tokens), so the upstream's slot is freed at once.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import EventSource

from engine import GenerationJob, job_finish_reason
from media import media_url
from model import ModelHandle
from schemas import APIError, ChatMessage

log = logging.getLogger("resumable.upstream")


# ---------------------------------------------------------------------------------------------
# The request sent upstream
# ---------------------------------------------------------------------------------------------


# Fields of ours that an upstream must not see (the session key, our stored extras).
OWN_FIELDS = {"session_id", "model", "stream", "stream_options", "background", "store"}


def with_budget(body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """MAX_TOKENS applies in front of an upstream too: a request that names no budget gets it
    (llama.cpp's default is the whole context, which a runaway generation fills)."""
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = default_max_tokens
    return body


def chat_body(raw: dict[str, Any], model: str, default_max_tokens: int) -> dict[str, Any]:
    """A chat completions body as the upstream gets it: the client's fields passed through
    (sampling, tools, response_format, logprobs, image parts), our own fields dropped, the
    upstream's model name, and always streamed with usage."""
    body = {k: v for k, v in raw.items() if k not in OWN_FIELDS and not k.startswith("_")}
    body.update(model=model, stream=True, stream_options={"include_usage": True})
    return with_budget(body, default_max_tokens)


def completion_body(raw: dict[str, Any], model: str, default_max_tokens: int) -> dict[str, Any]:
    """A legacy completions body as the upstream gets it; `echo` is done here (from the
    stored prompt texts), since llama.cpp's server has no echo."""
    body = chat_body(raw, model, default_max_tokens)
    body.pop("echo", None)
    return body


def openai_part(part: dict[str, Any]) -> dict[str, Any]:
    """A content part in chat completions shape (Responses' `input_image` and `input_text`
    become `image_url` and `text`)."""
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text", "")}
    if kind == "input_image":
        return {"type": "image_url", "image_url": {"url": media_url(part)}}
    return part


def openai_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages (as prepare.item_messages makes them from Responses items) in chat shape."""
    out = []
    for m in messages:
        message = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            message["content"] = [openai_part(p) for p in m.content]
        elif m.content is None and m.role == "assistant":
            message["content"] = None
        out.append(message)
    return out


def response_chat_body(raw: dict[str, Any], messages: list[ChatMessage], model: str,
                       default_max_tokens: int) -> dict[str, Any]:
    """A Responses request as a chat completions body (every upstream speaks chat; not every
    one speaks Responses): the conversation as messages (instructions first), flat function
    tools in chat shape, `text.format` as `response_format`, `max_output_tokens` as
    `max_tokens`, `reasoning.effort` as `reasoning_effort` (`none`: enable_thinking=False)."""
    body: dict[str, Any] = {"model": model, "stream": True,
                            "stream_options": {"include_usage": True},
                            "messages": openai_messages(messages)}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "min_tokens",
                 "ignore_eos", "seed", "parallel_tool_calls", "chat_template_kwargs", "user",
                 "metadata"):
        if raw.get(name) is not None:
            body[name] = raw[name]
    if raw.get("max_output_tokens") is not None:
        body["max_tokens"] = raw["max_output_tokens"]
    if raw.get("tools"):
        body["tools"] = [{"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}}
            if t.get("type") == "function" and "function" not in t else t for t in raw["tools"]]
    choice = raw.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        body["tool_choice"] = choice
    fmt = (raw.get("text") or {}).get("format") if isinstance(raw.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    effort = (raw.get("reasoning") or {}).get("effort")
    if effort == "none":
        body["chat_template_kwargs"] = {"enable_thinking": False,
                                        **(body.get("chat_template_kwargs") or {})}
    elif effort:
        body["reasoning_effort"] = effort
    if raw.get("include") and "message.output_text.logprobs" in raw["include"]:
        body["logprobs"] = True
        if raw.get("top_logprobs"):
            body["top_logprobs"] = raw["top_logprobs"]
    return with_budget(body, default_max_tokens)


def continuation(request: dict[str, Any], texts: dict[int, list[tuple[str, str]]],
                 generated: int) -> dict[str, Any] | None:
    """The upstream request that continues a generation cut by a crash: the text delivered so
    far as a final assistant message to continue (vLLM's `continue_final_message`; llama.cpp's
    server continues a trailing assistant message by itself, "assistant prefill"), or, for a
    raw completion, appended to the prompt. `generated` tokens come off the budget. None when
    it cannot be continued this way: several choices, reasoning or tool calls delivered (no
    upstream takes them back as a prefix)."""
    path, body = request["path"], dict(request["body"])
    if len(texts) > 1 or (body.get("n") or 1) > 1:
        return None
    parts = next(iter(texts.values()), [])
    if any(channel != "content" for channel, _ in parts):
        return None
    done = "".join(text for _, text in parts)
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            body[key] = max(1, int(body[key]) - generated)
    if path == "/completions":
        if not isinstance(body.get("prompt"), str):
            return None
        body["prompt"] += done
    elif done:
        body["messages"] = [*body["messages"], {"role": "assistant", "content": done}]
        body.update(continue_final_message=True, add_generation_prompt=False)
    return {"path": path, "body": body}


# ---------------------------------------------------------------------------------------------
# The client: models, readiness, errors
# ---------------------------------------------------------------------------------------------


def upstream_error(status: int, text: str, retry_after: str | None = None) -> APIError:
    """An upstream's refusal in our terms (docs/wire-contract.md, Errors): its 400/422 (a
    field it rejects) and 413 are the client's, with its message, param and code; its 429 is
    ours (Retry-After kept); anything else (401/403: a wrong UPSTREAM_API_KEY; 404: a model
    it does not serve; 5xx) is 503 `upstream_unavailable`, since the client cannot fix it."""
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, str):
        err = {"message": err}
    if not isinstance(err, dict):
        err = {"message": text.strip()[:500] or f"HTTP {status}"}
    message = str(err.get("message") or f"HTTP {status}")
    if status in (400, 422, 413):
        # (llama.cpp's code is the HTTP status as a number; OpenAI's is a string or null)
        code, param = err.get("code"), err.get("param")
        return APIError(413 if status == 413 else 400, f"the upstream refused the request: "
                        f"{message}", param=param if isinstance(param, str) else None,
                        code=code if isinstance(code, str) else None)
    if status == 429:
        return APIError(429, f"the upstream is overloaded: {message}", code="upstream_overloaded",
                        headers={"Retry-After": retry_after or "1"})
    return APIError(503, f"the upstream answered {status}: {message}",
                    code="upstream_unavailable", headers={"Retry-After": "5"})


def unreachable(url: str, e: Exception) -> APIError:
    """503 for an upstream that cannot be reached or stopped answering, with the reason."""
    what = "did not answer in time" if isinstance(e, httpx.TimeoutException) else "is unreachable"
    return APIError(503, f"the upstream at {url} {what} ({type(e).__name__})",
                    code="upstream_unavailable", headers={"Retry-After": "5"})


class Upstream:
    """An OpenAI-compatible server as our engine: `url` is its base URL as the openai SDK
    takes it (`.../v1`). Timeouts in seconds: `connect_timeout` to open a connection,
    `read_timeout` between two reads (a long prompt's prefill is one wait)."""

    def __init__(self, url: str, api_key: str = "", model: str = "",
                 connect_timeout: float = 5.0, read_timeout: float = 300.0):
        self.url, self.model = url.rstrip("/"), model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.checked_at, self.down = 0.0, None  # last readiness check and its finding

    async def _listing(self) -> dict[str, Any]:
        """The upstream's `GET /models` answer. Raises APIError 503 when it is unreachable or
        answers an error."""
        try:
            r = await self.client.get(f"{self.url}/models")
        except httpx.HTTPError as e:
            raise unreachable(self.url, e) from e
        if r.status_code != 200:
            raise upstream_error(r.status_code, r.text)
        try:
            return dict(r.json())
        except (ValueError, TypeError):
            return {}

    async def models(self) -> list[dict[str, Any]]:
        """The upstream's model list (`data` of `GET /models`). Raises APIError 503 when it
        is unreachable, answers an error or lists nothing readable."""
        try:
            return list((await self._listing())["data"])
        except (KeyError, TypeError) as e:
            raise APIError(503, f"the upstream at {self.url} answered /models with no model list",
                           code="upstream_unavailable") from e

    async def connect(self, handle: ModelHandle) -> None:
        """Fill `handle` from the upstream's model list: the model (UPSTREAM_MODEL, else the
        first listed), its context length and input modalities where it tells them (this
        server: `context_length`, `input_modalities`; vLLM: `max_model_len`; llama.cpp:
        `meta.n_ctx`, a slot's context). Raises APIError 503 while it is down or does not list the model."""
        models = await self.models()
        ids = [m.get("id") for m in models]
        if not models or (self.model and self.model not in ids):
            raise APIError(503, f"the upstream at {self.url} does not serve "
                                f"{self.model or 'any model'} (it lists {ids})",
                           code="upstream_unavailable")
        entry = models[ids.index(self.model)] if self.model else models[0]
        if entry.get("state") not in (None, "ready"):  # another resumable still loading
            raise APIError(503, f"the upstream's model {entry['id']} is {entry['state']}",
                           code="upstream_unavailable")
        self.model = entry["id"]
        # llama-server names a model by its file's path, which clients need not see.
        handle.name = handle.name or (os.path.basename(self.model)
                                      if self.model.startswith("/") else self.model)
        meta = entry.get("meta") or {}
        handle.context_length = (entry.get("context_length") or entry.get("max_model_len")
                                 or meta.get("n_ctx") or meta.get("n_ctx_train"))
        modalities = entry.get("input_modalities")  # this server's own field
        if not (isinstance(modalities, list) and modalities):
            # llama.cpp lists Ollama-style `models` with capabilities ("multimodal" with a
            # projector); others tell nothing. Image parts are passed on either way, and the
            # upstream says whether it takes them.
            listed = [m for m in (await self._listing()).get("models") or []
                      if isinstance(m, dict) and self.model in (m.get("model"), m.get("name"))]
            vision = any("multimodal" in (m.get("capabilities") or []) for m in listed)
            modalities = ["text", "image"] if vision else ["text"]
        handle.input_modalities = tuple(modalities)
        handle.state = "ready"

    async def check(self, max_age: float = 1.0) -> None:
        """For /ready: raise APIError 503 if the upstream does not answer /models (checked at
        most once per `max_age` seconds, so probes do not hammer it)."""
        now = time.monotonic()
        if now - self.checked_at > max_age:
            self.checked_at = now
            try:
                await self.models()
                self.down = None
            except APIError as e:
                self.down = e
        if self.down is not None:
            raise self.down

    async def cancel(self, session_id: str) -> None:
        """Best effort: cancel the upstream's session `session_id` (an upstream that is a
        resumable server keeps generating for a client that went away, until its
        CANCEL_AFTER_DISCONNECT_SECONDS)."""
        try:
            await self.client.post(f"{self.url}/cancel/{session_id}", timeout=5.0)
        except httpx.HTTPError as e:
            log.info("could not cancel upstream session %s: %s", session_id, type(e).__name__)

    async def aclose(self) -> None:
        await self.client.aclose()


# ---------------------------------------------------------------------------------------------
# Reading an upstream stream: chunks -> sink calls
# ---------------------------------------------------------------------------------------------


FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
                  "function_call": "tool_calls", "content_filter": "stop", "eos": "stop"}


class UpstreamStreamError(Exception):
    """The upstream sent an error inside its stream (llama.cpp does, after the headers)."""


class UpstreamBroke(UpstreamStreamError):
    """The connection broke, or the stream ended, before the generation did: the upstream
    restarted, crashed or a network path dropped. Retried by continuation."""


def chat_parts(choice: dict[str, Any]) -> list[tuple[str, str]]:
    """A chunk choice's output as (channel, text) parts, the local engine's shape: reasoning
    (`reasoning_content`, or `reasoning` as newer vLLM names it), content, and tool calls as
    `tool_call` (the name opens a call) and `tool_arguments` pieces."""
    if "text" in choice:  # legacy completions
        return [("content", choice["text"])] if choice["text"] else []
    delta, parts = choice.get("delta") or {}, []
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        parts.append(("reasoning", reasoning))
    if isinstance(delta.get("content"), str) and delta["content"]:
        parts.append(("content", delta["content"]))
    for call in delta.get("tool_calls") or []:
        function = call.get("function") or {}
        if function.get("name"):
            parts.append(("tool_call", function["name"]))
        if function.get("arguments"):
            parts.append(("tool_arguments", function["arguments"]))
    return parts


def logprob_entries(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A chunk choice's logprobs as chat-shaped entries ({token, logprob, bytes,
    top_logprobs}), from the chat shape or the legacy one (tokens, token_logprobs,
    top_logprobs as {token: logprob})."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("content"), list):
        # only the API's fields (llama.cpp adds the token `id`)
        return [{"token": e.get("token"), "logprob": e.get("logprob"), "bytes": e.get("bytes"),
                 "top_logprobs": [{"token": t.get("token"), "logprob": t.get("logprob"),
                                   "bytes": t.get("bytes")} for t in e.get("top_logprobs") or []]}
                for e in lp["content"]] or None
    tokens = lp.get("tokens") or []
    values, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    return [{"token": t, "logprob": values[i] if i < len(values) else None, "bytes": None,
             "top_logprobs": [{"token": k, "logprob": v, "bytes": None}
                              for k, v in ((tops[i] or {}) if i < len(tops) else {}).items()]}
            for i, t in enumerate(tokens)] or None


@dataclass
class StreamState:
    """What one upstream stream has produced: tokens per choice (counted from logprob entries
    when there are any, else one per chunk with output: llama.cpp and vLLM send a token per
    chunk), ended choices, and the upstream's own usage once it comes."""

    generated: dict[int, int]
    reasons: dict[int, str]
    # (channel, text) parts delivered per choice, a crashed run's included: what a
    # continuation sends back (`continuation`)
    parts: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    before: int = 0  # tokens delivered before this request (a continuation's usage counts after)
    # The upstream's own session (X-Session-Id), when it is a resumable server too: closing
    # the connection does not stop it there (that is its point), so a cancel is sent.
    session_id: str | None = None
    opens: int = 0  # requests the upstream accepted (HTTP 200) for this job
    # A continuation's prefill: an upstream that does not know continue_final_message
    # (llama.cpp before it learned the field) sends it back first, glued to the first token.
    echo: str = ""

    def completion_tokens(self) -> int:
        if self.usage and self.usage.get("completion_tokens") is not None:
            return self.before + int(self.usage["completion_tokens"])
        return sum(self.generated.values())

    def reasoning_tokens(self) -> int:
        details = (self.usage or {}).get("completion_tokens_details") or {}
        return int(details.get("reasoning_tokens") or 0)


def read_chunk(job: GenerationJob, state: StreamState, chunk: dict[str, Any]) -> None:
    """One upstream chunk into the job's sink."""
    if "error" in chunk:
        err = chunk["error"]
        raise UpstreamStreamError(err.get("message") if isinstance(err, dict) else str(err))
    if chunk.get("usage"):
        state.usage = chunk["usage"]
    for choice in chunk.get("choices") or []:
        index = int(choice.get("index") or 0)
        if index in state.reasons:
            continue
        parts, entries = chat_parts(choice), logprob_entries(choice)
        if state.echo and parts:
            channel, text = parts[0]
            if channel == "content" and text.startswith(state.echo):
                parts[0] = (channel, text[len(state.echo):])
                parts = [p for p in parts if p[1]]
            state.echo = ""
        if parts or entries:
            state.generated[index] = (state.generated.get(index, 0)
                                      + (len(entries) if entries else 1))
            state.parts.setdefault(index, []).extend(parts)
        reason = choice.get("finish_reason")
        if reason:
            state.reasons[index] = FINISH_REASONS.get(reason, "stop")
            job.sink.choice_finished(index, state.reasons[index], parts,
                                     state.generated.get(index, 0), 0, entries, [])
        elif parts or entries:
            job.sink.delta(index, parts, state.generated[index], entries, [],
                           int(job.params.seed or 0))


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class UpstreamEngine:
    """The engine seam (engine.Engine's) over an upstream: every submitted job is one
    streaming request, up to `max_running` at once (the upstream batches them; more wait here
    in FIFO order, and `has_room()` is False once `max_queued` wait). Runs on the event loop;
    `stop()` may be called from another thread.

    A job's `opened` future (set by `submit`) resolves when the upstream has accepted the
    request (HTTP 200), or fails with the APIError to answer the client instead (its 400, or
    503 when it is down), so a refused request never becomes a session.
    """

    decode = "upstream"  # what /health reports

    def __init__(self, upstream: Upstream, loop: asyncio.AbstractEventLoop, max_queued: int,
                 max_running: int, retry_seconds: float = 30.0):
        self.upstream, self.loop = upstream, loop
        self.retry_seconds = retry_seconds
        self.max_queued = max_queued
        self.slots = asyncio.Semaphore(max_running)
        self.waiting: collections.deque[GenerationJob] = collections.deque()
        self.tasks: set[asyncio.Task] = set()
        self.running = 0

    def start(self) -> None:
        """Nothing to start: jobs run as tasks on the loop."""

    def stop(self, timeout: float = 30.0) -> None:
        """Close every upstream stream (callers have ended or suspended the sessions)."""
        for task in list(self.tasks):
            self.loop.call_soon_threadsafe(task.cancel)

    def has_room(self) -> bool:
        return len(self.waiting) < self.max_queued

    def stats(self) -> dict[str, float]:
        return {"running": self.running, "waiting": len(self.waiting), "kv_cache_usage": 0.0,
                "kv_cache_tokens": 0}

    def submit(self, job: GenerationJob) -> None:
        job.opened = self.loop.create_future()
        self.waiting.append(job)
        task = self.loop.create_task(self._run(job), name=f"upstream-{job.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, job: GenerationJob) -> None:
        try:
            async with self.slots:
                self.waiting.remove(job)
                if job.cancel.is_set():
                    return  # cancelled while queued: the runtime ended it
                self.running += 1
                try:
                    await self._generate(job)
                except Exception:  # noqa: BLE001 - a bug must end the session, not hang it
                    log.exception("upstream generation of session %s failed", job.id)
                    job.sink.failed(f"generation failed in session {job.id}; the server log "
                                    f"has the details")
                finally:
                    self.running -= 1
        finally:
            if job in self.waiting:
                self.waiting.remove(job)
            if not job.opened.done():
                job.opened.set_result(None)

    async def _generate(self, job: GenerationJob) -> None:
        """Run the job's request upstream to its end. A stream that breaks before the end
        (the upstream restarted, a network path dropped) is continued where it broke, as a
        crash of this server is (`continuation`), for up to `retry_seconds`; so is a job
        that a crash cut (`job.resume`)."""
        resume = job.resume
        state = StreamState({}, {})
        if resume is not None:
            state.generated = dict(resume.completion_tokens())
            state.parts = {c: list(p) for c, p in resume.parts.items()}
            if resume.done and len(resume.done) >= (job.params.n or 1):
                # every choice had ended; only the job's own ending was lost
                job.sink.finished(job_finish_reason(d[0] for d in resume.done.values()), 0,
                                  state.completion_tokens(),
                                  sum(d[2] for d in resume.done.values()))
                return
        deadline, pause, opens = None, 0.5, 0
        while True:
            request = job.upstream
            if state.generated:  # something was delivered: go on from there
                request = continuation(job.upstream, state.parts,
                                       sum(state.generated.values()))
                if request is None:
                    log.info("session %s cannot be continued upstream (several choices, "
                             "reasoning or tool calls delivered): interrupted", job.id)
                    job.sink.finished("interrupted", 0, state.completion_tokens())
                    return
                if request["body"].get("continue_final_message"):
                    state.echo = request["body"]["messages"][-1]["content"]
            state.before, state.usage = sum(state.generated.values()), None
            try:
                if await self._watch(job, request, state):
                    return
            except (UpstreamBroke, APIError) as e:
                # APIError here: the upstream answered a continuation with a refusal or is
                # down (a first request's refusal went back to the client in _watch)
                message = e.message if isinstance(e, APIError) else f"the upstream failed: {e}"
                if state.opens != opens:  # it had answered again since: a new break
                    deadline, pause, opens = None, 0.5, state.opens
                deadline = deadline or time.monotonic() + self.retry_seconds
                if (time.monotonic() + pause > deadline
                        or (isinstance(e, APIError) and e.status != 503)):
                    job.sink.failed(message)
                    return
                log.info("session %s: %s; continuing it in %.1f s", job.id, message, pause)
                if await self._cancelled_within(job, pause, state):
                    return
                pause = min(pause * 2, 4.0)
            except UpstreamStreamError as e:
                job.sink.failed(f"the upstream failed: {e}")
                return

    async def _cancelled_within(self, job: GenerationJob, seconds: float,
                                state: StreamState) -> bool:
        """Wait `seconds`; True (and the job ended cancelled) if it is cancelled meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if job.cancel.is_set():
                job.sink.finished("cancelled", self._prompt_tokens(state),
                                  state.completion_tokens(), state.reasoning_tokens())
                return True
            await asyncio.sleep(0.05)
        return False

    async def _watch(self, job: GenerationJob, request: dict[str, Any],
                     state: StreamState) -> bool:
        """Stream `request` and watch the job's cancel flag (a threading.Event the runtime
        sets): on cancel the stream task is cancelled, which closes the upstream connection.
        True once the job has ended; raises UpstreamBroke, or APIError from a request the
        client is no longer waiting for, to have it continued."""
        stream = asyncio.ensure_future(self._stream(job, request, state))
        while not stream.done():
            if job.cancel.is_set():
                stream.cancel()
                try:
                    await stream
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - ending anyway
                    pass
                job.sink.finished("cancelled", self._prompt_tokens(state),
                                  state.completion_tokens(), state.reasoning_tokens())
                if state.session_id:
                    await self.upstream.cancel(state.session_id)
                return True
            await asyncio.wait({stream}, timeout=0.05)
        try:
            stream.result()
        except APIError as e:
            if job.opened.done() or job.resume is not None:
                raise  # no request waits for this answer: continue, or fail, the session
            job.opened.set_exception(e)  # answered to the client; no session remains
            return True
        job.sink.finished(job_finish_reason(state.reasons.values()),
                          self._prompt_tokens(state), state.completion_tokens(),
                          state.reasoning_tokens())
        return True

    @staticmethod
    def _prompt_tokens(state: StreamState) -> int:
        return int((state.usage or {}).get("prompt_tokens") or 0)

    async def _stream(self, job: GenerationJob, request: dict[str, Any],
                      state: StreamState) -> None:
        """POST `request` and read its event stream to the end ([DONE] or close). Raises
        APIError for a refusal or an unreachable upstream, UpstreamStreamError for an error
        sent inside the stream, UpstreamBroke for a stream cut before its end."""
        url, answered = self.upstream.url, False
        try:
            async with self.upstream.client.stream("POST", url + request["path"],
                                                   json=request["body"]) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise upstream_error(r.status_code, r.text, r.headers.get("retry-after"))
                answered = True
                state.session_id = r.headers.get("x-session-id")
                state.opens += 1
                if not job.opened.done():
                    job.opened.set_result(None)
                job.sink.started(0)
                done = False
                async for sse in EventSource(r).aiter_sse():
                    if sse.data == "[DONE]":
                        done = True
                        break
                    if not sse.data:
                        continue
                    try:
                        chunk = json.loads(sse.data)
                    except ValueError:
                        raise UpstreamStreamError(f"unreadable chunk {sse.data[:80]!r}") from None
                    read_chunk(job, state, chunk)
                if not done and len(state.reasons) < len(state.generated or {0: 0}):
                    raise UpstreamBroke("it closed the stream before the end")
        except httpx.HTTPError as e:
            if not answered or not state.generated:
                raise unreachable(url, e) from e  # (a 503 for a request still waiting)
            raise UpstreamBroke(f"the stream broke ({type(e).__name__})") from e
