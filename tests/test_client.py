"""``modelfs.client`` without a daemon: llamadart's shapes, the app-local cache, the
controller's snapshots, and the async face under trio and asyncio.

- ModelSource's keys are llamadart's (canonical key, cache key, directory name,
  redacted metadata key), ``hf://owner/repo@rev/path`` included.
- The local cache keeps llamadart's layout; ``metadata.json`` parses with llamadart's
  exact field names and holds no secret; a download killed with ``kill -9`` resumes
  with Range and If-Range, and the origin sends little more than the missing bytes.
- The example app, run with no daemon, says so and leaves its model in that layout.
- A controller's snapshots go through llamadart's stages in order, their bytes never
  go back, and they end in ``ready``, or ``failed`` with a redacted message.
"""
# ruff: noqa: F811 - the fault server's fixtures are imported by name

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import modelfs.client as client
from conftest import REPO, wait_for
from faultserver import FaultServer, cdn, origin  # noqa: F401 - fixtures
from ggufgen import write_model
from modelfs.client import (
    LLAMADART_FIELDS,
    AsyncModelDownloadManager,
    LocalModelDownloadManager,
    ModelCacheEntry,
    ModelDownloadController,
    ModelLoadOptions,
    ModelSource,
    Stage,
)
from modelfs_store.errors import UsageError

MB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served(origin: FaultServer, tmp: Path, name: str, size: int, seed: int = 1, **faults: object
           ) -> tuple[str, str, Path]:
    w = write_model(tmp / name, tensor_bytes=size, seed=seed)
    origin.add(f"/{name}", w, **faults)
    return origin.url(f"/{name}"), sha(w), w


def test_the_public_surface_is_pinned() -> None:
    assert sorted(client.__all__) == sorted([
        "LLAMADART_FIELDS", "AsyncModelDownloadManager", "CachePolicy", "CancelToken", "Cancelled",
        "DownloadEvent", "DownloadSnapshot", "LocalModelDownloadManager", "ModelCacheEntry",
        "ModelDownloadController", "ModelDownloadManager", "ModelLoadOptions", "ModelSource",
        "SharedStoreManager", "SourceKind", "Stage", "default_root", "open_manager"])


def test_model_source_keys_are_llamadarts() -> None:
    url = ModelSource.url("https://host.example/m/tiny-Q4_K_M.gguf")
    assert url.canonical_key == "https://host.example/m/tiny-Q4_K_M.gguf"
    assert url.cache_key == hashlib.sha256(url.canonical_key.encode()).hexdigest()
    assert url.cache_directory_name == f"tiny-Q4_K_M-{url.cache_key[:12]}"
    named = ModelSource.url("https://host.example/dl?id=4", file_name="x.gguf")
    assert named.canonical_key == "url:https://host.example/dl?id=4\nfileName:x.gguf"
    signed = ModelSource.url("https://cdn.example/a/w.gguf?X-Amz-Signature=s3cr3t&X-Amz-Expires=60")
    assert "s3cr3t" in signed.canonical_key  # the cache key stays unique per signed URL...
    assert signed.metadata_source_key == f"url:https://cdn.example/a/w.gguf#cacheKey={signed.cache_key}"
    assert "s3cr3t" not in repr(signed) and "s3cr3t" not in str(signed)  # ...but is never shown
    hf = ModelSource.parse("hf://org/repo@v1.0/sub/w.gguf")
    assert (hf.repo_id, hf.revision, hf.file_path, hf.file_name) == ("org/repo", "v1.0", "sub/w.gguf", "w.gguf")
    assert hf.canonical_key == "hf://org/repo@v1.0/sub/w.gguf"
    assert hf.spec == "hf://org/repo@v1.0/sub/w.gguf"
    assert ModelSource.parse("hf://org/repo/w.gguf").canonical_key == "hf://org/repo@main/w.gguf"
    pr = ModelSource.parse("hf://org/repo/w.gguf?revision=refs%2Fpr%2F12")
    assert pr.revision == "refs/pr/12" and pr.canonical_key == "hf://org/repo/w.gguf?revision=refs%2Fpr%2F12"
    assert ModelSource.path("/m/x.gguf").canonical_key == "path:/m/x.gguf"
    assert ModelSource.pack("https://pub.example/p/demo.json").canonical_key == "pack:https://pub.example/p/demo.json"
    for bad in ("", "ftp://h/x.gguf", "hf://org/w.gguf", "hf://org/repo@a@b/w.gguf", "hf://org/repo/../w.gguf"):
        with pytest.raises(UsageError):
            ModelSource.parse(bad)


