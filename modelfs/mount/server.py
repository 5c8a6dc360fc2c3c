"""The control socket: HTTP/1.1 on a unix socket, served with h11 on trio in the
daemon's nursery, so ``curl --unix-socket PATH http://x/v1/status`` works.

Where it listens (:func:`socket_choice`):

    --socket PATH                  what ``modelfs mount`` was told ("option")
    /run/modelfs/control.sock      a system store's daemon ("system"): mode 0666, every
                                   user may call it, each call is judged on its caller
    $XDG_RUNTIME_DIR/modelfs/      a user's daemon ("runtime-dir"), directory 0700,
      control.sock                 socket 0600
    <store>/run/control.sock       a user's daemon without XDG_RUNTIME_DIR ("store"),
                                   or when the runtime-dir socket belongs to the live
                                   daemon of another store of the same user

A socket file left by a killed daemon (nothing accepts on it) is replaced; a live one,
or anything that is not a socket, is never touched. The file is removed when the
daemon stops serving, if it is still the one it bound.

Each connection is identified once, from the kernel (``peer.py``): SO_PEERCRED, a
pidfd, then ``identity.py`` for the app id. A request never says who it is from. What
a caller may do is ``api.py``'s to decide; this module only moves bytes: a request in
(headers within 16 KiB, a body of at most 1 MiB, within 30 s), a JSON answer or a
stream of JSON lines out (a stream ends its connection; the stream stops when the
client goes away). It never decides what a caller may do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from modelfs_store.errors import Conflict
from modelfs_store.layout import Layout

from .identity import Identity
from .peer import Peer, peer_of
from .socketclient import SYSTEM_SOCKET, unix_path

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_HEADERS = 16 << 10
REQUEST_TIMEOUT = 30.0      # to receive a whole request, and between requests of one connection
MAX_CONNECTIONS = 256
JSON = "application/json"
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes
    caller: Identity            # from the peer's credentials, never from the request
    peer: str = ""              # how the pid was tied to the process ("pidfd", "pid+start-time")


@dataclass
class Response:
    status: int
    body: Any = None
    stream: AsyncIterator[dict[str, Any]] | None = None   # events, one JSON line each
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]
Identify = Callable[[Peer], Identity]


# -- where -----------------------------------------------------------------------------------
def socket_choice(layout: Layout, option: Path | None, *, system: bool,
                  runtime_dir: str | None) -> tuple[Path, str]:
    """Where this daemon listens, and why (module docstring)."""
    if option is not None:
        return option, "option"
    if system:
        return SYSTEM_SOCKET, "system"
    if runtime_dir and os.path.isabs(runtime_dir):
        return Path(runtime_dir) / "modelfs" / "control.sock", "runtime-dir"
    return layout.run / "control.sock", "store"


def _live(path: Path) -> bool:
    """Whether something accepts connections on the socket file ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with unix_path(path) as p:
            s.connect(p)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _claim(path: Path) -> str | None:
    """Make ``path`` free to bind; why it cannot be (None: it is free now)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return "it exists and is not a socket"
    if _live(path):
        return "another daemon listens on it"
    path.unlink()  # left by a daemon that was killed
    return None


def bind(path: Path, mode: int, *, dir_mode: int = 0o700) -> socket.socket:
    """A listening unix socket at ``path`` with ``mode`` (Conflict when it is taken)."""
    path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    why = _claim(path)
    if why is not None:
        raise Conflict(f"cannot listen on {path}: {why}", path=str(path))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with unix_path(path) as p:
            old = os.umask(0o177)  # never a moment with a looser mode than asked
            try:
                sock.bind(p)
            finally:
                os.umask(old)
            os.chmod(p, mode)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


# -- serving ----------------------------------------------------------------------------------
class ControlServer:
    """Serves ``handler`` on a bound unix socket until cancelled; removes its file then."""

    def __init__(self, sock: socket.socket, path: Path, where: str, handler: Handler, identify: Identify) -> None:
        self.sock = sock
        self.path = path
        self.where = where
        self.handler = handler
        self.identify = identify
        self._inode = os.stat(path).st_ino
        self._slots = trio.Semaphore(MAX_CONNECTIONS)

    def describe(self) -> dict[str, str]:
        return {"path": str(self.path), "where": self.where}

    async def serve(self) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
        try:
            await trio.serve_listeners(self._connection, [listener])
        finally:
            self.remove()

    def remove(self) -> None:
        """Unlink the socket file if it is still ours (a newer daemon may have bound it)."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self._slots.value == 0:
            await stream.aclose()
            return
        async with self._slots:
            peer = peer_of(stream.socket)  # type: ignore[arg-type]
            try:
                caller = self.identify(peer)
            finally:
                peer.close()
            try:
                await _Connection(stream, caller, peer.via, self.handler).run()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            finally:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.aclose()


