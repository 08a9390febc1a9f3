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
                 CANCEL_AFTER_DISCONNECT_SECONDS="1", SSE_PING_SECONDS="0.2").start()
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
                                json={**LONG, "max_tokens": 60, "stream": True})
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


def test_keepalive_pings_do_not_break_the_openai_sdk(mem_server):
    # The SDK dispatches an empty event at any blank line once an id was seen; pings must be
    # single-line comments so that long streams (here: many pings) parse cleanly.
    import openai
    client = openai.OpenAI(base_url=mem_server.url + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=60,
        stream=True, extra_body={"ignore_eos": True}))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 30
    events = list(client.responses.create(model="m", input="Tell me a story.",
                                          max_output_tokens=40, stream=True,
                                          extra_body={"ignore_eos": True}))
    assert events[-1].type == "response.incomplete"
    with httpx.stream("POST", mem_server.url + "/v1/chat/completions", json={
            **LONG, "max_tokens": 40, "stream": True}) as r:
        raw = r.read()
    assert b": ping" in raw and b": ping\n\n" not in raw and raw.endswith(b"data: [DONE]\n\n")


def test_non_stream_results_longer_than_the_ring(mem_server):
    # The ring holds 8 events; these answers have ~30: the object comes from the live fold.
    with httpx.Client(base_url=mem_server.url, timeout=60) as http:
        chat = http.post("/v1/chat/completions", json={**LONG, "max_tokens": 30})
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] == 30
        assert len(chat.json()["choices"][0]["message"]["content"]) > 30
        comp = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 30,
                                                  "ignore_eos": True})
        assert comp.status_code == 200 and len(comp.json()["choices"][0]["text"]) > 30
        resp = http.post("/v1/responses", json={"input": "Tell me a story.",
                                                "max_output_tokens": 30, "ignore_eos": True})
        assert resp.status_code == 200 and resp.json()["usage"]["output_tokens"] == 30
        rid = resp.json()["id"]
        assert http.get(f"/v1/responses/{rid}").json()["output"][0]["content"][0]["text"]