def test_the_local_cache_keeps_llamadarts_layout_and_no_secret(origin: FaultServer, tmp_path: Path) -> None:
    url, digest, w = served(origin, tmp_path, "tiny-Q4_K_M.gguf", 64 * 1024, require_auth="Bearer t0ken")
    root = tmp_path / "cache"
    manager = LocalModelDownloadManager(root)
    source = ModelSource.url(url + "?sig=s3cr3t")
    entry = manager.ensure_model(source, ModelLoadOptions(sha256=digest, bearer_token="t0ken"))
    directory = root / source.cache_directory_name
    assert Path(entry.file_path) == directory / "tiny-Q4_K_M.gguf"
    assert Path(entry.file_path).read_bytes() == w.read_bytes()
    assert sorted(p.name for p in directory.iterdir()) == ["metadata.json", "tiny-Q4_K_M.gguf"]
    raw = (directory / "metadata.json").read_text()
    doc = json.loads(raw)
    assert set(LLAMADART_FIELDS) <= set(doc)
    assert (doc["cache_key"], doc["file_name"], doc["bytes"], doc["sha256"]) == (
        source.cache_key, "tiny-Q4_K_M.gguf", w.stat().st_size, digest)
    assert doc["source_canonical_key"] == source.metadata_source_key
    for key in ("created_at", "updated_at"):
        assert doc[key].endswith("Z") and doc[key][10] == "T"  # ISO 8601 in UTC, as llamadart writes it
    assert "t0ken" not in raw and "s3cr3t" not in raw
    assert ModelCacheEntry.from_json(doc) == entry
    # Again: the cached entry, no request.
    before = len(origin.requests())
    assert manager.ensure_model(source, ModelLoadOptions(sha256=digest)).file_path == entry.file_path
    assert len(origin.requests()) == before
    assert manager.list() == [entry] and manager.get(source.cache_key) == entry
    assert manager.validate(source.cache_key)
    assert manager.remove(source.cache_key) and manager.list() == [] and not directory.exists()


CHILD = """
import sys
from pathlib import Path
from modelfs.client import LocalModelDownloadManager, ModelLoadOptions, ModelSource
m = LocalModelDownloadManager(Path(sys.argv[1]))
m.ensure_model(ModelSource.url(sys.argv[2]), ModelLoadOptions(sha256=sys.argv[3]))
"""


def test_a_download_killed_with_kill_9_resumes_with_range(origin: FaultServer, tmp_path: Path) -> None:
    size = 24 * MB
    url, digest, w = served(origin, tmp_path, "big.gguf", size, rate=8 * MB)
    root = tmp_path / "cache"
    source = ModelSource.url(url)
    part = root / source.cache_directory_name / "big.gguf.part"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), url, digest], cwd=REPO)
    try:
        wait_for(lambda: part.exists() and part.stat().st_size > 4 * MB, 60, "the child's first bytes")
        assert part.with_name("big.gguf.part.json").exists()
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
    kept = part.stat().st_size
    state = json.loads(part.with_name("big.gguf.part.json").read_text())
    assert state["sha256"] == digest and state["etag"]
    origin.reset_counts()
    origin.add("/big.gguf", w)  # full speed now
    entry = LocalModelDownloadManager(root).ensure_model(source, ModelLoadOptions(sha256=digest))
    assert sha(Path(entry.file_path)) == digest
    (req,) = origin.requests("/big.gguf")
    assert req.headers["range"].startswith("bytes=") and "if-range" in req.headers
    assert origin.bytes_sent("/big.gguf") <= w.stat().st_size - kept + 8 * MB
    assert not part.exists() and not part.with_name("big.gguf.part.json").exists()


