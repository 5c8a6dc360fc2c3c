"""``modelfs adopt`` (store/adopt.py, store/caches.py): other tools' caches, built here in
each tool's real layout, taken into the store without a second copy on disk.

    Hugging Face  models--ORG--REPO/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
                  refs/main}
    Ollama        manifests/<registry>/<ns>/<name>/<tag> (JSON layers) + blobs/sha256-<hex>
    LM Studio     <models>/<publisher>/<repo>/*.gguf (a projector beside the weights)

The store is on the same (ext4) file system as the caches: no reflinks there, so the
content-addressed blobs come in as hard links, and what else is asked needs --copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI, REPO, sha_file, thaw_tree
from ggufgen import write_mmproj, write_model, write_split
from modelfs_store import seal
from modelfs_store.catalog import Catalog
from modelfs_store.core import Store

MiB = 1 << 20
NOBODY = 65534
ROOT = os.geteuid() == 0
COMMIT = "a" * 40


# -- the caches, in each tool's real layout ------------------------------------------------
def hf_repo(cache: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """``files`` (name in the repo -> a written GGUF, moved in) as huggingface_hub leaves them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    for rel, src in files.items():
        sha = sha_file(src)
        shutil.move(src, repo / "blobs" / sha)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / sha, link.parent))
    return repo


def git_blob_repo(cache: Path, src: Path) -> tuple[Path, str]:
    """``acme/Git-GGUF`` holding ``src`` (moved in) as the hub keeps a small file in git,
    not LFS: its blob named by git's SHA-1. Returns the repo folder and that name."""
    data = src.read_bytes()
    oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    repo = cache / "models--acme--Git-GGUF"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    os.replace(src, repo / "blobs" / oid)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "Git-Q4_0.gguf").symlink_to(f"../../blobs/{oid}")
    return repo, oid


def ollama_model(models: Path, ref: str, tag: str, weights: Path, projector: Path | None = None) -> Path:
    """``ref`` (registry/namespace/name) at ``tag`` as ``ollama pull`` leaves it: blobs
    named sha256-<hex>, and a manifest with template and params layers too."""
    blobs = models / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = []

    def blob(path: Path | None, media: str, data: bytes | None = None) -> dict[str, object]:
        if path is None:
            path = blobs / "incoming"
            path.write_bytes(data or b"")
        sha = sha_file(path)
        size = path.stat().st_size
        os.replace(path, blobs / f"sha256-{sha}")
        return {"mediaType": media, "digest": f"sha256:{sha}", "size": size}

    layers.append(blob(weights, "application/vnd.ollama.image.model"))
    if projector is not None:
        layers.append(blob(projector, "application/vnd.ollama.image.projector"))
    layers.append(blob(None, "application/vnd.ollama.image.template", b"{{ .Prompt }}"))
    layers.append(blob(None, "application/vnd.ollama.image.params", b'{"stop": ["<|end|>"]}'))
    config = blob(None, "application/vnd.docker.container.image.v1+json", b'{"model_format": "gguf"}')
    manifest = models / "manifests" / ref / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2,
                                    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                    "config": config, "layers": layers}))
    return manifest


def lmstudio_repo(models: Path, repo: str, files: dict[str, Path]) -> Path:
    d = models / repo
    d.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        os.replace(src, d / name)
    return d


def state(top: Path) -> dict[str, tuple[object, ...]]:
    """Every name below ``top``: a link and its target, a file's SHA-256 and mode, a directory."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(top))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", sha_file(p), stat.S_IMODE(st.st_mode))
    return out


def changes(before: dict[str, tuple[object, ...]], after: dict[str, tuple[object, ...]]) -> dict[str, object]:
    """What differs, but for a file made 0444 with the same bytes (a hard-linked blob)."""
    out: dict[str, object] = {}
    for k in before.keys() | after.keys():
        b, a = before.get(k), after.get(k)
        if b == a:
            continue
        if b and a and b[0] == a[0] == "file" and b[1] == a[1] and a[2] == 0o444:
            continue
        out[k] = (b, a)
    return out


def allocated(*tops: Path) -> int:
    """Bytes allocated to the files below ``tops``, each inode once (as du counts)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for top in tops:
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


@pytest.fixture
def caches(tmp_path: Path) -> dict[str, Path]:
    """A home with all three tools' caches at their default places, ~60 MiB adopted."""
    home = tmp_path / "home"
    gen = tmp_path / "gen"
    gen.mkdir()
    hub = home / ".cache" / "huggingface" / "hub"
    hf_repo(hub, "acme/Tiny-GGUF", {
        "Tiny-Q4_K_M.gguf": write_model(gen / "q4", tensor_bytes=24 * MiB, seed=1, file_type=15),
        "Tiny-Q8_0.gguf": write_model(gen / "q8", tensor_bytes=20 * MiB, seed=2, file_type=7),
        "mmproj-Tiny-f16.gguf": write_mmproj(gen / "mm", tensor_bytes=4 * MiB, seed=3),
    })
    split = write_split(gen, "Big-Q4_K_M", 3, tensor_bytes=64 * 1024, seed=4)
    hf_repo(hub, "acme/Big-GGUF", {f"Q4_K_M/{p.name}": p for p in split})
    ollama = home / ".ollama" / "models"
    ollama_model(ollama, "registry.ollama.ai/library/tinyvision", "latest",
                 write_model(gen / "ow", tensor_bytes=10 * MiB, seed=5),
                 write_mmproj(gen / "op", tensor_bytes=2 * MiB, seed=6))
    lms = home / ".lmstudio" / "models"
    lmstudio_repo(lms, "lmstudio-community/Small-GGUF", {
        "Small-Q4_K_M.gguf": write_model(gen / "s", tensor_bytes=256 * 1024, seed=7),
        "mmproj-Small-F16.gguf": write_mmproj(gen / "sm", tensor_bytes=64 * 1024, seed=8),
    })
    return {"home": home, "hf": hub, "ollama": ollama, "lmstudio": lms}


