"""Media input for vision-language models: fetch bytes safely, decode images and video frames.

Sources: `data:` URLs (base64), `http(s)://` URLs, and local paths (`file://` or plain) under
MEDIA_ROOT. Decoding: Pillow for images, PyAV for video. Sizes: qwen-vl-utils' `smart_resize`
(Qwen's resize rule: sides multiples of the patch factor, pixels within a budget).

Why our own fetching rather than qwen-vl-utils' `fetch_image`/`fetch_video`: those fetch any URL
with no timeout, byte cap or address check. Here every http(s) hop is resolved and refused if it
points into private, loopback, link-local, multicast, reserved or cloud-metadata address space
(SSRF), unless ALLOW_PRIVATE_MEDIA_URLS is set, and the connection goes to exactly the addresses
checked: a name is resolved once, so a rebinding DNS server cannot answer a public address to
the check and a private one to the connect. Redirects are followed by hand, each hop resolved,
checked and pinned anew; bodies are read up to a byte cap. Every failure is a `MediaError`
carrying the HTTP status to answer (400 bad input, 413 too large) and the request `param` it
concerns.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import ipaddress
import os
import re
import socket
import struct
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import av
import httpx
import numpy as np
from PIL import Image
from qwen_vl_utils.vision_process import smart_resize

# Decoding an image allocates width*height*3 bytes before any resize: refuse headers that
# promise more than this (a decompression bomb); an 8K photo (33 MP) still passes.
MAX_DECODE_PIXELS = 40_000_000
MAX_REDIRECTS = 5
# Demuxers accepted for video. FFmpeg guesses the format from the bytes, and some formats are
# scripts that open other files (concat, HLS playlists): only plain containers are allowed,
# and no protocol may be opened from inside the data.
VIDEO_DEMUXERS = frozenset({"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm",
                            "avi", "mpegts", "flv", "ogg", "gif", "h264", "hevc", "mpeg"})
# Packets one video may have: decoding time is bounded by this, not by the byte cap alone.
MAX_VIDEO_PACKETS = 20_000


class MediaError(Exception):
    """A media item that cannot be used. `status` is 400 or 413; `param` names the part."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param



def media_url(part: dict[str, Any]) -> Any:
    """The URL of a media content part, whichever accepted shape it comes in (chat's
    `image_url`/`video_url` objects or strings, Qwen's `image`/`video`, Responses'
    `input_image`)."""
    part_type = part.get("type")
    value = part.get(part_type) if part_type in ("image_url", "video_url", "image", "video") else None
    if value is None:
        value = part.get("image_url") or part.get("url")
    return value.get("url") if isinstance(value, dict) else value

@dataclass(frozen=True)
class MediaLimits:
    """Limits for one request. Bytes, pixels and seconds as the names say."""

    max_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 1280 * 28 * 28
    max_video_pixels: int = 16 * 256 * 28 * 28
    max_video_frames: int = 16
    fetch_timeout_seconds: float = 10.0
    allow_private_urls: bool = False
    media_root: str | None = None


@dataclass
class Video:
    """Decoded frames (T, H, W, 3) uint8 RGB and where they sit in time.

    `timestamps` are seconds from the start, `fps` the source's frame rate, `frame_indices` the
    source frame numbers sampled, `total_frames` and `duration` those of the source.
    """

    frames: np.ndarray
    timestamps: list[float]
    frame_indices: list[int]
    fps: float
    total_frames: int
    duration: float


# --- fetching ---------------------------------------------------------------------------------

# A data: URL's header ("data:<type>[;param]*[;base64],") must end within this many characters:
# the comma is searched for in a bounded prefix, not across a multi-megabyte payload.
MAX_DATA_URL_HEADER = 1024
_MIME_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+")
# `file:///C:/x` has the URL path "/C:/x": on Windows the slash before the drive is not part
# of the path (RFC 8089 appendix E.2; "C|" is the old spelling of "C:").
_DRIVE_URL_PATH = re.compile(r"/([A-Za-z])[:|](?=/|$)")


def load_bytes(url: str, limits: MediaLimits, param: str) -> bytes:
    """The bytes behind a media URL or path. Raises MediaError (400/413)."""
    if not isinstance(url, str) or not url:
        raise MediaError(400, "media url must be a non-empty string", param)
    lowered = url[:16].lower()
    if lowered.startswith("data:"):
        return _data_url_bytes(url, limits, param)
    if lowered.startswith(("http://", "https://")):
        return _http_bytes(url, limits, param)
    if lowered.startswith("file://"):
        return _file_bytes(file_url_path(url, param), limits, param)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        scheme = url.split("://", 1)[0]
        raise MediaError(400, f"unsupported media url scheme {scheme!r}: use data:, http(s):// "
                              f"or a path under MEDIA_ROOT", param)
    return _file_bytes(url, limits, param)


