"""In front of an upstream (UPSTREAM_URL): a second real instance of this server is the
OpenAI-compatible upstream (the suite's shared `server`, with the embedded model), and a front
instance with no model of its own keeps the sessions. Resume, cancel (which must reach the
upstream), auto-cancel, refusals, an upstream that is down, Responses and kill -9 of the front
all run through real processes. Where a `llama-server` binary exists (LLAMA_SERVER_PATH, or on
PATH) the same flows run against llama.cpp too (test_llama_server.py).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import (CuttableProxy, Server, content_of, finish_reason_of, free_port,
                      kill_and_resume, read_events, wait_until)
from upstream import (chat_parts, continuation, logprob_entries, response_chat_body,
                      upstream_error)
from schemas import ChatMessage


# Greedy and long enough to act on mid-stream (about 2 s of the CPU upstream).
def story(marker: str, max_tokens: int = 48) -> dict:
    return {"messages": [{"role": "user", "content": f"Write a story about a dragon ({marker})."}],
            "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def front(server, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("front"), UPSTREAM_URL=server.url + "/v1",
                 CANCEL_AFTER_DISCONNECT_SECONDS="4").start()
    yield srv
    srv.stop()


def upstream_sessions(server: Server, marker: str) -> list[tuple[str, str]]:
    """(id, state) of the upstream's sessions whose request carries `marker`."""
    with sqlite3.connect(server.env["SESSIONS_DB_PATH"]) as conn:
        return list(conn.execute("SELECT id, state FROM sessions WHERE request LIKE ?",
                                 (f"%{marker}%",)))


def direct_text(server: Server, body: dict) -> str:
    """What the upstream itself streams for `body` (greedy: the reference output)."""
    with httpx.Client(base_url=server.url, timeout=120) as http:
        r, events = read_events(http, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return content_of(events)


# --- through a second instance of this server -------------------------------------------------


def test_models_and_ready_reflect_the_upstream(front, server):
    up = httpx.get(server.url + "/v1/models").json()["data"][0]
    models = httpx.get(front.url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == [up["id"]]
    assert models[0]["context_length"] == up["context_length"]
    assert models[0]["owned_by"] == "upstream"
    assert httpx.get(front.url + "/ready").json() == {"status": "ready", "model": up["id"]}


def test_a_dropped_stream_resumes_with_exactly_the_missed_events(front, server):
    marker = uuid.uuid4().hex[:8]
    body = story(marker)
    sid = "up-resume-" + marker
    with httpx.Client(base_url=front.url, timeout=120) as http:
        r, first = read_events(http, "POST", "/v1/chat/completions",
                               json={**body, "session_id": sid}, limit=6)
        assert r.status_code == 200 and r.headers["x-session-id"] == sid
        r, rest = read_events(http, "POST", "/v1/chat/completions",
                              json={**body, "session_id": sid},
                              headers={"Last-Event-ID": first[-1]["id"]})
    events = first + rest
    assert [e["id"] for e in events] == [f"{sid}:{i}" for i in range(len(events))]
    assert events[-1]["data"] == "[DONE]" and finish_reason_of(events) == "length"
    usage = json.loads(events[-2]["data"])["usage"]
    assert usage["completion_tokens"] == 48 and usage["prompt_tokens"] > 0
    # the front adds nothing and loses nothing: the upstream's own greedy text
    assert content_of(events) == direct_text(server, body)
    # a replay after the end is byte-identical
    with httpx.Client(base_url=front.url, timeout=60) as http:
        _, replay = read_events(http, "GET", f"/v1/sessions/{sid}/stream")
    assert [e["raw"] for e in replay] == [e["raw"] for e in events]


def test_cancel_stops_the_upstream_generation_too(front, server):
    marker = uuid.uuid4().hex[:8]
    with httpx.Client(base_url=front.url, timeout=120) as http:
        r, events = read_events(http, "POST", "/v1/chat/completions",
                                json=story(marker, 400), limit=3)
        sid = r.headers["x-session-id"]
        [(up_id, state)] = upstream_sessions(server, marker)
        assert state == "in_progress"
        cancelled = http.post(f"/v1/cancel/{sid}").json()
    assert cancelled["cancelled"] is True and cancelled["state"] == "cancelled"
    wait_until(lambda: upstream_sessions(server, marker)[0][1] == "cancelled", 10)
    got = httpx.get(f"{front.url}/v1/sessions/{sid}").json()
    assert got["state"] == "cancelled" and got["finish_reason"] == "cancelled"


def test_every_client_gone_cancels_upstream_after_the_delay(front, server):
    marker = uuid.uuid4().hex[:8]
    with httpx.Client(base_url=front.url, timeout=120) as http:
        r, _ = read_events(http, "POST", "/v1/chat/completions", json=story(marker, 400),
                           limit=2)
    sid = r.headers["x-session-id"]
    # CANCEL_AFTER_DISCONNECT_SECONDS=4 on the front; the upstream keeps its default (1 h)
    wait_until(lambda: httpx.get(f"{front.url}/v1/sessions/{sid}").json()["state"]
               == "cancelled", 15)
    wait_until(lambda: upstream_sessions(server, marker)[0][1] == "cancelled", 10)


def test_an_upstream_refusal_is_its_400_and_leaves_no_session(front):
    sid = "up-refused-" + uuid.uuid4().hex[:8]
    r = httpx.post(front.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True, "session_id": sid,
        "response_format": {"type": "bogus"}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "bogus" in err["message"] and err["param"] == "response_format.type"
    assert httpx.get(f"{front.url}/v1/sessions/{sid}").status_code == 404
    # image parts reach the upstream as they came: this one serves a text-only model
    r = httpx.post(front.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]})
    assert r.status_code == 400 and "does not accept images" in r.json()["error"]["message"]


def test_responses_background_and_previous_response_id_through_the_front(front):
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0)
    first = client.responses.create(model="any", input="Name a color.", temperature=0,
                                    max_output_tokens=8, instructions="Answer in one word.")
    assert first.status in ("completed", "incomplete") and first.output_text
    events = list(client.responses.create(model="any", input="And another one?", temperature=0,
                                          max_output_tokens=8, stream=True,
                                          previous_response_id=first.id))
    assert events[0].type == "response.created"
    done = events[-1].response
    assert done.previous_response_id == first.id and done.output_text
    background = client.responses.create(model="any", input="Count to five.", background=True,
                                         temperature=0, max_output_tokens=12)
    assert background.status in ("queued", "in_progress")
    final = wait_until(lambda: (lambda r: r if r.status not in ("queued", "in_progress")
                                else None)(client.responses.retrieve(background.id)), 60)
    assert final.output_text and final.usage.output_tokens == 12


