"""End to end against one real server with the embedded SmolLM2 and a temp SQLite file."""

from __future__ import annotations

import concurrent.futures
import json
import uuid

import httpx
import openai
import pytest

from conftest import LONG, QUESTION, content_of, finish_reason_of, metric, read_events


def sid() -> str:
    return "t-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    import model
    return AutoTokenizer.from_pretrained(model.embedded_model_dir(), gguf_file=model.EMBEDDED_GGUF)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# --- answers, usage, stream == non-stream -----------------------------------------------------

def test_capital_of_france_with_openai_sdk(client):
    r = client.chat.completions.create(model="anything", messages=QUESTION, temperature=0,
                                       max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.model == "SmolLM2-135M-Instruct"  # the server echoes its own model
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_usage_counts_are_real_token_counts(client, tok):
    prompt_ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    r = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=30)
    assert r.usage.prompt_tokens == len(prompt_ids)
    # Generated text re-tokenized, plus the end-of-turn token the model stopped on.
    answer_ids = tok(r.choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert r.usage.completion_tokens == len(answer_ids) + 1


def test_stream_equals_non_stream_at_temperature_0(client):
    kwargs = dict(model="m", temperature=0, max_tokens=40,
                  messages=[{"role": "user", "content": "Name three colors."}])
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_max_tokens_gives_length(client):
    r = client.chat.completions.create(model="m", messages=QUESTION, temperature=0,
                                       max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_stop_sequence_is_cut_and_not_emitted(client):
    full = client.chat.completions.create(model="m", messages=QUESTION, temperature=0,
                                          max_tokens=30).choices[0].message.content
    cut = client.chat.completions.create(model="m", messages=QUESTION, temperature=0,
                                         max_tokens=30, stop=["Paris"])
    assert cut.choices[0].message.content == full[:full.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    kwargs = dict(model="m", messages=QUESTION, temperature=1.0, max_tokens=20, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_models_endpoint(client, http):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert http.get("/v1/models/SmolLM2-135M-Instruct").json()["input_modalities"] == ["text"]
    assert http.get("/v1/models/nope").status_code == 404


def test_health_ready_docs_metrics(http):
    health = http.get("/health").json()
    assert health["model_state"] == "ready"
    assert health["decode"] == "eager"  # COMPILE_DECODE=auto on a CPU
    assert http.get("/ready").status_code == 200
    assert http.get("/docs").status_code == 200
    assert "/v1/chat/completions" in http.get("/openapi.json").json()["paths"]
    assert "resumable_generations_started_total" in http.get("/metrics").text


# --- resume -----------------------------------------------------------------------------------

def stream_body(session_id: str) -> dict:
    return {**LONG, "max_tokens": 60, "stream": True, "session_id": session_id}


@pytest.mark.parametrize("form", ["header", "query", "get"])
def test_resume_joins_to_the_uninterrupted_stream(http, form):
    s = sid()
    body = stream_body(s)
    r, first = read_events(http, "POST", "/v1/chat/completions", limit=5, json=body)
    assert r.status_code == 200 and r.headers["x-session-id"] == s
    assert len(first) == 5
    last = first[-1]["id"]
    if form == "header":
        r, rest = read_events(http, "POST", "/v1/chat/completions", json=body,
                              headers={"Last-Event-ID": last})
    elif form == "query":
        r, rest = read_events(http, "POST", "/v1/chat/completions", json=body,
                              params={"last_event_id": last})
    else:
        r, rest = read_events(http, "GET", f"/v1/sessions/{s}/stream",
                              headers={"Last-Event-ID": last})
    assert r.status_code == 200
    joined = first + rest
    assert [e["id"] for e in joined] == [f"{s}:{i}" for i in range(len(joined))]
    assert joined[-1]["data"] == "[DONE]"
    # The same session replayed from the start, uninterrupted, is the same events.
    _, whole = read_events(http, "GET", f"/v1/sessions/{s}/stream")
    assert whole == joined
    assert finish_reason_of(joined) == "length"


def test_sse_framing_is_lf_only_like_openai(http):
    # One line ending for the whole stream, events and pings alike, as OpenAI sends.
    with http.stream("POST", "/v1/chat/completions",
                     json={**stream_body(sid()), "max_tokens": 5}) as r:
        raw = r.read()
    assert b"\r" not in raw
    assert raw.startswith(b"id: ") and raw.endswith(b"data: [DONE]\n\n")


def test_resume_without_session_id_in_body_uses_the_event_id(http):
    body = {**LONG, "max_tokens": 20, "stream": True}
    r, first = read_events(http, "POST", "/v1/chat/completions", limit=3, json=body)
    s = r.headers["x-session-id"]
    assert len(s) >= 22  # 128 random bits in base64url
    _, rest = read_events(http, "POST", "/v1/chat/completions", json=body,
                          headers={"Last-Event-ID": first[-1]["id"]})
    assert [e["id"] for e in first + rest] == [f"{s}:{i}" for i in range(len(first + rest))]


def test_bad_event_ids(http):
    s = sid()
    r, events = read_events(http, "POST", "/v1/chat/completions",
                            json={**stream_body(s), "max_tokens": 5})
    assert events[-1]["data"] == "[DONE]"
    other = sid()
    read_events(http, "POST", "/v1/chat/completions", json={**stream_body(other), "max_tokens": 5})
    cases = [
        ("GET", f"/v1/sessions/{s}/stream", {"Last-Event-ID": f"{other}:1"}, 400),  # forged
        ("GET", f"/v1/sessions/{s}/stream", {"Last-Event-ID": "garbage"}, 400),
        ("GET", f"/v1/sessions/{s}/stream", {"Last-Event-ID": f"{s}:-1"}, 400),
        ("GET", f"/v1/sessions/{s}/stream", {"Last-Event-ID": f"{s}:x"}, 400),
        ("GET", "/v1/sessions/nobody-here/stream", {}, 404),
        ("GET", "/v1/sessions/nobody-here", {}, 404),
    ]
    for method, url, headers, status in cases:
        r = http.request(method, url, headers=headers)
        assert r.status_code == status, (url, headers, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = http.post("/v1/chat/completions", json=stream_body(s), headers={"Last-Event-ID": f"{other}:0"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "session_mismatch"
    r = http.post("/v1/chat/completions", json={**stream_body("x"), "session_id": None},
                  headers={"Last-Event-ID": "unknown-session:3"})
    assert r.status_code == 404


def test_index_past_the_end_waits_for_it(http):
    s = sid()
    body = stream_body(s)
    r, first = read_events(http, "POST", "/v1/chat/completions", limit=1, json=body)
    # Ask from event 10 on while the generation is still at its start: it waits, then delivers.
    _, rest = read_events(http, "GET", f"/v1/sessions/{s}/stream",
                          headers={"Last-Event-ID": f"{s}:10"})
    assert rest[0]["id"] == f"{s}:11" and rest[-1]["data"] == "[DONE]"


def test_session_object(http):
    s = sid()
    read_events(http, "POST", "/v1/chat/completions",
                json={**stream_body(s), "max_tokens": 5, "stream_options": {"include_usage": True}})
    info = http.get(f"/v1/sessions/{s}").json()
    assert info["state"] == "completed" and info["finish_reason"] == "length"
    assert info["model"] == "SmolLM2-135M-Instruct"
    assert info["usage"]["completion_tokens"] == 5
    # role chunk + 5 tokens (some may merge) + finish + usage + [DONE]
    assert info["last_event_index"] >= 4
    assert http.delete(f"/v1/sessions/{s}").json()["deleted"] is True
    assert http.get(f"/v1/sessions/{s}").status_code == 404
    assert http.delete(f"/v1/sessions/{s}").status_code == 404


# --- idempotency --------------------------------------------------------------------------------

def test_same_session_id_same_body_attaches_instead_of_generating(server, http):
    s = sid()
    body = stream_body(s)
    started = metric(server.url, "resumable_generations_started_total")
    _, a = read_events(http, "POST", "/v1/chat/completions", json=body)
    _, b = read_events(http, "POST", "/v1/chat/completions", json=body)
    assert a == b and a[-1]["data"] == "[DONE]"
    assert metric(server.url, "resumable_generations_started_total") == started + 1
    # Non-stream retry of a non-stream session: the same completion, no new generation.
    nb = {**body, "stream": False, "session_id": sid()}
    one = http.post("/v1/chat/completions", json=nb).json()
    two = http.post("/v1/chat/completions", json=nb).json()
    assert one == two
    assert metric(server.url, "resumable_generations_started_total") == started + 2


def test_same_session_id_other_body_is_409(http):
    s = sid()
    read_events(http, "POST", "/v1/chat/completions", json={**stream_body(s), "max_tokens": 3})
    r = http.post("/v1/chat/completions", json={**stream_body(s), "max_tokens": 4})
    assert r.status_code == 409
    assert r.json()["error"]["param"] == "session_id"
    assert r.json()["error"]["type"] == "conflict_error"


# --- cancel -----------------------------------------------------------------------------------

def test_cancel_stops_the_stream_and_is_idempotent(http):
    s = sid()
    body = {**LONG, "stream": True, "session_id": s}
    _, first = read_events(http, "POST", "/v1/chat/completions", limit=3, json=body)
    r = http.post(f"/v1/cancel/{s}")
    assert r.status_code == 200
    assert r.json()["state"] == "cancelled" and r.json()["cancelled"] is True
    _, rest = read_events(http, "GET", f"/v1/sessions/{s}/stream",
                          headers={"Last-Event-ID": first[-1]["id"]})
    events = first + rest
    assert finish_reason_of(events) == "cancelled" and events[-1]["data"] == "[DONE]"
    assert len(events) < 300  # it stopped early
    again = http.post(f"/v1/cancel/{s}").json()
    assert again["state"] == "cancelled" and again["cancelled"] is False
    assert http.post("/v1/cancel/no-such-session").status_code == 404


def test_cancel_a_finished_session_changes_nothing(http):
    s = sid()
    read_events(http, "POST", "/v1/chat/completions", json={**stream_body(s), "max_tokens": 3})
    before = http.get(f"/v1/sessions/{s}").json()
    r = http.post(f"/v1/cancel/{s}").json()
    assert r["cancelled"] is False and r["state"] == "completed"
    assert http.get(f"/v1/sessions/{s}").json() == before


def test_cancel_a_queued_session(http):
    # Occupy the engine, queue a second session, cancel it before it runs.
    busy, queued = sid(), sid()
    read_events(http, "POST", "/v1/chat/completions", limit=1,
                json={**LONG, "stream": True, "session_id": busy})
    read_events(http, "POST", "/v1/chat/completions", limit=0,
                json={**LONG, "stream": True, "session_id": queued})
    assert http.get(f"/v1/sessions/{queued}").json()["state"] == "queued"
    r = http.post(f"/v1/cancel/{queued}").json()
    assert r["state"] == "cancelled" and r["usage"]["completion_tokens"] == 0
    assert r["usage"]["prompt_tokens"] > 10  # known from the prepared prompt
    _, events = read_events(http, "GET", f"/v1/sessions/{queued}/stream")
    assert finish_reason_of(events) == "cancelled"
    http.post(f"/v1/cancel/{busy}")


# --- concurrency ------------------------------------------------------------------------------

def test_four_concurrent_streams(server, client):
    questions = ["What is the capital of France?", "What is 2 + 2?", "Name a fruit.",
                 "Say hello."]

    def run(q: str) -> tuple[str, str]:
        msgs = [{"role": "user", "content": q}]
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", messages=msgs, temperature=0, max_tokens=25, stream=True) if c.choices)
        alone = client.chat.completions.create(model="m", messages=msgs, temperature=0,
                                               max_tokens=25).choices[0].message.content
        return streamed, alone

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, questions))
    for streamed, alone in results:
        assert streamed and streamed == alone
    assert "Paris" in results[0][0]


# --- bad requests -------------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": QUESTION, "temperature": 5}, 400, "temperature"),
    ({"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 10**7}, 400, "max_tokens"),
    ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": QUESTION, "session_id": "bad id!"}, 400, "session_id"),
    ({"messages": QUESTION, "logit_bias": {"999999999": 1}}, 400, "logit_bias"),
    ({"messages": QUESTION, "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),
    ({"messages": QUESTION, "logit_bias": {"9" * 5000: 1}}, 400, "logit_bias"),  # (int() limit)
    ({"messages": QUESTION, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "data:,x"}}]}]},
     400, "messages[0].content[0]"),
    ({"messages": QUESTION, "chat_template_kwargs": {"tokenize": False}}, 400,
     "chat_template_kwargs"),
    # Refusals are 400 (OpenAI's unsupported_parameter/value): SDKs retry every 5xx.
    ({"messages": QUESTION, "n": 17}, 400, "n"),  # more rows than MAX_NUM_SEQS (16)
    ({"messages": QUESTION, "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ({"messages": QUESTION, "tool_choice": "required"}, 400, "tool_choice"),  # no tools
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": "f"}}, 400, "tool_choice"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": ["f"]}}}, 400, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id"),
    ({"messages": QUESTION, "top_logprobs": 2}, 400, "top_logprobs"),  # needs logprobs: true
    ({"messages": QUESTION, "response_format": {"type": "grammar"}}, 400, "response_format.type"),
    ({"messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"not": {"type": "string"}}}}}, 400,
     "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_request_table(http, body, status, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]
    assert "Traceback" not in r.text


def test_malformed_json_and_wrong_routes(http):
    r = http.post("/v1/chat/completions", content=b"{not json",
                  headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_body_too_large_is_413(http):
    big = "x" * (21 * 1024 * 1024)
    r = http.post("/v1/chat/completions",
                  json={"messages": [{"role": "user", "content": big}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_fields_are_ignored(client, server):
    r = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=5,
                                       extra_body={"some_vendor_field": {"x": 1}})
    assert r.choices[0].message.content
    assert "some_vendor_field" in server.logs()


def test_server_keeps_serving_after_errors(client, http):
    for body, _, _ in BAD_REQUESTS:
        http.post("/v1/chat/completions", json=body)
    r = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content


def test_sampling_extensions_are_honoured(client, tok):
    base = dict(model="m", messages=QUESTION, temperature=0, max_tokens=12)
    plain = client.chat.completions.create(**base)
    # min_tokens/ignore_eos: the model may not stop before the floor.
    forced = client.chat.completions.create(**base, extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 12 and forced.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens < 12
    # A strong frequency penalty changes greedy output; repetition_penalty is accepted.
    penalized = client.chat.completions.create(**{**base, "max_tokens": 40}, frequency_penalty=2.0,
                                               extra_body={"repetition_penalty": 1.3, "top_k": 5})
    assert penalized.choices[0].message.content
    # logit_bias of -100 on the first answer token removes it from the answer.
    first = tok(plain.choices[0].message.content, add_special_tokens=False)["input_ids"][0]
    biased = client.chat.completions.create(**base, logit_bias={str(first): -100})
    assert tok(biased.choices[0].message.content,
               add_special_tokens=False)["input_ids"][0] != first


def test_non_stream_response_shape(http):
    r = http.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0,
                                                 "max_tokens": 10})
    body = r.json()
    assert r.headers["x-session-id"] and body["id"] == "chatcmpl-" + r.headers["x-session-id"]
    assert body["object"] == "chat.completion" and isinstance(body["created"], int)
    assert body["choices"][0]["message"]["role"] == "assistant"
    json.dumps(body)
    # The session of a non-stream request can be streamed too.
    _, events = read_events(http, "GET", f"/v1/sessions/{r.headers['x-session-id']}/stream")
    assert content_of(events) == body["choices"][0]["message"]["content"]