def _data_url_bytes(url: str, limits: MediaLimits, param: str) -> bytes:
    """The payload of `data:[<type>][;param]*[;base64],<data>` (base64 only as the last
    parameter, else percent-encoded). Linear time in the URL's length: string operations on a
    header of at most MAX_DATA_URL_HEADER characters. Raises MediaError 400 (malformed) or 413.
    """
    malformed = MediaError(400, "malformed data: URL (expected data:<type>;base64,<data>)", param)
    comma = url.find(",", 0, MAX_DATA_URL_HEADER)
    if comma < 0:
        raise malformed
    mime, *params = url[len("data:"):comma].split(";")
    if mime and not _MIME_TYPE.fullmatch(mime):
        raise malformed
    payload = url[comma + 1:]
    too_large = MediaError(413, f"media is larger than {limits.max_bytes} bytes", param)
    if not params or params[-1].lower() != "base64":
        if len(payload) // 3 > limits.max_bytes:  # "%41" is 3 characters for 1 byte
            raise too_large
        data = urllib.parse.unquote_to_bytes(payload)
        if len(data) > limits.max_bytes:
            raise too_large
        return data
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise too_large
    # Base64 wrapped at 76 columns (MIME) is common; whitespace carries no data.
    if any(c in payload for c in " \t\r\n"):
        payload = "".join(payload.split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(400, f"malformed base64 in data: URL ({e})", param) from e


def file_url_path(url: str, param: str, windows: bool = os.name == "nt") -> str:
    """The local path a `file:` URL names, percent-decoded: `file:///srv/a.png` -> "/srv/a.png";
    with `windows`, `file:///C:/media/a.png` -> "C:/media/a.png" (not "/C:/media/a.png", which
    Windows reads as C:/media/a.png on the current drive, or refuses). Raises MediaError 400
    for a URL naming a host other than localhost: on Windows that is a network (SMB) path.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.netloc.lower() not in ("", "localhost"):
        raise MediaError(400, "file: URLs naming a host are refused: use file:///<path>", param)
    path = urllib.parse.unquote(parts.path)
    m = _DRIVE_URL_PATH.match(path) if windows else None
    return f"{m.group(1)}:{path[m.end():]}" if m else path


def inside_root(root: str, full: str, pathmod=os.path) -> bool:
    """Whether the normalized absolute path `full` is `root` or below it. `pathmod` is the
    path module whose rules apply (os.path; ntpath or posixpath in tests). A path on another
    Windows drive or share than root is outside (ntpath.commonpath raises ValueError there)."""
    try:
        common = pathmod.commonpath([root, full])
    except ValueError:
        return False
    return pathmod.normcase(common) == pathmod.normcase(root)


def _file_bytes(path: str, limits: MediaLimits, param: str) -> bytes:
    if not limits.media_root:
        raise MediaError(400, "local media paths are refused: the server has no MEDIA_ROOT set",
                         param)
    root = os.path.realpath(limits.media_root)
    full = os.path.realpath(os.path.join(root, path))  # an absolute `path` replaces root here
    if not inside_root(root, full):
        raise MediaError(400, "media path is outside MEDIA_ROOT", param)
    if not os.path.isfile(full):
        raise MediaError(400, "media file not found under MEDIA_ROOT", param)
    if os.path.getsize(full) > limits.max_bytes:
        raise MediaError(413, f"media is larger than {limits.max_bytes} bytes", param)
    with open(full, "rb") as f:
        return f.read()


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address):
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, Teredo, IPv4-compatible
    forms), else the address itself: `::ffff:127.0.0.1` must be judged as 127.0.0.1."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def check_host(host: str, port: int, allow_private: bool, param: str) -> list[str]:
    """The addresses `host` resolves to, in the resolver's order, each one checked: the only
    addresses a fetch may then connect to (resolving again could give other answers). Raises
    MediaError 400 when the name does not resolve, or when any address is non-public (SSRF),
    unless `allow_private`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MediaError(400, f"media host {host!r} cannot be resolved", param) from e
    addresses = list(dict.fromkeys(info[4][0] for info in infos))  # IPv6 keeps any "%zone"
    if allow_private:
        return addresses
    for address in addresses:
        ip = embedded_ipv4(ipaddress.ip_address(address.split("%", 1)[0]))
        if not ip.is_global or ip.is_multicast:
            raise MediaError(400, f"media url host {host!r} resolves to a private, loopback, "
                                  f"link-local or reserved address; such urls are refused "
                                  f"(ALLOW_PRIVATE_MEDIA_URLS=1 allows them)", param)
    return addresses


@contextlib.contextmanager
def _pinned_get(target: httpx.URL, addresses: list[str], timeout_seconds: float,
                deadline: float) -> Iterator[httpx.Response]:
    """A streamed GET of `target` over a connection to one of `addresses` (tried in order on
    a refused or failed connect, as a plain connect would), never to a fresh resolution of its
    host. The request keeps the URL's name where the server looks: the Host header, and for
    https the TLS SNI and the certificate check (httpcore's `sni_hostname` extension).

    Each network wait is bounded by `timeout_seconds`, connects together also by `deadline`
    (time.monotonic()). One client per hop: a pooled TLS connection verified for one name must
    not carry a redirect to another name that pins the same address. Raises httpx errors."""
    for i, address in enumerate(addresses):
        left = deadline - time.monotonic()
        if left <= 0:
            raise httpx.ConnectTimeout("media fetch deadline passed")
        timeout = httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, left))
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request(
                "GET", target.copy_with(host=address),
                headers={"Host": target.netloc.decode("ascii")},
                extensions={"sni_hostname": target.raw_host.decode("ascii")})
            try:
                r = client.send(request, stream=True)
            except httpx.ConnectError:
                if i + 1 == len(addresses):
                    raise
                continue
            try:
                yield r
            finally:
                r.close()
            return


