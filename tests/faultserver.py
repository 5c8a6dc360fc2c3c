"""A fault-injecting HTTP/1.1 server on 127.0.0.1 for download, mount and signed-pack tests.

Real sockets, one thread per connection, no mocks. Each server serves resources that
tests register by path; it honours ``Range``, ``If-Range``, ``ETag``, ``Last-Modified``
and ``HEAD``, records every request it receives (method, path, query, headers) and
counts the body bytes it hands to the kernel per path. Faults are per resource::

    with FaultServer() as origin, FaultServer() as cdn:
        origin.add("/m.gguf", data, drop_after=1 << 20)       # cut the first GET at 1 MiB
        origin.add_redirect("/signed", cdn.url("/blob?X-Amz-Signature=s3cr3t"))
        cdn.add("/blob", data)
        ...
        assert origin.bytes_sent("/m.gguf") <= len(data) * 2
        assert "authorization" not in cdn.requests("/blob")[0].headers

Two instances listen on different ports, so a redirect from one to the other is a
cross-origin hop. ``FaultServer(tls=True)`` serves HTTPS with a throwaway self-signed
certificate (``.ca_file`` is the PEM to trust).

Faults (keyword arguments of :meth:`FaultServer.add`):

===================  ===========================================================
``drop_after``       close the connection after N body bytes (int: first GET only;
                     a list: one entry per GET, ``None`` = no drop)
``drop_every``       close every GET's connection after N body bytes (with
                     ``ignore_range``: an origin no client can finish from)
``stall_after``      on the first GET, send N body bytes then go silent (connection open)
``after_first_get``  attributes to change once the first GET was answered, e.g.
                     ``{"data": new_bytes, "etag": None}`` (the file changes upstream)
``corrupt_at``       flip the byte at this file offset, on the first
                     ``corrupt_times`` GETs (default 1)
``corrupt_every``    flip the byte at this file offset in every response, forever
``ignore_range``     answer every GET with 200 and the whole file
``wrong_range``      answer a Range request with 206 whose Content-Range starts at 0
``ignore_if_range``  serve the range even when If-Range does not match
``change_etag``      a new ETag on every request (the content is "new" each time)
``endless``          a close-delimited body that never ends
``rate``             bytes per second (1 = trickle); None = as fast as possible
``fail_first``       statuses to answer before succeeding, e.g. ``[503, 500]`` or ``[429]``
``retry_after``      value of Retry-After on those failures
``require_auth``     exact Authorization value required, else 401
``content_type``     Content-Type (``text/html`` for a captive portal page)
``etag``             ETag to send (default: derived from the data; None: no ETag)
``last_modified``    Last-Modified to send (None: none)
``headers``          extra response headers
===================  ===========================================================

Each :class:`RecordedRequest` carries the status answered and the body bytes sent for
that request alone (``.sent``), so a test can tell one transfer from the next.

:meth:`FaultServer.add_hf` publishes a file the way the Hugging Face hub does: a
``/{repo}/resolve/{revision}/{filename}`` route answering 302 with ``X-Linked-Etag``
(the SHA-256), ``X-Linked-Size`` and ``X-Repo-Commit``, redirecting to a signed URL on
a CDN server. Data may be ``bytes`` or a ``Path`` (served with ``pread``, so a GiB
file costs no memory). :meth:`FaultServer.add_hf_repo` publishes a whole repository that
way, with the hub's tree listing (``/api/models/{repo}/tree/{revision}``, paginated by a
``Link`` header). A resource may be registered with a query (``path?query``): a request
with exactly that query gets it, any other the resource registered for the path.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.server
import json
import os
import socket
import socketserver
import ssl
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

CHUNK = 1 << 20
DEFAULT_LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"
_AUTO = object()


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    status: int = 0          # status answered (0 until the response starts)
    sent: int = 0            # body bytes handed to the kernel for this request


@dataclass
class Resource:
    data: bytes | Path
    drop_after: int | Sequence[int | None] | None = None
    drop_every: int | None = None
    stall_after: int | None = None
    corrupt_at: int | None = None
    corrupt_times: int = 1
    corrupt_every: int | None = None
    ignore_range: bool = False
    wrong_range: bool = False
    ignore_if_range: bool = False
    change_etag: bool = False
    endless: bool = False
    rate: float | None = None
    fail_first: Sequence[int] = ()
    retry_after: str | None = None
    require_auth: str | None = None
    content_type: str = "application/octet-stream"
    etag: object = _AUTO
    last_modified: str | None = DEFAULT_LAST_MODIFIED
    headers: dict[str, str] = field(default_factory=dict)
    after_first_get: dict[str, object] | None = None
    redirect: str | None = None
    redirect_status: int = 302
    # counters, guarded by the server lock
    requests_seen: int = 0
    gets: int = 0
    failures_sent: int = 0

    @property
    def size(self) -> int:
        return self.data.stat().st_size if isinstance(self.data, Path) else len(self.data)

    def current_etag(self) -> str | None:
        if self.etag is None:
            return None
        if self.etag is not _AUTO:
            return str(self.etag)
        if isinstance(self.data, Path):
            st = self.data.stat()
            base = f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"
        else:
            base = hashlib.sha1(self.data).hexdigest()[:16]
        if self.change_etag:
            base += f"-{self.requests_seen}"
        return f'"{base}"'

    def read(self, offset: int, n: int) -> bytes:
        if isinstance(self.data, Path):
            with open(self.data, "rb") as f:
                return os.pread(f.fileno(), n, offset)
        return self.data[offset:offset + n]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet tests
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    # -- routing ---------------------------------------------------------------
    def _serve(self, head: bool) -> None:
        parts = urlsplit(self.path)
        owner = self.server.owner
        rec = RecordedRequest(self.command, parts.path, parts.query,
                              {k.lower(): v for k, v in self.headers.items()})
        self._rec = rec
        with owner.lock:
            owner.log.append(rec)
            # A resource registered with its query (a listing's next page) wins over its path.
            res = owner.resources.get(f"{parts.path}?{parts.query}") if parts.query else None
            res = res or owner.resources.get(parts.path)
            if res is not None:
                res.requests_seen += 1
                if not head:
                    res.gets += 1
                get_no = res.gets
                fail = None
                if res.failures_sent < len(res.fail_first):
                    fail = res.fail_first[res.failures_sent]
                    res.failures_sent += 1
                etag = res.current_etag()
        if res is None:
            return self._simple(404, b"not found\n")
        if res.require_auth is not None and self.headers.get("Authorization") != res.require_auth:
            return self._simple(401, b"unauthorized\n", {"WWW-Authenticate": "Bearer"})
        if fail is not None:
            extra = {"Retry-After": res.retry_after} if res.retry_after is not None else {}
            return self._simple(fail, f"failure {fail}\n".encode(), extra)
        if res.redirect is not None:
            return self._simple(res.redirect_status, b"", {"Location": res.redirect, **res.headers})
        self._send_body(res, parts.path, head, get_no, etag)

    def _simple(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._rec.status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_body(self, res: Resource, path: str, head: bool, get_no: int, etag: str | None) -> None:
        size = res.size
        start, end = 0, size  # [start, end)
        status = 200
        rng = self.headers.get("Range")
        if rng and not res.ignore_range and not res.endless:
            if_range = self.headers.get("If-Range")
            honour = True
            if if_range is not None and not res.ignore_if_range:
                honour = if_range == etag or (if_range == res.last_modified and res.last_modified)
            if honour:
                parsed = _parse_range(rng, size)
                if parsed == "unsatisfiable":
                    return self._simple(416, b"", {"Content-Range": f"bytes */{size}"})
                if parsed is not None:
                    start, end = parsed
                    status = 206
        self._rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", res.content_type)
        self.send_header("Accept-Ranges", "bytes")
        if etag is not None:
            self.send_header("ETag", etag)
        if res.last_modified is not None:
            self.send_header("Last-Modified", res.last_modified)
        for k, v in res.headers.items():
            self.send_header(k, v)
        if res.endless:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            if status == 206:
                shown = 0 if res.wrong_range else start
                self.send_header("Content-Range", f"bytes {shown}-{end - 1}/{size}")
            self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if head:
            return
        drop = res.drop_after
        if isinstance(drop, Sequence):
            drop = drop[get_no - 1] if get_no <= len(drop) else None
        elif get_no > 1:
            drop = None
        if res.drop_every is not None:
            drop = res.drop_every
        corrupt = res.corrupt_at if get_no <= res.corrupt_times else None
        if res.corrupt_every is not None:
            corrupt = res.corrupt_every
        stall = res.stall_after if get_no == 1 else None
        self.wfile.flush()
        try:
            self._stream(res, path, start, end, drop, corrupt, stall)
        finally:
            if get_no == 1 and res.after_first_get:
                with self.server.owner.lock:
                    for k, v in res.after_first_get.items():
                        setattr(res, k, v)

    def _stream(self, res: Resource, path: str, start: int, end: int, drop: int | None,
                corrupt: int | None, stall: int | None) -> None:
        owner = self.server.owner
        sock = self.connection
        sent = 0
        pos = start
        chunk = CHUNK
        if res.rate is not None:
            chunk = max(1, min(64 << 10, int(res.rate / 20)))
        t0 = owner.clock()
        try:
            while res.endless or pos < end:
                if owner.stopping.is_set():
                    break
                n = chunk if res.endless else min(chunk, end - pos)
                if drop is not None:
                    n = min(n, drop - sent)
                    if n <= 0:
                        break
                if stall is not None and sent >= stall:
                    owner.stopping.wait(60)  # silent, connection open, until the test ends
                    break
                if stall is not None:
                    n = min(n, stall - sent)
                data = (b"\0" * n) if res.endless else res.read(pos, n)
                if corrupt is not None and pos <= corrupt < pos + len(data):
                    b = bytearray(data)
                    b[corrupt - pos] ^= 0xFF
                    data = bytes(b)
                sock.sendall(data)
                with owner.lock:
                    owner.sent[path] = owner.sent.get(path, 0) + len(data)
                    self._rec.sent += len(data)
                sent += len(data)
                pos += len(data)
                if res.rate is not None:
                    due = t0 + sent / res.rate
                    wait = due - owner.clock()
                    if wait > 0 and owner.stopping.wait(wait):
                        break
        except OSError:
            pass  # the client went away (killed, or gave up): that is a test scenario, not an error
        if drop is not None or res.endless or pos < end:
            self.close_connection = True
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """``bytes=N-`` or ``bytes=N-M``; anything else is ignored (None)."""
    if not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[6:].partition("-")
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size) if n > 0 else "unsatisfiable"
        a = int(first)
        b = int(last) + 1 if last else size
    except ValueError:
        return None
    if a >= size:
        return "unsatisfiable"
    return a, min(b, size)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: FaultServer
    ssl_context: ssl.SSLContext | None = None

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            # Handshake in the connection's thread (on first read), not the accept loop.
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        pass  # a client that disappears mid-request is a scenario, not a failure


class FaultServer:
    """An HTTP server on 127.0.0.1 serving registered resources with injected faults."""

    def __init__(self, *, tls: bool = False) -> None:
        import time
        self.clock = time.monotonic
        self.lock = threading.Lock()
        self.resources: dict[str, Resource] = {}
        self.log: list[RecordedRequest] = []
        self.sent: dict[str, int] = {}
        self.stopping = threading.Event()
        self.tls = tls
        self.ca_file: str | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        if tls:
            self._server.ssl_context = self._make_tls()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"faultserver-{self.port}", daemon=True)
        self._thread.start()

    # -- lifecycle --------------------------------------------------------------
    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- addresses --------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.origin + path

    # -- content ------------------------------------------------------------------
    def add(self, path: str, data: bytes | Path, **faults: object) -> Resource:
        """Serve ``data`` at ``path`` (query strings are ignored when routing)."""
        res = Resource(data, **faults)  # type: ignore[arg-type]
        with self.lock:
            self.resources[path] = res
        return res

    def add_redirect(self, path: str, location: str, status: int = 302, **faults: object) -> Resource:
        return self.add(path, b"", redirect=location, redirect_status=status, **faults)

    def add_hf(self, repo: str, filename: str, data: bytes | Path, *, revision: str = "main",
               cdn: FaultServer | None = None, signature: str = "sig", token: str | None = None,
               commit: str = "a" * 40, **faults: object) -> str:
        """Publish ``data`` like the hub: a resolve route redirecting to a signed CDN URL.
        Returns the SHA-256. ``faults`` apply to the CDN resource."""
        sha = _sha256_of(data)
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        cdn = cdn or self
        blob_path = f"/repos/{sha[:2]}/{sha}"
        cdn.add(blob_path, data, **faults)
        location = (cdn.url(blob_path)
                    + f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=3600&X-Amz-Signature={signature}")
        for rev in {revision, commit}:  # the hub answers for the branch and for the commit
            self.add(f"/{repo}/resolve/{rev}/{filename}", b"", redirect=location,
                     require_auth=f"Bearer {token}" if token else None,
                     etag='"0123456789abcdef0123456789abcdef01234567"',
                     headers={"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(size),
                              "X-Repo-Commit": commit})
        return sha

    def add_hf_repo(self, repo: str, files: dict[str, bytes | Path], *, revision: str = "main",
                    commit: str = "a" * 40, cdn: FaultServer | None = None, token: str | None = None,
                    page_size: int = 1000, extra: Sequence[dict[str, object]] = (),
                    **faults: object) -> dict[str, str]:
        """Publish a whole repository like the hub: every file through :meth:`add_hf`, and the
        tree listing ``/api/models/{repo}/tree/{revision}`` (and ``/{commit}``) as the hub
        sends it for ``recursive=true``: a JSON list of ``{"type": "file", "path", "size",
        "oid", "lfs": {"oid", "size", "pointerSize"}}`` (folders as ``{"type": "directory"}``),
        ``page_size`` entries a page, the next page named by a ``Link: <…>; rel="next"``
        header (a cursor in the query). ``extra`` entries are appended as they are (plain
        git files, malformed ones). Returns {path: SHA-256}."""
        digests: dict[str, str] = {}
        entries: list[dict[str, object]] = []
        folders = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
        for folder in folders:
            entries.append({"type": "directory", "path": folder, "size": 0,
                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
        for path, data in sorted(files.items()):
            sha = self.add_hf(repo, path, data, revision=revision, cdn=cdn, token=token, commit=commit, **faults)
            size = data.stat().st_size if isinstance(data, Path) else len(data)
            digests[path] = sha
            entries.append({"type": "file", "path": path, "size": size, "oid": hashlib.sha1(sha.encode()).hexdigest(),
                            "lfs": {"oid": sha, "size": size, "pointerSize": 134}})
        entries += list(extra)
        entries.sort(key=lambda e: str(e["path"]))
        pages = [entries[i:i + page_size] for i in range(0, len(entries), page_size)] or [[]]
        for rev in {revision, commit}:
            base = f"/api/models/{repo}/tree/{quote(rev, safe='')}"
            for n, page in enumerate(pages):
                headers = {}
                if n + 1 < len(pages):
                    headers["Link"] = f'<{self.url(base)}?recursive=true&cursor={n + 1}>; rel="next"'
                path = base if n == 0 else f"{base}?recursive=true&cursor={n}"
                self.add(path, json.dumps(page).encode(), content_type="application/json", headers=headers,
                         require_auth=f"Bearer {token}" if token else None)
        return digests

    # -- observations ---------------------------------------------------------------
    def bytes_sent(self, path: str) -> int:
        """Body bytes handed to the kernel for ``path`` so far."""
        with self.lock:
            return self.sent.get(path, 0)

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        with self.lock:
            return [r for r in self.log if path is None or r.path == path]

    def reset_counts(self) -> None:
        with self.lock:
            self.sent.clear()
            self.log.clear()

    # -- TLS ----------------------------------------------------------------------------
    def _make_tls(self) -> ssl.SSLContext:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        self._tmp = tempfile.TemporaryDirectory(prefix="faultserver-tls-")
        cert_pem = Path(self._tmp.name) / "cert.pem"
        key_pem = Path(self._tmp.name) / "key.pem"
        cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        self.ca_file = str(cert_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_pem, key_pem)
        return ctx


def _sha256_of(data: bytes | Path) -> str:
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    with open(data, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- pytest fixtures: import them into a test module (``from faultserver import origin, cdn``) --
@pytest.fixture
def origin() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


@pytest.fixture
def cdn() -> Iterator[FaultServer]:
    """A second server: a redirect from ``origin`` to it crosses origins."""
    with FaultServer() as srv:
        yield srv
