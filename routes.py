"""HTTP handlers: the OpenAI routes, the session routes, and the flow they share
(`run_session`: resume, idempotency, create, queue, answer), with SSE out (`sse_response`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder
from sse_starlette import EventSourceResponse, ServerSentEvent

import shutdown
from formatters import ChatFormatter, CompletionFormatter, ResponsesFormatter
from model import ModelHandle, require_ready, wait_ready
from prepare import (Prepared, body_digest, check_unicode, prepare_chat, prepare_completion,
                     prepare_response, refuse_unsupported, refuse_unsupported_completion,
                     refuse_unsupported_response)
from runtime import Runtime
from schemas import (SESSION_ID_PATTERN, APIError, ChatCompletionRequest, CompletionRequest,
                     ResponsesRequest, unsupported)
from security import request_owner
from settings import settings
from store import EventsGone, Session, StoreUnavailable
from telemetry import RESUMES

log = logging.getLogger("resumable.routes")


# ---------------------------------------------------------------------------------------------
# Ids, ownership, lookups
# ---------------------------------------------------------------------------------------------


LAST_EVENT_ID_RE = re.compile(r"^([A-Za-z0-9_-]{1,128}):(0|[1-9][0-9]{0,17})$")


SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)


def parse_last_event_id(value: str | None) -> tuple[str, int] | None:
    """`s:i` to (s, i); None when absent; 400 when malformed (docs/wire-contract.md, Resume)."""
    if value is None or value == "":
        return None
    m = LAST_EVENT_ID_RE.match(value.strip())
    if not m:
        raise APIError(400, f"malformed Last-Event-ID {value!r}: expected '<session_id>:<index>'",
                       param="Last-Event-ID", code="invalid_last_event_id")
    return m.group(1), int(m.group(2))


def new_session_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits, [A-Za-z0-9_-]


def resume_point(session_id: str, resume_id: str | None) -> int:
    """The index to replay after, from Last-Event-ID (see `last_event_id`); -1 for the start."""
    parsed = parse_last_event_id(resume_id)
    if parsed is None:
        return -1
    if parsed[0] != session_id:
        raise APIError(400, f"Last-Event-ID {parsed[0]}:{parsed[1]} belongs to another session "
                            f"than {session_id}", param="Last-Event-ID", code="session_mismatch")
    return parsed[1]


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


def owns(request: Request, s: Session) -> bool:
    """Whether this request's API key made `s` (always, without API keys)."""
    return not settings.api_keys or s.request.get("_owner") == request_owner(request)


async def lookup(rt: Runtime, session_id: str, request: Request) -> Session:
    """The session `session_id`; 404 if unknown, expired, or another API key's."""
    s = await rt.session(session_id) if SESSION_ID_RE.match(session_id) else None
    if s is None or not owns(request, s):
        raise APIError(404, f"session {session_id!r} not found (unknown, deleted or expired)",
                       param="session_id", code="session_not_found")
    return s


async def response_session(rt: Runtime, response_id: str, request: Request) -> Session:
    """The session behind `resp_<session id>`; 404 if unknown, not a response, or another
    API key's."""
    sid = response_id[5:] if response_id.startswith("resp_") else response_id
    s = await rt.session(sid) if SESSION_ID_RE.match(sid) else None
    if s is None or s.kind != ResponsesFormatter.kind or not owns(request, s):
        raise APIError(404, f"response {response_id!r} not found (unknown, deleted or expired)",
                       param="response_id", code="response_not_found")
    return s


# ---------------------------------------------------------------------------------------------
# Answers: SSE, finished objects
# ---------------------------------------------------------------------------------------------


class KeepAlive(ServerSentEvent):
    """A keep-alive comment on a line of its own, with no blank line after it.

    The WHATWG SSE spec dispatches nothing for a block without data, but the openai SDK
    dispatches an event (with empty data, which it then fails to parse as JSON) at every blank
    line once any `id:` has been seen. A comment needs only its line terminator, so `: ping\n`
    keeps proxies from timing out and dispatches nothing in any client.
    """

    def encode(self) -> bytes:
        return b": ping\n"