def _http_bytes(url: str, limits: MediaLimits, param: str) -> bytes:
    # httpx's timeout bounds each read; the deadline bounds the whole fetch (a server sending
    # a byte every few seconds must not hold a worker thread for ever).
    deadline = time.monotonic() + limits.fetch_timeout_seconds
    for _ in range(MAX_REDIRECTS + 1):
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, ValueError):
            target = None
        if target is None or target.scheme not in ("http", "https") or not target.raw_host:
            raise MediaError(400, f"unsupported media redirect target {url[:100]!r}", param)
        # The name httpx would have connected to (lowercase, IDNA-encoded, IPv6 unbracketed).
        addresses = check_host(target.raw_host.decode("ascii"),
                               target.port or (443 if target.scheme == "https" else 80),
                               limits.allow_private_urls, param)
        try:
            with _pinned_get(target, addresses, limits.fetch_timeout_seconds, deadline) as r:
                if r.is_redirect:
                    location = r.headers.get("location", "")
                    try:
                        url = urllib.parse.urljoin(url, location)
                    except ValueError as e:  # such as an unclosed "[" in the host
                        raise MediaError(400, f"unsupported media redirect target "
                                              f"{location[:100]!r}", param) from e
                    continue
                if r.status_code != 200:
                    raise MediaError(400, f"fetching media failed: HTTP {r.status_code}", param)
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise MediaError(413, f"media is larger than {limits.max_bytes} bytes", param)
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("media fetch deadline passed")
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise MediaError(413, f"media is larger than {limits.max_bytes} bytes",
                                         param)
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException as e:
            raise MediaError(400, f"fetching media timed out after "
                                  f"{limits.fetch_timeout_seconds:g} s", param) from e
        except httpx.HTTPError as e:
            raise MediaError(400, f"fetching media failed: {type(e).__name__}", param) from e
    raise MediaError(400, f"media url redirected more than {MAX_REDIRECTS} times", param)


# --- decoding ---------------------------------------------------------------------------------

