"""Signed packs end to end: envelopes and artifacts served by the fault server on
127.0.0.1, installed through ``store.packs`` (in process) and ``modelfs`` (subprocess).

The adversarial suite checks, for every refusal: the specific one-line reason, zero
artifact bytes served, blobs and catalog unchanged except one audit record.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import ssl
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import CLI, sha, wait_for
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs_store.core import Store
from modelfs_store.download import Downloader
from modelfs_store.errors import ArchiveError, Conflict, IntegrityError, ManifestError, StoreError, TrustError
from modelfs_store.keys import revoke_key, trust_key
from modelfs_store.packs import (
    CRASH_BEFORE_ACTIVATE,
    InstallResult,
    add_channel,
    install_pack,
    pull_pack_url,
    update_channels,
)
from test_archive import build_zip, member

SCHEMA = "modelfs.manifest/1"
FUTURE = "2099-01-01T00:00:00Z"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")



# ---------------------------------------------------------------- a publisher, with cryptography only


@dataclass
class Publisher:
    """Signs packs the way existing publisher tooling does: nothing but ``cryptography``."""

    server: FaultServer
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    artifact_paths: set[str] = field(default_factory=set)

    def key(self, key_id: str) -> Ed25519PrivateKey:
        if key_id not in self.keys:
            self.keys[key_id] = Ed25519PrivateKey.generate()
        return self.keys[key_id]

    def pub(self, key_id: str) -> str:
        raw = self.key(key_id).public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return b64(raw)

    def artifact(self, filename: str, data: bytes, role: str = "weights", *, path: str | None = None,
                 **extra: Any) -> dict[str, Any]:
        path = path or f"/a/{sha(data)[:16]}/{filename.replace('/', '_')}"
        self.server.add(path, data)
        self.artifact_paths.add(path)
        return {"filename": filename, "url": self.server.url(path), "sha256": sha(data), "size": len(data),
                "role": role, **extra}

    def payload(self, version: int, artifacts: list[dict[str, Any]], model_id: str = "demo",
                **overrides: Any) -> dict[str, Any]:
        body = {"schema": SCHEMA, "model_id": model_id, "version": version, "family": "llama",
                "context_len": 4096, "min_device": "cpu", "license": "apache-2.0",
                "source_url": "https://example.org/demo", "expires": FUTURE, "artifacts": artifacts}
        body.update(overrides)
        return body

    def envelope(self, payload: dict[str, Any] | bytes, key_id: str = "k1", signer: str | None = None) -> bytes:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        sig = self.key(signer or key_id).sign(raw)
        return json.dumps({"key_id": key_id, "payload_b64": b64(raw), "sig_b64": b64(sig)}).encode()

    def serve(self, name: str, data: bytes, **faults: Any) -> str:
        path = f"/p/{name}"
        self.server.add(path, data, content_type=faults.pop("content_type", "application/json"), **faults)
        return self.server.url(path)

    def artifact_bytes(self) -> int:
        return sum(self.server.bytes_sent(p) for p in self.artifact_paths)


def release(pub: Publisher, version: int, *, mmproj: bool = False, seed: str = "", model_id: str = "demo",
            key_id: str = "k1", signer: str | None = None, **overrides: Any) -> bytes:
    """An envelope for ``model_id`` ``version`` with distinct weights (and an mmproj),
    naming ``key_id`` and signed by ``signer`` (default: that key)."""
    tag = f"{model_id}-{version}{seed}".encode()
    arts = [pub.artifact(f"{model_id}-Q4_K_M.gguf", b"GGUF" + tag * 4000)]
    if mmproj:
        arts.append(pub.artifact(f"mmproj-{model_id}-f16.gguf", b"GGUF-proj" + tag * 1000, "mmproj"))
    return pub.envelope(pub.payload(version, arts, model_id=model_id, **overrides), key_id, signer)


@pytest.fixture
def pub(origin: FaultServer) -> Publisher:  # noqa: F811 - the fixture
    return Publisher(origin)


@pytest.fixture
def store(tmp_path: Path, pub: Publisher) -> Store:
    s = Store.open(tmp_path / "store")
    trust_key(s.catalog, "k1", pub.pub("k1"), actor="test")
    yield s
    s.close()


def run_install(store: Store, source: str | bytes, **kw: Any) -> InstallResult:
    async def main() -> InstallResult:
        async with Downloader(store.blobs, backoff=(0.0, 0.0), max_retries=1) as dl:
            if isinstance(source, str):
                return await pull_pack_url(store, dl, source, **kw)
            return await install_pack(store, dl, source, **kw)

    return trio.run(main)


@dataclass(frozen=True)
class Snapshot:
    tables: dict[str, list[tuple[Any, ...]]]
    blobs: list[str]
    quarantine: list[str]
    audit_ids: list[int]


def snapshot(store: Store) -> Snapshot:
    conn = sqlite3.connect(store.layout.catalog)
    try:
        tables = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall())  # noqa: S608 - fixed names
                  for t in ("models", "versions", "files", "version_floors", "keys", "channels", "pins")}
        audit = [r[0] for r in conn.execute("SELECT id FROM audit ORDER BY id")]
    finally:
        conn.close()
    blobs = sorted(p.name for p in store.layout.blobs.rglob("*") if p.is_file())
    quarantine = sorted(p.name for p in store.layout.quarantine.iterdir())
    return Snapshot(tables, blobs, quarantine, audit)


def last_audit(store: Store) -> dict[str, Any]:
    return store.catalog.audit_log(limit=1)[0]


def assert_refused_cleanly(store: Store, pub: Publisher, attempt: Callable[[], object],
                           exc_type: type[StoreError], reason: str, *, artifact_bytes: int | None = 0,
                           quarantined: bool = False) -> StoreError:
    """The refusal contract: one-line reason, no artifact byte, one audit record, nothing else."""
    before = snapshot(store)
    served_before = pub.artifact_bytes()
    with pytest.raises(exc_type) as info:
        attempt()
    exc = info.value
    assert exc.fields.get("reason") == reason, str(exc)
    message = str(exc)
    assert message and "\n" not in message and message == message.strip()
    if artifact_bytes is not None:
        assert pub.artifact_bytes() - served_before == artifact_bytes
    after = snapshot(store)
    assert after.tables == before.tables, "a refusal changed the catalog"
    assert after.blobs == before.blobs, "a refusal added or removed blobs"
    if not quarantined:
        assert after.quarantine == before.quarantine
    assert len(after.audit_ids) == len(before.audit_ids) + 1, "exactly one audit record per refusal"
    rec = last_audit(store)
    assert (rec["action"], rec["outcome"], rec["reason"]) == ("refuse", "refused", message)
    return exc


# ---------------------------------------------------------------- acceptance 1


def test_plain_cryptography_envelope_verifies_and_installs(store: Store, pub: Publisher) -> None:
    arts = [pub.artifact("demo-Q4_K_M.gguf", os.urandom(300_000)),
            pub.artifact("mmproj-demo-f16.gguf", os.urandom(30_000), "mmproj")]
    payload = json.dumps(pub.payload(1, arts)).encode()
    good = pub.envelope(payload)

    # One payload byte changed, signature kept: refused before any download.
    env = json.loads(good)
    raw = bytearray(base64.b64decode(env["payload_b64"]))
    raw[raw.index(b'"llama"') + 1] ^= 0x20  # "llama" -> "Llama"
    env["payload_b64"] = b64(bytes(raw))
    tampered = json.dumps(env).encode()
    exc = assert_refused_cleanly(store, pub, lambda: run_install(store, pub.serve("tampered.json", tampered)),
                                 TrustError, "bad-signature")
    assert "signature does not verify" in str(exc)

    res = run_install(store, pub.serve("good.json", good))
    assert (res.model, res.version, res.outcome, res.activated) == ("demo", 1, "installed", True)
    assert res.bytes_downloaded == 330_000 == pub.artifact_bytes()
    assert res.payload_sha256 == sha(payload)
    shown = store.show("demo")
    assert shown["active_version"] == 1 and shown["signed"] and shown["key_id"] == "k1"
    assert [(f["filename"], f["role"], f["state"]) for f in shown["files"]] == [
        ("demo-Q4_K_M.gguf", "weights", "local"), ("mmproj-demo-f16.gguf", "mmproj", "local")]
    v = store.catalog.get_version("demo", 1)
    assert all(f.url and f.url.startswith(pub.server.origin) and f.etag for f in v.files)
    for f in v.files:
        assert store.blobs.path(f.sha256).read_bytes() == pub.server.resources[
            next(p for p in pub.artifact_paths if pub.server.url(p) == f.url)].data
    assert [a["action"] for a in reversed(store.catalog.audit_log())][-3:] == ["refuse", "accept", "activate"]


# ---------------------------------------------------------------- the adversarial suite


def _sloppy_b64(pub: Publisher) -> bytes:
    env = json.loads(release(pub, 3))
    env["payload_b64"] = env["payload_b64"].rstrip("=") if env["payload_b64"].endswith("=") else \
        env["payload_b64"][:20] + "\n" + env["payload_b64"][20:]
    return json.dumps(env).encode()


def _duplicate_keys(pub: Publisher) -> bytes:
    art = pub.artifact("dup.gguf", b"dup" * 100)
    body = json.dumps(pub.payload(3, [art]))
    raw = body.replace('"family": "llama"', '"family": "llama", "family": "other"').encode()
    return pub.envelope(raw)


def _tampered(pub: Publisher) -> bytes:
    env = json.loads(release(pub, 3))
    payload = base64.b64decode(env["payload_b64"]).replace(b'"version": 3', b'"version": 4')
    env["payload_b64"] = b64(payload)
    return json.dumps(env).encode()


def _bad_filename(name: str) -> Callable[[Publisher], bytes]:
    def make(pub: Publisher) -> bytes:
        art = pub.artifact(name, b"evil" * 100)
        return pub.envelope(pub.payload(3, [art]))
    return make


HTML = b"<!DOCTYPE html><html><head><title>Sign in to Hotel WiFi</title></head><body>...</body></html>"

# (id, envelope maker, (served faults), exception type, reason)
ADVERSARIAL: list[tuple[str, Callable[[Publisher], bytes], dict[str, Any], type[StoreError], str]] = [
    ("wrong-key", lambda p: release(p, 3, signer="mallory"), {}, TrustError, "bad-signature"),
    ("unknown-key-id", lambda p: release(p, 3, key_id="stranger"), {}, TrustError, "unknown-key"),
    ("revoked-key", lambda p: release(p, 3, key_id="old"), {}, TrustError, "revoked-key"),
    ("tampered-payload", _tampered, {}, TrustError, "bad-signature"),
    ("sloppy-base64", _sloppy_b64, {}, ManifestError, "bad-base64"),
    ("duplicate-json-keys", _duplicate_keys, {}, ManifestError, "duplicate-key"),
    ("oversized", lambda p: b'{"key_id": "k1", "payload_b64": "' + b"A" * (1 << 20) + b'", "sig_b64": ""}',
     {}, ManifestError, "too-large"),
    ("captive-portal-html", lambda p: HTML, {"content_type": "text/html"}, ManifestError, "html"),
    ("older-version-replayed", lambda p: release(p, 1), {}, TrustError, "rollback"),
    ("same-version-other-content", lambda p: release(p, 2, seed="-evil"), {}, TrustError,
     "version-content-mismatch"),
    ("expired", lambda p: release(p, 3, expires="2001-01-01T00:00:00Z"), {}, TrustError, "expired"),
    ("unknown-schema", lambda p: release(p, 3, schema="modelfs.manifest/99"), {}, ManifestError, "unknown-schema"),
    ("filename-dotdot-x", _bad_filename("../x"), {}, ManifestError, "bad-filename"),
    ("filename-a-slash-b", _bad_filename("a/b"), {}, ManifestError, "bad-filename"),
    ("filename-absolute", _bad_filename("/abs"), {}, ManifestError, "bad-filename"),
    ("filename-nul", _bad_filename("x\x00y"), {}, ManifestError, "bad-filename"),
    ("filename-dotdot", _bad_filename(".."), {}, ManifestError, "bad-filename"),
]


@pytest.mark.parametrize(("make", "faults", "exc_type", "reason"), [c[1:] for c in ADVERSARIAL],
                         ids=[c[0] for c in ADVERSARIAL])
def test_adversarial_pack_is_refused_cleanly(store: Store, pub: Publisher, make: Callable[[Publisher], bytes],
                                             faults: dict[str, Any], exc_type: type[StoreError],
                                             reason: str) -> None:
    # A store with history: v2 active (so replays have a floor), and a revoked key.
    trust_key(store.catalog, "old", pub.pub("old"), actor="test")
    revoke_key(store.catalog, "old", actor="test")
    run_install(store, pub.serve("v2.json", release(pub, 2)))
    url = pub.serve("attack.json", make(pub), **faults)
    exc = assert_refused_cleanly(store, pub, lambda: run_install(store, url), exc_type, reason)
    assert "manifest refused: " in str(exc)
    assert store.catalog.get_model("demo").active_version == 2


def test_oversized_local_envelope_is_refused_before_parsing(store: Store, pub: Publisher) -> None:
    data = b"{" + b" " * (1 << 20) + b"}"
    assert_refused_cleanly(store, pub, lambda: run_install(store, data), ManifestError, "too-large")


def test_mix_and_match_artifact_is_caught_by_the_final_hash(store: Store, pub: Publisher) -> None:
    """The payload names release A's weights; the URL serves release B's. The hash
    check quarantines them, the projector fetched before is dropped, nothing is active."""
    weights_a, weights_b = b"release-A" * 5000, b"release-B" * 5000
    proj = pub.artifact("mmproj-demo.gguf", b"projector" * 500, "mmproj")
    path = "/a/mixed/demo.gguf"
    pub.server.add(path, weights_b)
    pub.artifact_paths.add(path)
    mixed = {"filename": "demo.gguf", "url": pub.server.url(path), "sha256": sha(weights_a),
             "size": len(weights_b), "role": "weights"}
    url = pub.serve("mixed.json", pub.envelope(pub.payload(1, [proj, mixed])))
    before = snapshot(store)
    with pytest.raises(IntegrityError) as info:
        run_install(store, url)
    exc = info.value
    assert "SHA-256 mismatch" in str(exc) and "\n" not in str(exc)
    after = snapshot(store)
    assert after.tables == before.tables and after.blobs == before.blobs
    assert len(after.quarantine) > len(before.quarantine), "the mismatching bytes were quarantined"
    assert not store.catalog.has_model("demo")
    rec = last_audit(store)
    assert (rec["action"], rec["outcome"], rec["reason"]) == ("refuse", "refused", str(exc))


# ---------------------------------------------------------------- archives


def _zip(entries: dict[str, bytes], *, deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _symlink_zip() -> bytes:
    link = zipfile.ZipInfo("model.mil")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(link, "/etc/shadow")
    return buf.getvalue()


def _overlapping_zip() -> bytes:
    shared = member("a.bin", os.urandom(1000))
    alias = member("b.bin", shared.data)
    alias.offset = 0
    return build_zip([shared], central=[shared, alias])


ZIP_CORPUS = [
    ("traversal", lambda: _zip({"ok.txt": b"x", "../../outside.txt": b"x"}), "traversal"),
    ("absolute", lambda: build_zip([member("/etc/evil", b"x")]), "absolute-path"),
    ("symlink", _symlink_zip, "link"),
    ("case-colliding", lambda: build_zip([member("w/Weights.bin", b"a"), member("W/weights.BIN", b"b")]),
     "duplicate-name"),
    ("ratio-bomb", lambda: _zip({"zeros.bin": b"\x00" * (4 << 20)}, deflate=True), "ratio"),
    ("too-many-entries", lambda: build_zip([member(f"f{i}", b"") for i in range(10_001)]), "too-many-entries"),
    ("overlapping", _overlapping_zip, "overlap"),
]


@pytest.mark.parametrize(("make", "reason"), [c[1:] for c in ZIP_CORPUS], ids=[c[0] for c in ZIP_CORPUS])
def test_malicious_archive_is_refused_with_nothing_added(store: Store, pub: Publisher,
                                                        make: Callable[[], bytes], reason: str) -> None:
    arts = [pub.artifact("demo.gguf", b"weights" * 1000),
            pub.artifact("Demo.mlmodelc.zip", make(), "archive")]
    url = pub.serve("zip.json", pub.envelope(pub.payload(1, arts)))
    exc = assert_refused_cleanly(store, pub, lambda: run_install(store, url), ArchiveError, reason,
                                 artifact_bytes=None)
    assert str(exc).startswith("archive ")
    assert list(store.layout.tmp.iterdir()) == [], "extraction left something in tmp/"


def test_archive_materialises_as_a_tree_of_deduplicated_blobs(store: Store, pub: Publisher) -> None:
    weight = os.urandom(100_000)
    tree = {"model.mil": b"program(1.0)\n" * 50, "weights/weight.bin": weight, "metadata.json": b"{}"}
    zipped = _zip(tree)
    arts = [pub.artifact("demo.gguf", weight), pub.artifact("Demo.mlmodelc.zip", zipped, "archive")]
    res = run_install(store, pub.serve("good-zip.json", pub.envelope(pub.payload(1, arts))))
    names = {f.filename: f for f in res.files}
    assert sorted(names) == ["Demo.mlmodelc/metadata.json", "Demo.mlmodelc/model.mil",
                             "Demo.mlmodelc/weights/weight.bin", "demo.gguf"]
    assert {f.role for n, f in names.items() if n.startswith("Demo.mlmodelc/")} == {"aux"}
    for name, data in tree.items():
        assert store.blobs.path(names[f"Demo.mlmodelc/{name}"].sha256).read_bytes() == data
    # weights/weight.bin has the same bytes as demo.gguf: one blob. The zip is not kept.
    assert names["Demo.mlmodelc/weights/weight.bin"].sha256 == names["demo.gguf"].sha256
    assert not store.blobs.has(sha(zipped))
    assert sorted(store.blobs.iter_blobs()) == sorted({f.sha256 for f in res.files})
    assert res.new_bytes == sum({f.sha256: f.size for f in res.files}.values())
    assert list(store.layout.tmp.iterdir()) == []

    # Pulling the same pack again downloads nothing, not even the zip.
    pub.server.reset_counts()
    again = run_install(store, pub.serve("good-zip.json", pub.envelope(pub.payload(1, arts))))
    assert (again.outcome, again.bytes_downloaded, pub.artifact_bytes()) == ("already-active", 0, 0)


def test_only_this_platforms_artifacts_are_fetched(store: Store, pub: Publisher) -> None:
    arts = [pub.artifact("demo.gguf", b"w" * 1000),
            pub.artifact("linux.bin", b"l" * 10, "aux", platform="linux"),
            pub.artifact("Demo.mlmodelc.zip", _zip({"a": b"mac"}), "archive", platform="macos")]
    res = run_install(store, pub.serve("plat.json", pub.envelope(pub.payload(1, arts))), platform="linux")
    assert [f.filename for f in res.files] == ["demo.gguf", "linux.bin"]
    assert res.bytes_downloaded == 1010


def test_pack_for_another_platform_only_is_refused(store: Store, pub: Publisher) -> None:
    arts = [pub.artifact("Demo.mlmodelc.zip", _zip({"a": b"mac"}), "archive", platform="macos")]
    url = pub.serve("mac.json", pub.envelope(pub.payload(1, arts)))
    assert_refused_cleanly(store, pub, lambda: run_install(store, url, platform="linux"), ManifestError,
                           "no-artifacts")


def test_signed_pack_cannot_take_over_an_imported_model(store: Store, pub: Publisher, tmp_path: Path) -> None:
    from ggufgen import write_model

    weights = tmp_path / "w.gguf"
    write_model(weights, tensor_bytes=4096)
    store.import_model("demo", weights)
    url = pub.serve("v1.json", release(pub, 1))
    exc = assert_refused_cleanly(store, pub, lambda: run_install(store, url), Conflict, "unsigned-model")
    assert "unsigned" in str(exc)


def test_an_unsigned_import_or_pull_cannot_add_to_a_signed_model(store: Store, pub: Publisher,
                                                                 tmp_path: Path) -> None:
    from ggufgen import write_model
    from modelfs_store.pull import PullSource, pull

    run_install(store, release(pub, 1))
    weights = write_model(tmp_path / "demo-Q4_K_M.gguf", tensor_bytes=4096)
    with pytest.raises(Conflict, match="holds signed version") as exc:
        store.import_model("demo", weights)
    assert not store.blobs.has(sha(weights.read_bytes()))  # refused before a byte was copied
    assert exc.value.fields["reason"] == "signed-model"
    src = PullSource(pub.artifact("demo-Q4_K_M.gguf", weights.read_bytes())["url"], weights.name, "weights",
                     sha(weights.read_bytes()), weights.stat().st_size, source="test")

    async def unsigned_pull() -> None:
        async with Downloader(store.blobs, backoff=(0.0, 0.0), max_retries=1) as dl:
            await pull(store, dl, [src], name="demo")

    blobs_before = set(store.blobs.iter_blobs())
    with pytest.raises(Conflict, match="an unsigned pull cannot add to it"):
        trio.run(unsigned_pull)
    assert set(store.blobs.iter_blobs()) == blobs_before  # refused before a byte was fetched
    assert pub.server.bytes_sent(urlsplit(src.url).path) == 0
    assert [(v.version, v.signed) for v in store.catalog.versions("demo")] == [(1, True)]
    assert store.catalog.get_model("demo").active_version == 1


# ---------------------------------------------------------------- versions, rollback (acceptance 3, in process)


def test_already_installed_version_is_not_downloaded_and_does_not_undo_a_rollback(
        store: Store, pub: Publisher) -> None:
    v1, v2 = release(pub, 1), release(pub, 2, mmproj=True)
    run_install(store, v1)
    res = run_install(store, v2)
    assert (res.activated, res.previous_active, res.active_version) == (True, 1, 2)
    assert store.rollback("demo") == 1
    pub.server.reset_counts()
    again = run_install(store, v2)
    assert (again.outcome, again.bytes_downloaded, again.active_version) == ("already-installed", 0, 1)
    assert pub.artifact_bytes() == 0


def test_missing_blob_of_an_installed_version_is_fetched_again(store: Store, pub: Publisher) -> None:
    v1 = release(pub, 1, mmproj=True)
    first = run_install(store, v1)
    lost = first.files[0]
    store.blobs.remove(lost.sha256)
    again = run_install(store, v1)
    assert again.outcome == "already-active" and again.bytes_downloaded == lost.size
    assert store.blobs.has(lost.sha256)


def test_newer_version_installed_while_older_active_is_activated(store: Store, pub: Publisher) -> None:
    run_install(store, release(pub, 1))
    res = run_install(store, release(pub, 5))
    assert (res.previous_active, res.active_version) == (1, 5)
    m = store.catalog.get_model("demo")
    assert (m.active_version, m.last_good_version) == (5, 1)
    assert store.catalog.version_floor("demo")[0] == 5


def test_lazy_install_records_the_signed_version_and_fetches_nothing(store: Store, pub: Publisher) -> None:
    v1 = release(pub, 1, mmproj=True)
    res = run_install(store, v1, lazy=True)
    assert (res.outcome, res.active_version, res.bytes_downloaded, res.new_bytes) == ("installed", 1, 0, 0)
    assert sorted(res.dehydrated) == sorted(f.filename for f in res.files) and len(res.files) == 2
    assert pub.artifact_bytes() == 0
    v = store.catalog.get_version("demo", 1)
    assert v.signed and all(f.url and not store.blobs.has(f.sha256) for f in v.files)
    assert {store.file_state(f) for f in v.files} == {"dehydrated"}
    assert store.catalog.version_floor("demo")[0] == 1  # the floor is raised: the manifest was accepted
    # A later pull without --lazy fetches exactly the missing files, once.
    again = run_install(store, v1)
    assert again.outcome == "already-active" and again.dehydrated == ()
    assert pub.artifact_bytes() == sum(f.size for f in res.files)
    assert all(store.blobs.has(f.sha256) for f in v.files)


def test_lazy_install_still_checks_everything_before_recording(store: Store, pub: Publisher) -> None:
    run_install(store, release(pub, 2), lazy=True)
    with pytest.raises(TrustError):  # an older version is still a rollback attack
        run_install(store, release(pub, 1), lazy=True)
    with pytest.raises(TrustError):  # a key this store does not trust
        run_install(store, release(pub, 3, key_id="stranger"), lazy=True)
    assert [v.version for v in store.catalog.versions("demo")] == [2]


# ---------------------------------------------------------------- channels


def test_update_installs_newer_versions_from_channels(store: Store, pub: Publisher) -> None:
    trust_key(store.catalog, "other", pub.pub("other"), actor="test")
    url = pub.serve("channel.json", release(pub, 1))
    add_channel(store, url, ["k1"])

    def update() -> list[Any]:
        async def main() -> list[Any]:
            async with Downloader(store.blobs, backoff=(0.0, 0.0)) as dl:
                return await update_channels(store, dl)
        return trio.run(main)

    [r] = update()
    assert (r.outcome, r.message) == ("installed", "installed demo version 1 (active, a candidate)")
    [r] = update()
    assert r.outcome == "up-to-date"
    assert pub.server.requests("/p/channel.json") and len(pub.server.requests("/p/channel.json")) == 2

    pub.serve("channel.json", release(pub, 2, mmproj=True))
    [r] = update()
    assert r.outcome == "installed" and store.catalog.get_model("demo").active_version == 2

    # A trusted key the channel does not allow is refused, before any download.
    pub.serve("channel.json", release(pub, 3, key_id="other"))
    served = pub.artifact_bytes()
    [r] = update()
    assert r.outcome == "refused" and "may not sign packs from this channel" in r.message
    assert pub.artifact_bytes() == served
    [ch] = store.catalog.channels()
    assert ch["last_result"] == r.message and ch["last_checked"] is not None
    assert last_audit(store)["action"] == "refuse"

    # An older envelope served by the channel is a replay: refused, nothing changes.
    pub.serve("channel.json", release(pub, 1))
    [r] = update()
    assert r.outcome == "up-to-date"  # v1 is installed: not a downgrade, nothing to do
    assert store.catalog.get_model("demo").active_version == 2


def test_channel_url_must_not_carry_secrets(store: Store) -> None:
    from modelfs_store.errors import UsageError

    for bad in ("https://user:pw@example.org/c.json", "https://example.org/c.json?token=abc",
                "ftp://example.org/c.json"):
        with pytest.raises(UsageError):
            add_channel(store, bad, ["k1"])
    assert store.catalog.channels() == []


# ---------------------------------------------------------------- through the CLI


@pytest.fixture
def trusted_cli(cli: CLI, pub: Publisher) -> CLI:
    cli.run("keys", "add", "k1", pub.pub("k1"))
    return cli


def write_env(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def show(cli: CLI, name: str = "demo") -> dict[str, Any]:
    return cli.run("show", name, "--json").json()


def states(cli: CLI, name: str = "demo") -> dict[int, str]:
    return {v["version"]: v["state"] for v in show(cli, name)["versions"]}


def test_acceptance3_install_upgrade_rollback_replay(trusted_cli: CLI, pub: Publisher, tmp_path: Path) -> None:
    cli = trusted_cli
    # Versions 2 and 3 play "v1" and "v2"; "v0" is version 1, older than both (a
    # literal version 0 is not a valid manifest at all, also checked below).
    v0, v1, v2 = release(pub, 1), release(pub, 2), release(pub, 3, mmproj=True)
    cli.run("pull", pub.serve("v1.json", v1))
    cli.run("pull", write_env(tmp_path, "v2.json", v2))
    assert states(cli) == {2: "last-good", 3: "active"}
    d = show(cli)
    assert sorted(f["role"] for f in d["files"]) == ["mmproj", "weights"]

    out = cli.run("rollback", "demo").stdout
    assert "version 2" in out
    # Version 3 was rolled back from: installed, but not last-good (tests/test_versions.py).
    assert states(cli) == {2: "active", 3: "installed"}

    pub.server.reset_counts()
    r = cli.run("pull", pub.serve("v1.json", v1))
    assert "already active" in r.stdout and pub.artifact_bytes() == 0
    assert states(cli) == {2: "active", 3: "installed"}

    r = cli.run("pull", pub.serve("v0.json", v0), check=False)
    assert r.returncode == 7 and pub.artifact_bytes() == 0
    assert r.stderr.strip().startswith("modelfs: error: manifest refused: version 1 of 'demo' is older")
    assert len(r.stderr.strip().splitlines()) == 1
    audit = sqlite3.connect(cli.root / "catalog.db").execute(
        "SELECT action, outcome, reason FROM audit ORDER BY id").fetchall()
    actions = [a for a, _, _ in audit]
    assert actions.count("rollback") == 1 and actions.count("activate") == 2
    assert audit[-1][:2] == ("refuse", "refused") and "older" in audit[-1][2]

    r = cli.run("pull", pub.serve("zero.json", release(pub, 0)), check=False)
    assert r.returncode == 6 and "version 0 is out of range" in r.stderr and pub.artifact_bytes() == 0


@pytest.mark.parametrize(
    ("steps", "expect"),
    [
        # old key only: accepted while trusted, refused after revoke
        ([("add", "old"), ("pull", "old")], ["ok"]),
        ([("add", "old"), ("pull", "old"), ("revoke", "old"), ("pull", "old")], ["ok", "revoked-key"]),
        # old and new both trusted
        ([("add", "old"), ("add", "new"), ("pull", "old"), ("pull", "new")], ["ok", "ok"]),
        # new only, after the old one is revoked
        ([("add", "old"), ("add", "new"), ("revoke", "old"), ("pull", "new"), ("pull", "old")],
         ["ok", "revoked-key"]),
    ],
    ids=["old-only", "old-then-revoked", "old-and-new", "new-after-old-revoked"],
)
def test_key_rotation_through_the_cli(cli: CLI, pub: Publisher, tmp_path: Path,
                                      steps: list[tuple[str, str]], expect: list[str]) -> None:
    outcomes = []
    version = 0
    for verb, key_id in steps:
        if verb == "add":
            cli.run("keys", "add", key_id, pub.pub(key_id))
        elif verb == "revoke":
            cli.run("keys", "revoke", key_id)
        else:
            version += 1
            served = pub.artifact_bytes()
            r = cli.run("pull", pub.serve(f"{version}.json", release(pub, version, key_id=key_id)), check=False)
            if r.returncode == 0:
                outcomes.append("ok")
            else:
                assert r.returncode == 7 and pub.artifact_bytes() == served, r.stderr
                outcomes.append("revoked-key" if "is revoked" in r.stderr else r.stderr)
    assert outcomes == expect
    listed = {k["key_id"]: k["state"] for k in cli.run("keys", "list", "--json").json()}
    revoked = {k for v, k in steps if v == "revoke"}
    assert listed == {k: "revoked" if k in revoked else "trusted" for v, k in steps if v == "add"}


def test_acceptance4_kill_before_activation_then_rerun(trusted_cli: CLI, pub: Publisher, tmp_path: Path) -> None:
    cli = trusted_cli
    cli.run("pull", pub.serve("v1.json", release(pub, 1)))
    url = pub.serve("v2.json", release(pub, 2, mmproj=True))
    proc = cli.popen("pull", url, env={"MODELFS_CRASH_AT": CRASH_BEFORE_ACTIVATE})
    assert wait_for(lambda: proc.poll() is not None, what="the crash point") and proc.returncode == -9
    served = pub.artifact_bytes()
    assert served > 0

    # The previous version is still active and consistent; v2 is not visible.
    assert states(cli) == {1: "active"}
    assert all(v["status"] == "ok" for v in cli.run("verify", "--json").json())
    assert cli.run("keys", "list", "--json").json()[0]["state"] == "trusted"

    r = cli.run("pull", url)
    assert "version 2 active" in r.stdout
    assert pub.artifact_bytes() == served, "the rerun downloaded again"
    assert states(cli) == {1: "last-good", 2: "active"}
    assert all(v["status"] == "ok" for v in cli.run("verify", "--json").json())


def test_channels_and_update_through_the_cli(trusted_cli: CLI, pub: Publisher) -> None:
    cli = trusted_cli
    assert cli.run("update", check=False).returncode == 2  # no channels yet
    url = pub.serve("feed.json", release(pub, 1, mmproj=True))
    r = cli.run("channels", "add", url, "--key", "k1", "--key", "k-next")
    assert "k-next not trusted yet" in r.stderr
    [res] = cli.run("update", "--json").json()
    assert res["outcome"] == "installed" and res["install"]["name"] == "demo"
    [res] = cli.run("update", "--json").json()
    assert res["outcome"] == "up-to-date" and res["install"]["bytes_downloaded"] == 0
    [ch] = cli.run("channels", "list", "--json").json()
    assert ch["key_ids"] == ["k-next", "k1"] and ch["last_result"].startswith("up to date")
    assert states(cli) == {1: "active"}
    d = show(cli)
    assert d["source"] == url and d["signed"] and d["key_id"] == "k1"

    pub.serve("feed.json", b"<html><body>captive portal</body></html>", content_type="text/html")
    r = cli.run("update", check=False)
    assert r.returncode == 1 and "refused: manifest refused: not a manifest envelope (looks like HTML)" in r.stdout
    assert "checked: " in cli.run("channels", "list").stdout


def test_pull_lazy_through_the_cli(trusted_cli: CLI, pub: Publisher) -> None:
    cli = trusted_cli
    url = pub.serve("v1.json", release(pub, 1, mmproj=True))
    r = cli.run("pull", "--lazy", url)
    assert "version 1 active" in r.stdout and "2 of 2 file(s) not fetched yet" in r.stdout
    assert pub.artifact_bytes() == 0
    [row] = cli.run("list", "--json").json()
    assert row["name"] == "demo" and {f["state"] for f in row["files"]} == {"dehydrated"}
    assert "dehydrated" in cli.run("list").stdout
    # Not local but with a source: dehydrated, not lost.
    assert [v["status"] for v in cli.run("verify", "--json").json()] == ["dehydrated", "dehydrated"]
    # --lazy is for signed packs only: an unsigned source has nothing that vouches for it yet.
    r = cli.run("pull", "--lazy", pub.server.url("/x.gguf"), "--sha256", "0" * 64, check=False)
    assert r.returncode == 2 and "--lazy needs a signed pack" in r.stderr


def test_pull_of_a_pack_url_is_one_downloader_and_one_event_loop(store: Store, pub: Publisher,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``modelfs pull URL`` without --sha256: the store fetches URL as an envelope and
    installs the pack through the same Downloader, in one ``trio.run`` (in process)."""
    import logging
    import sys

    import modelfs.cli

    url = pub.serve("v1.json", release(pub, 1, mmproj=True))
    watched = {Downloader.__init__.__code__: "Downloader.__init__", trio.run.__code__: "trio.run"}
    calls: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in watched:
            calls.append(watched[frame.f_code])

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main() sets up logging for a whole process
    sys.setprofile(profile)
    try:
        code = modelfs.cli.main(["--store", str(store.layout.root), "pull", url])
    finally:
        sys.setprofile(None)
        root.handlers[:], root.level = handlers, level
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(calls) == ["Downloader.__init__", "trio.run"]
    assert out == "demo version 1 active: 2 file(s) verified, signed by k1\n"
    assert len(pub.server.requests("/p/v1.json")) == 1  # the envelope was fetched once
    v = store.catalog.get_version("demo", 1)
    assert v.signed and all(store.blobs.has(f.sha256) for f in v.files)
    assert store.catalog.get_model("demo").active_version == 1


