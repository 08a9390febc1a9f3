"""API keys, session ownership, CORS and the Host check, against one real server started with
API_KEYS and CORS_ALLOW_ORIGINS (and the default ALLOWED_HOSTS)."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from conftest import (QUESTION, CuttableProxy, Server, answer, ask_in_page,
                      assert_each_event_once, content_of, read_events, wait_for_text)

KEY_A, KEY_B = "sk-test-alpha-0123456789", "sk-test-beta-9876543210"
ORIGIN = "http://app.example"
CHAT = {"messages": QUESTION, "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("sec"), API_KEYS=f"{KEY_A}, {KEY_B}",
                    CORS_ALLOW_ORIGINS=ORIGIN).start()
    yield server
    server.stop()


def client(srv, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=srv.url, timeout=60, headers=headers)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_v1_routes_need_a_key_and_health_does_not(srv):
    with client(srv, None) as anon, client(srv, "sk-wrong") as wrong, client(srv, KEY_B) as b:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                             ("GET", "/v1/sessions/x"), ("POST", "/v1/cancel/x")]:
            err = error_of(anon.request(method, path, json=CHAT), 401)
            assert err["code"] == "missing_api_key"
            err = error_of(wrong.request(method, path, json=CHAT), 401)
            assert err["code"] == "invalid_api_key" and "sk-wrong" not in err["message"]
        assert anon.get("/health").status_code == 200
        assert b.get("/v1/models").status_code == 200
    # The openai SDK sends its api_key as the Bearer token.
    sdk = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY_A, max_retries=0)
    assert sdk.chat.completions.create(model="m", **CHAT).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert KEY_A not in srv.logs() and KEY_B not in srv.logs()


def test_a_session_is_visible_only_to_its_key(srv):
    s = "sec-" + uuid.uuid4().hex
    with client(srv, KEY_A) as a, client(srv, KEY_B) as b:
        _, events = read_events(a, "POST", "/v1/chat/completions",
                                json={**CHAT, "stream": True, "session_id": s})
        assert events[-1]["data"] == "[DONE]"
        assert a.get(f"/v1/sessions/{s}").status_code == 200
        # Another key learns nothing: the same 404 as for an id that never existed.
        missing = error_of(b.get("/v1/sessions/never-" + uuid.uuid4().hex), 404)
        for method, path in [("GET", f"/v1/sessions/{s}"), ("GET", f"/v1/sessions/{s}/stream"),
                             ("POST", f"/v1/cancel/{s}"), ("DELETE", f"/v1/sessions/{s}")]:
            err = error_of(b.request(method, path), 404)
            assert err["code"] == missing["code"]
        r = b.post("/v1/chat/completions", json={**CHAT, "stream": True},
                   headers={"Last-Event-ID": f"{s}:0"})
        error_of(r, 404)
        # The same body under another key: the id is taken, without saying by whom.
        err = error_of(b.post("/v1/chat/completions",
                              json={**CHAT, "stream": True, "session_id": s}), 409)
        assert err["code"] == "session_conflict" and "in use" in err["message"]
        # Responses: retrieve, cancel, delete, input_items, previous_response_id.
        r = a.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 4,
                                          "temperature": 0})
        rid = r.json()["id"]
        for method, path in [("GET", f"/v1/responses/{rid}"),
                             ("GET", f"/v1/responses/{rid}/input_items"),
                             ("POST", f"/v1/responses/{rid}/cancel"),
                             ("DELETE", f"/v1/responses/{rid}")]:
            error_of(b.request(method, path), 404)
        error_of(b.post("/v1/responses", json={"input": "And?", "previous_response_id": rid}),
                 404)
        assert a.get(f"/v1/responses/{rid}").status_code == 200
        assert a.get(f"/v1/sessions/{s}").status_code == 200  # B's DELETE changed nothing


def test_cors_allows_the_configured_origin_only(srv):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,authorization,last-event-id"}
    with client(srv, None) as anon:
        r = anon.options("/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        allowed = r.headers["access-control-allow-headers"].lower()
        assert {"content-type", "authorization", "last-event-id"} <= set(allowed.split(", "))
        assert "DELETE" in r.headers["access-control-allow-methods"]
        r = anon.options("/v1/chat/completions",
                         headers={"Origin": "http://evil.example", **preflight})
        assert "access-control-allow-origin" not in r.headers
    with client(srv, KEY_A) as a:
        r = a.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "x-session-id" in r.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        r = a.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_host_header_on_loopback_must_be_a_local_name(srv):
    with client(srv, None) as anon:
        for host in ("localhost", f"localhost:{srv.port}", f"127.0.0.1:{srv.port}",
                     f"[::1]:{srv.port}"):
            assert anon.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", f"evil.example:{srv.port}", "127.0.0.1.evil.example"):
            err = error_of(anon.get("/health", headers={"Host": host}), 400)
            assert err["code"] == "invalid_host"


# --- the playground with keys: the key field, and the resume over fetch ------------------------


def test_the_playground_asks_for_the_key_and_resumes_with_it(srv, browser, tmp_path):
    """With API_KEYS the page shows its key field (its first /v1 call is 401), and after a
    drop it resumes over fetch with the key (an EventSource cannot send Authorization)."""
    proxy = CuttableProxy(srv.port)
    context = browser.new_context(bypass_csp=True)  # see tests/test_playground.py
    page = context.new_page()
    try:
        page.goto(proxy.url + "/")
        page.wait_for_selector("#key-box:not([hidden])")
        page.fill("#key", KEY_A)
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('Smol')")
        proxy.stall_after(6000)
        ask_in_page(page, "Write a long story about a dragon.", 60)
        wait_for_text(page, 20)
        assert proxy.cut() >= 1
        page.wait_for_selector("#state[data-state=done]", timeout=90_000)
        session_id, text, finish = answer(page)
        assert "reconnecting" in page.evaluate("window.playground.states")
        assert finish == "length"
        assert_each_event_once(page)
        with client(srv, KEY_A) as a:
            _, events = read_events(a, "GET", f"/v1/sessions/{session_id}/stream")
        assert text == content_of(events)
        # The key stays in the tab: never in the URL.
        assert KEY_A not in page.url
        page.screenshot(path=str(tmp_path / "playground-keys.png"))
    finally:
        context.close()
        proxy.close()
