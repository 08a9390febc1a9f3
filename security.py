"""Who may call the server: API keys, session owners, and the Host header check.

Three pure ASGI middlewares' worth of policy, kept apart from the routes:
  - `APIKeyMiddleware`: with API_KEYS set, every `/v1` route wants `Authorization: Bearer <key>`
    (401 in the OpenAI error shape otherwise, as api.openai.com answers a bad key). The key's
    owner id goes into `scope["state"]["owner"]` for the routes: a session belongs to the key
    that created it, and any other key gets 404 for it (not 403: no existence oracle).
  - `HostCheckMiddleware`: a browser page on evil.example can make its name resolve to 127.0.0.1
    (DNS rebinding) and then read a local server's answers as same-origin. The Host header
    still says evil.example, so a server reached on a loopback address accepts only localhost
    names unless ALLOWED_HOSTS says otherwise (Django and Vite do the same).
  - CORS itself is Starlette's CORSMiddleware, configured in main.py.
Keys are never logged; only a short SHA-256 of a key is stored with a session.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any

from fastapi.responses import JSONResponse

from schemas import error_body

# --- helpers shared with the routes -----------------------------------------------------------


def split_list(value: str) -> list[str]:
    """A comma-separated setting to its non-empty, stripped items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def owner_id(key: str | None) -> str | None:
    """What a session stores of the key that made it: 16 hex digits of SHA-256 (None: no key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else None


def request_owner(scope_or_request: Any) -> str | None:
    """The owner id the APIKeyMiddleware found for this request (None without API keys)."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    return (scope.get("state") or {}).get("owner")


def _error(status: int, message: str, type: str, code: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": None,
                                   "code": code}}, status_code=status, headers=headers)


# --- API keys ---------------------------------------------------------------------------------


def route_path(scope: dict[str, Any]) -> str:
    """The path the router matches: uvicorn's `--root-path` is part of `scope["path"]` and is
    stripped before routing (as Starlette does), so checks must strip it too."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path



class APIKeyMiddleware:
    """401 for `/v1` requests without one of `keys` as a Bearer token; CORS preflights pass
    (browsers send them without credentials). Compares in constant time."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        path = route_path(scope)
        if (scope["type"] != "http" or not self.keys or scope["method"] == "OPTIONS"
                or not (path == "/v1" or path.startswith("/v1/"))):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            response = _error(401, "missing API key: send it as 'Authorization: Bearer <key>'",
                              "invalid_request_error", "missing_api_key",
                              {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        # Every key is compared, so the time taken does not tell which one came close.
        matches = [hmac.compare_digest(token, k) for k in self.keys]
        if not any(matches):
            response = _error(401, "incorrect API key provided", "invalid_request_error",
                              "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        scope.setdefault("state", {})["owner"] = owner_id(token.decode("latin-1"))
        return await self.app(scope, receive, send)


# --- the Host header --------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    # A dual-stack socket reports an IPv4 peer as ::ffff:127.0.0.1.
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def host_name(header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header[1:]
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")  # "localhost." is the same name, fully qualified


def is_local_name(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost") or _is_loopback(name)


class HostCheckMiddleware:
    """400 for a Host header the server does not answer to.

    `allowed` empty: on a connection to a loopback address only localhost names pass, on any
    other address every name does; `*` in `allowed` lets everything pass; otherwise a name
    must equal an entry, or end with one that starts with `*.` (e.g. `*.example.com`).
    """

    def __init__(self, app, allowed: list[str]):
        self.app = app
        self.allowed = [a.lower() for a in allowed]

    def allows(self, name: str, server: tuple[str, int] | None) -> bool:
        if "*" in self.allowed or not name:
            return True  # no Host header at all: not a browser, nothing to rebind
        if not self.allowed:
            return not (server and _is_loopback(server[0])) or is_local_name(name)
        return any(name == a or (a.startswith("*.") and name.endswith(a[1:]))
                   for a in self.allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        name = host_name(raw)
        if not self.allows(name, scope.get("server")):
            response = _error(400, f"Host header {name[:100]!r} is not allowed: this server "
                                   f"answers to localhost names on a loopback address; set "
                                   f"ALLOWED_HOSTS to accept others", "invalid_request_error",
                              "invalid_host")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# The request body limit
# ---------------------------------------------------------------------------------------------

class BodyLimitMiddleware:
    """Answers 413 to request bodies over `max_bytes`, before any parsing.

    Buffers the body (bounded by the limit) and replays it to the app, so chunked uploads are
    caught as well as those with a Content-Length.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = JSONResponse(error_body(
            413, f"request body is larger than the limit of {self.max_bytes} bytes "
                 f"(MAX_REQUEST_BODY_BYTES)", code="request_too_large"), status_code=413)
        await response(scope, receive, send)
