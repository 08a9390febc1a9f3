"""Every object and streamed event the server sends for chat completions, models and Responses,
validated against the published OpenAPI schemas (copies in tests/schemas/, see their x-source).

Responses objects and events are validated against both OpenAI's own schemas (openai-responses)
and Open Responses. Where the two contradict each other OpenAI's are authoritative (the official
SDK follows them): see OPENAI_ONLY_EVENTS and `openresponses_view`. The wire contract
(../shared/CONTRACT.md, docs/wire-contract.md) extends the specs in two places, handled
explicitly: the finish reasons `cancelled` and `interrupted`, and the `response.cancelled` event.

Raw HTTP JSON only: the SDK's objects fill in or hide missing fields. One shared server
(conftest's module `server`), small token budgets.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import time
import uuid

import httpx
import pytest

from conftest import LONG, QUESTION, Server, read_events
from openapi_check import errors, stream_event_schemas, validate
from tiny_qwen3vl import build_tiny_qwen3vl

CHAT = {"model": "m", "messages": QUESTION, "temperature": 0, "max_tokens": 8}
STORY = "Tell me a story about a dragon."

# ../shared/CONTRACT.md (Events): "a chunk with finish_reason one of stop, length, cancelled,
# interrupted". `cancelled` and `interrupted` deliberately extend OpenAI's enum.
CONTRACT_FINISH = ("stop", "length", "cancelled", "interrupted")
CONTRACT_ONLY_FINISH = ("cancelled", "interrupted")
# docs/wire-contract.md (Events 3): "Responses streams end with `response.completed`,
# `.incomplete`, `.cancelled` or `.failed`, then `[DONE]`."
CONTRACT_RESPONSE_ENDINGS = ("response.completed", "response.incomplete", "response.cancelled",
                             "response.failed")


def sid() -> str:
    return "schema-" + uuid.uuid4().hex


def post_json(http, url: str, body: dict) -> dict:
    r = http.post(url, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def data_events(events: list[dict]) -> list[dict]:
    """The JSON payloads of an SSE stream, checking the `[DONE]` sentinel where there is one."""
    out = []
    for ev in events:
        if ev["data"] == "[DONE]":
            assert ev is events[-1], "data after [DONE]"
            continue
        out.append(json.loads(ev["data"]))
    return out


def short(obj, limit: int = 1500) -> str:
    text = json.dumps(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def contract_finish_as_stop(obj: dict) -> dict:
    """A copy of a chat completion (chunk) whose finish reasons the contract adds are "stop".

    ../shared/CONTRACT.md (Events) extends OpenAI's finish_reason enum with `cancelled` and
    `interrupted`; every other field must still match OpenAI's schema, so the copy is validated.
    Asserts every finish_reason present is one the contract or OpenAI names."""
    out = copy.deepcopy(obj)
    for choice in out.get("choices") or []:
        reason = choice.get("finish_reason")
        if reason in CONTRACT_ONLY_FINISH:
            choice["finish_reason"] = "stop"
        else:
            assert reason is None or reason in CONTRACT_FINISH + ("tool_calls",), reason
    return out


def check_chunks(chunks: list[dict], contract_finish: bool = False) -> None:
    """Validate every chat chunk; with `contract_finish`, through `contract_finish_as_stop`."""
    assert chunks
    for i, chunk in enumerate(chunks):
        try:
            validate(contract_finish_as_stop(chunk) if contract_finish else chunk,
                     "CreateChatCompletionStreamResponse", spec="openai-chat")
        except AssertionError as e:
            raise AssertionError(f"chunk {i} of {len(chunks)}:\n{e}") from None


# --- Responses: both specs --------------------------------------------------------------------

RESPONSE_SCHEMAS = (("openai-responses", "Response"), ("openresponses", "ResponseResource"))

# Where the two specs' Response objects contradict each other, the live API and Open Responses
# win (issue 25):
# - Open Responses requires these fields (null allowed) and OpenAI's live API sends them as
#   null until known; OpenAI's OpenAPI document has them optional and never null. For the
#   OpenAI check a null one counts as absent.
NULL_UNTIL_KNOWN = ("usage", "safety_identifier", "prompt_cache_key")


def openai_view(resp):
    """The copy of a Response object that is validated against OpenAI's document (see above)."""
    if not isinstance(resp, dict):
        return resp
    return {k: v for k, v in resp.items() if not (k in NULL_UNTIL_KNOWN and v is None)}