def test_tool_calls_come_through_with_our_ids(front, server):
    from test_tools import ASK, CHAT_TOOLS, RESPONSE_TOOLS
    body = dict(model="m", messages=[{"role": "user", "content": ASK}], tools=CHAT_TOOLS,
                tool_choice="required", temperature=0, max_tokens=60)
    sdk = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0)
    direct = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    ours = sdk.chat.completions.create(**body).choices[0]
    theirs = direct.chat.completions.create(**body).choices[0].message.tool_calls[0]
    assert ours.finish_reason == "tool_calls"
    (call,) = ours.message.tool_calls
    assert (call.function.name, call.function.arguments) == (theirs.function.name,
                                                             theirs.function.arguments)
    assert call.id != theirs.id and call.id.startswith("call_")  # ours: stable across resume
    # a Responses tool turn and its follow-up by previous_response_id
    first = sdk.responses.create(model="m", input=ASK, tools=RESPONSE_TOOLS,
                                 tool_choice="required", temperature=0, max_output_tokens=60)
    (fc,) = [o for o in first.output if o.type == "function_call"]
    assert fc.name == "get_weather" and json.loads(fc.arguments)["city"]
    second = sdk.responses.create(model="m", previous_response_id=first.id, tools=RESPONSE_TOOLS,
                                  temperature=0, max_output_tokens=6, input=[
                                      {"type": "function_call_output", "call_id": fc.call_id,
                                       "output": "Sunny, 21 C every day."}])
    assert second.output_text


def test_sessions_run_concurrently_upstream(front, server):
    marker = uuid.uuid4().hex[:8]

    def one(i: int) -> tuple[str, list[dict]]:
        with httpx.Client(base_url=front.url, timeout=120) as http:
            r, events = read_events(http, "POST", "/v1/chat/completions",
                                    json=story(f"{marker}-{i}", 24))
        return r.headers["x-session-id"], events

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert len({sid for sid, _ in results}) == 4
    for _, events in results:
        assert events[-1]["data"] == "[DONE]" and finish_reason_of(events) == "length"
    # the upstream held them at the same time (its engine batches them)
    assert len(upstream_sessions(server, marker)) == 4


