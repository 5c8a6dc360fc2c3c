"""Repo-level hub pulls (``hf://org/repo[:QUANT][@REVISION]``) against the hub stand-in.

The stand-in (``tests/faultserver.py`` ``add_hf_repo``) serves what the hub serves: the tree
listing ``/api/models/{repo}/tree/{rev}?recursive=true`` in pages linked by ``Link: <…>;
rel="next"``, and each file's resolve URL answering 302 to a signed CDN URL with
``X-Repo-Commit``, ``X-Linked-Etag`` (the LFS SHA-256) and ``X-Linked-Size``. Its request
log says which files the pull asked about: another quant's are never HEAD or GET.
"""
# ruff: noqa: F811 - the fault server's fixtures are imported by name

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import CLI, sha_file
from faultserver import FaultServer, cdn, origin  # noqa: F401 - fixtures
from ggufgen import write_mmproj, write_model, write_split
from modelfs.cli.pull import pull as pull_command
from modelfs_store import hfrepo
from modelfs_store.core import Store
from modelfs_store.errors import UsageError
from modelfs_store.hf import TreeFile
from test_control import Daemon, daemon  # noqa: F401 - fixture

REPO = "org/tiny-GGUF"
TOKEN = "hf_repotoken0123456789"
SPLIT = [f"tiny-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
OTHERS = ["Q8_0/tiny-Q8_0.gguf", "tiny-Q4_K_S.gguf", "mmproj-tiny-F32.gguf"]  # never to be asked for


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hub")
    (d / "Q8_0").mkdir()
    files = {p.name: p for p in write_split(d, "tiny-Q4_K_M", 3, tensor_bytes=64 << 10, seed=10)}
    files["Q8_0/tiny-Q8_0.gguf"] = write_model(d / "Q8_0" / "tiny-Q8_0.gguf", file_type=7, seed=20)
    files["tiny-Q4_K_S.gguf"] = write_model(d / "tiny-Q4_K_S.gguf", file_type=14, seed=21)
    files["mmproj-tiny-F16.gguf"] = write_mmproj(d / "mmproj-tiny-F16.gguf", seed=30)
    files["mmproj-tiny-F32.gguf"] = write_mmproj(d / "mmproj-tiny-F32.gguf", file_type=0, seed=31)
    return files


README = {"type": "file", "path": "README.md", "size": 12, "oid": "1" * 40}  # a plain git file: no lfs


def publish(origin: FaultServer, cdn: FaultServer, files: dict[str, Path], repo: str = REPO, **kw: object
            ) -> dict[str, str]:
    return origin.add_hf_repo(repo, files, cdn=cdn, token=TOKEN, page_size=3, extra=[README], **kw)


def hub_env(origin: FaultServer) -> dict[str, str]:
    return {"MODELFS_HF_ENDPOINT": origin.origin, "HF_TOKEN": TOKEN}


def asked_about(origin: FaultServer, cdn: FaultServer, digests: dict[str, str], path: str) -> list[str]:
    """Every request of the run that touched ``path`` (its resolve URL or its CDN blob)."""
    blob = f"/repos/{digests[path][:2]}/{digests[path]}"
    return [f"{r.method} {r.path}" for r in origin.requests() + cdn.requests()
            if r.path.endswith("/" + path) or r.path == blob]


def catalog_files(root: Path) -> dict[str, tuple[str, str | None, str | None]]:
    s = Store.open(root)
    try:
        return {r.filename: (r.role, r.hub_path, r.url) for _, _, r in s.catalog.all_files()}
    finally:
        s.close()


# -- acceptance 2 ------------------------------------------------------------------------------------
def test_acceptance_2_a_quant_brings_its_three_shards_and_the_mmproj_as_one_entry(
        cli: CLI, origin: FaultServer, cdn: FaultServer, repo_files: dict[str, Path]) -> None:
    digests = publish(origin, cdn, repo_files)
    r = cli.run("pull", f"hf://{REPO}:Q4_K_M", "--json", env=hub_env(origin))
    result = [json.loads(line) for line in r.stdout.splitlines()][-1]
    assert result["event"] == "result" and result["name"] == "tiny-GGUF-Q4_K_M" and result["signed"] is False
    assert {f["filename"]: f["role"] for f in result["files"]} == {
        SPLIT[0]: "weights", SPLIT[1]: "shard", SPLIT[2]: "shard", "mmproj-tiny-F16.gguf": "mmproj"}
    assert {f["filename"]: f["sha256"] for f in result["files"]} == {
        n: digests[n] for n in [*SPLIT, "mmproj-tiny-F16.gguf"]}

    # Another quant's files (and the other mmproj) were never asked about: no HEAD, no GET.
    for other in OTHERS:
        assert asked_about(origin, cdn, digests, other) == [], other
    # Each chosen file: a HEAD of its resolve URL (the first at the branch, the others at the
    # commit it named), a GET of the URL pinned to that commit, redirected to its CDN blob.
    pinned = f"/{REPO}/resolve/{'a' * 40}/"
    for name in [*SPLIT, "mmproj-tiny-F16.gguf"]:
        assert sorted(m for m in asked_about(origin, cdn, digests, name)) == sorted([
            f"GET {pinned}{name}", f"GET /repos/{digests[name][:2]}/{digests[name]}",
            f"HEAD /{REPO}/resolve/main/{name}" if name == SPLIT[0] else f"HEAD {pinned}{name}"])
    # The listing was read whole, page by page (9 entries, 3 a page), recursively.
    listing = [r for r in origin.requests() if r.path.startswith(f"/api/models/{REPO}/tree/")]
    assert [r.query for r in listing] == ["recursive=true", "recursive=true&cursor=1", "recursive=true&cursor=2"]
    # The token went to the hub's origin (listing and HEADs) and never to the CDN.
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in origin.requests())
    assert cdn.requests() and all("authorization" not in r.headers for r in cdn.requests())

    # One entry: the card from the first shard, the hub's repo and commit, each file's path,
    # the recorded URLs pinned to the commit.
    (v,) = cli.run("show", "tiny-GGUF-Q4_K_M", "--json").json()["versions"]
    assert (v["hub_repo"], v["hub_commit"], v["source"]) == (REPO, "a" * 40, f"hf://{REPO}")
    assert (v["architecture"], v["quantization"]) == ("llama", "Q4_K_M")
    assert v["size"] == sum(repo_files[n].stat().st_size for n in [*SPLIT, "mmproj-tiny-F16.gguf"])
    assert catalog_files(cli.root) == {
        n: (role, n, f"{origin.origin}/{REPO}/resolve/{'a' * 40}/{n}")
        for n, role in zip([*SPLIT, "mmproj-tiny-F16.gguf"], ["weights", "shard", "shard", "mmproj"], strict=True)}
    assert [m["name"] for m in cli.run("list", "--json").json()] == ["tiny-GGUF-Q4_K_M"]
    assert all(x["status"] == "ok" for x in cli.run("verify", "--json").json())

    # Without :QUANT the default order takes Q4_K_M: the same entry, nothing new fetched.
    origin.reset_counts()
    cdn.reset_counts()
    r = cli.run("pull", f"hf://{REPO}", env=hub_env(origin))
    assert "pulled tiny-GGUF-Q4_K_M version 1 (unchanged)" in r.stdout
    assert cdn.requests() == []


