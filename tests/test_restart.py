"""Crash and restart: kill -9 a real server mid-stream, start it again on the same database.

Generations the server was running go on after the restart where they stopped (prompt and
delivered tokens re-prefilled): a client that resumes sees one unbroken stream, the same as an
uninterrupted run. One server for the module; each test kills or stops it and starts it again
(a start costs about 20 s, most of it loading the model), so the crash cases share restarts.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import (Server, answer, ask_in_page, assert_each_event_once, content_of,
                      finish_reason_of, read_events, wait_for_text)

STORY = [{"role": "user", "content": "Write a long story about a dragon."}]
GREEDY = {"messages": STORY, "temperature": 0, "max_tokens": 72, "ignore_eos": True,
          "stream": True, "stream_options": {"include_usage": True}}
SEEDED = {**GREEDY, "temperature": 1.0, "seed": 11, "top_p": 0.95, "n": 2,
          "frequency_penalty": 0.3, "max_tokens": 40}
# About 1500 prompt tokens: a prefill of a second or more on a 2-core CPU.
LONG_PROMPT = {"messages": [{"role": "user", "content": "Summarize: " + "The river runs to the "
                             "sea and the sea runs to the sky. " * 110}],
               "temperature": 0, "max_tokens": 24, "stream": True,
               "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # No drain: these tests stop the server mid-generation to test the hand-over; a 72-token
    # answer would otherwise finish inside the drain window (tests/test_shutdown.py).
    server = Server(tmp_path_factory.mktemp("restart"), SHUTDOWN_DRAIN_SECONDS="0").start()
    yield server
    server.stop()


def choices_of(events: list[dict]) -> list:
    """What a chat stream says, without what names the session (ids, created): each chunk's
    choices and usage, in order."""
    out = []
    for ev in events:
        if ev["data"] == "[DONE]":
            out.append("[DONE]")
            continue
        chunk = json.loads(ev["data"])
        out.append((chunk["choices"], chunk.get("usage")))
    return out


def stream(url: str, body: dict, session_id: str, limit: int | None = None,
           after: str | None = None) -> list[dict]:
    headers = {"Last-Event-ID": after} if after else {}
    with httpx.Client(base_url=url, timeout=120) as http:
        r, events = read_events(http, "POST", "/v1/chat/completions", limit=limit,
                                json={**body, "session_id": session_id}, headers=headers)
        assert r.status_code == 200, r.text
        return events


def replay(url: str, session_id: str) -> list[dict]:
    with httpx.Client(base_url=url, timeout=120) as http:
        r, events = read_events(http, "GET", f"/v1/sessions/{session_id}/stream")
        assert r.status_code == 200, r.text
        return events


def info(url: str, session_id: str) -> dict:
    return httpx.get(f"{url}/v1/sessions/{session_id}", timeout=30).json()


def test_kill_9_mid_stream_continues_the_generation(srv):
    """Greedy and seeded (n=2, penalties) generations killed mid-stream, one killed inside its
    prefill, one killed between its last token and its terminal event, and a Responses stream:
    after the restart each finishes as an uninterrupted run does, byte for byte."""
    # Killed between the last token and the terminal event: run one to the end, then (after
    # the kill) cut its log back to that point, as a crash there leaves it.
    whole_cut = stream(srv.url, GREEDY, "cut-1")
    seen = {"greedy-1": stream(srv.url, GREEDY, "greedy-1", limit=15),
            "seeded-1": stream(srv.url, SEEDED, "seeded-1", limit=10)}
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    r_stream = client.responses.create(model="m", input="Tell me a long story.", stream=True,
                                       max_output_tokens=48, temperature=0,
                                       extra_body={"ignore_eos": True})
    r_seen = []
    for event in r_stream:
        r_seen.append(event)
        if len(r_seen) == 12:
            break
    r_stream.close()
    response_id = r_seen[0].response.id
    # Cancelled after the restart, while its continuation runs.
    cancel_body = {**GREEDY, "max_tokens": 400}
    cancel_seen = stream(srv.url, cancel_body, "cancel-1", limit=5)
    # Killed as soon as the generation started: inside the prefill of a long prompt.
    seen["prefill-1"] = stream(srv.url, LONG_PROMPT, "prefill-1", limit=1)
    srv.kill()
    db = sqlite3.connect(srv.env["SESSIONS_DB_PATH"])
    with db:
        last_text = db.execute("SELECT MAX(idx) FROM events WHERE session_id='cut-1' AND "
                               "meta LIKE '%\"f\"%'").fetchone()[0]
        assert last_text is not None and last_text < len(whole_cut) - 1
        db.execute("DELETE FROM events WHERE session_id='cut-1' AND idx>?", (last_text,))
        db.execute("UPDATE sessions SET state='in_progress', finish_reason=NULL, usage=NULL, "
                   "ended_at=NULL WHERE id='cut-1'")
        states = dict(db.execute("SELECT id, state FROM sessions"))
    db.close()
    assert states["greedy-1"] == states["seeded-1"] == states["cancel-1"] == "in_progress"
    srv.start()
    # The uninterrupted runs to compare with, started now so that they share the batch with
    # the continuations (rows do not change each other's output: tests/test_batching.py).
    pool = ThreadPoolExecutor(4)
    wholes = {sid: pool.submit(stream, srv.url, body, sid + "-whole")
              for sid, body in (("greedy-1", GREEDY), ("seeded-1", SEEDED),
                                ("prefill-1", LONG_PROMPT))}
    wholes["cut-1"] = pool.submit(lambda: whole_cut)
    again_future = pool.submit(
        openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0).responses.create,
        model="m", input="Tell me a long story.", max_output_tokens=48, temperature=0,
        extra_body={"ignore_eos": True})
    # Cancel reaches a generation continued after a restart.
    done = threading.Event()
    tail: list[dict] = []

    def follow() -> None:
        tail.extend(stream(srv.url, cancel_body, "cancel-1", after=cancel_seen[-1]["id"]))
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    r = httpx.post(f"{srv.url}/v1/cancel/cancel-1", timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    assert done.wait(60)
    assert finish_reason_of(tail) == "cancelled" and tail[-1]["data"] == "[DONE]"
    assert info(srv.url, "cancel-1")["usage"]["completion_tokens"] >= 4

    for sid, body in (("greedy-1", GREEDY), ("seeded-1", SEEDED), ("prefill-1", LONG_PROMPT),
                      ("cut-1", GREEDY)):
        # The client resumes where it was cut off: one unbroken stream ...
        rest = stream(srv.url, body, sid, after=seen[sid][-1]["id"]) if sid in seen else []
        full = replay(srv.url, sid)
        if sid in seen:
            assert seen[sid] + rest == full
        assert [e["id"] for e in full] == [f"{sid}:{i}" for i in range(len(full))]
        # ... the same as an uninterrupted run of the same request, usage included.
        whole = wholes[sid].result()
        assert choices_of(full) == choices_of(whole), sid
        assert full[-1]["data"] == "[DONE]" and finish_reason_of(full) in ("length", "stop")
        state = info(srv.url, sid)
        assert state["state"] == "completed", state
        assert state["usage"] == json.loads(whole[-2]["data"])["usage"], sid
    assert len(content_of(replay(srv.url, "greedy-1"))) > 150

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    rest = list(client.responses.retrieve(response_id, stream=True,
                                          starting_after=r_seen[-1].sequence_number))
    joined = r_seen + rest
    assert [e.sequence_number for e in joined] == list(range(len(joined)))
    # It ran to max_output_tokens, not to the crash: incomplete for that reason.
    assert joined[-1].type == "response.incomplete"
    final = client.responses.retrieve(response_id)
    assert final.incomplete_details.reason == "max_output_tokens"
    text = "".join(e.delta for e in joined if e.type == "response.output_text.delta")
    assert final.output_text == text
    again = again_future.result()
    pool.shutdown()
    assert again.output_text == text and len(text) > 100
    assert final.usage.output_tokens == again.usage.output_tokens == 48


def test_the_playground_streams_on_through_a_kill_9(srv, browser, tmp_path):
    """The browser page mid-answer, the server killed and started again: the page shows
    "reconnecting", its EventSource finds the restarted server, and the answer ends whole
    (the continued generation's events after the ones it had), each event once."""
    context = browser.new_context(bypass_csp=True)  # see tests/test_playground.py
    page = context.new_page()
    try:
        page.goto(srv.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('Smol')")
        ask_in_page(page, "Write a long story about a dragon.", 120)
        wait_for_text(page, 40)
        srv.kill()
        page.wait_for_selector("#state[data-state=reconnecting]", timeout=30_000)
        srv.start()
        page.wait_for_selector("#state[data-state=done]", timeout=90_000)
        session_id, text, finish = answer(page)
        assert finish == "length"
        assert_each_event_once(page)
        assert text == content_of(replay(srv.url, session_id)) and len(text) > 300
    finally:
        page.screenshot(path=str(tmp_path / "playground-kill-9.png"))
        context.close()


def test_graceful_stop_hands_over_and_the_setting_turns_it_off(srv):
    """SIGTERM leaves running generations to the next start; with CONTINUE_AFTER_RESTART=0
    that start ends them `interrupted`, with the usage of what was delivered. (The server is
    left running with that setting: the module ends here.)"""
    seen = stream(srv.url, GREEDY, "graceful-1", limit=8)
    srv.stop()  # SIGTERM: the running generation is suspended, not ended
    db = sqlite3.connect(srv.env["SESSIONS_DB_PATH"])
    assert db.execute("SELECT state FROM sessions WHERE id='graceful-1'").fetchone()[0] == \
        "in_progress"
    db.close()
    srv.env["CONTINUE_AFTER_RESTART"] = "0"
    srv.start()
    full = replay(srv.url, "graceful-1")
    assert full[:8] == seen
    assert finish_reason_of(full) == "interrupted" and full[-1]["data"] == "[DONE]"
    assert len(full) < 100  # nothing was generated after the stop
    usage = info(srv.url, "graceful-1")["usage"]
    assert usage["prompt_tokens"] > 10 and usage["completion_tokens"] >= len(full) - 4
    # The sessions continued by the earlier restart are unchanged by this one.
    assert finish_reason_of(replay(srv.url, "greedy-1")) == "length"
