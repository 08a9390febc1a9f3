"""resumable: an OpenAI-compatible inference server whose streams survive dropped connections.

Run it as `uvicorn main:app` (or `python main.py --model X --host H --port P`). This file is the
wiring a newcomer reads first: lifespan (store, recovery, background model load, shutdown),
the OpenAPI document, the app with its middleware and route table, and the CLI. The chain
behind a request is routes.py -> prepare.py -> runtime.py -> engine.py; formatters.py writes
the wire formats, store.py the event log. The wire contract is docs/wire-contract.md.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python main.py ...`: the flags first, without the imports below (torch takes ~10 s);
    # uvicorn then imports this file afresh as `main`.
    from cli import cli
    cli()
    raise SystemExit(0)

import asyncio
import logging
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from engine import Engine
from kv_cache import CompiledDecode
from model import ModelHandle, load_model, served_model_name
from routes import (cancel_response, cancel_session, chat_completions, compact_response,
                    completions, create_response, delete_response, delete_session, get_session,
                    health, list_models, metrics, playground, ready, response_input_items_route,
                    retrieve_model, retrieve_response, stream_session, validation_error)
import shutdown
from prepare import prepare_stored
from runtime import Runtime, continue_sessions, formatters_for, recover, sweep_loop
from schemas import APIError, ErrorResponse, error_body, error_response
from security import APIKeyMiddleware, BodyLimitMiddleware, HostCheckMiddleware, split_list
from settings import settings
from store import EventsGone, SessionStore, StoreLocked, StoreOpenError, StoreUnavailable
from store_sqlite import session_store
from telemetry import (KV_CACHE_USAGE, QUEUE_DEPTH, REQUEST_ID, RUNNING_SEQUENCES,
                       WAITING_SEQUENCES, AccessLogMiddleware, configure_logging)
from upstream import Upstream, UpstreamEngine

configure_logging(settings.log_level, settings.log_format)
log = logging.getLogger("resumable")


# ---------------------------------------------------------------------------------------------
# Lifespan: store, recovery, background model load, shutdown
# ---------------------------------------------------------------------------------------------


def exit_after_model_failure(app: FastAPI, handle: ModelHandle) -> None:
    """A model that cannot load is no reason to retry: say why, then stop the server (through
    its own signal handling, so sessions are closed as on Ctrl-C) and exit with status 1, as
    vLLM does. A supervisor restarts it or alerts; clients are not kept waiting on 503s."""
    log.error("model %s could not be loaded, so the server stops: %s", handle.name, handle.error)
    app.state.exit_code = 1
    signal.raise_signal(signal.SIGTERM)


def asgi_server() -> Any:
    """uvicorn's Server running this app, if it is (its SIGTERM handler is a bound method of
    it, which is how sse-starlette finds it too); None under another server or in a thread."""
    try:
        return getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    except ValueError:
        return None


def say_where(server: Any) -> None:
    """Once the model is ready, one line with the URLs to open: the API and the playground
    (the port as bound: `--port 0` included; an unspecified address shown as 127.0.0.1)."""
    base = None
    try:
        sock = server.servers[0].sockets[0].getsockname()
        host = server.config.host if server.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        base = f"http://{host}:{sock[1]}{server.config.root_path}"
    except (AttributeError, IndexError, TypeError):
        pass
    if base is None:
        log.info("ready: the API is at /v1 on this server, the playground at /")
    else:
        log.info("ready: the API is at %s/v1, the playground at %s/", base, base)


class StartupFailureLine:
    """ASGI wrapper: a startup failure whose reason is the user's to fix (a database another
    server holds, a file that is no database) reaches the server's log as its one line.

    Starlette reports any exception raised in the lifespan as `lifespan.startup.failed` with
    the formatted traceback as its `message`, which uvicorn logs as it is (the ASGI lifespan
    spec: https://asgi.readthedocs.io/en/latest/specs/lifespan.html); the lifespan leaves the
    reason in `app.state.startup_failure` and this swaps it in. Other failures keep theirs.
    """

    def __init__(self, app: Any, state: Any):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def reporting(message):
            reason = getattr(self.state, "startup_failure", None)
            if message.get("type") == "lifespan.startup.failed" and reason:
                message = {**message, "message": reason}
            await send(message)

        return await self.app(scope, receive, reporting)


def build_store() -> SessionStore:
    """The session store: Redis Streams shared by replicas (EVENT_STORE_URL), one SQLite file
    (SESSIONS_DB_PATH), or memory only (PERSIST_SESSIONS=false)."""
    if settings.event_store_url:
        from store_redis import RedisEventLog  # redis-py is needed only here
        shared = RedisEventLog(settings.event_store_url,
                               replica_id=settings.replica_id or
                               f"{socket.gethostname()}-{os.getpid()}",
                               lease_seconds=settings.lease_seconds,
                               ttl_seconds=settings.sessions_ttl_seconds)
        return SessionStore(settings.ring_buffer_size, settings.sessions_ttl_seconds, shared)
    return session_store(settings.sessions_db_path if settings.persist_sessions else None,
                         settings.ring_buffer_size, settings.sessions_ttl_seconds,
                         lock_timeout_seconds=settings.sessions_db_lock_timeout_seconds)


def compiled_decode() -> CompiledDecode | None:
    """The compiled decode step as COMPILE_DECODE and its companions set it (None: off)."""
    if settings.compile_decode == "false":
        return None
    sizes = sorted({int(s) for s in settings.compile_batch_sizes.split(",")
                    if s.strip() and int(s) > 0})
    if not sizes:
        sizes = [1 << i for i in range(settings.max_num_seqs.bit_length())]
        if sizes[-1] < settings.max_num_seqs:
            sizes.append(settings.max_num_seqs)
    return CompiledDecode(
        max_cache_len=settings.max_cache_len, batch_sizes=sizes,
        cuda_only=settings.compile_decode == "auto",
        options={"mode": settings.compile_mode, "backend": settings.compile_backend,
                 "fullgraph": False, "dynamic": False})


async def connect_upstream(handle: ModelHandle, upstream: Upstream,
                           attempts: int | None = None) -> None:
    """Ask the upstream for its model until it answers (every 2 s; `attempts` None: for
    ever): until then requests answer 503 `upstream_unavailable` with the reason, as while a
    local model loads; a model name comes from it unless SERVED_MODEL_NAME or UPSTREAM_MODEL
    gives one."""
    while attempts is None or attempts > 0:
        try:
            await upstream.connect(handle)
            handle.error = None
            log.info("serving %s from the upstream at %s (context %s tokens)", handle.name,
                     upstream.url, handle.context_length)
            return
        except APIError as e:
            if handle.error != e.message:
                log.warning("upstream not ready: %s", e.message)
            handle.error = e.message
        if attempts is not None:
            attempts -= 1
            if attempts == 0:
                return
        await asyncio.sleep(2.0)


@asynccontextmanager
async def lifespan(app: FastAPI):
    handle = ModelHandle(name=served_model_name())
    app.state.model, app.state.started, app.state.exit_code = handle, time.time(), 0
    store = build_store()
    try:
        unfinished = await store.open()
    except (StoreLocked, StoreOpenError) as e:
        # Raised out of the lifespan, uvicorn logs "Application startup failed" and exits 3;
        # StartupFailureLine makes what it logs before that this one line, not a traceback.
        app.state.startup_failure = str(e)
        raise
    upstream = None
    if settings.upstream_url:
        # In front of another server: it generates; sessions, resume and cancel stay here.
        upstream = handle.upstream = Upstream(
            settings.upstream_url, settings.upstream_api_key, settings.upstream_model,
            settings.upstream_connect_timeout_seconds, settings.upstream_read_timeout_seconds)
        await connect_upstream(handle, upstream, attempts=1)  # its model name, if it is up
        engine = UpstreamEngine(upstream, asyncio.get_running_loop(),
                                settings.max_queued_requests, settings.max_num_seqs,
                                settings.upstream_retry_seconds)
    else:
        engine = Engine(handle, settings.max_queued_requests, settings.max_num_seqs,
                        settings.max_batch_tokens, compiled_decode())
    QUEUE_DEPTH.set_function(lambda: len(engine.waiting))
    RUNNING_SEQUENCES.set_function(lambda: engine.stats()["running"])
    WAITING_SEQUENCES.set_function(lambda: engine.stats()["waiting"])
    KV_CACHE_USAGE.set_function(lambda: engine.stats()["kv_cache_usage"])
    rt = Runtime(store, engine, asyncio.get_running_loop())
    app.state.runtime = rt
    formatters_for(rt, list(store.sessions.values()))
    # Generations the last process left running go on once the model is loaded.
    resumable = await recover(rt, [s for s in unfinished if not s.terminal], handle.name)

    def prepare_again(s):
        return prepare_stored(handle, s.kind, s.inputs or s.request)

    continuing = asyncio.create_task(continue_sessions(rt, handle, resumable, prepare_again))
    if store.shared:  # other replicas' sessions whose owner died are taken over
        rt.share(handle, prepare_again)

    server = asgi_server()  # (before shutdown.install replaces the handler it is read from)

    def load() -> None:
        # Ready only once the engine runs (and its compiled decode is warm).
        load_model(handle, before_ready=engine.start)
        if handle.state != "ready":
            exit_after_model_failure(app, handle)
        else:
            say_where(server)

    if upstream is None:
        threading.Thread(target=load, name="model-loader", daemon=True).start()
        connecting = None
    else:
        connecting = (None if handle.state == "ready"  # (answered at the first try)
                      else asyncio.create_task(connect_upstream(handle, upstream)))
    sweeper = asyncio.create_task(sweep_loop(rt))
    # SIGTERM/Ctrl-C: drain, then end every stream with a notice, then uvicorn's own stop.
    app.state.shutdown = stopping = shutdown.configured(rt)
    shutdown.install(stopping)
    try:
        yield
    finally:
        # Each step runs whatever the one before did: a store left open keeps the process
        # (aiosqlite's thread) and the database lock alive.
        sweeper.cancel()
        continuing.cancel()
        if connecting is not None:
            connecting.cancel()
        rt.unshare()
        try:
            # Done already when a signal ran the stop sequence; here for a stop without one.
            if not stopping.stopped:
                await stopping.stop()
        finally:
            try:
                await asyncio.to_thread(engine.stop)
                if upstream is not None:
                    await upstream.aclose()
            finally:
                await store.close()
        if app.state.exit_code:
            logging.shutdown()
            os._exit(app.state.exit_code)


# ---------------------------------------------------------------------------------------------
# OpenAPI, told the truth
# ---------------------------------------------------------------------------------------------


# Routes that answer text/event-stream (with `stream`), and the errors each kind of route gives.
SSE_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/responses",
             "/v1/responses/{response_id}", "/v1/sessions/{session_id}/stream"}


GENERATION_ERRORS = {"404": "unknown session (resume)", "409": "session id reused with another "
                     "body", "413": "body too large", "429": "queue full (Retry-After)",
                     "503": "model loading or storage failing (Retry-After)"}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, told the truth: errors are 400 with the OpenAI error body (FastAPI
    advertises 422 on every route), generation and resume routes also answer
    `text/event-stream`, and the session errors are listed where they occur."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error.pop("$defs", {}))
    components["ErrorResponse"] = error
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    error_ref = {"content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if not path.startswith("/v1"):
                continue
            responses["400"] = {"description": "invalid request", **error_ref}
            responses["401"] = {"description": "missing or wrong API key (API_KEYS)", **error_ref}
            extra = (GENERATION_ERRORS if method == "post" and path in SSE_PATHS
                     else {"404": "unknown, expired or another key's session/response"}
                     if "{" in path else {})
            for status, description in extra.items():
                responses[status] = {"description": description, **error_ref}
            if path in SSE_PATHS:
                ok = responses.setdefault("200", {"description": "OK"})
                ok.setdefault("content", {})["text/event-stream"] = {"schema": {
                    "type": "string", "description": "SSE events `id: <session>:<index>`; "
                                                     "see docs/wire-contract.md"}}
    app.openapi_schema = schema
    return schema


# ---------------------------------------------------------------------------------------------
# The app: middleware, error handlers, the route table
# ---------------------------------------------------------------------------------------------


def create_app() -> FastAPI:
    """The FastAPI application with routes, error handlers and the body-size limit.

    /docs and /redoc serve Swagger UI and ReDoc from the fastapi-offline package's files, not
    from a CDN: a local model server is often on a box without internet.
    """
    app = FastAPIOffline(title="resumable", version="0.1.0", lifespan=lifespan,
                         description="OpenAI-compatible server whose streams resume after a "
                                     "dropped connection or a restart (see "
                                     "docs/wire-contract.md).")
    app.openapi = lambda: openapi_schema(app)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(EventsGone)
    async def _gone(request: Request, e: EventsGone):
        return error_response(APIError(410, str(e), param="Last-Event-ID", code="events_gone"))

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, e: StoreUnavailable):
        # A shared log that cannot be read (a Redis outage): a retry can succeed, so 503.
        return error_response(APIError(503, f"session storage is unavailable: {e}",
                                       code="storage_unavailable",
                                       headers={"Retry-After": "5"}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        return error_response(validation_error(request, err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else "request failed"
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(APIError(e.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        request_id = REQUEST_ID.get() or uuid.uuid4().hex[:16]
        log.error("request %s %s %s failed", request_id, request.method, request.url.path,
                  exc_info=e)
        # Answered by Starlette's outermost middleware, past the access log's header.
        return JSONResponse(error_body(500, f"internal server error (request id {request_id})",
                                       code="internal_error"), status_code=500,
                            headers={"X-Request-Id": request_id})

    app.get("/v1/models")(list_models)
    app.get("/v1/models/{model:path}")(retrieve_model)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/v1/completions")(completions)
    app.post("/v1/responses")(create_response)
    app.post("/v1/responses/compact", include_in_schema=False)(compact_response)
    app.get("/v1/responses/{response_id}")(retrieve_response)
    app.post("/v1/responses/{response_id}/cancel")(cancel_response)
    app.delete("/v1/responses/{response_id}")(delete_response)
    app.get("/v1/responses/{response_id}/input_items")(response_input_items_route)
    app.get("/v1/sessions/{session_id}")(get_session)
    app.get("/v1/sessions/{session_id}/stream")(stream_session)
    app.delete("/v1/sessions/{session_id}")(delete_session)
    app.post("/v1/cancel/{session_id}")(cancel_session)
    app.get("/health")(health)
    app.get("/ready")(ready)
    app.get("/metrics", include_in_schema=False)(metrics)
    app.get("/metrics/", include_in_schema=False)(metrics)
    app.get("/", include_in_schema=False)(playground)
    app.get("/playground", include_in_schema=False)(playground)
    # Added innermost first. Outermost: the access log (request ids), Host check, CORS (so
    # 401s carry CORS headers), API keys, body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=split_list(settings.api_keys))
    origins = split_list(settings.cors_allow_origins)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["content-type", "authorization", "last-event-id",
                                          "x-request-id"],
                           expose_headers=["X-Session-Id", "X-Request-Id"], max_age=600)
    app.add_middleware(HostCheckMiddleware, allowed=split_list(settings.allowed_hosts))
    app.add_middleware(AccessLogMiddleware)  # every answer has a request id and a log
    app.add_middleware(StartupFailureLine, state=app.state)  # (lifespan messages only)
    return app


app = create_app()