def test_the_quant_is_case_insensitive_and_a_revision_pins_its_commit(
        cli: CLI, origin: FaultServer, cdn: FaultServer, repo_files: dict[str, Path]) -> None:
    commit = "b" * 40
    digests = publish(origin, cdn, repo_files, revision="v1.0", commit=commit)
    r = cli.run("pull", f"hf://{REPO}:q8_0@v1.0", "--name", "tiny8", env=hub_env(origin))
    assert "pulled tiny8 version 1: 2 file(s)" in r.stdout
    # The listing of the revision, the first HEAD at the revision, the next at its commit.
    assert {r.path for r in origin.requests() if "/api/" in r.path} == {f"/api/models/{REPO}/tree/v1.0"}
    heads = [r.path for r in origin.requests() if r.method == "HEAD"]
    assert heads == [f"/{REPO}/resolve/v1.0/Q8_0/tiny-Q8_0.gguf", f"/{REPO}/resolve/{commit}/mmproj-tiny-F16.gguf"]
    assert catalog_files(cli.root) == {
        "tiny-Q8_0.gguf": ("weights", "Q8_0/tiny-Q8_0.gguf",
                           f"{origin.origin}/{REPO}/resolve/{commit}/Q8_0/tiny-Q8_0.gguf"),
        "mmproj-tiny-F16.gguf": ("mmproj", "mmproj-tiny-F16.gguf",
                                 f"{origin.origin}/{REPO}/resolve/{commit}/mmproj-tiny-F16.gguf")}
    (v,) = cli.run("show", "tiny8", "--json").json()["versions"]
    assert (v["hub_commit"], v["quantization"]) == (commit, "Q8_0")
    for other in [*SPLIT, "tiny-Q4_K_S.gguf", "mmproj-tiny-F32.gguf"]:
        assert asked_about(origin, cdn, digests, other) == [], other