def sse_response(rt: Runtime, s: Session, after: int,
                 status_code: int = 200) -> EventSourceResponse | Response:
    """The session's events after `after` as SSE, `id: <session>:<index>` on every event.

    Raises EventsGone (410) before anything is sent if those events cannot all be served.
    On an ended session, resuming from its last event is 204 (nothing follows; an
    EventSource stops reconnecting on any status but 200) and from past it 400.
    """
    last = s.next_index - 1
    if s.terminal and after >= last:
        if after > last:
            raise APIError(400, f"Last-Event-ID {s.id}:{after} is past the end of the session: "
                                f"its last event is {s.id}:{last}", param="Last-Event-ID",
                           code="last_event_id_out_of_range")
        return Response(status_code=204, headers={"X-Session-Id": s.id})
    if rt.store.stopping:
        raise shutdown.refusal()
    rt.store.check_available(s, after)
    if after >= 0:
        RESUMES.inc()

    async def events() -> AsyncIterator[ServerSentEvent]:
        rt.attach(s)
        last = after
        try:
            async for ev in rt.store.events(s, after):
                # sse-starlette frames each event with the event's own `sep`, not the
                # response's: both must be "\n" for one line ending per stream.
                yield ServerSentEvent(data=ev.data, id=f"{s.id}:{ev.index}", event=ev.event,
                                      sep="\n")
                last = ev.index
            if rt.store.stopping and not s.terminal and not s.deleted:
                # Cut by a shutdown: an error every client notices, outside the log and
                # without an id (Last-Event-ID stays at `last`); see shutdown.py.
                event, data = shutdown.stream_notice(s.kind, s.id, last)
                yield ServerSentEvent(data=data, event=event, sep="\n")
        except EventsGone as e:
            # Fell behind the ring mid-replay: close; the reconnect is answered 410.
            log.warning("%s", e)
        finally:
            rt.detach(s)

    return EventSourceResponse(events(), status_code=status_code, ping=settings.sse_ping_seconds,
                               ping_message_factory=KeepAlive, sep="\n",
                               headers={"X-Session-Id": s.id})


