"""A memory-only server (PERSIST_SESSIONS=0) with a tiny ring and a 1 s disconnect timer."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import LONG, finish_reason_of, read_events


@pytest.fixture(scope="module")
def mem_server(tmp_path_factory):
    from conftest import Server
    srv = Server(tmp_path_factory.mktemp("mem"), PERSIST_SESSIONS="0", RING_BUFFER_SIZE="8",
                 CANCEL_AFTER_DISCONNECT_SECONDS="1").start()
    yield srv
    srv.stop()


def test_cancel_after_disconnect(mem_server):
    s = "gone-client"
    with httpx.Client(base_url=mem_server.url, timeout=60) as http:
        _, first = read_events(http, "POST", "/v1/chat/completions", limit=2,
                               json={**LONG, "max_tokens": 2000, "stream": True, "session_id": s})
        # The connection is closed here; generation goes on for about 1 s, then is cancelled.
        deadline = time.monotonic() + 30
        while http.get(f"/v1/sessions/{s}").json()["state"] == "in_progress":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        info = http.get(f"/v1/sessions/{s}").json()
        assert info["state"] == "cancelled" and info["finish_reason"] == "cancelled"
        assert info["usage"]["completion_tokens"] < 2000


def test_attached_client_keeps_the_session_alive(mem_server):
    with httpx.Client(base_url=mem_server.url, timeout=60) as http:
        # Reads for longer than the 1 s timer while attached: never cancelled.
        _, events = read_events(http, "POST", "/v1/chat/completions",
                                json={**LONG, "max_tokens": 150, "stream": True})
        assert finish_reason_of(events) == "length"


def test_evicted_events_are_410_and_recent_ones_replay(mem_server):
    s = "evicted"
    with httpx.Client(base_url=mem_server.url, timeout=60) as http:
        _, events = read_events(http, "POST", "/v1/chat/completions",
                                json={**LONG, "max_tokens": 30, "stream": True, "session_id": s})
        n = len(events)
        assert n > 8
        r = http.get(f"/v1/sessions/{s}/stream", headers={"Last-Event-ID": f"{s}:0"})
        assert r.status_code == 410
        err = r.json()["error"]
        assert err["code"] == "events_gone" and f"{s}:{n - 8}" in err["message"]
        _, tail = read_events(http, "GET", f"/v1/sessions/{s}/stream",
                              headers={"Last-Event-ID": f"{s}:{n - 9}"})
        assert tail == events[n - 8:]
