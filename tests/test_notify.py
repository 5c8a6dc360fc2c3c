"""The daemon speaks systemd's ``sd_notify`` (``Type=notify``): READY=1 only once its
mount answers, a STATUS line, STOPPING=1 when it detaches; ``NOTIFY_SOCKET`` is a path
or an abstract address, and no child inherits it."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI
from ggufgen import write_model
from modelfs.mount.notify import Notifier, socket_address


@contextlib.contextmanager
def notify_socket(address: str) -> Iterator[socket.socket]:
    """The receiving end a service manager would hold, bound to ``address``."""
    bound = socket_address(address)
    assert bound is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # who sent it, as systemd checks
        sock.bind(bound)
        yield sock


def abstract_address() -> str:
    return f"@modelfs-test-{secrets.token_hex(6)}"


def receive_from(sock: socket.socket, key: str, timeout: float = 60) -> tuple[dict[str, str], int, int]:
    """The first datagram that carries ``key``, and its sender's pid and uid (the kernel's
    word: systemd accepts a notification only from the unit's main pid)."""
    deadline = time.monotonic() + timeout
    before: list[dict[str, str]] = []
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
        except TimeoutError:
            raise AssertionError(f"no {key} within {timeout}s; got {before}") from None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        if key in fields:
            [(level, kind, cred)] = ancillary
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
            pid, uid, _gid = struct.unpack("iII", cred)
            return fields, pid, uid
        before.append(fields)


def receive(sock: socket.socket, key: str, timeout: float = 60) -> dict[str, str]:
    return receive_from(sock, key, timeout)[0]


def test_notifier_speaks_to_paths_and_abstract_sockets_and_is_taken_from_the_environment(tmp_path: Path) -> None:
    for address in (str(tmp_path / "n"), abstract_address()):
        with notify_socket(address) as sock:
            environ = {"NOTIFY_SOCKET": address, "HOME": "/"}
            n = Notifier.from_environ(environ)
            assert environ == {"HOME": "/"}  # no child inherits it
            assert n.ready("serving 2 models\nat /m")
            assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 models at /m\n"
            assert n.stopping("unmounted")
            assert sock.recv(4096) == b"STOPPING=1\nSTATUS=unmounted\n"
    assert not Notifier.from_environ({}).ready("x")  # outside systemd: nothing
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "relative"}).ready("x")
    assert not Notifier(str(tmp_path / "nobody-listens")).status("x")  # logged, never raised


needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                                reason="!!! /dev/fuse is missing: the Type=notify tests CANNOT run on this machine !!!")


@contextlib.contextmanager
def notified_daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket, Path, CLI]]:
    """``modelfs mount --foreground`` of a store holding one model, run by its console
    script as a unit runs it, with ``NOTIFY_SOCKET`` set; yields once READY=1 came."""
    store, mnt = tmp_path / "store", tmp_path / "Models"
    cli = CLI(store)
    write_model(tmp_path / "w.gguf", name="tiny", tensor_bytes=4096)
    cli.run("import", "tiny", str(tmp_path / "w.gguf"))
    address = abstract_address()
    modelfs = Path(sys.executable).with_name("modelfs")
    with notify_socket(address) as sock, (tmp_path / "daemon.log").open("wb") as log:
        proc = subprocess.Popen([str(modelfs), "--store", str(store), "mount", str(mnt), "--foreground"],
                                cwd="/", env={**os.environ, "NOTIFY_SOCKET": address}, stdout=log, stderr=log)
        try:
            ready, pid, _uid = receive_from(sock, "READY")
            live = os.path.ismount(mnt) and os.listdir(mnt) == ["tiny"]  # at once: nothing may lag READY
            assert live and ready == {"READY": "1", "STATUS": f"serving 1 model at {mnt}"}
            assert pid == proc.pid  # the main pid, as NotifyAccess=main requires
            yield proc, sock, mnt, cli
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@pytest.mark.fuse
@needs_fuse
def test_the_daemon_is_ready_only_once_its_mount_answers_and_says_when_it_stops(tmp_path: Path) -> None:
    with notified_daemon(tmp_path) as (proc, sock, mnt, _cli):
        proc.terminate()  # what systemd's stop does after ExecStop: detach
        assert receive(sock, "STOPPING") == {"STOPPING": "1", "STATUS": f"unmounted {mnt}; serving 0 open file(s)"}
        assert proc.wait(timeout=30) == 0 and not os.path.ismount(mnt)


@pytest.mark.fuse
@needs_fuse
def test_the_status_line_follows_the_catalog(tmp_path: Path) -> None:
    with notified_daemon(tmp_path) as (_proc, sock, mnt, cli):
        cli.run("rm", "tiny")
        assert receive(sock, "STATUS") == {"STATUS": f"serving 0 models at {mnt}"}


@pytest.mark.fuse
@needs_fuse
def test_a_stop_right_after_a_change_detaches(tmp_path: Path) -> None:
    """A removal invalidates the root's attributes; on SIGTERM the daemon looks at its
    own mountpoint, a FUSE request to itself. From the event loop it waited for itself
    forever (and ``systemctl stop``, with TimeoutStopSec=infinity, with it). The STATUS
    line comes after the invalidation, without a look at the mount that would refresh it."""
    with notified_daemon(tmp_path) as (proc, sock, mnt, cli):
        cli.run("rm", "tiny")
        receive(sock, "STATUS")
        proc.terminate()
        assert receive(sock, "STOPPING", timeout=30)["STOPPING"] == "1"
        assert proc.wait(timeout=30) == 0 and not os.path.ismount(mnt)
