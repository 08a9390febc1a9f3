"""Images, video and thinking end to end: a tiny random-weight Qwen3-VL served by real uvicorn
processes. Its text is noise, so these tests assert on what is real: statuses, shapes, token
counts that grow with the media, the reasoning split, resume and cancel, and the error table."""

from __future__ import annotations

import base64
import http.server as http_server
import io
import json
import sqlite3
import struct
import threading
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import Server, ask_in_page, read_events
from tiny_qwen3vl import build_tiny_qwen3vl

# --- media made in the test ---------------------------------------------------------------------


def png(w: int, h: int, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def mp4(frames: int, fps: int = 4, size=(64, 48)) -> bytes:
    """A real H.264 video of colored frames, made with PyAV."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        st = c.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            arr = np.zeros((size[1], size[0], 3), np.uint8)
            arr[..., i % 3] = 80 + 20 * i % 170
            for p in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    return buf.getvalue()


def bomb_png(w: int = 60000, h: int = 60000) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def ask(*parts: dict, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe."}]}],
            "temperature": 0, "max_tokens": 6, "ignore_eos": True, **extra}


# --- fixtures -----------------------------------------------------------------------------------


class MediaHandler(http_server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "red.png").write_bytes(png(96, 96))
    (root / "clip.mp4").write_bytes(mp4(8))
    (root / "sub").mkdir()
    (root / "sub" / "blue.png").write_bytes(png(64, 64, (20, 20, 220)))
    return root


@pytest.fixture(scope="module")
def media_http(media_root):
    handler = lambda *a, **k: MediaHandler(*a, directory=str(media_root), **k)  # noqa: E731
    srv = http_server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny-vl"))


@pytest.fixture(scope="module")
def vl(tmp_path_factory, model_dir, media_root):
    srv = Server(tmp_path_factory.mktemp("vl"), MODEL_REPO_ID=str(model_dir),
                 MEDIA_ROOT=str(media_root), HF_HUB_OFFLINE="1", MAX_MEDIA_PER_REQUEST="3",
                 MAX_MEDIA_BYTES=str(2 * 1024 * 1024), MAX_VIDEO_FRAMES="16").start()
    yield srv
    srv.stop()


@pytest.fixture
def http(vl):
    with httpx.Client(base_url=vl.url, timeout=120) as c:
        yield c


def post(http: httpx.Client, body: dict) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body)


# --- what the model accepts ---------------------------------------------------------------------

def test_models_lists_input_modalities(http):
    model = http.get("/v1/models").json()["data"][0]
    assert model["input_modalities"] == ["text", "image", "video"]


def test_text_only_request_to_the_vl_model(http):
    r = post(http, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                    "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


# --- images -------------------------------------------------------------------------------------

def test_image_tokens_grow_with_image_size(http):
    small = post(http, ask(image_part(data_url(png(64, 64), "image/png"))))
    big = post(http, ask(image_part(data_url(png(256, 256), "image/png"))))
    text = post(http, {**ask(), "messages": [{"role": "user", "content": "Describe."}]})
    assert small.status_code == big.status_code == text.status_code == 200, small.text
    p = [x.json()["usage"]["prompt_tokens"] for x in (text, small, big)]
    assert p[0] < p[1] < p[2], p


def test_image_from_file_under_media_root(http):
    rel = post(http, ask(image_part("red.png")))
    nested = post(http, ask({"type": "image", "image": "sub/blue.png"}))  # Qwen's own shape
    assert rel.status_code == 200 and nested.status_code == 200, rel.text
    same = post(http, ask(image_part(data_url(png(96, 96), "image/png"))))
    assert rel.json()["usage"]["prompt_tokens"] == same.json()["usage"]["prompt_tokens"]


def test_file_url_form(http, media_root):
    r = post(http, ask(image_part(f"file://{media_root}/red.png")))
    assert r.status_code == 200, r.text


def test_http_image_refused_without_allow_private(http, media_http):
    r = post(http, ask(image_part(f"{media_http}/red.png")))
    assert r.status_code == 400
    err = r.json()["error"]
    assert "private" in err["message"] and err["param"] == "messages[0].content[0]"


def test_http_image_with_allow_private(tmp_path, model_dir, media_http):
    srv = Server(tmp_path, MODEL_REPO_ID=str(model_dir), HF_HUB_OFFLINE="1",
                 ALLOW_PRIVATE_MEDIA_URLS="1").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            ok = post(c, ask(image_part(f"{media_http}/red.png")))
            assert ok.status_code == 200, ok.text
            via = post(c, ask(image_part(f"{media_http}/redirect?to={media_http}/red.png")))
            assert via.status_code == 200, via.text
            assert via.json()["usage"]["prompt_tokens"] == ok.json()["usage"]["prompt_tokens"]
            missing = post(c, ask(image_part(f"{media_http}/nope.png")))
            assert missing.status_code == 400 and "404" in missing.json()["error"]["message"]
            # Local paths stay refused on a server without MEDIA_ROOT.
            local = post(c, ask(image_part("red.png")))
            assert local.status_code == 400 and "MEDIA_ROOT" in local.json()["error"]["message"]
    finally:
        srv.stop()


# --- video --------------------------------------------------------------------------------------

def test_video_tokens_grow_with_frames_and_carry_timestamps(http):
    short = post(http, ask(video_part(data_url(mp4(4), "video/mp4"))))
    long = post(http, ask(video_part(data_url(mp4(12), "video/mp4"))))
    assert short.status_code == 200 and long.status_code == 200, short.text
    assert short.json()["usage"]["prompt_tokens"] < long.json()["usage"]["prompt_tokens"]


def test_video_from_file_and_qwen_shape(http):
    a = post(http, ask(video_part("clip.mp4")))
    b = post(http, ask({"type": "video", "video": "clip.mp4"}))
    c = post(http, ask(video_part(data_url(mp4(8), "video/mp4"))))
    assert a.status_code == b.status_code == c.status_code == 200, a.text
    assert a.json()["usage"]["prompt_tokens"] == c.json()["usage"]["prompt_tokens"]


def test_image_and_video_together_stream_and_resume(http):
    sid = "vl-" + uuid.uuid4().hex
    body = {**ask(image_part("red.png"), video_part("clip.mp4")), "max_tokens": 12,
            "stream": True, "session_id": sid}
    _, first = read_events(http, "POST", "/v1/chat/completions", limit=3, json=body)
    _, rest = read_events(http, "GET", f"/v1/sessions/{sid}/stream",
                          headers={"Last-Event-ID": first[-1]["id"]})
    joined = first + rest
    assert [e["id"] for e in joined] == [f"{sid}:{i}" for i in range(len(joined))]
    _, whole = read_events(http, "GET", f"/v1/sessions/{sid}/stream")
    assert whole == joined and joined[-1]["data"] == "[DONE]"
    # The retry with the same body attaches; media bytes were not stored in SQLite.
    _, again = read_events(http, "POST", "/v1/chat/completions", json=body)
    assert again == whole


def test_media_bytes_are_not_stored(http, vl):
    payload = data_url(png(80, 80, (1, 2, 3)), "image/png")
    r = post(http, {**ask(image_part(payload)), "session_id": "vl-store-" + uuid.uuid4().hex})
    assert r.status_code == 200
    db = sqlite3.connect(vl.env["SESSIONS_DB_PATH"])
    stored = " ".join(row[0] for row in db.execute("SELECT request FROM sessions"))
    assert payload.split(",", 1)[1][:200] not in stored and "sha256:" in stored


def test_cancel_a_vision_request(http):
    sid = "vl-cancel-" + uuid.uuid4().hex
    body = {**ask(image_part("red.png")), "max_tokens": 3000, "stream": True, "session_id": sid}
    read_events(http, "POST", "/v1/chat/completions", limit=2, json=body)
    assert http.post(f"/v1/cancel/{sid}").json()["state"] == "cancelled"


def test_vision_requests_decode_together_as_they_do_alone(vl):
    """Images of different sizes (so different prompt lengths and M-RoPE offsets) and a text
    request in one batch: each gives what it gives alone (greedy)."""
    bodies = [ask(image_part(data_url(png(64, 64), "image/png")), max_tokens=12),
              ask(image_part(data_url(png(160, 96, (10, 200, 10)), "image/png")), max_tokens=12),
              {**ask(), "messages": [{"role": "user", "content": "Hello there"}],
               "max_tokens": 12}]

    def run(body):
        with httpx.Client(base_url=vl.url, timeout=120) as c:
            r = post(c, body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"], r.json()["usage"]

    alone = [run(b) for b in bodies]
    with ThreadPoolExecutor(3) as pool:
        batched = list(pool.map(run, bodies))
    assert batched == alone
    assert all(u["completion_tokens"] == 12 for _, u in batched)


def test_compiled_decode_of_vision_requests_matches_eager(vl, model_dir, tmp_path):
    """The static cache and dynamo's trace carry M-RoPE positions: images and text decoded
    together by a server with COMPILE_DECODE give the eager server's answers."""
    bodies = [ask(image_part(data_url(png(64, 64), "image/png")), max_tokens=12),
              ask(image_part(data_url(png(160, 96, (10, 200, 10)), "image/png")), max_tokens=12),
              {**ask(), "messages": [{"role": "user", "content": "Hello there"}],
               "max_tokens": 12}]

    def run(url, body):
        with httpx.Client(base_url=url, timeout=120) as c:
            r = post(c, body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"], r.json()["usage"]

    eager = [run(vl.url, b) for b in bodies]
    srv = Server(tmp_path, MODEL_REPO_ID=str(model_dir), HF_HUB_OFFLINE="1", LOG_LEVEL="info",
                 COMPILE_DECODE="true", COMPILE_BACKEND="eager", COMPILE_BATCH_SIZES="1,4",
                 MAX_CACHE_LEN="2048", TORCH_LOGS="recompiles").start()
    try:
        assert "compiled decode ready: batch sizes [1, 4], 2048 columns" in srv.logs()
        assert httpx.get(srv.url + "/health").json()["decode"] == "compiled"
        with ThreadPoolExecutor(3) as pool:
            compiled = list(pool.map(lambda b: run(srv.url, b), bodies))
        logs = srv.logs()
    finally:
        srv.stop()
    assert compiled == eager
    # Warm-up compiled each size once; serving with real M-RoPE positions compiles nothing.
    assert "Recompiling function" not in logs.split("compiled decode ready")[1]


# --- thinking -----------------------------------------------------------------------------------

def test_thinking_is_split_in_stream_and_non_stream(http):
    body = {"messages": [{"role": "user", "content": "Think about it."}], "temperature": 0,
            "max_tokens": 10, "ignore_eos": True}
    full = post(http, body).json()
    msg, usage = full["choices"][0]["message"], full["usage"]
    # The template opened <think>; a random model never closes it: all of it is reasoning.
    assert msg["reasoning_content"] and msg["content"] == ""
    assert usage["completion_tokens_details"]["reasoning_tokens"] == usage["completion_tokens"] == 10
    _, events = read_events(http, "POST", "/v1/chat/completions", json={**body, "stream": True})
    deltas = [json.loads(e["data"])["choices"][0]["delta"] for e in events[:-1]
              if json.loads(e["data"])["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == msg["reasoning_content"]
    assert all(not d.get("content") for d in deltas)


def test_reasoning_split_holds_next_to_a_plain_session(vl):
    """A thinking row (starts inside <think>) and a no-thinking row in one batch: each keeps its
    own split and reasoning token count."""
    think = {"messages": [{"role": "user", "content": "Think about it."}], "temperature": 0,
             "max_tokens": 10, "ignore_eos": True}
    plain = {**think, "chat_template_kwargs": {"enable_thinking": False}}

    def run(body):
        with httpx.Client(base_url=vl.url, timeout=120) as c:
            return post(c, body).json()

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(run, [think, plain])
    assert a["choices"][0]["message"]["reasoning_content"] and not a["choices"][0]["message"]["content"]
    assert a["usage"]["completion_tokens_details"]["reasoning_tokens"] == 10
    assert b["choices"][0]["message"]["content"] and b["usage"]["completion_tokens_details"][
        "reasoning_tokens"] == 0
    assert a == {**run(think), "id": a["id"], "created": a["created"]}


def test_enable_thinking_false_gives_plain_content(http):
    body = {"messages": [{"role": "user", "content": "Answer."}], "temperature": 0,
            "max_tokens": 10, "ignore_eos": True,
            "chat_template_kwargs": {"enable_thinking": False}}
    full = post(http, body).json()
    msg, usage = full["choices"][0]["message"], full["usage"]
    assert "reasoning_content" not in msg and msg["content"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


def test_reasoning_parser_none_leaves_raw_text(tmp_path, model_dir):
    srv = Server(tmp_path, MODEL_REPO_ID=str(model_dir), HF_HUB_OFFLINE="1",
                 REASONING_PARSER="none").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            r = post(c, {"messages": [{"role": "user", "content": "Think."}], "temperature": 0,
                         "max_tokens": 10, "ignore_eos": True}).json()
            assert "reasoning_content" not in r["choices"][0]["message"]
            assert r["choices"][0]["message"]["content"]
    finally:
        srv.stop()


# --- bad media ----------------------------------------------------------------------------------

def _bad_cases(media_root):
    truncated = png(64, 64)[:60]
    return [
        ("malformed base64", ask(image_part("data:image/png;base64,@@not-base64@@")), 400, "base64"),
        ("not an image", ask(image_part(data_url(b"hello, world" * 10, "image/png"))), 400,
         "not a decodable image"),
        ("truncated image", ask(image_part(data_url(truncated, "image/png"))), 400, "image"),
        ("decompression bomb", ask(image_part(data_url(bomb_png(), "image/png"))), 413,
         "decompression bomb"),
        ("video with no frames", ask(video_part(data_url(b"\x00" * 4000, "video/mp4"))), 400,
         "video"),
        ("image bytes as video", ask(video_part(data_url(png(32, 32), "video/mp4"))), 400,
         "not a video"),
        ("unsupported scheme", ask(image_part("ftp://example.com/a.png")), 400, "scheme"),
        ("gopher scheme", ask(image_part("gopher://example.com/a.png")), 400, "scheme"),
        ("path escape", ask(image_part("../../../etc/passwd")), 400, "outside MEDIA_ROOT"),
        ("absolute path outside", ask(image_part("/etc/passwd")), 400, "outside MEDIA_ROOT"),
        ("missing file", ask(image_part("nope.png")), 400, "not found"),
        ("metadata address", ask(image_part("http://169.254.169.254/latest/meta-data/")), 400,
         "private"),
        ("too many media", ask(*[image_part("red.png")] * 4), 400, "too many"),
        ("too large", ask(image_part(data_url(b"\x00" * (3 * 1024 * 1024), "image/png"))), 413,
         "larger than"),
        ("no url", ask({"type": "image_url", "image_url": {}}), 400, "url"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_media_table(http, media_root, case):
    name, body, status, words = _bad_cases(media_root)[case]
    r = post(http, body)
    assert r.status_code == status, (name, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words.lower() in err["message"].lower(), (name, err)
    assert err["param"].startswith("messages[0].content"), (name, err)
    assert "Traceback" not in r.text


def test_server_unharmed_after_bad_media(http, media_root):
    for name, body, _, _ in _bad_cases(media_root):
        post(http, body)
    assert post(http, ask(image_part("red.png"))).status_code == 200


# --- the Responses API on a vision, thinking model ------------------------------------------------

def test_responses_with_input_image_and_reasoning_items(vl):
    import openai
    client = openai.OpenAI(base_url=vl.url + "/v1", api_key="unused", max_retries=0)
    small = client.responses.create(model="m", max_output_tokens=6, extra_body={"ignore_eos": True},
                                    input=[{"role": "user", "content": [
                                        {"type": "input_image",
                                         "image_url": data_url(png(64, 64), "image/png")},
                                        {"type": "input_text", "text": "Describe."}]}])
    big = client.responses.create(model="m", max_output_tokens=6, extra_body={"ignore_eos": True},
                                  input=[{"role": "user", "content": [
                                      {"type": "input_image",
                                       "image_url": data_url(png(256, 256), "image/png")},
                                      {"type": "input_text", "text": "Describe."}]}])
    assert small.usage.input_tokens < big.usage.input_tokens
    # The template opened <think>: the output is a reasoning item, streamed as reasoning_text.
    assert small.output[0].type == "reasoning" and small.output[0].content[0].text
    assert small.usage.output_tokens_details.reasoning_tokens == 6
    events = list(client.responses.create(model="m", input="Think.", max_output_tokens=6,
                                          stream=True, extra_body={"ignore_eos": True}))
    types = [e.type for e in events]
    assert "response.reasoning_text.delta" in types and "response.output_text.delta" not in types
    final = events[-1].response
    assert final.output[0].type == "reasoning"
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
        final.output[0].content[0].text
    # reasoning effort "none" turns thinking off: a message item with output_text.
    plain = client.responses.create(model="m", input="Answer.", max_output_tokens=6,
                                    reasoning={"effort": "none"}, extra_body={"ignore_eos": True})
    assert [item.type for item in plain.output] == ["message"] and plain.output_text


# --- tools and structured output on a template that takes tools (hermes) ------------------------

FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}


def test_forced_tool_call_through_the_qwen_template(http):
    """Qwen3-VL's template renders `tools` itself; its format is hermes (one JSON object per
    <tool_call> tag). Even a random model's call is valid under the grammar."""
    tools = [{"type": "function", "function": {"name": "set_flag", "parameters": FLAG}}]
    r = post(http, {"messages": [{"role": "user", "content": "Set it."}], "tools": tools,
                    "tool_choice": "required", "max_tokens": 40, "temperature": 0,
                    "parallel_tool_calls": False,
                    "chat_template_kwargs": {"enable_thinking": False}}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls", r
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "set_flag"
    assert json.loads(call["function"]["arguments"]) in ({"ok": True}, {"ok": False})
    # The call goes back through the template as an assistant turn, its result as a tool turn.
    follow = post(http, {"messages": [{"role": "user", "content": "Set it."}, choice["message"],
                                      {"role": "tool", "tool_call_id": call["id"],
                                       "content": "done"}],
                         "tools": tools, "max_tokens": 4, "temperature": 0})
    assert follow.status_code == 200, follow.text


def test_the_grammar_constrains_the_answer_after_the_thought(http, model_dir):
    """A thinking row reasons freely; the schema applies from `</think>` on (a bias makes the
    random model close its thought at once)."""
    from transformers import AutoTokenizer
    close = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("</think>")
    r = post(http, {"messages": [{"role": "user", "content": "Think, then answer."}],
                    "max_tokens": 30, "temperature": 0, "logit_bias": {str(close): 100},
                    "response_format": {"type": "json_schema", "json_schema": {
                        "name": "flag", "schema": FLAG}}}).json()
    message = r["choices"][0]["message"]
    assert r["choices"][0]["finish_reason"] == "stop", r
    assert json.loads(message["content"]) in ({"ok": True}, {"ok": False})


def test_a_crash_continues_a_vision_session_from_its_inline_media(vl):
    """Inline media is kept with the running session (and only then): after a kill -9 the
    restarted server rebuilds the prompt, image included, and finishes the stream as an
    uninterrupted run does. Last in the module: it restarts the module's server."""
    from test_restart import choices_of
    image = data_url(png(72, 72, (10, 200, 10)), "image/png")
    body = {**ask(image_part(image)), "max_tokens": 400, "stream": True}
    with httpx.Client(base_url=vl.url, timeout=120) as c:
        _, whole = read_events(c, "POST", "/v1/chat/completions",
                               json={**body, "session_id": "vl-ref-" + uuid.uuid4().hex})
        sid = "vl-crash-" + uuid.uuid4().hex
        _, seen = read_events(c, "POST", "/v1/chat/completions", limit=6,
                              json={**body, "session_id": sid})
    vl.kill()
    db = sqlite3.connect(vl.env["SESSIONS_DB_PATH"])
    state, inputs = db.execute("SELECT state, inputs FROM sessions WHERE id=?", (sid,)).fetchone()
    db.close()
    assert state == "in_progress" and image.split(",", 1)[1][:200] in inputs
    vl.start()
    with httpx.Client(base_url=vl.url, timeout=120) as c:
        _, rest = read_events(c, "POST", "/v1/chat/completions",
                              json={**body, "session_id": sid},
                              headers={"Last-Event-ID": seen[-1]["id"]})
    full = seen + rest
    assert [e["id"] for e in full] == [f"{sid}:{i}" for i in range(len(full))]
    assert choices_of(full) == choices_of(whole) and full[-1]["data"] == "[DONE]"
    db = sqlite3.connect(vl.env["SESSIONS_DB_PATH"])
    row = db.execute("SELECT state, inputs, request FROM sessions WHERE id=?", (sid,)).fetchone()
    db.close()
    assert row[0] == "completed" and row[1] is None  # the media went with the session's end
    assert image.split(",", 1)[1][:200] not in row[2]


# --- the playground with a vision (and thinking) model ------------------------------------------

def test_the_playground_sends_an_image_and_shows_reasoning_apart(vl, browser, media_root,
                                                                  tmp_path):
    """The image picker shows for a model with image input; the uploaded picture goes in the
    request as a data: URL and shows in the conversation; the tiny model's output (all inside
    the template's <think>) shows in the reasoning box, not as the answer."""
    context = browser.new_context(bypass_csp=True)  # see tests/test_playground.py
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(vl.url + "/")
        page.wait_for_selector("#image-row:not([hidden])")
        page.set_input_files("#image", str(media_root / "red.png"))
        ask_in_page(page, "What color is this?", 12)
        page.wait_for_selector("#state[data-state=done]", timeout=90_000)
        assert page.get_attribute(".msg.user img", "src").startswith("data:image/png;base64,")
        session_id = page.get_attribute(".msg.assistant", "data-session")
        shown = page.text_content(".msg.assistant .reasoning-text")
        assert shown and page.is_visible("details.reasoning")
        assert page.text_content(".msg.assistant .content") == ""
        with httpx.Client(base_url=vl.url, timeout=60) as c:
            _, events = read_events(c, "GET", f"/v1/sessions/{session_id}/stream")
            usage = c.get(f"/v1/sessions/{session_id}").json()["usage"]
        stored = "".join(json.loads(e["data"])["choices"][0]["delta"].get("reasoning_content", "")
                         for e in events if e["data"] != "[DONE]"
                         and json.loads(e["data"])["choices"])
        assert shown == stored
        # The picture reached the model: a 96x96 image is a few dozen prompt tokens.
        text_only = post_usage(vl, "What color is this?")
        assert usage["prompt_tokens"] > text_only["prompt_tokens"] + 4
        assert errors == []
    finally:
        page.screenshot(path=str(tmp_path / "playground-vision.png"))
        context.close()


def post_usage(srv, text: str) -> dict:
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        return c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": text}], "max_tokens": 1}).json()["usage"]
