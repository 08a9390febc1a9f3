"""The security middlewares on raw ASGI scopes (pure logic; the end-to-end checks are in
test_security.py against a real server)."""

from __future__ import annotations

import asyncio

import pytest

from security import APIKeyMiddleware, HostCheckMiddleware, host_name, route_path


async def _call(middleware, scope) -> int:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await middleware(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def scope(path: str, root_path: str = "", headers=(), method: str = "GET", server=None):
    return {"type": "http", "method": method, "path": path, "root_path": root_path,
            "headers": list(headers), "server": server}


@pytest.mark.parametrize("path,root", [("/v1/models", ""), ("/api/v1/models", "/api"),
                                       ("/api/v1", "/api")])
def test_api_keys_hold_under_a_root_path(path, root):
    # uvicorn --root-path /api puts the prefix into scope["path"]; the router strips it.
    mw = APIKeyMiddleware(_ok, ["k1"])
    assert asyncio.run(_call(mw, scope(path, root))) == 401
    assert asyncio.run(_call(mw, scope(path, root, [(b"authorization", b"Bearer k1")]))) == 200
    assert asyncio.run(_call(mw, scope("/api/health", "/api"))) == 200
    assert route_path(scope(path, root)).startswith("/v1")


@pytest.mark.parametrize("host,server,allowed", [
    ("evil.example", ("::ffff:127.0.0.1", 8000), False),  # dual-stack socket, IPv4 peer
    ("localhost.:8000", ("127.0.0.1", 8000), True),
    ("[::ffff:127.0.0.1]:8000", ("127.0.0.1", 8000), True),
    ("LOCALHOST", ("127.0.0.1", 8000), True),
    ("evil.example", ("10.0.0.5", 8000), True),  # not a loopback bind: opt-in only
])
def test_host_check_edge_cases(host, server, allowed):
    mw = HostCheckMiddleware(_ok, [])
    status = asyncio.run(_call(mw, scope("/health", headers=[(b"host", host.encode())],
                                         server=server)))
    assert (status == 200) is allowed, (host, server, status)


def test_host_name_parsing():
    assert host_name("Example.COM:80") == "example.com"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("localhost.") == "localhost"
