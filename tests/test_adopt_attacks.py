"""``modelfs adopt`` against hostile caches (store/caches.py, store/adopt.py,
``BlobStore.commit_existing``): each test is an attack that once worked.

    a hard link to an inode others can write, or that has names outside the cache
    the bytes of a git-SHA-1-named blob changed between its check and its commit
    a manifest (or LM Studio's settings) nested deep enough to stop the whole adopt
    another user's cache adding a version to a model of the same source
    a cache's names carrying terminal escapes into the catalog and the plan
"""

from __future__ import annotations

import json
import os
import stat
import tracemalloc
from pathlib import Path

import pytest

from conftest import CLI
from ggufgen import write_mmproj, write_model
from modelfs_store import adopt, caches
from modelfs_store.core import Store
from test_adopt import COMMIT, NOBODY, ROOT, MiB, by_name, git_blob_repo, hf_repo, ollama_model, state

needs_root = pytest.mark.skipif(not ROOT, reason="!!! needs root (chown to another uid) !!!")


def one_blob(ollama: Path) -> Path:
    return max((ollama / "blobs").iterdir(), key=lambda p: p.stat().st_size)


# -- hard links: only an inode no one else can write, with no names but its cache's --------------
def test_an_inode_others_can_write_is_not_hard_linked(cli: CLI, tmp_path: Path) -> None:
    """A blob of the store's owner left writable by everyone (0666): another user opened it
    for writing before the adoption (they could), and keeps writing after it. Hard-linked,
    the store's blob would change under its name; it must be copied instead."""
    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/open", "latest", write_model(gen / "w", tensor_bytes=MiB, seed=1))
    blob = one_blob(ollama)
    blob.chmod(0o666)
    writer = os.open(blob, os.O_WRONLY)  # another user's, opened while the mode let them
    try:
        env = {"OLLAMA_MODELS": str(ollama)}
        plan = by_name(cli.run("adopt", "--from", "ollama", "--dry-run", "--json", env=env).json())
        [f] = plan["open-latest"]["files"]
        assert f["method"] == "needs-copy" and "writable by other users" in f["reason"], f
        before = state(ollama)
        r = by_name(cli.run("adopt", "--from", "ollama", "--copy", "--json", env=env).json())
        assert [f["method"] for f in r["open-latest"]["files"]] == ["copy"]
        assert state(ollama) == before  # not even its mode changed
        os.pwrite(writer, b"\xff" * 64, MiB // 2)  # what they write now changes their file only
    finally:
        os.close(writer)
    assert [x["status"] for x in cli.run("verify", "--json").json()] == ["ok"]


def test_an_inode_with_names_outside_the_cache_is_not_hard_linked(cli: CLI, tmp_path: Path) -> None:
    """The cache's blob is also ``~/work/model.gguf`` (a hard link the user made, or a
    setuid file): making it 0444 would change a file outside the cache."""
    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/twice", "latest", write_model(gen / "w", tensor_bytes=MiB, seed=2))
    ollama_model(ollama, "registry.ollama.ai/library/suid", "latest", write_model(gen / "s", tensor_bytes=MiB, seed=3))
    twice = one_blob(ollama)
    work = tmp_path / "work"
    work.mkdir()
    os.link(twice, work / "model.gguf")
    (work / "model.gguf").chmod(0o644)
    suid = next(p for p in (ollama / "blobs").iterdir() if p.stat().st_size > MiB and p != twice)
    suid.chmod(0o4755)
    env = {"OLLAMA_MODELS": str(ollama)}
    plan = by_name(cli.run("adopt", "--from", "ollama", "--dry-run", "--json", env=env).json())
    assert "has 2 names" in plan["twice-latest"]["files"][0]["reason"]
    assert "setuid" in plan["suid-latest"]["files"][0]["reason"]
    r = by_name(cli.run("adopt", "--from", "ollama", "--json", env=env).json())
    assert {n: m["status"] for n, m in r.items()} == {"twice-latest": "skipped", "suid-latest": "skipped"}
    assert stat.S_IMODE((work / "model.gguf").stat().st_mode) == 0o644
    assert stat.S_IMODE(suid.stat().st_mode) == 0o4755


def test_the_hard_link_rule_is_checked_again_on_the_inode_adopted(tmp_path: Path) -> None:
    """The plan saw one name and 0644; by the time of the adoption a second name (or a
    mode others can write) appeared: no hard link then either."""
    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/late", "latest", write_model(gen / "w", tensor_bytes=MiB, seed=4))
    store = Store.open(tmp_path / "store")
    try:
        p = adopt.plan(store, ["ollama"], env={"OLLAMA_MODELS": str(ollama)}, home=tmp_path)
        assert [f.method for f in p.entries[0].files] == ["hardlink"]
        os.link(one_blob(ollama), tmp_path / "elsewhere.gguf")
        [o] = adopt.execute(store, p)
        assert o.status == "failed" and "--copy" in (o.reason or "") and "it has 2 names" in (o.reason or ""), o.reason
        assert stat.S_IMODE((tmp_path / "elsewhere.gguf").stat().st_mode) != 0o444
        assert store.blobs.iter_blobs() == []
    finally:
        store.close()


@needs_root
def test_an_inode_of_another_owner_at_adoption_is_not_hard_linked(tmp_path: Path) -> None:
    """The plan saw the store owner's blob; at the adoption the inode (the same number:
    one freed and reused, in a cache folder another user may write) is another user's.
    Hard-linked, they could chmod it back and write the store's bytes."""
    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/swap", "latest", write_model(gen / "w", tensor_bytes=MiB, seed=4))
    store = Store.open(tmp_path / "store")
    try:
        p = adopt.plan(store, ["ollama"], env={"OLLAMA_MODELS": str(ollama)}, home=tmp_path)
        assert [f.method for f in p.entries[0].files] == ["hardlink"]
        os.chown(one_blob(ollama), NOBODY, NOBODY)
        [o] = adopt.execute(store, p)
        assert o.status == "failed" and f"owned by uid {NOBODY}" in (o.reason or ""), o.reason
        assert store.blobs.iter_blobs() == [] and one_blob(ollama).stat().st_nlink == 1
    finally:
        store.close()


def test_an_inode_open_for_writing_is_not_hard_linked(cli: CLI, tmp_path: Path) -> None:
    """0644 now, but a process opened it for writing before (another user's, while the mode
    let them, or a tool of the owner's): it would write the store's bytes after the
    adoption. The kernel knows (a read lease is refused): no hard link."""
    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/held", "latest", write_model(gen / "w", tensor_bytes=MiB, seed=5))
    blob = one_blob(ollama)
    env = {"OLLAMA_MODELS": str(ollama)}
    writer = os.open(blob, os.O_WRONLY)
    try:
        before = state(ollama)
        r = cli.run("adopt", "--from", "ollama", "--json", env=env, check=False)
        [m] = r.json()["models"]
        assert r.returncode != 0 and m["status"] == "failed" and "--copy" in m["reason"], m
        assert "another process has it open for writing" in m["reason"], m
        assert state(ollama) == before and blob.stat().st_nlink == 1
        r = cli.run("adopt", "--from", "ollama", "--copy", "--json", env=env)
        assert [f["method"] for f in r.json()["models"][0]["files"]] == ["copy"]
        os.pwrite(writer, b"\xff" * 64, MiB // 2)
    finally:
        os.close(writer)
    assert [x["status"] for x in cli.run("verify", "--json").json()] == ["ok"]


def test_an_inode_opened_for_writing_during_the_adoption_is_not_hard_linked(tmp_path: Path) -> None:
    """Someone opens the file for writing while it is hashed: they would get their
    descriptor once the adoption is done. The lease breaks; the link is undone and the
    file left as it was (its mode, no digest xattr)."""
    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/race", "latest", write_model(gen / "w", tensor_bytes=MiB, seed=6))
    blob = one_blob(ollama)
    store = Store.open(tmp_path / "store")
    try:
        p = adopt.plan(store, ["ollama"], env={"OLLAMA_MODELS": str(ollama)}, home=tmp_path)
        assert [f.method for f in p.entries[0].files] == ["hardlink"]
        tried: list[str] = []

        def open_for_writing(n: int) -> None:
            if not tried:  # O_NONBLOCK: refused at once while the lease is held, the break begun
                try:
                    os.close(os.open(blob, os.O_WRONLY | os.O_NONBLOCK))
                    tried.append("opened")
                except BlockingIOError:
                    tried.append("would block")

        [o] = adopt.execute(store, p, progress=open_for_writing)
        assert tried == ["would block"]
        assert o.status == "failed" and "opened it for writing meanwhile" in (o.reason or ""), o.reason
        st = blob.stat()
        assert (st.st_nlink, stat.S_IMODE(st.st_mode)) == (1, 0o644)
        assert "user.modelfs.sha256" not in os.listxattr(blob)
        assert store.blobs.iter_blobs() == [] and not list((tmp_path / "store" / "tmp").iterdir())
    finally:
        store.close()


# -- a git-SHA-1-named blob: the bytes committed are the bytes checked ------------------------
def test_a_git_named_blob_changed_after_its_check_is_not_adopted(tmp_path: Path) -> None:
    """A small hub file is named by git's SHA-1 only. Its bytes were checked, then read a
    second time to be committed: a writer in between put other bytes in the store under
    a name the check never saw."""
    hub = tmp_path / "hub"
    gen = tmp_path / "gen"
    gen.mkdir()
    w = write_model(gen / "w", tensor_bytes=5 * MiB, seed=5)  # more than one 4 MiB chunk
    data = w.read_bytes()
    repo, oid = git_blob_repo(hub, w)
    store = Store.open(tmp_path / "store")
    writer = os.open(repo / "blobs" / oid, os.O_WRONLY)
    try:
        # --copy: the open writer keeps it from being hard-linked (the test below), so it is copied
        p = adopt.plan(store, ["hf"], copy=True, env={"HF_HUB_CACHE": str(hub)}, home=tmp_path)
        tampered: list[int] = []

        def tamper(n: int) -> None:  # after the first chunk committed: the tail changes
            if not tampered:
                tampered.append(os.pwrite(writer, b"\xee" * 4096, len(data) - 4096))

        [o] = adopt.execute(store, p, progress=tamper)
        assert tampered
        assert o.status == "failed" and "git SHA-1 mismatch" in (o.reason or ""), (o.status, o.reason)
        assert store.catalog.list_models() == [] and store.blobs.iter_blobs() == []
    finally:
        os.close(writer)
        store.close()


# -- bounded parsing ----------------------------------------------------------------------------
def test_a_deeply_nested_manifest_is_refused_and_the_others_adopted(cli: CLI, tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/good", "latest", write_model(gen / "w", tensor_bytes=4096, seed=6))
    bomb = ollama / "manifests" / "registry.ollama.ai" / "library" / "bomb" / "latest"
    bomb.parent.mkdir(parents=True)
    bomb.write_text("[" * 200_000)  # 200 KB, well under the 1 MiB cap
    home = tmp_path / "home"
    (home / ".lmstudio").mkdir(parents=True)
    (home / ".lmstudio" / "settings.json").write_text('{"downloadsFolder": ' + "[" * 200_000)
    r = cli.run("adopt", "--from", "ollama", "--from", "lmstudio", "--json",
                env={"OLLAMA_MODELS": str(ollama), "HOME": str(home)}).json()
    assert [m["name"] for m in r["models"] if m["status"] == "adopted"] == ["good-latest"]
    assert any(Path(x["path"]) == bomb and "not an Ollama manifest" in x["reason"] for x in r["refused"]), r
    assert caches.lmstudio_models(home) == (home / ".lmstudio" / "models", "default")


def test_a_huge_directory_is_not_read_whole_into_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget of names stops the reading of a directory, not only what comes after."""
    d = tmp_path / "many"
    d.mkdir()
    for i in range(10_000):
        (d / f"{i:06d}-{'x' * 100}.txt").touch()
    monkeypatch.setattr(caches, "MAX_ENTRIES", 100)
    tracemalloc.start()
    try:
        found = caches.discover(str(d), {}, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.reason for r in found.refused] == ["more than 100 names: not read further"]
    assert peak < 1 * MiB, peak


# -- names and versions --------------------------------------------------------------------------
@needs_root
def test_another_users_cache_never_adds_a_version_to_a_model(cli: CLI, tmp_path: Path) -> None:
    """The store's model came from the owner's own Hugging Face cache. Another user's cache,
    naming the same repository and file at a 'newer commit', must not become its active
    version: their model gets a name of its own."""
    gen = tmp_path / "gen"
    gen.mkdir()
    mine = tmp_path / "mine"
    hf_repo(mine, "acme/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": write_model(gen / "a", tensor_bytes=4096, seed=7)})
    cli.run("adopt", "--from", "hf", env={"HF_HUB_CACHE": str(mine)})
    theirs = tmp_path / "theirs"
    hf_repo(theirs, "acme/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": write_model(gen / "b", tensor_bytes=4096, seed=8)},
            commit="b" * 40)
    for p in [theirs, *theirs.rglob("*")]:
        os.lchown(p, NOBODY, NOBODY)
    r = by_name(cli.run("adopt", "--from", str(theirs), "--copy", "--json").json())
    assert set(r) == {"Tiny-Q4_K_M-2"} and r["Tiny-Q4_K_M-2"]["update"] is False, r
    show = cli.run("show", "Tiny-Q4_K_M", "--json").json()
    assert (show["active_version"], show["hub_commit"]) == (1, COMMIT)


def test_cache_names_with_control_characters_are_refused(cli: CLI, tmp_path: Path) -> None:
    """An Ollama folder or tag named with a terminal escape would be printed by the plan
    and kept in the catalog as the model's source."""
    gen = tmp_path / "gen"
    gen.mkdir()
    ollama = tmp_path / "ollama"
    ollama_model(ollama, "registry.ollama.ai/library/good", "latest", write_model(gen / "g", tensor_bytes=4096, seed=9))
    ollama_model(ollama, "registry.ollama.ai/evil\x1b]0;pwned\x07/m", "latest",
                 write_model(gen / "e", tensor_bytes=4096, seed=10))
    ollama_model(ollama, "registry.ollama.ai/library/tag", "x\x1b[2J",
                 write_model(gen / "t", tensor_bytes=4096, seed=11))
    hub = tmp_path / "hub"  # a snapshot folder of that name: kept as the file's hub path
    hf_repo(hub, "acme/Esc-GGUF", {"q\x1b[2J/Esc-Q4_0.gguf": write_model(gen / "h", tensor_bytes=4096, seed=12)})
    lms = tmp_path / "lms"  # LM Studio's publisher folder: kept as the model's hub repository
    (lms / "pub\x1b[2J" / "Esc-GGUF").mkdir(parents=True)
    write_model(lms / "pub\x1b[2J" / "Esc-GGUF" / "Lms-Q4_0.gguf", tensor_bytes=4096, seed=13)
    home = tmp_path / "home"
    (home / ".lmstudio").mkdir(parents=True)
    (home / ".lmstudio" / "settings.json").write_text(json.dumps({"downloadsFolder": str(lms)}))
    env = {"OLLAMA_MODELS": str(ollama), "HF_HUB_CACHE": str(hub), "HOME": str(home)}
    r = cli.run("adopt", "--from", "ollama", "--from", "hf", "--from", "lmstudio", "--copy", "--json", env=env)
    assert [m["name"] for m in r.json()["models"] if m["status"] == "adopted"] == ["good-latest"]
    shown = json.dumps([[m["source"], m["origin"], m["files"]] for m in r.json()["models"]], ensure_ascii=False)
    assert "\x1b" not in shown and "\x1b" not in json.dumps(r.json()["refused"], ensure_ascii=False)
    text = cli.run("adopt", "--from", "ollama", "--from", "hf", "--from", "lmstudio", "--dry-run", env=env).stdout
    assert "\x1b" not in text and "\x07" not in text, text
    assert {m["source"] for m in cli.run("list", "--json").json()} <= {"ollama://registry.ollama.ai/library/good:latest"}


def test_guessing_a_directory_s_layout_looks_at_a_bounded_number_of_entries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Is ``--from DIR`` LM Studio's publisher/repo/*.gguf? Thousands of empty folders must
    not all be opened and read to find out."""
    d = tmp_path / "d"
    for i in range(3000):
        (d / f"{i:05d}" / "repo").mkdir(parents=True)
    opened: list[object] = []
    real = os.scandir

    def scandir(path):  # type: ignore[no-untyped-def]
        opened.append(path)
        return real(path)

    monkeypatch.setattr(caches.os, "scandir", scandir)
    assert caches._has_publisher_repo_gguf(d) is False
    monkeypatch.undo()
    assert len(opened) <= 4096 + 1, len(opened)


@needs_root
def test_another_users_cache_cannot_name_its_way_to_a_blob_it_does_not_hold(cli: CLI, tmp_path: Path) -> None:
    """The store holds a model whose SHA-256 another user learnt (not its bytes). Their cache
    names a file of theirs by that hash: taken as 'present', their model would be the
    store's bytes. A name is trusted only in the store owner's own files."""
    gen = tmp_path / "gen"
    gen.mkdir()
    secret = write_model(gen / "secret.gguf", tensor_bytes=64 * 1024, seed=15)
    cli.run("import", "secret-finetune", str(secret))
    [f] = cli.run("show", "secret-finetune", "--json").json()["files"]
    theirs = tmp_path / "theirs"
    fake = write_model(gen / "fake", tensor_bytes=64 * 1024, seed=16)
    repo = hf_repo(theirs, "evil/Grab-GGUF", {"Grab-Q4_0.gguf": fake,  # a projector: not the secret's file set
                                              "mmproj-Grab-f16.gguf": write_mmproj(gen / "mm", seed=17)})
    real = repo / "blobs" / os.readlink(repo / "snapshots" / COMMIT / "Grab-Q4_0.gguf").split("/")[-1]
    os.rename(real, repo / "blobs" / f["sha256"])  # their bytes, under the secret's name
    link = repo / "snapshots" / COMMIT / "Grab-Q4_0.gguf"
    link.unlink()
    link.symlink_to(f"../../blobs/{f['sha256']}")
    for p in [theirs, *theirs.rglob("*")]:
        os.lchown(p, NOBODY, NOBODY)
    r = cli.run("adopt", "--from", str(theirs), "--copy", "--json", check=False)
    [m] = r.json()["models"]
    assert m["status"] == "failed" and "SHA-256 mismatch" in m["reason"], m
    assert [x["name"] for x in cli.run("list", "--json").json()] == ["secret-finetune"]


def test_a_file_named_by_a_blob_the_store_holds_but_of_another_size_is_not_taken_as_it(
        cli: CLI, tmp_path: Path) -> None:
    """The owner's own cache, its name trusted: a blob whose size is not the store blob's
    (a truncated or damaged file) is not that blob, and its size must not go into the
    catalog as the model's file size (the mount would serve that many bytes)."""
    gen = tmp_path / "gen"
    gen.mkdir()
    cli.run("import", "base", str(write_model(gen / "base.gguf", tensor_bytes=64 * 1024, seed=18)))
    [f] = cli.run("show", "base", "--json").json()["files"]
    hub = tmp_path / "hub"
    repo = hf_repo(hub, "acme/Dup-GGUF", {"Dup-Q4_0.gguf": write_model(gen / "d", tensor_bytes=32 * 1024, seed=19),
                                          "mmproj-Dup-f16.gguf": write_mmproj(gen / "mm", seed=20)})
    link = repo / "snapshots" / COMMIT / "Dup-Q4_0.gguf"
    os.rename(repo / "blobs" / os.readlink(link).split("/")[-1], repo / "blobs" / f["sha256"])
    link.unlink()
    link.symlink_to(f"../../blobs/{f['sha256']}")
    r = cli.run("adopt", "--from", "hf", "--json", check=False, env={"HF_HUB_CACHE": str(hub)})
    [m] = r.json()["models"]
    assert m["status"] == "failed" and "size" in m["reason"], m
    assert [x["name"] for x in cli.run("list", "--json").json()] == ["base"]


# -- whose word is taken: the path to a cache, and the hub repository it claims ---------------
@needs_root
def test_a_link_another_user_owns_on_the_way_to_a_cache_is_not_followed(cli: CLI, tmp_path: Path) -> None:
    """Root adopting from a directory of another user: that user's symbolic link to a
    directory only root may read (``/root/…``) must not make root's private model a model
    of the store; root's own link, and a real directory, are followed."""
    gen = tmp_path / "gen"
    gen.mkdir()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    write_model(private / "secret-Q4_0.gguf", tensor_bytes=64 << 10, seed=71)
    theirs = tmp_path / "home-eve"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    (theirs / "models").symlink_to(private)
    os.chown(theirs / "models", NOBODY, NOBODY, follow_symlinks=False)
    r = cli.run("adopt", "--from", str(theirs / "models"), "--copy", "--json", check=False)
    assert r.returncode != 0 or r.json()["models"] == [], r.stdout
    assert "owned by uid 65534, another user: not followed" in r.stdout + r.stderr
    assert cli.run("list", "--json").json() == []
    # Root's own link to the same directory is followed.
    (tmp_path / "mine").symlink_to(private)
    done = cli.run("adopt", "--from", str(tmp_path / "mine"), "--copy", "--json").json()
    assert [m["status"] for m in done["models"]] == ["adopted"]


@needs_root
def test_another_users_cache_gets_no_hub_repository_in_the_catalog(cli: CLI, tmp_path: Path) -> None:
    """A cache another user keeps may name its folders for any hub repository: its models
    come in, but not as that repository (the mount's .hf view shows only the owner's word)."""
    gen = tmp_path / "gen"
    gen.mkdir()
    hub = tmp_path / "hub"
    hf_repo(hub, "acme/Famous-GGUF", {"famous-Q4_K_M.gguf": write_model(gen / "w", tensor_bytes=64 << 10, seed=72)})
    for dirpath, dirs, files in os.walk(hub):
        for n in dirs + files:
            os.chown(os.path.join(dirpath, n), NOBODY, NOBODY, follow_symlinks=False)
    os.chown(hub, NOBODY, NOBODY)
    cli.run("adopt", "--from", "hf", "--copy", env={"HF_HUB_CACHE": str(hub)})
    [m] = cli.run("list", "--json").json()
    assert (m["hub_repo"], m["hub_commit"]) == (None, None) and m["source"] == "hf://acme/Famous-GGUF"
    # The owner's own cache is believed.
    own = tmp_path / "own"
    hf_repo(own, "acme/Mine-GGUF", {"mine-Q4_K_M.gguf": write_model(gen / "v", tensor_bytes=64 << 10, seed=73)},
            commit=COMMIT)
    cli.run("adopt", "--from", "hf", env={"HF_HUB_CACHE": str(own)})
    mine = next(x for x in cli.run("list", "--json").json() if x["source"] == "hf://acme/Mine-GGUF")
    assert (mine["hub_repo"], mine["hub_commit"]) == ("acme/Mine-GGUF", COMMIT)
