"""Sessions at run time: the engine's callbacks into the log, clients, the disconnect timer,
cancel, recovery after a restart, and expiry. The only writer to the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any


from engine import Engine, GenerationJob, Resume
from formatters import FORMATTERS, Formatter, Out, usage_object
from prepare import Prepared
from settings import settings
from store import ACTIVE_STATES, Event, Session, SessionStore
from telemetry import GENERATIONS_FINISHED

log = logging.getLogger("resumable.runtime")


# ---------------------------------------------------------------------------------------------
# Engine callbacks
# ---------------------------------------------------------------------------------------------


FINISH_STATES = {"stop": "completed", "length": "completed", "tool_calls": "completed",
                 "cancelled": "cancelled", "interrupted": "interrupted"}


class SessionSink:
    """The engine's way back to the event loop: each method is called on the engine thread and
    runs its work on the loop. Once the session is terminal (cancelled from outside, deleted,
    server stopping) or the sink is closed (the server stops and the generation will continue
    at the next start), later calls change nothing.

    Each text event carries in `Event.meta` the token ids behind it and its choice's seed (the
    prompt's size on a choice's first event, a finished choice's counts): `Progress.of` reads
    them back after a crash. One engine call is one `append_many`, so text and tokens commit
    together."""

    def __init__(self, runtime: "Runtime", s: Session, prompt_tokens: int,
                 resume: Resume | None = None, keep_text: bool = False):
        self.runtime, self.s, self.live = runtime, s, runtime.live[s.id]
        # In front of an upstream there are no token ids: the meta keeps the parts and the
        # count instead, which is what a continuation there needs (upstream.continuation).
        self.keep_text = keep_text
        self.on_loop = keep_text  # upstream jobs run as tasks on the loop (upstream.py)
        self.prompt_tokens = prompt_tokens
        # per choice index
        self.completion_tokens = resume.completion_tokens() if resume is not None else {}
        self.carry: dict[int, list[int]] = {}  # tokens of text that made no event (yet)
        self.described: set[int] = set()  # choices whose prompt size was stored here
        self.closed = False
        self.admitted = False  # the engine took the job (until then a cancel ends it here)
        self.max_new_tokens = 0  # the budget per choice (0: unknown), read by shutdown.py

    def _call(self, fn, *args) -> None:
        if self.on_loop:
            fn(*args)  # an upstream job calls from the loop itself: no wake-up needed
            return
        try:
            self.runtime.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop closed under a generation during shutdown: nothing is listening

    def started(self, prompt_tokens: int) -> None:
        self._call(self._started, prompt_tokens)

    def delta(self, index: int, parts: list[tuple[str, str]], completion_tokens: int,
              logprobs: list[dict[str, Any]] | None, tokens: list[int], seed: int) -> None:
        self._call(self._delta, index, parts, completion_tokens, logprobs, tokens, seed)

    def choice_finished(self, index: int, reason: str, parts: list[tuple[str, str]],
                        completion_tokens: int, reasoning_tokens: int,
                        logprobs: list[dict[str, Any]] | None, tokens: list[int]) -> None:
        self._call(self._choice_finished, index, reason, parts, completion_tokens,
                   reasoning_tokens, logprobs, tokens)

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int,
                 reasoning_tokens: int = 0) -> None:
        self._call(self._finished, reason,
                   usage_object(prompt_tokens, completion_tokens, reasoning_tokens))

    def failed(self, message: str) -> None:
        self._call(self._failed, message)

    def _failed(self, message: str) -> None:
        if not self.closed:
            self.runtime.fail(self.s, message)

    def _open(self) -> bool:
        return not (self.s.terminal or self.s.deleted or self.closed)

    def _started(self, prompt_tokens: int) -> None:
        self.prompt_tokens, self.admitted = prompt_tokens, True
        # A continued generation started before the crash: its opening events are stored.
        if self._open() and self.s.state == "queued":
            self.runtime.store.append_many(self.s, self.live.formatter.start(), "in_progress")

    def _text_events(self, index: int, parts: list[tuple[str, str]],
                     logprobs: list[dict[str, Any]] | None) -> list[Out]:
        out: list[Out] = []
        for k, (channel, text) in enumerate(parts):
            out += self.live.formatter.delta(text, channel, index, logprobs if k == 0 else None)
        return out

    def _append(self, index: int, events: list[Out], meta: dict[str, Any]) -> None:
        """Append `events` with `meta`; tokens of text that made no event wait for the next."""
        meta["t"] = self.carry.pop(index, []) + meta["t"]
        if not events:
            self.carry[index] = meta["t"]
            return
        if index not in self.described:
            self.described.add(index)
            meta["p"] = self.prompt_tokens
        self.runtime.store.append_many(self.s, events, meta=json.dumps(meta,
                                                                       separators=(",", ":")))

    def _delta(self, index: int, parts: list[tuple[str, str]], completion_tokens: int,
               logprobs: list[dict[str, Any]] | None, tokens: list[int], seed: int) -> None:
        self.completion_tokens[index] = completion_tokens
        if self._open():
            meta: dict[str, Any] = {"c": index, "t": tokens, "s": seed}
            if self.keep_text:
                meta.update(x=parts, g=completion_tokens)
            self._append(index, self._text_events(index, parts, logprobs), meta)

    def _choice_finished(self, index: int, reason: str, parts: list[tuple[str, str]],
                         completion_tokens: int, reasoning_tokens: int,
                         logprobs: list[dict[str, Any]] | None, tokens: list[int]) -> None:
        self.completion_tokens[index] = completion_tokens
        if self._open():
            events = (self._text_events(index, parts, logprobs)
                      + self.live.formatter.choice_finish(index, reason))
            meta = {"c": index, "t": tokens, "f": reason, "n": completion_tokens,
                    "r": reasoning_tokens}
            if self.keep_text:
                meta["x"] = parts
            self._append(index, events, meta)

    def _finished(self, reason: str, usage: dict[str, int]) -> None:
        if not self.closed:
            self.runtime.finish(self.s, reason, usage)

    def usage_so_far(self) -> dict[str, int]:
        return usage_object(self.prompt_tokens, sum(self.completion_tokens.values()))


# ---------------------------------------------------------------------------------------------
# The runtime
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LiveSession:
    """What a session has only while this process serves it (never persisted, never shared
    between replicas): its formatter (a fold over its events; None for a kind this server
    cannot serve), the cancel flag the engine polls, attached clients, the disconnect clock."""

    formatter: Formatter | None
    cancel: threading.Event = field(default_factory=threading.Event)
    attached: int = 0
    last_detached_at: float | None = None
    progress: Any = None  # a recovered session's Progress, until its generation runs


class Runtime:
    """Live state around the store: the loop, the engine, and each session's clients."""

    def __init__(self, store: SessionStore, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.store, self.engine, self.loop = store, engine, loop
        self.sinks: dict[str, SessionSink] = {}
        self.live: dict[str, LiveSession] = {}

    async def session(self, session_id: str) -> Session | None:
        """The session with this id (loaded from a shared log if another replica owns it), with
        its formatter; None if unknown, deleted or expired."""
        s = await self.store.lookup(session_id)
        if s is not None and s.id not in self.live:
            formatters_for(self, [s])
        return s

    def formatter(self, s: Session) -> Formatter | None:
        """The session's formatter (None for a kind this server cannot serve)."""
        live = self.live.get(s.id)
        return live.formatter if live else None

    # --- creating and starting sessions -------------------------------------------------------

    def create(self, session_id: str, kind: str, model: str, digest: str,
               request: dict[str, Any], inputs: dict[str, Any] | None = None) -> Session:
        """A new `queued` session with its formatter and its first events (e.g.
        `response.created`) appended; `inputs` as Session.inputs. Raises KeyError if a live
        session has the id."""
        s = self.store.create(session_id, kind, model, digest, request, inputs)
        live = self.live[s.id] = LiveSession(FORMATTERS[kind](s))
        self.append_all(s, live.formatter.created())
        return s

    def start(self, s: Session, prepared: Prepared, resume: Resume | None = None
              ) -> GenerationJob:
        """Queue the session's generation: inputs as `prepare` made them (`input_ids`
        (1, prompt_tokens), vision tensors; `more_inputs` for further prompts; or the request
        for an upstream), sampling, the reasoning split and tool calls to parse, and where a
        crashed run stood (`resume`); arm the disconnect timer (no client may ever attach).
        Returns the job (an upstream's sets `job.opened`)."""
        live = self.live[s.id]
        job = GenerationJob(s.id, live.cancel, prepared.inputs, prepared.params, None,
                            prepared.starts_in_reasoning, list(prepared.more_inputs),
                            prepared.tools, resume, upstream=prepared.upstream)
        job.sink = self.sinks[s.id] = SessionSink(self, s, job.prompt_tokens, resume,
                                                  keep_text=prepared.upstream is not None)
        job.sink.max_new_tokens = prepared.params.max_new_tokens
        self.engine.submit(job)
        live.last_detached_at = time.monotonic()
        self.arm_disconnect_timer(s)
        return job

    async def discard(self, s: Session) -> None:
        """Drop a session that never started (its request was answered with an error)."""
        self.sinks.pop(s.id, None)
        self.live.pop(s.id, None)
        await self.store.delete(s.id)

    # --- the log -----------------------------------------------------------------------------

    def append_all(self, s: Session, events: list[Out]) -> None:
        self.store.append_many(s, events)

    def finish(self, s: Session, reason: str, usage: dict[str, int] | None) -> None:
        """Append the terminal events for `reason` and move to the matching terminal state,
        in one transaction."""
        if s.terminal or s.deleted:
            return
        self.store.append_many(s, self.live[s.id].formatter.finish(reason, usage),
                               FINISH_STATES[reason],
                               reason, usage)
        GENERATIONS_FINISHED.labels(reason).inc()
        self.sinks.pop(s.id, None)

    def fail(self, s: Session, message: str) -> None:
        if s.terminal or s.deleted:
            return
        self.store.append_many(s, self.live[s.id].formatter.error(message), "failed")
        GENERATIONS_FINISHED.labels("error").inc()
        self.sinks.pop(s.id, None)

    # --- clients and the disconnect timer ---------------------------------------------------

    def attach(self, s: Session) -> None:
        self.live[s.id].attached += 1

    def detach(self, s: Session) -> None:
        live = self.live.get(s.id)
        if live is None:
            return  # forgotten meanwhile
        live.attached -= 1
        if live.attached == 0:
            live.last_detached_at = time.monotonic()
            self.arm_disconnect_timer(s)

    def arm_disconnect_timer(self, s: Session) -> None:
        """Cancel `s` once no client has been attached for CANCEL_AFTER_DISCONNECT_SECONDS."""
        delay = settings.cancel_after_disconnect_seconds
        # A background response has no client by design: only cancel stops it. A remote
        # session's clients are counted by the replica that owns it.
        if delay > 0 and not s.terminal and not s.remote and not s.request.get("background"):
            self.loop.call_later(delay, self._disconnect_check, s)

    def _disconnect_check(self, s: Session) -> None:
        delay = settings.cancel_after_disconnect_seconds
        live = self.live.get(s.id)
        if (s.terminal or s.deleted or live is None or live.attached > 0
                or live.last_detached_at is None
                or time.monotonic() - live.last_detached_at < delay - 0.05):
            return
        log.info("session %s: no client for %.0f s, cancelling", s.id, delay)
        self.loop.create_task(self.cancel(s))

    # --- cancel ------------------------------------------------------------------------------

    async def cancel(self, s: Session, wait_seconds: float = 5.0) -> bool:
        """Stop `s` at its next token; returns False if it had already ended (idempotent).

        A queued session ends at once. A running one ends when the engine sees the flag; if the
        engine is stuck longer than `wait_seconds` (a long prefill) it is ended from here and
        what the engine still sends is dropped.
        """
        if s.terminal:
            return False
        if s.remote:
            # Another replica generates it: the log passes the cancel on (and keeps it, for
            # whoever takes the session over); wait for the ending to arrive.
            await self.store.event_log.request_cancel(s.id)
            try:
                await asyncio.wait_for(self.store.wait_terminal(s), wait_seconds)
            except asyncio.TimeoutError:
                pass
            return True
        live = self.live[s.id]
        live.cancel.set()
        sink = self.sinks.get(s.id)
        if sink is None or not sink.admitted:
            # Not in the engine yet (queued, or recovered and waiting): the engine drops it.
            usage = (sink.usage_so_far() if sink is not None
                     else live.progress.usage() if live.progress is not None else None)
            self.finish(s, "cancelled", usage)
            return True
        try:
            await asyncio.wait_for(self.store.wait_terminal(s), wait_seconds)
        except asyncio.TimeoutError:
            self.finish(s, "cancelled", sink.usage_so_far())
        return True

    async def forget(self, s: Session) -> None:
        """DELETE: cancel `s` if it runs, then drop it and its events."""
        if not s.terminal:
            await self.cancel(s)
        self.live.pop(s.id, None)
        await self.store.delete(s.id)

    # --- several replicas (a shared log) -----------------------------------------------------

    def share(self, handle: Any, prepare_again: Any) -> None:
        """Join the replicas sharing the log: act on cancels requested anywhere, give up a
        session whose lease was lost, and take over sessions whose owner died."""
        log_ = self.store.event_log
        log_.on_cancel = self._cancel_requested
        log_.on_lease_lost = self._lease_lost
        self._takeover = self.loop.create_task(takeover_loop(self, handle, prepare_again))

    def unshare(self) -> None:
        task = getattr(self, "_takeover", None)
        if task is not None:
            task.cancel()

    def _cancel_requested(self, session_id: str) -> None:
        s = self.store.sessions.get(session_id)
        if s is not None and not s.remote and not s.terminal:
            self.loop.create_task(self.cancel(s))

    def _lease_lost(self, session_id: str) -> None:
        """Another replica owns the session now: stop generating it (what did not commit is
        dropped) and follow it from the log."""
        sink = self.sinks.pop(session_id, None)
        if sink is not None:
            sink.closed = True
        live = self.live.pop(session_id, None)
        if live is not None:
            live.cancel.set()
        s = self.store.sessions.get(session_id)
        if s is not None:
            log.warning("session %s: lease lost to another replica; following it from the log",
                        session_id)
            self.store.disown(s)
            formatters_for(self, [s])
            if live is not None:  # its clients stay attached
                self.live[session_id].attached = live.attached

    def suspend_all(self) -> None:
        """On shutdown, when generations continue at the next start: stop every running
        generation without an ending. What was committed stays; the sessions stay `queued` or
        `in_progress` in the log, and the next start continues them (`recover`), or with a
        shared log another replica once the leases, released at close, are free."""
        for sid, sink in list(self.sinks.items()):
            sink.closed = True
            self.live[sid].cancel.set()
        self.sinks.clear()

    def interrupt_all(self) -> None:
        """On shutdown: end every unfinished session as `interrupted`."""
        for s in list(self.store.sessions.values()):
            if not s.terminal and not s.remote:
                self.live[s.id].cancel.set()
                sink = self.sinks.get(s.id)
                try:
                    self.finish(s, "interrupted", sink.usage_so_far() if sink else None)
                except Exception:  # noqa: BLE001 - one session must not stop the shutdown
                    log.exception("session %s could not be ended at shutdown", s.id)


# ---------------------------------------------------------------------------------------------
# Startup and housekeeping
# ---------------------------------------------------------------------------------------------


def formatters_for(rt: Runtime, sessions: list[Session]) -> None:
    """Give each loaded session its formatter; a session of an unknown kind (a damaged or
    foreign row) is logged and ended `failed`, and the others are served."""
    for s in sessions:
        try:
            rt.live[s.id] = LiveSession(FORMATTERS[s.kind](s))
        except Exception:  # noqa: BLE001 - one bad stored session must not stop the server
            log.error("session %s has kind %r, which this server cannot serve: marked failed",
                      s.id, s.kind)
            rt.live[s.id] = LiveSession(None)
            if not s.terminal and not s.remote:
                rt.store.set_state(s, "failed")


@dataclass
class Progress:
    """Where a session's generation stood, read back from the `Event.meta` of its stored
    events (SessionSink): the engine's `Resume` and the prompt's size (None if no text event
    was stored)."""

    resume: Resume
    prompt_tokens: int | None = None

    @classmethod
    def of(cls, events: list[Event]) -> "Progress":
        r, prompt_tokens = Resume(), None
        for ev in events:
            if not ev.meta:
                continue
            try:
                m = json.loads(ev.meta)
                c, tokens = int(m["c"]), [int(x) for x in m.get("t", [])]
                if "f" in m:
                    r.done[c] = (str(m["f"]), int(m["n"]), int(m["r"]))
                if "s" in m:
                    r.seeds[c] = int(m["s"])
                if "p" in m:
                    prompt_tokens = int(m["p"])
                if "g" in m:
                    r.counted[c] = max(r.counted.get(c, 0), int(m["g"]))
                if m.get("x"):
                    r.parts.setdefault(c, []).extend((str(a), str(b)) for a, b in m["x"])
            except (ValueError, KeyError, TypeError):
                log.warning("event %d has unreadable meta %r; ignored", ev.index, ev.meta[:80])
                continue
            r.tokens.setdefault(c, []).extend(tokens)
        return cls(r, prompt_tokens)

    def usage(self) -> dict[str, Any] | None:
        """Usage of what was delivered (reasoning counted for finished choices only)."""
        if self.prompt_tokens is None:
            return None
        r = self.resume
        return usage_object(self.prompt_tokens, sum(r.completion_tokens().values()),
                            sum(d[2] for d in r.done.values()))


def why_not_continue(s: Session, model_name: str, now: float) -> str | None:
    """Why a session the last process left running cannot be continued, or None."""
    if not settings.continue_after_restart:
        return "CONTINUE_AFTER_RESTART is off"
    if now - s.created > settings.continue_max_age_seconds:
        return f"it is older than CONTINUE_MAX_AGE_SECONDS={settings.continue_max_age_seconds:g}"
    if model_name and s.model != model_name:  # (an upstream not yet asked has no name)
        return f"it ran on model {s.model!r}, not {model_name!r}"
    return None


async def recover(rt: Runtime, unfinished: list[Session], model_name: str
                  ) -> list[tuple[Session, Progress]]:
    """Sessions that were running when the server stopped: their formatters first see the
    stored events (so what they append continues them). Those the engine can continue
    (CONTINUE_AFTER_RESTART, younger than CONTINUE_MAX_AGE_SECONDS, same model) are returned
    with their progress for `continue_sessions`; the others end `interrupted` after their
    stored events, with the usage of what was delivered (docs/wire-contract.md, Sessions)."""
    now, resumable = time.time(), []
    for s in unfinished:
        try:
            events = await rt.store.read(s)
            for ev in events:
                rt.live[s.id].formatter.observe(ev.data)
            progress = Progress.of(events)
            why = why_not_continue(s, model_name, now)
            if why is None:
                log.info("session %s was %s when the server stopped: continuing it at event %d",
                         s.id, s.state, s.next_index)
                resumable.append((s, progress))
                rt.live[s.id].progress = progress
                rt.live[s.id].last_detached_at = time.monotonic()
                rt.arm_disconnect_timer(s)
                continue
            log.info("session %s was %s when the server stopped: interrupted (%s)",
                     s.id, s.state, why)
            rt.finish(s, "interrupted", progress.usage())
        except Exception:  # noqa: BLE001 - one damaged session must not stop the server
            log.exception("session %s could not be recovered; marked interrupted as is", s.id)
            rt.store.set_state(s, "interrupted", "interrupted")
    return resumable


async def continue_sessions(rt: Runtime, handle: Any, resumable: list[tuple[Session, Progress]],
                            prepare_again: Any) -> None:
    """Once the model is loaded, queue each recovered session's generation where it stopped:
    its prompt rebuilt from the stored request (and Session.inputs) by `prepare_again(s) ->
    Prepared` (raises APIError when its inputs are gone, e.g. a media URL that no longer
    answers), then
    prompt + delivered tokens re-prefilled by the engine. A session cancelled meanwhile, or
    whose inputs are gone, is left or ended `interrupted`."""
    while resumable and handle.state not in ("ready", "failed"):
        await asyncio.sleep(0.1)
    for s, progress in resumable:
        if s.terminal or s.deleted:
            continue
        try:
            if handle.state != "ready":
                raise RuntimeError("the model did not load")
            prepared = await prepare_again(s)
        except Exception as e:  # noqa: BLE001 - this session ends; the others go on
            log.info("session %s cannot continue (%s): interrupted", s.id,
                     getattr(e, "message", None) or f"{type(e).__name__}: {e}")
            rt.finish(s, "interrupted", progress.usage())
            continue
        if not s.terminal and not s.deleted and not s.remote:  # (lost to another replica)
            rt.start(s, prepared, progress.resume)


async def takeover_loop(rt: Runtime, handle: Any, prepare_again: Any) -> None:
    """Every LEASE_SECONDS / 2: claim the active sessions whose owner's lease ran out (the
    replica died or was cut off) and continue them here, as a restart does (`recover`); one
    cancelled meanwhile ends `cancelled`."""
    log_ = rt.store.event_log
    while True:
        await asyncio.sleep(max(0.5, settings.lease_seconds / 2))
        if handle.state != "ready":
            continue  # a replica that can generate should take them
        try:
            orphans = await log_.orphans()
        except Exception:  # noqa: BLE001 - Redis away: the next pass tries again
            log.warning("session takeover: cannot list orphaned sessions", exc_info=True)
            continue
        for sid in orphans:
            local = rt.store.sessions.get(sid)
            try:
                if not await log_.claim(sid):
                    continue  # another replica was quicker
                if local is not None and not local.remote:
                    continue  # ours, whose lease lapsed while Redis was away: keep running it
                await take_over(rt, handle, prepare_again, sid)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - this session fails; the others go on
                log.exception("session %s could not be taken over", sid)
                s = rt.store.sessions.get(sid)
                if s is not None and not s.remote and not s.terminal and sid in rt.live:
                    rt.fail(s, f"session {sid} could not be taken over from its replica")
                else:
                    log_.owned.discard(sid)


async def take_over(rt: Runtime, handle: Any, prepare_again: Any, sid: str) -> None:
    """Continue session `sid`, whose lease this replica just claimed, as a restart does."""
    log_ = rt.store.event_log
    row = await log_.load(sid)
    if row is None or row.fields["state"] not in ACTIVE_STATES:
        log_.owned.discard(sid)
        return
    old = rt.live.get(sid)
    s = rt.store.adopt(row)
    log.info("session %s: its replica's lease ran out; taken over", sid)
    if row.damaged or s.kind not in FORMATTERS:
        rt.live[sid] = LiveSession(None)
        rt.store.set_state(s, "failed")
        return
    rt.live[sid] = LiveSession(FORMATTERS[s.kind](s),
                               attached=old.attached if old is not None else 0)
    if await log_.cancel_requested(sid):
        events = await rt.store.read(s)
        for ev in events:
            rt.live[sid].formatter.observe(ev.data)
        rt.finish(s, "cancelled", Progress.of(events).usage())
        return
    resumable = await recover(rt, [s], handle.name)
    await continue_sessions(rt, handle, resumable, prepare_again)


async def sweep_loop(rt: Runtime) -> None:
    """Expire ended sessions past SESSIONS_TTL_SECONDS, and their run-time state with them."""
    period = min(60.0, max(1.0, settings.sessions_ttl_seconds / 4))
    while True:
        await asyncio.sleep(period)
        try:
            n = await rt.store.sweep()
            for sid in [sid for sid in rt.live if sid not in rt.store.sessions]:
                del rt.live[sid]
            if n:
                log.info("expired %d sessions", n)
        except Exception:  # noqa: BLE001 - the sweeper must outlive one bad pass
            log.exception("session sweep failed")