def openresponses_view(resp):
    """The copy of a Response object that is validated against Open Responses."""
    if not isinstance(resp, dict):
        return resp
    out = copy.deepcopy(resp)
    fmt = (out.get("text") or {}).get("format") if isinstance(out.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        # Open Responses' JsonSchemaResponseFormat types `schema` as null and requires
        # `description` and `strict`; OpenAI's TextResponseFormatJsonSchema requires `schema` as an
        # object and types `description` as a string. No object satisfies both: a json_schema
        # text.format is validated against OpenAI's spec only.
        out["text"]["format"] = {"type": "text"}
    return out


def response_problems(obj) -> list[str]:
    """What each spec's Response schema rejects in `obj` (OpenAI's first)."""
    out = []
    for spec, name in RESPONSE_SCHEMAS:
        errs = errors(openresponses_view(obj) if spec == "openresponses" else openai_view(obj),
                      name, spec)
        if errs:
            out.append(f"{spec} schema {name} rejects the object:\n" + "\n".join(errs))
    return out


def validate_response(obj) -> None:
    """A Responses object, against OpenAI's `Response` and Open Responses' `ResponseResource`."""
    problems = response_problems(obj)
    if problems:
        raise AssertionError("\n".join(problems) + f"\nobject: {short(obj)}")


# The specs name the reasoning text events differently: Open Responses `response.reasoning.delta`
# and `.done`, OpenAI `response.reasoning_text.delta` and `.done`. The server follows OpenAI, whose
# names the official SDK dispatches on, so these are validated against OpenAI's spec only.
OPENAI_ONLY_EVENTS = {"response.reasoning_text.delta": "response.reasoning.delta",
                      "response.reasoning_text.done": "response.reasoning.done"}


def event_problems(ev: dict) -> list[str]:
    """What the specs reject in one streamed Responses event (empty if it conforms)."""
    event_type = ev.get("type")
    if event_type == "response.cancelled":
        # Neither OpenAI's spec nor Open Responses lists a `response.cancelled` event (OpenAI
        # reports a cancelled response only through the object's `status`); docs/wire-contract.md
        # (Events 3) names it as this server's terminal event of a cancelled Responses stream.
        # Its envelope is checked here and its `response` must still be a valid Response.
        out = []
        if set(ev) != {"type", "sequence_number", "response"} or not isinstance(
                ev.get("sequence_number"), int):
            out.append("  response.cancelled: expected exactly type, sequence_number (integer) "
                       f"and response, got {sorted(ev)}")
        if (ev.get("response") or {}).get("status") != "cancelled":
            out.append("  $.response.status: expected 'cancelled' in response.cancelled")
        return out + response_problems(ev.get("response"))
    out = []
    for spec in ("openai-responses", "openresponses"):
        if spec == "openresponses" and event_type in OPENAI_ONLY_EVENTS:
            continue  # see OPENAI_ONLY_EVENTS
        table = stream_event_schemas(spec)
        if event_type not in table:
            out.append(f"{spec}: the server emitted an event of type {event_type!r}, which the "
                       f"spec does not list among its streaming events")
            continue
        checked = ev
        if "response" in ev:  # see NULL_UNTIL_KNOWN
            view = openresponses_view if spec == "openresponses" else openai_view
            checked = {**ev, "response": view(ev["response"])}
        errs = errors(checked, table[event_type], spec)
        if errs:
            out.append(f"{spec} schema {table[event_type]} rejects the event:\n" + "\n".join(errs))
    return out


def check_stream(events: list[dict]) -> list[dict]:
    """Validate every event of a Responses SSE stream by its type, against both specs, and its
    ending (docs/wire-contract.md, Events 3); returns the payloads. All failures are collected,
    one report per event type (the first event of that type that failed)."""
    payloads = data_events(events)
    assert payloads
    assert events[-1]["data"] == "[DONE]", "a Responses stream ends with [DONE]"
    assert payloads[-1]["type"] in CONTRACT_RESPONSE_ENDINGS, payloads[-1]["type"]
    failed: dict[str, list] = {}
    for i, ev in enumerate(payloads):
        problems = event_problems(ev)
        if problems:
            failed.setdefault(ev.get("type"), [i, 0, problems, ev])[1] += 1
    if failed:
        raise AssertionError("\n".join(
            f"event {i} of {len(payloads)} ({t}; {n} event(s) of this type fail):\n"
            + "\n".join(p) + f"\nevent: {short(ev)}"
            for t, (i, n, p, ev) in failed.items()))
    return payloads


# --- chat completions, non-stream ----------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    {},
    {"logprobs": True, "top_logprobs": 3},
    {"n": 2, "temperature": 1.0, "seed": 7},
    {"n": 2, "logprobs": True, "top_logprobs": 2, "temperature": 1.0, "seed": 7},
], ids=["plain", "logprobs", "n2", "n2-logprobs"])
def test_chat_completion_object(http, extra):
    body = post_json(http, "/v1/chat/completions", {**CHAT, **extra})
    validate(body, "CreateChatCompletionResponse", spec="openai-chat")
    assert len(body["choices"]) == extra.get("n", 1)
    if extra.get("logprobs"):  # the logprob objects were really there to validate
        assert all(c["logprobs"]["content"] for c in body["choices"])


