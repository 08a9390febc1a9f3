"""The Responses API and legacy completions on the session log, through the official SDK."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest

from conftest import read_events

LONG = {"ignore_eos": True}  # vLLM extension: generate exactly max_output_tokens


def sid() -> str:
    return "r-" + uuid.uuid4().hex


def deltas_text(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


# --- responses: create, stream, retrieve -------------------------------------------------------

def test_response_non_stream(client):
    r = client.responses.create(model="m", input="What is the capital of France?",
                                 temperature=0, max_output_tokens=30)
    assert r.status == "completed" and "Paris" in r.output_text
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.usage.output_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.output[0].type == "message" and r.output[0].status == "completed"
    again = client.responses.retrieve(r.id)
    assert again.output_text == r.output_text and again.status == "completed"


def test_response_stream_typed_events(client):
    events = list(client.responses.create(model="m", input="What is the capital of France?",
                                          temperature=0, max_output_tokens=30, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert deltas_text(events) == final.output_text == events[-4].text
    assert "Paris" in final.output_text


def test_sse_ids_and_event_names(http):
    s = sid()
    _, events = read_events(http, "POST", "/v1/responses", json={
        "input": "Hi", "max_output_tokens": 5, "stream": True, "session_id": s,
        "ignore_eos": True})  # unseeded at temperature 1: an early end of turn was possible
    assert [e["id"] for e in events] == [f"{s}:{i}" for i in range(len(events))]
    for e in events[:-1]:
        data = json.loads(e["data"])
        assert e["event"] == data["type"] and data["sequence_number"] == int(e["id"].split(":")[1])
    assert events[-1]["data"] == "[DONE]"
    assert json.loads(events[-2]["data"])["type"] == "response.incomplete"  # 5 tokens: length


def test_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model="m", input="Tell me a story.", max_output_tokens=4,
                                extra_body=LONG)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 4


def test_instructions_are_a_system_message(client):
    a = client.responses.create(model="m", input="Who are you?", temperature=0,
                                max_output_tokens=20, instructions="You are a pirate.")
    b = client.responses.create(model="m", input="Who are you?", temperature=0,
                                max_output_tokens=20)
    assert a.usage.input_tokens != b.usage.input_tokens
    assert a.instructions == "You are a pirate."


# --- background and polling ---------------------------------------------------------------------

def test_background_then_poll_until_completed(client):
    r = client.responses.create(model="m", input="Tell me a long story.", max_output_tokens=60,
                                background=True, extra_body=LONG)
    assert r.status in ("queued", "in_progress") and r.background is True
    partial_seen, deadline = False, time.monotonic() + 120
    while True:
        got = client.responses.retrieve(r.id)
        if got.status == "in_progress" and got.output_text:
            partial_seen = True
        if got.status not in ("queued", "in_progress"):
            break
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert got.status == "incomplete" and got.usage.output_tokens == 60
    assert partial_seen  # a poller sees the output grow (the job-progress pattern)


def test_cancel_is_idempotent(client):
    r = client.responses.create(model="m", input="Tell me a long story.", max_output_tokens=2000,
                                background=True, extra_body=LONG)
    time.sleep(0.5)
    first = client.responses.cancel(r.id)
    assert first.status == "cancelled"
    assert client.responses.cancel(r.id).status == "cancelled"
    events = list(client.responses.retrieve(r.id, stream=True))
    assert events[-1].type == "response.cancelled"
    assert len(events) < 2000


def test_delete_and_unknown(client, http):
    r = client.responses.create(model="m", input="Hi", max_output_tokens=3)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    assert http.get("/v1/responses/resp_nope").status_code == 404
    assert http.post("/v1/responses/resp_nope/cancel").status_code == 404


# --- resume ---------------------------------------------------------------------------------------

def test_resume_with_starting_after(client):
    r = client.responses.create(model="m", input="Tell me a story.", max_output_tokens=40,
                                stream=True, extra_body=LONG)
    first = []
    for event in r:
        first.append(event)
        if len(first) == 7:
            break
    r.close()
    response_id = first[0].response.id
    rest = list(client.responses.retrieve(response_id, stream=True,
                                          starting_after=first[-1].sequence_number))
    joined = first + rest
    assert [e.sequence_number for e in joined] == list(range(len(joined)))
    assert deltas_text(joined) == joined[-1].response.output_text
    assert joined[-1].type == "response.incomplete"
    # Last-Event-ID works on the same URL.
    with httpx.stream("GET", f"{client.base_url}responses/{response_id}?stream=true",
                      headers={"Last-Event-ID": f"{response_id[5:]}:{len(joined) - 3}"}) as raw:
        tail = [line for line in raw.iter_lines() if line.startswith("id: ")]
    assert tail == [f"id: {response_id[5:]}:{i}" for i in range(len(joined) - 2, len(joined) + 1)]


def test_previous_response_id_round_trip(client):
    first = client.responses.create(model="m", input="What is the capital of France?",
                                    temperature=0, max_output_tokens=30)
    second = client.responses.create(model="m", input="And of Germany?", temperature=0,
                                     max_output_tokens=30, previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert "Berlin" in second.output_text
    items = client.responses.input_items.list(second.id).data
    assert [i.content[0].text for i in items] == ["And of Germany?"]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", input="x", previous_response_id="resp_missing")
    unstored = client.responses.create(model="m", input="Hi", max_output_tokens=3, store=False)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", input="x", previous_response_id=unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("extra,param,code", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_value"),
    ({"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"truncation": "auto"}, "truncation", "unsupported_value"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "array",
                                                                          "uniqueItems": True}}}},
     "text.format.schema", "invalid_json_schema"),
    ({"include": ["reasoning.encrypted_content"]}, "include", "unsupported_value"),
    ({"reasoning": {"summary": "auto"}}, "reasoning.summary", "unsupported_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type", "unsupported_value"),
    ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]},
     "input[0].type", "unsupported_value"),
])
def test_unsupported_features_are_400_not_retried_5xx(http, extra, param, code):
    r = http.post("/v1/responses", json={"input": "Hi", **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")


@pytest.mark.parametrize("extra,param", [
    ({"text": {"format": None}}, None),
    ({"text": {"format": "x"}}, "text.format"),
    ({"input": [{"role": "user", "content": ["hi"]}]}, "input[0].content[0]"),
])
def test_malformed_response_fields_are_400_not_500(http, extra, param):
    r = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2, **extra})
    assert r.status_code == (200 if param is None else 400), r.text
    if param:
        assert r.json()["error"]["param"] == param


def test_unknown_response_fields_are_ignored(http):
    r = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 3,
                                         "some_new_field": True})
    assert r.status_code == 200


# --- legacy completions --------------------------------------------------------------------------

def test_completions_stream_and_non_stream(client):
    kwargs = dict(model="m", prompt="The capital of France is", max_tokens=10, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert "Paris" in full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 10
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    echo = client.completions.create(**kwargs, echo=True)
    assert echo.choices[0].text == "The capital of France is" + full.choices[0].text
    ids = client.completions.create(model="m", prompt=[504, 3575, 282, 4649, 314], max_tokens=3)
    assert ids.usage.prompt_tokens == 5


def test_completions_resume_and_cancel(http):
    s = sid()
    body = {"prompt": "Once upon a time", "max_tokens": 40, "stream": True, "session_id": s,
            "temperature": 0, "ignore_eos": True}
    _, first = read_events(http, "POST", "/v1/completions", limit=4, json=body)
    _, rest = read_events(http, "POST", "/v1/completions", json=body,
                          headers={"Last-Event-ID": first[-1]["id"]})
    joined = first + rest
    assert [e["id"] for e in joined] == [f"{s}:{i}" for i in range(len(joined))]
    _, whole = read_events(http, "GET", f"/v1/sessions/{s}/stream")
    assert whole == joined
    c = sid()
    read_events(http, "POST", "/v1/completions", limit=2,
                json={**body, "session_id": c, "max_tokens": 3000})
    assert http.post(f"/v1/cancel/{c}").json()["state"] == "cancelled"
    _, events = read_events(http, "GET", f"/v1/sessions/{c}/stream")
    assert json.loads(events[-2]["data"])["choices"][0]["finish_reason"] == "cancelled"


@pytest.mark.parametrize("extra,status,param", [
    ({"suffix": "end"}, 400, "suffix"),
    ({"n": 17}, 400, "n"),  # more rows than MAX_NUM_SEQS (16)
    ({"n": 9, "prompt": ["a", "b"]}, 400, "n"),  # 18 rows
    ({"echo": True, "logprobs": 2}, 400, "logprobs"),
    ({"n": 3, "best_of": 1}, 400, "best_of"),
    ({"best_of": 2}, 400, "best_of"),
    ({"prompt": [[1, 2], [10**9]]}, 400, "prompt[1]"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [10**9]}, 400, "prompt"),
    ({"max_tokens": 0}, 400, "max_tokens"),
])
def test_completions_errors(http, extra, status, param):
    r = http.post("/v1/completions", json={"prompt": "Hi", **extra})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_models_list_supported_apis(client):
    model = client.models.list().data[0].model_dump()
    assert model["supported_apis"] == ["chat_completions", "completions", "responses"]


def test_compact_is_an_openai_404_not_405(http, client):
    r = http.post("/v1/responses/compact", json={"model": "m", "input": "hi"})
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "unsupported_endpoint" and "compaction" in err["message"]
    compact = getattr(client.responses, "compact", None)
    if compact is not None:  # the SDK's own method gets the same answer, not retried
        with pytest.raises(openai.NotFoundError):
            compact(model="m", input="hi")


def test_response_object_carries_the_values_used(client):
    r = client.responses.create(model="m", input="Say hi.", temperature=0, max_output_tokens=200)
    d = r.model_dump()
    assert d["status"] == "completed" and d["completed_at"] is not None  # unix seconds
    assert d["completed_at"] >= d["created_at"]
    assert d["temperature"] == 0.0 and d["top_p"] == 1.0  # top_p: the default used, not null
    assert d["presence_penalty"] == d["frequency_penalty"] == 0.0 and d["top_logprobs"] == 0
    assert d["service_tier"] == "default" and d["text"]["format"] == {"type": "text"}
    assert d["tools"] == [] and d["tool_choice"] == "none" and d["truncation"] == "disabled"
    assert client.responses.retrieve(r.id).completed_at == d["completed_at"]
    chosen = client.responses.create(model="m", input="Hi", max_output_tokens=3,
                                     temperature=0.5, top_p=0.9, service_tier="auto")
    assert (chosen.temperature, chosen.top_p, chosen.service_tier) == (0.5, 0.9, "auto")
    default = client.responses.create(model="m", input="Hi", max_output_tokens=3)
    assert default.temperature == 1.0  # TEMPERATURE, the server default
    assert default.status == "incomplete" and default.completed_at is None
