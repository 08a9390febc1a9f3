"""What the server tells its operators: Prometheus metrics (/metrics), logs, the access log.

Metrics live in a module of their own because collectors register in a process-wide registry:
`python main.py` runs main.py as `__main__` and uvicorn then imports it again as `main`, so
collectors defined in main.py were registered twice and the server crashed at once. A module
imported by both is imported once.

Logs are text (default) or one JSON object per line (LOG_FORMAT=json, python-json-logger),
uvicorn's own loggers included. Every request gets a request id (the client's `X-Request-Id`
if it sent a sane one, else a new one), echoed in the response's `X-Request-Id` and attached
to every log record written while it runs. Prompts, outputs, media and keys are never logged:
the access record has method, path (no query string), status, latency, session id.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import sys
import time
import uuid

from prometheus_client import Counter, Gauge, Histogram

GENERATIONS_STARTED = Counter("resumable_generations_started_total",
                              "Generations the engine started")
GENERATIONS_FINISHED = Counter("resumable_generations_finished_total",
                               "Sessions that ended, by finish reason", ["reason"])
COMPLETION_TOKENS = Counter("resumable_completion_tokens_total", "Tokens generated")
RESUMES = Counter("resumable_resumes_total", "Streams opened after a Last-Event-ID")
QUEUE_DEPTH = Gauge("resumable_queue_depth", "Generation jobs waiting for the engine")
# The engine's batch, as vLLM names them (num_requests_running/waiting, kv_cache_usage_perc).
RUNNING_SEQUENCES = Gauge("resumable_num_requests_running",
                          "Sequences in the running batch (a request with n=4 counts 4)")
WAITING_SEQUENCES = Gauge("resumable_num_requests_waiting",
                          "Sequences waiting for room in the batch")
KV_CACHE_USAGE = Gauge("resumable_kv_cache_usage_perc",
                       "Share of MAX_BATCH_TOKENS reserved by running sequences (0..1)")
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TIME_TO_FIRST_TOKEN = Histogram("resumable_time_to_first_token_seconds",
                                "From submission to the engine to a request's first token",
                                buckets=_LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("resumable_inter_token_latency_seconds",
                                "Between two tokens of one sequence", buckets=_LATENCY_BUCKETS)


# ---------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------


REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                        default=None)
# `request_tag` is " [<request id>]" inside a request, else empty (RequestIdFilter).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
access_log = logging.getLogger("resumable.access")


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record written while that request runs, as
    `request_id` (a JSON field) and `request_tag` (the text format's " [id]"), and drops
    uvicorn's `color_message` (the message again with terminal colour codes)."""

    def __init__(self, tag: bool):
        super().__init__()
        self.tag = tag  # text logs: set request_tag (JSON logs would print it as a field)

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        if getattr(record, "request_id", None) is None:
            request_id = REQUEST_ID.get()
            if request_id is not None:
                record.request_id = request_id
        if self.tag:
            request_id = getattr(record, "request_id", None)
            record.request_tag = f" [{request_id}]" if request_id else ""
        return True


def configure_logging(level: str, log_format: str = "text") -> None:
    """Route every logger (ours, uvicorn's, the libraries') through one handler on stderr.

    `log_format`: "text" (`time LEVEL logger: message`) or "json" (one object per line with
    `time`, `level`, `logger`, `message` and a record's extra fields such as `request_id`,
    `session_id`, `status`, `latency_ms`). uvicorn configures its loggers before it imports
    the app; in json mode their handlers are removed so they reach ours, and uvicorn's access
    log is replaced by `resumable.access` (it has no request id, session id or latency).
    """
    handler = logging.StreamHandler(sys.stderr)
    # httpx logs every request at INFO: one line per upstream call or media fetch is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z"))
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            uv = logging.getLogger(name)
            uv.handlers.clear()
            uv.propagate = True
        logging.getLogger("uvicorn.access").disabled = True
        AccessLogMiddleware.level = logging.INFO
        # Everything else that writes to stderr, as records or not at all: transformers' own
        # handler and progress bars, Python warnings. (The GGUF conversion's raw tqdm bar is
        # silenced where it runs, in model.py: tqdm reads TQDM_DISABLE only at import.)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
        # uvicorn's access line says the same in text mode; ours is there with LOG_LEVEL=debug.
        AccessLogMiddleware.level = logging.DEBUG
    handler.addFilter(RequestIdFilter(tag=log_format != "json"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # aiosqlite logs every statement with its parameters at DEBUG: prompts and outputs would
    # reach the log, which never gets them (LOG_LEVEL=debug included).
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # uvicorn's access line carries the query string (`?last_event_id=`, a mistaken
    # `?api_key=`): logged without it, as our own access line is.
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, WithoutQuery) for f in access.filters):
        access.addFilter(WithoutQuery())


class WithoutQuery(logging.Filter):
    """Drops the query string from uvicorn's access records (args: client, method, path with
    query, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = args[:2] + (args[2].split("?", 1)[0],) + args[3:]
        return True


# ---------------------------------------------------------------------------------------------
# The access log and request ids
# ---------------------------------------------------------------------------------------------


REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")


class AccessLogMiddleware:
    """Pure ASGI: a request id per HTTP request (`X-Request-Id`, the client's if it is 1-64 of
    `[A-Za-z0-9._:-]`, else 16 random hex digits) and one `resumable.access` record when the
    response has ended (for a stream: when the stream ends or the client leaves), with
    `method`, `path`, `status`, `latency_ms` (to the end), `ttfb_ms` (to the status line),
    `session_id` (the response's X-Session-Id) and `request_id`. A response never started
    (the app raised, the client left first) is logged with status 500 or 499."""

    level = logging.INFO  # configure_logging: DEBUG with text logs (uvicorn's line says it)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = sent.decode() if REQUEST_ID_RE.match(sent) else uuid.uuid4().hex[:16]
        # Not reset afterwards: each request runs in its own task (its own context), and the
        # 500 handler runs outside this middleware (Starlette's ServerErrorMiddleware) and
        # must still read the id.
        REQUEST_ID.set(request_id)
        started, info = time.perf_counter(), {"status": None, "session_id": None, "ttfb": None}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                info["status"], info["ttfb"] = message["status"], time.perf_counter() - started
                headers = list(message.get("headers", []))
                for name, value in headers:
                    if name.lower() == b"x-session-id":
                        info["session_id"] = value.decode("latin-1")
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException as e:
            # Cancelled: the server is stopping or the client left, not a server error.
            info["status"] = info["status"] or (499 if isinstance(e, asyncio.CancelledError)
                                                else 500)
            raise
        finally:
            ttfb = info["ttfb"]
            # As sent (still percent-encoded): a decoded %0A would start a new log line.
            path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
            access_log.log(
                self.level, "%s %s %s", scope["method"], path, info["status"] or 499,
                extra={"method": scope["method"], "path": path,
                       "status": info["status"] or 499, "session_id": info["session_id"],
                       "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                       "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 1),
                       "request_id": request_id})
