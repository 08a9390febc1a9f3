"""What an operator meets: two processes on one database, a corrupt database, a model that does
not load, a disk that stops taking writes, the database folder removed, damaged stored sessions.
Real server processes throughout; the disk fault is a real RLIMIT_FSIZE on the server process."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from conftest import LONG, QUESTION, ROOT, Server, read_events

CHAT = {"messages": QUESTION, "max_tokens": 5, "temperature": 0}


def run_until_exit(env: dict[str, str], timeout: float = 60) -> tuple[int, str, float]:
    """Start `uvicorn main:app` and wait for it to exit on its own: (code, output, seconds)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1",
                           "--port", "0"], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    """One server whose database sits in a folder of its own (the tests remove that folder)."""
    tmp = tmp_path_factory.mktemp("ops")
    server = Server(tmp, SESSIONS_DB_PATH=str(tmp / "db" / "sessions.db"))
    server.db = tmp / "db" / "sessions.db"
    server.start()
    yield server
    server.stop()


def session_info(url: str, s: str) -> dict:
    return httpx.get(f"{url}/v1/sessions/{s}", timeout=30).json()


# --- startup ----------------------------------------------------------------------------------

def test_second_process_on_the_same_database_refuses_to_start(ops):
    code, out, took = run_until_exit({"SESSIONS_DB_PATH": str(ops.db),
                                      "SESSIONS_DB_LOCK_TIMEOUT_SECONDS": "1"})
    assert code != 0
    assert "another" in out and str(ops.db) in out
    assert "Traceback" not in out  # the reason as one line (StartupFailureLine)
    assert took < 30
    # The first server never noticed.
    assert httpx.get(ops.url + "/ready", timeout=10).status_code == 200


def test_sdk_call_right_after_start_waits_for_the_model(tmp_path):
    """A script's first call while the model still loads gets its answer, not a 503 (issue
    25): the request waits up to MODEL_LOAD_WAIT_SECONDS; /ready says 503 meanwhile."""
    from openai import OpenAI

    server = Server(tmp_path, SESSIONS_DB_PATH=str(tmp_path / "s.db"))
    server.start(until="/health")  # listening; the model loads in its thread
    try:
        assert httpx.get(server.url + "/ready", timeout=10).status_code == 503
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        started = time.monotonic()
        r = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=5,
                                           temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens > 0
        assert time.monotonic() - started < 120
        assert httpx.get(server.url + "/ready", timeout=10).status_code == 200
    finally:
        server.stop()


def test_corrupt_database_exits_promptly(tmp_path):
    db = tmp_path / "sessions.db"
    db.write_bytes(b"this is not a database" * 1000)
    code, out, took = run_until_exit({"SESSIONS_DB_PATH": str(db)})
    assert code != 0 and took < 30
    assert "cannot open session database" in out and "Traceback" not in out


def test_model_that_cannot_load_exits_non_zero(tmp_path):
    code, out, took = run_until_exit({"SESSIONS_DB_PATH": str(tmp_path / "s.db"),
                                      "MODEL_REPO_ID": str(tmp_path / "no-such-model")})
    assert code == 1 and took < 60
    assert "could not be loaded" in out
    # One clear line: no chained tracebacks of hub errors above it.
    assert "Traceback" not in out and "direct cause" not in out


