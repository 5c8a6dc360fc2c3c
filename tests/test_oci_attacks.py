"""An attacker's registry and hub: the new network paths of ``pull oci://``, ``push`` and
repo-level hub pulls, each attack replayed against a real server on 127.0.0.1.

:class:`Hostile` is a small HTTP server each test scripts route by route (what a hostile
registry, token server, storage origin or hub sends); the real ``docker-registry``
(``tests/registry.py``) is used where a well-behaved registry is the point. The store's
side runs for real: the CLI in process, or ``store.oci`` / ``store.hf`` on trio with
the store's one HTTP layer.
"""
# ruff: noqa: F811 - the real registry's fixtures are imported by name

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from conftest import CLI, wait_for
from ggufgen import write_model
from modelfs_store import hf, oci
from modelfs_store.core import Store
from modelfs_store.download import Downloader
from modelfs_store.errors import FetchError, FormatError, IntegrityError, StoreError, UsageError
from modelfs_store.http import Http
from registry import Registry, TokenServer
from test_oci import token_registry, tokens  # noqa: F401 - the real registry with Bearer auth

USER, PASSWORD = "mallory-victim", "s3cret-Registry-Pa55"
CREDS = {"MODELFS_REGISTRY_USER": USER, "MODELFS_REGISTRY_PASSWORD": PASSWORD}
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


# -- a scripted server --------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]   # lower-cased names


Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Hostile:
    """An HTTP origin on 127.0.0.1 whose answers the test scripts: ``on(method, path,
    route)``; every request is recorded. Unscripted paths get ``default``, else 404."""
    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    default: Route | None = None  # for unscripted paths (else 404)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                parts = urlsplit(self.path)
                server.seen.append(Seen(self.command, parts.path, parts.query,
                                        {k.lower(): v for k, v in self.headers.items()}))
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                route = server.routes.get((self.command, parts.path), server.default)
                try:
                    if route is None:
                        reply(self, 404, b'{"errors":[{"code":"NOT_FOUND","message":"no"}]}')
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _any  # noqa: N815 - http.server's names

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return f"http://{self.netloc}{path}"

    def on(self, method: str, path: str, route: Route) -> None:
        self.routes[(method, path)] = route

    def asked(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Route:
    return lambda h: reply(h, status, body, headers)


def trickle(total: int, every: float) -> Route:
    """200 with a Content-Length of ``total``, one byte per ``every`` seconds: each wait
    is shorter than any timeout, the whole would take ``total * every``."""
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(total))
        h.end_headers()
        for _ in range(total):
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(every)
    return route


@pytest.fixture
def hostile() -> Iterator[Callable[[], Hostile]]:
    made: list[Hostile] = []

    def make() -> Hostile:
        made.append(Hostile())
        return made[-1]

    yield make
    for h in made:
        h.close()


