"""A real OCI registry for the tests: Debian's ``docker-registry`` (distribution 2.8) on
127.0.0.1, started by the test with a generated config, and stopped after it.

* :class:`Registry` runs it with no auth, with an htpasswd file (Basic), or with
  ``auth: token`` (Bearer) trusting the certificate of a :class:`TokenServer`;
* :class:`TokenServer` is the token endpoint the registry's challenge names: it checks
  Basic credentials and issues ES256 JWTs (the certificate in the ``x5c`` header, the
  registry's ``rootcertbundle``) with the ``access`` the scope asks for;
* :func:`push_artifact` pushes blobs and a manifest with raw distribution-API calls,
  for artifacts the test builds itself (Ollama's media types, a container image).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The Bearer realm: ``GET /token?service=…&scope=repository:NAME:ACTIONS``."""

    def __init__(self, directory: Path, users: dict[str, str], service: str = "modelfs-test",
                 issuer: str = "modelfs-test-issuer") -> None:
        self.users = users
        self.service = service
        self.issuer = issuer
        self.requests: list[dict[str, Any]] = []   # what each token request carried
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelfs test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = directory / "token-cert.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.answer(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(h.path).query)
        auth = h.headers.get("Authorization", "")
        user = None
        if auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(name) != password:
                self.requests.append({"auth": auth, "query": query, "granted": False})
                h.send_response(401)
                h.send_header("Content-Type", "application/json")
                h.end_headers()
                h.wfile.write(b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}')
                return
            user = name
        elif self.users:
            self.requests.append({"auth": auth, "query": query, "granted": False})
            h.send_response(401)
            h.end_headers()
            return
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": repo, "actions": actions.split(",")})
        self.requests.append({"auth": auth, "query": query, "granted": True, "user": user})
        body = json.dumps({"token": self.token(user or "", access), "expires_in": 300}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def token(self, subject: str, access: list[dict[str, Any]]) -> str:
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        der = self.key.sign(signing.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass
class Registry:
    """One ``docker-registry serve`` process on 127.0.0.1."""
    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def storage(self) -> Path:
        return self.directory / "storage"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        return f"http://{self.netloc}"

    def ref(self, repo_tag: str) -> str:
        """``oci+http://127.0.0.1:PORT/REPO:TAG``: plain HTTP, asked for."""
        return f"oci+http://{self.netloc}/{repo_tag}"

    def blob_data(self, digest_hex: str) -> Path:
        return self.storage / "docker/registry/v2/blobs/sha256" / digest_hex[:2] / digest_hex / "data"

    def start(self, auth: dict[str, Any] | None = None) -> Registry:
        """Start the registry on a free port; a port taken meanwhile (another test's server
        bound it between ``free_port`` and the registry's own bind) is tried again."""
        for attempt in range(3):
            try:
                return self._start(auth)
            except RuntimeError:
                if attempt == 2 or "address already in use" not in \
                        (self.directory / "registry.log").read_text(errors="replace"):
                    raise
        raise AssertionError("unreachable")

    def _start(self, auth: dict[str, Any] | None) -> Registry:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.netloc, "secret": secrets.token_hex(16)},
        }
        if auth:
            config["auth"] = auth
        path = self.directory / "config.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        log = open(self.directory / "registry.log", "wb")  # noqa: SIM115 - the process holds it
        self.process = subprocess.Popen([REGISTRY_BIN, "serve", str(path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"{self.base}/v2/", timeout=1)
                return self
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start: "
                                       f"{(self.directory / 'registry.log').read_text()[-2000:]}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def running(directory: Path, auth: dict[str, Any] | None = None) -> Iterator[Registry]:
    reg = Registry(directory).start(auth)
    try:
        yield reg
    finally:
        reg.stop()


def htpasswd(path: Path, user: str, password: str) -> Path:
    """An htpasswd file (bcrypt, as the registry requires) written by Apache's tool."""
    line = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True).stdout
    path.write_text(line.strip() + "\n")
    return path


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_digest(location: str, digest: str) -> str:
    """An upload's Location (its query holds the upload's state) with ``digest=`` added."""
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def push_artifact(base: str, repo: str, tag: str, config: tuple[str, bytes],
                  layers: Sequence[tuple[str, bytes, dict[str, str] | None]],
                  manifest_type: str = "application/vnd.oci.image.manifest.v1+json",
                  headers: dict[str, str] | None = None) -> str:
    """Push blobs (monolithic: POST then PUT ?digest=) and a manifest with raw API calls;
    returns the manifest digest."""
    with httpx.Client(base_url=base, headers=headers or {}, timeout=10) as c:
        def blob(data: bytes) -> str:
            digest = f"sha256:{sha256_hex(data)}"
            r = c.post(f"/v2/{repo}/blobs/uploads/")
            assert r.status_code == 202, r.text
            loc = r.headers["location"]
            r = c.put(with_digest(loc, digest), content=data,
                      headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
            return digest

        cfg_type, cfg = config
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": manifest_type,
                               "config": {"mediaType": cfg_type, "digest": blob(cfg), "size": len(cfg)},
                               "layers": []}
        for media, data, annotations in layers:
            entry: dict[str, Any] = {"mediaType": media, "digest": blob(data), "size": len(data)}
            if annotations:
                entry["annotations"] = annotations
            doc["layers"].append(entry)
        body = json.dumps(doc).encode()
        r = c.put(f"/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": manifest_type})
        assert r.status_code == 201, r.text
        return f"sha256:{sha256_hex(body)}"


def data_of(path: os.PathLike[str]) -> bytes:
    return Path(path).read_bytes()