async def completed_response(rt: Runtime, s: Session, request: Request) -> JSONResponse:
    """Wait for the session to end (the client counts as attached meanwhile) and answer the
    non-streamed object. A client that goes away is detached like a dropped stream."""
    rt.attach(s)
    try:
        while not (s.terminal and s.visible >= s.next_index) and not s.deleted:
            try:
                await asyncio.wait_for(rt.store.wait_terminal(s), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected")
            if rt.store.stopping and not s.terminal:
                raise APIError(503, f"the server is shutting down; this generation continues "
                                    f"when it restarts: send the same request with session_id "
                                    f"{s.id} again for its answer", type="server_error",
                               code=shutdown.SHUTTING_DOWN,
                               headers={"Retry-After": "5", "X-Session-Id": s.id})
    finally:
        rt.detach(s)
    if s.deleted:
        raise APIError(404, f"session {s.id} was deleted", param="session_id")
    if s.state == "failed" and s.kind != ResponsesFormatter.kind:
        try:
            datas = [ev.data for ev in await rt.store.read(s)]
        except EventsGone:
            datas = []
        message = next((json.loads(d)["error"]["message"] for d in datas if d.startswith('{"error"')),
                       "generation failed")
        raise APIError(500, message, type="server_error", code="generation_failed")
    return JSONResponse(await current_object(rt, s), headers={"X-Session-Id": s.id})


def session_object(s: Session) -> dict[str, Any]:
    """The `GET /v1/sessions/{id}` body."""
    return {"id": s.id, "object": "session", "kind": s.kind, "state": s.state, "model": s.model,
            "created": int(s.created), "last_event_index": s.last_event_index,
            "finish_reason": s.finish_reason, "usage": s.usage,
            "ended_at": int(s.ended_at) if s.ended_at else None}


async def current_object(rt: Runtime, s: Session) -> dict[str, Any]:
    """The session's API object as of now (partial output while it runs). Folded from the log;
    from the formatter's running fold when the log's start is gone (memory-only mode)."""
    try:
        return rt.formatter(s).result(s, [ev.data for ev in await rt.store.read(s)])
    except EventsGone:
        return rt.formatter(s).live_result(s)


async def respond(rt: Runtime, s: Session, stream: bool, after: int, request: Request):
    if stream:
        return sse_response(rt, s, after)
    if s.kind == ResponsesFormatter.kind and s.request.get("background"):
        return JSONResponse(await current_object(rt, s), headers={"X-Session-Id": s.id})
    return await completed_response(rt, s, request)


# ---------------------------------------------------------------------------------------------
# The shared flow
# ---------------------------------------------------------------------------------------------


# How long a new session may wait for its first commit before the request is answered 503.
STORAGE_CHECK_SECONDS = 10.0


def storage_reason(rt: Runtime, reason: str) -> str:
    """A storage failure as told to clients: the reason without the database's full path."""
    path = rt.store.db_path or ""
    return reason.replace(os.path.abspath(path), os.path.basename(path)).replace(
        path, os.path.basename(path)) if path else reason


def require_storage(rt: Runtime) -> None:
    """503 with Retry-After while session writes fail (disk full, database gone)."""
    if rt.store.write_error:
        raise APIError(503, f"session storage is failing: "
                            f"{storage_reason(rt, rt.store.write_error)}",
                       code="storage_unavailable", headers={"Retry-After": "5"})


async def run_session(request: Request, body, kind: str, prepare,
                      resume_id: str | None) -> Any:
    """The flow every generation route shares (docs/wire-contract.md, Sessions and Resume).

    Resolves the session id (body `session_id`, or the session named by Last-Event-ID),
    attaches to an existing session with the same body (409 for another body), otherwise
    calls `prepare(raw_body) -> Prepared` (in which the route validates and tokenizes),
    creates the session, queues its job (429 when full) and answers: SSE when `stream`, the
    response object at once for a background response, else the finished object.
    """
    rt, handle = runtime_of(request), request.app.state.model
    if settings.require_model and not body.model:
        # As OpenAI answers (the name itself is informational: one model is served).
        raise APIError(400, "Missing required parameter: 'model'.", param="model",
                       code="missing_required_parameter")
    resume = parse_last_event_id(resume_id)
    session_id = body.session_id
    if resume is not None:
        if session_id is not None and session_id != resume[0]:
            raise APIError(400, f"Last-Event-ID names session {resume[0]} but the body names "
                                f"{session_id}", param="Last-Event-ID", code="session_mismatch")
        session_id = resume[0]
    if body.model_extra:
        log.info("ignoring unknown request fields: %s", sorted(body.model_extra))
    raw = body.model_dump(exclude_unset=True, exclude={"session_id"})
    check_unicode(raw)
    digest = body_digest(raw)
    after = resume[1] if resume else -1

    existing = await rt.session(session_id) if session_id else None
    if resume is not None and (existing is None or not owns(request, existing)):
        raise APIError(404, f"session {session_id!r} not found (unknown, deleted or expired)",
                       param="Last-Event-ID", code="session_not_found")
    if existing is None:
        stopping = getattr(request.app.state, "shutdown", None)
        if stopping is not None and stopping.draining:
            raise shutdown.refusal()
        await wait_ready(handle, settings.model_load_wait_seconds,
                         lambda: stopping is not None and stopping.draining)
        if stopping is not None and stopping.draining:
            raise shutdown.refusal()
        require_storage(rt)
        prepared: Prepared = await prepare(raw)
        existing = await rt.session(session_id) if session_id else None  # raced meanwhile?
    if existing is not None:
        # Another key's session with this id answers like a different body: the id is taken.
        if existing.body_digest != digest or existing.kind != kind or not owns(request, existing):
            # One message for both causes: it must not tell whether another key owns the id.
            raise APIError(409, f"session id {session_id} is already in use (by a request with "
                                f"another body, or another API key); use a new session_id",
                           param="session_id", code="session_conflict")
        return await respond(rt, existing, body.stream, after, request)
    if not rt.engine.has_room():
        raise APIError(429, f"too many queued requests (MAX_QUEUED_REQUESTS="
                            f"{settings.max_queued_requests}); retry shortly",
                       code="queue_full", headers={"Retry-After": "1"})
    stored = prepared.stored
    if settings.api_keys:
        stored = {**stored, "_owner": request_owner(request)}
    s = rt.create(session_id or new_session_id(), kind, handle.name, digest, stored,
                  prepared.unredacted)
    try:
        # Nothing runs for a session the log cannot hold: a full or broken disk answers 503
        # at once instead of a stream that never shows its first event.
        await rt.store.check_writable(STORAGE_CHECK_SECONDS)
    except StoreUnavailable as e:
        await rt.discard(s)  # queued after its writes: gone once the disk recovers
        raise APIError(503, f"session storage is failing, so no generation can start: "
                            f"{storage_reason(rt, str(e))}",
                       code="storage_unavailable", headers={"Retry-After": "5"}) from e
    job = rt.start(s, prepared)
    if job.opened is not None:
        # In front of an upstream: its refusal (a field it rejects: 400; it is down: 503) is
        # this request's answer, and the session it would have been is dropped.
        try:
            await asyncio.shield(job.opened)
        except APIError:
            await rt.discard(s)
            raise
    return await respond(rt, s, body.stream, -1, request)


# ---------------------------------------------------------------------------------------------
# OpenAI routes
# ---------------------------------------------------------------------------------------------


async def list_models(request: Request):
    """The served model (in front of an upstream: the upstream's, once it has answered)."""
    handle: ModelHandle = request.app.state.model
    data = [model_object(handle, request.app.state.started)] if handle.name else []
    return {"object": "list", "data": data}


def model_object(handle: ModelHandle, created: float) -> dict[str, Any]:
    return {"id": handle.name, "object": "model", "created": int(created),
            "owned_by": "upstream" if handle.upstream is not None else "resumable",
            "input_modalities": list(handle.input_modalities),
            "supported_apis": ["chat_completions", "completions", "responses"],
            "context_length": handle.context_length, "state": handle.state}


async def retrieve_model(model: str, request: Request):
    handle: ModelHandle = request.app.state.model
    if model != handle.name:
        raise APIError(404, f"model {model!r} not found; this server serves {handle.name!r}",
                       param="model", code="model_not_found")
    return model_object(handle, request.app.state.started)


def last_event_id(header: str | None = Header(None, alias="Last-Event-ID"),
                  query: str | None = Query(None, alias="last_event_id")) -> str | None:
    """The resume point a request names: the `Last-Event-ID` header, else `?last_event_id=`
    (for clients that cannot set headers). One dependency for every route that resumes."""
    return header or query


async def chat_completions(body: ChatCompletionRequest, request: Request,
                           resume_id: str | None = Depends(last_event_id)):
    """`POST /v1/chat/completions` (OpenAI API reference, Chat Completions) in a session.

    Same `session_id` and same body attaches to the existing session; a different body is 409.
    `Last-Event-ID` (header or `?last_event_id=`) resumes after that event.
    """
    handle: ModelHandle = request.app.state.model
    refuse_unsupported(body, upstream=handle.upstream is not None)
    return await run_session(request, body, ChatFormatter.kind,
                             lambda raw: prepare_chat(body, handle, raw), resume_id)


async def completions(body: CompletionRequest, request: Request,
                      resume_id: str | None = Depends(last_event_id)):
    """`POST /v1/completions` (OpenAI API reference, legacy Completions) in a session: the raw
    prompt, no chat template. Resume and cancel as for chat."""
    refuse_unsupported_completion(body)
    if body.suffix:
        raise unsupported("suffix", "'suffix' is not supported: the served model cannot fill "
                                    "in the middle")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       param="stream_options")
    handle: ModelHandle = request.app.state.model
    return await run_session(request, body, CompletionFormatter.kind,
                             lambda raw: prepare_completion(body, handle, raw), resume_id)