def test_an_upstream_stream_cut_mid_way_goes_on_where_it_broke(server, tmp_path):
    """The connection to the upstream breaks mid-answer: the session goes on from the text
    delivered (as after a crash of the front), and the client sees one unbroken answer, the
    upstream's own. An upstream that stays away past UPSTREAM_RETRY_SECONDS fails the
    session with the reason, without a hang."""
    proxy = CuttableProxy(server.port)
    srv = Server(tmp_path, UPSTREAM_URL=proxy.url + "/v1", UPSTREAM_RETRY_SECONDS="3").start()
    marker = uuid.uuid4().hex[:8]
    try:
        body = story(marker, 40)
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            _, first = read_events(http, "POST", "/v1/chat/completions", json=body, limit=8)
            proxy.cut()
            sid = first[0]["id"].split(":")[0]
            _, rest = read_events(http, "GET", f"/v1/sessions/{sid}/stream",
                                  headers={"Last-Event-ID": first[-1]["id"]})
        events = first + rest
        assert [e["id"] for e in events] == [f"{sid}:{i}" for i in range(len(events))]
        assert events[-1]["data"] == "[DONE]" and finish_reason_of(events) == "length"
        assert content_of(events) == direct_text(server, body)
        assert "continuing it" in srv.logs()
        # now the upstream goes away for good, mid-answer
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=story(marker, 400)) as r:
                lines = r.iter_lines()
                assert any('"content":"' in line and '"content":""' not in line
                           for line in lines)  # a token of the answer
                started = time.monotonic()
                proxy.close()
                rest = [line for line in lines if line.startswith("data: ")]
        assert time.monotonic() - started < 15
        assert rest[-1] == "data: [DONE]"
        assert "unreachable" in json.loads(rest[-2][6:])["error"]["message"]
        assert httpx.get(f"{srv.url}/v1/sessions/{r.headers['x-session-id']}").json()[
            "state"] == "failed"
    finally:
        srv.stop()
        proxy.close()
        for up_id, state in upstream_sessions(server, marker):
            if state == "in_progress":  # the upstream keeps it for its own dropped client
                httpx.post(f"{server.url}/v1/cancel/{up_id}", timeout=10)


def test_an_upstream_that_is_down_is_a_503_with_the_reason(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    srv = Server(tmp_path, UPSTREAM_URL=dead).start(until="/health")
    try:
        r = httpx.get(srv.url + "/ready")
        assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "upstream_unavailable"
        assert dead not in r.text and "127.0.0.1" not in r.text  # (the log has it)
        started = time.monotonic()
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "127.0.0.1" not in r.text
        assert time.monotonic() - started < 5  # no hang
        assert httpx.get(srv.url + "/v1/models").json()["data"] == []
        assert httpx.get(srv.url + "/health").json()["decode"] == "upstream"
    finally:
        srv.stop()


def test_kill_9_of_the_front_mid_stream_continues_upstream(front, server):
    """The front dies mid-answer; at its restart the generation goes on upstream from the
    text delivered (continue_final_message), and a client that resumes gets one unbroken
    answer: on this upstream (greedy, CPU) the same text as without the crash. (The module's
    last test on `front`: it restarts it.)"""
    marker = uuid.uuid4().hex[:8]
    body = story(marker, 32)
    _, events = kill_and_resume(front, body, "up-crash-" + marker, 10)
    assert events[-1]["data"] == "[DONE]" and finish_reason_of(events) == "length"
    assert content_of(events) == direct_text(server, body)
    # the continuation was one more upstream request, carrying the delivered text (the
    # others: the request cut by the crash, and the reference above)
    with sqlite3.connect(server.env["SESSIONS_DB_PATH"]) as conn:
        requests = [json.loads(row[0]) for row in conn.execute(
            "SELECT request FROM sessions WHERE request LIKE ?", (f"%{marker}%",))]
    assert len(requests) == 3
    [continued] = [r for r in requests if r.get("continue_final_message")]
    assert continued["messages"][-1]["role"] == "assistant"
    assert content_of(events).startswith(continued["messages"][-1]["content"])
    assert continued["max_tokens"] < 32


# --- the pieces, without servers ---------------------------------------------------------------


def test_responses_requests_become_chat_requests():
    raw = {"input": "x", "max_output_tokens": 7, "temperature": 0.2,
           "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
           "tool_choice": {"type": "function", "name": "f"},
           "text": {"format": {"type": "json_schema", "name": "n", "schema": {}, "strict": True}},
           "reasoning": {"effort": "none"}, "include": ["message.output_text.logprobs"],
           "top_logprobs": 2}
    messages = [ChatMessage(role="system", content="be brief"),
                ChatMessage(role="user", content=[{"type": "input_text", "text": "hi"},
                                                  {"type": "input_image", "image_url": "u"}])]
    body = response_chat_body(raw, messages, "m", 100)
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "u"}}]}]
    assert body["max_tokens"] == 7 and body["temperature"] == 0.2 and body["model"] == "m"
    assert body["tools"] == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {}, "strict": True}}
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["stream"] and body["stream_options"] == {"include_usage": True}


