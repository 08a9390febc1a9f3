"""Unit tests of media.py: the SSRF guard, redirects, data URLs, frame sampling."""

from __future__ import annotations

import http.server as http_server
import threading

import pytest

import media
from media import MediaError, MediaLimits, check_host, decode_image, decode_video, load_bytes
from test_vision_e2e import bomb_png, mp4, png


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1",
                                  "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1", "fd00::1",
                                  "fe80::1", "::ffff:127.0.0.1", "224.0.0.1", "localhost",
                                  "::127.0.0.1", "64:ff9b::a00:1", "2002:7f00:1::1",
                                  "2002:a9fe:a9fe::1"])
def test_non_public_addresses_are_refused(host):
    with pytest.raises(MediaError) as e:
        check_host(host, 80, allow_private=False, param="p")
    assert e.value.status == 400 and "private" in e.value.message


def test_private_addresses_pass_when_allowed():
    check_host("127.0.0.1", 80, allow_private=True, param="p")


def test_public_literal_address_passes():
    check_host("8.8.8.8", 80, allow_private=False, param="p")  # a literal: no DNS needed


class Redirector(http_server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/img.png":
            body = png(8, 8)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def port():
    srv = http_server.ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def test_redirect_targets_are_checked_again(port, monkeypatch):
    # "localhost" passes this check, "127.0.0.1" does not: the same server, so only a re-check
    # of the redirect target can refuse the second hop.
    seen = []

    def check(host, p, allow_private, param):
        seen.append(host)
        if host != "localhost":
            raise MediaError(400, "private", param)

    monkeypatch.setattr(media, "check_host", check)
    limits = MediaLimits()
    assert load_bytes(f"http://localhost:{port}/img.png", limits, "p").startswith(b"\x89PNG")
    with pytest.raises(MediaError):
        load_bytes(f"http://localhost:{port}/r?to=http://127.0.0.1:{port}/img.png", limits, "p")
    assert seen[-2:] == ["localhost", "127.0.0.1"]


def test_redirect_loops_and_byte_cap(port):
    limits = MediaLimits(allow_private_urls=True, max_bytes=64)
    with pytest.raises(MediaError) as e:
        load_bytes(f"http://127.0.0.1:{port}/img.png", limits, "p")
    assert e.value.status == 413
    loop = f"http://127.0.0.1:{port}/r?to=/r?to=/r?to=/r?to=/r?to=/r?to=/r?to=/img.png"
    with pytest.raises(MediaError) as e:
        load_bytes(loop, MediaLimits(allow_private_urls=True), "p")
    assert "redirected more than" in e.value.message


def test_data_urls():
    assert load_bytes("data:text/plain,hello%20there", MediaLimits(), "p") == b"hello there"
    assert load_bytes("data:image/png;base64,aGk=", MediaLimits(), "p") == b"hi"
    for bad in ["data:image/png;base64,a!b", "data:nocomma"]:
        with pytest.raises(MediaError):
            load_bytes(bad, MediaLimits(), "p")


def test_image_budget_and_bomb():
    img = decode_image(png(4000, 3000), MediaLimits(max_image_pixels=256 * 256), 32, "p")
    assert img.size[0] * img.size[1] <= 256 * 256 and img.size[0] % 32 == 0
    with pytest.raises(MediaError) as e:
        decode_image(bomb_png(), MediaLimits(), 32, "p")
    assert e.value.status == 413


@pytest.mark.parametrize("frames,cap,expect", [(3, 16, 4), (12, 16, 12), (40, 16, 16), (40, 5, 6)])
def test_frame_sampling_is_even_and_timed(frames, cap, expect):
    v = decode_video(mp4(frames, fps=4), MediaLimits(max_video_frames=cap), 32, "p")
    assert v.frames.shape[0] == expect and len(v.timestamps) == expect
    assert v.fps == 4 and v.total_frames == frames
    assert v.timestamps == sorted(v.timestamps) and v.timestamps[0] == 0.0
    assert v.timestamps[-1] == pytest.approx((frames - 1) / 4, abs=0.01)


def test_video_pixel_budget_shrinks_frames():
    v = decode_video(mp4(8, size=(640, 480)), MediaLimits(max_video_pixels=8 * 64 * 64), 32, "p")
    assert v.frames.shape[1] * v.frames.shape[2] <= 64 * 64


def test_ffconcat_script_cannot_read_local_files(tmp_path, monkeypatch):
    # FFmpeg guesses formats from bytes: an ffconcat script "video" would open local files,
    # bypassing MEDIA_ROOT. Only real video containers are accepted.
    (tmp_path / "secret.mp4").write_bytes(mp4(4))
    monkeypatch.chdir(tmp_path)
    script = b"ffconcat version 1.0\nfile 'secret.mp4'\n"
    with pytest.raises(MediaError) as e:
        decode_video(script, MediaLimits(), 32, "p")
    assert e.value.status == 400


def test_huge_video_frames_are_refused():
    with pytest.raises(MediaError) as e:
        decode_video(mp4(2, size=(8192, 8192)), MediaLimits(), 32, "p")
    assert e.value.status == 413
