"""Request ids and the access record, in process (no model: the app is built, not started).
The JSON format end to end, on a real server, is in tests/test_playground.py."""

from __future__ import annotations

import logging

import pytest
from starlette.testclient import TestClient


@pytest.fixture
def app():
    import main
    app = main.create_app()

    @app.get("/v1/boom")
    async def boom():
        raise RuntimeError("secret internals /srv/models")

    @app.get("/v1/store-down")
    async def store_down():
        from store import StoreUnavailable
        raise StoreUnavailable("Redis redis://10.1.2.3:6379/0 cannot be read")

    return app


def test_a_request_id_is_echoed_or_made(app, caplog):
    caplog.set_level(logging.DEBUG, logger="resumable.access")
    # Not `with`: that would run the lifespan (store, model load).
    c = TestClient(app, raise_server_exceptions=False)
    r = c.get("/no-such-route", headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "abc-123"
    records = [r for r in caplog.records if r.name == "resumable.access"]
    assert records and records[-1].request_id == "abc-123"


def test_an_unsafe_request_id_is_replaced(app):
    c = TestClient(app, raise_server_exceptions=False)
    r = c.get("/no-such-route", headers={"X-Request-Id": "x" * 65})
    assert r.status_code == 404
    assert r.headers["x-request-id"] != "x" * 65 and len(r.headers["x-request-id"]) == 16


def test_a_500_names_its_request_id_and_hides_the_exception(app, caplog):
    caplog.set_level(logging.DEBUG)
    c = TestClient(app, raise_server_exceptions=False)
    r = c.get("/v1/boom", headers={"X-Request-Id": "req-500"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "req-500"
    assert "req-500" in r.json()["error"]["message"]
    assert "secret" not in r.text and "/srv" not in r.text
    access = [x for x in caplog.records if x.name == "resumable.access"]
    assert access[-1].status == 500 and access[-1].request_id == "req-500"
    failed = [x for x in caplog.records if x.name == "resumable" and x.exc_info]
    assert failed and "req-500" in failed[-1].getMessage()


def test_text_and_json_lines_carry_the_request_id():
    import io
    import json

    import telemetry
    for log_format in ("text", "json"):
        stream = io.StringIO()
        telemetry.configure_logging("info", log_format)
        logging.getLogger().handlers[0].setStream(stream)
        log = logging.getLogger("resumable.test")
        log.info("outside any request")
        token = telemetry.REQUEST_ID.set("req-77")
        try:
            log.info("inside one")
        finally:
            telemetry.REQUEST_ID.reset(token)
        outside, inside = stream.getvalue().splitlines()
        if log_format == "text":
            assert inside.endswith("resumable.test [req-77]: inside one")
            assert outside.endswith("resumable.test: outside any request")
        else:
            assert json.loads(inside)["request_id"] == "req-77"
            assert "request_id" not in json.loads(outside)
            assert "request_tag" not in json.loads(inside)
    telemetry.configure_logging("info", "text")
    logging.captureWarnings(False)  # json mode turned it on for the whole process


def test_a_shared_store_that_cannot_be_read_is_a_503_without_its_address(app):
    r = TestClient(app).get("/v1/store-down")
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "storage_unavailable"
    assert "10.1.2.3" not in r.text and "redis://" not in r.text


def test_debug_logs_keep_sql_parameters_and_query_strings_out():
    import io

    import telemetry
    stream = io.StringIO()
    telemetry.configure_logging("debug", "text")
    try:
        logging.getLogger().handlers[0].setStream(stream)
        logging.getLogger("aiosqlite").debug("executing %s with %s", "INSERT", "a secret prompt")
        # As uvicorn sets it up in text mode: its own handler, no propagation (json mode, run by
        # an earlier test in this process, disables the logger).
        access = logging.getLogger("uvicorn.access")
        access.disabled, access.propagate = False, False
        access.addHandler(own := logging.StreamHandler(stream))
        access.info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET",
            "/v1/sessions/s/stream?last_event_id=s:3&api_key=sk-secret", "1.1", 200)
        out = stream.getvalue()
        assert "a secret prompt" not in out and "sk-secret" not in out
        assert "GET /v1/sessions/s/stream HTTP/1.1" in out
    finally:
        access.removeHandler(own)
        access.propagate = True
        telemetry.configure_logging("info", "text")
