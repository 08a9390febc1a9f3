"""A graceful stop (SIGTERM, Ctrl-C) never reads like the end of an answer (shutdown.py).

Real server processes and the official openai SDK: a stream cut by SIGTERM makes the SDK raise
(chat and Responses), the log gets nothing that makes the session look ended, the next start
continues it and a resume gets the whole answer, each event once; during the drain `/ready`
and new requests answer 503 while a generation that can finish does.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time

import httpx
import openai
import pytest

from conftest import Server, content_of, finish_reason_of, read_events, wait_until

STORY = [{"role": "user", "content": "Write a long story about a dragon."}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # A generation of 160 tokens cannot finish in a 4 s drain on a 2-core CPU; 12 tokens can.
    server = Server(tmp_path_factory.mktemp("shutdown"), SHUTDOWN_DRAIN_SECONDS="4").start()
    yield server
    server.stop()


def sdk(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def state_of(srv: Server, session_id: str) -> str | None:
    with sqlite3.connect(srv.env["SESSIONS_DB_PATH"]) as db:
        row = db.execute("SELECT state FROM sessions WHERE id=?", (session_id,)).fetchone()
    return row[0] if row else None


def replay(url: str, session_id: str) -> list[dict]:
    with httpx.Client(base_url=url, timeout=120) as http:
        r, events = read_events(http, "GET", f"/v1/sessions/{session_id}/stream")
        assert r.status_code == 200, r.text
        return events


def sigterm_after(srv: Server, chunks: int, stream, received: list) -> BaseException | None:
    """Read `stream`, SIGTERM the server after `chunks` chunks, keep reading; returns what
    the read raised (None: it ended cleanly)."""
    try:
        for chunk in stream:
            received.append(chunk)
            if len(received) == chunks:
                srv.proc.send_signal(signal.SIGTERM)
    except Exception as e:  # noqa: BLE001 - what it raised is the result
        return e
    return None


def test_sigterm_mid_stream_makes_the_sdk_raise_and_the_restart_finishes_it(srv):
    """Chat and Responses streams cut by SIGTERM: the SDK raises APIError naming the event to
    resume after; the sessions stay in_progress; after the restart a resume from that event
    gets the rest, and the whole answer has each event once and ends as asked."""
    client = sdk(srv)
    chat = client.chat.completions.create(
        model="m", messages=STORY, stream=True, max_tokens=160, temperature=0,
        extra_body={"session_id": "term-chat", "ignore_eos": True})
    resp = client.responses.create(model="m", input="Write a long story about a dragon.",
                                   stream=True, max_output_tokens=160, temperature=0,
                                   extra_body={"session_id": "term-resp", "ignore_eos": True})
    got_resp: list = []
    resp_error: list = []
    t = threading.Thread(target=lambda: resp_error.append(
        sigterm_after(srv, 10 ** 9, resp, got_resp)))
    t.start()
    got_chat: list = []
    started = time.monotonic()
    error = sigterm_after(srv, 6, chat, got_chat)
    t.join(60)
    stopped_after = time.monotonic() - started
    assert srv.proc.wait(30) is not None
    srv.log.close()

    assert isinstance(error, openai.APIError), f"the chat stream ended with {error!r}"
    assert error.code == "server_shutting_down"
    last_chat = len(got_chat) - 1  # chunk i is event term-chat:i
    assert f"Last-Event-ID: term-chat:{last_chat}" in error.message
    assert isinstance(resp_error[0], openai.APIError), f"Responses ended with {resp_error!r}"
    assert resp_error[0].code == "server_shutting_down"
    last_resp = got_resp[-1].sequence_number
    assert stopped_after < 30  # no drain (neither can finish in 4 s), not the 160 tokens
    assert state_of(srv, "term-chat") == "in_progress"
    assert state_of(srv, "term-resp") == "in_progress"

    srv.start()
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        r, rest = read_events(http, "GET", "/v1/sessions/term-chat/stream",
                              headers={"Last-Event-ID": f"term-chat:{last_chat}"})
        assert r.status_code == 200
    assert int(rest[0]["id"].split(":")[1]) == last_chat + 1
    whole = replay(srv.url, "term-chat")
    assert [int(e["id"].split(":")[1]) for e in whole] == list(range(len(whole)))
    assert all("shutting" not in e["data"] for e in whole)  # the notice is in no replay
    assert finish_reason_of(whole) == "length" and whole[-1]["data"] == "[DONE]"
    text = "".join(c.choices[0].delta.content or "" for c in got_chat if c.choices)
    assert content_of(whole).startswith(text) and len(content_of(whole)) > len(text)

    events = list(sdk(srv).responses.retrieve("resp_term-resp", stream=True,
                                              starting_after=last_resp))
    assert events[0].sequence_number == last_resp + 1
    assert events[-1].type == "response.incomplete"  # max_output_tokens reached
    assert events[-1].response.usage.output_tokens == 160


def test_the_drain_lets_a_short_generation_finish_and_refuses_new_work(srv):
    """SIGTERM while a short generation runs beside a long one: the short one ends `stop`/
    `length` with [DONE]; meanwhile /ready and a new request answer 503 server_shutting_down
    with Retry-After; the long one is cut with the notice and stays in_progress."""
    if srv.proc.poll() is not None:
        srv.start()
    long_body = {"model": "m", "messages": STORY, "max_tokens": 160, "temperature": 0,
                 "ignore_eos": True, "stream": True, "session_id": "drain-long"}
    short_body = {"model": "m", "messages": STORY, "max_tokens": 12, "temperature": 0,
                  "ignore_eos": True, "stream": True, "session_id": "drain-short"}
    out: dict[str, list] = {}

    def read(name: str, body: dict) -> None:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                out[name] = [line for line in r.iter_lines() if line.startswith("data:")]

    threads = [threading.Thread(target=read, args=("long", long_body)),
               threading.Thread(target=read, args=("short", short_body))]
    for th in threads:
        th.start()
    wait_until(lambda: state_of(srv, "drain-short") == "in_progress", 60)
    srv.proc.send_signal(signal.SIGTERM)
    ready = httpx.get(srv.url + "/ready", timeout=10)
    refused = httpx.post(srv.url + "/v1/chat/completions", timeout=10,
                         json={"model": "m", "messages": STORY, "max_tokens": 4})
    for th in threads:
        th.join(60)
    srv.proc.wait(30)
    srv.log.close()
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "server_shutting_down"
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert out["short"][-1] == "data: [DONE]"
    assert state_of(srv, "drain-short") == "completed"
    notice = json.loads(out["long"][-1][len("data: "):])
    assert notice["error"]["code"] == "server_shutting_down"
    assert state_of(srv, "drain-long") == "in_progress"
    srv.start()
    wait_until(lambda: state_of(srv, "drain-long") == "completed", 120)
    assert finish_reason_of(replay(srv.url, "drain-long")) == "length"
