"""Unit tests of the session store on a real SQLite file (no model, no server)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from store import EventsGone, SessionStore, StoreLocked, StoreOpenError, StoreUnavailable
from store_sqlite import session_store

ROOT = Path(__file__).resolve().parent.parent

# Another server process: opens the store at argv[1], runs SETUP, says "ready", holds the
# store for argv[2] seconds, closes it.
HOLDER = """
import asyncio, sys
from store_sqlite import session_store

async def main():
    store = session_store(sys.argv[1], 16, 3600)
    await store.open()
    SETUP
    await store.flush()
    print("ready", flush=True)
    await asyncio.sleep(float(sys.argv[2]))
    await store.close()

asyncio.run(main())
"""


def run(coro):
    return asyncio.run(coro)


def spawn(db, hold: float, setup: str = "pass") -> subprocess.Popen:
    """Start a HOLDER process on `db` and return once it has the store open."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER.replace("SETUP", setup), str(db), str(hold)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        pytest.fail(f"holder process failed: {proc.stderr.read()}")
    return proc


async def eventually(condition, seconds: float = 10.0) -> None:
    """Wait until `condition()` is true; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def sqlite_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "_connection_worker_thread" in t.name]


async def opened(path, ring=1024, ttl=3600.0) -> SessionStore:
    store = session_store(str(path) if path else None, ring, ttl)
    await store.open()
    return store


async def collect(store, s, after=-1):
    return [(ev.index, ev.data) async for ev in store.events(s, after)]


def finish(store, s):
    store.append(s, "[DONE]")
    store.set_state(s, "completed", "stop", {"prompt_tokens": 1, "completion_tokens": 1})


def test_events_are_ordered_and_survive_reopen(tmp_path):
    db = tmp_path / "s.db"

    async def first():
        store = await opened(db)
        s = store.create("a", "chat.completion", "m", "digest", {"x": 1})
        for i in range(100):
            store.append(s, f"e{i}", event="delta" if i % 2 else None)
        finish(store, s)
        assert await collect(store, s) == [(i, f"e{i}") for i in range(100)] + [(100, "[DONE]")]
        await store.close()

    async def second():
        store = await opened(db)
        s = store.get("a")
        assert s.state == "completed" and s.next_index == 101 and len(s.ring) == 0
        assert s.request == {"x": 1} and s.usage["prompt_tokens"] == 1
        evs = [ev async for ev in store.events(s, 49)]
        assert [ev.index for ev in evs] == list(range(50, 101))
        assert evs[0].event is None and evs[1].event == "delta"
        await store.close()

    run(first())
    run(second())


def test_event_is_durable_before_it_is_visible(tmp_path):
    db = tmp_path / "s.db"

    async def go():
        store = await opened(db)
        s = store.create("a", "k", "m", "d", {})
        store.append(s, "hello")
        # Appended but not yet committed: no reader may see it.
        assert s.next_index == 1 and s.visible == 0
        reader = asyncio.create_task(collect(store, s))
        await asyncio.sleep(0)
        while s.visible == 0:
            await asyncio.sleep(0.001)
        # Once visible, another connection finds it on disk.
        rows = sqlite3.connect(db).execute("SELECT idx, data FROM events").fetchall()
        assert rows == [(0, "hello")]
        finish(store, s)
        assert await reader == [(0, "hello"), (1, "[DONE]")]
        await store.close()

    run(go())


def test_group_commit_batches_many_events_per_transaction(tmp_path):
    async def go():
        store = await opened(tmp_path / "s.db")
        s = store.create("a", "k", "m", "d", {})
        await store.flush()
        before = store.event_log.commits
        for i in range(1000):
            store.append(s, str(i))
        await store.flush()
        # 1000 events in a handful of transactions, not 1000.
        assert store.event_log.commits - before <= 1000 // 256 + 2
        assert s.visible == 1000
        await store.close()

    run(go())


def test_unfinished_sessions_are_reported_on_open(tmp_path):
    db = tmp_path / "s.db"
    # A server process that is killed (-9): only what was committed is there.
    proc = spawn(db, 60, setup="""
    s = store.create("running", "k", "m", "d", {})
    store.set_state(s, "in_progress")
    store.append(s, "partial")
    store.create("waiting", "k", "m", "d", {})
    done = store.create("done", "k", "m", "d", {})
    store.append(done, "[DONE]")
    store.set_state(done, "completed", "stop")""")
    proc.kill()
    proc.wait()

    async def reopen():
        store = session_store(str(db), 16, 3600)
        unfinished = sorted(s.id for s in await store.open())
        assert unfinished == ["running", "waiting"]
        assert store.get("running").next_index == 1
        assert store.get("done").state == "completed"
        await store.close()

    run(reopen())


def test_ttl_sweep_deletes_from_memory_and_disk(tmp_path):
    db = tmp_path / "s.db"

    async def go():
        store = await opened(db, ttl=10)
        old = store.create("old", "k", "m", "d", {})
        finish(store, old)
        live = store.create("live", "k", "m", "d", {})
        store.append(live, "x")
        ended = old.ended_at
        assert store.get("old", now=ended + 9) is old
        assert store.get("old", now=ended + 10) is None
        assert await store.sweep(now=ended + 11) == 1
        await store.flush()
        assert store.get("live") is live and "old" not in store.sessions
        con = sqlite3.connect(db)
        assert con.execute("SELECT id FROM sessions").fetchall() == [("live",)]
        assert con.execute("SELECT session_id FROM events").fetchall() == [("live",)]
        await store.close()

    run(go())


def test_memory_only_eviction_is_410(tmp_path):
    async def go():
        store = await opened(None, ring=4)
        s = store.create("a", "k", "m", "d", {})
        for i in range(10):
            store.append(s, str(i))
        finish(store, s)
        assert s.ring_start == 7
        with pytest.raises(EventsGone) as e:
            store.check_available(s, after=2)
        assert e.value.first_available == 7 and "a:7" in str(e.value)
        store.check_available(s, after=6)
        assert await collect(store, s, after=6) == [(7, "7"), (8, "8"), (9, "9"), (10, "[DONE]")]
        with pytest.raises(EventsGone):
            await collect(store, s, after=0)

    run(go())


def test_persisted_events_older_than_the_ring_come_from_sqlite(tmp_path):
    async def go():
        store = await opened(tmp_path / "s.db", ring=4)
        s = store.create("a", "k", "m", "d", {})
        for i in range(600):
            store.append(s, str(i))
        finish(store, s)
        store.check_available(s, after=0)
        got = await collect(store, s, after=-1)
        assert got == [(i, str(i)) for i in range(600)] + [(600, "[DONE]")]
        await store.close()

    run(go())


def test_live_reader_follows_until_terminal_and_delete_ends_it(tmp_path):
    async def go():
        store = await opened(tmp_path / "s.db")
        s = store.create("a", "k", "m", "d", {})
        reader = asyncio.create_task(collect(store, s))
        for i in range(5):
            store.append(s, str(i))
            await asyncio.sleep(0.01)
        finish(store, s)
        assert [i for i, _ in await reader] == list(range(6))

        t = store.create("b", "k", "m", "d", {})
        store.append(t, "x")
        reader = asyncio.create_task(collect(store, t))
        await asyncio.sleep(0.05)
        assert await store.delete("b") is True
        assert await asyncio.wait_for(reader, 5) == [(0, "x")]
        assert store.get("b") is None and await store.delete("b") is False
        await store.close()

    run(go())


def test_create_refuses_a_taken_id(tmp_path):
    async def go():
        store = await opened(None)
        store.create("a", "k", "m", "d", {})
        with pytest.raises(KeyError):
            store.create("a", "k", "m", "d", {})

    run(go())


def test_failed_commit_never_makes_events_visible(tmp_path):
    async def go():
        store = await opened(tmp_path / "s.db")
        s = store.create("a", "k", "m", "d", {})
        await store.flush()
        real_commit, failures = store.event_log._db.commit, []

        async def flaky_commit():
            if len(failures) < 6:  # the disk "fails" six times, then recovers
                failures.append(1)
                raise OSError("disk full")
            await real_commit()

        store.event_log._db.commit = flaky_commit
        store.append(s, "e0")
        store.append(s, "e1")
        while len(failures) < 6:
            await asyncio.sleep(0.01)
            assert s.visible == 0  # never visible while uncommitted
        await store.flush()
        assert s.visible == 2
        rows = sqlite3.connect(tmp_path / "s.db").execute(
            "SELECT idx, data FROM events ORDER BY idx").fetchall()
        assert rows == [(0, "e0"), (1, "e1")]
        await store.close()

    run(go())


def test_an_expired_id_can_be_used_again_before_the_sweep(tmp_path):
    async def go():
        store = await opened(tmp_path / "s.db", ttl=0.05)
        old = store.create("a", "k", "m", "d1", {})
        finish(store, old)
        await asyncio.sleep(0.1)  # expired, not swept
        new = store.create("a", "k", "m", "d2", {})
        assert store.get("a") is new and new.next_index == 0
        store.append(new, "fresh")
        await store.flush()
        rows = sqlite3.connect(tmp_path / "s.db").execute("SELECT data FROM events").fetchall()
        assert rows == [("fresh",)]
        await store.close()

    run(go())


def test_a_group_and_its_state_commit_together(tmp_path):
    async def go():
        store = await opened(tmp_path / "s.db")
        s = store.create("a", "k", "m", "d", {})
        await store.flush()
        batches, real = [], store.event_log._commit

        async def recording(batch):
            batches.append([op for op in batch])
            await real(batch)

        store.event_log._commit = recording
        for i in range(511):  # fill the writer's queue right up to its group limit
            store.append(s, str(i))
        store.append_many(s, [("end-1", None), ("end-2", None), ("[DONE]", None)],
                          "completed", "stop", {"prompt_tokens": 1})
        await store.flush()
        with_group = [b for b in batches if any(op[0] == "group" for op in b)]
        assert len(with_group) == 1  # the whole group sits in one transaction
        assert s.state == "completed" and s.visible == 514
        row = sqlite3.connect(tmp_path / "s.db").execute("SELECT state FROM sessions").fetchone()
        assert row == ("completed",)
        await store.close()

    run(go())


# --- one writer per database -----------------------------------------------------------------


def test_a_second_server_process_is_refused_until_the_first_is_killed(tmp_path):
    db = tmp_path / "s.db"
    proc = spawn(db, 60)
    try:
        async def refused():
            with pytest.raises(StoreLocked) as e:
                await opened(db)
            assert str(db) in str(e.value) and "SESSIONS_DB_PATH" in str(e.value)
            assert "another server process" in str(e.value)

        run(refused())
        proc.kill()  # the OS drops a dead process's lock
        proc.wait()

        async def accepted():
            await (await opened(db)).close()

        run(accepted())
    finally:
        proc.kill()


def test_a_second_store_in_the_same_process_is_refused(tmp_path):
    db = tmp_path / "s.db"

    async def go():
        first = await opened(db)
        with pytest.raises(StoreLocked):
            await opened(db)
        assert len(sqlite_threads()) == 1  # the refused store opened nothing
        await first.close()  # close() releases the lock
        await (await opened(db)).close()
        await opened(None)  # memory mode takes no lock
        await opened(None)

    run(go())


def test_open_waits_up_to_lock_timeout_for_a_stopping_server(tmp_path):
    db = tmp_path / "s.db"
    proc = spawn(db, 1.0)  # a server shutting down, 1 s from releasing the database
    try:
        async def go():
            start = time.monotonic()
            store = session_store(str(db), 16, 3600, lock_timeout_seconds=30)
            await store.open()
            assert 0.3 < time.monotonic() - start < 30
            await store.close()

        run(go())
    finally:
        proc.kill()


# --- failed open ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "directory", "another app's database"])
def test_a_database_that_cannot_be_opened_fails_cleanly(tmp_path, damage):
    db = tmp_path / "s.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database " * 500)
    elif damage == "directory":
        db.mkdir()
    else:  # valid SQLite, wrong tables: fails after the connection is open
        sqlite3.connect(db).execute("CREATE TABLE sessions (user TEXT, token TEXT)").close()

    store = session_store(str(db), 16, 3600)  # kept alive: its __del__ would hide a leak

    async def go():
        with pytest.raises(StoreOpenError) as e:
            await store.open()
        assert str(e.value).startswith(f"cannot open session database {db}: ")
        assert "SESSIONS_DB_PATH" in str(e.value)

    run(go())
    # Nothing left behind: no aiosqlite thread (not a daemon: it would keep the process
    # alive), and the lock is free.
    deadline = time.monotonic() + 2
    while sqlite_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sqlite_threads() == []
    lock = FileLock(str(db) + ".lock", thread_local=False)
    lock.acquire(timeout=0)
    lock.release()


# --- unreadable stored sessions ---------------------------------------------------------------


def test_unreadable_session_rows_are_loaded_as_failed(tmp_path, caplog):
    db = tmp_path / "s.db"
    con = sqlite3.connect(db)
    # An older or hand-edited schema without NOT NULL, so NULLs can be stored too.
    con.executescript("""
        CREATE TABLE sessions (id TEXT PRIMARY KEY, kind TEXT, model TEXT, created REAL,
            state TEXT, body_digest TEXT, request TEXT, finish_reason TEXT, usage TEXT,
            ended_at REAL);
        CREATE TABLE events (session_id TEXT NOT NULL, idx INTEGER NOT NULL, event TEXT,
            data TEXT NOT NULL, PRIMARY KEY (session_id, idx)) WITHOUT ROWID;
    """)
    now = time.time()  # ended sessions must not have expired by the TTL
    con.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
        ("good", "k", "m", now, "completed", "d", '{"a": 1}', "stop", '{"t": 1}', now),
        ("badjson", "k", "m", now, "completed", "d", "{not json", None, None, now),
        ("notdict", "k", "m", now, "in_progress", "d", "[1, 2]", None, None, None),
        ("badusage", "k", "m", now, "completed", "d", '{"b": 2}', "stop", "{oops", now),
        ("nulls", None, None, None, None, None, None, None, None, None),
        ("badstate", "k", "m", now, "exploded", "d", "{}", None, None, None),
    ])
    con.executemany("INSERT INTO events VALUES (?, ?, NULL, ?)",
                    [("good", 0, "g0"), ("good", 1, "g1"), ("badjson", 0, "b0")])
    con.commit()
    con.close()
    bad = ["badjson", "notdict", "badusage", "nulls", "badstate"]

    async def first():
        store = session_store(str(db), 16, 3600)
        before = time.time()
        assert await store.open() == []
        good = store.get("good")
        assert (good.state, good.request, good.usage, good.next_index) == (
            "completed", {"a": 1}, {"t": 1}, 2)
        for sid in bad:
            s = store.get(sid)
            assert s.state == "failed" and s.terminal and s.ended_at >= before
        assert store.get("badusage").request == {"b": 2}
        assert store.get("notdict").request == {} and store.get("nulls").kind == ""
        assert await collect(store, store.get("badjson")) == [(0, "b0")]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        for sid in bad:
            assert any(f"session {sid} " in m for m in errors), sid
        await store.flush()
        rows = dict(sqlite3.connect(db).execute("SELECT id, state FROM sessions").fetchall())
        assert rows == {"good": "completed", **{sid: "failed" for sid in bad}}
        ended = {sid: store.get(sid).ended_at for sid in bad}
        await store.close()
        return ended

    async def second(ended):
        caplog.clear()
        store = await opened(db)
        # Repaired on disk: read cleanly now, and the TTL runs from the first repair.
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert {sid: store.get(sid).ended_at for sid in bad} == ended
        await store.close()

    with caplog.at_level(logging.INFO, logger="resumable.store"):
        run(second(run(first())))


# --- events are never overwritten -------------------------------------------------------------


def test_stored_events_are_never_overwritten(tmp_path, caplog):
    db = tmp_path / "s.db"

    async def go():
        store = await opened(db)
        s = store.create("a", "k", "m", "d", {})
        await store.flush()
        other = sqlite3.connect(db)  # an event 0 that is already stored
        other.execute("INSERT INTO events (session_id, idx, event, data) VALUES ('a', 0, NULL, 'original')")
        other.commit()
        store.append(s, "new")
        store.append(s, "next")
        await asyncio.wait_for(store.flush(), 5)  # committed, not retried forever
        rows = other.execute("SELECT idx, data FROM events ORDER BY idx").fetchall()
        assert rows == [(0, "original"), (1, "next")]
        assert s.visible == 2 and store.write_error is None
        assert any(r.levelno == logging.ERROR and "refused an attempt to overwrite 1" in
                   r.getMessage() for r in caplog.records)
        other.close()
        await store.close()

    run(go())


# --- write health -----------------------------------------------------------------------------


def test_a_full_disk_is_reported_and_recovers(tmp_path, caplog):
    db = tmp_path / "s.db"

    async def go():
        store = await opened(db)
        s = store.create("a", "k", "m", "d", {})
        await store.check_writable(5)
        assert store.write_error is None
        # Cap the file at its current size: the next insert fails as on a full disk.
        pages = (await store.event_log._db.execute_fetchall("PRAGMA page_count"))[0][0]
        await store.event_log._db.execute(f"PRAGMA max_page_count={pages}")
        store.append(s, "x" * 50_000)
        with pytest.raises(StoreUnavailable) as e:
            await store.check_writable(30)  # raises at the first failed attempt
        assert str(e.value) == store.write_error == "OperationalError: database or disk is full"
        with pytest.raises(StoreUnavailable):
            await store.check_writable(30)
        await asyncio.sleep(0.8)  # a few retries: still invisible, still one ERROR
        assert s.visible == 0
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "full" in errors[0].getMessage()

        await store.event_log._db.execute("PRAGMA max_page_count=1073741823")  # space again
        await asyncio.wait_for(store.flush(), 10)
        assert store.write_error is None and s.visible == 1
        await store.check_writable(5)
        assert any(r.levelno == logging.WARNING and "succeed again" in r.getMessage()
                   for r in caplog.records)
        rows = sqlite3.connect(db).execute("SELECT length(data) FROM events").fetchall()
        assert rows == [(50_000,)]
        await store.close()

    run(go())


def test_check_writable_times_out_while_commits_hang(tmp_path):
    db = tmp_path / "s.db"

    async def go():
        await (await opened(None)).check_writable(0)  # memory mode: at once
        store = await opened(db)
        s = store.create("a", "k", "m", "d", {})
        await store.flush()
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock: commits wait
        store.append(s, "x")
        with pytest.raises(StoreUnavailable, match="did not commit within 0.3 s"):
            await store.check_writable(0.3)
        other.execute("ROLLBACK")
        other.close()
        await asyncio.wait_for(store.flush(), 15)
        assert s.visible == 1
        await store.close()

    run(go())


# --- a database removed while running ---------------------------------------------------------


def test_a_removed_database_is_restored(tmp_path, caplog):
    data = tmp_path / "data"
    db = data / "s.db"

    def stored(session_id):
        con = sqlite3.connect(db)
        try:
            return [r[0] for r in con.execute(
                "SELECT data FROM events WHERE session_id=? ORDER BY idx", (session_id,))]
        finally:
            con.close()

    async def go():
        store = await opened(db)
        s = store.create("a", "k", "m", "d", {})
        for i in range(100):
            store.append(s, str(i))
        finish(store, store.create("b", "k", "m", "d", {}))
        await store.flush()
        shutil.rmtree(data)  # `rm -r data/` under a running server
        await eventually(lambda: any(
            r.levelno == logging.ERROR and f"session database {db} was removed" in r.getMessage()
            for r in caplog.records))
        await eventually(lambda: db.exists() and store.write_error is None)
        assert any("restored" in r.getMessage() for r in caplog.records)
        assert stored("a") == [str(i) for i in range(100)] and stored("b") == ["[DONE]"]
        store.append(s, "after")  # new writes land in the new file
        await store.flush()
        assert stored("a")[-1] == "after"
        with pytest.raises(StoreLocked):  # and the lock was taken again
            await opened(db)
        await store.close()

        store = await opened(db)
        assert [ev.data for ev in await store.read(store.get("a"))] == [
            str(i) for i in range(100)] + ["after"]
        assert store.get("b").state == "completed"
        await store.close()

    with caplog.at_level(logging.INFO, logger="resumable.store"):
        run(go())


def test_a_failed_restore_keeps_the_error_and_is_retried(tmp_path):
    data = tmp_path / "data"
    db = data / "s.db"

    async def go():
        store = await opened(db)
        s = store.create("a", "k", "m", "d", {})
        store.append(s, "before")
        await store.flush()
        shutil.rmtree(data)
        data.write_text("a file where the directory was")  # the directory cannot come back
        await eventually(lambda: "restoring it failed" in (store.write_error or ""))
        with pytest.raises(StoreUnavailable, match="was removed or replaced"):
            await store.check_writable(5)
        store.append(s, "during")
        await asyncio.sleep(0.5)
        assert s.visible == 1  # not committed anywhere durable: not visible
        data.unlink()
        await eventually(lambda: store.write_error is None and s.visible == 2, 20)
        await store.close()
        store = await opened(db)
        assert [ev.data for ev in await store.read(store.get("a"))] == ["before", "during"]
        await store.close()

    run(go())