# A library's message can carry an object's repr, such as Pillow's "cannot identify image file
# <_io.BytesIO object at 0x7f...>": memory addresses and internals are no business of a client.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def _reason(e: BaseException) -> str:
    """"Type: message" of a library error for a client's eyes: object reprs cut out, at most
    200 characters of message."""
    text = _OBJECT_REPR.sub("", str(e)[:500]).strip()[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def decode_image(data: bytes, limits: MediaLimits, factor: int, param: str) -> Image.Image:
    """RGB image resized (Qwen's rule) to at most `max_image_pixels`. Raises MediaError."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_DECODE_PIXELS:
            raise MediaError(413, f"image is {w}x{h} pixels, over the decode limit of "
                                  f"{MAX_DECODE_PIXELS} (decompression bomb?)", param)
        th, tw = smart_resize(h, w, factor=factor, min_pixels=factor * factor,
                              max_pixels=max(limits.max_image_pixels, factor * factor))
        if img.format == "JPEG":
            img.draft("RGB", (tw, th))  # decode at reduced scale: far less memory for big JPEGs
        img = img.convert("RGB")
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError(413, f"image refused as a decompression bomb ({_reason(e)})",
                         param) from e
    # Pillow's plugins signal broken data with SyntaxError, EOFError and struct.error too, not
    # only OSError (a PNG with a wrong chunk length raises SyntaxError while loading).
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise MediaError(400, f"not a decodable image ({_reason(e)})", param) from e
    if img.size != (tw, th):
        img = img.resize((tw, th), Image.Resampling.BICUBIC)
    return img


def decode_video(data: bytes, limits: MediaLimits, factor: int, param: str) -> Video:
    """Up to `max_video_frames` frames sampled evenly over the video, with real timestamps,
    each resized so that all frames together stay within `max_video_pixels`.

    Two passes so memory stays at the sampled frames: demux packets (no decoding) to learn the
    frame count and times, then decode once and convert only the sampled frames. An odd count
    gets its last frame repeated (Qwen's temporal patch is 2 frames). Raises MediaError for
    images, and when nothing decodes.
    """
    try:
        container = av.open(io.BytesIO(data), options={"protocol_whitelist": "none"})
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise MediaError(400, f"not a decodable video ({type(e).__name__})", param) from e
    with container:
        name = container.format.name
        if name == "image2" or name.endswith("_pipe"):
            raise MediaError(400, f"this is an image ({name}), not a video: send it as an "
                                  f"image_url part", param)
        if not set(name.split(",")) & VIDEO_DEMUXERS:
            raise MediaError(400, f"unsupported video container {name!r}", param)
        if not container.streams.video:
            raise MediaError(400, "the media has no video stream", param)
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        base = float(stream.time_base) if stream.time_base else 1.0 / fps
        w, h = stream.codec_context.width, stream.codec_context.height
        if not w or not h:
            raise MediaError(400, "the video stream has no frame size", param)
        if w * h > MAX_DECODE_PIXELS:
            raise MediaError(413, f"video frames are {w}x{h} pixels, over the decode limit of "
                                  f"{MAX_DECODE_PIXELS}", param)
        try:
            pts = []
            for p in container.demux(stream):
                if p.size and p.pts is not None:
                    pts.append(p.pts)
                    if len(pts) > MAX_VIDEO_PACKETS:
                        raise MediaError(413, f"the video has more than {MAX_VIDEO_PACKETS} "
                                              f"frames", param)
            pts.sort()
        except (av.error.FFmpegError, ValueError, OSError) as e:
            raise MediaError(400, f"not a decodable video ({type(e).__name__})", param) from e
        if not pts:
            raise MediaError(400, "the video has no frames", param)
        total = len(pts)
        want = min(limits.max_video_frames, total)
        picks = sorted({round(i * (total - 1) / max(want - 1, 1)) for i in range(want)})
        per_frame = max(limits.max_video_pixels // len(picks), factor * factor)
        th, tw = smart_resize(h, w, factor=factor, min_pixels=factor * factor, max_pixels=per_frame)
        wanted, arrays, indices = set(picks), [], []
        try:
            container.seek(0)
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    arrays.append(frame.to_ndarray(format="rgb24", width=tw, height=th))
                    indices.append(i)
                if i >= picks[-1]:
                    break
        except (av.error.FFmpegError, ValueError, OSError) as e:
            if not arrays:
                raise MediaError(400, f"no decodable video frames ({type(e).__name__})",
                                 param) from e
    if not arrays:
        raise MediaError(400, "the video has no decodable frames", param)
    if len(arrays) % 2:
        # Qwen's temporal patch takes frames in pairs: repeat the last, as qwen-vl-utils does.
        arrays, indices = arrays + arrays[-1:], indices + indices[-1:]
    start = pts[0]
    return Video(frames=np.stack(arrays),
                 timestamps=[round((pts[i] - start) * base, 3) for i in indices],
                 frame_indices=indices, fps=fps, total_frames=total,
                 duration=(pts[-1] - start) * base + 1.0 / fps)
