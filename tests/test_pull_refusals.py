"""What a pull refuses, and when. Each refusal comes as early as the facts
allow, with one clear line, and leaves nothing behind.

Fault server on 127.0.0.1 and ``modelfs`` as a child process, as in
``tests/test_download.py`` and ``tests/test_packs.py``.
"""
# The fault server's fixtures are imported by name, so every test taking one redefines
# that name: F811 is expected in this file.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import CLI, sha, sha_file
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs_store.core import Store
from modelfs_store.download import Downloader
from modelfs_store.errors import GGUFError
from modelfs_store.partial import PartialState
from modelfs_store.pull import PullSource, pull

MB = 1 << 20




def the_error(stderr: str) -> str:
    assert "Traceback" not in stderr
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("modelfs: error: ")]
    return line


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def unsigned_pull(store: Store, url: str, data: bytes, filename: str = "m.gguf") -> Any:
    src = PullSource(url, filename, "weights", sha(data), len(data), source=url)  # type: ignore[arg-type]

    async def main() -> Any:
        async with Downloader(store.blobs, backoff=(0.001, 0.002), max_retries=1) as dl:
            return await pull(store, dl, [src])
    return trio.run(main)


def nothing_left(store: Store, digest: str) -> None:
    assert store.blobs.iter_blobs() == []
    assert not (store.layout.partial / digest).exists(), "an (empty) partial directory stayed behind"
    assert list(store.layout.quarantine.iterdir()) == []


