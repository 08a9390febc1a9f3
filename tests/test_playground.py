"""The browser playground in a real headless Chromium (Debian's `chromium`, driven by
playwright's Python API with `executable_path`; playwright's own browser download is not
used), plus what operators see of the same server: JSON logs, /metrics, request ids. The
server is the suite's shared one (conftest.py), which logs JSON.

The browser reaches the server through `CuttableProxy`, a small TCP proxy a test cuts
mid-stream (every open connection reset at once, as a dropped wifi does); the page must end
with exactly the text the session stored, each event applied once. Every line the server
wrote so far (the earlier modules' traffic too) must parse as JSON, with no prompt in them.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import (CuttableProxy, answer, ask_in_page, assert_each_event_once,
                      content_of, read_events, wait_for_text)

# Seen in a stored prompt only if a log line leaked it.
CANARY = "zebra-canary-7731"


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(server):
    p = CuttableProxy(server.port)
    yield p
    p.close()


@pytest.fixture
def page(browser, proxy, tmp_path):
    # bypass_csp: playwright evaluates its wait conditions as strings, which the page's CSP
    # (no eval) refuses; the page itself runs under it in the other tests' checks.
    context = browser.new_context(viewport={"width": 1000, "height": 800}, bypass_csp=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(proxy.url + "/")
    pg.wait_for_function("document.getElementById('model').textContent.startsWith('SmolLM2')")
    yield pg
    pg.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    context.close()
    assert errors == [], f"the page raised: {errors}"


def stored_answer(server, session_id: str) -> str:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r, events = read_events(c, "GET", f"/v1/sessions/{session_id}/stream")
    assert r.status_code == 200
    return content_of(events)


# --- the browser tests ------------------------------------------------------------------------


def test_a_stream_cut_mid_way_ends_with_the_whole_answer_once(page, proxy, server):
    proxy.stall_after(6000)  # a few events reach the page, then the stream stalls
    ask_in_page(page, "Write a long story about a dragon.", 80)
    wait_for_text(page, 20)
    assert proxy.cut() >= 1  # the POST's connection, mid-stream
    page.wait_for_selector("#state[data-state=done]", timeout=90_000)
    session_id, text, finish = answer(page)
    assert "reconnecting" in page.evaluate("window.playground.states")
    assert finish == "length"
    assert text == stored_answer(server, session_id) and len(text) > 60
    assert_each_event_once(page)
    assert page.text_content("#speed").startswith("80 tokens")


def test_a_reload_mid_stream_picks_the_session_up_again(page, proxy, server):
    proxy.stall_after(6000)  # mid-answer whatever the model's speed ...
    ask_in_page(page, "Tell me about the history of Rome.", 80)
    wait_for_text(page, 20)
    url_session = page.evaluate("new URLSearchParams(location.search).get('session')")
    proxy.cut()  # ... and let the reload's own requests through
    page.reload()
    page.wait_for_selector("#state[data-state=done]", timeout=90_000)
    session_id, text, finish = answer(page)
    assert session_id == url_session
    assert text == stored_answer(server, session_id) and finish == "length"
    assert "history of Rome" in page.text_content(".msg.user")  # the question survived too
    assert_each_event_once(page)


def test_cancel_stops_the_generation(page, server):
    ask_in_page(page, "Write a long story about a dragon.", 400)
    wait_for_text(page, 10)
    page.click("#cancel")
    page.wait_for_selector("#state[data-state=cancelled]", timeout=60_000)
    session_id, text, finish = answer(page)
    assert finish == "cancelled"
    state = httpx.get(f"{server.url}/v1/sessions/{session_id}", timeout=10).json()
    assert state["state"] == "cancelled"
    assert text == stored_answer(server, session_id)


def test_new_chat_mid_stream_leaves_the_old_stream_behind(page, proxy, server):
    """New chat while an answer streams and its connection is cut: nothing of the old
    session (events, reconnects, its end) reaches the next conversation."""
    proxy.stall_after(6000)
    ask_in_page(page, "Write a long story about a dragon.", 200)
    wait_for_text(page, 10)
    proxy.cut()  # the old turn is now resuming
    page.click("#new-chat")
    ask_in_page(page, "Say hello.", 8)
    page.wait_for_selector("#state[data-state=done]", timeout=60_000)
    page.wait_for_timeout(1500)  # room for a stray callback of the old turn to misbehave
    assert page.locator(".msg.assistant").count() == 1
    session_id, text, finish = answer(page)
    assert text == stored_answer(server, session_id) and finish in ("stop", "length")
    assert page.get_attribute("#state", "data-state") == "done"
    seen = page.evaluate("window.playground.seen")
    assert seen[-1].startswith(session_id + ":")


def test_the_page_runs_under_its_own_content_security_policy(browser, proxy):
    """The other tests bypass the CSP (playwright's wait conditions are strings it refuses);
    here it is on, and the page still streams an answer without one violation."""
    context = browser.new_context()
    pg = context.new_page()
    violations: list[str] = []
    pg.on("console", lambda m: violations.append(m.text)
          if "Content Security Policy" in m.text else None)
    try:
        pg.goto(proxy.url + "/")
        pg.wait_for_selector("#model:has-text('SmolLM2')")
        ask_in_page(pg, "Say hello.", 8)
        pg.wait_for_selector("#state[data-state=done]", timeout=60_000)
        assert pg.text_content(".msg.assistant .content")
        assert violations == []
    finally:
        context.close()


# --- without a browser: the page itself, logs, metrics ----------------------------------------


def test_the_page_is_one_local_file(server):
    for path in ("/", "/playground"):
        r = httpx.get(server.url + path, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["content-security-policy"]
        # Nothing from a CDN: every src/href is a path on this server or an anchor.
        for attr in ("src=\"", "href=\""):
            for part in r.text.split(attr)[1:]:
                assert part.startswith(("/", "#")), part[:60]
        assert "http://" not in r.text and "https://" not in r.text


def test_metrics_answer_without_a_redirect(server):
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and "resumable_generations_started_total" in r.text
    assert r.headers["content-type"].startswith("text/plain")
    open_metrics = httpx.get(server.url + "/metrics", timeout=10,
                             headers={"Accept": "application/openmetrics-text"})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")


def test_json_logs_name_requests_and_sessions_never_prompts(server):
    body = {"messages": [{"role": "user", "content": f"Say {CANARY} twice."}],
            "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r, events = read_events(c, "POST", "/v1/chat/completions", json=body,
                                headers={"X-Request-Id": "req-canary-1"})
        assert r.headers["x-request-id"] == "req-canary-1"
        session_id = r.headers["x-session-id"]
        generated = r.headers["x-request-id"] and c.get("/health").headers["x-request-id"]
        assert len(generated) == 16  # a request id is made when the client sends none
        bad = c.post("/v1/chat/completions", json={"messages": "no"})
        assert bad.status_code == 400
    # The access record is written once the response has gone out: wait for the last one.
    deadline = time.monotonic() + 10
    while True:
        records = [json.loads(line)  # every line, uvicorn's included, is JSON
                   for line in server.logs().splitlines() if line.strip()]
        if any(r.get("request_id") == bad.headers["x-request-id"] for r in records) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)
    access = [r for r in records if r.get("request_id") == "req-canary-1"
              and r["logger"] == "resumable.access"]
    assert len(access) == 1, access
    a = access[0]
    assert (a["method"], a["path"], a["status"], a["session_id"]) == (
        "POST", "/v1/chat/completions", 200, session_id)
    assert a["latency_ms"] >= a["ttfb_ms"] > 0
    assert any(r.get("status") == 400 and r["logger"] == "resumable.access" for r in records)
    assert CANARY not in server.logs()
    assert content_of(events)  # the request itself worked
