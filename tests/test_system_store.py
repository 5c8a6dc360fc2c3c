"""A system store: a dedicated user owns the store; its daemon starts as root,
mounts with allow_other, then runs as that user keeping only CAP_SYS_PTRACE; root's CLI
becomes that user to administer it; the packaging creates the user and the directories.

The store's user here is ``nobody``; the packaging test runs sysusers and tmpfiles into
a scratch root, never into this machine's /etc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI, REPO, remove_tree, thaw_tree, wait_for
from ggufgen import write_model
from test_mount import Mount
from test_notify import abstract_address, notify_socket, receive_from
from test_visibility import PROBE

NOBODY = 65534
A = "org.example.A"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root: the system store tests CANNOT run !!!")


def test_the_packaging_makes_the_user_and_the_directories(tmp_path: Path) -> None:
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.skip(f"!!! {tool} is missing: the packaging test CANNOT run !!!")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        (root / "etc" / name).write_text("root:x:0:0:root:/root:/bin/sh\n" if name == "passwd" else "root:x:0:\n")
    subprocess.run(["systemd-sysusers", f"--root={root}", str(REPO / "packaging/sysusers.d/modelfs.conf")],
                   check=True, capture_output=True)
    user = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                if line.startswith("modelfs:"))
    assert user[5] == "/var/lib/modelfs"
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(REPO / "packaging/tmpfiles.d/modelfs.conf")],
                   check=True, capture_output=True)
    store, mnt = (root / "var/lib/modelfs").stat(), (root / "srv/models").stat()
    assert (store.st_mode & 0o777, store.st_uid) == (0o750, int(user[2]))
    assert (mnt.st_mode & 0o777, mnt.st_uid) == (0o755, int(user[2]))
    unit = (REPO / "packaging/systemd/modelfs-system.service").read_text()
    assert "--store /var/lib/modelfs mount /srv/models --foreground --allow-other" in unit


@pytest.fixture
def system_store() -> Iterator[tuple[Path, CLI]]:
    top = Path(tempfile.mkdtemp(prefix="modelfs-sys-", dir="/tmp"))
    top.chmod(0o755)
    store = top / "store"
    store.mkdir()
    cli = CLI(store)
    for name, seed, extra in (("open", 1, []), ("secret", 2, ["--app", A, "--private"])):
        w = top / f"{name}.gguf"
        write_model(w, name=name, tensor_bytes=4096, seed=seed)
        cli.run("import", name, str(w), *extra)
    app = top / "appA" / "python3"
    app.parent.mkdir()
    shutil.copy2("/usr/bin/python3", app)
    cli.run("apps", "add", A, "--exe", str(app))
    thaw_tree(store)  # root's commits made the blobs immutable; the store's user could not have
    for p in [store, *store.rglob("*")]:
        os.lchown(p, NOBODY, NOBODY)
    # Root administers it as its user; app A as run by root: root is not this store's owner.
    cli.run("grant", A, "secret", "--uid", "0", process=True)
    (top / "mnt").mkdir()
    os.chown(top / "mnt", NOBODY, NOBODY)
    yield top, cli
    remove_tree(top)


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                    reason="!!! /dev/fuse is missing: the system store mount test CANNOT run !!!")
def test_the_daemon_runs_as_the_stores_user_with_only_cap_sys_ptrace(system_store: tuple[Path, CLI]) -> None:
    top, cli = system_store
    m = Mount(cli, top / "mnt", "--allow-other")
    try:
        pid = json.loads((cli.root / "run" / "daemon.json").read_text())["pid"]
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        assert status["Uid"].split() == [str(NOBODY)] * 4 and status["Gid"].split()[0] == str(NOBODY)
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 1 << 19  # CAP_SYS_PTRACE alone
        assert int(status["CapAmb"], 16) == int(status["CapInh"], 16) == 0
        options = next(line.split()[3] for line in Path("/proc/mounts").read_text().splitlines()
                       if line.split()[1] == str(m.path))
        assert "allow_other" in options.split(",") and f"user_id={NOBODY}" in options

        def see(exe: str, *setpriv: str) -> dict:
            r = subprocess.run([*setpriv, exe, "-c", PROBE, str(m.path), "open", "secret"], capture_output=True,
                               text=True, timeout=60, cwd="/", check=True)
            return json.loads(r.stdout)

        other = ("setpriv", "--reuid=1000", "--regid=1000", "--clear-groups")
        assert see("/usr/bin/python3", *other)["list"] == ["open"]
        assert see("/usr/bin/python3")["list"] == ["open"]            # root is not this store's owner
        # Root running app A: its /proc/PID/exe is readable to the daemon only through CAP_SYS_PTRACE.
        assert see(str(top / "appA" / "python3"))["list"] == ["open", "secret"]
        # Its control socket is the system one, for every user to ask: nobody's, 0666.
        sock = Path("/run/modelfs/control.sock")
        status = json.loads((cli.root / "run" / "daemon.json").read_text())
        assert status["control_socket"] == {"path": str(sock), "where": "system"}
        st = sock.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o666)
        r = subprocess.run([*other, "curl", "-s", "--unix-socket", str(sock), "http://modelfs/v1/models"],
                           capture_output=True, text=True, timeout=60, cwd="/", check=True)
        assert [m["name"] for m in json.loads(r.stdout)] == ["open"]  # what uid 1000 sees in the mount
        # Root's pulls go through the daemon as the store's user, found by run/daemon.json.
        assert cli.run("pulls", "--json", process=True).json() == []
        # Root administers the store as its user: what it writes is the user's.
        cli.run("pin", "open", process=True)
        assert {p.lstat().st_uid for p in [cli.root, *cli.root.rglob("*")]} == {NOBODY}
        out = cli.run("unmount", str(m.path), process=True)
        assert "unmounted" in out.stdout
        wait_for(lambda: m.proc.poll() is not None, 30, "the daemon to exit")
        assert not os.path.ismount(m.path)
        assert not sock.exists()
    finally:
        m.stop()


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                    reason="!!! /dev/fuse is missing: the system store mount test CANNOT run !!!")
def test_the_system_daemon_is_ready_from_its_main_pid_once_it_is_the_stores_user(
        system_store: tuple[Path, CLI]) -> None:
    """modelfs-system.service is Type=notify: the daemon changes user by exec (same pid), and
    READY=1 must come from that pid once mounted, or systemd would never see the unit start."""
    top, cli = system_store
    mnt = top / "mnt"
    address = abstract_address()
    with notify_socket(address) as sock:
        proc = cli.popen("mount", str(mnt), "--foreground", "--allow-other", env={"NOTIFY_SOCKET": address},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready, pid, uid = receive_from(sock, "READY")
            assert os.path.ismount(mnt) and os.listdir(mnt) == ["open"]
            assert ready["READY"] == "1" and (pid, uid) == (proc.pid, NOBODY)
        finally:
            proc.terminate()
            if proc.wait(timeout=30) != 0 or os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