def test_a_continuation_carries_the_delivered_text_and_the_rest_of_the_budget():
    chat = {"path": "/chat/completions", "body": {"messages": [{"role": "user", "content": "q"}],
                                                  "max_tokens": 50}}
    got = continuation(chat, {0: [("content", "Once"), ("content", " upon")]}, 2)
    assert got["body"]["messages"][-1] == {"role": "assistant", "content": "Once upon"}
    assert got["body"]["continue_final_message"] is True
    assert got["body"]["add_generation_prompt"] is False and got["body"]["max_tokens"] == 48
    assert chat["body"]["max_tokens"] == 50  # the stored request is left alone
    legacy = {"path": "/completions", "body": {"prompt": "A", "max_tokens": 5}}
    assert continuation(legacy, {0: [("content", "BC")]}, 2)["body"]["prompt"] == "ABC"
    # what no upstream takes back as a prefix
    assert continuation(chat, {0: [("reasoning", "hm")]}, 1) is None
    assert continuation(chat, {0: [("content", "a")], 1: [("content", "b")]}, 2) is None


def test_upstream_errors_map_to_the_contract():
    e = upstream_error(400, '{"error": {"message": "bad", "param": "x", "code": 400}}')
    assert (e.status, e.param, e.code) == (400, "x", None) and "bad" in e.message
    assert upstream_error(422, '{"detail": "no"}').status == 400
    assert upstream_error(413, "too big").status == 413
    e = upstream_error(429, "{}", "7")
    assert e.status == 429 and e.headers["Retry-After"] == "7"
    for status in (401, 404, 500, 502):
        e = upstream_error(status, "<html>")
        assert e.status == 503 and e.code == "upstream_unavailable"


def test_chunks_become_engine_parts():
    assert chat_parts({"delta": {"reasoning_content": "r", "content": "c"}}) == [
        ("reasoning", "r"), ("content", "c")]
    assert chat_parts({"delta": {"reasoning": "r"}}) == [("reasoning", "r")]  # newer vLLM
    assert chat_parts({"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {
        "name": "f", "arguments": "{\"a\""}}]}}) == [("tool_call", "f"),
                                                     ("tool_arguments", "{\"a\"")]
    assert chat_parts({"text": "t", "index": 0}) == [("content", "t")]
    legacy = logprob_entries({"logprobs": {"tokens": ["a"], "token_logprobs": [-1.0],
                                           "top_logprobs": [{"a": -1.0, "b": -2.0}]}})
    assert legacy == [{"token": "a", "logprob": -1.0, "bytes": None, "top_logprobs": [
        {"token": "a", "logprob": -1.0, "bytes": None},
        {"token": "b", "logprob": -2.0, "bytes": None}]}]


def test_a_prefill_sent_back_by_the_upstream_is_not_repeated():
    from engine import GenerationJob
    from upstream import StreamState, read_chunk

    class Sink:
        def __init__(self):
            self.calls = []

        def delta(self, index, parts, *rest):
            self.calls.append(parts)

    job = GenerationJob("j", None, {}, type("P", (), {"seed": None})(), Sink())
    state = StreamState({}, {}, echo="Once upon")
    read_chunk(job, state, {"choices": [{"index": 0, "delta": {"content": "Once upon a"}}]})
    read_chunk(job, state, {"choices": [{"index": 0, "delta": {"content": "Once upon"}}]})
    assert job.sink.calls == [[("content", " a")], [("content", "Once upon")]]
