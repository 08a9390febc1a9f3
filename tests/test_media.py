"""Unit tests of media.py: the SSRF guard, redirects, data URLs, frame sampling."""

from __future__ import annotations

import http.server as http_server
import ntpath
import posixpath
import re
import threading
import time

import pytest

import media
from media import (MediaError, MediaLimits, check_host, decode_image, decode_video, file_url_path,
                   inside_root, load_bytes)
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
        return ["127.0.0.1"]

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
    assert load_bytes("DATA:image/png;BASE64,aGk=", MediaLimits(), "p") == b"hi"
    assert load_bytes("data:text/plain;charset=utf-8,h%C3%A9", MediaLimits(), "p") == b"h\xc3\xa9"
    assert load_bytes("data:text/plain;charset=utf-8;base64,aGk=", MediaLimits(), "p") == b"hi"
    assert load_bytes("data:;base64,aGk=", MediaLimits(), "p") == b"hi"
    assert load_bytes("data:,a,b", MediaLimits(), "p") == b"a,b"
    # base64 only as the last parameter: otherwise the payload is percent-encoded text
    assert load_bytes("data:image/png;base64;x=1,aGk=", MediaLimits(), "p") == b"aGk="
    # MIME-wrapped base64 (76 columns, CRLF) decodes; whitespace carries no data
    assert load_bytes("data:image/png;base64,aGVs\r\nbG8g\nd29y bGQ=", MediaLimits(),
                      "p") == b"hello world"
    # percent-encoded payloads are held to the byte cap after decoding
    with pytest.raises(MediaError) as e:
        load_bytes("data:text/plain," + "a" * 1300, MediaLimits(max_bytes=1024), "p")
    assert e.value.status == 413
    for bad in ["data:image/png;base64,a!b", "data:nocomma", "data:image png,x",
                "data:image/png/x,y", "data:image/png;base64"]:
        with pytest.raises(MediaError) as e:
            load_bytes(bad, MediaLimits(), "p")
        assert e.value.status == 400


@pytest.mark.parametrize("tail", ["", ","])
def test_hostile_data_url_header_is_refused_fast(tail):
    # A regex with a nested repeat took seconds on this; the header is parsed in linear time
    # and must end (with its comma) within the first 1024 characters.
    url = "data:image/png" + ";" * 15_000_000 + tail
    start = time.perf_counter()
    with pytest.raises(MediaError) as e:
        load_bytes(url, MediaLimits(max_bytes=32 * 1024 * 1024), "p")
    assert time.perf_counter() - start < 0.5
    assert e.value.status == 400 and "malformed data: URL" in e.value.message


# --- local paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("url,windows,path", [
    ("file:///C:/media/a.png", True, "C:/media/a.png"),
    ("file:///c:/media/a%20b.png", True, "c:/media/a b.png"),
    ("file:///C|/media/a.png", True, "C:/media/a.png"),
    ("file:///C:", True, "C:"),
    ("file://localhost/D:/x/y.png", True, "D:/x/y.png"),
    ("file:///srv/media/a.png", True, "/srv/media/a.png"),
    ("file:///srv/media/a.png", False, "/srv/media/a.png"),
    ("file:///C:/media/a.png", False, "/C:/media/a.png"),  # on POSIX that is a real path
    ("file:///CD:/a.png", True, "/CD:/a.png"),  # not a drive letter
    ("file://localhost/srv/a%23b.png", False, "/srv/a#b.png"),
])
def test_file_url_paths(url, windows, path):
    assert file_url_path(url, "p", windows=windows) == path


def test_file_urls_naming_a_host_are_refused():
    # On Windows file://server/share/x is a network (SMB) path; elsewhere the host was dropped
    # and the path read locally: neither is what the client asked.
    for url in ["file://server/share/a.png", "file://C:/media/a.png"]:
        with pytest.raises(MediaError) as e:
            file_url_path(url, "p", windows=True)
        assert e.value.status == 400


@pytest.mark.parametrize("pathmod,root,full,inside", [
    (ntpath, "C:\\media", "C:\\media\\a.png", True),
    (ntpath, "C:\\media", "c:\\MEDIA\\sub\\a.png", True),  # Windows paths ignore case
    (ntpath, "C:\\media", "C:\\media2\\a.png", False),
    (ntpath, "C:\\media", "D:\\media\\a.png", False),  # another drive: commonpath raises
    (ntpath, "C:\\media", "\\\\server\\share\\a.png", False),
    (ntpath, "C:\\", "C:\\a.png", True),
    (posixpath, "/srv/media", "/srv/media/a/b.png", True),
    (posixpath, "/srv/media", "/srv/media2/a.png", False),
    (posixpath, "/srv/media", "/srv/Media/a.png", False),
    (posixpath, "/", "/etc/passwd", True),
])
def test_inside_root(pathmod, root, full, inside):
    assert inside_root(root, full, pathmod) is inside


def test_local_paths_under_media_root(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a b.png").write_bytes(b"png")
    (tmp_path / "secret").write_bytes(b"secret")
    limits = MediaLimits(media_root=str(root))
    assert load_bytes("a b.png", limits, "p") == b"png"
    assert load_bytes((root / "a b.png").as_uri(), limits, "p") == b"png"
    for outside in ["../secret", str(tmp_path / "secret"), (tmp_path / "secret").as_uri()]:
        with pytest.raises(MediaError) as e:
            load_bytes(outside, limits, "p")
        assert e.value.status == 400 and "outside MEDIA_ROOT" in e.value.message


# --- error messages ---------------------------------------------------------------------------

_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def test_decode_errors_name_the_problem_without_object_reprs():
    broken = bytearray(png(64, 48))
    idat = broken.index(b"IDAT")
    broken[idat - 4:idat] = (1).to_bytes(4, "big")  # Pillow raises SyntaxError while loading
    for data in [b"this is not an image" * 10, png(8, 8)[:40], bytes(broken)]:
        with pytest.raises(MediaError) as e:
            decode_image(data, MediaLimits(), 32, "p")
        assert e.value.status == 400 and e.value.message.startswith("not a decodable image (")
        assert not _REPR.search(e.value.message) and "0x" not in e.value.message
    with pytest.raises(MediaError) as e:
        decode_image(b"garbage" * 20, MediaLimits(), 32, "p")
    assert e.value.message == ("not a decodable image (UnidentifiedImageError: cannot identify "
                               "image file)")
    with pytest.raises(MediaError) as e:
        decode_video(b"garbage" * 20, MediaLimits(), 32, "p")
    assert not _REPR.search(e.value.message)


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