def test_chat_completion_length_finish(http):
    body = post_json(http, "/v1/chat/completions",
                     {**CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": STORY}]})
    validate(body, "CreateChatCompletionResponse", spec="openai-chat")
    assert body["choices"][0]["finish_reason"] == "length"


# --- chat completions, stream --------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    {},
    {"stream_options": {"include_usage": True}},
    {"logprobs": True, "top_logprobs": 3},
    {"logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}},
    {"n": 2, "temperature": 1.0, "seed": 7, "stream_options": {"include_usage": True}},
], ids=["plain", "include_usage", "logprobs", "logprobs-usage", "n2-usage"])
def test_chat_stream_every_chunk(http, extra):
    r, events = read_events(http, "POST", "/v1/chat/completions",
                            json={**CHAT, **extra, "stream": True, "session_id": sid()})
    assert r.status_code == 200
    assert events and events[-1]["data"] == "[DONE]"
    chunks = data_events(events)
    check_chunks(chunks)
    if (extra.get("stream_options") or {}).get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]
    if extra.get("logprobs"):
        assert any((c.get("logprobs") or {}).get("content") for ch in chunks for c in ch["choices"])


def wait_running(http, session_id: str, timeout: float = 60) -> None:
    """Until the session generates (so that a cancel lands mid-generation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = http.get(f"/v1/sessions/{session_id}")
        if r.status_code == 200 and (r.json().get("last_event_index") or -1) >= 2:  # null: none yet
            return
        time.sleep(0.05)
    raise AssertionError(f"session {session_id} did not start")


def test_chat_stream_cancelled_mid_generation(http):
    """What a client that reconnects after a cancel reads: every chunk, from event 0 to [DONE]."""
    s = sid()
    r, first = read_events(http, "POST", "/v1/chat/completions", limit=3,
                           json={**LONG, "model": "m", "stream": True, "session_id": s})
    assert r.status_code == 200 and len(first) == 3
    assert http.post(f"/v1/cancel/{s}").status_code == 200
    r, events = read_events(http, "GET", f"/v1/sessions/{s}/stream")
    assert r.status_code == 200 and events[-1]["data"] == "[DONE]"
    chunks = data_events(events)
    reasons = [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]
    assert reasons == ["cancelled"]  # a contract value (CONTRACT_FINISH), not OpenAI's
    # ../shared/CONTRACT.md extends OpenAI's finish_reason enum; everything else must conform.
    check_chunks(chunks, contract_finish=True)


def test_chat_completion_cancelled_mid_generation(http):
    s = sid()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/v1/chat/completions",
                              json={**LONG, "model": "m", "session_id": s})
        wait_running(http, s)
        assert http.post(f"/v1/cancel/{s}").status_code == 200
        r = pending.result(timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] in CONTRACT_FINISH
    assert body["choices"][0]["finish_reason"] == "cancelled"
    # ../shared/CONTRACT.md extends OpenAI's finish_reason enum; everything else must conform.
    validate(contract_finish_as_stop(body), "CreateChatCompletionResponse", spec="openai-chat")


# --- models --------------------------------------------------------------------------------------

def test_models_list_and_retrieve(http):
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    listing = r.json()
    validate(listing, "ListModelsResponse", spec="openai-chat")
    assert listing["data"]
    for m in listing["data"]:
        one = http.get(f"/v1/models/{m['id']}")
        assert one.status_code == 200, one.text
        validate(one.json(), "Model", spec="openai-chat")


# --- Responses, non-stream -----------------------------------------------------------------------

RESP = {"model": "m", "input": "What is the capital of France?", "temperature": 0,
        "max_output_tokens": 16}


@pytest.mark.parametrize("extra,status", [
    ({}, None),
    ({"include": ["message.output_text.logprobs"], "top_logprobs": 3}, None),
    ({"input": STORY, "max_output_tokens": 3}, "incomplete"),
    ({"instructions": "Answer in one word.", "store": False}, None),
], ids=["plain", "logprobs", "incomplete", "instructions-unstored"])
def test_response_object_and_retrieve(http, extra, status):
    body = post_json(http, "/v1/responses", {**RESP, **extra})
    validate_response(body)
    if status:
        assert body["status"] == status
    if extra.get("include"):
        parts = [p for item in body["output"] if item["type"] == "message" for p in item["content"]]
        assert parts and all(p.get("logprobs") for p in parts)
    if extra.get("store") is False:
        return
    got = http.get(f"/v1/responses/{body['id']}")
    assert got.status_code == 200, got.text
    validate_response(got.json())


def test_background_response_while_running_and_done(http):
    body = post_json(http, "/v1/responses", {**RESP, "input": STORY, "max_output_tokens": 12,
                                             "background": True})
    validate_response(body)
    deadline = time.monotonic() + 60
    while True:
        got = http.get(f"/v1/responses/{body['id']}")
        assert got.status_code == 200, got.text
        validate_response(got.json())
        if got.json()["status"] not in ("queued", "in_progress"):
            break
        assert time.monotonic() < deadline, "background response did not finish"
        time.sleep(0.2)


# --- Responses, stream ---------------------------------------------------------------------------

@pytest.mark.parametrize("extra,last", [
    ({}, None),
    ({"include": ["message.output_text.logprobs"], "top_logprobs": 2}, None),
    ({"input": STORY, "max_output_tokens": 3}, "response.incomplete"),
], ids=["plain", "logprobs", "incomplete"])
def test_response_stream_every_event(http, extra, last):
    r, events = read_events(http, "POST", "/v1/responses",
                            json={**RESP, **extra, "stream": True})
    assert r.status_code == 200
    payloads = check_stream(events)
    if last:
        assert payloads[-1]["type"] == last
    if extra.get("include"):
        assert any(p.get("logprobs") for p in payloads if p["type"] == "response.output_text.delta")
    # The same response, replayed (GET ?stream=true) and retrieved (GET), conforms as well.
    rid = payloads[0]["response"]["id"]
    r2, replay = read_events(http, "GET", f"/v1/responses/{rid}", params={"stream": "true"})
    assert r2.status_code == 200
    check_stream(replay)
    got = http.get(f"/v1/responses/{rid}")
    assert got.status_code == 200, got.text
    validate_response(got.json())


def test_response_stream_cancelled_mid_generation(http):
    r, first = read_events(http, "POST", "/v1/responses", limit=3,
                           json={**RESP, "input": STORY, "max_output_tokens": 300,
                                 "ignore_eos": True, "stream": True})
    assert r.status_code == 200 and len(first) == 3
    rid = json.loads(first[0]["data"])["response"]["id"]
    cancelled = http.post(f"/v1/responses/{rid}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    validate_response(cancelled.json())
    assert cancelled.json()["status"] == "cancelled"
    r2, replay = read_events(http, "GET", f"/v1/responses/{rid}", params={"stream": "true"})
    assert r2.status_code == 200
    got = http.get(f"/v1/responses/{rid}")
    assert got.status_code == 200, got.text
    validate_response(got.json())
    payloads = check_stream(replay)  # validates response.cancelled's response, see event_problems
    assert payloads[-1]["type"] == "response.cancelled"  # docs/wire-contract.md, Events 3


# --- tool calling and structured output ----------------------------------------------------------

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"], "additionalProperties": False}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                                "description": "Get the weather",
                                                "parameters": CITY}}]
RESPONSE_TOOLS = [{"type": "function", "name": "get_weather", "description": "Get the weather",
                   "parameters": CITY}]
ASK = "What is the weather in Paris?"
TOOL_CHAT = {"model": "m", "messages": [{"role": "user", "content": ASK}], "tools": CHAT_TOOLS,
             "tool_choice": "required", "temperature": 0, "max_tokens": 60}
TOOL_RESP = {"model": "m", "input": ASK, "tools": RESPONSE_TOOLS, "tool_choice": "required",
             "temperature": 0, "max_output_tokens": 60}
JSON_ASK = "Which city is the capital of France? Answer as JSON."
FORMAT_CHAT = {"model": "m", "temperature": 0, "max_tokens": 40,
               "messages": [{"role": "user", "content": JSON_ASK}],
               "response_format": {"type": "json_schema", "json_schema": {
                   "name": "city", "schema": CITY, "strict": True}}}
FORMAT_RESP = {"model": "m", "input": JSON_ASK, "temperature": 0, "max_output_tokens": 40,
               "text": {"format": {"type": "json_schema", "name": "city", "schema": CITY,
                                   "strict": True}}}


def test_chat_tool_call_object(http):
    body = post_json(http, "/v1/chat/completions", TOOL_CHAT)
    validate(body, "CreateChatCompletionResponse", spec="openai-chat")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city"}


def test_chat_tool_call_stream_every_chunk(http):
    r, events = read_events(http, "POST", "/v1/chat/completions",
                            json={**TOOL_CHAT, "stream": True,
                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and events[-1]["data"] == "[DONE]"
    chunks = data_events(events)
    check_chunks(chunks)
    deltas = [tc for ch in chunks for c in ch["choices"]
              for tc in c["delta"].get("tool_calls") or []]
    assert deltas and deltas[0]["function"]["name"] == "get_weather"
    assert [c["finish_reason"] for ch in chunks for c in ch["choices"]
            if c["finish_reason"]] == ["tool_calls"]


def test_chat_response_format_json_schema(http):
    body = post_json(http, "/v1/chat/completions", FORMAT_CHAT)
    validate(body, "CreateChatCompletionResponse", spec="openai-chat")
    if body["choices"][0]["finish_reason"] == "stop":
        assert set(json.loads(body["choices"][0]["message"]["content"])) == {"city"}


def function_calls(response: dict) -> list[dict]:
    return [item for item in response["output"] if item["type"] == "function_call"]


def test_response_tool_call_object_and_follow_up(http):
    first = post_json(http, "/v1/responses", TOOL_RESP)
    validate_response(first)  # its tools, tool_choice, parallel_tool_calls and text.format too
    assert first["tools"][0]["name"] == "get_weather" and first["tool_choice"] == "required"
    (call,) = function_calls(first)
    assert call["name"] == "get_weather" and call["status"] == "completed"
    second = post_json(http, "/v1/responses", {
        "model": "m", "previous_response_id": first["id"], "tools": RESPONSE_TOOLS,
        "temperature": 0, "max_output_tokens": 16,
        "input": [{"type": "function_call_output", "call_id": call["call_id"],
                   "output": "Sunny, 21 C."}]})
    validate_response(second)
    assert second["previous_response_id"] == first["id"]


def test_response_tool_call_stream_every_event(http):
    r, events = read_events(http, "POST", "/v1/responses", json={**TOOL_RESP, "stream": True})
    assert r.status_code == 200
    payloads = check_stream(events)
    types = [ev["type"] for ev in payloads]
    assert "response.function_call_arguments.delta" in types
    assert "response.function_call_arguments.done" in types
    assert function_calls(payloads[-1]["response"])


def test_response_text_format_json_schema(http):
    body = post_json(http, "/v1/responses", FORMAT_RESP)
    validate_response(body)
    assert body["text"]["format"]["type"] == "json_schema"
    assert body["text"]["format"]["name"] == "city"


# --- a thinking model: reasoning output ----------------------------------------------------------
# The tiny random-weight Qwen3-VL of the vision tests has a Qwen3-Thinking chat template: its
# answers open <think> and, random as they are, never close it, so all output is reasoning.

@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    model_dir = build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny-vl"))
    srv = Server(tmp_path_factory.mktemp("thinking"), MODEL_REPO_ID=str(model_dir),
                 HF_HUB_OFFLINE="1").start()
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c
    srv.stop()


THINK = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "Think."}],
         "max_tokens": 6}


def test_thinking_chat_object_and_chunks(thinking):
    body = post_json(thinking, "/v1/chat/completions", THINK)
    validate(body, "CreateChatCompletionResponse", spec="openai-chat")
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    r, events = read_events(thinking, "POST", "/v1/chat/completions",
                            json={**THINK, "stream": True})
    assert r.status_code == 200
    check_chunks(data_events(events))


def test_thinking_response_object_and_events(thinking):
    req = {"model": "m", "input": "Think.", "temperature": 0, "max_output_tokens": 6}
    body = post_json(thinking, "/v1/responses", req)
    assert [item["type"] for item in body["output"]] == ["reasoning"]
    validate_response(body)
    r, events = read_events(thinking, "POST", "/v1/responses", json={**req, "stream": True})
    assert r.status_code == 200
    types = [ev["type"] for ev in check_stream(events)]
    assert "response.reasoning_text.delta" in types
