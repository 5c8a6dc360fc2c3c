"""The mount's views of the same blobs: ``.hf/hub`` (a Hugging Face hub cache) and
``.lmstudio`` (LM Studio's publisher/repo/file tree), issue 15 section 4 and acceptance 3.

First as pure logic (``tree.Namespace`` with ``views.Views``, no kernel): the layout,
the stand-in commit, per-caller visibility down to a blob and ``refs/main``, reserved
names. Then through real FUSE mounts, populated by real ``hf://`` pulls against the hub
stand-in of ``faultserver``: ``huggingface_hub.hf_hub_download`` in a subprocess with
``HF_HUB_OFFLINE=1 HF_HUB_CACHE=<mount>/.hf/hub`` returns a path in the mount with the
original bytes; a model hidden from the caller (a private model of another app, read by
``nobody``) is absent; a dehydrated file opened through a view is fetched and verified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import posixpath
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI, remove_tree, sha, thaw_tree, wait_for
from ggufgen import write_mmproj, write_model
from modelfs.mount.tree import Caller, ModelEntry, Namespace, Node, attr, diff, xattrs
from modelfs.mount.views import HF_DIR, LMSTUDIO_DIR, VIEW_DIRS, Views, standin_commit
from modelfs_store.catalog import FileRecord, ModelRecord, VersionRecord
from modelfs_store.errors import NotFound, UsageError
from modelfs_store.names import RESERVED_MODEL_NAMES, check_model_name

ME = Caller(0, 0, 4242)
OTHER = Caller(65534, 65534, 4343)
A_COMMIT, C_COMMIT = "a" * 40, "c" * 40
LIVE = 30.0


# -- pure logic ---------------------------------------------------------------------------------
def h(n: int) -> str:
    return f"{n:064x}"


def rec(name: str, n: int, hub_path: str | None = None, role: str = "weights") -> FileRecord:
    return FileRecord(name, role, 100 + n, h(n), f"https://hub.example/{name}", hub_path=hub_path)


def model(name: str, files: list[FileRecord], *, repo: str | None = None, commit: str | None = None,
          installed: float = 1000.0, private: bool = False, source: str | None = None) -> ModelEntry:
    card = {"source": source or (f"hf://{repo}" if repo else f"import:{name}"), "installed_at": installed,
            "created_at": installed, "hub_repo": repo, "hub_commit": commit}
    v = VersionRecord(name, 1, "installed", False, card, tuple(sorted(files, key=lambda f: f.filename)))
    m = ModelRecord(name, 1, None, "app.A" if private else None, "private" if private else "shared", 999.0, None)
    return ModelEntry(m, (v,))


class HideFromOther:
    """Private models are seen by ME only (the policy's answer, without /proc)."""

    def allows(self, caller: Caller, m: ModelRecord) -> bool:
        return m.visibility != "private" or caller == ME

    def for_caller(self, caller: Caller) -> Callable[[ModelRecord], bool]:
        return lambda m: self.allows(caller, m)

    def uniform(self, m: ModelRecord) -> bool:
        return m.visibility != "private"


def walk(ns: Namespace, path: str, who: Caller = ME) -> Node:
    node = ns.tree.root
    for part in filter(None, path.split("/")):
        node = ns.lookup(node.ino, part, who)
    return node


def ls(ns: Namespace, path: str, who: Caller = ME) -> list[str]:
    return [n for n, _ in ns.listing(walk(ns, path, who).ino, who)]


def hidden(ns: Namespace, path: str, who: Caller = OTHER) -> bool:
    try:
        walk(ns, path, who)
    except NotFound:
        return True
    return False


REPO_DIR = ".hf/hub/models--org--tiny-GGUF"
Q4, Q8, PROJ = rec("tiny-Q4_K_M.gguf", 1, "tiny-Q4_K_M.gguf"), rec("tiny-Q8_0.gguf", 2, "Q8/tiny-Q8_0.gguf"), \
    rec("mmproj-tiny-f16.gguf", 3, "mmproj-tiny-f16.gguf", "mmproj")


@pytest.fixture
def ns() -> Namespace:
    """Two quants of one repo at two commits (the newer one private), a repo with no
    commit, and a model from no hub."""
    n = Namespace(HideFromOther(), views=Views())
    n.replace((
        model("tiny-q4", [Q4, PROJ], repo="org/tiny-GGUF", commit=A_COMMIT, installed=1000.0),
        model("tiny-q8", [Q8, PROJ], repo="org/tiny-GGUF", commit=C_COMMIT, installed=2000.0, private=True),
        model("adopted", [rec("a.gguf", 4, "a.gguf")], repo="lms/adopted-GGUF"),
        model("local", [rec("local.gguf", 5)]),
    ))
    return n


def test_the_hub_layout_of_two_quants_of_one_repo(ns):
    assert ls(ns, "") == ["adopted", "local", "tiny-q4", "tiny-q8"]  # the views are not listed
    assert ls(ns, ".hf") == ["hub"]
    assert ls(ns, ".hf/hub") == ["models--lms--adopted-GGUF", "models--org--tiny-GGUF"]
    assert ls(ns, REPO_DIR) == ["blobs", "refs", "snapshots"]
    assert ls(ns, f"{REPO_DIR}/blobs") == [h(1), h(2), h(3)]  # the shared mmproj once
    assert ls(ns, f"{REPO_DIR}/snapshots") == [A_COMMIT, C_COMMIT]
    assert ls(ns, f"{REPO_DIR}/snapshots/{C_COMMIT}") == ["Q8", "mmproj-tiny-f16.gguf"]
    link = walk(ns, f"{REPO_DIR}/snapshots/{C_COMMIT}/Q8/tiny-Q8_0.gguf")
    assert link.kind == "symlink" and ns.readlink(link.ino, ME) == f"../../../blobs/{h(2)}"
    assert ns.readlink(walk(ns, f"{REPO_DIR}/snapshots/{A_COMMIT}/tiny-Q4_K_M.gguf").ino, ME) == f"../../blobs/{h(1)}"
    blob = walk(ns, f"{REPO_DIR}/blobs/{h(1)}")
    assert (blob.kind, blob.size, blob.file) == ("file", Q4.size, Q4)  # opened like the model's own file
    # refs/main: the newest commit, written as the hub writes it (no newline)
    assert walk(ns, f"{REPO_DIR}/refs/main").data == C_COMMIT.encode()
    assert ls(ns, ".lmstudio") == ["lms", "modelfs", "org"]
    assert ls(ns, ".lmstudio/org/tiny-GGUF") == ["mmproj-tiny-f16.gguf", "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]
    assert ls(ns, ".lmstudio/modelfs/local") == ["local.gguf"]
    assert walk(ns, ".lmstudio/modelfs/local/local.gguf").file == rec("local.gguf", 5)


def test_a_version_without_a_commit_gets_a_stable_stand_in(ns):
    commit = standin_commit("lms/adopted-GGUF", [("a.gguf", h(4))])
    assert commit == hashlib.sha256(b"modelfs stand-in commit\0lms/adopted-GGUF\0a.gguf\0" + h(4).encode()
                                    + b"\n").hexdigest()[:40]
    assert ls(ns, ".hf/hub/models--lms--adopted-GGUF/snapshots") == [commit]
    assert walk(ns, ".hf/hub/models--lms--adopted-GGUF/refs/main").data == commit.encode()
    assert standin_commit("lms/adopted-GGUF", [("a.gguf", h(5))]) != commit  # other bytes, another id


def test_a_hidden_model_is_absent_from_every_view(ns):
    # The private quant's files, blob, commit and LM Studio file are gone for OTHER...
    assert ls(ns, f"{REPO_DIR}/snapshots", OTHER) == [A_COMMIT]
    assert ls(ns, f"{REPO_DIR}/blobs", OTHER) == [h(1), h(3)]  # the mmproj it shares with a visible model stays
    assert walk(ns, f"{REPO_DIR}/refs/main", OTHER).data == A_COMMIT.encode()  # not the hidden newer commit
    assert ls(ns, ".lmstudio/org/tiny-GGUF", OTHER) == ["mmproj-tiny-f16.gguf", "tiny-Q4_K_M.gguf"]
    for path in (f"{REPO_DIR}/snapshots/{C_COMMIT}", f"{REPO_DIR}/snapshots/{C_COMMIT}/Q8/tiny-Q8_0.gguf",
                 f"{REPO_DIR}/blobs/{h(2)}", ".lmstudio/org/tiny-GGUF/tiny-Q8_0.gguf", "tiny-q8"):
        assert hidden(ns, path), path  # lookups by exact name fail, not only listings
    # ...and are never cached for another caller; what everyone sees alike is.
    assert attr(walk(ns, f"{REPO_DIR}/blobs/{h(2)}")).entry_timeout == 0
    assert attr(walk(ns, f"{REPO_DIR}/refs/main")).entry_timeout == 0
    assert attr(walk(ns, f"{REPO_DIR}/blobs/{h(3)}")).entry_timeout > 0
    assert attr(walk(ns, REPO_DIR)).entry_timeout > 0
    # A repo whose every model is hidden is not there at all.
    ns.replace((*ns.tree.entries.values(), model("secret", [rec("s.gguf", 9, "s.gguf")], repo="org/secret-GGUF",
                                                 commit=A_COMMIT, private=True)))
    assert "models--org--secret-GGUF" in ls(ns, ".hf/hub")
    assert "models--org--secret-GGUF" not in ls(ns, ".hf/hub", OTHER)
    assert "secret-GGUF" not in ls(ns, ".lmstudio/org", OTHER)
    assert hidden(ns, ".hf/hub/models--org--secret-GGUF") and hidden(ns, ".lmstudio/org/secret-GGUF")
    # The owner's open of a view file is checked too (the kernel may hold an inode from before).
    blob = walk(ns, f"{REPO_DIR}/blobs/{h(2)}")
    with pytest.raises(NotFound):
        ns.check_visible(blob, OTHER)


def test_views_change_with_the_catalog_and_keep_their_numbers(ns):
    before = ns.tree
    blob = walk(ns, f"{REPO_DIR}/blobs/{h(1)}").ino
    # A rebuild for an unrelated change (last use) keeps the view nodes themselves.
    entries = tuple(e._replace(model=replace(e.model, last_used_at=5.0)) for e in before.entries.values())
    ns.replace(entries)
    assert ns.tree.views is before.views and not diff(before, ns.tree)
    # A new model shows (a new name needs no invalidation: ENOENT is never cached); numbers stay,
    # and the other repositories keep their nodes.
    adopted = walk(ns, ".hf/hub/models--lms--adopted-GGUF")
    ns.replace((*entries, model("tiny-f16", [rec("tiny-f16.gguf", 6, "tiny-f16.gguf")],
                                repo="org/tiny-GGUF", commit=A_COMMIT)))
    assert walk(ns, f"{REPO_DIR}/blobs/{h(1)}").ino == blob
    assert walk(ns, ".hf/hub/models--lms--adopted-GGUF") is adopted
    snap = walk(ns, f"{REPO_DIR}/snapshots/{A_COMMIT}")
    assert ls(ns, f"{REPO_DIR}/snapshots/{A_COMMIT}") == ["mmproj-tiny-f16.gguf", "tiny-Q4_K_M.gguf", "tiny-f16.gguf"]
    f16 = walk(ns, f"{REPO_DIR}/snapshots/{A_COMMIT}/tiny-f16.gguf").ino
    # Removing it takes it out of the views, and the kernel is told to forget its names.
    change = ns.replace(entries)
    assert hidden(ns, f"{REPO_DIR}/snapshots/{A_COMMIT}/tiny-f16.gguf", ME)
    assert (snap.ino, "tiny-f16.gguf", f16) in change.entries
    assert (walk(ns, f"{REPO_DIR}/blobs").ino, h(6)) in {(p, n) for p, n, _ in change.entries}


def test_hostile_hub_names_never_become_paths():
    n = Namespace(views=Views())
    n.replace((
        model("up", [rec("u.gguf", 1, "../../../etc/passwd")], repo="org/up", commit=A_COMMIT),
        model("dots", [rec("d.gguf", 2, "d.gguf")], repo="../..", commit=A_COMMIT),
        model("dashes", [rec("x.gguf", 3, "x.gguf")], repo="a--b/c", commit=A_COMMIT),
        model("badcommit", [rec("b.gguf", 4, "b.gguf")], repo="org/bad", commit="../../x"),
    ))
    # No file of 'up' has a safe path (the repo dir has nothing to show); the others' repos are refused.
    assert ls(n, ".hf/hub") == ["models--org--bad"]
    # A commit that is not 40 hex digits is replaced by the stand-in.
    assert ls(n, ".hf/hub/models--org--bad/snapshots") == [standin_commit("org/bad", [("b.gguf", h(4))])]
    # Every model is still in the LM Studio view, under its own name when its hub source is unusable.
    assert ls(n, ".lmstudio") == ["modelfs", "org"]
    assert ls(n, ".lmstudio/modelfs") == ["dashes", "dots", "up"]
    assert ls(n, ".lmstudio/org") == ["bad"]
    assert ls(n, ".lmstudio/modelfs/up") == ["u.gguf"]


def test_view_names_are_reserved_and_win_over_an_old_model_of_that_name():
    assert RESERVED_MODEL_NAMES == set(VIEW_DIRS) == {HF_DIR, LMSTUDIO_DIR}
    for name in (".hf", ".lmstudio", ".HF", ".LMStudio"):
        with pytest.raises(UsageError, match="reserved by the mount"):
            check_model_name(name)
    check_model_name(".hf2")  # only the two names
    n = Namespace(views=Views())
    n.replace((model(".hf", [rec("x.gguf", 1)]),))  # a catalog from before the rule
    assert walk(n, ".hf").ino != n.tree.root.children[".hf"]
    assert ls(n, ".hf") == ["hub"]
    # ...in listings too: readdirplus would hand the kernel the model's directory under the
    # view's name, and the next path walk through that cached entry would miss the view.
    assert ls(n, "") == []


# -- through a real mount --------------------------------------------------------------------------
pytestmark_fuse = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                       reason="!!! /dev/fuse is missing: the view mount tests CANNOT run on this machine !!!"),
]

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
APP = "org.example.A"