async def previous_conversation(rt: Runtime, response_id: str,
                                request: Request) -> list[dict[str, Any]]:
    """The stored input and output of a previous response, as message items."""
    try:
        prev = await response_session(rt, response_id, request)
    except APIError as e:
        raise APIError(404, f"previous_response_id {response_id!r} not found (unknown, deleted or "
                            f"expired)", param="previous_response_id",
                       code="previous_response_not_found") from e
    if prev.request.get("store") is False:
        raise APIError(400, f"previous response {response_id} was created with store=false and "
                            f"cannot be continued", param="previous_response_id")
    if not prev.terminal:
        raise APIError(400, f"previous response {response_id} is still {prev.state}; wait for it "
                            f"to finish", param="previous_response_id")
    output = (await current_object(rt, prev))["output"]
    answers = []
    for item in output:
        if item["type"] == "message":
            answers.append({"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": part["text"]} for part in item["content"]]})
        elif item["type"] == "function_call":
            answers.append({"type": "function_call", "call_id": item["call_id"],
                            "name": item["name"], "arguments": item["arguments"]})
    return prev.request.get("_conversation", []) + answers


async def create_response(body: ResponsesRequest, request: Request,
                          resume_id: str | None = Depends(last_event_id)):
    """`POST /v1/responses` (OpenAI API reference, Responses) in a session: stream, non-stream
    or `background`; `previous_response_id` continues a stored conversation."""
    refuse_unsupported_response(body)
    rt, handle = runtime_of(request), request.app.state.model

    async def prepare(raw: dict[str, Any]) -> Prepared:
        history = (await previous_conversation(rt, body.previous_response_id, request)
                   if body.previous_response_id else [])
        return await prepare_response(body, handle, raw, history)

    return await run_session(request, body, ResponsesFormatter.kind, prepare, resume_id)