def test_envelope_redirects_follow_the_downloader_rules(store: Store, pub: Publisher) -> None:
    from faultserver import FaultServer as Server
    from modelfs_store.errors import FetchError

    with Server() as cdn:
        cdn.add("/packs/v1.json", release(pub, 1), content_type="application/json")
        pub.server.add_redirect("/latest.json", cdn.url("/packs/v1.json"))
        res = run_install(store, pub.server.url("/latest.json"))
        assert res.outcome == "installed"
        assert store.catalog.get_version("demo", 1).card["source"] == pub.server.url("/latest.json")

    with Server(tls=True) as secure:
        secure.add_redirect("/pack.json", pub.serve("plain.json", release(pub, 2)))

        async def main() -> InstallResult:
            ctx = ssl.create_default_context(cafile=secure.ca_file)
            async with Downloader(store.blobs, verify=ctx, backoff=(0.0, 0.0)) as dl:
                return await pull_pack_url(store, dl, secure.url("/pack.json"))

        with pytest.raises(FetchError, match="refusing a redirect from https to plain http"):
            trio.run(main)
    rec = last_audit(store)
    assert (rec["action"], rec["outcome"]) == ("pull", "failed")
    assert store.catalog.get_model("demo").active_version == 1


def test_show_names_the_signing_key_and_the_version_states(trusted_cli: CLI, pub: Publisher) -> None:
    cli = trusted_cli
    cli.run("pull", pub.serve("1.json", release(pub, 1)))
    cli.run("pull", pub.serve("2.json", release(pub, 2)))
    out = cli.run("show", "demo").stdout
    assert "version 1  last-good  signed by k1" in out and "version 2  active  signed by k1" in out