def home_env(home: Path) -> dict[str, str | None]:
    return {"HOME": str(home), "HF_HUB_CACHE": None, "HF_HOME": None, "OLLAMA_MODELS": None}


def by_name(result: dict) -> dict[str, dict]:
    return {m["name"]: m for m in result["models"]}


# -- acceptance ---------------------------------------------------------------------------------
def test_adopting_the_three_caches_adds_every_model_with_its_mmproj_and_no_second_copy(cli: CLI, caches) -> None:
    env = home_env(caches["home"])
    before = {k: state(caches[k]) for k in ("hf", "ollama", "lmstudio")}
    blobs = cli.root / "blobs"

    plan = cli.run("adopt", "--dry-run", "--json", env=env).json()
    assert plan["dry_run"] and {p["tool"]: p["found"] for p in plan["places"]} == \
        {"hf": True, "ollama": True, "lmstudio": True}
    models = by_name(plan)
    assert set(models) == {"Tiny-Q4_K_M", "Tiny-Q8_0", "Big-Q4_K_M", "tinyvision-latest", "Small-Q4_K_M"}
    for name in ("Tiny-Q4_K_M", "Tiny-Q8_0", "Big-Q4_K_M", "tinyvision-latest"):
        assert models[name]["status"] == "planned" and models[name]["cost_bytes"] == 0
        methods = {f["filename"]: f["method"] for f in models[name]["files"]}
        # The projector both quants share comes in once: for the second it is present by then.
        assert methods == {**dict.fromkeys(methods, "hardlink"),
                           **({"mmproj-Tiny-f16.gguf": "present"} if name == "Tiny-Q8_0" else {})}, models[name]
    # LM Studio's files are not blobs named by their hash: never hard-linked, and no copy unasked.
    small = models["Small-Q4_K_M"]
    assert small["status"] == "skipped" and "needs --copy" in small["reason"]
    assert {f["method"] for f in small["files"]} == {"needs-copy"}
    assert "rewrite" in small["files"][0]["reason"]
    assert plan["cost_bytes"] == 0 and plan["saved_bytes"] > 40 * MiB
    # The dry run changed nothing.
    assert cli.run("list", "--json").json() == []
    assert {k: state(caches[k]) for k in before} == before
    assert not [p for p in blobs.rglob("*") if p.is_file()]

    disk_before = allocated(blobs, caches["home"])
    done = cli.run("adopt", "--json", env=env).json()
    models = by_name(done)
    adopted = {n for n, m in models.items() if m["status"] == "adopted"}
    assert adopted == {"Tiny-Q4_K_M", "Tiny-Q8_0", "Big-Q4_K_M", "tinyvision-latest"}
    assert all(f["method"] == "hardlink" for n in ("Tiny-Q4_K_M", "tinyvision-latest") for f in models[n]["files"])
    adopted_bytes = sum({f["sha256"]: f["size"] for n in adopted for f in models[n]["files"]}.values())
    assert adopted_bytes > 40 * MiB

    # Less than 1 MiB on disk per GiB adopted: the blobs share the caches' inodes. What grows
    # is ext4's xattr block (4 KiB) of each blob's user.modelfs.sha256, a cost per file.
    grown = allocated(blobs, caches["home"]) - disk_before
    assert grown < adopted_bytes / 1024, (grown, adopted_bytes)
    assert done["saved_bytes"] == adopted_bytes and done["cost_bytes"] == 0

    # Every model with its projector, its source and where on the hub it came from.
    listed = {m["name"]: m for m in cli.run("list", "--json").json()}
    assert set(listed) == adopted
    roles = {n: sorted((f["role"], f["filename"]) for f in m["files"]) for n, m in listed.items()}
    assert roles["Tiny-Q4_K_M"] == [("mmproj", "mmproj-Tiny-f16.gguf"), ("weights", "Tiny-Q4_K_M.gguf")]
    assert roles["Tiny-Q8_0"] == [("mmproj", "mmproj-Tiny-f16.gguf"), ("weights", "Tiny-Q8_0.gguf")]
    assert roles["tinyvision-latest"] == [("mmproj", "mmproj-tinyvision-latest.gguf"),
                                          ("weights", "tinyvision-latest.gguf")]
    assert roles["Big-Q4_K_M"] == [("shard", "Big-Q4_K_M-00002-of-00003.gguf"),
                                   ("shard", "Big-Q4_K_M-00003-of-00003.gguf"),
                                   ("weights", "Big-Q4_K_M-00001-of-00003.gguf")]
    show = cli.run("show", "Tiny-Q4_K_M", "--json").json()
    assert (show["source"], show["hub_repo"], show["hub_commit"], show["quantization"]) == \
        ("hf://acme/Tiny-GGUF", "acme/Tiny-GGUF", COMMIT, "Q4_K_M")
    assert cli.run("show", "tinyvision-latest", "--json").json()["source"] == \
        "ollama://registry.ollama.ai/library/tinyvision:latest"
    cat = Catalog(cli.root / "catalog.db")
    try:
        hub_paths = {f.filename: f.hub_path for f in cat.get_version("Big-Q4_K_M", 1).files}
    finally:
        cat.close()
    assert hub_paths["Big-Q4_K_M-00002-of-00003.gguf"] == "Q4_K_M/Big-Q4_K_M-00002-of-00003.gguf"

    # The caches are as they were, but for the 0444 of the blobs now shared with the store.
    after = {k: state(caches[k]) for k in before}
    assert {k: changes(before[k], after[k]) for k in before} == {"hf": {}, "ollama": {}, "lmstudio": {}}
    q4_blob = caches["hf"] / "models--acme--Tiny-GGUF" / "blobs" / show["files"][1]["sha256"]
    assert stat.S_IMODE(q4_blob.stat().st_mode) == 0o444 and q4_blob.stat().st_nlink == 2

    # The adopted models read back: verify re-hashes every blob.
    assert [r["status"] for r in cli.run("verify", "--json").json()] == ["ok"] * 9

    # Again: everything is already there.
    again = by_name(cli.run("adopt", "--json", env=env).json())
    assert {n: m["reason"] for n, m in again.items() if n != "Small-Q4_K_M"} == \
        {n: f"already adopted as {n}" for n in adopted}