def test_ambiguous_no_match_and_incomplete_quants_are_refused_before_any_file(
        cli: CLI, origin: FaultServer, cdn: FaultServer, repo_files: dict[str, Path]) -> None:
    publish(origin, cdn, repo_files)
    env = hub_env(origin)
    r = cli.run("pull", f"hf://{REPO}:Q4_K", check=False, env=env)
    assert r.returncode == 2 and "2 different weights match 'Q4_K'" in r.stderr
    assert "tiny-Q4_K_M-00001-of-00003.gguf" in r.stderr and "tiny-Q4_K_S.gguf" in r.stderr
    r = cli.run("pull", f"hf://{REPO}:Q5_K_M", check=False, env=env)
    assert r.returncode == 2 and r.stderr.strip().endswith(
        "no weights match 'Q5_K_M'; the repository has: Q8_0, Q4_K_M, Q4_K_S")
    # A split set with a shard missing from the repository.
    partial = {n: repo_files[n] for n in (SPLIT[0], SPLIT[2])}
    origin.add_hf_repo("org/broken", partial, cdn=cdn)
    r = cli.run("pull", "hf://org/broken:Q4_K_M", check=False, env=env)
    assert r.returncode == 2 and "lacks tiny-Q4_K_M-00002-of-00003.gguf" in r.stderr
    r = cli.run("pull", "hf://org/broken:Q4_K_M@main:x", check=False, env=env)
    assert r.returncode == 2 and "quant before the revision" in r.stderr
    r = cli.run("pull", "hf://org/tiny-Q4_K_M.gguf", check=False, env=env)  # the repository left out
    assert r.returncode == 2 and "names a file without its repository" in r.stderr
    r = cli.run("pull", f"hf://{REPO}:Q4_K_M", "--sha256", "a" * 64, check=False, env=env)
    assert r.returncode == 2 and "--sha256, --size and --mmproj are for a single file" in r.stderr
    # A gated repository without the token: the hub's refusal, said as such.
    r = cli.run("pull", f"hf://{REPO}:Q4_K_M", check=False,
                env={**env, "HF_TOKEN": "", "HF_HOME": str(cli.root.parent / "no-hf-home")})
    assert r.returncode == 9 and "access denied by the hub (HTTP 401)" in r.stderr
    # Nothing but listings was asked; nothing was recorded.
    assert {r.method for r in origin.requests()} == {"GET"} and cdn.requests() == []
    assert all("/api/models/" in r.path for r in origin.requests())
    assert cli.run("list", "--json").json() == []


def test_a_shard_whose_bytes_are_not_the_hubs_sha256_is_refused_and_nothing_shows(
        cli: CLI, origin: FaultServer, cdn: FaultServer, repo_files: dict[str, Path]) -> None:
    digests = publish(origin, cdn, repo_files)
    bad = digests[SPLIT[2]]
    # The CDN serves other bytes (past the header: the hash, not the GGUF check, refuses them).
    cdn.resources[f"/repos/{bad[:2]}/{bad}"].corrupt_every = repo_files[SPLIT[2]].stat().st_size - 10
    r = cli.run("pull", f"hf://{REPO}:Q4_K_M", check=False,
                env={**hub_env(origin), "MODELFS_MAX_RETRIES": "1", "MODELFS_BACKOFF": "0.01/0.01"})
    assert r.returncode == 5 and "failed verification" in r.stderr and "Traceback" not in r.stderr
    assert cli.run("list", "--json").json() == []
    blobs = cli.root / "blobs" / "sha256"
    assert [p for p in blobs.rglob("*") if p.is_file()] == []  # the two good shards went too
    # The listing and a file's metadata that disagree: refused before a byte is fetched.
    origin.add_hf_repo("org/liar", {"tiny-Q4_K_S.gguf": repo_files["tiny-Q4_K_S.gguf"]}, cdn=cdn)
    origin.resources["/org/liar/resolve/main/tiny-Q4_K_S.gguf"].headers["X-Linked-Etag"] = f'"{"0" * 64}"'
    cdn.reset_counts()
    r = cli.run("pull", "hf://org/liar", check=False, env=hub_env(origin))
    assert r.returncode == 5 and "the hub's listing says SHA-256" in r.stderr
    assert cdn.requests() == []


