"""The marks a committed blob carries (store/seal.py): its SHA-256 as ``user.modelfs.sha256``
and, where the kernel lets the owner set it (root here), the immutable flag, cleared
before the store removes or quarantines the blob; ``seal`` gives a blob from before the
marks what it lacks, the owner's way (a non-root owner must make it writable for the
moment of the xattr)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from ggufgen import write_model
from modelfs_store import seal
from modelfs_store.core import Store

NOBODY = 65534
ROOT = os.geteuid() == 0


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def imported(store: Store, tmp_path: Path, seed: int = 1) -> tuple[str, Path]:
    w = write_model(tmp_path / f"w{seed}.gguf", tensor_bytes=4096, seed=seed)
    [rec] = store.import_model(f"m{seed}", w).files
    return rec.sha256, store.blobs.path(rec.sha256)


def test_a_commit_leaves_the_digest_on_the_blob(store, tmp_path):
    sha, blob = imported(store, tmp_path)
    assert os.getxattr(blob, seal.DIGEST_XATTR) == sha.encode()
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert store.blobs.marks(sha).digest


@pytest.mark.skipif(not ROOT, reason="!!! only root may set the immutable flag: CANNOT run here !!!")
def test_roots_blob_is_immutable_and_still_removed_and_quarantined(store, tmp_path):
    if not _flags_supported(tmp_path):
        pytest.skip(f"!!! the file system of {tmp_path} keeps no immutable flag: CANNOT run !!!")
    sha, blob = imported(store, tmp_path)
    assert store.blobs.marks(sha).immutable
    with pytest.raises(PermissionError) as e:
        open(blob, "r+b")  # noqa: SIM115 - refused
    assert e.value.errno == errno.EPERM  # root ignores 0444, not the flag
    assert store.blobs.remove(sha) > 0 and not blob.exists()

    sha2, blob2 = imported(store, tmp_path, seed=2)
    store.blobs.quarantine_path(blob2, f"corrupt-{sha2}", "f" * 64)  # as verify does with rotten bytes
    assert not blob2.exists()
    [q] = store.layout.quarantine.iterdir()
    assert not seal.marks(q, sha2).immutable  # quarantine's cap may delete it later


@pytest.mark.skipif(not ROOT, reason="!!! needs root to take the marks away: CANNOT run here !!!")
def test_seal_gives_an_old_blob_what_it_lacks(store, tmp_path):
    sha, blob = imported(store, tmp_path)
    seal.thaw(blob)
    os.removexattr(blob, seal.DIGEST_XATTR)
    assert store.blobs.marks(sha) == seal.Marks(digest=False, immutable=False)
    got = store.blobs.seal(sha)
    assert got.digest and got == store.blobs.marks(sha)
    assert got.immutable or not _flags_supported(tmp_path)
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444


@pytest.mark.skipif(not ROOT, reason="!!! needs root to act as another uid: CANNOT run here !!!")
def test_a_non_root_owner_seals_its_read_only_blob(tmp_path):
    top = Path(os.environ.get("TMPDIR", "/tmp")) / f"modelfs-seal-{os.getpid()}"
    top.mkdir(mode=0o755)
    try:
        s = Store.open(top / "store")
        sha, blob = imported(s, tmp_path)
        s.close()
        seal.thaw(blob)
        os.removexattr(blob, seal.DIGEST_XATTR)
        for p in [top / "store", *(top / "store").rglob("*")]:
            os.lchown(p, NOBODY, NOBODY)
        code = ("import sys; from pathlib import Path; from modelfs_store import seal; "
                "m = seal.seal(Path(sys.argv[1]), sys.argv[2]); print(m.digest, m.immutable)")
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            sys.executable, "-c", code, str(blob), sha], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["True", "False"]  # no CAP_LINUX_IMMUTABLE: 0444 is its guard
        assert os.getxattr(blob, seal.DIGEST_XATTR) == sha.encode()
        assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


def _flags_supported(where: Path) -> bool:
    probe = where / "flag-probe"
    probe.write_bytes(b"x")
    ok = seal.freeze(probe)
    seal.thaw(probe)
    return ok
