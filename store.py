"""The session store: an append-only event log per session, in memory and in SQLite.

Each session keeps its last `ring_size` events in memory (a ring buffer) and, when a database
path is given, every event in SQLite (WAL mode, through aiosqlite). Writes go through one
writer task that commits whatever has queued up in one transaction (group commit); an event
becomes *visible* to readers only after the transaction holding it committed, so a client that
received event `i` can never see it lost or changed by a crash (../shared/CONTRACT.md, Events).
Without a database, events are visible at once and those evicted from the ring are gone (410).

Everything here runs on the asyncio event loop; other threads hand work to it with
`loop.call_soon_threadsafe`. Nothing in this module knows the OpenAI wire format: an event is
an opaque `data` string plus an optional SSE `event` name, numbered from 0 without gaps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiosqlite

log = logging.getLogger("resumable.store")

# ---------------------------------------------------------------------------------------------
# Session states and records
# ---------------------------------------------------------------------------------------------

ACTIVE_STATES = frozenset({"queued", "in_progress"})
TERMINAL_STATES = frozenset({"completed", "cancelled", "failed", "interrupted"})
SCHEMA_VERSION = 1


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


@dataclass(frozen=True)
class Event:
    """One log entry: SSE `id` is `f"{session_id}:{index}"`, `data` the SSE data field verbatim."""

    index: int
    data: str
    event: str | None = None


@dataclass(eq=False)
class Session:
    """A generation's record and its live event log.

    `next_index` counts events appended; `visible` counts those durable and readable (always
    `visible <= next_index`). `ring` holds events `ring_start .. next_index-1`.
    `cancel_event` is a threading.Event because the engine thread polls it between tokens.
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
    next_index: int = 0
    visible: int = 0
    ring: deque = field(default_factory=deque)
    attached: int = 0
    last_detached_at: float | None = None
    deleted: bool = False
    cancel_event: threading.Event = field(default_factory=threading.Event)
    # API-specific event builder, set by the server (main.py); the store never calls it.
    formatter: Any = None
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


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL,
    body_digest TEXT NOT NULL,
    request TEXT NOT NULL,
    finish_reason TEXT,
    usage TEXT,
    ended_at REAL
);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    event TEXT,
    data TEXT NOT NULL,
    PRIMARY KEY (session_id, idx)
) WITHOUT ROWID;
"""

_UPSERT_SESSION = """
INSERT INTO sessions (id, kind, model, created, state, body_digest, request, finish_reason,
                      usage, ended_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET state=excluded.state, finish_reason=excluded.finish_reason,
                              usage=excluded.usage, ended_at=excluded.ended_at
"""

# How many queued writes one transaction may take; bounds the latency one commit adds.
_MAX_GROUP = 512
# Page size for replaying evicted events from SQLite.
_REPLAY_PAGE = 256


class SessionStore:
    """Sessions by id, their event logs, persistence and expiry.

    `db_path=None` keeps everything in memory. Call `open()` before use and `close()` after;
    both must run on the event loop that uses the store.
    """

    def __init__(self, db_path: str | None, ring_size: int, ttl_seconds: float):
        self.db_path = db_path
        self.ring_size = ring_size
        self.ttl_seconds = ttl_seconds
        self.sessions: dict[str, Session] = {}
        self._db: aiosqlite.Connection | None = None
        self._writes: asyncio.Queue | None = None
        self._writer: asyncio.Task | None = None
        self.commits = 0  # transactions committed; read by tests and the benchmark

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> list[Session]:
        """Open the database and load every stored session.

        Returns the sessions that were `queued` or `in_progress` when the server last stopped:
        the caller decides how to end them (normally: state `interrupted` plus terminal events).
        """
        self._writes = asyncio.Queue()
        if self.db_path is None:
            return []
        os.makedirs(os.path.dirname(os.path.abspath(self.db_path)), exist_ok=True)
        self._db = await aiosqlite.connect(self.db_path)
        # WAL lets readers run beside the writer; synchronous=FULL makes each group commit
        # survive power loss too, and group commit keeps the fsync count low.
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=FULL")
        await self._db.executescript(_SCHEMA)
        await self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        await self._db.commit()
        last = {
            sid: idx
            async for sid, idx in await self._db.execute(
                "SELECT session_id, MAX(idx) FROM events GROUP BY session_id"
            )
        }
        unfinished = []
        async with self._db.execute(
            "SELECT id, kind, model, created, state, body_digest, request, finish_reason, usage,"
            " ended_at FROM sessions"
        ) as cursor:
            async for row in cursor:
                n = last.get(row[0], -1) + 1
                s = Session(
                    id=row[0], kind=row[1], model=row[2], created=row[3], state=row[4],
                    body_digest=row[5], request=json.loads(row[6]), finish_reason=row[7],
                    usage=json.loads(row[8]) if row[8] else None, ended_at=row[9],
                    next_index=n, visible=n, ring=deque(maxlen=self.ring_size),
                )
                self.sessions[s.id] = s
                if s.state in ACTIVE_STATES:
                    unfinished.append(s)
        self._writer = asyncio.create_task(self._write_loop(), name="session-store-writer")
        log.info("session store %s: %d sessions loaded, %d unfinished",
                 self.db_path, len(self.sessions), len(unfinished))
        return unfinished

    async def close(self) -> None:
        """Commit what is queued, then close the database."""
        if self._writer is not None:
            try:
                await asyncio.wait_for(self.flush(), 15)
            except asyncio.TimeoutError:
                log.error("session store: writes still failing at shutdown; uncommitted events "
                          "are lost, as no client could have seen them")
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
            self._writer = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def flush(self) -> None:
        """Return once every write queued before this call has committed."""
        if self._db is None or self._writes is None:
            return
        done = asyncio.get_running_loop().create_future()
        self._writes.put_nowait(("flush", done))
        await done

    # --- sessions ----------------------------------------------------------------------------

    def get(self, session_id: str, now: float | None = None) -> Session | None:
        """The live session with this id, or None if unknown, deleted or expired."""
        s = self.sessions.get(session_id)
        if s is None or self._expired(s, time.time() if now is None else now):
            return None
        return s

    def create(self, session_id: str, kind: str, model: str, body_digest: str,
               request: dict[str, Any]) -> Session:
        """Register a new `queued` session. Raises KeyError if a live session has the id
        (an expired one not yet swept is dropped first: its id is free again)."""
        taken = self.sessions.get(session_id)
        if taken is not None:
            if not self._expired(taken, time.time()):
                raise KeyError(session_id)
            self._drop(session_id)
        s = Session(id=session_id, kind=kind, model=model, created=time.time(),
                    body_digest=body_digest, request=request,
                    ring=deque(maxlen=self.ring_size))
        self.sessions[session_id] = s
        self._write_session(s)
        return s

    def set_state(self, s: Session, state: str, finish_reason: str | None = None,
                  usage: dict[str, Any] | None = None) -> None:
        """Move a session to `state`; a terminal state also stamps `ended_at`.

        Call it after appending the terminal events: readers stop once the session is terminal
        and they have read every event.
        """
        self._set_fields(s, state, finish_reason, usage)
        self._write_session(s)
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

    def append(self, s: Session, data: str, event: str | None = None) -> int:
        """Append one event to the session's log and return its index.

        The event is readable once committed (at once without a database).
        """
        idx = s.next_index
        ev = Event(idx, data, event)
        s.ring.append(ev)
        s.next_index += 1
        if self._db is None:
            s.visible = s.next_index
            s.wake()
        else:
            self._writes.put_nowait(("event", s, ev))
        return idx

    def append_many(self, s: Session, items: list[tuple[str, str | None]],
                    state: str | None = None, finish_reason: str | None = None,
                    usage: dict[str, Any] | None = None) -> None:
        """Append (data, event) items, and optionally move to `state`, in one transaction.

        What one engine callback produces (an item opened with its part, or the terminal events
        with the terminal state) is committed together, so a crash never splits it.
        """
        ops = []
        for data, event in items:
            ev = Event(s.next_index, data, event)
            s.ring.append(ev)
            s.next_index += 1
            ops.append(("event", s, ev))
        if state is not None:
            self._set_fields(s, state, finish_reason, usage)
            ops.append(self._session_op(s))
        if self._db is None:
            s.visible = s.next_index
            s.wake()
        elif ops:
            self._writes.put_nowait(("group", ops))

    async def delete(self, session_id: str) -> bool:
        """Forget a session and its events. Returns False if it was not known."""
        return self._drop(session_id)

    def _drop(self, session_id: str) -> bool:
        s = self.sessions.pop(session_id, None)
        if s is None:
            return False
        s.deleted = True
        s.wake()
        if self._db is not None:
            self._writes.put_nowait(("delete", session_id))
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
        if self._db is None and wanted < s.ring_start:
            raise EventsGone(s.id, wanted, s.ring_start)

    async def read(self, s: Session) -> list[Event]:
        """Every event readable now, without waiting for more."""
        return [ev async for ev in self.events(s, -1, follow=False)]

    async def events(self, s: Session, after: int = -1, follow: bool = True) -> AsyncIterator[Event]:
        """Yield the session's events with index > `after`, then (if `follow`) live ones.

        Ends after the last event of a terminal session, or when the session is deleted; with
        `follow=False`, once the visible events are read. Raises EventsGone if the reader falls
        behind the ring with persistence off.
        """
        i = after + 1
        while True:
            wake = s._wake
            while i < s.visible and not s.deleted:
                if i >= s.ring_start:
                    ev = s.ring[i - s.ring_start]
                    i += 1
                    yield ev
                    continue
                if self._db is None:
                    raise EventsGone(s.id, i, s.ring_start)
                upto = min(s.ring_start, s.visible)
                for ev in await self._fetch(s.id, i, upto):
                    if ev.index != i:
                        raise EventsGone(s.id, i, ev.index)
                    i += 1
                    yield ev
            if s.deleted or (s.terminal and i >= s.next_index) or not follow:
                return
            await wake.wait()

    async def _fetch(self, session_id: str, start: int, stop: int) -> list[Event]:
        async with self._db.execute(
            "SELECT idx, data, event FROM events WHERE session_id=? AND idx>=? AND idx<?"
            " ORDER BY idx LIMIT ?", (session_id, start, stop, _REPLAY_PAGE)
        ) as cursor:
            rows = await cursor.fetchall()
        if not rows:
            raise EventsGone(session_id, start, stop)
        return [Event(r[0], r[1], r[2]) for r in rows]

    # --- the writer (group commit) -----------------------------------------------------------

    def _write_session(self, s: Session) -> None:
        if self._db is not None:
            self._writes.put_nowait(self._session_op(s))

    def _session_op(self, s: Session) -> tuple:
        return ("session", s, (
                s.id, s.kind, s.model, s.created, s.state, s.body_digest,
                json.dumps(s.request, separators=(",", ":")), s.finish_reason,
                json.dumps(s.usage) if s.usage is not None else None, s.ended_at))

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._writes.get()]
            while len(batch) < _MAX_GROUP and not self._writes.empty():
                batch.append(self._writes.get_nowait())
            await self._commit(batch)

    async def _insert_events(self, rows: list[tuple]) -> None:
        """Insert and clear `rows`; one executemany keeps it to one thread hop."""
        if rows:
            await self._db.executemany(
                "INSERT OR REPLACE INTO events (session_id, idx, event, data) VALUES (?, ?, ?, ?)",
                rows)
            rows.clear()

    async def _commit(self, batch: list[tuple]) -> None:
        """Commit `batch` in one transaction, then make its events visible.

        A failed commit is retried (back-off up to 5 s) until it succeeds: events of an
        uncommitted batch never become visible, so streams stall on a broken disk rather than
        show a client events a crash could lose.
        """
        batch = [inner for op in batch
                 for inner in (op[1] if op[0] == "group" else [op])]
        attempt = 0
        while True:
            try:
                rows: list[tuple] = []
                for op in batch:
                    if op[0] == "event":
                        rows.append((op[1].id, op[2].index, op[2].event, op[2].data))
                        continue
                    await self._insert_events(rows)
                    if op[0] == "session":
                        await self._db.execute(_UPSERT_SESSION, op[2])
                    elif op[0] == "delete":
                        await self._db.execute("DELETE FROM events WHERE session_id=?", (op[1],))
                        await self._db.execute("DELETE FROM sessions WHERE id=?", (op[1],))
                await self._insert_events(rows)
                await self._db.commit()
                self.commits += 1
                break
            except Exception:  # noqa: BLE001 - a write error must not kill the writer task
                attempt += 1
                log.exception("session store commit failed (attempt %d); its %d writes stay "
                              "invisible until a retry succeeds", attempt, len(batch))
                try:
                    await self._db.rollback()
                except Exception:  # noqa: BLE001
                    pass
                await asyncio.sleep(min(5.0, 0.2 * attempt))
        touched: dict[int, Session] = {}
        for op in batch:
            if op[0] == "event":
                s, ev = op[1], op[2]
                if ev.index + 1 > s.visible:
                    s.visible = ev.index + 1
                touched[id(s)] = s
            elif op[0] == "flush" and not op[1].done():
                op[1].set_result(None)
        for s in touched.values():
            s.wake()