def test_a_next_page_on_another_origin_is_refused(cli: CLI, origin: FaultServer, cdn: FaultServer) -> None:
    # A hub that fails once (503) is asked again, as a HEAD is.
    origin.add_hf_repo("org/flaky", {})
    origin.resources["/api/models/org/flaky/tree/main"].fail_first = [503]
    r = cli.run("pull", "hf://org/flaky", check=False,
                env={**hub_env(origin), "MODELFS_MAX_RETRIES": "2", "MODELFS_BACKOFF": "0.01/0.01"})
    assert r.returncode == 2 and "the repository has no GGUF weights" in r.stderr
    assert [x.status for x in origin.requests("/api/models/org/flaky/tree/main")] == [503, 200]
    cdn.add("/page2", b"[]", content_type="application/json")
    origin.add(f"/api/models/{REPO}/tree/main", b"[]", content_type="application/json",
               headers={"Link": f'<{cdn.url("/page2")}>; rel="next"'})
    r = cli.run("pull", f"hf://{REPO}", check=False, env=hub_env(origin))
    assert r.returncode == 9 and "another origin" in r.stderr
    assert cdn.requests() == []
    origin.add(f"/api/models/{REPO}/tree/main", b'{"error": "nope"}', content_type="application/json")
    r = cli.run("pull", f"hf://{REPO}", check=False, env=hub_env(origin))
    assert r.returncode == 9 and "listing is malformed (not a list)" in r.stderr
    r = cli.run("pull", "hf://org/missing", check=False, env=hub_env(origin))
    assert r.returncode == 9 and "no such repository or revision" in r.stderr


def test_a_single_file_pull_of_a_first_shard_brings_its_siblings(
        cli: CLI, origin: FaultServer, cdn: FaultServer, repo_files: dict[str, Path]) -> None:
    publish(origin, cdn, repo_files)
    r = cli.run("pull", f"hf://{REPO}/{SPLIT[0]}", env=hub_env(origin))
    assert "pulled tiny-Q4_K_M version 1: 3 file(s)" in r.stdout
    assert {n: role for n, (role, _, _) in catalog_files(cli.root).items()} == {
        SPLIT[0]: "weights", SPLIT[1]: "shard", SPLIT[2]: "shard"}
    r = cli.run("pull", f"hf://{REPO}/{SPLIT[1]}", check=False, env=hub_env(origin))
    assert r.returncode == 2 and "shard 2 of 3; pull the first one" in r.stderr
    # An https first shard: nothing vouches for its siblings.
    origin.add(f"/{SPLIT[0]}", repo_files[SPLIT[0]])
    r = cli.run("pull", origin.url(f"/{SPLIT[0]}"), "--sha256", sha_file(repo_files[SPLIT[0]]), check=False)
    assert r.returncode == 2 and "an https pull has no SHA-256 for the others" in r.stderr
    assert not origin.requests(f"/{SPLIT[0]}")


# -- choosing, without a network -----------------------------------------------------------------
def _tree(*paths: str) -> list[TreeFile]:
    return [TreeFile(p, 1, "0" * 64) for p in paths]


