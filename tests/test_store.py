"""Unit tests of the session store on a real SQLite file (no model, no server)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from store import EventsGone, SessionStore


def run(coro):
    return asyncio.run(coro)


async def opened(path, ring=1024, ttl=3600.0) -> SessionStore:
    store = SessionStore(str(path) if path else None, ring, ttl)
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
        before = store.commits
        for i in range(1000):
            store.append(s, str(i))
        await store.flush()
        # 1000 events in a handful of transactions, not 1000.
        assert store.commits - before <= 1000 // 256 + 2
        assert s.visible == 1000
        await store.close()

    run(go())


def test_unfinished_sessions_are_reported_on_open(tmp_path):
    db = tmp_path / "s.db"

    async def crash():
        store = await opened(db)
        s = store.create("running", "k", "m", "d", {})
        store.set_state(s, "in_progress")
        store.append(s, "partial")
        store.create("waiting", "k", "m", "d", {})
        done = store.create("done", "k", "m", "d", {})
        finish(store, done)
        await store.flush()
        # No close(): as after kill -9, only what was committed is there.

    async def reopen():
        store = SessionStore(str(db), 16, 3600)
        unfinished = sorted(s.id for s in await store.open())
        assert unfinished == ["running", "waiting"]
        assert store.get("running").next_index == 1
        assert store.get("done").state == "completed"
        await store.close()

    run(crash())
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
        real_commit, failures = store._db.commit, []

        async def flaky_commit():
            if len(failures) < 6:  # the disk "fails" six times, then recovers
                failures.append(1)
                raise OSError("disk full")
            await real_commit()

        store._db.commit = flaky_commit
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
        batches, real = [], store._commit

        async def recording(batch):
            batches.append([op for op in batch])
            await real(batch)

        store._commit = recording
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
