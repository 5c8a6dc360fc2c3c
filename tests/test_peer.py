"""Who is at the other end of a control-socket connection (modelfs/mount/peer.py): the
kernel's credentials, and a pid tied to the process that connected, by its pidfd or,
without one, by its start time. An identity that cannot be tied is not ``sure``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from modelfs.mount.identity import Identity, Resolver
from modelfs.mount.peer import Peer, identify, peer_of, pidfd_pid


class Always(Resolver):
    """A resolver that vouches for every process: only peer.py's own checks can doubt."""

    def identify(self, pid: int, uid: int) -> Identity:
        return Identity(uid, "org.example.A", "exe", pid)


def test_the_peer_is_the_process_that_connected() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        peer = peer_of(a)
        try:
            assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
            assert peer.pidfd is not None and peer.via == "pidfd", "this kernel has SO_PEERPIDFD (6.5+)"
            assert pidfd_pid(peer.pidfd) == os.getpid()
            ident = identify(peer, Resolver())
            assert ident.sure and ident.uid == os.geteuid() and ident.pid == os.getpid()
        finally:
            peer.close()


def test_a_peer_gone_since_it_connected_is_not_sure(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    child = subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
                              "s.connect(sys.argv[1]); time.sleep(60)", path])
    conn, _ = server.accept()
    with server, conn:
        peer = peer_of(conn)
        try:
            assert peer.pid == child.pid and identify(peer, Always()).sure
            child.kill()
            child.wait()  # reaped: the pid may now be anyone's
            ident = identify(peer, Always())
            assert (ident.sure, ident.app, ident.rule) == (False, None, "the process that connected has exited")
        finally:
            peer.close()


def test_without_a_pidfd_a_process_younger_than_the_connection_is_not_sure() -> None:
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    me = Peer(os.getpid(), os.geteuid(), os.getegid(), None, now)
    assert me.via == "pid+start-time" and identify(me, Always()).sure
    ident = identify(replace(me, accepted=0.0), Always())  # "accepted" before this process started
    assert (ident.sure, ident.rule) == (False, "the pid was reused after the connection")


def test_an_unreadable_pidfd_is_not_a_live_process() -> None:
    assert pidfd_pid(10**6) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_the_uid_is_the_connecting_process_s() -> None:
    top = Path(tempfile.mkdtemp(prefix="mfs-peer-", dir="/tmp"))  # a directory nobody may traverse
    top.chmod(0o755)
    path = str(top / "s.sock")
    server = socket.socket(socket.AF_UNIX)
    server.settimeout(30)
    server.bind(path)
    os.chmod(path, 0o666)
    server.listen(1)
    child = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                              "-c", "import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
                              "s.connect(sys.argv[1]); time.sleep(60)", path])
    try:
        conn, _ = server.accept()
        with server, conn:
            peer = peer_of(conn)
            peer.close()
            assert (peer.uid, peer.gid) == (65534, 65534)
    finally:
        child.kill()
        child.wait()
        shutil.rmtree(top, ignore_errors=True)
