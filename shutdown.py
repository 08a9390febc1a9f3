"""The graceful stop: on SIGTERM or Ctrl-C, drain, then tell every live stream, then stop.

A redeploy is the most common "drop" there is, so a shutdown must never read like the end of
an answer (docs/wire-contract.md, Events). The sequence, run before uvicorn's own handler sees
the signal (so the listener still answers meanwhile):

1. **Drain** (`SHUTDOWN_DRAIN_SECONDS`): `/ready` and new generation requests answer `503`
   `server_shutting_down` with `Retry-After` (SDKs and load balancers retry elsewhere or
   later); running generations go on, and the drain ends as soon as none of them can finish
   in the time left (each one's token budget at its measured rate), or none is left.
2. **Stop the generations**: with a durable log they are suspended, their sessions stay
   `queued`/`in_progress` and the next start continues them; without one they end
   `interrupted`. The log is flushed.
3. **Tell the streams**: every reader ends after the committed events; a stream whose session
   did not end gets one last event that is *not* in the log and has *no* `id:` (so
   `Last-Event-ID` stays at the last real event): an `error` object the openai SDK raises as
   `APIError`, naming the event to resume after; the connection then closes, and a browser
   `EventSource` reconnects by itself. A non-streamed request still waiting is answered `503`.
4. Hand the signal to uvicorn (and sse-starlette, which wraps it), which closes the listener
   and exits. A second signal during the drain skips the rest of the wait.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import signal
import time
from typing import Any, Callable

from runtime import Runtime
from schemas import APIError, error_body
from settings import settings

log = logging.getLogger("resumable.shutdown")

# How long the streams get to send their last event before uvicorn's handler (through
# sse-starlette's) cancels whatever still runs.
NOTIFY_SECONDS = 2.0
# The drain measures each generation's rate for this long before judging it.
MEASURE_SECONDS = 0.5

SHUTTING_DOWN = "server_shutting_down"


# ---------------------------------------------------------------------------------------------
# What clients are told
# ---------------------------------------------------------------------------------------------


def refusal() -> APIError:
    """The answer to a new generation request (and `/ready`) while the server drains: 503 with
    Retry-After, which SDKs retry and load balancers read as "elsewhere, or later"."""
    return APIError(503, "the server is shutting down; retry shortly (a restarted server or "
                         "another replica will take the request)", type="server_error",
                    code=SHUTTING_DOWN, headers={"Retry-After": "5"})


def stream_notice(kind: str, session_id: str, last_index: int) -> tuple[str | None, str]:
    """The last SSE event (event name, data) of a stream cut by a shutdown: not in the log, no
    id. Chat and completions get OpenAI's in-stream error chunk (`{"error": {...}}`, which the
    openai SDK raises as APIError); the Responses API its `error` event (type, code, message,
    param, sequence_number: that of the last event delivered, so resuming `starting_after` it
    loses nothing) with the same `error` object beside it, since the SDK raises on that key."""
    after = f"{session_id}:{last_index}" if last_index >= 0 else None
    message = ("the server is shutting down; this generation continues when it restarts: "
               + (f"reconnect with Last-Event-ID: {after}" if after else
                  "reconnect to the session's stream") + f" (GET /v1/sessions/{session_id}/stream)")
    error = error_body(503, message, type="server_error", code=SHUTTING_DOWN)
    if kind == "response":
        return "error", json.dumps({"type": "error", "code": SHUTTING_DOWN, "message": message,
                                    "param": None, "sequence_number": max(last_index, 0),
                                    **error}, separators=(",", ":"))
    return None, json.dumps(error, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# The drain
# ---------------------------------------------------------------------------------------------


class Shutdown:
    """The server's stop sequence (module docstring). `draining` is read by the routes."""

    def __init__(self, rt: Runtime, drain_seconds: float, continue_later: bool):
        self.rt, self.drain_seconds, self.continue_later = rt, drain_seconds, continue_later
        self.draining = False
        self.stopped = False
        self._skip = asyncio.Event()
        self._task: asyncio.Task | None = None

    def begin(self, then: Callable[[], None]) -> None:
        """Start the sequence (on the loop); a second call skips the rest of the drain."""
        if self._task is not None:
            self._skip.set()
            return
        self._task = self.rt.loop.create_task(self._run(then))

    async def _run(self, then: Callable[[], None]) -> None:
        try:
            await self.drain()
            await self.stop()
        except Exception:  # noqa: BLE001 - the process must stop whatever went wrong here
            log.exception("the graceful stop failed; stopping at once")
        finally:
            then()

    def _may_finish(self, start: float, deadline: float,
                    base: dict[str, int]) -> list[str]:
        """Sessions that can still end before `deadline`: a generation whose token budget, at
        the rate it made tokens since the drain began, fits the time left (an unknown budget
        counts as fitting, and so does one that made no token yet, for a while)."""
        now, out = time.monotonic(), []
        for sid, sink in list(self.rt.sinks.items()):
            done = min(sink.completion_tokens.values(), default=0)
            budget = getattr(sink, "max_new_tokens", 0)
            made = done - base.get(sid, 0)
            if budget <= 0 or now - start < MEASURE_SECONDS:
                out.append(sid)
            elif made <= 0:
                if now - start < 4 * MEASURE_SECONDS:  # a prefill, a queue: not yet judged
                    out.append(sid)
            elif (budget - done) / (made / (now - start)) <= deadline - now:
                out.append(sid)
        return out

    async def drain(self) -> None:
        """Refuse new work; let the generations that can finish in SHUTDOWN_DRAIN_SECONDS
        finish."""
        self.draining = True
        start = time.monotonic()
        deadline = start + self.drain_seconds
        base = {sid: min(s.completion_tokens.values(), default=0)
                for sid, s in self.rt.sinks.items()}
        running = len(self.rt.sinks)
        if running and self.drain_seconds > 0:
            log.info("shutting down: %d generations running; waiting up to %.0f s for those "
                     "that can finish (signal again to stop now)", running, self.drain_seconds)
        while (self.rt.sinks and not self._skip.is_set()
               and time.monotonic() < deadline
               and self._may_finish(start, deadline, base)):
            try:
                await asyncio.wait_for(self._skip.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        left = len(self.rt.sinks)
        if running:
            log.info("shutting down after %.1f s of drain: %d of %d generations finished, %d %s",
                     time.monotonic() - start, running - left, running, left,
                     "continue at the next start" if self.continue_later else "end interrupted")

    async def stop(self) -> None:
        """Stop the generations, commit, and end every stream with its notice."""
        if self.continue_later:
            self.rt.suspend_all()
        else:
            self.rt.interrupt_all()
        try:
            await asyncio.wait_for(self.rt.store.flush(), 5.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - a failing disk must not hang
            log.warning("shutting down: the last events did not commit")
        self.stopped = True
        self.rt.store.stop_readers()
        deadline = time.monotonic() + NOTIFY_SECONDS
        while (any(live.attached for live in self.rt.live.values())
               and time.monotonic() < deadline):
            await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# The signals
# ---------------------------------------------------------------------------------------------


def install(shutdown: Shutdown) -> None:
    """Put the stop sequence in front of the SIGINT/SIGTERM handlers the ASGI server set
    (uvicorn's, wrapped by sse-starlette's): the first signal starts it, and the server's own
    handler gets the signal once it is done. Only in the main thread (signal handlers live
    there); elsewhere (a test client, a server that runs the app in a thread) nothing changes
    and the lifespan's shutdown does steps 2-3 without the drain."""
    loop = shutdown.rt.loop
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous = signal.getsignal(sig)
        except ValueError:
            return
        if not callable(previous):
            continue  # SIG_DFL/SIG_IGN: nobody to hand over to; leave it

        def handler(signum: int, frame: Any, previous=previous) -> None:
            def then() -> None:
                previous(signum, frame)
            if shutdown._task is not None and shutdown._task.done():
                previous(signum, frame)  # the sequence ran: this one is the server's again
                return
            # A fresh context: the signal interrupts whatever ran, a request's log context too.
            loop.call_soon_threadsafe(shutdown.begin, then, context=contextvars.Context())

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread
            return


def configured(rt: Runtime) -> Shutdown:
    """The stop sequence as the settings ask for it."""
    return Shutdown(rt, settings.shutdown_drain_seconds,
                    settings.continue_after_restart and rt.store.event_log is not None)
