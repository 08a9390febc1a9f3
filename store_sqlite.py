"""SQLite persistence behind the session store: one writer, group commit, a file that stays put.

`SQLiteEventLog` is the `EventLog` a `store.SessionStore` writes through when persistence is on.
Every session row and event goes into one SQLite file (WAL mode, through aiosqlite). One writer
task commits whatever has queued up in one transaction (group commit); only after the commit
does it mark the events visible (`Session.committed`), so a client that received event `i` can
never see it lost or changed by a crash (docs/wire-contract.md, Events).

Safety around the file: one server process per file (an OS lock on `<db>.lock`, StoreLocked); a
failed open releases what it took (StoreOpenError); an unreadable stored session is returned
as damaged instead of aborting startup; an event row is never overwritten; a failing disk shows
in `write_error` and `check_writable()` (StoreUnavailable -> HTTP 503); and a database file
removed while the server runs is put back from the still-open connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import suppress
from typing import Any

import aiosqlite
from filelock import FileLock, Timeout

from store import (ACTIVE_STATES, TERMINAL_STATES, Event, EventsGone, Session, SessionStore,
                   StoredRow, StoreLocked, StoreOpenError, StoreUnavailable, WriteQueue)

log = logging.getLogger("resumable.store")

SCHEMA_VERSION = 3  # 2: events.meta; 3: sessions.inputs

# ---------------------------------------------------------------------------------------------
# Schema and statements
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
    ended_at REAL,
    inputs TEXT
);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    event TEXT,
    data TEXT NOT NULL,
    meta TEXT,
    PRIMARY KEY (session_id, idx)
) WITHOUT ROWID;
"""