def test_copy_takes_what_cannot_be_linked_and_an_lmstudio_settings_folder_is_found(cli: CLI, tmp_path: Path) -> None:
    home = tmp_path / "home"
    elsewhere = tmp_path / "lms-models"
    (home / ".lmstudio").mkdir(parents=True)
    (home / ".lmstudio" / "settings.json").write_text(json.dumps({"downloadsFolder": str(elsewhere)}))
    gen = tmp_path / "gen"
    gen.mkdir()
    lmstudio_repo(elsewhere, "bartowski/Small-GGUF", {
        "Small-Q4_K_M.gguf": write_model(gen / "s", tensor_bytes=2 * MiB, seed=7),
        "mmproj-Small-f16.gguf": write_mmproj(gen / "sm", tensor_bytes=64 * 1024, seed=8),
    })
    before = state(elsewhere)
    r = cli.run("adopt", "--from", "lmstudio", "--copy", "--json", env=home_env(home)).json()
    assert r["places"] == [{"tool": "lmstudio", "path": str(elsewhere), "found": True,
                            "reason": f"downloadsFolder in {home / '.lmstudio' / 'settings.json'}"}]
    [m] = r["models"]
    assert (m["name"], m["status"]) == ("Small-Q4_K_M", "adopted")
    assert {f["method"] for f in m["files"]} == {"copy"} and m["cost_bytes"] > 2 * MiB
    show = cli.run("show", "Small-Q4_K_M", "--json").json()
    assert (show["hub_repo"], show["hub_commit"]) == ("bartowski/Small-GGUF", None)
    assert state(elsewhere) == before  # copied: not even a mode changed
    for f in show["files"]:
        assert os.stat(cli.root / "blobs" / "sha256" / f["sha256"][:2] / f["sha256"]).st_nlink == 1