# What huggingface_hub finds in the cache: for each (repo, file, revision), the path and
# the SHA-256 of its bytes, or the name of the error.
HF_PROBE = """
    import hashlib, json, sys
    from huggingface_hub import hf_hub_download
    out = []
    for repo, filename, revision in json.loads(sys.argv[1]):
        try:
            path = hf_hub_download(repo, filename, revision=revision)
            with open(path, "rb") as f:
                out.append([path, hashlib.sha256(f.read()).hexdigest()])
        except Exception as exc:
            out.append([type(exc).__name__, str(exc)[:200]])
    print(json.dumps(out))
"""


class World:
    """A root-owned store in /tmp (so ``nobody`` can reach the mount), populated by hf://
    pulls against the hub stand-in, mounted with --allow-other."""

    def __init__(self, top: Path, origin: Any, cdn: Any) -> None:
        self.top, self.origin, self.cdn = top, origin, cdn
        self.cli = CLI(top / "store", env={"MODELFS_HF_ENDPOINT": origin.origin})
        self.files: dict[str, bytes] = {}
        self.mount: Any = None

    def publish(self, repo: str, path: Path, commit: str) -> str:
        self.files[path.name] = path.read_bytes()
        return self.origin.add_hf(repo, path.name, self.files[path.name], commit=commit, cdn=self.cdn)

    @property
    def mnt(self) -> Path:
        return self.mount.path

    def hf(self, *specs: tuple[str, str, str | None], as_nobody: bool = False) -> list[list[str]]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(self.mnt / ".hf" / "hub"),
               "HF_HOME": str(self.top / "hfhome"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        argv = [sys.executable, "-c", textwrap.dedent(HF_PROBE), json.dumps(specs)]
        r = subprocess.run([*SETPRIV, *argv] if as_nobody else argv, capture_output=True, text=True,
                           timeout=120, env=env, cwd="/")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def py(self, code: str, *args: str, as_nobody: bool = False) -> Any:
        argv = [sys.executable, "-c", textwrap.dedent(code), *args]
        r = subprocess.run([*SETPRIV, *argv] if as_nobody else argv, capture_output=True, text=True,
                           timeout=60, cwd="/")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


LOOK = """
    import errno, json, os, sys
    out = {}
    for path in sys.argv[1:]:
        try:
            out[path] = sorted(os.listdir(path)) if os.path.isdir(path) else open(path, "rb").read().hex()
        except OSError as exc:
            out[path] = errno.errorcode[exc.errno]
    print(json.dumps(out))
"""


@pytest.fixture
def world() -> Iterator[World]:
    from faultserver import FaultServer
    from test_mount import Mount

    top = Path(tempfile.mkdtemp(prefix="modelfs-views-", dir="/tmp"))
    top.chmod(0o755)
    (top / "hfhome").mkdir(mode=0o777)
    (top / "hfhome").chmod(0o777)
    src = top / "src"
    src.mkdir()
    with FaultServer() as origin, FaultServer() as cdn:  # the hub, and where it redirects
        w = World(top, origin, cdn)
        q4 = write_model(src / "tiny-Q4_K_M.gguf", name="tiny", tensor_bytes=64 << 10, seed=1)
        q8 = write_model(src / "tiny-Q8_0.gguf", name="tiny", tensor_bytes=96 << 10, seed=2)
        proj = write_mmproj(src / "mmproj-tiny-f16.gguf", seed=3)
        secret = write_model(src / "secret-Q4_K_M.gguf", name="secret", tensor_bytes=32 << 10, seed=4)
        w.publish("org/tiny-GGUF", q4, A_COMMIT)
        w.publish("org/tiny-GGUF", proj, A_COMMIT)
        w.publish("org/tiny-GGUF", q8, C_COMMIT)   # main moved on before the second pull
        w.publish("org/secret-GGUF", secret, A_COMMIT)
        w.cli.run("pull", f"hf://org/tiny-GGUF/{q4.name}", "--mmproj", proj.name, "--name", "tiny-q4")
        # The newer quant is a private model of app A: nobody must not learn of it.
        w.cli.run("pull", f"hf://org/tiny-GGUF/{q8.name}", "--name", "tiny-q8", "--app", APP, "--private")
        w.cli.run("pull", f"hf://org/secret-GGUF/{secret.name}", "--name", "secret", "--app", APP, "--private")
        w.mount = Mount(w.cli, top / "mnt", "--allow-other")
        try:
            yield w
        finally:
            w.mount.stop()
            thaw_tree(top)
            remove_tree(top)


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT run !!!")
@pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root to act as two users (setpriv) !!!")
def test_hf_hub_download_finds_the_files_in_the_mount_and_not_what_is_hidden(world: World) -> None:
    q4, q8, proj, secret = (sha(world.files[n]) for n in
                            ("tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf", "mmproj-tiny-f16.gguf", "secret-Q4_K_M.gguf"))
    mnt = str(world.mnt)
    # The owner at a shell sees every model. refs/main is the newest pull's commit, so the
    # older quant is found at its own commit, as in the hub's cache.
    got = world.hf(("org/tiny-GGUF", "tiny-Q8_0.gguf", None), ("org/tiny-GGUF", "tiny-Q4_K_M.gguf", A_COMMIT),
                   ("org/tiny-GGUF", "mmproj-tiny-f16.gguf", A_COMMIT), ("org/secret-GGUF", "secret-Q4_K_M.gguf", None),
                   ("org/tiny-GGUF", "tiny-Q8_0.gguf", C_COMMIT))
    hub = f"{mnt}/.hf/hub"
    assert got == [[f"{hub}/models--org--tiny-GGUF/snapshots/{C_COMMIT}/tiny-Q8_0.gguf", q8],
                   [f"{hub}/models--org--tiny-GGUF/snapshots/{A_COMMIT}/tiny-Q4_K_M.gguf", q4],
                   [f"{hub}/models--org--tiny-GGUF/snapshots/{A_COMMIT}/mmproj-tiny-f16.gguf", proj],
                   [f"{hub}/models--org--secret-GGUF/snapshots/{A_COMMIT}/secret-Q4_K_M.gguf", secret],
                   [f"{hub}/models--org--tiny-GGUF/snapshots/{C_COMMIT}/tiny-Q8_0.gguf", q8]]
    # The top-level listing is the models, with or without -a; the views are found by name.
    assert sorted(os.listdir(mnt)) == ["secret", "tiny-q4", "tiny-q8"]
    ls_a = subprocess.run(["ls", "-a", mnt], capture_output=True, text=True, check=True).stdout.split()
    assert ls_a == ["secret", "tiny-q4", "tiny-q8"]  # the mount lists no . and .. either
    assert os.readlink(f"{hub}/models--org--tiny-GGUF/snapshots/{A_COMMIT}/tiny-Q4_K_M.gguf") == f"../../blobs/{q4}"
    with open(f"{mnt}/.lmstudio/org/tiny-GGUF/tiny-Q4_K_M.gguf", "rb") as f:
        assert f.read() == world.files["tiny-Q4_K_M.gguf"]

    # nobody (another uid, no grant) sees the shared quant only: main is its commit there.
    got = world.hf(("org/tiny-GGUF", "tiny-Q4_K_M.gguf", None), ("org/tiny-GGUF", "tiny-Q8_0.gguf", None),
                   ("org/tiny-GGUF", "tiny-Q8_0.gguf", C_COMMIT), ("org/secret-GGUF", "secret-Q4_K_M.gguf", None),
                   ("org/secret-GGUF", "secret-Q4_K_M.gguf", A_COMMIT), as_nobody=True)
    assert got[0] == [f"{hub}/models--org--tiny-GGUF/snapshots/{A_COMMIT}/tiny-Q4_K_M.gguf", q4]
    assert [g[0] for g in got[1:]] == ["LocalEntryNotFoundError"] * 4
    seen = world.py(LOOK, hub, f"{hub}/models--org--tiny-GGUF/blobs", f"{hub}/models--org--tiny-GGUF/snapshots",
                    f"{hub}/models--org--tiny-GGUF/refs/main", f"{hub}/models--org--secret-GGUF",
                    f"{hub}/models--org--tiny-GGUF/blobs/{q8}", f"{mnt}/.lmstudio/org",
                    f"{mnt}/.lmstudio/org/tiny-GGUF", f"{mnt}/.lmstudio/org/secret-GGUF/secret-Q4_K_M.gguf", mnt,
                    as_nobody=True)
    assert seen == {
        hub: ["models--org--tiny-GGUF"],
        f"{hub}/models--org--tiny-GGUF/blobs": sorted([q4, proj]),
        f"{hub}/models--org--tiny-GGUF/snapshots": [A_COMMIT],
        f"{hub}/models--org--tiny-GGUF/refs/main": A_COMMIT.encode().hex(),
        f"{hub}/models--org--secret-GGUF": "ENOENT",
        f"{hub}/models--org--tiny-GGUF/blobs/{q8}": "ENOENT",
        f"{mnt}/.lmstudio/org": ["tiny-GGUF"],
        f"{mnt}/.lmstudio/org/tiny-GGUF": ["mmproj-tiny-f16.gguf", "tiny-Q4_K_M.gguf"],
        f"{mnt}/.lmstudio/org/secret-GGUF/secret-Q4_K_M.gguf": "ENOENT",
        mnt: ["tiny-q4"],
    }
    # Everything is read-only.
    with pytest.raises(OSError) as exc:
        os.open(f"{hub}/models--org--tiny-GGUF/blobs/{q4}", os.O_RDWR)
    assert exc.value.errno == errno.EROFS

    # A grant to nobody's app... is not needed: making the model shared shows it at once.
    world.cli.run("visibility", "secret", "shared")
    wait_for(lambda: world.hf(("org/secret-GGUF", "secret-Q4_K_M.gguf", None), as_nobody=True)[0][1] == secret,
             LIVE, "the now shared model to show in nobody's hub view")


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT run !!!")
def test_a_pull_and_an_rm_show_in_the_views_without_a_remount(world: World) -> None:
    hub = world.mnt / ".hf" / "hub"
    assert sorted(os.listdir(hub)) == ["models--org--secret-GGUF", "models--org--tiny-GGUF"]  # looked up once
    new = write_model(world.top / "src" / "new-Q4_K_M.gguf", name="new", tensor_bytes=16 << 10, seed=7)
    digest = world.publish("other/new-GGUF", new, A_COMMIT)
    world.cli.run("pull", "--no-daemon", f"hf://other/new-GGUF/{new.name}", "--name", "new")
    wait_for(lambda: "models--other--new-GGUF" in os.listdir(hub), LIVE, "a pull to show in the hub view")
    assert world.hf(("other/new-GGUF", new.name, None)) == [
        [f"{hub}/models--other--new-GGUF/snapshots/{A_COMMIT}/{new.name}", digest]]
    assert os.listdir(world.mnt / ".lmstudio" / "other" / "new-GGUF") == [new.name]
    assert sorted(os.listdir(world.mnt)) == ["new", "secret", "tiny-q4", "tiny-q8"]
    world.cli.run("rm", "new")
    wait_for(lambda: "models--other--new-GGUF" not in os.listdir(hub), LIVE, "an rm to show in the hub view")
    assert not (world.mnt / ".lmstudio" / "other").exists()
    assert world.hf(("other/new-GGUF", new.name, None))[0][0] == "LocalEntryNotFoundError"


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT run !!!")
def test_a_dehydrated_file_opened_through_a_view_is_fetched_and_verified(tmp_path: Path, cli: CLI) -> None:
    from faultserver import FaultServer
    from modelfs_store.core import Store
    from test_mount import Mount

    good = write_model(tmp_path / "lazy-Q4_K_M.gguf", name="lazy", tensor_bytes=256 << 10, seed=8).read_bytes()
    bad = write_mmproj(tmp_path / "mmproj-lazy-f16.gguf", seed=9).read_bytes()
    with FaultServer() as origin:
        origin.add("/lazy-Q4_K_M.gguf", good)
        origin.add("/mmproj-lazy-f16.gguf", b"GGUF, but not the bytes the catalog expects" * 100)
        s = Store.open(cli.root)
        try:  # a version recorded with its hub source and no byte local (as a lazy pull leaves it)
            s.catalog.add_version("lazy", 1, [
                FileRecord("lazy-Q4_K_M.gguf", "weights", len(good), sha(good), origin.url("/lazy-Q4_K_M.gguf"),
                           hub_path="lazy-Q4_K_M.gguf"),
                FileRecord("mmproj-lazy-f16.gguf", "mmproj", len(bad), sha(bad), origin.url("/mmproj-lazy-f16.gguf"),
                           hub_path="mmproj-lazy-f16.gguf")],
                signed=False, source="hf://org/lazy-GGUF", hub_repo="org/lazy-GGUF", hub_commit=A_COMMIT)
            s.catalog.activate("lazy", 1, actor="test")
        finally:
            s.close()
        mount = Mount(cli, tmp_path / "mnt")
        try:
            mnt = mount.path
            own = mnt / "lazy" / "lazy-Q4_K_M.gguf"
            blob = mnt / ".hf" / "hub" / "models--org--lazy-GGUF" / "blobs" / sha(good)
            assert os.stat(blob).st_size == len(good)  # exact before any byte is local
            assert os.getxattr(blob, "user.modelfs.state") == b"dehydrated"
            # An mmap of a dehydrated file through a view: open returns once it is verified.
            with open(mnt / ".lmstudio" / "org" / "lazy-GGUF" / "lazy-Q4_K_M.gguf", "rb") as f, \
                    mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                assert hashlib.sha256(mapped).hexdigest() == sha(good)
            assert os.getxattr(blob, "user.modelfs.state") == b"local"
            got = World(tmp_path, origin, None)
            got.mount = mount
            [[path, digest]] = got.hf(("org/lazy-GGUF", "lazy-Q4_K_M.gguf", None))
            assert path.startswith(str(mnt)) and digest == sha(good)
            assert origin.bytes_sent("/lazy-Q4_K_M.gguf") == len(good)  # fetched on open, once
            assert os.getxattr(own, "user.modelfs.state") == b"local"  # the model's own file shares the blob
            # Bytes that fail verification are EIO through the view too, and nothing shows.
            proj = mnt / ".lmstudio" / "org" / "lazy-GGUF" / "mmproj-lazy-f16.gguf"
            with pytest.raises(OSError) as exc:
                proj.read_bytes()
            assert exc.value.errno == errno.EIO
            assert os.getxattr(mnt / "lazy" / "mmproj-lazy-f16.gguf", "user.modelfs.state") == b"dehydrated"
        finally:
            mount.stop()


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT run !!!")
def test_the_owner_gets_the_fast_path_through_the_hub_view(world: World) -> None:
    from test_mount import Mount

    world.mount.stop()
    world.mount = Mount(world.cli, world.top / "mnt2", "--allow-other", "--links", "auto")
    q4 = sha(world.files["tiny-Q4_K_M.gguf"])
    [[path, digest]] = world.hf(("org/tiny-GGUF", "tiny-Q4_K_M.gguf", A_COMMIT))
    assert digest == q4 and path.startswith(str(world.mnt))
    # snapshot -> ../../blobs/<sha> in the mount -> the committed blob itself, for the owner
    blob = world.mnt / ".hf" / "hub" / "models--org--tiny-GGUF" / "blobs" / q4
    assert os.path.islink(blob) and os.readlink(blob) == str(world.top / "store" / "blobs" / "sha256" / q4[:2] / q4)
    assert os.path.realpath(path) == os.readlink(blob)
    # nobody gets the regular file, through the mount
    seen = world.py("""
        import hashlib, json, os, sys
        with open(sys.argv[1], "rb") as f:
            print(json.dumps([os.path.islink(sys.argv[1]), hashlib.sha256(f.read()).hexdigest()]))
    """, str(blob), as_nobody=True)
    assert seen == [False, q4]


# -- attacks (review of the views) -----------------------------------------------------------------
@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT run !!!")
@pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root to act as two users (setpriv) !!!")
def test_one_callers_answer_for_a_name_is_never_served_from_the_kernels_cache_to_another(world: World) -> None:
    """refs/main names a different commit for nobody (the private quant's newer commit is
    hidden from it). nobody's answer used to be cached by the kernel for an hour, and the
    owner's hf_hub_download then found main at the old commit, without the newer quant."""
    repo = world.mnt / ".hf" / "hub" / "models--org--tiny-GGUF"
    for _ in range(2):
        assert world.py(LOOK, str(repo / "refs" / "main"), as_nobody=True) == {
            str(repo / "refs" / "main"): A_COMMIT.encode().hex()}
        assert (repo / "refs" / "main").read_bytes() == C_COMMIT.encode()
        assert world.hf(("org/tiny-GGUF", "tiny-Q8_0.gguf", None))[0][1] == sha(world.files["tiny-Q8_0.gguf"])


def test_every_candidate_of_a_name_that_differs_by_caller_has_a_zero_entry_timeout(ns):
    # refs/main means one commit for ME and another for OTHER: OTHER's answer is as
    # uncacheable as ME's, or the kernel serves it to ME for an hour.
    mine, theirs = walk(ns, f"{REPO_DIR}/refs/main"), walk(ns, f"{REPO_DIR}/refs/main", OTHER)
    assert mine.data != theirs.data
    assert attr(mine).entry_timeout == attr(theirs).entry_timeout == 0
    assert attr(walk(ns, ".lmstudio/org/tiny-GGUF/tiny-Q4_K_M.gguf", OTHER)).entry_timeout > 0  # one answer
    # The same bytes offered by a private and a shared model: one node, the shared one's, cached.
    for path in (".lmstudio/org/tiny-GGUF/mmproj-tiny-f16.gguf", f"{REPO_DIR}/blobs/{h(3)}"):
        mine, theirs = walk(ns, path), walk(ns, path, OTHER)
        assert mine is theirs and mine.model == "tiny-q4" and not mine.alt and attr(mine).entry_timeout > 0, path


def test_a_name_shared_with_a_hidden_model_tells_nothing_of_it(ns):
    """A blob, a commit's refs/main or an LM Studio file that a hidden model shares with a
    visible one is answered from the visible model: its xattrs (source, version) and the
    model its opens and uses are counted for never name the hidden one."""
    secret = model("a-secret", [PROJ, rec("secret-Q2_K.gguf", 7, "secret-Q2_K.gguf")], repo="org/tiny-GGUF",
                   commit=A_COMMIT, installed=3000.0, private=True,
                   source="hf://org/tiny-GGUF/secret-Q2_K.gguf")
    secret = ModelEntry(replace(secret.model, active_version=7), (replace(secret.versions[0], version=7),))
    ns.replace((*ns.tree.entries.values(), secret))
    for path in (f"{REPO_DIR}/blobs/{h(3)}", f"{REPO_DIR}/refs/main", ".lmstudio/org/tiny-GGUF/mmproj-tiny-f16.gguf",
                 f"{REPO_DIR}/snapshots/{A_COMMIT}/mmproj-tiny-f16.gguf"):
        node = walk(ns, path, OTHER)
        assert node.model == "tiny-q4" and node.version == 1, path
        got = xattrs(node, lambda sha: "local")
        assert b"secret" not in b"".join(got.values()) and got.get("user.modelfs.version", b"1") == b"1", path
        assert node.seen_by == {"tiny-q4"}, path  # only the model it shows
    assert walk(ns, f"{REPO_DIR}/blobs/{h(3)}").model == "tiny-q4"  # the same bytes: everyone's node first
    assert ls(ns, f"{REPO_DIR}/snapshots/{A_COMMIT}", OTHER) == ["mmproj-tiny-f16.gguf", "tiny-Q4_K_M.gguf"]


def test_a_directorys_stat_counts_only_what_every_caller_sees(ns):
    """A view directory is one inode for everyone: its nlink and mtime used to count the
    hidden quant's commit (nlink 4 for OTHER's one snapshot, mtime its install time) and
    a hidden repository. nlink is now always 1: whether a count were exact would tell too."""
    ns.replace((*ns.tree.entries.values(), model("secret", [rec("s.gguf", 9, "s.gguf")], repo="org/secret-GGUF",
                                                 commit=A_COMMIT, installed=3000.0, private=True)))
    shared = int(1000.0 * 1e9)  # when every model OTHER sees was installed
    for who in (ME, OTHER):
        snaps = attr(walk(ns, f"{REPO_DIR}/snapshots", who))
        assert (snaps.nlink, snaps.mtime_ns) == (1, shared)  # 1: not counted (find then looks at each)
        for path in (".hf", ".hf/hub", REPO_DIR, f"{REPO_DIR}/blobs", f"{REPO_DIR}/refs", ".lmstudio", ".lmstudio/org",
                     ".lmstudio/org/tiny-GGUF"):
            assert attr(walk(ns, path, who)).mtime_ns == shared, path
        assert {attr(node).nlink for node in ns.tree.views.values() if node.is_dir} == {1}
    assert attr(walk(ns, ".lmstudio/org", OTHER)).entry_timeout > 0  # every caller sees it alike
    secret = attr(walk(ns, ".hf/hub/models--org--secret-GGUF"))
    assert secret.entry_timeout == 0 and secret.mtime_ns == int(3000.0 * 1e9)  # only for whoever sees it


def _every_name(ns: Namespace, ino: int, path: str, depth: int = 0) -> Iterator[tuple[str, str, Node]]:
    assert depth < 16, path
    for name, node in ns.listing(ino, ME):
        yield path, name, node
        if node.is_dir:
            yield from _every_name(ns, node.ino, f"{path}/{name}", depth + 1)


def test_a_hand_written_catalog_never_puts_a_bad_name_or_an_escaping_link_in_a_view():
    """The catalog is the owner's, but one written by hand or by an old version must not
    make a view offer '..', '' or a '/' in a name (the kernel fails a whole readdir on
    some), a snapshot link that climbs out of its repository, or break the build (the
    daemon would keep an old tree): such files are left out of the views."""
    repos = ["../../etc", "org/../x", "a--b/c", "org/re\0po", "o" * 200 + "/r", "orgé/repo", "a/b/c", 123, None,
             "org/", "/repo", ".hf/x", "-org/x"]
    paths = ["../x.gguf", "/abs.gguf", "a//b.gguf", "", "x\0.gguf", ".", "a/./b.gguf", "p" * 300 + ".gguf",
             "a\\b.gguf", None, 5]
    models = [model(f"m{i}-{j}", [rec(f"f{i}-{j}.gguf", 100 * i + j, p)], repo=r, commit="../" * 13 + "x")
              for i, r in enumerate(repos) for j, p in enumerate(paths)]
    for j, fn in enumerate(["../up.gguf", "a//b.gguf", "/abs.gguf", "x/../../y.gguf", ".", "", "a/", "x\0y"]):
        models.append(model(f"weird{j}", [rec(fn, 5000 + j, "ok.gguf")], repo="org/weird"))
    for j, digest in enumerate(["/../../../../etc/passwd", "../" * 30, "A" * 64, "", "g" * 64]):
        models.append(model(f"badsha{j}", [replace(rec("w.gguf", 6000 + j, "w.gguf"), sha256=digest)],
                            repo="org/badsha", commit=A_COMMIT))
    models.append(model("empty-secret", [], private=True))  # an installed version with no file
    n = Namespace(HideFromOther(), Linker(), Views())
    n.replace(tuple(models))
    seen = [*_every_name(n, walk(n, ".hf").ino, ".hf"), *_every_name(n, walk(n, ".lmstudio").ino, ".lmstudio")]
    assert len(seen) > 20
    for path, name, node in seen:
        assert name not in ("", ".", "..") and "/" not in name and "\0" not in name, (path, name)
        if node.kind == "symlink":
            repo = "/".join(path.split("/")[:3])
            assert posixpath.normpath(f"{path}/{node.target}").startswith(f"{repo}/blobs/"), (path, node.target)
    assert ls(n, ".hf/hub") == ["models--org--weird"]  # the one valid repository id with valid paths and digests
    assert ls(n, ".lmstudio") == ["modelfs"] and "empty-secret" not in ls(n, ".lmstudio/modelfs")
    assert ls(n, ".lmstudio/modelfs", OTHER) == sorted(m.model.name for m in models if m.model.name.startswith("m"))
    assert ls(n, ".lmstudio/modelfs/m0-0") == ["f0-0.gguf"]  # its filename is fine: shown there
    assert "a" in ls(n, "weird1")  # the model's own directory is the tree's business (unchanged)


class Linker:
    """A link chooser that offers no link: only its target (the store's check of a digest) matters."""
    enabled = True

    def target(self, f: FileRecord) -> str:
        from modelfs_store.layout import check_sha256
        return "/store/" + check_sha256(f.sha256)

    def for_caller(self, caller: Caller) -> Callable[[Node], bool]:
        return lambda node: False


CHURN = """
    import errno, json, os, sys, time
    paths, held = sys.argv[2:], open(sys.argv[1], "rb")
    first = held.read(4)
    def look():
        out = {}
        for p in paths:
            try:
                os.lstat(p)  # existence alone: answered from the kernel's cache if it holds the entry
                out[p] = sorted(os.listdir(p)) if os.path.isdir(p) else len(open(p, "rb").read())
            except OSError as exc:
                out[p] = errno.errorcode[exc.errno]
        return out
    before = look()  # cached by the kernel now: these entries are the same for every caller
    print(json.dumps(before), flush=True)
    sys.stdin.readline()  # the owner makes the model private
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(v != "ENOENT" for v in look().values()):
        time.sleep(0.05)
    after = {}
    for p in paths:
        try:
            os.lstat(p)
            after[p] = "exists"
        except OSError as exc:
            after[p] = errno.errorcode[exc.errno]
    print(json.dumps([after, first.hex(), len(first + held.read())]), flush=True)
"""


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT run !!!")
@pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root to act as two users (setpriv) !!!")
def test_a_model_made_private_leaves_every_view_of_another_uid_that_had_it_cached(world: World) -> None:
    """nobody reads the shared quant through every view (the kernel caches those entries for
    an hour), then it becomes private: every name is ENOENT for nobody within the poll,
    and a file nobody already had open keeps reading, as in the model's own directory."""
    hub = world.mnt / ".hf" / "hub" / "models--org--tiny-GGUF"
    q4, proj = (sha(world.files[n]) for n in ("tiny-Q4_K_M.gguf", "mmproj-tiny-f16.gguf"))
    lms = world.mnt / ".lmstudio" / "org"
    gone = [hub / "blobs" / q4, hub / "snapshots" / A_COMMIT / "tiny-Q4_K_M.gguf", hub / "refs" / "main",
            hub / "snapshots" / A_COMMIT, hub, lms, lms / "tiny-GGUF", lms / "tiny-GGUF" / "tiny-Q4_K_M.gguf",
            world.mnt / "tiny-q4"]
    argv = [*SETPRIV, sys.executable, "-c", textwrap.dedent(CHURN), str(hub / "blobs" / proj), *map(str, gone)]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert p.stdout is not None and p.stdin is not None
        before = json.loads(p.stdout.readline())
        assert before[str(hub / "blobs" / q4)] == len(world.files["tiny-Q4_K_M.gguf"])
        assert before[str(hub / "refs" / "main")] == 40 and "ENOENT" not in before.values()
        world.cli.run("visibility", "tiny-q4", "private", "--app", APP)
        p.stdin.write("\n")
        p.stdin.flush()
        after, first, total = json.loads(p.stdout.readline())
    finally:
        p.kill()
        p.wait()
    assert after == {str(path): "ENOENT" for path in gone}
    assert (bytes.fromhex(first), total) == (b"GGUF", len(world.files["mmproj-tiny-f16.gguf"]))  # held open: reads on


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT run !!!")
@pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root to act as two users (setpriv) !!!")
def test_statfs_counts_only_the_models_the_caller_sees(world: World) -> None:
    """df of the mount used to count every model and every view node: nobody learnt the
    size of the private models, and saw a private pull grow it."""
    size = {n: len(b) for n, b in world.files.items()}
    probe = "import json, os, sys; s = os.statvfs(sys.argv[1]); print(json.dumps([s.f_blocks, s.f_files]))"
    mine, theirs = world.py(probe, str(world.mnt)), world.py(probe, str(world.mnt), as_nobody=True)
    assert mine[0] == -(-sum(size.values()) // 4096)  # every model's files, once
    assert theirs[0] == -(-(size["tiny-Q4_K_M.gguf"] + size["mmproj-tiny-f16.gguf"]) // 4096)
    assert 0 < theirs[1] < mine[1]


def test_the_roots_stat_tells_nothing_of_private_models(ns):
    """The root's nlink counted every model (6 for OTHER, who sees three) and its mtime was
    the private quant's install time."""
    for who in (ME, OTHER):
        root = attr(walk(ns, "", who))
        assert (root.nlink, root.mtime_ns) == (1, int(1000.0 * 1e9))
    shared = Namespace(HideFromOther(), views=Views())
    shared.replace(tuple(e for e in ns.tree.entries.values() if e.model.visibility != "private"))
    assert attr(shared.tree.root).nlink == 2 + 3  # every model everyone's: counted exactly


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT run !!!")
def test_a_hand_edited_catalog_row_neither_stops_the_mount_nor_reaches_a_view(tmp_path: Path, cli: CLI) -> None:
    """A file row whose sha256 is not a digest (a catalog edited by hand): the fast path's
    link target refused it, so the whole tree failed to build and `mount --links auto`
    exited. Now that file has no link and is in no view; everything else is served."""
    import sqlite3

    from test_mount import Mount

    good = write_model(tmp_path / "good.gguf", name="good", tensor_bytes=8 << 10, seed=11)
    bad = write_model(tmp_path / "bad.gguf", name="bad", tensor_bytes=8 << 10, seed=12)
    cli.run("import", "good", str(good))
    cli.run("import", "bad", str(bad))
    with sqlite3.connect(cli.root / "catalog.db") as db:
        db.execute("UPDATE versions SET hub_repo = 'org/bad-GGUF', hub_commit = ? WHERE model = 'bad'", (A_COMMIT,))
        db.execute("UPDATE files SET sha256 = '/../../../../etc/passwd', hub_path = 'bad.gguf', "
                   "filename = '../bad.gguf' WHERE model = 'bad'")
        db.execute("UPDATE versions SET hub_repo = 'org/good-GGUF' WHERE model = 'good'")
        db.execute("UPDATE files SET hub_path = 'good.gguf' WHERE model = 'good'")
    mount = Mount(cli, tmp_path / "mnt", "--links", "auto")
    try:
        mnt = mount.path
        assert sorted(os.listdir(mnt)) == ["bad", "good"]
        assert os.listdir(mnt / ".hf" / "hub") == ["models--org--good-GGUF"]
        assert os.listdir(mnt / ".lmstudio" / "org") == ["good-GGUF"]
        assert not (mnt / ".lmstudio" / "modelfs").exists()
        assert (mnt / ".lmstudio" / "org" / "good-GGUF" / "good.gguf").read_bytes() == good.read_bytes()
        assert mount.proc.poll() is None
    finally:
        mount.stop()
