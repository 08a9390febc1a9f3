"""The session store: an append-only event log per session, in memory, behind an `EventLog`.

Each session keeps its last `ring_size` events in memory (a ring buffer). With an `EventLog`
(store_sqlite.SQLiteEventLog; a Redis one later) every session and event is also written
there, and an event becomes *visible* to readers only once the log committed it
(`Session.committed`), so a client that received event `i` can never see it lost or changed by
a crash (docs/wire-contract.md, Events). Without one, events are visible at once and those
evicted from the ring are gone (410).

Everything here runs on the asyncio event loop; other threads hand work to it with
`loop.call_soon_threadsafe`. Nothing in this module knows the OpenAI wire format or SQL: an
event is an opaque `data` string plus an optional SSE `event` name, numbered from 0 without gaps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, NamedTuple, Protocol

log = logging.getLogger("resumable.store")

# ---------------------------------------------------------------------------------------------
# Session states and records
# ---------------------------------------------------------------------------------------------

# How long a reader of a remote session waits in the log before looking at its state again.
_REMOTE_POLL_SECONDS = 1.0

ACTIVE_STATES = frozenset({"queued", "in_progress"})
TERMINAL_STATES = frozenset({"completed", "cancelled", "failed", "interrupted"})

class EventsGone(Exception):
    """Events a reader asked for can no longer be served (evicted from memory, not persisted).

    Maps to HTTP 410. `first_available` is the lowest index still readable.
    """

    def __init__(self, session_id: str, wanted: int, first_available: int):
        self.session_id = session_id
        self.wanted = wanted
        self.first_available = first_available
        super().__init__(
            f"events {session_id}:{wanted}..{first_available - 1} are no longer available "
            f"(only the last events are kept in memory and persistence is off); "
            f"the earliest that can be replayed is {session_id}:{first_available}"
        )


class StoreLocked(RuntimeError):
    """Another process (or another store in this process) is using the database file."""


class StoreOpenError(RuntimeError):
    """The database could not be opened or read; the message names the file and what to do."""


class StoreUnavailable(RuntimeError):
    """Writes are not committing; the message is the reason. Maps to HTTP 503."""


@dataclass(frozen=True)
class Event:
    """One log entry: SSE `id` is `f"{session_id}:{index}"`, `data` the SSE data field verbatim.

    `meta` is never sent: what the runtime needs to continue the generation after a crash
    (the token ids that produced this event; runtime.Progress), persisted with the event.
    """

    index: int
    data: str
    event: str | None = None
    meta: str | None = None


@dataclass(eq=False)
class Session:
    """A generation's record and its live event log.

    `next_index` counts events appended; `visible` counts those durable and readable (always
    `visible <= next_index`). `ring` holds events `ring_start .. next_index-1`. Only what is
    persisted, plus the ring and visibility: run-time state (formatter, cancel flag, attached
    clients) lives in the runtime, keyed by session id, so another store can share records.
    """

    id: str
    kind: str
    model: str
    created: float
    body_digest: str
    request: dict[str, Any]
    state: str = "queued"
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    ended_at: float | None = None
    # The request with its inline media, kept (and persisted) only while the session runs, so a
    # generation continued after a crash can rebuild its prompt; None once ended, or when the
    # stored `request` has everything (media by URL only).
    inputs: dict[str, Any] | None = None
    next_index: int = 0
    visible: int = 0
    ring: deque = field(default_factory=deque)
    deleted: bool = False
    # Another replica generates it (a shared log): its fields and events are read from the
    # log, refreshed on each look (SessionStore.lookup, events, wait_terminal).
    remote: bool = False
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def ring_start(self) -> int:
        return self.next_index - len(self.ring)

    @property
    def last_event_index(self) -> int | None:
        return self.visible - 1 if self.visible else None

    def wake(self) -> None:
        """Wake every reader waiting for news of this session."""
        self._wake.set()
        self._wake = asyncio.Event()

    def committed(self, visible: int) -> None:
        """The event log committed events below `visible`: make them readable, wake readers."""
        if visible > self.visible:
            self.visible = visible
        self.wake()


class StoredRow(NamedTuple):
    """A session as an `EventLog` read it back: `Session` fields, its event count, and whether
    some column was unreadable (`fields` then holds replacements and the store fails it)."""

    fields: dict[str, Any]
    next_index: int
    damaged: bool


class EventLog(Protocol):
    """Durable storage behind a SessionStore (store_sqlite.SQLiteEventLog).

    Writes are queued and committed in order; after committing events the log calls
    `Session.committed(index + 1)`. `write_error` is None while commits succeed, else the
    reason they fail; `check_writable()` raises StoreUnavailable then.
    """

    write_error: str | None
    db_path: str

    async def open(self) -> list[StoredRow]: ...
    async def close(self) -> None: ...
    async def flush(self) -> None: ...
    async def check_writable(self, timeout: float) -> None: ...
    def put_session(self, s: Session) -> None: ...
    def repair(self, s: Session) -> None: ...
    def put_events(self, s: Session, events: list[Event], with_session: bool = False) -> None: ...
    def delete(self, session_id: str) -> None: ...
    async def fetch(self, session_id: str, start: int, stop: int) -> list[Event]: ...


class SharedEventLog(EventLog, Protocol):
    """An EventLog several server replicas share (store_redis.RedisEventLog; `shared` is
    True). Sessions are loaded on demand; one replica owns (generates) each session through a
    lease; the others follow its events and pass cancels on."""

    shared: bool
    owned: set[str]
    on_lease_lost: Any  # (session_id) -> None, set by the runtime
    on_cancel: Any  # (session_id) -> None, set by the runtime

    async def load(self, session_id: str) -> StoredRow | None: ...
    async def wait(self, session_id: str, after: int, timeout: float) -> None: ...
    async def request_cancel(self, session_id: str) -> bool: ...
    async def cancel_requested(self, session_id: str) -> bool: ...
    async def orphans(self) -> list[str]: ...
    async def claim(self, session_id: str) -> bool: ...


class WriteQueue:
    """What both event logs share about their writes: they are queued (`_writes`, an
    asyncio.Queue made at open) and one writer task commits them, resolving each
    ("flush", future) op after the commit that follows it; a failed commit calls
    `_write_failed`. Subclasses set `db_path`, `what` (how the log names itself in
    messages) and `_writing()` (whether the log is open for writes)."""

    what = "event log"
    db_path: str

    def _init_writes(self) -> None:
        self.write_error: str | None = None
        self._writes: asyncio.Queue | None = None
        self._fail_waiters: set[asyncio.Future] = set()  # check_writable() calls waiting
        self._failing_since, self._reported = 0.0, set()  # this failure streak's, for the logs

    def _writing(self) -> bool:
        raise NotImplementedError

    async def _commit(self, batch: list[tuple]) -> None:
        raise NotImplementedError

    async def _write_loop(self, max_group: int = 512) -> None:
        """The writer task: commit whatever queued up, at most `max_group` writes at a time
        (bounds the latency one commit adds), in order."""
        while True:
            batch = [await self._writes.get()]
            while len(batch) < max_group and not self._writes.empty():
                batch.append(self._writes.get_nowait())
            await self._commit(batch)

    async def flush(self) -> None:
        """Return once every write queued before this call has committed."""
        if not self._writing():
            return
        done = asyncio.get_running_loop().create_future()
        self._writes.put_nowait(("flush", done))
        await done

    async def check_writable(self, timeout: float) -> None:
        """Return once every write queued before this call committed.

        Raises StoreUnavailable (message: the reason) at once if commits are failing or as soon
        as a commit attempt fails, or when `timeout` seconds pass first. The server calls it
        after creating a session and before generating, to answer 503 rather than stall.
        """
        if not self._writing():
            return
        if self.write_error is not None:
            raise StoreUnavailable(self.write_error)
        loop = asyncio.get_running_loop()
        done, failed = loop.create_future(), loop.create_future()
        self._fail_waiters.add(failed)
        self._writes.put_nowait(("flush", done))
        try:
            await asyncio.wait((done, failed), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._fail_waiters.discard(failed)
        if done.done():
            return
        raise StoreUnavailable(failed.result() if failed.done() else
                               f"{self.what} {self.db_path}: writes did not commit "
                               f"within {timeout:g} s")

    def _write_failed(self, reason: str, exc: BaseException | None = None,
                      writes: int = 0) -> None:
        """Record a failed commit: set `write_error`, fail waiting check_writable calls.
        Logged at ERROR once per reason and failure streak, not on every retry."""
        if self.write_error is None:
            self._failing_since, self._reported = time.monotonic(), set()
        if reason not in self._reported:
            self._reported.add(reason)
            log.error("%s %s: %s; %d writes stay invisible and new sessions are refused until "
                      "a retry succeeds", self.what, self.db_path, reason, writes, exc_info=exc)
        self.write_error = reason
        for waiter in self._fail_waiters:
            if not waiter.done():
                waiter.set_result(reason)

    def _writes_succeed(self) -> None:
        """A commit succeeded: clear `write_error` (and say so if commits were failing)."""
        if self.write_error is not None:
            log.warning("%s %s: commits succeed again after %.1f s of failures", self.what,
                        self.db_path, time.monotonic() - self._failing_since)
            self.write_error = None


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class SessionStore:
    """Sessions by id, their event logs, expiry; persistence through an optional `EventLog`.

    `event_log=None` keeps everything in memory. Call `open()` before use and `close()` after;
    both must run on the event loop that uses the store.
    """

    def __init__(self, ring_size: int, ttl_seconds: float, event_log: EventLog | None = None):
        self.ring_size = ring_size
        self.ttl_seconds = ttl_seconds
        self.event_log = event_log
        self.sessions: dict[str, Session] = {}
        # Set once the server stops serving streams (shutdown.py): readers end after the
        # events there are instead of waiting for more.
        self.stopping = False

    @property
    def shared(self) -> bool:
        """Whether other replicas write to the same log (sessions may be remote)."""
        return bool(getattr(self.event_log, "shared", False))

    @property
    def db_path(self) -> str | None:
        return self.event_log.db_path if self.event_log is not None else None

    @property
    def write_error(self) -> str | None:
        """None while the event log commits (or there is none), else why it does not."""
        return self.event_log.write_error if self.event_log is not None else None

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> list[Session]:
        """Open the event log and load every stored session.

        Returns the sessions that were `queued` or `in_progress` when the server last stopped:
        the caller decides how to end them (normally: state `interrupted` plus terminal events).
        A damaged stored session is loaded as `failed` (and rewritten so). Raises what the
        log's open raises (StoreLocked, StoreOpenError).
        """
        if self.event_log is None:
            return []
        unfinished, now = [], time.time()
        for row in await self.event_log.open():
            fields = dict(row.fields)
            if row.damaged:
                fields.update(state="failed", ended_at=now)  # the TTL then expires it
            s = Session(**fields, next_index=row.next_index, visible=row.next_index,
                        ring=deque(maxlen=self.ring_size))
            self.sessions[s.id] = s
            if row.damaged:
                self.event_log.repair(s)
            elif s.state in ACTIVE_STATES:
                unfinished.append(s)
        log.info("session store %s: %d sessions loaded, %d unfinished",
                 self.db_path, len(self.sessions), len(unfinished))
        return unfinished

    async def close(self) -> None:
        """Commit what is queued and close the event log."""
        if self.event_log is not None:
            await self.event_log.close()

    def stop_readers(self) -> None:
        """End every reader: each `events()` returns once it has yielded what is visible, and
        `wait_terminal()` returns, whether or not the session ended (the caller tells its clients
        that the server stops). Used at shutdown, after the last events were committed."""
        self.stopping = True
        for s in list(self.sessions.values()):
            s.wake()

    async def flush(self) -> None:
        """Return once every write queued before this call has committed."""
        if self.event_log is not None:
            await self.event_log.flush()

    async def check_writable(self, timeout: float) -> None:
        """Return once every write queued before this call committed (at once in memory).

        Raises StoreUnavailable (message: the reason) at once if commits are failing or as soon
        as a commit attempt fails, or when `timeout` seconds pass first. The server calls it
        after creating a session and before generating, to answer 503 rather than stall.
        """
        if self.event_log is not None:
            await self.event_log.check_writable(timeout)

    # --- sessions ----------------------------------------------------------------------------

    def get(self, session_id: str, now: float | None = None) -> Session | None:
        """The live session with this id, or None if unknown, deleted or expired."""
        s = self.sessions.get(session_id)
        if s is None or self._expired(s, time.time() if now is None else now):
            return None
        return s

    async def lookup(self, session_id: str) -> Session | None:
        """`get`, and with a shared log the session as the log has it now: one this replica
        does not own is loaded (`remote`) or refreshed; None if the log no longer has it."""
        s = self.get(session_id)
        if not self.shared or (s is not None and not s.remote):
            return s
        row = await self.event_log.load(session_id)
        if row is None:
            if s is not None:
                self.sessions.pop(session_id, None)
                s.deleted = True
                s.wake()
            return None
        if s is None:
            s = self.sessions[session_id] = Session(
                **row.fields, next_index=row.next_index, visible=row.next_index,
                ring=deque(maxlen=self.ring_size), remote=True)
        else:
            self.refresh(s, row)
        return self.get(session_id)

    def refresh(self, s: Session, row: StoredRow) -> None:
        """Take a remote session's fields and event count from the log's row."""
        for name in ("state", "finish_reason", "usage", "ended_at"):
            setattr(s, name, row.fields[name])
        if row.next_index > s.next_index:
            s.next_index = row.next_index
            s.committed(row.next_index)

    def adopt(self, row: StoredRow) -> Session:
        """A session this replica took over (its lease claimed): local from now on, its
        stored events read from the log (the ring starts empty)."""
        s = self.sessions.get(row.fields["id"])
        if s is None:
            s = self.sessions[row.fields["id"]] = Session(
                **row.fields, next_index=row.next_index, visible=row.next_index,
                ring=deque(maxlen=self.ring_size))
        else:
            self.refresh(s, row)
            s.ring.clear()
        s.remote = False
        return s

    def disown(self, s: Session) -> None:
        """This replica lost `s` to another (lease lost): follow it from the log from now on.
        Its uncommitted events are dropped (never visible); the ring keeps what committed."""
        s.remote = True
        for _ in range(min(len(s.ring), s.next_index - s.visible)):
            s.ring.pop()
        s.next_index = s.visible
        s.wake()

    def create(self, session_id: str, kind: str, model: str, body_digest: str,
               request: dict[str, Any], inputs: dict[str, Any] | None = None) -> Session:
        """Register a new `queued` session (`inputs`: see Session.inputs). Raises KeyError if
        a live session has the id (an expired one not yet swept is dropped first: its id is
        free again)."""
        taken = self.sessions.get(session_id)
        if taken is not None:
            if not self._expired(taken, time.time()):
                raise KeyError(session_id)
            self._drop(session_id)
        s = Session(id=session_id, kind=kind, model=model, created=time.time(),
                    body_digest=body_digest, request=request, inputs=inputs,
                    ring=deque(maxlen=self.ring_size))
        # Written before it is registered: a request that cannot be stored (raises) must
        # not leave a session behind that no writer ever persisted.
        if self.event_log is not None:
            self.event_log.put_session(s)
        self.sessions[session_id] = s
        return s

    def set_state(self, s: Session, state: str, finish_reason: str | None = None,
                  usage: dict[str, Any] | None = None) -> None:
        """Move a session to `state`; a terminal state also stamps `ended_at`.

        Call it after appending the terminal events: readers stop once the session is terminal
        and they have read every event.
        """
        self._set_fields(s, state, finish_reason, usage)
        if self.event_log is not None:
            self.event_log.put_session(s)
        s.wake()

    def _set_fields(self, s: Session, state: str, finish_reason: str | None,
                    usage: dict[str, Any] | None) -> None:
        s.state = state
        if finish_reason is not None:
            s.finish_reason = finish_reason
        if usage is not None:
            s.usage = usage
        if state in TERMINAL_STATES:
            s.ended_at = time.time()
            s.inputs = None  # the log drops its copy with the same write

    def append(self, s: Session, data: str, event: str | None = None) -> int:
        """Append one event to the session's log and return its index.

        The event is readable once committed (at once without an event log).
        """
        idx = s.next_index
        self.append_many(s, [(data, event)])
        return idx

    def append_many(self, s: Session, items: list[tuple[str, str | None]],
                    state: str | None = None, finish_reason: str | None = None,
                    usage: dict[str, Any] | None = None, meta: str | None = None) -> None:
        """Append (data, event) items, and optionally move to `state`, in one transaction.

        What one engine callback produces (an item opened with its part, or the terminal events
        with the terminal state) is committed together, so a crash never splits it. `meta`
        goes with the last item (`Event.meta`).
        """
        events = []
        for k, (data, event) in enumerate(items):
            ev = Event(s.next_index, data, event, meta if k == len(items) - 1 else None)
            s.ring.append(ev)
            s.next_index += 1
            events.append(ev)
        if state is not None:
            self._set_fields(s, state, finish_reason, usage)
        if self.event_log is None:
            s.committed(s.next_index)
        else:
            self.event_log.put_events(s, events, with_session=state is not None)

    async def delete(self, session_id: str) -> bool:
        """Forget a session and its events. Returns False if it was not known."""
        return self._drop(session_id)

    def _drop(self, session_id: str) -> bool:
        s = self.sessions.pop(session_id, None)
        if s is None:
            return False
        s.deleted = True
        s.wake()
        if self.event_log is not None:
            self.event_log.delete(session_id)
        return True

    async def sweep(self, now: float | None = None) -> int:
        """Delete every session whose TTL ran out; returns how many."""
        now = time.time() if now is None else now
        expired = [sid for sid, s in self.sessions.items() if self._expired(s, now)]
        for sid in expired:
            await self.delete(sid)
        return len(expired)

    def _expired(self, s: Session, now: float) -> bool:
        return s.ended_at is not None and s.ended_at + self.ttl_seconds <= now

    # --- reading -----------------------------------------------------------------------------

    def check_available(self, s: Session, after: int) -> None:
        """Raise EventsGone if events after `after` can no longer all be replayed."""
        wanted = after + 1
        if self.event_log is None and wanted < s.ring_start:
            raise EventsGone(s.id, wanted, s.ring_start)

    async def read(self, s: Session) -> list[Event]:
        """Every event readable now, without waiting for more."""
        return [ev async for ev in self.events(s, -1, follow=False)]

    async def events(self, s: Session, after: int = -1, follow: bool = True) -> AsyncIterator[Event]:
        """Yield the session's events with index > `after`, then (if `follow`) live ones.

        Ends after the last event of a terminal session, or when the session is deleted; with
        `follow=False`, or once `stop_readers()` was called, after the visible events. Raises EventsGone if the reader falls
        behind the ring with persistence off.
        """
        i = after + 1
        while True:
            if s.remote:
                # Another replica writes it: read what the log has, wait there for more.
                async for ev in self._remote_events(s, i):
                    i = ev.index + 1
                    yield ev
                if (s.deleted or (s.terminal and i >= s.next_index) or not follow
                        or self.stopping):
                    return
                if s.remote:
                    await self.event_log.wait(s.id, i - 1, _REMOTE_POLL_SECONDS)
                    await self.lookup(s.id)
                continue
            wake = s._wake
            while i < s.visible and not s.deleted:
                if i >= s.ring_start:
                    ev = s.ring[i - s.ring_start]
                    i += 1
                    yield ev
                    continue
                if self.event_log is None:
                    raise EventsGone(s.id, i, s.ring_start)
                upto = min(s.ring_start, s.visible)
                for ev in await self.event_log.fetch(s.id, i, upto):
                    if ev.index != i:
                        raise EventsGone(s.id, i, ev.index)
                    i += 1
                    yield ev
            if (s.deleted or (s.terminal and i >= s.next_index) or not follow
                    or (self.stopping and i >= s.visible)):
                return
            if s.remote:
                continue  # disowned while waiting
            await wake.wait()

    async def _remote_events(self, s: Session, i: int) -> AsyncIterator[Event]:
        """Events `i..` the log has now of a remote session."""
        await self.lookup(s.id)
        while i < s.next_index and not s.deleted:
            for ev in await self.event_log.fetch(s.id, i, s.next_index):
                if ev.index != i:
                    raise EventsGone(s.id, i, ev.index)
                i += 1
                yield ev

    async def wait_terminal(self, s: Session) -> None:
        """Return once `s` is terminal with every event visible, or deleted, or the store
        stops its readers."""
        while not (s.terminal and s.visible >= s.next_index) and not s.deleted:
            if self.stopping:
                return
            if s.remote:
                await self.event_log.wait(s.id, s.next_index - 1, _REMOTE_POLL_SECONDS)
                await self.lookup(s.id)
                continue
            wake = s._wake
            await wake.wait()