def test_a_corrupt_cache_file_is_reported_and_skipped_and_the_others_adopted(cli: CLI, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    gen = tmp_path / "gen"
    gen.mkdir()
    repo = hf_repo(hub, "acme/Tiny-GGUF", {
        "Tiny-Q4_K_M.gguf": write_model(gen / "q4", tensor_bytes=MiB, seed=1),
        "Tiny-Q8_0.gguf": write_model(gen / "q8", tensor_bytes=MiB, seed=2, file_type=7),
    })
    bad = repo / "blobs" / sha_file(repo / "snapshots" / COMMIT / "Tiny-Q8_0.gguf")
    with open(bad, "r+b") as f:  # rot one byte of the tensor data, past the header
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = state(hub)
    r = cli.run("adopt", "--from", "hf", "--json", check=False, env={"HF_HUB_CACHE": str(hub)})
    assert r.returncode == 5
    models = by_name(r.json())
    assert models["Tiny-Q4_K_M"]["status"] == "adopted"
    assert models["Tiny-Q8_0"]["status"] == "failed" and "SHA-256 mismatch" in models["Tiny-Q8_0"]["reason"]
    assert bad.name in models["Tiny-Q8_0"]["reason"] or "Tiny-Q8_0.gguf" in models["Tiny-Q8_0"]["reason"]
    assert [m["name"] for m in cli.run("list", "--json").json()] == ["Tiny-Q4_K_M"]
    assert changes(before, state(hub)) == {}
    assert stat.S_IMODE(bad.stat().st_mode) == 0o644 and bad.stat().st_nlink == 1  # never linked, never chmodded
    # Nothing of the failed model stays in the store.
    assert sorted(p.name for p in (cli.root / "blobs").rglob("*") if p.is_file()) == \
        [cli.run("show", "Tiny-Q4_K_M", "--json").json()["files"][0]["sha256"]]

    # The text output says it too.
    r = cli.run("adopt", "--from", "hf", check=False, env={"HF_HUB_CACHE": str(hub)})
    assert r.returncode == 5 and "not adopted: Tiny-Q8_0" in r.stderr and "SHA-256 mismatch" in r.stderr

    # Ollama: a blob whose bytes are not its digest, a layer whose size is not the blob's.
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/good", "1", write_model(gen / "g", tensor_bytes=MiB, seed=80))
    rotten = ollama_model(ollama, "registry.ollama.ai/library/rotten", "1",
                          write_model(gen / "r", tensor_bytes=MiB, seed=81))
    short = ollama_model(ollama, "registry.ollama.ai/library/short", "1",
                         write_model(gen / "s", tensor_bytes=MiB, seed=82))
    digest = json.loads(rotten.read_text())["layers"][0]["digest"].split(":")[1]
    with open(ollama / "blobs" / f"sha256-{digest}", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    doc = json.loads(short.read_text())
    doc["layers"][0]["size"] += 1
    short.write_text(json.dumps(doc))
    before = state(ollama)
    r = cli.run("adopt", "--from", "ollama", "--json", check=False, env={"OLLAMA_MODELS": str(ollama)})
    assert r.returncode == 5, r.stdout
    models = by_name(r.json())
    assert (models["good-1"]["status"], models["rotten-1"]["status"]) == ("adopted", "failed")
    assert "SHA-256 mismatch" in models["rotten-1"]["reason"] and digest in models["rotten-1"]["reason"]
    assert "short-1" not in models
    [refusal] = r.json()["refused"]
    assert refusal["reason"].endswith(" bytes, its manifest says " + str(int(refusal["reason"].split()[0]) + 1))
    assert changes(before, state(ollama)) == {}


def test_another_owner_or_file_system_is_not_hard_linked_nor_copied_unasked(cli: CLI, tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/theirs", "7b", write_model(gen / "w", tensor_bytes=MiB, seed=9))
    blob = next(p for p in (ollama / "blobs").iterdir() if p.stat().st_size > MiB)
    other_owner = ROOT
    if other_owner:
        os.chown(blob, NOBODY, NOBODY)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:  # another file system (tmpfs)
        hub = Path(shm) / "hub"
        hf_repo(hub, "acme/Far-GGUF", {"Far-Q4_0.gguf": write_model(gen / "far", tensor_bytes=256 * 1024, seed=10)})
        env = {"OLLAMA_MODELS": str(ollama), "HF_HUB_CACHE": str(hub)}
        before = {"o": state(ollama), "h": state(hub)}
        r = cli.run("adopt", "--from", "ollama", "--from", "hf", "--json", env=env).json()
        models = by_name(r)
        far = models["Far-Q4_0"]
        assert far["status"] == "skipped" and far["files"][0]["reason"] == "on another file system than the store"
        if other_owner:
            theirs = models["theirs-7b"]
            assert theirs["status"] == "skipped" and theirs["files"][0]["method"] == "needs-copy"
            assert theirs["files"][0]["reason"] == f"owned by uid {NOBODY}, not by the store's owner (uid 0)"
        assert not [p for p in (cli.root / "blobs").rglob("*") if p.is_file()]  # nothing copied unasked
        assert cli.run("list", "--json").json() == ([] if other_owner else [cli.run("list", "--json").json()[0]])

        r = cli.run("adopt", "--from", "ollama", "--from", "hf", "--copy", "--json", env=env).json()
        copied = {m["name"]: {f["method"] for f in m["files"]} for m in r["models"] if m["status"] == "adopted"}
        assert copied == {"Far-Q4_0": {"copy"}, **({"theirs-7b": {"copy"}} if other_owner else {})}
        assert {"o": state(ollama), "h": state(hub)} == before
        assert blob.stat().st_nlink == 1 and blob.stat().st_uid == (NOBODY if other_owner else 0)
        assert [x["status"] for x in cli.run("verify", "--json").json()] == ["ok"] * (2 if other_owner else 1)


def test_hostile_links_out_of_a_cache_are_refused(cli: CLI, tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    gen.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = write_model(outside / "secret.gguf", tensor_bytes=64 * 1024, seed=11)
    hub = tmp_path / "hub"
    repo = hf_repo(hub, "evil/Links-GGUF", {"Good-Q4_0.gguf": write_model(gen / "g", tensor_bytes=64 * 1024, seed=12)})
    snap = repo / "snapshots" / COMMIT
    (snap / "Escape-Q4_0.gguf").symlink_to(os.path.relpath(secret, snap))       # out of the cache
    (snap / "Abs-Q4_0.gguf").symlink_to(secret)                                  # absolute, out of the cache
    (snap / "Sneaky-Q4_0.gguf").symlink_to("../../blobs/../../../outside/secret.gguf")
    # A whole repo whose blobs/ is a link out of the cache, named by the right hash.
    other = hf_repo(hub, "evil/Dir-GGUF", {"Dir-Q4_0.gguf": write_model(gen / "d", tensor_bytes=64 * 1024, seed=13)})
    moved = tmp_path / "moved-blobs"
    os.rename(other / "blobs", moved)
    (other / "blobs").symlink_to(moved)
    # Ollama with a manifests/ that is a link out of its models folder, and an LM Studio link.
    ollama = tmp_path / "ollama"
    ollama_model(tmp_path / "real-ollama", "registry.ollama.ai/library/x", "latest",
                 write_model(gen / "x", tensor_bytes=64 * 1024, seed=14))
    ollama.mkdir()
    (ollama / "manifests").symlink_to(tmp_path / "real-ollama" / "manifests")
    (ollama / "blobs").symlink_to(tmp_path / "real-ollama" / "blobs")
    lms = tmp_path / "lms"
    (lms / "pub" / "Repo-GGUF").mkdir(parents=True)
    (lms / "pub" / "Repo-GGUF" / "Linked-Q4_0.gguf").symlink_to(secret)

    env = {"HF_HUB_CACHE": str(hub), "OLLAMA_MODELS": str(ollama), "HOME": str(tmp_path / "home"),
           "HF_HOME": None}
    (tmp_path / "home" / ".lmstudio").mkdir(parents=True)
    (tmp_path / "home" / ".lmstudio" / "settings.json").write_text(json.dumps({"downloadsFolder": str(lms)}))
    r = cli.run("adopt", "--json", env=env).json()
    assert [m["name"] for m in r["models"] if m["status"] == "adopted"] == ["Links-Good-Q4_0"]
    refused = {Path(x["path"]).name: x["reason"] for x in r["refused"]}
    assert "outside its repository's blobs/" in refused["Escape-Q4_0.gguf"]
    assert "outside its repository's blobs/" in refused["Abs-Q4_0.gguf"]
    assert "outside its repository's blobs/" in refused["Sneaky-Q4_0.gguf"]
    assert "blobs is a symbolic link" in refused["Dir-Q4_0.gguf"]
    assert "symbolic link" in refused["Linked-Q4_0.gguf"]
    assert refused["manifests"] == "manifests is a symbolic link or not a directory: not followed"
    secret_sha = sha_file(secret)
    assert not (cli.root / "blobs" / "sha256" / secret_sha[:2] / secret_sha).exists()
    assert secret.stat().st_nlink == 1 and stat.S_IMODE(secret.stat().st_mode) != 0o444


@pytest.mark.skipif(not ROOT, reason="!!! only root's store gets the immutable flag: CANNOT run here !!!")
def test_a_shared_inode_is_never_made_immutable_so_its_tool_can_still_delete_it(cli: CLI, tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/m", "latest", write_model(gen / "w", tensor_bytes=MiB, seed=15))
    cli.run("adopt", "--from", "ollama", env={"OLLAMA_MODELS": str(ollama)})
    [f] = cli.run("show", "m-latest", "--json").json()["files"]
    cache_blob = ollama / "blobs" / f"sha256-{f['sha256']}"
    store = Store.open(cli.root)
    try:
        path = store.blobs.path(f["sha256"])
        assert path.stat().st_ino == cache_blob.stat().st_ino
        assert os.getxattr(path, seal.DIGEST_XATTR) == f["sha256"].encode()
        # A commit of root's store freezes its blobs, and the mount seals what it links to:
        # neither on a shared inode.
        assert not store.blobs.marks(f["sha256"]).immutable
        assert not store.blobs.seal(f["sha256"]).immutable
        assert seal.freeze(path) is False
        # Ollama removes its model: its name goes, the store keeps the bytes.
        os.unlink(cache_blob)
        assert path.stat().st_nlink == 1
        assert [r.status for r in store.verify()] == ["ok"]
        if seal.freeze(path):  # no longer shared: the store's own, frozen like any other
            assert store.blobs.marks(f["sha256"]).immutable
    finally:
        store.close()


def test_a_name_held_by_other_bytes_gets_a_suffix_and_a_directory_is_read(cli: CLI, tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    gen.mkdir()
    cli.run("import", "Tiny-Q4_K_M", str(write_model(gen / "mine.gguf", tensor_bytes=4096, seed=20)))
    d = tmp_path / "models"
    d.mkdir()
    write_model(d / "Tiny-Q4_K_M.gguf", tensor_bytes=64 * 1024, seed=21)
    write_mmproj(d / "Tiny-vision.gguf", tensor_bytes=16 * 1024, seed=22)  # a projector by its header
    write_split(d, "Split", 2, tensor_bytes=16 * 1024, seed=23)
    (d / "Broken-00001-of-00002.gguf").write_bytes((d / "Split-00001-of-00002.gguf").read_bytes())
    (d / "notes.txt").write_text("not a model")
    plan = cli.run("adopt", "--from", str(d), "--dry-run", "--json").json()
    models = by_name(plan)
    assert set(models) == {"Tiny-Q4_K_M-2", "Split"}
    assert models["Tiny-Q4_K_M-2"]["reason"].startswith("needs --copy")
    assert any("Broken-00002-of-00002.gguf" in x["reason"] for x in plan["refused"])

    r = by_name(cli.run("adopt", "--from", str(d), "--copy", "--json").json())
    assert r["Tiny-Q4_K_M-2"]["status"] == "adopted" and r["Split"]["status"] == "adopted"
    assert sorted((f["role"], f["filename"]) for f in r["Tiny-Q4_K_M-2"]["files"]) == \
        [("mmproj", "Tiny-vision.gguf"), ("weights", "Tiny-Q4_K_M.gguf")]
    assert {f["role"] for f in r["Split"]["files"]} == {"weights", "shard"}  # not another model's projector
    # Two places offering the same name with other bytes, in one plan: the second gets a suffix.
    a, b = tmp_path / "a", tmp_path / "b"
    for i, where in enumerate((a, b)):
        where.mkdir()
        write_model(where / "same.gguf", tensor_bytes=4096, seed=30 + i)
    r = cli.run("adopt", "--from", str(a), "--from", str(b), "--copy", "--dry-run", "--json").json()
    assert [m["name"] for m in r["models"]] == ["same", "same-2"]
    one = tmp_path / "one"
    one.mkdir()
    write_model(one / "chat.gguf", tensor_bytes=4096, seed=24)
    write_mmproj(one / "vision-encoder.gguf", seed=25)  # no name in common: the only model's all the same
    [m] = cli.run("adopt", "--from", str(one), "--dry-run", "--json").json()["models"]
    assert sorted(f["role"] for f in m["files"]) == ["mmproj", "weights"]
    assert cli.run("show", "Tiny-Q4_K_M", "--json").json()["active_version"] == 1  # the import, untouched
    assert len(cli.run("show", "Tiny-Q4_K_M", "--json").json()["versions"]) == 1
    # Files named by no hash are known as present only once hashed: skipped then.
    again = by_name(cli.run("adopt", "--from", str(d), "--copy", "--json").json())
    assert again["Tiny-Q4_K_M-2"]["status"] == "skipped"
    assert again["Tiny-Q4_K_M-2"]["reason"] == "already adopted as Tiny-Q4_K_M-2"
    assert again["Split"]["reason"] == "already adopted as Split"


def test_missing_caches_are_noted_and_a_missing_directory_is_an_error(cli: CLI, tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    home.mkdir()
    r = cli.run("adopt", "--dry-run", "--json", env=home_env(home)).json()
    assert [(p["tool"], p["found"]) for p in r["places"]] == [("hf", False), ("ollama", False), ("lmstudio", False)]
    assert r["models"] == [] and r["cost_bytes"] == 0
    text = cli.run("adopt", "--dry-run", env=home_env(home))
    assert "nothing to adopt" in text.stdout
    env = {**home_env(home), "HF_HOME": str(tmp_path / "hfhome")}
    r = cli.run("adopt", "--from", "hf", "--dry-run", "--json", env=env).json()
    assert r["places"] == [{"tool": "hf", "path": str(tmp_path / "hfhome" / "hub"), "found": False,
                            "reason": "HF_HOME"}]
    # A directory named with --from that is a tool's cache is read as one.
    hub = tmp_path / "somewhere" / "hub"
    gen = tmp_path / "gen"
    gen.mkdir()
    hf_repo(hub, "acme/Moved-GGUF", {"Moved-Q4_0.gguf": write_model(gen / "m", tensor_bytes=4096, seed=70)})
    ollama_model(tmp_path / "o", "registry.ollama.ai/library/moved", "v1", write_model(gen / "o", seed=71))
    r = cli.run("adopt", "--from", str(hub), "--from", str(tmp_path / "o"), "--dry-run", "--json").json()
    assert [(p["tool"], p["reason"]) for p in r["places"]] == [("hf", "--from"), ("ollama", "--from")]
    assert [(m["name"], m["source"]) for m in r["models"]] == \
        [("Moved-Q4_0", "hf://acme/Moved-GGUF"), ("moved-v1", "ollama://registry.ollama.ai/library/moved:v1")]
    bad = cli.run("adopt", "--from", str(tmp_path / "nowhere"), check=False)
    assert bad.returncode == 3 and "no such directory" in bad.stderr


def test_git_sha1_named_blob_is_checked(cli: CLI, tmp_path: Path) -> None:
    """A small file the hub keeps in git (no LFS): its blob is named by git's SHA-1."""
    hub = tmp_path / "hub"
    gen = tmp_path / "gen"
    gen.mkdir()
    w = write_model(gen / "w", tensor_bytes=4096, seed=30)
    data = w.read_bytes()
    repo, oid = git_blob_repo(hub, w)
    wrong = "0" * 40
    (repo / "blobs" / wrong).write_bytes(data)
    (repo / "snapshots" / COMMIT / "Wrong-Q4_0.gguf").symlink_to(f"../../blobs/{wrong}")
    r = cli.run("adopt", "--from", "hf", "--json", check=False, env={"HF_HUB_CACHE": str(hub)})
    models = by_name(r.json())
    assert models["Git-Q4_0"]["status"] == "adopted"
    assert models["Git-Wrong-Q4_0"]["status"] == "failed"
    assert "git SHA-1 mismatch" in models["Git-Wrong-Q4_0"]["reason"]



# -- as a user who is not root, and on a file system with reflinks ----------------------------------
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def as_nobody(store: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MODELFS_", "HF_", "OLLAMA_"))}
    argv = [sys.executable, "-P", "-m", "modelfs", "--store", str(store), *args]
    return subprocess.run([*SETPRIV, *argv], capture_output=True, text=True, timeout=120, cwd="/",
                          env={**base, "PYTHONPATH": str(REPO), **env})


@pytest.mark.skipif(not ROOT, reason="!!! needs root to run the command as another user (setpriv) !!!")
def test_a_user_who_is_not_root_adopts_by_hard_link(tmp_path: Path) -> None:
    """The common case: a user's own store and caches. linkat through /proc/self/fd, the
    digest xattr written before the 0444, no CAP_LINUX_IMMUTABLE anywhere."""
    top = Path(tempfile.mkdtemp(prefix="modelfs-adopt-", dir="/tmp"))  # pytest's tmp dirs are root's, 0700
    try:
        top.chmod(0o755)
        gen = tmp_path / "gen"
        gen.mkdir()
        hub, ollama, store = top / "hub", top / "ollama", top / "store"
        hf_repo(hub, "acme/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": write_model(gen / "q4", tensor_bytes=MiB, seed=40),
                                        "mmproj-Tiny-f16.gguf": write_mmproj(gen / "mm", seed=41)})
        ollama_model(ollama, "registry.ollama.ai/library/m", "latest",
                     write_model(gen / "w", tensor_bytes=MiB, seed=42))
        store.mkdir()
        for p in [store, *hub.rglob("*"), hub, *ollama.rglob("*"), ollama]:
            os.lchown(p, NOBODY, NOBODY)
        before = {"h": state(hub), "o": state(ollama)}
        env = {"HF_HUB_CACHE": str(hub), "OLLAMA_MODELS": str(ollama), "HOME": str(top)}
        probe = as_nobody(store, "--version", env=env)
        if probe.returncode != 0:
            pytest.skip(f"!!! this Python cannot be run by another uid here: CANNOT run ({probe.stderr[-200:]}) !!!")
        r = as_nobody(store, "adopt", "--json", env=env)
        assert r.returncode == 0, r.stderr
        models = by_name(json.loads(r.stdout))
        assert {n: sorted(f["method"] for f in m["files"]) for n, m in models.items()} == \
            {"Tiny-Q4_K_M": ["hardlink", "hardlink"], "m-latest": ["hardlink"]}
        assert {"h": changes(before["h"], state(hub)), "o": changes(before["o"], state(ollama))} == {"h": {}, "o": {}}
        for m in models.values():
            for f in m["files"]:
                blob = store / "blobs" / "sha256" / f["sha256"][:2] / f["sha256"]
                st = blob.stat()
                assert (st.st_uid, st.st_nlink, stat.S_IMODE(st.st_mode)) == (NOBODY, 2, 0o444)
                assert os.getxattr(blob, seal.DIGEST_XATTR) == f["sha256"].encode()
        v = as_nobody(store, "verify", "--json", env=env)
        assert v.returncode == 0 and [x["status"] for x in json.loads(v.stdout)] == ["ok"] * 3
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


@pytest.fixture
def reflink_fs() -> Iterator[Path]:
    """A fresh XFS (reflinks on) on a loop device, mounted for the test."""
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("!!! no mkfs.xfs (Debian: xfsprogs): the reflink test CANNOT run !!!")
    if not ROOT:
        pytest.skip("!!! only root mounts a loop device: the reflink test CANNOT run !!!")
    top = Path(tempfile.mkdtemp(prefix="modelfs-xfs-", dir="/tmp"))
    image, mnt = top / "xfs.img", top / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(400 * MiB)
    try:
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True, capture_output=True)
        r = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"!!! cannot mount a loop device here ({r.stderr.strip()}): the reflink test CANNOT run !!!")
        try:
            yield mnt
        finally:
            thaw_tree(mnt)
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def unshared_bytes(path: Path) -> int:
    """Bytes of ``path``'s extents that no other file shares (FIEMAP, FIEMAP_EXTENT_SHARED)."""
    fd = os.open(path, os.O_RDONLY)
    total, start, count = 0, 0, 64
    try:
        while True:
            head = struct.pack("=QQIIII", start, (1 << 64) - 1 - start, 1, 0, count, 0)  # FIEMAP_FLAG_SYNC
            buf = bytearray(head + bytes(56 * count))
            fcntl.ioctl(fd, 0xC020660B, buf)  # FS_IOC_FIEMAP
            mapped = struct.unpack_from("=I", buf, 20)[0]
            last = False
            for i in range(mapped):
                logical, _phys, length, _r1, _r2, flags = struct.unpack_from("=QQQQQI", buf, 32 + 56 * i)
                if not flags & 0x2000:  # FIEMAP_EXTENT_SHARED
                    total += length
                start = logical + length
                last = last or bool(flags & 0x1)  # FIEMAP_EXTENT_LAST
            if last or mapped == 0:
                return total
    finally:
        os.close(fd)


def test_with_reflinks_every_file_is_cloned_and_costs_no_space(reflink_fs: Path, tmp_path: Path) -> None:
    """XFS shares extents: LM Studio's files too come in without a copy (the store's file is
    its own, copy-on-write: LM Studio may rewrite its file, the store's bytes stay), and
    nothing in the caches changes, not even a mode."""
    gen = reflink_fs / "gen"
    gen.mkdir()
    hub, lms, root = reflink_fs / "hub", reflink_fs / "lms", reflink_fs / "store"
    hf_repo(hub, "acme/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": write_model(gen / "q4", tensor_bytes=48 * MiB, seed=50),
                                    "mmproj-Tiny-f16.gguf": write_mmproj(gen / "mm", tensor_bytes=8 * MiB, seed=51)})
    small = lmstudio_repo(lms, "pub/Small-GGUF", {"Small-Q8_0.gguf": write_model(gen / "s", tensor_bytes=40 * MiB,
                                                                                   seed=52, file_type=7)})
    home = tmp_path / "home"
    (home / ".lmstudio").mkdir(parents=True)
    (home / ".lmstudio" / "settings.json").write_text(json.dumps({"downloadsFolder": str(lms)}))
    cli = CLI(root)
    env = {**home_env(home), "HF_HUB_CACHE": str(hub)}
    before = {"h": state(hub), "l": state(lms)}
    plan = by_name(cli.run("adopt", "--dry-run", "--json", env=env).json())
    assert {n: {f["method"] for f in m["files"]} for n, m in plan.items()} == \
        {"Tiny-Q4_K_M": {"reflink"}, "Small-Q8_0": {"reflink"}}

    def used() -> int:
        st = os.statvfs(reflink_fs)
        catalog = sum(p.stat().st_blocks * 512 for p in root.glob("catalog.db*"))
        return (st.f_blocks - st.f_bfree) * st.f_frsize - catalog

    os.sync()
    was = used()
    done = by_name(cli.run("adopt", "--json", env=env).json())
    os.sync()
    grown = used() - was
    adopted = sum(f["size"] for m in done.values() for f in m["files"])
    assert {n: (m["status"], {f["method"] for f in m["files"]}) for n, m in done.items()} == \
        {"Tiny-Q4_K_M": ("adopted", {"reflink"}), "Small-Q8_0": ("adopted", {"reflink"})}
    # The blobs' bytes on disk are the caches' extents: none is the store's alone.
    blobs = [p for p in (root / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 3 and adopted > 90 * MiB
    assert sum(unshared_bytes(p) for p in blobs) < adopted / 1024
    # The whole file system grew by its metadata only (directories, inodes, xattrs): a
    # fixed cost, where one copy would have been the 96 MiB again.
    assert grown < 1 * MiB, (grown, adopted)
    assert {"h": state(hub), "l": state(lms)} == before
    assert [x["status"] for x in cli.run("verify", "--json").json()] == ["ok"] * 3
    # LM Studio rewrites its file in place: the store's clone keeps the bytes it verified.
    with open(small / "Small-Q8_0.gguf", "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\xff" * 64)
    assert [x["status"] for x in cli.run("verify", "--json").json()] == ["ok"] * 3


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT mount here !!!")
@pytest.mark.skipif(not ROOT, reason="!!! the case of root's store (a shared inode, no immutable flag) !!!")
def test_a_hard_linked_model_reads_back_through_the_mount(cli: CLI, tmp_path: Path) -> None:
    """Root's own process would get a link to an immutable blob; a shared inode is not
    immutable, so it is served the regular file, with the cache's very bytes."""
    from test_mount import Mount

    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    weights = write_model(gen / "w", tensor_bytes=2 * MiB, seed=60)
    projector = write_mmproj(gen / "p", tensor_bytes=256 * 1024, seed=61)
    want = {"vision-latest.gguf": sha_file(weights), "mmproj-vision-latest.gguf": sha_file(projector)}
    ollama_model(ollama, "registry.ollama.ai/library/vision", "latest", weights, projector)
    cli.run("adopt", "--from", "ollama", env={"OLLAMA_MODELS": str(ollama)})
    (tmp_path / "mnt").mkdir()
    mount = Mount(cli, tmp_path / "mnt", "--links", "auto")
    try:
        model = mount.path / "vision-latest"
        assert sorted(p.name for p in model.iterdir()) == sorted([".versions", *want, "model.json"])
        for name, sha in want.items():
            assert stat.S_ISREG(os.lstat(model / name).st_mode)  # not the link: the inode is not immutable
            assert sha_file(model / name) == sha
    finally:
        mount.stop()


def test_where_each_tool_keeps_its_models(tmp_path: Path) -> None:
    """As each tool finds its own: variables first, LM Studio's settings in its home."""
    from modelfs_store.caches import hf_cache, lmstudio_models, ollama_models

    home = tmp_path / "home"
    home.mkdir()
    assert hf_cache({}, home) == (home / ".cache" / "huggingface" / "hub", "default")
    assert hf_cache({"HF_HOME": "/x"}, home) == (Path("/x/hub"), "HF_HOME")
    assert hf_cache({"HF_HOME": "/x", "HF_HUB_CACHE": "/y"}, home) == (Path("/y"), "HF_HUB_CACHE")
    assert ollama_models({}, home) == (home / ".ollama" / "models", "default")
    assert ollama_models({"OLLAMA_MODELS": "/o"}, home) == (Path("/o"), "OLLAMA_MODELS")
    assert lmstudio_models(home) == (home / ".lmstudio" / "models", "default")
    # An older LM Studio kept everything in ~/.cache/lm-studio.
    (home / ".cache" / "lm-studio" / "models").mkdir(parents=True)
    assert lmstudio_models(home) == (home / ".cache" / "lm-studio" / "models", "default (older LM Studio)")
    (home / ".cache" / "lm-studio" / "settings.json").write_text('{"downloadsFolder": "/old"}')
    assert lmstudio_models(home)[0] == Path("/old")
    # A relocated home (~/.lmstudio-home-pointer) and its settings win.
    moved = tmp_path / "lmshome"
    moved.mkdir()
    (home / ".lmstudio-home-pointer").write_text(str(moved) + "\n")
    (moved / "settings.json").write_text(json.dumps({"downloadsFolder": "/new"}))
    assert lmstudio_models(home) == (Path("/new"), f"downloadsFolder in {moved / 'settings.json'}")
    (moved / "settings.json").write_text("{not json")
    (home / ".cache" / "lm-studio" / "settings.json").unlink()
    assert lmstudio_models(home) == (home / ".cache" / "lm-studio" / "models", "default (older LM Studio)")
    (moved / "models").mkdir()
    assert lmstudio_models(home) == (moved / "models", "default")


def test_a_newer_commit_of_an_adopted_repository_becomes_a_new_version(cli: CLI, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    gen = tmp_path / "gen"
    gen.mkdir()
    env = {"HF_HUB_CACHE": str(hub)}
    repo = hf_repo(hub, "acme/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": write_model(gen / "a", tensor_bytes=4096, seed=90),
                                           "mmproj-Tiny-f16.gguf": write_mmproj(gen / "m", seed=91)})
    cli.run("adopt", "--from", "hf", env=env)
    # The hub's repository moved on: huggingface_hub keeps the old snapshot, refs/main names the new one.
    new = "b" * 40
    hf_repo(hub, "acme/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": write_model(gen / "b", tensor_bytes=4096, seed=92)}, commit=new)
    old_mmproj = repo / "snapshots" / COMMIT / "mmproj-Tiny-f16.gguf"
    (repo / "snapshots" / new / "mmproj-Tiny-f16.gguf").symlink_to(os.readlink(old_mmproj))
    plan = by_name(cli.run("adopt", "--from", "hf", "--dry-run", "--json", env=env).json())
    assert (plan["Tiny-Q4_K_M"]["status"], plan["Tiny-Q4_K_M"]["update"]) == ("planned", True)
    assert [f["method"] for f in plan["Tiny-Q4_K_M"]["files"]] == ["hardlink", "present"]
    text = cli.run("adopt", "--from", "hf", env=env).stdout
    assert "adopt Tiny-Q4_K_M  from hf://acme/Tiny-GGUF@bbbbbbbbbbbb Tiny-Q4_K_M.gguf (a new version" in text
    show = cli.run("show", "Tiny-Q4_K_M", "--json").json()
    assert (show["active_version"], show["last_good_version"], show["hub_commit"]) == (2, 1, new)
    # Another source never adds to that name: a directory's model of the same file name gets a suffix.
    d = tmp_path / "d"
    d.mkdir()
    write_model(d / "Tiny-Q4_K_M.gguf", tensor_bytes=4096, seed=93)
    r = by_name(cli.run("adopt", "--from", str(d), "--copy", "--json").json())
    assert (r["Tiny-Q4_K_M-2"]["status"], r["Tiny-Q4_K_M-2"]["update"]) == ("adopted", False)


def test_a_file_swapped_after_the_plan_is_not_adopted(tmp_path: Path) -> None:
    """The plan names an inode; the walk is made again at adoption, and another file (or a
    link) in its place fails that model, not the others."""
    from modelfs_store import adopt

    gen = tmp_path / "gen"
    gen.mkdir()
    hub = tmp_path / "hub"
    repo = hf_repo(hub, "acme/Tiny-GGUF", {"Tiny-Q4_0.gguf": write_model(gen / "a", tensor_bytes=4096, seed=100),
                                           "Tiny-Q8_0.gguf": write_model(gen / "b", tensor_bytes=4096, seed=101)})
    store = Store.open(tmp_path / "store")
    try:
        p = adopt.plan(store, ["hf"], env={"HF_HUB_CACHE": str(hub)}, home=tmp_path)
        q4 = next(e for e in p.entries if e.name == "Tiny-Q4_0").files[0].found.where
        q8 = next(e for e in p.entries if e.name == "Tiny-Q8_0").files[0].found.where
        blob = repo / "blobs" / q4.name
        (repo / "blobs" / "swap").write_bytes(blob.read_bytes())  # made while the old inode lives: another one
        os.replace(repo / "blobs" / "swap", blob)  # the same bytes, another inode: not what was planned
        (repo / "blobs" / q8.name).unlink()
        (repo / "blobs" / q8.name).symlink_to(tmp_path / "gen")  # a link planted after the plan
        out = {o.entry.name: o for o in adopt.execute(store, p)}
        assert (out["Tiny-Q4_0"].status, out["Tiny-Q4_0"].exit_code) == ("failed", 1)
        assert out["Tiny-Q4_0"].reason.endswith("replaced since the plan was made")
        assert out["Tiny-Q8_0"].status == "failed" and "symbolic link" in out["Tiny-Q8_0"].reason
        assert store.catalog.list_models() == [] and store.blobs.iter_blobs() == []
    finally:
        store.close()
