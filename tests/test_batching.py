"""Many sessions in one batch, end to end: a real uvicorn process serving SmolLM2, the official
openai SDK and raw SSE. Each per-request feature is checked next to other running sessions
against the same request run alone (greedy and seeded output must not depend on neighbours),
plus n, logprobs and several prompts, which batching made possible."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import Server, metric, read_events

STORY = [{"role": "user", "content": "Write a long story about a dragon."}]
PROMPTS = ["Name three colors.", "What is 2 + 2?", "Say hello in French.",
           "Describe the sea in one sentence."]


def chat(client, prompt: str, **kw) -> str:
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                       **{"temperature": 0, "max_tokens": 16, **kw})
    return r.choices[0].message.content


def together(*calls):
    """Run the calls at once (each in its own thread); their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


# --- sessions join a running batch ------------------------------------------------------------


def test_a_short_request_finishes_while_a_long_one_runs(server, client, http):
    """With one-at-a-time generation the short request waits behind the long one."""
    long_id = f"long-{time.time_ns()}"
    started = threading.Event()
    long_done: dict = {}

    def long_stream():
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": STORY, "temperature": 0, "max_tokens": 100, "ignore_eos": True,
                "stream": True, "session_id": long_id}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    started.set()
        long_done["at"] = time.monotonic()

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(60)
    short = client.completions.create(model="m", prompt="One, two,", max_tokens=4,
                                      temperature=0)
    short_done = time.monotonic()
    assert short.choices[0].finish_reason == "length"
    t.join(120)
    assert short_done < long_done["at"]
    assert http.get(f"/v1/sessions/{long_id}").json()["state"] == "completed"


def test_greedy_output_does_not_depend_on_neighbours(client):
    alone = [chat(client, p) for p in PROMPTS]
    batched = together(*[lambda p=p: chat(client, p) for p in PROMPTS],
                       lambda: chat(client, "Tell a joke.", temperature=1.0, max_tokens=40))
    assert batched[:4] == alone


def test_seeded_sampling_does_not_depend_on_neighbours(client):
    kw = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=30)
    alone = chat(client, PROMPTS[0], **kw)
    other_seed = chat(client, PROMPTS[0], **{**kw, "seed": 99})
    assert alone != other_seed  # the seed matters...
    batched = together(lambda: chat(client, PROMPTS[0], **kw),
                       lambda: chat(client, PROMPTS[1], temperature=0.7, max_tokens=40),
                       lambda: chat(client, PROMPTS[2], max_tokens=10))
    assert batched[0] == alone  # ...and nothing else does


@pytest.mark.parametrize("kw", [
    {"extra_body": {"top_k": 5}, "temperature": 0.8, "seed": 3},
    {"extra_body": {"min_p": 0.2}, "temperature": 1.0, "seed": 4},
    {"presence_penalty": 1.5, "frequency_penalty": 1.0},
    {"extra_body": {"repetition_penalty": 1.5}},
    {"stop": [" the", "."]},
    {"max_tokens": 3},
    {"extra_body": {"min_tokens": 20}},
])
def test_per_request_sampling_holds_inside_a_batch(client, kw):
    alone = chat(client, PROMPTS[3], **kw)
    batched = together(lambda: chat(client, PROMPTS[3], **kw),
                       lambda: chat(client, PROMPTS[0], temperature=1.0, max_tokens=16),
                       lambda: chat(client, PROMPTS[1], max_tokens=16))
    assert batched[0] == alone


def test_logit_bias_applies_to_its_row_only(client):
    forced, plain = together(
        lambda: client.completions.create(model="m", prompt="The sky is", max_tokens=5,
                                          temperature=0, logit_bias={"28": 100}),
        lambda: client.completions.create(model="m", prompt="The sky is", max_tokens=5,
                                          temperature=0))
    assert forced.choices[0].text != plain.choices[0].text
    assert plain.choices[0].text == client.completions.create(
        model="m", prompt="The sky is", max_tokens=5, temperature=0).choices[0].text


def test_cancel_one_session_leaves_the_others(client, http):
    solo = chat(client, PROMPTS[1], max_tokens=40)
    victim = f"victim-{time.time_ns()}"
    body = {"messages": STORY, "temperature": 0, "max_tokens": 400, "ignore_eos": True,
            "session_id": victim}

    def run_victim():
        return read_events(httpx.Client(base_url=http.base_url, timeout=120), "POST",
                           "/v1/chat/completions", json={**body, "stream": True})

    def run_other():
        time.sleep(0.3)
        return chat(client, PROMPTS[1], max_tokens=40)

    def cancel():
        time.sleep(1.5)
        return http.post(f"/v1/cancel/{victim}").json()

    (_, events), other, cancelled = together(run_victim, run_other, cancel)
    assert cancelled["state"] == "cancelled"
    finish = [c["finish_reason"] for e in events if e["data"] != "[DONE]"
              for c in json.loads(e["data"])["choices"] if c["finish_reason"]]
    assert finish == ["cancelled"]
    assert other == solo


def test_usage_and_reasoning_free_text_per_session(client):
    a, b = together(
        lambda: client.chat.completions.create(model="m", messages=STORY, max_tokens=7,
                                               temperature=0, extra_body={"ignore_eos": True}),
        lambda: client.chat.completions.create(model="m", messages=STORY[:1], max_tokens=11,
                                               temperature=0, extra_body={"ignore_eos": True}))
    assert a.usage.completion_tokens == 7 and b.usage.completion_tokens == 11
    assert a.usage.prompt_tokens == b.usage.prompt_tokens > 0


# --- n, logprobs, several prompts -------------------------------------------------------------