# -- item 4: an unsigned pull parses the GGUF header as its bytes arrive -------------------------------
def test_a_non_gguf_is_refused_at_its_first_bytes_and_leaves_nothing(cli: CLI, store_dir: Path,
                                                                     origin: FaultServer, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    with open(junk, "wb") as f:
        for i in range(64):
            f.write(hashlib.shake_256(i.to_bytes(4, "little")).digest(MB))
    digest = sha_file(junk)
    origin.add("/junk.gguf", junk, rate=32 * MB)  # 2 s for the whole file
    r = cli.run("pull", origin.url("/junk.gguf"), "--sha256", digest, check=False)
    assert r.returncode == 6 and "not a GGUF file" in the_error(r.stderr)
    assert origin.bytes_sent("/junk.gguf") < 16 * MB  # refused at the first bytes, not after 64 MiB
    s = Store.open(store_dir)
    try:
        nothing_left(s, digest)
        assert cli.run("status", "--json").json()["partials"] == []
    finally:
        s.close()


def test_a_header_malformed_deep_inside_is_refused_before_the_file_ends(store: Store, origin: FaultServer,
                                                                        tmp_path: Path) -> None:
    w = write_model(tmp_path / "deep.gguf", tensor_bytes=48 * MB, seed=3, context_length=4096)
    data = bytearray(w.read_bytes())
    key = b"llama.context_length"
    at = data.index(key) + len(key)  # the value type of that KV: 4 (UINT32) becomes 99
    assert data[at:at + 4] == (4).to_bytes(4, "little")
    data[at:at + 4] = (99).to_bytes(4, "little")
    origin.add("/deep.gguf", bytes(data), rate=64 * MB)
    with pytest.raises(GGUFError, match="deep.gguf: .*value type") as e:
        unsigned_pull(store, origin.url("/deep.gguf"), bytes(data), "deep.gguf")
    assert "\n" not in str(e.value) and e.value.exit_code == 6
    assert origin.bytes_sent("/deep.gguf") < 16 * MB
    nothing_left(store, sha(bytes(data)))


def test_a_resumed_partial_that_is_not_a_gguf_is_refused_and_deleted(store: Store, origin: FaultServer) -> None:
    data = b"<html>" + os.urandom(3 * MB)
    digest = sha(data)
    d = store.layout.partial / digest
    d.mkdir(mode=0o700)
    (d / "data").write_bytes(data[:MB])
    PartialState(digest, "http://old", len(data), MB, '"e"', None).save(d / "state.json")
    origin.add("/r.gguf", data, etag='"e"')
    with pytest.raises(GGUFError, match="not a GGUF file.*HTML"):
        unsigned_pull(store, origin.url("/r.gguf"), data, "r.gguf")
    assert origin.requests("/r.gguf") == []  # the bytes on disk were enough to refuse it
    nothing_left(store, digest)


def test_a_gguf_whose_tensor_data_is_short_leaves_no_blob(store: Store, origin: FaultServer,
                                                          tmp_path: Path) -> None:
    """The header is fine (so the transfer completes) but the tensors do not fit: the
    verified blob is refused after its commit, and removed again."""
    w = write_model(tmp_path / "short.gguf", tensor_bytes=2 * MB, seed=4)
    data = w.read_bytes()[:-4096]
    origin.add("/short.gguf", data)
    with pytest.raises(GGUFError, match="truncated"):
        unsigned_pull(store, origin.url("/short.gguf"), data, "short.gguf")
    nothing_left(store, sha(data))


def test_a_gguf_passes_the_check_as_it_arrives_even_after_a_dropped_connection(store: Store, origin: FaultServer,
                                                                               tmp_path: Path) -> None:
    w = write_model(tmp_path / "ok.gguf", tensor_bytes=6 * MB, seed=5)
    data = w.read_bytes()
    origin.add("/ok.gguf", data, drop_after=[100, 3 * MB], ignore_range=True)
    res = unsigned_pull(store, origin.url("/ok.gguf"), data, "ok.gguf")
    assert res.version == 1 and store.blobs.has(sha(data))
    assert [r.status for r in origin.requests("/ok.gguf")] == [200, 200, 200]


# -- item 5: a signed size is checked even when the blob is local ----------------------------------------
@pytest.fixture
def pub(origin: FaultServer) -> Any:
    from test_packs import Publisher

    return Publisher(origin)


@pytest.fixture
def pack_store(tmp_path: Path, pub: Any) -> Any:
    from modelfs_store.keys import trust_key

    s = Store.open(tmp_path / "packs")
    trust_key(s.catalog, "k1", pub.pub("k1"), actor="test")
    yield s
    s.close()


@pytest.mark.parametrize("wrong", ["zero", "plus-one", "one-tib"])
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_a_wrong_signed_size_is_refused_when_the_blob_is_local(pack_store: Store, pub: Any, wrong: str,
                                                               lazy: bool) -> None:
    from modelfs_store.errors import TrustError
    from test_packs import assert_refused_cleanly, run_install

    data = b"GGUF" + os.urandom(100_000)
    art = pub.artifact("demo-Q4_K_M.gguf", data)
    run_install(pack_store, pub.envelope(pub.payload(1, [art])))
    size = {"zero": 0, "plus-one": len(data) + 1, "one-tib": 1 << 40}[wrong]
    bad = pub.envelope(pub.payload(2, [{**art, "size": size}]))
    exc = assert_refused_cleanly(pack_store, pub, lambda: run_install(pack_store, bad, lazy=lazy), TrustError,
                                 "size-mismatch")
    assert exc.exit_code == 7
    assert f"signed as {size} bytes" in str(exc) and f"holds {len(data)} bytes" in str(exc)
    assert [v.version for v in pack_store.catalog.versions("demo")] == [1]
    assert pack_store.catalog.get_model("demo").active_version == 1


def test_a_wrong_signed_size_is_exit_7_through_the_cli(cli: CLI, pub: Any) -> None:
    data = b"GGUF" + os.urandom(50_000)
    art = pub.artifact("demo-Q4_K_M.gguf", data)
    cli.run("keys", "add", "k1", pub.pub("k1"))
    cli.run("pull", pub.serve("v1.json", pub.envelope(pub.payload(1, [art]))))
    r = cli.run("pull", pub.serve("v2.json", pub.envelope(pub.payload(2, [{**art, "size": len(data) + 1}]))),
                check=False)
    assert r.returncode == 7 and "is signed as" in the_error(r.stderr)
    assert [v["version"] for v in cli.run("show", "demo", "--json").json()["versions"]] == [1]


# -- item 6: a --lazy pull of a URL whose secrets the store would not keep -------------------------------
SIGNED_QUERY = "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=3600&X-Amz-Signature=s3cr3t"


def test_a_lazy_pull_of_a_signed_url_is_refused_at_pull_time(pack_store: Store, pub: Any) -> None:
    from modelfs_store.errors import UsageError
    from test_packs import run_install

    data = b"GGUF" + os.urandom(20_000)
    art = pub.artifact("demo-Q4_K_M.gguf", data)
    signed = pub.envelope(pub.payload(1, [{**art, "url": art["url"] + SIGNED_QUERY}]))
    with pytest.raises(UsageError, match="cannot be pulled --lazy") as e:
        run_install(pack_store, signed, lazy=True)
    msg = str(e.value)
    assert "without --lazy" in msg and "s3cr3t" not in msg and "\n" not in msg and e.value.exit_code == 2
    assert not pack_store.catalog.has_model("demo") and pub.artifact_bytes() == 0
    # Eagerly, the full URL fetches it now; only its redacted form is recorded.
    res = run_install(pack_store, signed)
    assert res.outcome == "installed" and pub.artifact_bytes() == len(data)
    [f] = pack_store.catalog.get_version("demo", 1).files
    assert f.url is not None and "X-Amz-Signature=REDACTED" in f.url


@pytest.mark.parametrize("url", ["http://{host}{path}?token=s3cr3tT0k", "http://{host}{path}?download=1&sig=s3cr3tT0k"])
def test_a_lazy_pull_of_a_url_with_a_token_is_refused_through_the_cli(cli: CLI, pub: Any, url: str) -> None:
    """(Userinfo in an artifact URL is refused by the manifest parser already.)"""
    data = b"GGUF" + os.urandom(20_000)
    art = pub.artifact("demo-Q4_K_M.gguf", data)
    host, path = art["url"].split("/", 3)[2], "/" + art["url"].split("/", 3)[3]
    cli.run("keys", "add", "k1", pub.pub("k1"))
    env = pub.serve("v1.json", pub.envelope(pub.payload(1, [{**art, "url": url.format(host=host, path=path)}])))
    r = cli.run("pull", "--lazy", env, check=False)
    assert r.returncode == 2 and "pull the pack without --lazy" in the_error(r.stderr)
    assert "s3cr3tT0k" not in r.stderr  # (not "abc": the artifact's random path may hold that)
    assert cli.run("list", "--json").json() == []
    # A plain URL in the same pack is fine lazily.
    r = cli.run("pull", "--lazy", pub.serve("v1b.json", pub.envelope(pub.payload(1, [art]))))
    assert "not fetched yet" in r.stdout


# -- item 7: channels add never replaces a channel's keys silently ---------------------------------------
def test_channels_add_on_an_existing_url_is_a_conflict_unless_replace(cli: CLI) -> None:
    import sqlite3

    url = "https://packs.example.test/demo.json"
    cli.run("channels", "add", url, "--key", "k1")
    r = cli.run("channels", "add", url, "--key", "mallory", check=False)
    assert r.returncode == 4 and "--replace" in the_error(r.stderr) and "k1" in the_error(r.stderr)
    assert [ch["key_ids"] for ch in cli.run("channels", "list", "--json").json()] == [["k1"]]
    cli.run("channels", "add", url, "--key", "k2", "--key", "k3", "--replace")
    assert [ch["key_ids"] for ch in cli.run("channels", "list", "--json").json()] == [["k2", "k3"]]
    rows = sqlite3.connect(cli.root / "catalog.db").execute(
        "SELECT action, outcome, detail FROM audit WHERE action = 'channel-add' ORDER BY id").fetchall()
    assert [(a, o) for a, o, _ in rows] == [("channel-add", "ok")] * 2  # the refusal changed nothing
    assert '"replaced_key_ids": ["k1"]' in rows[1][2]


# -- item 8: small things in pull ------------------------------------------------------------------------
def test_sha256_help_says_http_and_https(cli: CLI) -> None:
    out = cli.run("pull", "--help").stdout
    assert "https:// sources" not in out and out.count("http(s):// sources") == 2


def test_pulling_a_local_gguf_points_to_import(cli: CLI, tmp_path: Path) -> None:
    w = write_model(tmp_path / "local.gguf")
    for args in (("pull", str(w)), ("pull", "--pack", str(w))):
        r = cli.run(*args, check=False)
        err = the_error(r.stderr)
        assert r.returncode == 2 and "is a GGUF file, not a signed pack envelope" in err
        assert f"modelfs import NAME {w}" in err


@pytest.mark.parametrize(("body", "faults", "found"), [
    (b"", {}, "the server sent an empty body"),
    (b"<!DOCTYPE html><html>sign in</html>", {"content_type": "text/html"}, "an HTML page"),
    (b'{"models": []}', {}, "JSON that is not a signed envelope"),
    (b"\x00\x01junk", {}, "6 bytes that are not a signed envelope"),
    (None, {}, "it could not be fetched: HTTP 404"),
], ids=["empty", "html", "json", "bytes", "404"])
def test_a_pack_url_that_is_not_a_pack_says_what_was_found(cli: CLI, origin: FaultServer, body: bytes | None,
                                                           faults: dict[str, Any], found: str) -> None:
    if body is not None:
        origin.add("/pack.json", body, **faults)
    r = cli.run("pull", origin.url("/pack.json"), check=False)
    err = the_error(r.stderr)
    assert r.returncode == 2 and found in err and "not a signed pack" in err and "--sha256" in err, err
    assert "needs its SHA-256" not in err


def test_a_model_file_url_without_sha256_still_asks_for_it(cli: CLI, origin: FaultServer, tmp_path: Path) -> None:
    origin.add("/big.gguf", write_model(tmp_path / "big.gguf", tensor_bytes=2 * MB))  # over the envelope cap
    r = cli.run("pull", origin.url("/big.gguf"), check=False)
    assert r.returncode == 2 and "needs its SHA-256: pass --sha256 HEX" in the_error(r.stderr)


def test_a_later_eager_pull_fills_the_card_of_a_lazily_pulled_pack(cli: CLI, pub: Any, tmp_path: Path) -> None:
    w = write_model(tmp_path / "demo-Q4_K_M.gguf", tensor_bytes=MB, context_length=8192)
    art = pub.artifact(w.name, w.read_bytes())
    cli.run("keys", "add", "k1", pub.pub("k1"))
    env = pub.serve("v1.json", pub.envelope(pub.payload(1, [art])))
    cli.run("pull", "--lazy", env)
    [row] = cli.run("list", "--json").json()
    assert row["quantization"] is None and row["architecture"] is None and row["context_length"] == 4096
    cli.run("pull", env)  # fetches the weights now
    [row] = cli.run("list", "--json").json()
    assert (row["quantization"], row["architecture"]) == ("Q4_K_M", "llama")
    assert row["context_length"] == 4096  # the signed payload's, not the header's 8192
    [line] = [ln.split() for ln in cli.run("list").stdout.splitlines() if ln.startswith("demo ")]
    assert line[2:5] == ["llama", "Q4_K_M", "4096"]
