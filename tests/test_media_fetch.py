"""media.py's http(s) fetches connect to the address that was checked (DNS rebinding).

Real servers on 127.0.0.1. The one fake is `socket.getaddrinfo`: it stands in for a rebinding
DNS server, answering one address to the first query for a name and another to later ones.
"""

from __future__ import annotations

import http.server as http_server
import shutil
import socket
import ssl
import subprocess
import threading

import certifi
import pytest

from media import MediaError, MediaLimits, load_bytes
from test_vision_e2e import png

UNROUTABLE = "192.0.2.1"  # TEST-NET-1: nothing answers there
IMAGE = png(8, 8)


class Recorder(http_server.BaseHTTPRequestHandler):
    """Serves IMAGE at /img.png (or the server's `body`), redirects /r?to=URL, and records
    (path, Host header) of every request in the server's `seen`."""

    def do_GET(self):  # noqa: N802
        self.server.seen.append((self.path, self.headers.get("Host")))
        if self.path == "/img.png":
            body = getattr(self.server, "body", IMAGE)
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


def serve(host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
    srv = http_server.ThreadingHTTPServer((host, port), Recorder)
    srv.seen = []
    if tls:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def server():
    srv = serve()
    yield srv
    srv.shutdown()
    srv.server_close()


class RebindingDNS:
    """`socket.getaddrinfo` for made-up names: the first query for a name answers `first`,
    later ones `later`. Other names (IP literals included) go to the real resolver."""

    def __init__(self, monkeypatch, names, first="127.0.0.1", later=UNROUTABLE):
        self.names, self.first, self.later = set(names), first, later
        self.queries: dict[str, int] = {}
        self.real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.names:
            return self.real(host, port, family, type, proto, flags)
        self.queries[name] = self.queries.get(name, 0) + 1
        ip = self.first if self.queries[name] == 1 else self.later
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port or 0)))]


def test_each_hop_connects_to_the_address_it_checked(server, monkeypatch):
    # Three hops over three names, each resolved once: a second resolution would answer an
    # address where nothing listens, so only the checked (first) answer can reach the server.
    dns = RebindingDNS(monkeypatch, ["a.test", "b.test", "c.test"])
    p = server.server_address[1]
    url = f"http://a.test:{p}/r?to=http://b.test:{p}/r?to=http://c.test:{p}/img.png"
    limits = MediaLimits(allow_private_urls=True, fetch_timeout_seconds=2)
    assert load_bytes(url, limits, "p") == IMAGE
    assert dns.queries == {"a.test": 1, "b.test": 1, "c.test": 1}
    # The server saw each URL's own host name, not the address connected to.
    assert [host for _, host in server.seen] == [f"a.test:{p}", f"b.test:{p}", f"c.test:{p}"]


def test_a_rebinding_answer_after_the_check_is_not_followed(monkeypatch):
    # The attack: the check sees one server, the connect would be steered to another (here
    # 127.0.0.2 checked, 127.0.0.1 the "internal" one). Linux routes all of 127/8 to loopback.
    internal = serve()
    internal.body = b"internal secret"
    p = internal.server_address[1]
    try:
        public = serve("127.0.0.2", p)
    except OSError:
        internal.shutdown()
        internal.server_close()
        pytest.skip("127.0.0.2 cannot be bound here")
    try:
        RebindingDNS(monkeypatch, ["rebind.test"], first="127.0.0.2", later="127.0.0.1")
        limits = MediaLimits(allow_private_urls=True, fetch_timeout_seconds=2)
        assert load_bytes(f"http://rebind.test:{p}/img.png", limits, "p") == IMAGE
        assert internal.seen == [] and public.seen == [("/img.png", f"rebind.test:{p}")]
    finally:
        for srv in (internal, public):
            srv.shutdown()
            srv.server_close()


def test_later_resolver_answers_are_tried_when_the_first_refuses(server, monkeypatch):
    # "localhost" often answers ::1 first while a server listens on 127.0.0.1 only: all the
    # addresses of the one resolution are checked and tried in order, as a plain connect would.
    real = socket.getaddrinfo

    def two_answers(host, port, *args, **kwargs):
        if host != "two.test":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port)))
                for ip in ("127.0.0.3", "127.0.0.1")]  # nothing listens on 127.0.0.3

    monkeypatch.setattr(socket, "getaddrinfo", two_answers)
    p = server.server_address[1]
    limits = MediaLimits(allow_private_urls=True, fetch_timeout_seconds=2)
    assert load_bytes(f"http://two.test:{p}/img.png", limits, "p") == IMAGE


# --- TLS: SNI and certificate checks use the URL's host name, not the pinned address ----------

def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A test CA and a certificate from it for rebind.test and IP 127.0.0.1, made with the
    openssl command line."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl command")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=media test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", "-new", *ec, "-keyout", "leaf.key", "-out", "leaf.csr",
             "-subj", "/CN=rebind.test", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:rebind.test,IP:127.0.0.1\n"
                               "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d


def test_https_sends_the_host_name_as_sni_and_verifies_it(tls_files, monkeypatch):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_files / "leaf.pem", tls_files / "leaf.key")
    sni = []
    ctx.sni_callback = lambda sock, name, context: sni.append(name)
    srv = serve(tls=ctx)
    p = srv.server_address[1]
    # httpx trusts certifi's bundle (trust_env is off): point it at the test CA.
    monkeypatch.setattr(certifi, "where", lambda: str(tls_files / "ca.pem"))
    dns = RebindingDNS(monkeypatch, ["rebind.test", "other.test"])
    limits = MediaLimits(allow_private_urls=True, fetch_timeout_seconds=2)
    try:
        assert load_bytes(f"https://rebind.test:{p}/img.png", limits, "p") == IMAGE
        assert sni == ["rebind.test"] and srv.seen == [("/img.png", f"rebind.test:{p}")]
        # The certificate also names 127.0.0.1, the address connected to: verifying against
        # the address would pass; against the URL's host name it must fail.
        with pytest.raises(MediaError) as e:
            load_bytes(f"https://other.test:{p}/img.png", limits, "p")
        assert e.value.status == 400 and "ConnectError" in e.value.message
        assert sni[-1] == "other.test" and len(srv.seen) == 1
        assert dns.queries == {"rebind.test": 1, "other.test": 1}
    finally:
        srv.shutdown()
        srv.server_close()
