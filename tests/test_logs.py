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