def test_snapshots_follow_llamadarts_stages_and_end_redacted(origin: FaultServer, tmp_path: Path) -> None:
    url, digest, _ = served(origin, tmp_path, "s.gguf", 4 * MB, rate=16 * MB)
    c = ModelDownloadController(LocalModelDownloadManager(tmp_path / "cache"))
    c.start(ModelSource.url(url), ModelLoadOptions(sha256=digest))
    snaps = list(c.snapshots())
    stages = [s.stage for s in snaps]
    order = list(Stage)
    assert stages == sorted(stages, key=order.index), stages
    assert stages[0] is Stage.IDLE and stages[-1] is Stage.READY
    assert {Stage.RESOLVING, Stage.CHECKING_CACHE, Stage.DOWNLOADING, Stage.VERIFYING} <= set(stages)
    got = [s.received_bytes for s in snaps]
    assert got == sorted(got) and got[-1] == snaps[-1].total_bytes
    assert snaps[-1].entry is not None and snaps[-1].error is None

    # A wrong hash fails, and the message names neither the token nor the signature.
    c.start(ModelSource.url(url + "?X-Amz-Signature=s3cr3t"), ModelLoadOptions(sha256="0" * 64,
                                                                               bearer_token="t0ken"))
    final = c.wait(60)
    assert final.stage is Stage.FAILED and final.error
    assert "SHA-256" in final.error and "s3cr3t" not in final.error and "t0ken" not in final.error
    c.dispose()


def test_cancel_stops_a_local_download_and_keeps_its_partial(origin: FaultServer, tmp_path: Path) -> None:
    url, digest, _ = served(origin, tmp_path, "c.gguf", 32 * MB, rate=4 * MB)
    c = ModelDownloadController(LocalModelDownloadManager(tmp_path / "cache"))
    c.start(ModelSource.url(url), ModelLoadOptions(sha256=digest))
    wait_for(lambda: c.snapshot.received_bytes > MB, 60, "bytes")
    c.cancel()
    assert c.wait(30).stage is Stage.CANCELLED
    assert origin.bytes_sent("/c.gguf") < 32 * MB
    part = tmp_path / "cache" / ModelSource.url(url).cache_directory_name / "c.gguf.part"
    assert part.exists() and part.stat().st_size > 0
    c.dispose()


@pytest.mark.parametrize("loop", ["trio", "asyncio"])
def test_the_async_face_works_under_trio_and_asyncio(origin: FaultServer, tmp_path: Path, loop: str) -> None:
    url, digest, w = served(origin, tmp_path, "a.gguf", 256 * 1024)
    manager = AsyncModelDownloadManager(LocalModelDownloadManager(tmp_path / "cache"))

    async def go() -> ModelCacheEntry:
        entry = await manager.ensure_model(ModelSource.url(url), ModelLoadOptions(sha256=digest))
        assert [e.cache_key for e in await manager.list()] == [entry.cache_key]
        return entry

    entry = trio.run(go) if loop == "trio" else asyncio.run(go())
    assert Path(entry.file_path).read_bytes() == w.read_bytes()


