"""Crash and restart: kill -9 a real server mid-stream, start it again on the same database."""

from __future__ import annotations

import httpx

import pytest

from conftest import LONG, Server, finish_reason_of, read_events


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """One server for the module: each test kills or stops it and starts it again on the same
    database (a start costs about 20 s, most of it loading the model)."""
    server = Server(tmp_path_factory.mktemp("restart")).start()
    yield server
    server.stop()


def test_kill_9_mid_stream_then_resume(srv):
    s = "crash-1"
    body = {**LONG, "stream": True, "session_id": s}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        r, seen = read_events(http, "POST", "/v1/chat/completions", limit=15, json=body)
        assert len(seen) == 15
        srv.kill()
    srv.start()  # same database file
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        info = http.get(f"/v1/sessions/{s}").json()
        assert info["state"] == "interrupted" and info["finish_reason"] == "interrupted"
        # Every event the client had received comes back identical ...
        _, replay = read_events(http, "GET", f"/v1/sessions/{s}/stream")
        assert replay[:15] == seen
        # ... then the rest up to the interruption, then `interrupted` and [DONE], no gaps.
        assert [e["id"] for e in replay] == [f"{s}:{i}" for i in range(len(replay))]
        assert finish_reason_of(replay) == "interrupted"
        assert replay[-1]["data"] == "[DONE]"
        assert len(replay) < 300  # the generation did not go on after the crash
        # Resuming from the last event the client saw gives exactly the tail.
        _, tail = read_events(http, "POST", "/v1/chat/completions", json=body,
                              headers={"Last-Event-ID": seen[-1]["id"]})
        assert seen + tail == replay
        # The replay is the same bytes every time it is asked for.
        _, tail4 = read_events(http, "GET", f"/v1/sessions/{s}/stream",
                               headers={"Last-Event-ID": f"{s}:4"})
        assert tail4 == replay[5:]
        # The restarted server generates again normally.
        r = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 20})
        assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_graceful_stop_mid_stream_interrupts(srv):
    s = "graceful-1"
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        _, seen = read_events(http, "POST", "/v1/chat/completions", limit=5,
                              json={**LONG, "stream": True, "session_id": s})
    srv.stop()  # SIGTERM: shutdown hooks run
    srv.start()
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        _, replay = read_events(http, "GET", f"/v1/sessions/{s}/stream")
        assert replay[:5] == seen
        assert finish_reason_of(replay) == "interrupted" and replay[-1]["data"] == "[DONE]"
        usage = http.get(f"/v1/sessions/{s}").json()["usage"]
        assert usage["completion_tokens"] >= 1  # known after a graceful stop
        # The session that crashed earlier is unchanged by this second restart.
        _, again = read_events(http, "GET", "/v1/sessions/crash-1/stream")
        assert finish_reason_of(again) == "interrupted" and again[-1]["data"] == "[DONE]"
        assert sum(1 for e in again if "interrupted" in e["data"]) == 1


def test_response_survives_kill_9(srv):
    import openai
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    stream = c.responses.create(model="m", input="Tell me a long story.", max_output_tokens=400,
                                stream=True, extra_body={"ignore_eos": True})
    seen = []
    for event in stream:
        seen.append(event)
        if len(seen) == 12:
            break
    response_id = seen[0].response.id
    srv.kill()
    srv.start()
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    rest = list(c.responses.retrieve(response_id, stream=True,
                                     starting_after=seen[-1].sequence_number))
    joined = seen + rest
    assert [e.sequence_number for e in joined] == list(range(len(joined)))
    assert joined[-1].type == "response.incomplete"
    final = c.responses.retrieve(response_id)
    assert final.status == "incomplete" and final.incomplete_details.reason == "interrupted"
    text = "".join(e.delta for e in joined if e.type == "response.output_text.delta")
    assert final.output_text == text and final.output[0].status == "incomplete"
