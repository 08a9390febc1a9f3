"""Fixtures: real `uvicorn main:app` processes on 127.0.0.1, the embedded SmolLM2, temp SQLite.

Starting a server loads the model (about 6 s on a 2-core CPU once its converted copy is
cached, 20 s the first time), so one default-configured
server is shared by the whole run (`server`); modules that need other settings start their own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# A request that runs for a few seconds on CPU: long enough to act on mid-stream.
LONG = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "temperature": 0, "max_tokens": 300, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `uvicorn main:app` subprocess. `start()` waits for /ready; `kill()` is kill -9."""

    def __init__(self, tmp: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        # REQUIRE_MODEL=false: most tests' bodies leave out `model` (it is informational);
        # tests of the default (test_compliance, test_newcomer) set it back.
        self.env = {**os.environ, "SESSIONS_DB_PATH": str(tmp / "sessions.db"),
                    "LOG_LEVEL": "info", "REQUIRE_MODEL": "false", **env}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180, until: str = "/ready") -> "Server":
        """Start it and wait until GET `until` answers 200."""
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + until, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """kill -9 (TerminateProcess on Windows): no shutdown hooks run, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


# The default-configured server is shared by every module that uses it (each server start
# loads the model: ~6 s of a 2-core CI run, more the first time). It logs JSON (LOG_FORMAT=json), so the whole
# suite's traffic goes through the JSON formatter; tests/test_playground.py reads it.
_shared: list[Server] = []


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("srv"), LOG_FORMAT="json").start()
    _shared.append(srv)
    yield srv
    srv.stop()


@pytest.fixture(scope="module", autouse=True)
def _leave_the_shared_server_idle():
    """After each module, cancel what its tests left running on the shared server (streams
    dropped mid-way go on for CANCEL_AFTER_DISCONNECT_SECONDS), so the next module's tests
    do not share the CPU with them."""
    yield
    if not _shared or _shared[0].proc is None or _shared[0].proc.poll() is not None:
        return
    srv = _shared[0]
    with sqlite3.connect(srv.env["SESSIONS_DB_PATH"]) as conn:
        running = [row[0] for row in conn.execute(
            "SELECT id FROM sessions WHERE state IN ('queued', 'in_progress')")]
    for session_id in running:
        try:
            httpx.post(f"{srv.url}/v1/cancel/{session_id}", timeout=10)
        except httpx.HTTPError:
            pass


@pytest.fixture(scope="module")
def client(server):
    """The official openai SDK against the module's server (no retries: a test sees each try)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


# --- SSE reading over raw httpx ---------------------------------------------------------------

def read_events(client: httpx.Client, method: str, url: str, limit: int | None = None,
                **kwargs) -> tuple[httpx.Response, list[dict]]:
    """Open an SSE stream and read `limit` events (all if None), then drop the connection.

    Each event is {"id", "data", "event"?, "raw"}: `raw` is its exact lines on the wire, so
    comparing events compares bytes. Comments (pings) are skipped.
    """
    events, cur, lines = [], {}, []
    with client.stream(method, url, **kwargs) as r:
        if r.status_code != 200 or limit == 0:
            r.read() if r.status_code != 200 else None
            return r, []
        for line in r.iter_lines():
            if line == "":
                if "data" in cur:
                    events.append({**cur, "raw": "\n".join(lines)})
                    if limit is not None and len(events) >= limit:
                        break
                cur, lines = {}, []
            elif not line.startswith(":"):
                lines.append(line)
                name, _, value = line.partition(":")
                cur[name] = value[1:] if value.startswith(" ") else value
    return r, events


def wait_until(check, timeout: float = 20.0):
    """`check()`'s first truthy value, polled every 0.1 s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout} s: {check}")


def answers(url: str) -> bool:
    """Whether GET `url` answers 200 now."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def kill_and_resume(srv: Server, body: dict, session_id: str,
                    limit: int) -> tuple[list[dict], list[dict]]:
    """Stream `body` as `session_id` from `srv`, read `limit` events, kill -9 the server,
    start it again and resume after the last event read. Returns (events before the crash,
    all events), after checking the ids run 0..N with no gap or repeat."""
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        _, first = read_events(http, "POST", "/v1/chat/completions",
                               json={**body, "session_id": session_id}, limit=limit)
    srv.kill()
    srv.start()
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        r, rest = read_events(http, "GET", f"/v1/sessions/{session_id}/stream",
                              headers={"Last-Event-ID": first[-1]["id"]})
    assert r.status_code == 200, r.text
    events = first + rest
    assert [e["id"] for e in events] == [f"{session_id}:{i}" for i in range(len(events))]
    return first, events