def test_choosing_prefers_a_whole_label_and_documents_its_defaults() -> None:
    files = _tree("m-Q6_K.gguf", "m-Q6_K_L.gguf", "m.IQ4_XS.gguf", "mmproj-m-f32.gguf", "mmproj-m-bf16.gguf",
                  "sub/mmproj-m-Q6_K.gguf", "m-Q4_K_M.gguf.part")
    c = hfrepo.choose(files, "q6_k", "hf://o/r")
    assert ([f.path for f in c.weights], c.mmproj and c.mmproj.path, c.label) == \
        (["m-Q6_K.gguf"], "sub/mmproj-m-Q6_K.gguf", "Q6_K")
    c = hfrepo.choose(files, None, "hf://o/r")  # no Q4_K_M: IQ4_XS is next in the order
    assert ([f.path for f in c.weights], c.label) == (["m.IQ4_XS.gguf"], "IQ4_XS")
    assert hfrepo.choose(_tree("b.gguf", "a.gguf", "mmproj-x-f32.gguf", "mmproj-x-bf16.gguf"), None,
                         "s").files() == [("weights", TreeFile("a.gguf", 1, "0" * 64)),
                                          ("mmproj", TreeFile("mmproj-x-bf16.gguf", 1, "0" * 64))]
    with pytest.raises(UsageError, match="only a multimodal projector"):
        hfrepo.choose(_tree("mmproj-x.gguf", "README.md"), None, "s")
    assert hfrepo.parse_repo_ref("hf://org/r:Q4_K_M@refs%2Fpr%2F1") == hfrepo.RepoRef("org/r", "Q4_K_M", "refs/pr/1")
    assert not hfrepo.is_repo_ref("hf://org/r/file.gguf") and hfrepo.is_repo_ref("hf://org/r:Q8_0")
    # The help and the docs name the default order and the mmproj preference as the code has them.
    help_text = " ".join((pull_command.help or "").split())
    assert ", ".join(hfrepo.DEFAULT_QUANTS) in help_text and "F16, BF16, F32" in help_text
    docs = " ".join((Path(__file__).parent.parent / "docs" / "design.md").read_text().split())
    assert ", ".join(hfrepo.DEFAULT_QUANTS) in docs


# -- through the daemon ---------------------------------------------------------------------------
@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                    reason="!!! /dev/fuse is missing: the daemon's repository pull CANNOT be tested here !!!")
def test_a_repository_pull_handed_to_the_daemon_gives_the_same_entry(
        daemon: Daemon, origin: FaultServer, cdn: FaultServer, repo_files: dict[str, Path]) -> None:  # noqa: F811
    digests = publish(origin, cdn, repo_files)
    daemon.cli.overrides["MODELFS_HF_ENDPOINT"] = origin.origin  # the daemon's hub; the token comes with the job
    mount = daemon.start()
    r = daemon.cli.run("pull", f"hf://{REPO}:q4_k_m", process=True, env={"HF_TOKEN": TOKEN})
    assert "pulled tiny-GGUF-Q4_K_M version 1: 4 file(s)" in r.stdout, r.stderr
    (job,) = daemon.call("GET", "/v1/pulls")
    assert (job["state"], job["source"], job["model"]) == ("done", f"hf://{REPO}:q4_k_m", "tiny-GGUF-Q4_K_M")
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in origin.requests())
    for other in OTHERS:
        assert asked_about(origin, cdn, digests, other) == [], other
    # In the mount, the shards sit beside the first one under their own names.
    folder = mount.path / "tiny-GGUF-Q4_K_M"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".versions", *SPLIT, "mmproj-tiny-F16.gguf", "model.json"])
    for name in SPLIT:
        assert sha_file(folder / name) == digests[name]


def test_the_app_local_cache_refuses_one_shard_of_a_split_model(
        origin: FaultServer, cdn: FaultServer, repo_files: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared store keeps a split model together; the app-local cache (one file an
    entry) would hand a runtime a first shard without the rest, so it refuses before a request."""
    from modelfs.client import LocalModelDownloadManager, ModelSource

    publish(origin, cdn, repo_files)
    monkeypatch.setenv("MODELFS_HF_ENDPOINT", origin.origin)
    manager = LocalModelDownloadManager(tmp_path / "cache")
    with pytest.raises(UsageError, match="one of 3 files of a split model: it needs the shared store"):
        manager.ensure_model(ModelSource.parse(f"hf://{REPO}/{SPLIT[0]}"))
    assert origin.requests() == []