async def retrieve_response(response_id: str, request: Request, stream: bool = False,
                            starting_after: int | None = Query(None, ge=-1),
                            resume_id: str | None = Depends(last_event_id)):
    """`GET /v1/responses/{id}`: the response with its current status and output so far; with
    `?stream=true`, its events after `starting_after` (a sequence number) or Last-Event-ID,
    then live ones."""
    rt = runtime_of(request)
    s = await response_session(rt, response_id, request)
    if s.request.get("store") is False:
        # Not retrievable, streamed or not (its stream still resumes as a session:
        # /v1/sessions/{id}/stream, or the original POST with Last-Event-ID).
        raise APIError(404, f"response {response_id} was created with store=false",
                       param="response_id", code="response_not_found")
    if stream:
        after = (starting_after if starting_after is not None
                 else resume_point(s.id, resume_id))
        return sse_response(rt, s, after)
    return JSONResponse(await current_object(rt, s), headers={"X-Session-Id": s.id})


async def compact_response(request: Request):
    """`POST /v1/responses/compact` (OpenAI's conversation compaction) is not implemented: 404
    with an OpenAI error, as for any route this server lacks (not 405 from the
    `/v1/responses/{id}` routes, and not a 5xx, which SDKs would retry)."""
    raise APIError(404, "POST /v1/responses/compact (conversation compaction) is not supported "
                        "by this server; continue with previous_response_id instead",
                   code="unsupported_endpoint")


async def cancel_response(response_id: str, request: Request):
    """`POST /v1/responses/{id}/cancel`: idempotent; answers the response object."""
    rt = runtime_of(request)
    s = await response_session(rt, response_id, request)
    await rt.cancel(s)
    return JSONResponse(await current_object(rt, s), headers={"X-Session-Id": s.id})


async def delete_response(response_id: str, request: Request):
    rt = runtime_of(request)
    s = await response_session(rt, response_id, request)
    await rt.forget(s)
    return {"id": f"resp_{s.id}", "object": "response.deleted", "deleted": True}


async def response_input_items_route(response_id: str, request: Request,
                                     order: str = Query("desc", pattern="^(asc|desc)$"),
                                     limit: int = Query(20, ge=1, le=100),
                                     after: str | None = None):
    """`GET /v1/responses/{id}/input_items`: the input items of this request (OpenAI's list
    shape, newest first by default)."""
    s = await response_session(runtime_of(request), response_id, request)
    if s.request.get("store") is False:
        raise APIError(404, f"response {response_id} was created with store=false",
                       param="response_id", code="response_not_found")
    items = [{"id": f"msg_{s.id}_in{i}", **item}
             for i, item in enumerate(s.request.get("_input_items", []))]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


# ---------------------------------------------------------------------------------------------
# Session routes and probes
# ---------------------------------------------------------------------------------------------


async def get_session(session_id: str, request: Request):
    return session_object(await lookup(runtime_of(request), session_id, request))


async def stream_session(session_id: str, request: Request,
                         resume_id: str | None = Depends(last_event_id)):
    """`GET /v1/sessions/{id}/stream`: replay from event 0, or after Last-Event-ID, then live.
    This is the URL a browser EventSource reconnects to on its own."""
    rt = runtime_of(request)
    s = await lookup(rt, session_id, request)
    return sse_response(rt, s, resume_point(s.id, resume_id))