def content_of(events: list[dict]) -> str:
    """Joined `delta.content` of chat chunk events."""
    out = []
    for ev in events:
        if ev["data"] == "[DONE]":
            continue
        for choice in json.loads(ev["data"]).get("choices", []):
            out.append(choice["delta"].get("content") or "")
    return "".join(out)


def finish_reason_of(events: list[dict]) -> str | None:
    for ev in reversed(events):
        if ev["data"] != "[DONE]":
            data = json.loads(ev["data"])
            for choice in data.get("choices", []):
                if choice.get("finish_reason"):
                    return choice["finish_reason"]
    return None


def metric(url: str, name: str) -> float:
    """Sum of a Prometheus metric's samples from /metrics."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key = line.split(" ")[0].split("{")[0]
            if key == name:
                total += float(line.rsplit(" ", 1)[1])
    return total


# --- browser tests: a cuttable TCP proxy and a headless Chromium ------------------------------

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or \
    shutil.which("chromium-browser")


class CuttableProxy:
    """127.0.0.1:<port> -> target, one thread pair per connection. `cut()` resets every open
    connection (both sides) and counts them; new connections keep being accepted.

    `stall_after(n)`: the server's bytes reach the client until n more have passed, then the
    proxy holds the rest until the cut. A test then cuts a stream in its middle however fast
    the model is (the generation itself goes on on the server)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.open: list[tuple[socket.socket, socket.socket]] = []
        self.budget: int | None = None  # server->client bytes still let through, if armed
        self.released = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def stall_after(self, n_bytes: int) -> None:
        with self.lock:
            self.budget = n_bytes
            self.released.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.open.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_server:
                    with self.lock:
                        allowed = len(data) if self.budget is None else min(self.budget, len(data))
                        if self.budget is not None:
                            self.budget -= allowed
                    dst.sendall(data[:allowed])
                    if allowed < len(data):
                        self.released.wait()  # held until the cut, which drops it
                        return
                else:
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> int:
        """Reset every open connection (SO_LINGER 0: an RST, not a polite FIN), and disarm
        `stall_after`. shutdown() first: a close() alone does not wake the pump thread blocked
        in recv() on it, and the connection would live on."""
        with self.lock:
            pairs, self.open, self.budget = self.open, [], None
        n = 0
        for pair in pairs:
            live = False
            for s in pair:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    s.shutdown(socket.SHUT_RDWR)
                    live = True
                except OSError:
                    pass  # already shut down: by its own end, or by the pump of the other side
                s.close()
            n += live
        self.released.set()
        return n

    def close(self) -> None:
        """Stop listening (new connections are refused) and cut the open ones. shutdown()
        first: close() alone leaves a thread blocked in accept() with the port listening."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.cut()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("no Chromium: install Debian's `chromium` package (or set CHROMIUM_PATH) "
                    "to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright (requirements-dev.txt) is not installed")
    with sync_api.sync_playwright() as pw:
        # The flags keep Chromium off the network it would call home on (refused here).
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


# The playground page, driven: what a user types, what the page shows.


def ask_in_page(pg, prompt: str, max_tokens: int) -> None:
    pg.fill("#temperature", "0")
    pg.fill("#max-tokens", str(max_tokens))
    pg.fill("#prompt", prompt)
    pg.click("#send")


def wait_for_text(pg, chars: int) -> None:
    pg.wait_for_function(
        f"(document.querySelector('.msg.assistant:last-child .content') || {{}}).textContent"
        f"?.length >= {chars}", timeout=60_000)


def answer(pg) -> tuple[str, str, str]:
    """(session id, shown answer text, finish state) of the last assistant message."""
    return pg.evaluate("""() => {
        const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return [m.dataset.session, m.querySelector('.content').textContent, m.dataset.finish];
    }""")


def assert_each_event_once(pg) -> None:
    seen = pg.evaluate("window.playground.seen")
    indexes = [int(i.rsplit(":", 1)[1]) for i in seen]
    assert indexes == list(range(len(indexes))), f"events not applied once each, in order: {seen}"
