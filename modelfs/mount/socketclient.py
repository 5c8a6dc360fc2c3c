"""The CLI's side of the control socket: find the store's daemon, call a route, follow
a job's events.

``find_daemon`` looks where the daemon said it listens (``run/daemon.json``, for a
store this user owns) or, for a store of another user (a system store), at the
system socket, and keeps a socket only if the daemon behind it serves that store.
:class:`ControlClient` speaks HTTP/1.1 over the unix socket with the standard library's
``http.client`` (importing httpx would cost a CLI verb ~0.15 s); an answer
that is not a 2xx becomes a :class:`~modelfs_store.errors.StoreError` carrying the
daemon's message and exit code, so the CLI prints it as it prints its own errors.

A unix socket's path is limited to 107 bytes; a longer one (a store deep in a
directory tree) is reached through ``/proc/self/fd`` of its directory
(:func:`unix_path`, which the server binds with too). No trio and no pyfuse3 here.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelfs_store.errors import StoreError
from modelfs_store.layout import Layout

from .runstate import read_status

SYSTEM_SOCKET = Path("/run/modelfs/control.sock")
MAX_UNIX_PATH = 100  # sun_path holds 108 bytes with its NUL; keep a margin


@contextlib.contextmanager
def unix_path(path: Path) -> Iterator[str]:
    """A path for ``bind``/``connect`` that fits in ``sun_path``: ``path`` itself, or its
    name below ``/proc/self/fd/N`` of its directory while the block runs."""
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket (``path`` as :func:`unix_path` gives it)."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("modelfs", timeout=timeout)
        self.unix = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """Calls on one daemon's control socket (sync: the CLI needs no event loop for it).

    The standard library's ``http.client``, one connection per call: a unix socket
    connects in microseconds, and a CLI verb that talks to the daemon then imports no
    HTTP client library and builds no TLS context."""

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._stack = contextlib.ExitStack()
        self._uds = self._stack.enter_context(unix_path(path))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, route: str, body: dict[str, Any] | None,
              timeout: float | None) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        conn = _UnixConnection(self._uds, self.timeout)
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, route, body=payload, headers=headers)
            response = conn.getresponse()
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            return conn, response
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise StoreError(f"the daemon's control socket {self.path} did not answer ({type(exc).__name__})",
                             socket=str(self.path)) from None

    def call(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        """One request; the decoded JSON answer, or the daemon's error as a StoreError."""
        conn, r = self._send(method, route, body, self.timeout)
        try:
            raw = r.read()
        except (OSError, http.client.HTTPException) as exc:
            raise StoreError(f"the daemon's control socket {self.path} broke off its answer "
                             f"({type(exc).__name__})", socket=str(self.path)) from None
        finally:
            conn.close()
        doc = _json(raw)
        if r.status >= 400:
            raise remote_error(doc, r.status)
        return doc

    def events(self, route: str) -> Iterator[dict[str, Any]]:
        """The events of ``route`` (newline-delimited JSON) until the daemon ends the stream
        (no read timeout: a job may wait for hours)."""
        conn, r = self._send("GET", route, None, None)
        try:
            if r.status >= 400:
                raise remote_error(_json(r.read()), r.status)
            while line := r.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def remote_error(doc: Any, status: int) -> StoreError:
    """The daemon's ``{"error": {...}}`` answer as the error the CLI would have raised."""
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return StoreError(f"the daemon answered HTTP {status}")
    exc = StoreError(str(err.get("message") or f"HTTP {status}"), status=status, reason=err.get("reason"))
    code = err.get("exit_code")
    exc.exit_code = code if isinstance(code, int) and code > 0 else 1
    return exc


def _serves(client: ControlClient, root: Path) -> bool:
    try:
        status = client.call("GET", "/v1/status")
    except StoreError:
        return False
    return isinstance(status, dict) and os.path.realpath(str(status.get("store"))) == os.path.realpath(root)


def find_daemon(root: Path, *, own_store: bool) -> ControlClient | None:
    """A client of the daemon serving the store at ``root``, or None when none answers.
    ``own_store``: this user owns it (its ``run/daemon.json`` names the socket); else
    the system socket is tried."""
    candidates: list[Path] = []
    if own_store:
        status = read_status(Layout(root))
        sock = (status or {}).get("control_socket") or {}
        if isinstance(sock, dict) and sock.get("path"):
            candidates.append(Path(sock["path"]))
    else:
        candidates.append(SYSTEM_SOCKET)
    for path in candidates:
        if not path.exists():
            continue
        client = ControlClient(path)
        if _serves(client, root):
            return client
        client.close()
    return None