class _Connection:
    def __init__(self, stream: trio.SocketStream, caller: Identity, via: str, handler: Handler) -> None:
        self.stream = stream
        self.caller = caller
        self.via = via
        self.handler = handler
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)

    async def run(self) -> None:
        while True:
            request = None
            try:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    request = await self._read()
                if request is None:  # closed, or silent for too long
                    return
            except _BadRequest as bad:
                await self._refuse(bad)
                return
            await self._send(await self._answer(request))
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    async def _refuse(self, bad: _BadRequest) -> None:
        """Answer a request h11 could not take, then close (h11 may no longer let us
        respond through it: the bytes are written as they are)."""
        response = Response(bad.status, {"error": {"message": bad.message, "exit_code": 2}},
                            headers={"connection": "close"})
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and self.conn.their_state is not h11.ERROR:
            await self._send(response)
            return
        body = (json.dumps(response.body) + "\n").encode()
        head = (f"HTTP/1.1 {bad.status} {'Bad Request' if bad.status == 400 else 'Error'}\r\n"
                f"content-type: {JSON}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        await self.stream.send_all(head + body)

    async def _answer(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except Exception:  # noqa: BLE001 - a bug answers 500 and the daemon keeps serving
            log.exception("control socket: %s %s failed", request.method, request.path)
            return Response(500, {"error": {"message": "internal error in the daemon (see its log)",
                                            "exit_code": 70}})

    async def _event(self) -> Any:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _BadRequest(400, f"malformed request: {exc}") from None
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(65536)
            self.conn.receive_data(data)

    async def _read(self) -> Request | None:
        event = await self._event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise _BadRequest(400, "expected a request")
        length = dict(event.headers).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise _BadRequest(413, f"request body over {MAX_BODY} bytes")
        if self.conn.they_are_waiting_for_100_continue:  # curl asks before a body over 1 KiB
            await self._write(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while not isinstance(ev := await self._event(), h11.EndOfMessage):
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > MAX_BODY:
                    raise _BadRequest(413, f"request body over {MAX_BODY} bytes")
            elif isinstance(ev, h11.ConnectionClosed):
                return None
        target = urlsplit(event.target.decode("ascii", "replace"))
        return Request(event.method.decode("ascii", "replace"), target.path, dict(parse_qsl(target.query)),
                       bytes(body), self.caller, self.via)

    async def _send(self, response: Response) -> None:
        headers = [("content-type", NDJSON if response.stream is not None else JSON), *response.headers.items()]
        if response.stream is None:
            body = (json.dumps(response.body, indent=2, sort_keys=True, default=str) + "\n").encode()
            await self._write(h11.Response(status_code=response.status,
                                           headers=[*headers, ("content-length", str(len(body)))]))
            await self._write(h11.Data(data=body))
            await self._write(h11.EndOfMessage())
            return
        await self._write(h11.Response(status_code=response.status, headers=[*headers, ("connection", "close")]))
        await self._stream(response.stream)

    async def _stream(self, events: AsyncIterator[dict[str, Any]]) -> None:
        """Write events until they end or the client goes away (it sends nothing more, so
        any read that returns means it closed its end)."""
        async with trio.open_nursery() as nursery:
            async def gone() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    while await self.stream.receive_some(4096):
                        pass
                nursery.cancel_scope.cancel()
            nursery.start_soon(gone)
            try:
                async for event in events:
                    await self._write(h11.Data(data=(json.dumps(event, sort_keys=True) + "\n").encode()))
                await self._write(h11.EndOfMessage())
            finally:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
            nursery.cancel_scope.cancel()

    async def _write(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise trio.BrokenResourceError from exc
                raise


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