def test_pull_private_makes_the_pack_and_an_unsigned_pull_private(trusted_cli: CLI, pub: Publisher,
                                                                   tmp_path: Path) -> None:
    cli = trusted_cli
    cli.run("pull", pub.serve("v1.json", release(pub, 1)), "--app", "org.example.A", "--private")
    d = show(cli)
    assert (d["visibility"], d["owner_app"]) == ("private", "org.example.A")
    w = tmp_path / "u.gguf"
    write_model(w, tensor_bytes=4096, seed=3)
    data = w.read_bytes()
    pub.server.add("/u.gguf", data)
    cli.run("pull", pub.server.url("/u.gguf"), "--sha256", sha(data), "--name", "u", "--private")
    u = show(cli, "u")
    assert (u["visibility"], u["owner_app"]) == ("private", None)


def test_update_check_reports_what_is_newer_and_fetches_nothing(trusted_cli: CLI, pub: Publisher) -> None:
    cli = trusted_cli
    url = pub.serve("feed.json", release(pub, 1))
    cli.run("channels", "add", url, "--key", "k1")
    pub.server.reset_counts()
    [res] = cli.run("update", "--check", "--json").json()
    assert res["outcome"] == "available" and "demo version 1" in res["message"] and res["install"] is None
    assert pub.artifact_bytes() == 0 and not cli.run("list", "--json").json()
    [ch] = cli.run("channels", "list", "--json").json()
    assert ch["last_checked"] is None  # a check records nothing
    cli.run("update")
    pub.server.reset_counts()
    [res] = cli.run("update", "--check", "--json").json()
    assert res["outcome"] == "up-to-date" and pub.artifact_bytes() == 0
