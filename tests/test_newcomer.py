"""What a newcomer meets in the first hour: `python main.py`, Ctrl-C with a live stream,
refusals an SDK must not retry, offline /docs, an honest /openapi.json, and plain-spoken
messages for the usual mistakes in a request."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import LONG, QUESTION, ROOT, free_port, read_events


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# --- python main.py, then Ctrl-C with a live stream -------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT (Ctrl-C) to the process")
def test_python_main_py_serves_and_ctrl_c_shuts_down_cleanly(tmp_path):
    port, db = free_port(), tmp_path / "s.db"
    # vLLM's flags map onto the settings (SERVED_MODEL_NAME, API_KEYS).
    proc = subprocess.Popen([sys.executable, "main.py", "--port", str(port),
                             "--served-model-name", "smol", "--api-key", "k1"], cwd=ROOT,
                            env={**__import__("os").environ, "SESSIONS_DB_PATH": str(db)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "".join(out)
            assert time.monotonic() < deadline, "".join(out)
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": "Bearer k1"}) as http:
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["smol"]
            assert httpx.get(url + "/v1/models").status_code == 401
            _, seen = read_events(http, "POST", "/v1/chat/completions", limit=5,
                                  json={**LONG, "model": "smol", "stream": True,
                                        "session_id": "ctrl-c"})
            assert len(seen) == 5
        # The generation goes on without its client; Ctrl-C arrives in the middle of it.
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(out)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out)
    assert "terminate called" not in text and "Traceback" not in text, text[-3000:]
    # Once the model is ready, one line says where to go (the port as bound).
    assert f"ready: the API is at http://127.0.0.1:{port}/v1, the playground at " \
           f"http://127.0.0.1:{port}/" in text, text[-3000:]
    with sqlite3.connect(db) as conn:
        state, reason = conn.execute(
            "SELECT state, finish_reason FROM sessions WHERE id='ctrl-c'").fetchone()
        last = conn.execute("SELECT data FROM events WHERE session_id='ctrl-c' "
                            "ORDER BY idx DESC LIMIT 1").fetchone()[0]
    # Left to the next start, which continues it (CONTINUE_AFTER_RESTART; tests/test_restart.py)
    assert (state, reason) == ("in_progress", None) and last != "[DONE]"


# --- refusals are 400, which SDKs do not retry ------------------------------------------------

def test_unsupported_field_is_400_and_not_retried(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=2)
    marker = "refusal-" + str(time.time_ns())
    before = server.logs().count("POST /v1/chat/completions")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=QUESTION, n=50, user=marker)
    err = info.value.body
    assert (err["code"], err["param"], err["type"]) == ("unsupported_value", "n",
                                                         "invalid_request_error")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=QUESTION,
                                       web_search_options={})
    assert info.value.body["code"] == "unsupported_parameter"
    time.sleep(0.5)
    assert server.logs().count("POST /v1/chat/completions") - before == 2  # one try each


# --- /docs without internet, /openapi.json that tells the truth --------------------------------

def test_docs_pages_use_no_cdn(http):
    for page in ("/docs", "/redoc"):
        html = http.get(page).text
        assert "cdn" not in html.lower() and "http://" not in html and "https://" not in html
        assets = re.findall(r'"(/static-offline-docs/[\w.-]+\.(?:js|css))"', html)
        assert assets, html
        for path in assets:
            r = http.get(path)
            assert r.status_code == 200 and len(r.content) > 10_000, path


def test_openapi_schema_is_valid_and_says_400_not_422(http):
    from openapi_spec_validator import validate

    schema = http.get("/openapi.json").json()
    validate(schema)
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in chat["responses"]
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] \
        == "#/components/schemas/ErrorResponse"
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert {"name": "Last-Event-ID", "in": "header"}.items() <= next(
        p for p in chat["parameters"] if p["in"] == "header").items()
    stream = schema["paths"]["/v1/sessions/{session_id}/stream"]["get"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert "422" not in json.dumps(schema["paths"])


# --- the usual mistakes get a message that says how to fix them --------------------------------

@pytest.mark.parametrize("content,headers,code,words", [
    (b"{not json", {"Content-Type": "application/json"}, "invalid_json", "not valid JSON"),
    (json.dumps({"messages": QUESTION}).encode(), {"Content-Type": "text/plain"},
     "invalid_content_type", "Content-Type: application/json"),
    (json.dumps({"messages": QUESTION}).encode(), {}, "invalid_content_type",
     "Content-Type: application/json"),
    (b"", {"Content-Type": "application/json"}, "missing_body", "empty"),
    (b"[1, 2]", {"Content-Type": "application/json"}, "invalid_body", "not a JSON array"),
])
def test_common_mistakes_get_clear_messages(http, content, headers, code, words):
    r = http.post("/v1/chat/completions", content=content, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and words in err["message"], err