# --- the disk stops taking writes -------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses prlimit (Linux)")
def test_disk_full_answers_503_keeps_the_stream_and_recovers(ops):
    import resource

    s = "disk-full-1"
    with httpx.Client(base_url=ops.url, timeout=120) as http, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(read_events, httpx.Client(base_url=ops.url, timeout=120), "POST",
                             "/v1/chat/completions",
                             json={**LONG, "max_tokens": 120, "stream": True, "session_id": s})
        while session_info(ops.url, s).get("last_event_index") is None or \
                session_info(ops.url, s)["last_event_index"] < 5:
            time.sleep(0.05)
        # From here no file of the server may grow: every SQLite write fails (EFBIG).
        limits = resource.prlimit(ops.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(ops.proc.pid, resource.RLIMIT_FSIZE, (1, limits[1]))
        try:
            deadline = time.monotonic() + 30
            while http.get("/ready").status_code != 503:
                assert time.monotonic() < deadline, "/ready never reported the failing disk"
                time.sleep(0.1)
            err = http.get("/ready").json()["error"]
            assert err["code"] == "storage_unavailable" and str(ops.db) not in err["message"]
            assert http.get("/health").json()["status"] == "degraded"
            started = time.monotonic()
            r = http.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 503 and r.headers.get("Retry-After")
            assert time.monotonic() - started < 5
            time.sleep(1)
        finally:
            resource.prlimit(ops.proc.pid, resource.RLIMIT_FSIZE, limits)
        deadline = time.monotonic() + 30
        while http.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "never recovered"
            time.sleep(0.2)
        _, events = reader.result(timeout=120)
        # The stream kept every event, in order, and ended normally.
        assert [e["id"] for e in events] == [f"{s}:{i}" for i in range(len(events))]
        assert events[-1]["data"] == "[DONE]"
        # (The server's log file could not grow either, so its error lines are lost here.)
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_database_folder_removed_is_logged_and_restored(ops):
    with httpx.Client(base_url=ops.url, timeout=60) as http:
        _, before = read_events(http, "POST", "/v1/chat/completions",
                                json={**CHAT, "stream": True, "session_id": "before-rm"})
        shutil.rmtree(ops.db.parent)
        deadline = time.monotonic() + 20
        while not ops.db.exists():
            assert time.monotonic() < deadline, "database was not restored"
            time.sleep(0.1)
        assert "removed or replaced" in ops.logs()
        while http.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        _, after = read_events(http, "POST", "/v1/chat/completions",
                               json={**CHAT, "stream": True, "session_id": "after-rm"})
    with sqlite3.connect(ops.db) as db:
        ids = {row[0] for row in db.execute("SELECT id FROM sessions")}
        n = db.execute("SELECT COUNT(*) FROM events WHERE session_id='before-rm'").fetchone()[0]
    assert {"before-rm", "after-rm", "disk-full-1"} <= ids
    assert n == len(before)


# --- kill -9 frees the lock; damaged rows are contained -----------------------------------------

def test_kill_frees_the_lock_and_damaged_sessions_do_not_stop_startup(ops):
    with httpx.Client(base_url=ops.url, timeout=60) as http:
        _, good = read_events(http, "POST", "/v1/chat/completions",
                              json={**CHAT, "stream": True, "session_id": "good-1"})
    ops.kill()
    with sqlite3.connect(ops.db) as db:
        row = ("INSERT INTO sessions (id, kind, model, created, state, body_digest, request, "
               "finish_reason, usage, ended_at) VALUES (?,?,?,?,?,?,?,?,?,?)")
        db.execute(row, ("bad-kind", "no.such.kind", "m", time.time(), "in_progress", "d",
                         "{}", None, None, None))
        db.execute(row, ("bad-json", "chat.completion", "m", time.time(), "completed", "d",
                         "{not json", None, "[1,", time.time()))
        db.execute("INSERT INTO events (session_id, idx, event, data) "
                   "VALUES ('bad-kind', 0, NULL, 'x')")
    ops.start()  # the lock died with the process: no wait, no refusal
    with httpx.Client(base_url=ops.url, timeout=60) as http:
        assert session_info(ops.url, "bad-kind")["state"] == "failed"
        assert session_info(ops.url, "bad-json")["state"] == "failed"
        info = session_info(ops.url, "good-1")
        assert info["state"] == "completed"
        _, replay = read_events(http, "GET", "/v1/sessions/good-1/stream")
        assert replay == good
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert "bad-kind" in ops.logs() and "bad-json" in ops.logs()
    assert json.loads(json.dumps(info))["usage"]["completion_tokens"] > 0