async def delete_session(session_id: str, request: Request):
    rt = runtime_of(request)
    s = await lookup(rt, session_id, request)
    await rt.forget(s)
    return {"id": s.id, "object": "session.deleted", "deleted": True}


async def cancel_session(session_id: str, request: Request):
    """`POST /v1/cancel/{id}`: idempotent; `cancelled` says whether this call stopped it."""
    rt = runtime_of(request)
    s = await lookup(rt, session_id, request)
    changed = await rt.cancel(s)
    return {**session_object(s), "cancelled": changed}


async def health(request: Request):
    """Liveness: always 200 while the process serves. `status` is `degraded` while session
    writes fail (then /ready and new generations answer 503); `decode` is `compiled`, `eager`
    or `upstream`. No paths or exception texts."""
    handle: ModelHandle = request.app.state.model
    rt = runtime_of(request)
    storage_error = rt.store.write_error
    return {"status": "degraded" if storage_error else "ok", "model": handle.name,
            "model_state": handle.state, "storage": "error" if storage_error else "ok",
            "decode": rt.engine.decode}


async def ready(request: Request):
    """Readiness: 200 once the model is loaded (in front of an upstream: while the upstream
    answers its /models, checked at most once a second) and session writes work; else 503
    with the reason."""
    handle: ModelHandle = request.app.state.model
    stopping = getattr(request.app.state, "shutdown", None)
    if stopping is not None and stopping.draining:
        raise shutdown.refusal()
    require_ready(handle)
    require_storage(runtime_of(request))
    if handle.upstream is not None:
        await handle.upstream.check()
    return {"status": "ready", "model": handle.name}


async def metrics(request: Request):
    """`GET /metrics`: Prometheus text (or OpenMetrics when the scraper's Accept asks for it),
    answered at /metrics itself: a mounted ASGI app answered 307 to /metrics/ first."""
    encoder, content_type = choose_encoder(request.headers.get("accept"))
    return Response(encoder(REGISTRY), media_type=content_type)


PLAYGROUND = Path(__file__).with_name("playground.html")
# The page's script and style are inline and it calls only this server: nothing else may run.
PLAYGROUND_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; img-src 'self' data: blob:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


async def playground():
    """`GET /` and `/playground`: the browser playground, one static file (playground.html)."""
    return FileResponse(PLAYGROUND, media_type="text/html; charset=utf-8",
                        headers=PLAYGROUND_HEADERS)


# ---------------------------------------------------------------------------------------------
# Validation errors in words
# ---------------------------------------------------------------------------------------------


JSON_TYPE_NAMES = {"list": "array", "str": "string", "int": "number", "float": "number",
                   "bool": "boolean", "NoneType": "null"}


def validation_error(request: Request, err: dict[str, Any]) -> APIError:
    """A pydantic/FastAPI validation error as a 400 that says what is wrong and how to fix it:
    the common mistakes (not JSON, no JSON Content-Type, empty body, not an object) get their
    own words instead of "0: JSON decode error" or "Input should be a valid dictionary"."""
    loc = tuple(err.get("loc", ()))
    error_type = err.get("type")
    if error_type == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        reason = (err.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"the request body is not valid JSON ({reason}{where}); send one "
                             f"JSON object, e.g. {{\"messages\": [...]}}", code="invalid_json")
    if loc == ("body",):
        content_type = request.headers.get("content-type", "")
        if error_type == "missing":
            return APIError(400, "the request body is empty: send a JSON object with "
                                 "'Content-Type: application/json'", code="missing_body")
        if "json" not in content_type.lower():
            return APIError(400, f"the request body must be JSON sent with 'Content-Type: "
                                 f"application/json' (this request's Content-Type was "
                                 f"{content_type[:80]!r}; with curl use -H 'Content-Type: "
                                 f"application/json')", code="invalid_content_type")
        got = JSON_TYPE_NAMES.get(type(err.get("input")).__name__, "value")
        return APIError(400, f"the request body must be a JSON object ({{...}}), not a JSON "
                             f"{got}", code="invalid_body")
    parts = [p for p in loc if p != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or None
    message = f"{param}: {err['msg']}" if param else err["msg"]
    return APIError(400, message, param=param, code="invalid_request")