def test_n_choices_non_streamed_seeded_and_distinct(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user",
                                                             "content": PROMPTS[0]}],
                                       n=3, temperature=1.0, seed=7, max_tokens=20)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3
    # choice 0 of a seeded request is what n=1 with that seed gives
    assert texts[0] == chat(client, PROMPTS[0], temperature=1.0, seed=7, max_tokens=20)
    again = client.chat.completions.create(model="m", messages=[{"role": "user",
                                                                 "content": PROMPTS[0]}],
                                           n=3, temperature=1.0, seed=7, max_tokens=20)
    assert [c.message.content for c in again.choices] == texts
    assert r.usage.completion_tokens >= 3  # summed over the choices


def test_n_choices_stream_interleaved_and_resumable(server, http):
    sid = f"n-{time.time_ns()}"
    body = {"messages": STORY, "n": 2, "temperature": 0.9, "seed": 11, "max_tokens": 30,
            "stream": True, "session_id": sid, "stream_options": {"include_usage": True}}
    _, events = read_events(http, "POST", "/v1/chat/completions", json=body)
    assert events[-1]["data"] == "[DONE]"
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["delta"].get("content") or ""
            if ch["finish_reason"]:
                finishes[ch["index"]] = ch["finish_reason"]
    assert set(finishes) == {0, 1} and texts[0] != texts[1]
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    order = [ch["index"] for c in chunks for ch in c["choices"] if ch["delta"].get("content")]
    assert order != sorted(order)  # interleaved, not one choice after the other
    # resume from the middle: exactly the rest, byte for byte
    mid = len(events) // 2
    _, rest = read_events(http, "POST", "/v1/chat/completions", json=body,
                          headers={"Last-Event-ID": events[mid]["id"]})
    assert [e["raw"] for e in rest] == [e["raw"] for e in events[mid + 1:]]


def test_chat_logprobs_stream_and_not(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user",
                                                             "content": PROMPTS[1]}],
                                       logprobs=True, top_logprobs=3, temperature=0,
                                       max_tokens=8, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content) == r.choices[0].message.content
    streamed = []
    for chunk in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": PROMPTS[1]}], logprobs=True,
            top_logprobs=3, temperature=0, max_tokens=8, stream=True,
            extra_body={"ignore_eos": True}):
        for ch in chunk.choices:
            if ch.logprobs and ch.logprobs.content:
                streamed += ch.logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model="m", messages=[{"role": "user",
                                                                 "content": PROMPTS[1]}],
                                           temperature=0, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_completions_several_prompts_n_and_logprobs(client):
    r = client.completions.create(model="m", prompt=["The sky is", "Grass is"], n=2,
                                  max_tokens=6, temperature=0.8, seed=5, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        # the top 2 plus the sampled token, as OpenAI's legacy logprobs
        assert all(tok in top and len(top) <= 3 for tok, top in zip(lp.tokens, lp.top_logprobs))
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        assert "".join(lp.tokens) == c.text
    alone = client.completions.create(model="m", prompt="Grass is", max_tokens=6,
                                      temperature=0.8, seed=5)
    assert r.choices[2].text == alone.choices[0].text  # prompt 1, choice 0
    assert r.usage.prompt_tokens == sum(
        client.completions.create(model="m", prompt=p, max_tokens=1).usage.prompt_tokens
        for p in ["The sky is", "Grass is"])
    echo = client.completions.create(model="m", prompt=["A", "B"], max_tokens=2, echo=True,
                                     temperature=0)
    assert echo.choices[0].text.startswith("A") and echo.choices[1].text.startswith("B")


def test_completions_stream_several_prompts(http):
    _, events = read_events(http, "POST", "/v1/completions", json={
        "prompt": ["One,", "Two,", "Three,"], "max_tokens": 5, "temperature": 0,
        "stream": True, "ignore_eos": True})
    finishes = {ch["index"]: ch["finish_reason"] for e in events if e["data"] != "[DONE]"
                for ch in json.loads(e["data"])["choices"] if ch["finish_reason"]}
    assert finishes == {0: "length", 1: "length", 2: "length"}


def test_responses_output_text_logprobs(client):
    r = client.responses.create(model="m", input=PROMPTS[2], max_output_tokens=6,
                                temperature=0, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    part = r.output[-1].content[0]
    assert part.logprobs and len(part.logprobs) <= 6
    assert all(len(lp.top_logprobs) == 2 for lp in part.logprobs)


# --- admission and metrics --------------------------------------------------------------------


def test_queue_full_is_429_and_metrics_show_the_batch(tmp_path):
    s = Server(tmp_path, MAX_NUM_SEQS="1", MAX_QUEUED_REQUESTS="1").start()
    try:
        with httpx.Client(base_url=s.url, timeout=60) as h:
            long = {"messages": STORY, "temperature": 0, "max_tokens": 300, "ignore_eos": True,
                    "background": True}
            ids = []
            for i in range(2):  # one runs, one waits
                r = h.post("/v1/responses", json={"input": "Write a long story.",
                                                  "max_output_tokens": 300, "background": True,
                                                  "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                ids.append(r.json()["id"])
            deadline = time.monotonic() + 30
            while metric(s.url, "resumable_num_requests_running") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert metric(s.url, "resumable_num_requests_waiting") == 1
            assert 0 < metric(s.url, "resumable_kv_cache_usage_perc") <= 1
            r = h.post("/v1/chat/completions", json=long)
            assert r.status_code == 429 and r.headers["Retry-After"]
            assert r.json()["error"]["code"] == "queue_full"
            for rid in ids:
                h.post(f"/v1/responses/{rid}/cancel")
            assert metric(s.url, "resumable_time_to_first_token_seconds_count") >= 1
    finally:
        s.stop()