@pytest.fixture(autouse=True)
def isolated_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("MODELFS_REGISTRY_USER", "MODELFS_REGISTRY_PASSWORD", "MODELFS_REGISTRY_HOST", "DOCKER_CONFIG",
                "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELFS_REGISTRY_AUTH_FILE", str(tmp_path / "docker" / "config.json"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("MODELFS_MAX_RETRIES", "0")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(fn: Callable[[], Any], limit: float = 20.0) -> Any:
    """``fn()`` on trio, failing the test (TooSlowError) if it takes more than ``limit`` s."""
    async def main() -> Any:
        with trio.fail_after(limit):
            return await fn()
    return trio.run(main)


def manifest(layers: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                       "config": {"mediaType": oci.DMR_CONFIG, "digest": "sha256:" + "0" * 64, "size": 2},
                       "layers": layers, **extra}).encode()


def layer(data: bytes, title: str | None = None, **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": oci.DMR_GGUF, "digest": f"sha256:{sha(data)}", "size": len(data)}
    if title is not None:
        out["annotations"] = {oci.TITLE: title}
    return {**out, **over}


def serve_manifest(reg: Hostile, repo: str, ref: str, body: bytes) -> None:
    reg.on("GET", f"/v2/{repo}/manifests/{ref}",
           answer(200, body, {"Content-Type": oci.OCI_MANIFEST, "Docker-Content-Digest": f"sha256:{sha(body)}"}))


async def resolve(reference: str, timeout: float = 5.0) -> oci.Artifact:
    http = Http(timeout=timeout)
    try:
        return await oci.resolve(http, oci.parse_reference(reference))
    finally:
        await http.aclose()


# -- credentials --------------------------------------------------------------------------
def test_a_challenge_from_where_the_registry_redirects_gets_no_credentials(
        tmp_path: Path, hostile: Callable[[], Hostile], monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry (anonymous) redirects a blob and a manifest to storage on another
    origin, which answers 401 with a Bearer realm of its own: following that challenge
    would hand the registry's Basic credentials to the storage's realm."""
    reg, storage = hostile(), hostile()
    data = b"GGUF" + os.urandom(4096)
    digest = sha(data)
    for path in (f"/v2/r/x/blobs/sha256:{digest}", "/v2/r/x/manifests/t"):
        route = answer(307, headers={"Location": storage.url("/bucket" + path)})
        reg.on("HEAD", path, route)
        reg.on("GET", path, route)
        challenge = answer(401, headers={"WWW-Authenticate": f'Bearer realm="{storage.url("/token")}",service="s3"'})
        storage.on("HEAD", "/bucket" + path, challenge)
        storage.on("GET", "/bucket" + path, challenge)
    storage.on("GET", "/token", answer(200, b'{"token": "harvested"}'))
    for var, value in {**CREDS, "MODELFS_REGISTRY_HOST": reg.netloc}.items():
        monkeypatch.setenv(var, value)

    store = Store.open(tmp_path / "store")
    try:
        async def blob() -> None:
            async with Downloader(store.blobs, max_retries=0) as dl:
                await dl.fetch(f"oci+http://{reg.netloc}/r/x@sha256:{digest}", sha256=digest, size=len(data))

        with pytest.raises(FetchError):
            run(blob)
        with pytest.raises(StoreError):
            run(lambda: resolve(f"oci+http://{reg.netloc}/r/x:t"))
        assert not store.blobs.has(digest)
    finally:
        store.close()
    assert storage.asked("/token") == []   # the storage's realm was never asked, with or without them
    assert all(BASIC not in s.headers.values() for s in storage.seen)
    assert any(s.headers.get("authorization") is None for s in storage.seen)


def test_a_registry_the_command_does_not_name_gets_the_environments_credentials_only_if_asked(
        tmp_path: Path, hostile: Callable[[], Hostile], monkeypatch: pytest.MonkeyPatch) -> None:
    """A signed pack's file URL, or a recorded one, names a registry: the publisher is
    trusted for bytes, not with the password in MODELFS_REGISTRY_USER/PASSWORD (meant
    for the user's own registry). Without MODELFS_REGISTRY_HOST naming that registry,
    they are not sent there; the error says how to send them."""
    reg = hostile()
    data = b"GGUF" + os.urandom(2048)
    digest = sha(data)
    path = f"/v2/packs/x/blobs/sha256:{digest}"

    def route(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Authorization") == BASIC:
            reply(h, 200, data)
        else:
            reply(h, 401, headers={"WWW-Authenticate": 'Basic realm="harvest"'})

    reg.on("HEAD", path, route)
    reg.on("GET", path, route)
    for var, value in CREDS.items():
        monkeypatch.setenv(var, value)
    store = Store.open(tmp_path / "store")
    try:
        async def fetch() -> None:  # what a pack install or a lazy open does with the file's URL
            async with Downloader(store.blobs, max_retries=0) as dl:
                await dl.fetch(f"oci+http://{reg.netloc}/packs/x@sha256:{digest}", sha256=digest, size=len(data))

        with pytest.raises(FetchError, match=f"MODELFS_REGISTRY_HOST={reg.netloc}"):
            run(fetch)
        assert reg.seen and all(s.headers.get("authorization") != BASIC for s in reg.seen)
        monkeypatch.setenv("MODELFS_REGISTRY_HOST", "elsewhere.example:5000")
        with pytest.raises(FetchError):
            run(fetch)
        assert all(s.headers.get("authorization") != BASIC for s in reg.seen)
        monkeypatch.setenv("MODELFS_REGISTRY_HOST", reg.netloc)   # named by the user: sent
        run(fetch)
        assert store.blobs.path(digest).read_bytes() == data
    finally:
        store.close()


def test_credentials_never_go_over_plain_http_to_a_registry_the_command_does_not_name(
        tmp_path: Path) -> None:
    """A pack naming ``oci+http://`` (or ``http://…/v2/…/blobs/…``) for a registry the user
    logs into over HTTPS would put the password on the network in clear. The decision
    alone (no request is needed to see it): plain HTTP carries credentials only to a
    registry the command names, or on the loopback."""
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"auths": {"registry.lan:5000": {"username": USER, "password": PASSWORD},
                                            "127.0.0.1:5000": {"username": USER, "password": PASSWORD}}}))
    config.chmod(0o600)
    auth = oci.RegistryAuth(lambda url: {}, user_credentials=True)
    https = oci.parse_reference("oci://registry.lan:5000/a@sha256:" + "a" * 64)
    plain = oci.blob_reference("http://registry.lan:5000/v2/a/blobs/sha256:" + "a" * 64)
    assert plain is not None
    assert auth.credentials(https) is not None     # over HTTPS, from the file: as docker does
    assert auth.credentials(plain[0]) is None      # the same registry in clear: never, unless named
    assert "plain HTTP" in auth._missing(plain[0])
    assert auth.credentials(oci.parse_reference("oci+http://127.0.0.1:5000/a:t")) is not None  # no network
    auth.name(oci.parse_reference("oci+http://registry.lan:5000/a:t"))   # `modelfs pull oci+http://…`
    assert auth.credentials(plain[0]) is not None
    bound = oci.RegistryAuth(lambda url: {}, user_credentials=False)      # a pull for an app
    bound.name(https)
    assert bound.credentials(https) is None


def test_the_credentials_file_must_be_the_users_own_regular_private_file(tmp_path: Path) -> None:
    """Mode and owner are checked on the file opened (a link is followed, as docker does:
    its target must pass); a FIFO in its place is refused, not waited on forever."""
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir()
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps({"auths": {"h:1": {"username": USER, "password": PASSWORD}}}))
    theirs.chmod(0o600)
    os.chown(theirs, 65534, 65534)
    path.symlink_to(theirs)
    with pytest.raises(UsageError, match="belongs to another user"):
        oci.credentials("h:1")
    os.chown(theirs, os.getuid(), os.getgid())
    assert oci.credentials("h:1") == oci.Credentials(USER, PASSWORD)   # a link to the user's own file
    theirs.chmod(0o640)
    with pytest.raises(UsageError, match="chmod 600"):
        oci.credentials("h:1")
    path.unlink()
    os.mkfifo(path, 0o600)
    outcome: list[BaseException | object] = []
    t = threading.Thread(target=lambda: outcome.append(_catch(lambda: oci.credentials("h:1"))), daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock it, then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("reading a FIFO in place of the credentials file hung")
    assert isinstance(outcome[0], UsageError) and "not a regular file" in str(outcome[0])


def _catch(fn: Callable[[], object]) -> BaseException | object:
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        return exc


def test_an_upload_sent_to_another_origin_is_refused_before_a_byte_goes(
        cli: CLI, tmp_path: Path, hostile: Callable[[], Hostile]) -> None:
    """push: the registry's upload ``Location`` (and a redirect of a chunk) pointing at
    another origin is not followed; the other origin sees nothing, credentials or bytes."""
    w = write_model(tmp_path / "w-Q4_K_M.gguf", tensor_bytes=4096, seed=3)
    cli.run("import", "w", str(w))
    reg, elsewhere = hostile(), hostile()
    reg.on("GET", "/v2/fleet/w/blobs/uploads/", answer(404))  # (not asked: uploads start with POST)
    reg.on("POST", "/v2/fleet/w/blobs/uploads/",
           answer(202, headers={"Location": elsewhere.url("/v2/fleet/w/blobs/uploads/steal")}))
    r = cli.run("push", "w", f"oci+http://{reg.netloc}/fleet/w:t", check=False, env=CREDS)
    assert r.returncode == 9 and "another origin" in r.stderr, r.stderr
    # A registry whose upload location is its own but whose PATCH redirects elsewhere.
    reg.on("POST", "/v2/fleet/w/blobs/uploads/", answer(202, headers={"Location": "/v2/fleet/w/blobs/uploads/u1"}))
    reg.on("PATCH", "/v2/fleet/w/blobs/uploads/u1",
           answer(307, headers={"Location": elsewhere.url("/v2/fleet/w/blobs/uploads/steal")}))
    r = cli.run("push", "w", f"oci+http://{reg.netloc}/fleet/w:t", check=False, env=CREDS)
    assert r.returncode == 9, r.stderr
    assert elsewhere.seen == []
    assert PASSWORD not in r.stderr + r.stdout


def test_a_bearer_realm_over_plain_http_for_an_https_registry_is_refused() -> None:
    """Only the HTTPS rule is checked here (no TLS server is needed): ``_token`` refuses
    before any request, so the http:// realm would get nothing."""
    async def ask() -> None:
        http = Http(timeout=2)
        try:
            auth = oci.registry_auth(http)
            await auth._token(http, oci.parse_reference("oci://registry.invalid/a/b:t"),
                              {"realm": "http://127.0.0.1:9/token"}, "pull", oci.Credentials(USER, PASSWORD))
        finally:
            await http.aclose()

    with pytest.raises(FetchError, match="plain http"):
        run(ask)


def test_a_bearer_token_that_expires_mid_transfer_is_asked_for_again_on_the_retry(
        tmp_path: Path, hostile: Callable[[], Hostile]) -> None:
    """A registry's token lives ``expires_in`` seconds (Docker Hub: 300); a 40 GB layer
    outlives it. A connection lost after that is resumed with a fresh token, not with
    none (a 401 that would end the pull)."""
    reg = hostile()
    data = b"GGUF" + os.urandom(256 << 10)
    digest = sha(data)
    path = f"/v2/big/x/blobs/sha256:{digest}"
    issued: dict[str, float] = {}
    gets: list[str | None] = []

    def live(h: BaseHTTPRequestHandler) -> bool:
        token = (h.headers.get("Authorization") or "").removeprefix("Bearer ")
        return token in issued and time.monotonic() - issued[token] < 1.0

    def token(h: BaseHTTPRequestHandler) -> None:
        name = f"tok{len(issued)}"
        issued[name] = time.monotonic()
        reply(h, 200, json.dumps({"token": name, "expires_in": 1}).encode())

    challenge = {"WWW-Authenticate": f'Bearer realm="{reg.url("/token")}",service="s"'}

    def head(h: BaseHTTPRequestHandler) -> None:
        reply(h, 200 if live(h) else 401, headers={} if live(h) else challenge)

    def get(h: BaseHTTPRequestHandler) -> None:
        gets.append(h.headers.get("Authorization"))
        if not live(h):
            reply(h, 401, headers=challenge)
            return
        start = int((h.headers.get("Range") or "bytes=0-")[6:].split("-")[0])
        if start == 0:  # half the layer, then the connection drops once the token has expired
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.send_header("ETag", f'"{digest}"')
            h.end_headers()
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            time.sleep(1.2)
            h.close_connection = True
            return
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("ETag", f'"{digest}"')
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        h.wfile.write(data[start:])

    reg.on("GET", "/token", token)
    reg.on("HEAD", path, head)
    reg.on("GET", path, get)
    store = Store.open(tmp_path / "store")
    try:
        async def fetch() -> None:
            async with Downloader(store.blobs, max_retries=2, backoff=(0, 0), stall_timeout=5) as dl:
                await dl.fetch(f"oci+http://{reg.netloc}/big/x@sha256:{digest}", sha256=digest, size=len(data))

        run(fetch)
        assert store.blobs.path(digest).read_bytes() == data
    finally:
        store.close()
    assert len(gets) == 2 and gets[0] != gets[1] and gets[1] is not None  # resumed with a fresh token


def test_a_push_that_outlives_its_token_asks_for_another(cli: CLI, tmp_path: Path,
                                                         hostile: Callable[[], Hostile]) -> None:
    """The same for a push: an upload chunk slower than the token's lifetime, and the
    requests after it carry a fresh token, not the expired one."""
    w = write_model(tmp_path / "slow-Q4_K_M.gguf", tensor_bytes=4096, seed=9)
    cli.run("import", "slow", str(w))
    reg = hostile()
    issued: dict[str, float] = {}
    refused: list[str] = []
    challenge = {"WWW-Authenticate": f'Bearer realm="{reg.url("/token")}",service="s"'}

    def token(h: BaseHTTPRequestHandler) -> None:
        name = f"tok{len(issued)}"
        issued[name] = time.monotonic()
        reply(h, 200, json.dumps({"token": name, "expires_in": 1}).encode())

    def guarded(route: Route) -> Route:
        def inner(h: BaseHTTPRequestHandler) -> None:
            tok = (h.headers.get("Authorization") or "").removeprefix("Bearer ")
            if tok not in issued or time.monotonic() - issued[tok] >= 1.0:
                refused.append(f"{h.command} {h.path}")
                reply(h, 401, headers=challenge)
            else:
                route(h)
        return inner

    def patch(h: BaseHTTPRequestHandler) -> None:
        time.sleep(1.2)  # a slow link: the token the chunk went with has expired by now
        reply(h, 202, headers={"Location": "/v2/fleet/slow/blobs/uploads/u1"})

    reg.on("GET", "/token", token)
    upload = "/v2/fleet/slow/blobs/uploads/"
    reg.on("POST", upload, guarded(answer(202, headers={"Location": upload + "u1"})))
    reg.on("PATCH", upload + "u1", guarded(patch))
    reg.on("PUT", upload + "u1", guarded(answer(201)))
    reg.on("PUT", "/v2/fleet/slow/manifests/t", guarded(answer(201)))
    reg.default = guarded(answer(404))  # every blob HEAD: not in the registry (asked with a live token)
    r = cli.run("push", "slow", f"oci+http://{reg.netloc}/fleet/slow:t", "--json", check=False)
    assert r.returncode == 0, (r.stderr, refused)
    puts = [s for s in reg.seen if s.method == "PUT"]
    assert puts and all(s.headers.get("authorization", "").startswith("Bearer tok") for s in puts)


# -- resource use -------------------------------------------------------------------------
def test_a_registry_token_server_or_hub_that_trickles_a_small_answer_is_cut_off(
        hostile: Callable[[], Hostile], monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow-loris: a byte just before every read timeout would hold a pull forever; a
    manifest, a token and a hub listing page must arrive whole within 4 timeouts (1 s here)."""
    reg = hostile()
    reg.on("GET", "/v2/slow/m/manifests/t", trickle(10_000, 0.05))
    reg.on("HEAD", "/v2/slow/tok/manifests/t",
           answer(401, headers={"WWW-Authenticate": f'Bearer realm="{reg.url("/token")}",service="s"'}))
    reg.on("GET", "/token", trickle(10_000, 0.05))
    reg.on("GET", "/api/models/org/slow/tree/main", trickle(10_000, 0.05))
    for reference in (f"oci+http://{reg.netloc}/slow/m:t", f"oci+http://{reg.netloc}/slow/tok:t"):
        started = time.monotonic()
        with pytest.raises(FetchError, match="within 1s"):
            run(lambda reference=reference: resolve(reference, timeout=0.25), limit=15)
        assert time.monotonic() - started < 4

    monkeypatch.setenv("MODELFS_HF_ENDPOINT", f"http://{reg.netloc}")

    async def listing() -> None:
        http = Http(timeout=0.25)
        http.retry.max_retries = 0
        try:
            await hf.list_tree(http, "org/slow", "main")
        finally:
            await http.aclose()

    with pytest.raises(FetchError, match="within 1s"):
        run(listing, limit=15)

    def trickled_headers(h: BaseHTTPRequestHandler) -> None:  # a HEAD's headers, a byte at a time
        for c in b"HTTP/1.1 200 OK\r\nX-Linked-Etag: " + b"a" * 10_000:
            h.wfile.write(bytes([c]))
            h.wfile.flush()
            time.sleep(0.05)

    reg.on("HEAD", "/org/slow/resolve/main/m.gguf", trickled_headers)

    async def metadata() -> None:
        http = Http(timeout=0.25)
        http.retry.max_retries = 0
        try:
            await hf.file_metadata(http, hf.HFRef("org/slow", "main", "m.gguf"))
        finally:
            await http.aclose()

    with pytest.raises(FetchError, match="within 1s"):
        run(metadata, limit=15)


def test_huge_manifests_and_token_answers_are_refused_at_the_cap(hostile: Callable[[], Hostile]) -> None:
    """A manifest over 4 MiB (declared or not) and a token answer over 1 MiB are refused
    without being read past the cap; nothing is parsed."""
    reg = hostile()
    big = b"{" + b" " * (oci.MAX_MANIFEST + 10) + b"}"
    reg.on("GET", "/v2/huge/m/manifests/t", answer(200, big, {"Content-Type": oci.OCI_MANIFEST}))
    reg.on("HEAD", "/v2/huge/tok/manifests/t",
           answer(401, headers={"WWW-Authenticate": f'Bearer realm="{reg.url("/token")}"'}))
    reg.on("GET", "/token", answer(200, b'{"token": "' + b"t" * (oci.MAX_TOKEN_BODY + 10) + b'"}'))
    with pytest.raises(FormatError, match="larger than"):
        run(lambda: resolve(f"oci+http://{reg.netloc}/huge/m:t"))
    with pytest.raises(FormatError, match="larger than"):
        run(lambda: resolve(f"oci+http://{reg.netloc}/huge/tok:t"))


@pytest.mark.parametrize("token", ["caf\u00e9", "a\x00b", "a\r\nX-Injected: 1", "", "a b", 7])
def test_a_token_that_is_no_header_value_is_refused_cleanly(hostile: Callable[[], Hostile], token: object) -> None:
    """Non-ASCII made httpx fail to encode the header (an internal error, exit 70); CR LF
    would inject a header. The token must be visible ASCII."""
    reg = hostile()
    reg.on("HEAD", "/v2/t/x/manifests/t",
           answer(401, headers={"WWW-Authenticate": f'Bearer realm="{reg.url("/token")}"'}))
    reg.on("GET", "/token", answer(200, json.dumps({"token": token}).encode()))
    with pytest.raises(FetchError, match="holds no token"):
        run(lambda: resolve(f"oci+http://{reg.netloc}/t/x:t"))
    assert reg.asked("/v2/t/x/manifests/t") and all(
        s.headers.get("authorization") is None for s in reg.asked("/v2/t/x/manifests/t"))


# -- manifests ----------------------------------------------------------------------------
W = b"GGUF" + b"\x03\x00\x00\x00" + bytes(64)
P = b"GGUF" + b"\x03\x00\x00\x00" + bytes(65)


@pytest.mark.parametrize(("what", "body", "error", "match"), [
    ("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, FormatError, "nested too deeply"),
    ("a sha512 digest", manifest([layer(W, digest="sha512:" + "a" * 128)]), FormatError, "valid sha256"),
    ("upper-case hex", manifest([layer(W, digest="sha256:" + sha(W).upper())]), FormatError, "valid sha256"),
    ("a digest with path characters", manifest([layer(W, digest="sha256:../../../../etc/passwd")]), FormatError,
     "valid sha256"),
    ("a negative size", manifest([layer(W, size=-1)]), FormatError, "valid sha256 digest and size"),
    ("a size that is a bool", manifest([layer(W, size=True)]), FormatError, "valid sha256 digest and size"),
    ("a size that is a float", manifest([layer(W, size=1.5)]), FormatError, "valid sha256 digest and size"),
    ("two layers titled alike", manifest([layer(W, "a.gguf"), {**layer(P, "a.gguf"), "mediaType": oci.DMR_MMPROJ}]),
     UsageError, "same file name"),
    ("two projectors", manifest([layer(W), {**layer(P), "mediaType": oci.DMR_MMPROJ},
                                 {**layer(W + b"x"), "mediaType": oci.OLLAMA_PROJECTOR}]), UsageError,
     "projector layers"),
    ("a container image", manifest([{**layer(W), "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}]),
     UsageError, "not a GGUF model artifact"),
])
def test_a_hostile_manifest_is_refused_with_a_clear_error(hostile: Callable[[], Hostile], what: str, body: bytes,
                                                          error: type[Exception], match: str) -> None:
    reg = hostile()
    serve_manifest(reg, "evil/m", "t", body)
    with pytest.raises(error, match=match):
        run(lambda: resolve(f"oci+http://{reg.netloc}/evil/m:t"))
    assert [s.path for s in reg.seen] == ["/v2/evil/m/manifests/t"] * len(reg.seen)  # no blob was asked for


def test_layer_titles_never_name_a_path_or_a_reserved_name(hostile: Callable[[], Hostile]) -> None:
    """Titles are file names from the registry: a path keeps its last part only; a
    title with NUL, ``..``, or not a ``.gguf`` (``model.json``, ``.versions``) is not
    taken, and the file gets a derived name."""
    reg = hostile()
    cases = {
        "../../../../root/.ssh/authorized_keys.gguf": "authorized_keys.gguf",
        "a/b/../c.gguf": "c.gguf",
        "..": "model.gguf",
        "model.json": "model.gguf",
        ".versions": "model.gguf",
        "x\x00.gguf": "model.gguf",
        "evil\x1b[2J.gguf": "model.gguf",
        "-rf.gguf": "model.gguf",
        "C:\\windows\\x.gguf": "model.gguf",
    }
    for i, (title, expected) in enumerate(cases.items()):
        serve_manifest(reg, "evil/t", f"t{i}", manifest([layer(W, title)]))
        art = run(lambda i=i: resolve(f"oci+http://{reg.netloc}/evil/t:t{i}"))
        assert [la.filename for la in art.layers] == [expected], title


def test_a_manifest_is_held_to_the_digest_asked_for_and_the_one_the_registry_gave(
        hostile: Callable[[], Hostile]) -> None:
    reg = hostile()
    body = manifest([layer(W, "w.gguf")])
    other = f"sha256:{'1' * 64}"
    reg.on("GET", f"/v2/evil/d/manifests/{other}", answer(200, body, {"Content-Type": oci.OCI_MANIFEST}))
    with pytest.raises(IntegrityError, match="digest"):
        run(lambda: resolve(f"oci+http://{reg.netloc}/evil/d@{other}"))
    reg.on("GET", "/v2/evil/d/manifests/t",
           answer(200, body, {"Content-Type": oci.OCI_MANIFEST, "Docker-Content-Digest": other}))
    with pytest.raises(IntegrityError, match="does not match"):
        run(lambda: resolve(f"oci+http://{reg.netloc}/evil/d:t"))


def test_a_layer_larger_than_its_declared_size_is_refused_and_never_read_far_past_it(
        cli: CLI, tmp_path: Path, hostile: Callable[[], Hostile]) -> None:
    """The manifest declares a size (and a digest) and the registry then sends more:
    the download stops at the declared size plus what one read brings, nothing is
    visible, and a tag that now names other bytes changes nothing: layers go by digest."""
    w = write_model(tmp_path / "lie-Q4_K_M.gguf", tensor_bytes=8192, seed=5).read_bytes()
    reg = hostile()
    declared = len(w) - 1000
    serve_manifest(reg, "evil/lie", "t", manifest([layer(w, "lie.gguf", size=declared)]))
    reg.on("GET", f"/v2/evil/lie/blobs/sha256:{sha(w)}", answer(200, w + bytes(8 << 20)))
    r = cli.run("pull", f"oci+http://{reg.netloc}/evil/lie:t", "--no-daemon", check=False)
    assert r.returncode == 9 and f"expected {declared}" in r.stderr, r.stderr   # from its Content-Length
    sent: list[int] = []

    def unbounded(h: BaseHTTPRequestHandler) -> None:  # no length: the body says when it ends
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        n = 0
        body = w + bytes(64 << 20)
        try:
            for i in range(0, len(body), 64 << 10):
                h.wfile.write(body[i:i + (64 << 10)])
                n += 64 << 10
        finally:
            sent.append(n)

    reg.on("GET", f"/v2/evil/lie/blobs/sha256:{sha(w)}", unbounded)
    r = cli.run("pull", f"oci+http://{reg.netloc}/evil/lie:t", "--no-daemon", check=False)
    assert r.returncode != 0 and "lie.gguf" not in cli.run("list").stdout, r.stderr
    assert wait_for(lambda: sent) and sent[0] < (32 << 20)   # the client stopped reading early
    assert not (cli.root / "blobs" / "sha256" / sha(w)[:2] / sha(w)).exists()
    partials = [p for p in (cli.root / "partial").rglob("*") if p.is_file()]
    assert all(p.stat().st_size <= declared + (2 << 20) for p in partials)


# -- the terminal -------------------------------------------------------------------------
def test_text_from_the_registry_or_the_hub_reaches_the_terminal_without_control_characters(
        cli: CLI, hostile: Callable[[], Hostile]) -> None:
    """A registry's error message and a hub listing's file names are quoted in errors; an
    escape sequence in them (retitle the terminal, clear the screen, move the cursor to
    overwrite a line) comes out as visible ``\\x1b`` text."""
    reg = hostile()
    evil = "\x1b]0;pwned\x07\x1b[2J\x1b[1A\rmodelfs: pulled ok\x9b31m"
    reg.on("GET", "/v2/evil/e/manifests/t",
           answer(403, json.dumps({"errors": [{"code": "DENIED", "message": evil}]}).encode()))
    r = cli.run("pull", f"oci+http://{reg.netloc}/evil/e:t", "--no-daemon", check=False)
    assert r.returncode == 9 and "\\x1b]0;pwned" in r.stderr, r.stderr
    tree = [{"type": "file", "path": f"model-{evil}.gguf", "size": 10, "lfs": {"oid": "a" * 64, "size": 10}}]
    reg.on("GET", "/api/models/org/evil/tree/main", answer(200, json.dumps(tree).encode()))
    r = cli.run("pull", "hf://org/evil:Q9", "--no-daemon", check=False, env={"MODELFS_HF_ENDPOINT": reg.url("")})
    assert r.returncode == 2 and "\\x1b[2J" in r.stderr, r.stderr
    for out in (r.stderr,):
        assert "\x1b" not in out and "\r" not in out and "\x07" not in out and "\x9b" not in out


# -- the hub ------------------------------------------------------------------------------
def test_hub_listings_that_name_escaping_paths_or_never_end_are_refused(
        cli: CLI, hostile: Callable[[], Hostile], monkeypatch: pytest.MonkeyPatch) -> None:
    hub = hostile()
    env = {"MODELFS_HF_ENDPOINT": hub.url("")}
    oid = "b" * 64
    tree = [{"type": "file", "path": "../../../etc/m-Q4_K_M.gguf", "size": 10, "lfs": {"oid": oid, "size": 10}}]
    hub.on("GET", "/api/models/org/esc/tree/main", answer(200, json.dumps(tree).encode()))
    r = cli.run("pull", "hf://org/esc:Q4_K_M", "--no-daemon", check=False, env=env)
    assert r.returncode == 2 and "relative path component" in r.stderr, r.stderr
    assert not any("/resolve/" in s.path for s in hub.seen)  # refused before any file was asked about
    # A listing whose every page links to itself: capped, not followed forever.
    monkeypatch.setattr(hf, "LISTING_MAX_PAGES", 25)
    page = answer(200, b"[]", {"Link": f'<{hub.url("/api/models/org/loop/tree/main")}?cursor=x>; rel="next"'})
    hub.on("GET", "/api/models/org/loop/tree/main", page)
    r = cli.run("pull", "hf://org/loop", "--no-daemon", check=False, env=env)
    assert r.returncode == 9 and "more than 25 pages" in r.stderr, r.stderr
    assert len(hub.asked("/api/models/org/loop/tree/main")) == 25
    # Pages that are each under the page cap but together too much to hold.
    monkeypatch.setattr(hf, "LISTING_MAX_BYTES", 3 << 20)
    fat = json.dumps([{"type": "directory", "path": "d" * 1000}] * 1000).encode()  # 1 MB a page
    hub.on("GET", "/api/models/org/fat/tree/main",
           answer(200, fat, {"Link": f'<{hub.url("/api/models/org/fat/tree/main")}?cursor=y>; rel="next"'}))
    r = cli.run("pull", "hf://org/fat", "--no-daemon", check=False, env=env)
    assert r.returncode == 9 and "larger than 3 MiB" in r.stderr, r.stderr
    assert len(hub.asked("/api/models/org/fat/tree/main")) == 4
    # A listing nested too deeply is a malformed listing, not a crash.
    hub.on("GET", "/api/models/org/deep/tree/main", answer(200, b"[" * 100_000 + b"]" * 100_000))
    r = cli.run("pull", "hf://org/deep", "--no-daemon", check=False, env=env)
    assert r.returncode == 9 and "nested too deeply" in r.stderr, r.stderr


def test_a_hub_whose_commit_changes_between_files_or_whose_resolve_loops_is_refused(
        cli: CLI, hostile: Callable[[], Hostile]) -> None:
    """Every file of a repository pull comes from the commit the first one resolved to: a
    later HEAD naming another commit is refused before a byte moves, and a resolve URL
    that redirects to itself ends at the redirect cap."""
    hub = hostile()
    env = {"MODELFS_HF_ENDPOINT": hub.url(""), "HF_TOKEN": "hf_attackerwantsthis0123"}
    names = [f"m-Q4_K_M-0000{i}-of-00002.gguf" for i in (1, 2)]
    oid = {n: sha(n.encode()) for n in names}
    tree = [{"type": "file", "path": n, "size": 100, "lfs": {"oid": oid[n], "size": 100}} for n in names]
    hub.on("GET", "/api/models/org/moving/tree/main", answer(200, json.dumps(tree).encode()))
    c1, c2 = "1" * 40, "2" * 40

    def meta(name: str, commit: str) -> Route:
        return answer(200, headers={"X-Linked-Etag": f'"{oid[name]}"', "X-Linked-Size": "100",
                                    "X-Repo-Commit": commit})

    hub.on("HEAD", f"/org/moving/resolve/main/{names[0]}", meta(names[0], c1))
    hub.on("HEAD", f"/org/moving/resolve/{c1}/{names[1]}", meta(names[1], c2))
    r = cli.run("pull", "hf://org/moving:Q4_K_M", "--no-daemon", check=False, env=env)
    assert r.returncode == 9 and "changed while its files were resolved" in r.stderr, r.stderr
    assert not any(s.method == "GET" and "/resolve/" in s.path for s in hub.seen)

    tree = [{"type": "file", "path": "loop-Q4_K_M.gguf", "size": 100, "lfs": {"oid": "c" * 64, "size": 100}}]
    hub.on("GET", "/api/models/org/loop/tree/main", answer(200, json.dumps(tree).encode()))
    hub.on("HEAD", "/org/loop/resolve/main/loop-Q4_K_M.gguf",
           answer(302, headers={"Location": "/org/loop/resolve/main/loop-Q4_K_M.gguf"}))
    r = cli.run("pull", "hf://org/loop", "--no-daemon", check=False, env=env)
    assert r.returncode == 9 and "too many redirects" in r.stderr, r.stderr
    assert len(hub.asked("/org/loop/resolve/main/loop-Q4_K_M.gguf")) == 11
    assert "hf_attackerwantsthis0123" not in r.stderr + r.stdout


# -- logs ---------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry"), reason="LOUD SKIP: docker-registry is missing")
def test_debug_logs_of_a_bearer_push_and_pull_hold_no_secret(cli: CLI, tmp_path: Path,
                                                             tokens: TokenServer, token_registry: Registry) -> None:
    """``-vv`` (debug, every module's log) against the real registry with real tokens:
    no password, Basic header, token or upload state in any line."""
    w = write_model(tmp_path / "dbg-Q4_K_M.gguf", tensor_bytes=4096, seed=11)
    cli.run("import", "dbg", str(w))
    env = {"MODELFS_REGISTRY_USER": "alice", "MODELFS_REGISTRY_PASSWORD": "wonderland-Pa55"}
    target = token_registry.ref("fleet/dbg:v")
    pushed = cli.run("-vv", "push", "dbg", target, "--json", env=env)
    other = CLI(tmp_path / "second")
    pulled = other.run("-vv", "pull", target, "--json", env=env)
    logs = pushed.stderr + pulled.stderr
    assert "DEBUG" in logs or "INFO" in logs, logs[:500]
    basic = base64.b64encode(b"alice:wonderland-Pa55").decode()
    for secret in ("wonderland-Pa55", basic, "eyJ"):
        assert secret not in logs + pushed.stdout + pulled.stdout, secret
    assert re.search(r"_state=(?!REDACTED)", logs) is None  # an upload's signed state
