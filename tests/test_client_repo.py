"""``modelfs.client`` with a hub repository's quant, ``hf://org/repo:QUANT`` (issue 15's
repo-level pulls, for apps): the app-local cache chooses the files from the hub's listing
and keeps the weights and the mmproj as two entries (a split model needs the shared
store); the shared manager hands the source to the daemon, which pulls the whole model
as one entry in the mount. Against the hub stand-in on 127.0.0.1."""
# ruff: noqa: F811 - the fault server's fixtures are imported by name

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from conftest import remove_tree
from faultserver import FaultServer, cdn, origin  # noqa: F401 - fixtures
from ggufgen import write_mmproj, write_model, write_split
from modelfs.client import (
    CachePolicy,
    LocalModelDownloadManager,
    ModelLoadOptions,
    ModelSource,
    SharedStoreManager,
    SourceKind,
)
from modelfs_store.errors import NotFound, UsageError
from test_control import Daemon

REPO_ID = "org/tiny-GGUF"


def sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def hub(origin: FaultServer, cdn: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A repository of two quants and two projectors; a second one holding a split model."""
    src = tmp_path / "src"
    src.mkdir()
    files = {"tiny-Q4_K_M.gguf": write_model(src / "q4", tensor_bytes=64 << 10, seed=1),
             "tiny-Q8_0.gguf": write_model(src / "q8", tensor_bytes=96 << 10, seed=2),
             "mmproj-tiny-f16.gguf": write_mmproj(src / "p16", seed=3),
             "mmproj-tiny-f32.gguf": write_mmproj(src / "p32", seed=4)}
    origin.add_hf_repo(REPO_ID, dict(files), cdn=cdn)
    (src / "split").mkdir()
    origin.add_hf_repo("org/big-GGUF", {p.name: p for p in write_split(src / "split", "big-Q4_K_M", 2)}, cdn=cdn)
    monkeypatch.setenv("MODELFS_HF_ENDPOINT", origin.origin)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return files


def test_a_repository_source_has_its_own_key_and_spec() -> None:
    s = ModelSource.parse("hf://org/tiny-GGUF:q4_k_m@v1.0")
    assert (s.kind, s.repo_id, s.quant, s.revision) == (SourceKind.HUGGING_FACE_REPO, REPO_ID, "q4_k_m", "v1.0")
    assert s.canonical_key == s.spec == "hf://org/tiny-GGUF:q4_k_m@v1.0"
    assert s.cache_key == hashlib.sha256(s.canonical_key.encode()).hexdigest()
    assert s.cache_directory_name == f"tiny-GGUF-q4_k_m-{s.cache_key[:12]}"
    assert ModelSource.parse("hf://org/tiny-GGUF").canonical_key == "hf://org/tiny-GGUF"
    assert ModelSource.hugging_face_repo(REPO_ID, "Q8_0").spec == "hf://org/tiny-GGUF:Q8_0"
    for bad in ("hf://org/tiny-GGUF:Q4@v1:x", "hf://org/../x:Q4", "hf://org/tiny-GGUF:Q4 K"):
        with pytest.raises(UsageError):
            ModelSource.parse(bad)


def test_the_app_local_cache_takes_a_quant_and_its_mmproj_and_later_needs_no_network(
        hub: dict[str, Path], origin: FaultServer, cdn: FaultServer, tmp_path: Path) -> None:
    manager = LocalModelDownloadManager(tmp_path / "cache")
    source = ModelSource.parse("hf://org/tiny-GGUF:q4_k_m")
    entry = manager.ensure_model(source)
    assert entry.file_name == "tiny-Q4_K_M.gguf" and entry.cache_key == source.cache_key
    assert sha(entry.file_path) == entry.sha256 == sha(hub["tiny-Q4_K_M.gguf"])
    assert Path(entry.file_path).parent.name == source.cache_directory_name
    assert entry.mmproj is not None and entry.mmproj.file_name == "mmproj-tiny-f16.gguf"
    assert sha(entry.mmproj.file_path) == sha(hub["mmproj-tiny-f16.gguf"])
    # The other quant and projector were never asked for, not even their metadata.
    asked = {r.path for r in origin.requests()}
    assert not any("Q8_0" in p or "f32" in p for p in asked), asked
    # Cached: no request at all, with the default policy or cache_only.
    before = len(origin.requests()) + len(cdn.requests())
    assert manager.ensure_model(source).sha256 == entry.sha256
    assert manager.ensure_model(source, ModelLoadOptions(cache_policy=CachePolicy.CACHE_ONLY)).mmproj is not None
    assert len(origin.requests()) + len(cdn.requests()) == before
    with pytest.raises(NotFound):
        manager.ensure_model(ModelSource.parse("hf://org/tiny-GGUF:Q8_0"),
                             ModelLoadOptions(cache_policy=CachePolicy.CACHE_ONLY))
    # A split model needs the shared store: refused before a byte of it is fetched.
    with pytest.raises(UsageError, match="split into 2 files: that needs the shared store"):
        manager.ensure_model(ModelSource.parse("hf://org/big-GGUF:Q4_K_M"))
    assert not any("big-Q4_K_M" in r.path for r in cdn.requests())


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT mount here !!!")
def test_the_shared_manager_has_the_daemon_pull_the_whole_model(hub: dict[str, Path], origin: FaultServer) -> None:
    top = Path(tempfile.mkdtemp(prefix="mfs-", dir="/tmp"))
    top.chmod(0o755)
    d = Daemon(top, {"HF_HOME": str(top / "no-hf-home"), "MODELFS_HF_ENDPOINT": origin.origin})
    try:
        mount = d.start()
        manager = SharedStoreManager(d.sock)
        try:
            entry = manager.ensure_model(ModelSource.parse("hf://org/big-GGUF:Q4_K_M"))
            again = manager.ensure_model(ModelSource.parse("hf://org/big-GGUF:Q4_K_M"))
        finally:
            manager.close()
        # One entry in the mount: its path is the first shard, the second beside it.
        first = Path(entry.file_path)
        assert first.parent.parent == Path(mount.path) and first.name == "big-Q4_K_M-00001-of-00002.gguf"
        assert sorted(p.name for p in first.parent.iterdir() if p.suffix == ".gguf") == \
            ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]
        assert again.name == entry.name and sha(first) == entry.sha256
        shown = d.cli.run("show", entry.name, "--json").json()
        assert shown["hub_repo"] == "org/big-GGUF" and shown["hub_commit"] == "a" * 40
    finally:
        d.stop()
        remove_tree(top)