_UPSERT_SESSION = """
INSERT INTO sessions (id, kind, model, created, state, body_digest, request, finish_reason,
                      usage, ended_at, inputs)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET state=excluded.state, finish_reason=excluded.finish_reason,
                              usage=excluded.usage, ended_at=excluded.ended_at,
                              inputs=CASE WHEN excluded.ended_at IS NULL THEN inputs END
"""
# A repaired row (see _load) gets every column rewritten, so the next start reads it cleanly.
_REPAIR_SESSION = """
INSERT OR REPLACE INTO sessions (id, kind, model, created, state, body_digest, request,
                                 finish_reason, usage, ended_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# How many queued writes one transaction may take; bounds the latency one commit adds.
_MAX_GROUP = 512
# Page size for replaying evicted events from SQLite.
_REPLAY_PAGE = 256
# Seconds between checks that the database file is still the one opened.
_WATCH_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------


def session_store(db_path: str | None, ring_size: int, ttl_seconds: float, *,
                  lock_timeout_seconds: float = 0.0) -> SessionStore:
    """A SessionStore persisted to the SQLite file `db_path`, or in memory only if None."""
    return SessionStore(ring_size, ttl_seconds, None if db_path is None else
                        SQLiteEventLog(db_path, lock_timeout_seconds=lock_timeout_seconds))


class SQLiteEventLog(WriteQueue):
    """Sessions and events in one SQLite file, written by one group-committing task.

    Implements `store.EventLog`. `open()` and `close()` must run on the event loop that uses
    it. `lock_timeout_seconds` is how long `open()` waits for another process to let go of the
    database (a restart overlapping the old process's shutdown); 0 refuses at once.

    `write_error` is None while commits succeed, else why the last one failed (short, for
    humans); `check_writable()` turns it into StoreUnavailable.
    """

    def __init__(self, db_path: str, *, lock_timeout_seconds: float = 0.0):
        self.db_path = db_path
        self.lock_timeout_seconds = lock_timeout_seconds
        self._init_writes()
        self._db: aiosqlite.Connection | None = None
        self._db_open = False  # False between closing the old and opening the new file (_restore)
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._lock: FileLock | None = None
        self._writer: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self.commits = 0  # transactions committed; read by tests and the benchmark

    what = "session database"

    def _writing(self) -> bool:
        return self._db is not None and self._writes is not None

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> list[StoredRow]:
        """Lock and open the database; return every stored session row.

        Raises StoreLocked if another store holds the database (after `lock_timeout_seconds`),
        StoreOpenError if it cannot be opened or read; either way nothing stays open or locked.
        """
        self._writes = asyncio.Queue()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.db_path)), exist_ok=True)
            self._lock = await self._take_lock(self.lock_timeout_seconds)
            self._db = await self._connect()
            await self._db.executescript(_SCHEMA)
            await self._migrate()
            await self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            await self._db.commit()
            rows = await self._load()
        except BaseException as e:
            # aiosqlite's thread is not a daemon: left open, it keeps the process alive.
            await self._release()
            if isinstance(e, (sqlite3.Error, OSError)):
                raise StoreOpenError(f"cannot open session database {self.db_path}: {e} "
                                     f"({_open_hint(e)})") from e
            raise
        self._writer = asyncio.create_task(self._write_loop(_MAX_GROUP), name="session-store-writer")
        self._watcher = asyncio.create_task(self._watch(), name="session-store-watcher")
        return rows

    async def _migrate(self) -> None:
        """Bring a database of an older SCHEMA_VERSION up to date (columns only ever added)."""
        columns = {r[1] for r in await self._db.execute_fetchall("PRAGMA table_info(events)")}
        if "meta" not in columns:
            await self._db.execute("ALTER TABLE events ADD COLUMN meta TEXT")
        columns = {r[1] for r in await self._db.execute_fetchall("PRAGMA table_info(sessions)")}
        if "inputs" not in columns:
            await self._db.execute("ALTER TABLE sessions ADD COLUMN inputs TEXT")

    async def _take_lock(self, timeout: float) -> FileLock:
        """Lock `<db_path>.lock` for this store's life, waiting up to `timeout` seconds.

        Raises StoreLocked. The OS drops the lock when the process dies, kill -9 included.

        thread_local=False and one FileLock per store: flock() conflicts between two open
        files even in one process, so a second store here is refused too.
        """
        lock = FileLock(self.db_path + ".lock", thread_local=False)
        deadline = time.monotonic() + timeout
        while True:  # poll rather than block: a blocked thread could take the lock after we gave up
            try:
                lock.acquire(timeout=0)
                return lock
            except Timeout:
                if time.monotonic() >= deadline:
                    raise StoreLocked(
                        f"session database {self.db_path} is in use by another server process "
                        f"(lock {lock.lock_file} held); set SESSIONS_DB_PATH to another file or "
                        f"stop the other process") from None
            await asyncio.sleep(0.05)

    async def _connect(self) -> aiosqlite.Connection:
        """Open `db_path` as the writer connection and remember which file that is."""
        db = aiosqlite.connect(self.db_path)
        try:
            await db
            # WAL lets readers run beside the writer; synchronous=FULL makes each group commit
            # survive power loss too, and group commit keeps the fsync count low.
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            st = os.stat(self.db_path)
        except BaseException:
            await db.close()  # a no-op if connecting failed: aiosqlite then stops its thread
            # but does not wait for it; wait, so no thread outlives a failed open.
            if isinstance(getattr(db, "_thread", None), threading.Thread):
                await asyncio.to_thread(db._thread.join, 5)
            raise
        self._identity, self._db_open = (st.st_dev, st.st_ino), True
        return db

    async def _load(self) -> list[StoredRow]:
        """Every session row, parsed; a row with unreadable columns comes back `damaged`."""
        last = {
            sid: idx
            async for sid, idx in await self._db.execute(
                "SELECT session_id, MAX(idx) FROM events GROUP BY session_id"
            )
        }
        rows: list[StoredRow] = []
        for row in await self._db.execute_fetchall(
            "SELECT id, kind, model, created, state, body_digest, request, finish_reason, usage,"
            " ended_at, inputs FROM sessions"
        ):
            if not isinstance(row[0], str):
                log.error("session store %s: skipped a session row with id %r", self.db_path,
                          row[0])
                continue
            fields, problems = _parse_row(row[:10])
            inputs = _json(row[10]) if row[10] is not None else None
            if isinstance(inputs, dict) and fields["state"] in ACTIVE_STATES:
                fields["inputs"] = inputs
            if problems:
                # One bad row must not keep the server from starting: end it, keep its events.
                log.error("session %s in %s has unreadable columns (%s); loaded as failed",
                          row[0], self.db_path, ", ".join(problems))
            rows.append(StoredRow(fields, last.get(row[0], -1) + 1, bool(problems)))
        return rows

    async def close(self) -> None:
        """Commit what is queued, then close the database and release its lock."""
        if self._watcher is not None:
            self._watcher.cancel()
            with suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._writer is not None:
            try:
                await asyncio.wait_for(self.flush(), 15)
            except asyncio.TimeoutError:
                log.error("session store: writes still failing at shutdown; uncommitted events "
                          "are lost, as no client could have seen them")
            self._writer.cancel()
            with suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        await self._release()

    async def _release(self) -> None:
        """Close the connection and drop the lock, whatever state open() reached."""
        if self._db is not None:
            try:
                await self._db.close()
            except Exception:  # noqa: BLE001 - the lock must still be released
                log.exception("session store %s: closing the database failed", self.db_path)
            self._db, self._db_open = None, False
        if self._lock is not None:
            with suppress(Exception):
                self._lock.release(force=True)
            self._lock = None

    # --- sessions ----------------------------------------------------------------------------

    # --- what the store writes (queued; committed by the writer) ----------------------------

    def put_session(self, s: Session) -> None:
        """Insert or update the session row (state, finish_reason, usage, ended_at).

        Serializes at once: raises (TypeError/ValueError) on a request that is not JSON.
        """
        self._writes.put_nowait(_session_op(s))

    def repair(self, s: Session) -> None:
        """Rewrite every column of a damaged row, so the next start reads it cleanly."""
        self._writes.put_nowait(("repair", s, _session_op(s)[2][:10]))

    def put_events(self, s: Session, events: list[Event], with_session: bool = False) -> None:
        """Append `events` (and the session row if `with_session`) in one transaction."""
        ops = [("event", s, ev) for ev in events]
        if with_session:
            ops.append(_session_op(s))
        if len(ops) == 1:
            self._writes.put_nowait(ops[0])
        elif ops:
            self._writes.put_nowait(("group", ops))

    def delete(self, session_id: str) -> None:
        """Delete the session row and its events."""
        self._writes.put_nowait(("delete", session_id))

    # --- reading -----------------------------------------------------------------------------

    async def fetch(self, session_id: str, start: int, stop: int) -> list[Event]:
        """Committed events `start <= index < stop`, at most one page, in order.

        Raises EventsGone if none is stored."""
        async with self._db.execute(
            "SELECT idx, data, event, meta FROM events WHERE session_id=? AND idx>=? AND idx<?"
            " ORDER BY idx LIMIT ?", (session_id, start, stop, _REPLAY_PAGE)
        ) as cursor:
            rows = await cursor.fetchall()
        if not rows:
            raise EventsGone(session_id, start, stop)
        return [Event(r[0], r[1], r[2], r[3]) for r in rows]

    # --- the writer (group commit) -----------------------------------------------------------

    async def _insert_events(self, rows: list[tuple]) -> None:
        """Insert and clear `rows`; one executemany keeps it to one thread hop.

        An event, once stored, is what clients saw: a row already at (session_id, idx) is
        kept, never replaced, and the attempt logged as the bug it is.
        """
        if rows:
            cursor = await self._db.executemany(
                "INSERT OR IGNORE INTO events (session_id, idx, event, data, meta)"
                " VALUES (?, ?, ?, ?, ?)",
                rows)
            if cursor.rowcount != len(rows):
                log.error("session store %s: refused an attempt to overwrite %d existing events "
                          "(sessions %s); this is a bug: an event index was written twice",
                          self.db_path, len(rows) - cursor.rowcount,
                          ", ".join(sorted({r[0] for r in rows})[:5]))
            rows.clear()

    async def _commit(self, batch: list[tuple]) -> None:
        """Commit `batch` in one transaction, then make its events visible.

        A failed commit is retried (back-off up to 5 s) until it succeeds: events of an
        uncommitted batch never become visible, so streams stall on a broken disk rather than
        show a client events a crash could lose. Meanwhile `write_error` says why. Each attempt
        first checks that the database file is still there (else restores it: _restore).
        """
        batch = [inner for op in batch
                 for inner in (op[1] if op[0] == "group" else [op])]
        attempt = 0
        while True:
            try:
                if self._file_changed():
                    self._write_failed(self._removed_message(), None, len(batch))
                    await self._restore()
                rows: list[tuple] = []
                for op in batch:
                    if op[0] == "event":
                        rows.append((op[1].id, op[2].index, op[2].event, op[2].data, op[2].meta))
                        continue
                    await self._insert_events(rows)
                    if op[0] == "session":
                        await self._db.execute(_UPSERT_SESSION, op[2])
                    elif op[0] == "repair":
                        await self._db.execute(_REPAIR_SESSION, op[2])
                    elif op[0] == "delete":
                        await self._db.execute("DELETE FROM events WHERE session_id=?", (op[1],))
                        await self._db.execute("DELETE FROM sessions WHERE id=?", (op[1],))
                await self._insert_events(rows)
                await self._db.commit()
                self.commits += 1
                break
            except Exception as e:  # noqa: BLE001 - a write error must not kill the writer task
                attempt += 1
                self._write_failed(str(e) if isinstance(e, StoreUnavailable)
                                   else f"{type(e).__name__}: {e}", e, len(batch))
                with suppress(Exception):
                    await self._db.rollback()
                await asyncio.sleep(min(5.0, 0.2 * attempt))
        self._writes_succeed()
        upto: dict[int, tuple[Session, int]] = {}
        for op in batch:
            if op[0] == "event":
                s, ev = op[1], op[2]
                upto[id(s)] = (s, max(ev.index + 1, upto.get(id(s), (s, 0))[1]))
            elif op[0] == "flush" and not op[1].done():
                op[1].set_result(None)
        for s, visible in upto.values():
            s.committed(visible)

    # --- a database file removed while running -------------------------------------------------

    def _removed_message(self) -> str:
        return f"session database {self.db_path} was removed or replaced while the server ran"

    def _file_changed(self) -> bool:
        """True if `db_path` is gone or is not the file opened (a cheap stat)."""
        try:
            st = os.stat(self.db_path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False  # cannot tell; a failing commit will say more
        return (st.st_dev, st.st_ino) != self._identity

    async def _watch(self) -> None:
        """Notice a removed database while idle too; the writer does the restoring."""
        while True:
            await asyncio.sleep(_WATCH_SECONDS)
            if self._file_changed():
                self._write_failed(self._removed_message())
                if self._writes.empty():
                    self._writes.put_nowait(("check",))  # wakes an idle writer

    async def _restore(self) -> None:
        """Put the database back at `db_path` from the still-open connection, and reopen it.

        SQLite keeps writing to an unlinked file and everything would be lost at restart. Steps:
        re-take the lock, copy the open database (backup API) to `<db>.restoring`, close the old
        connection (before any new `-wal` exists: closing deletes `-wal`/`-shm` by name), move
        aside whatever now sits at the path, rename the copy into place, reopen. Raises
        StoreUnavailable if a step fails; calling it again resumes where it stopped.
        """
        path, tmp = self.db_path, self.db_path + ".restoring"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if self._db_open:
                if self._lock is not None:  # its file went away: it no longer keeps anyone out
                    with suppress(Exception):
                        self._lock.release(force=True)
                    self._lock = None
                self._lock = await self._take_lock(0)
                for stale in (tmp, tmp + "-journal"):
                    with suppress(FileNotFoundError):
                        os.unlink(stale)
                copy = await asyncio.to_thread(sqlite3.connect, tmp, check_same_thread=False)
                try:
                    await self._db.backup(copy)
                finally:
                    await asyncio.to_thread(copy.close)
                self._db_open = False
                await self._db.close()
            if os.path.exists(tmp):
                stamp = time.strftime("%Y%m%d-%H%M%S")
                for suffix in ("", "-wal", "-shm", "-journal"):
                    if os.path.lexists(path + suffix):
                        os.replace(path + suffix, f"{path}.replaced-{stamp}{suffix}")
                        log.warning("session store: moved %s aside to %s.replaced-%s%s",
                                    path + suffix, path, stamp, suffix)
                os.replace(tmp, path)
                _fsync_dir(path)
            elif not os.path.exists(path):
                raise RuntimeError("the restored copy disappeared too")
            self._db = await self._connect()
        except Exception as e:  # noqa: BLE001 - reported through write_error, retried
            raise StoreUnavailable(f"{self._removed_message()}; restoring it failed: "
                                   f"{type(e).__name__}: {e}") from e
        self.write_error = None
        log.warning("session store: restored %s from the open connection; "
                    "writes go to the new file", path)


def _session_op(s: Session) -> tuple:
    return ("session", s, (
            s.id, s.kind, s.model, s.created, s.state, s.body_digest,
            json.dumps(s.request, separators=(",", ":")), s.finish_reason,
            json.dumps(s.usage) if s.usage is not None else None, s.ended_at,
            json.dumps(s.inputs, separators=(",", ":")) if s.inputs is not None else None))

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _parse_row(row: tuple) -> tuple[dict[str, Any], list[str]]:
    """Session fields from a `sessions` row, and its unreadable columns (empty if none).

    An unreadable value is replaced (request {}, text "", ...) so that the session can still
    be loaded; the caller then marks it failed.
    """
    sid, kind, model, created, state, digest, request, reason, usage, ended = row
    problems: list[str] = []

    def ok(good: bool, column: str, raw: Any) -> bool:
        if not good:
            problems.append(f"{column} {raw!r:.80}")
        return good

    def text(value: Any) -> bool:
        return isinstance(value, str)

    def number(value: Any) -> bool:
        return isinstance(value, (int, float))

    req, use = _json(request), _json(usage)
    fields = dict(
        id=sid, kind=kind if ok(text(kind), "kind", kind) else "",
        model=model if ok(text(model), "model", model) else "",
        created=created if ok(number(created), "created", created) else time.time(),
        state=state if ok(state in ACTIVE_STATES | TERMINAL_STATES, "state", state) else "failed",
        body_digest=digest if ok(text(digest), "body_digest", digest) else "",
        request=req if ok(isinstance(req, dict), "request", request) else {},
        finish_reason=reason if ok(reason is None or text(reason), "finish_reason", reason)
        else None,
        usage=use if ok(usage is None or isinstance(use, dict), "usage", usage) else None,
        # a terminal session needs ended_at, or the TTL never expires it
        ended_at=ended if ok(number(ended) or ended is None and state not in TERMINAL_STATES,
                             "ended_at", ended) else None)
    return fields, problems


def _json(text: Any) -> Any:
    """The JSON value in `text`, or None if it is not JSON text."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def _open_hint(e: BaseException) -> str:
    """What an operator can do about an error opening the database."""
    text = str(e).lower()
    if "full" in text or getattr(e, "errno", None) == 28:  # ENOSPC
        return "the disk is full: free space, or set SESSIONS_DB_PATH to another disk"
    if any(w in text for w in ("not a database", "malformed", "corrupt", "no such")):
        return ("the file is damaged or not this server's session database: move it aside (an "
                "empty one is then created) or set SESSIONS_DB_PATH to another file")
    return ("check that this user can create, read and write the file and its directory, "
            "or set SESSIONS_DB_PATH to another file")


def _fsync_dir(path: str) -> None:
    """Make a rename in `path`'s directory durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
