"""The control socket's server (modelfs/mount/server.py) without a daemon: binding
(modes, stale and live sockets, long paths) and HTTP/1.1 over the socket (JSON,
streams, limits, ``Expect: 100-continue``), against a trivial handler under trio."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from modelfs.mount.identity import Identity
from modelfs.mount.peer import Peer
from modelfs.mount.server import MAX_BODY, ControlServer, Request, Response, bind, socket_choice
from modelfs.mount.socketclient import unix_path
from modelfs_store.errors import Conflict
from modelfs_store.layout import Layout


async def handler(req: Request) -> Response:
    if req.path == "/stream":
        async def events() -> AsyncIterator[dict[str, Any]]:
            for i in range(3):
                yield {"n": i}
        return Response(200, stream=events())
    if req.path == "/forever":
        async def forever() -> AsyncIterator[dict[str, Any]]:
            while True:
                yield {"tick": True}
                await trio.sleep(0.01)
        return Response(200, stream=forever())
    if req.path == "/boom":
        raise RuntimeError("a bug")
    return Response(200, {"method": req.method, "path": req.path, "query": req.query, "body": len(req.body),
                          "uid": req.caller.uid, "peer": req.peer})


def identify(peer: Peer) -> Identity:
    return Identity(peer.uid, None, "test", peer.pid)


def exchange(path: Path, raw: bytes, *, then: Callable[[socket.socket], bytes] | None = None) -> bytes:
    """Send ``raw`` on a fresh connection; everything the server answers until it closes."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    with unix_path(path) as p:
        s.connect(p)
    with s:
        s.sendall(raw)
        if then is not None:
            return then(s)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def serving(path: Path, client: Callable[[], Any]) -> Any:
    sock = bind(path, 0o600)

    async def main() -> Any:
        server = ControlServer(sock, path, "option", handler, identify)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            out = await trio.to_thread.run_sync(client)
            nursery.cancel_scope.cancel()
        return out
    return trio.run(main)


def test_json_answers_and_keep_alive(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    two = (b"GET /v1/x?job=3 HTTP/1.1\r\nhost: x\r\n\r\n"
           b"POST /y HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
    mode, out = serving(path, lambda: (stat.S_IMODE(os.stat(path).st_mode), exchange(path, two)))
    assert mode == 0o600
    heads = out.split(b"HTTP/1.1 200 ")
    assert len(heads) == 3  # two answers on one connection
    first = json.loads(heads[1].split(b"\r\n\r\n", 1)[1].rsplit(b"}", 1)[0] + b"}")
    assert first == {"method": "GET", "path": "/v1/x", "query": {"job": "3"}, "body": 0, "uid": os.geteuid(),
                     "peer": "pidfd"}
    assert not path.exists()  # the server removed its file when it stopped


def test_expect_100_continue_is_answered_before_the_body(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    head = b"POST /y HTTP/1.1\r\nhost: x\r\ncontent-length: 2000\r\nexpect: 100-continue\r\n\r\n"

    def client(s: socket.socket) -> bytes:
        interim = s.recv(65536)
        s.sendall(b"x" * 2000)
        s.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
        return interim + b"|" + rest

    out = serving(path, lambda: exchange(path, head, then=client))
    interim, rest = out.split(b"|", 1)
    assert interim.startswith(b"HTTP/1.1 100 ") and b'"body": 2000' in rest


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /boom HTTP/1.1\r\nhost: x\r\n\r\n", b"500"),
    (f"POST /y HTTP/1.1\r\nhost: x\r\ncontent-length: {MAX_BODY + 1}\r\n\r\n".encode(), b"413"),
    (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
])
def test_bad_requests_get_an_answer_not_a_dead_daemon(tmp_path: Path, raw: bytes, status: bytes) -> None:
    path = tmp_path / "c.sock"
    out = serving(path, lambda: exchange(path, raw))
    assert out.startswith(b"HTTP/1.1 " + status), out[:200]
    assert b'"exit_code"' in out


def test_a_stream_is_json_lines_and_stops_when_the_client_goes(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"

    def read_all(s: socket.socket) -> bytes:  # without a half-close: that reads as hanging up
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out

    out = serving(path, lambda: exchange(path, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n", then=read_all))
    assert b"application/x-ndjson" in out and b"connection: close" in out.lower()
    assert [json.loads(line) for line in out.split(b"\r\n") if line.startswith(b"{")] == [{"n": 0}, {"n": 1},
                                                                                         {"n": 2}]

    def hang_up(s: socket.socket) -> bytes:
        first = s.recv(4096)
        return first  # closing the connection must end the server's endless stream

    out = serving(path, lambda: exchange(path, b"GET /forever HTTP/1.1\r\nhost: x\r\n\r\n", then=hang_up))
    assert out.startswith(b"HTTP/1.1 200")  # and serving() returned: the stream ended


def test_a_stale_socket_is_replaced_a_live_one_and_other_files_never(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a killed daemon's file: nothing accepts on it
    sock = bind(path, 0o600)
    with pytest.raises(Conflict, match="another daemon listens on it"):
        bind(path, 0o600)
    sock.close()
    other = tmp_path / "file"
    other.write_text("mine")
    with pytest.raises(Conflict, match="not a socket"):
        bind(other, 0o600)
    assert other.read_text() == "mine"


def test_a_long_path_is_bound_through_its_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    assert len(str(path)) > 108
    out = serving(path, lambda: exchange(path, b"GET /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"))
    assert out.startswith(b"HTTP/1.1 200")


def test_where_the_socket_goes(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "store")
    assert socket_choice(layout, None, system=False, runtime_dir="/run/user/1000") == \
        (Path("/run/user/1000/modelfs/control.sock"), "runtime-dir")
    assert socket_choice(layout, None, system=False, runtime_dir=None) == (layout.run / "control.sock", "store")
    assert socket_choice(layout, None, system=False, runtime_dir="relative") == (layout.run / "control.sock", "store")
    assert socket_choice(layout, None, system=True, runtime_dir="/run/user/0") == \
        (Path("/run/modelfs/control.sock"), "system")
    assert socket_choice(layout, tmp_path / "s", system=True, runtime_dir=None) == (tmp_path / "s", "option")