def test_the_example_without_a_daemon_uses_the_local_cache(origin: FaultServer, tmp_path: Path) -> None:
    url, digest, _ = served(origin, tmp_path, "tiny.gguf", 64 * 1024)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "MODELFS_SOCKET": str(tmp_path / "none.sock")}
    r = subprocess.run([sys.executable, "examples/chat.py", url, "--sha256", digest, "--card"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"manager: local (no modelfs daemon answered at {tmp_path / 'none.sock'})"
    path = Path(lines[1].removeprefix("file: "))
    source = ModelSource.url(url)
    assert path == tmp_path / "xdg-cache" / "llamadart" / "models" / source.cache_directory_name / "tiny.gguf"
    doc = json.loads((path.parent / "metadata.json").read_text())
    assert set(LLAMADART_FIELDS) <= set(doc) and doc["file_path"] == str(path)
    card = json.loads(r.stdout.split("the model's card:\n", 1)[1])
    assert (card["architecture"], card["sha256"]) == ("llama", digest)


@pytest.mark.parametrize("loop", ["trio", "asyncio"])
def test_the_controllers_async_face_works_under_trio_and_asyncio(origin: FaultServer, tmp_path: Path,
                                                                   loop: str) -> None:
    url, digest, _ = served(origin, tmp_path, "ca.gguf", 256 * 1024)
    c = ModelDownloadController(LocalModelDownloadManager(tmp_path / "cache"))

    async def go() -> list[Stage]:
        c.start(ModelSource.url(url), ModelLoadOptions(sha256=digest))
        stages = [s.stage async for s in c.snapshots_async()]
        assert (await c.wait_async()).stage is Stage.READY
        return stages

    stages = trio.run(go) if loop == "trio" else asyncio.run(go())
    assert stages[0] is Stage.IDLE and stages[-1] is Stage.READY
    c.dispose()


def test_a_companion_mmproj_is_its_own_entry_and_nested_in_the_models(origin: FaultServer, tmp_path: Path) -> None:
    url, digest, _ = served(origin, tmp_path, "m.gguf", 64 * 1024, seed=1)
    mm_url, mm_digest, _ = served(origin, tmp_path, "mmproj.gguf", 32 * 1024, seed=2)
    manager = LocalModelDownloadManager(tmp_path / "cache")
    entry = manager.ensure_model(ModelSource.url(url), ModelLoadOptions(sha256=digest, mmproj_sha256=mm_digest),
                                 mmproj=ModelSource.url(mm_url))
    assert entry.mmproj is not None and entry.mmproj.sha256 == mm_digest
    doc = json.loads((Path(entry.file_path).parent / "metadata.json").read_text())
    assert doc["mmproj"]["file_name"] == "mmproj.gguf" and set(LLAMADART_FIELDS) <= set(doc["mmproj"])
    assert sorted(e.file_name for e in manager.list()) == ["m.gguf", "mmproj.gguf"]


def test_open_manager_says_why_it_fell_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MODELFS_SOCKET", str(tmp_path / "none.sock"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FLATPAK_ID", "org.example.Chat")
    caplog.set_level("INFO", logger="modelfs.client._open")
    manager = client.open_manager("org.example.Chat")
    assert manager.kind == "local"
    assert "--filesystem=xdg-run/modelfs" in manager.reason and manager.reason in repr(manager)
    assert isinstance(manager, LocalModelDownloadManager)
    assert manager.root == tmp_path / "cache" / "llamadart" / "models"
    assert any("app-local cache" in r.message and "Flatpak" in r.message for r in caplog.records)


def test_an_hf_source_resolves_its_hash_at_the_hub_and_stores_no_signature(
        origin: FaultServer, cdn: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = write_model(tmp_path / "w.gguf", tensor_bytes=64 * 1024, seed=3)
    digest = origin.add_hf("org/repo", "w.gguf", w, cdn=cdn, token="hf_t0ken", signature="s3cr3t")
    monkeypatch.setenv("MODELFS_HF_ENDPOINT", origin.origin)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    source = ModelSource.parse("hf://org/repo/w.gguf")
    manager = LocalModelDownloadManager(tmp_path / "cache")
    entry = manager.ensure_model(source, ModelLoadOptions(bearer_token="hf_t0ken"))  # no sha256: the hub's
    assert entry.sha256 == digest and entry.source_canonical_key == "hf://org/repo@main/w.gguf"
    raw = (Path(entry.file_path).parent / "metadata.json").read_text()
    assert "s3cr3t" not in raw and "hf_t0ken" not in raw
    # The token went to the hub's origin only, never across the redirect to the CDN's signed URL.
    blob = cdn.requests()
    assert blob and all("authorization" not in r.headers for r in blob)
