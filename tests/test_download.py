"""Resumable, verified, deduplicated downloads, against a real fault-injecting server.

Layer 2 of DESIGN §7: every test talks to ``tests/faultserver.py`` over real sockets on
127.0.0.1. In-process tests drive :class:`store.download.Downloader` under ``trio.run``
with small timeouts; the acceptance tests run ``python -m modelfs pull`` as a child.
Every fault ends in a verified blob or a clear one-line error, and :func:`assert_clean`
checks that nothing unverified is ever visible under ``blobs/``.
"""
# The fault server's fixtures are imported by name (``from faultserver import origin``),
# so every test taking one redefines that name: F811 is expected in this file.
# ruff: noqa: F811

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import trio

from conftest import CLI, blob_data, sha, sha_file, wait_for
from faultserver import FaultServer, cdn, origin  # noqa: F401 - fixtures
from ggufgen import write_mmproj, write_model
from modelfs_store.catalog import FileRecord
from modelfs_store.core import Store
from modelfs_store.download import Downloader, FetchResult, discard_partial, list_partials
from modelfs_store.errors import Conflict, FetchError, IntegrityError, NotFound, OfflineError, SpaceError
from modelfs_store.partial import PartialState

MB = 1 << 20
FAST = {"stall_timeout": 5.0, "backoff": (0.01, 0.05), "max_retries": 3}




@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()



def fetch(store: Store, url: str, data: bytes | None = None, *, digest: str | None = None,
          size: int | None | object = ..., headers=None, **opts) -> FetchResult:
    digest = digest or sha(data)
    if size is ...:
        size = len(data) if data is not None else None

    async def main() -> FetchResult:
        async with Downloader(store.blobs, **{**FAST, **opts}) as dl:
            return await dl.fetch(url, sha256=digest, size=size, headers=headers)
    return trio.run(main)


def assert_clean(store: Store) -> None:
    """Everything under blobs/ is verified; nothing else is visible."""
    for name in store.blobs.iter_blobs():
        assert sha_file(store.blobs.path(name)) == name


def quarantined(store: Store) -> list[str]:
    return sorted(p.name for p in store.layout.quarantine.iterdir())


# -- the happy path, dedup, ensure ------------------------------------------------
def test_fetch_verifies_and_dedups(store, origin):
    data = blob_data(3 * MB + 123)
    origin.add("/m.gguf", data)
    r = fetch(store, origin.url("/m.gguf"), data)
    assert r.new and r.size == len(data) and r.bytes_transferred == len(data)
    assert r.path.read_bytes() == data and (r.path.stat().st_mode & 0o777) == 0o444
    assert r.etag and r.last_modified
    again = fetch(store, origin.url("/m.gguf"), data)
    assert not again.new and again.bytes_transferred == 0
    assert origin.bytes_sent("/m.gguf") == len(data)
    assert list_partials(store) == [] and not any(store.layout.partial.iterdir())
    assert_clean(store)


def test_empty_file(store, origin):
    origin.add("/empty", b"")
    assert fetch(store, origin.url("/empty"), b"").size == 0


def test_ensure_fetches_once_then_answers_locally(store, origin):
    data = blob_data(MB, seed=3)
    origin.add("/e", data)
    rec = FileRecord("e.gguf", "weights", len(data), sha(data), url=origin.url("/e"))

    async def main():
        async with Downloader(store.blobs, **FAST) as dl:
            return (await dl.ensure(rec)).path, (await dl.ensure(rec)).path
    a, b = trio.run(main)
    assert a == b == store.blobs.path(sha(data))
    assert len(origin.requests("/e")) == 1


def test_ensure_reports_validators_and_the_store_records_them(store, origin):
    """The downloader writes no SQL: ensure returns the validators, Store.record_validators
    keeps them on the file rows (what the mount does after a fetch on open)."""
    data = blob_data(MB, seed=4)
    origin.add("/v", data)
    rec = FileRecord("v.gguf", "weights", len(data), sha(data), url=origin.url("/v"))
    store.catalog.ensure_model("v")
    store.catalog.add_version("v", 1, [rec], signed=False)

    async def main():
        async with Downloader(store.blobs, **FAST) as dl:
            return await dl.ensure(rec), await dl.ensure(rec)
    first, again = trio.run(main)
    assert first.new and first.etag and first.last_modified and not again.new
    [(_, _, before)] = store.catalog.all_files()
    assert (before.etag, before.last_modified) == (None, None)  # ensure wrote nothing
    store.record_validators(rec, again)  # nothing new fetched: nothing to record
    store.record_validators(rec, first)
    [(_, _, after)] = store.catalog.all_files()
    assert (after.etag, after.last_modified) == (first.etag, first.last_modified)


def test_ensure_refuses_a_redacted_signed_url(store):
    rec = FileRecord("e.gguf", "weights", 1, "a" * 64, url="https://cdn.test/e?X-Amz-Signature=REDACTED")

    async def main():
        async with Downloader(store.blobs, **FAST) as dl:
            await dl.ensure(rec)
    with pytest.raises(FetchError, match="signed"):
        trio.run(main)


# -- resume rules ---------------------------------------------------------------------
@pytest.mark.parametrize("direct_io", [False, True])
def test_dropped_connection_resumes_with_range_and_if_range(store, origin, direct_io):
    data = blob_data(6 * MB + 77, seed=1)
    cut = 2 * MB + 5
    origin.add("/d", data, drop_after=cut)
    r = fetch(store, origin.url("/d"), data, direct_io=direct_io)
    assert r.new and r.bytes_transferred == len(data)
    first, second = origin.requests("/d")
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={cut}-"
    assert second.headers["if-range"] == r.etag and second.status == 206
    assert origin.bytes_sent("/d") == len(data)
    assert_clean(store)


@pytest.mark.parametrize("direct_io", [False, True])
def test_resume_from_an_unaligned_partial_on_disk(store, origin, direct_io):
    data = blob_data(9 * MB + 4321, seed=26)
    digest = sha(data)
    present = 5 * MB + 123  # what a crashed run left: not a multiple of any block size
    d = store.layout.partial / digest
    d.mkdir(mode=0o700)
    (d / "data").write_bytes(data[:present] + b"garbage past the checkpoint")
    PartialState(digest, "http://old", len(data), present, '"e1"', None).save(d / "state.json")
    origin.add("/u", data, etag='"e1"')
    r = fetch(store, origin.url("/u"), data, direct_io=direct_io)
    assert r.bytes_transferred == len(data) - present
    assert origin.requests("/u")[0].headers["range"] == f"bytes={present}-"
    assert r.path.read_bytes() == data
    assert_clean(store)


def test_200_to_a_range_request_restarts_from_zero(store, origin):
    data = blob_data(3 * MB, seed=2)
    origin.add("/r", data, drop_after=MB, ignore_range=True)
    fetch(store, origin.url("/r"), data)
    reqs = origin.requests("/r")
    assert reqs[1].headers.get("range") == f"bytes={MB}-" and reqs[1].status == 200
    assert origin.bytes_sent("/r") == MB + len(data)
    assert_clean(store)


def test_206_with_wrong_content_range_restarts(store, origin):
    data = blob_data(3 * MB, seed=4)
    origin.add("/w", data, drop_after=MB, wrong_range=True)
    fetch(store, origin.url("/w"), data)
    reqs = origin.requests("/w")
    assert [r.status for r in reqs] == [200, 206, 200]
    assert "range" not in reqs[2].headers
    assert_clean(store)


def test_416_discards_the_partial_and_restarts(store, origin):
    data = blob_data(3000, seed=5)
    digest = sha(data)
    # The state a previous run left: 5000 bytes of something, size unknown.
    d = store.layout.partial / digest
    d.mkdir(mode=0o700)
    (d / "data").write_bytes(b"x" * 5000)
    PartialState(digest, "http://old", None, 5000, None, None).save(d / "state.json")
    origin.add("/s", data)
    r = fetch(store, origin.url("/s"), digest=digest, size=None)
    assert r.size == 3000
    assert [x.status for x in origin.requests("/s")] == [416, 200]
    assert_clean(store)


def test_changed_validator_in_206_discards_the_partial(store, origin):
    data = blob_data(3 * MB, seed=6)
    origin.add("/c", data, drop_after=MB, change_etag=True, ignore_if_range=True)
    fetch(store, origin.url("/c"), data)
    reqs = origin.requests("/c")
    assert reqs[1].status == 206 and "range" not in reqs[2].headers
    assert_clean(store)


def test_changed_etag_with_if_range_honoured_gets_200(store, origin):
    data = blob_data(3 * MB, seed=7)
    origin.add("/c2", data, drop_after=MB, change_etag=True)
    fetch(store, origin.url("/c2"), data)
    assert [r.status for r in origin.requests("/c2")] == [200, 200]


def test_server_ignoring_if_range_is_caught_by_the_hash_and_refetched_once(store, origin):
    old, new = blob_data(4 * MB, seed=8), blob_data(4 * MB, seed=9)
    # Upstream changes after the first (cut) GET; the server then ignores If-Range and
    # sends no validator, so the spliced file can only be caught by the final hash.
    origin.add("/f", old, drop_after=MB,
               after_first_get={"data": new, "etag": None, "last_modified": None, "ignore_if_range": True})
    r = fetch(store, origin.url("/f"), new)
    assert r.new and r.path.read_bytes() == new
    assert len(quarantined(store)) == 1
    reqs = origin.requests("/f")
    assert [x.status for x in reqs] == [200, 206, 200] and "range" not in reqs[2].headers
    assert_clean(store)


def test_corrupted_transfer_is_quarantined_and_retried_once_from_zero(store, origin):
    data = blob_data(3 * MB, seed=10)
    origin.add("/x", data, corrupt_at=MB + 17)
    r = fetch(store, origin.url("/x"), data)
    assert r.new and len(quarantined(store)) == 1
    assert [("range" in x.headers) for x in origin.requests("/x")] == [False, False]
    assert_clean(store)


def test_corrupted_twice_is_a_clear_error(store, origin):
    data = blob_data(2 * MB, seed=11)
    origin.add("/x2", data, corrupt_at=5, corrupt_times=2)
    with pytest.raises(IntegrityError) as e:
        fetch(store, origin.url("/x2"), data)
    msg = str(e.value)
    assert "failed verification twice" in msg and "\n" not in msg
    # Both transfers brought the same bad bytes: quarantine keeps one copy per content.
    assert len(quarantined(store)) == 1 and store.blobs.iter_blobs() == []
    assert list_partials(store) == []


# -- bodies that must not be accepted ------------------------------------------------------
def test_endless_body_is_refused(store, origin):
    data = blob_data(MB, seed=12)
    origin.add("/inf", data, endless=True)
    with pytest.raises(FetchError, match="more than the expected"):
        fetch(store, origin.url("/inf"), data)
    assert store.blobs.iter_blobs() == []


def test_endless_body_without_known_size_is_refused(store, origin):
    origin.add("/inf2", b"", endless=True)
    with pytest.raises(FetchError, match="how large"):
        fetch(store, origin.url("/inf2"), digest="b" * 64, size=None)


def test_captive_portal_html_is_refused_with_a_clear_message(store, origin):
    data = blob_data(2 * MB, seed=13)
    page = b"<html><body>Please log in to the hotel Wi-Fi</body></html>"
    origin.add("/p", page, content_type="text/html; charset=utf-8", ignore_range=True)
    with pytest.raises(FetchError, match="HTML page") as e:
        fetch(store, origin.url("/p"), data)
    assert "\n" not in str(e.value)
    assert store.blobs.iter_blobs() == [] and list_partials(store) == []


def test_captive_portal_without_known_size_fails_the_hash_and_says_html(store, origin):
    origin.add("/p2", b"<html>login</html>", content_type="text/html")
    with pytest.raises(IntegrityError, match="HTML"):
        fetch(store, origin.url("/p2"), digest="c" * 64, size=None)
    assert store.blobs.iter_blobs() == []


def test_no_space_refused_before_any_byte(store, origin):
    origin.add("/big", b"x")
    with pytest.raises(SpaceError):
        fetch(store, origin.url("/big"), digest="d" * 64, size=1 << 55)
    assert origin.requests("/big") == []


# -- retries, stalls, slowness ---------------------------------------------------------------
def test_5xx_then_success(store, origin):
    data = blob_data(MB, seed=14)
    origin.add("/5", data, fail_first=[500, 503])
    fetch(store, origin.url("/5"), data)
    assert [r.status for r in origin.requests("/5")] == [500, 503, 200]


def test_5xx_forever_is_a_clear_error(store, origin):
    origin.add("/55", b"x", fail_first=[503] * 20)
    with pytest.raises(FetchError, match="HTTP 503"):
        fetch(store, origin.url("/55"), b"x", max_retries=2)
    assert len(origin.requests("/55")) == 3


def _recording_sleep(delays: list[float]):
    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        await trio.sleep(0)
    return sleep


def test_429_honours_retry_after_capped(store, origin):
    data = blob_data(1000, seed=15)
    origin.add("/429", data, fail_first=[429], retry_after="7")
    delays: list[float] = []
    fetch(store, origin.url("/429"), data, sleep=_recording_sleep(delays))
    assert len(delays) == 1 and 7 <= delays[0] < 7.1
    origin.add("/429b", data, fail_first=[429], retry_after="86400")
    delays.clear()
    fetch(store, origin.url("/429b"), data, digest=sha(data), sleep=_recording_sleep(delays),
          retry_after_cap=2.0)
    assert len(delays) == 0  # blob already present: nothing fetched at all
    store.blobs.remove(sha(data))
    fetch(store, origin.url("/429b"), data, sleep=_recording_sleep(delays), retry_after_cap=2.0)
    assert len(delays) == 1 and 2 <= delays[0] < 2.1


def test_backoff_is_exponential_with_jitter(store, origin):
    origin.add("/bo", b"x", fail_first=[500] * 4)
    delays: list[float] = []
    fetch(store, origin.url("/bo"), b"x", sleep=_recording_sleep(delays), backoff=(1.0, 30.0), max_retries=5)
    assert len(delays) == 4
    for i, d in enumerate(delays):
        assert 2 ** i * 0.5 <= d <= 2 ** i


def test_stall_reconnects_and_resumes(store, origin):
    data = blob_data(3 * MB, seed=16)
    origin.add("/st", data, stall_after=MB)
    r = fetch(store, origin.url("/st"), data, stall_timeout=0.3)
    assert r.new
    reqs = origin.requests("/st")
    assert len(reqs) == 2 and reqs[1].headers["range"] == f"bytes={MB}-"


def test_trickle_hits_the_minimum_speed_and_fails_clearly(store, origin):
    data = blob_data(1000, seed=17)
    origin.add("/t", data, rate=1)
    with pytest.raises(FetchError, match="too slow"):
        fetch(store, origin.url("/t"), data, min_speed=(500, 0.3), max_retries=1)
    # What trickled in is kept for a later resume.
    assert store.blobs.iter_blobs() == []


def test_connection_refused_is_offline(store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OfflineError, match="connection refused"):
        fetch(store, f"http://127.0.0.1:{port}/m", b"x", max_retries=1)


def test_offline_store_never_touches_the_network(store, origin):
    data = blob_data(100, seed=18)
    origin.add("/o", data)
    with pytest.raises(OfflineError, match="offline"):
        fetch(store, origin.url("/o"), data, offline=True)
    assert origin.requests() == []
    fetch(store, origin.url("/o"), data)
    assert fetch(store, origin.url("/o"), data, offline=True).path.exists()


def test_http_errors_are_clear(store, origin):
    with pytest.raises(FetchError, match="404") as e:
        fetch(store, origin.url("/nope"), b"x")
    assert str(e.value).startswith("http://127.0.0.1")
    origin.add("/auth", b"x", require_auth="Bearer t")
    with pytest.raises(FetchError, match="401"):
        fetch(store, origin.url("/auth"), b"x")


# -- redirects -------------------------------------------------------------------------------
def test_cross_origin_redirect_drops_authorization_and_custom_headers(store, origin, cdn):
    data = blob_data(MB, seed=19)
    cdn.add("/blob", data)
    origin.add_redirect("/same", "/hop")
    origin.add_redirect("/hop", cdn.url("/blob?X-Amz-Signature=abc"))
    fetch(store, origin.url("/same"), data,
          headers={"Authorization": "Bearer s3cret", "X-Api-Key": "k", "Accept": "*/*"})
    hop = origin.requests("/hop")[0].headers
    assert hop["authorization"] == "Bearer s3cret" and hop["x-api-key"] == "k"  # same origin keeps them
    got = cdn.requests("/blob")[0]
    assert "authorization" not in got.headers and "x-api-key" not in got.headers
    assert got.headers["accept"] == "*/*" and got.query == "X-Amz-Signature=abc"


def test_redirect_limit(store, origin):
    data = blob_data(100, seed=20)
    origin.add("/r10", data)
    for i in range(10):
        origin.add_redirect(f"/r{i}", f"/r{i + 1}")
    fetch(store, origin.url("/r0"), data)  # exactly 10 hops: fine
    store.blobs.remove(sha(data))
    origin.add_redirect("/rx", "/r0")
    with pytest.raises(FetchError, match="too many redirects"):
        fetch(store, origin.url("/rx"), data)


def test_https_to_http_downgrade_is_refused(store, origin):
    data = blob_data(100, seed=21)
    origin.add("/plain", data)
    with FaultServer(tls=True) as secure:
        secure.add_redirect("/m", origin.url("/plain"))
        secure.add("/ok", data)
        ctx = ssl.create_default_context(cafile=secure.ca_file)
        with pytest.raises(FetchError, match="https to plain http"):
            fetch(store, secure.url("/m"), data, verify=ctx)
        assert origin.requests("/plain") == []
        assert fetch(store, secure.url("/ok"), data, verify=ctx).new  # TLS itself works


def test_tls_body_path_resumes_too(store):
    # Over TLS the body goes through h11 (no direct socket reads): same rules, same result.
    data = blob_data(5 * MB + 999, seed=27)
    with FaultServer(tls=True) as secure:
        secure.add("/t", data, drop_after=2 * MB + 1)
        ctx = ssl.create_default_context(cafile=secure.ca_file)
        r = fetch(store, secure.url("/t"), data, verify=ctx)
        assert r.new and r.bytes_transferred == len(data)
        assert secure.requests("/t")[1].headers["range"] == f"bytes={2 * MB + 1}-"
    assert_clean(store)


# -- one transfer per blob, cancellation, partial state ------------------------------------------
def test_concurrent_fetches_in_one_process_join_one_transfer(store, origin):
    data = blob_data(4 * MB, seed=22)
    origin.add("/j", data, rate=16 * MB)
    seen: list[int] = []

    async def main():
        results = []
        async with Downloader(store.blobs, **FAST) as dl:
            async def one():
                results.append(await dl.fetch(origin.url("/j"), sha256=sha(data), size=len(data),
                                              progress=seen.append))
            async with trio.open_nursery() as n:
                for _ in range(3):
                    n.start_soon(one)
        return results
    results = trio.run(main)
    assert origin.bytes_sent("/j") == len(data) and len(origin.requests("/j")) == 1
    assert sorted(r.new for r in results) == [False, False, True]
    assert sum(seen) == 3 * len(data)  # joiners see the owner's progress


def test_cancelled_fetch_keeps_a_resumable_partial(store, origin):
    data = blob_data(8 * MB, seed=23)
    origin.add("/k", data, rate=8 * MB)

    async def main():
        async with Downloader(store.blobs, **FAST) as dl:
            with trio.move_on_after(0.5):
                await dl.fetch(origin.url("/k"), sha256=sha(data), size=len(data))
    trio.run(main)
    (p,) = list_partials(store)
    assert p.sha256 == sha(data) and 0 < p.bytes_present < len(data) and not p.active
    assert p.expected_size == len(data) and p.url == origin.url("/k") and p.etag
    state = json.loads((store.layout.partial / sha(data) / "state.json").read_text())
    assert state["bytes"] == p.bytes_present == (store.layout.partial / sha(data) / "data").stat().st_size
    origin.add("/k", data)  # full speed now
    r = fetch(store, origin.url("/k"), data)
    assert r.bytes_transferred == len(data) - p.bytes_present
    assert origin.requests("/k")[-1].headers["range"] == f"bytes={p.bytes_present}-"
    assert list_partials(store) == []
    assert_clean(store)


def test_discard_partial(store, origin):
    with pytest.raises(NotFound):
        discard_partial(store, "e" * 64)
    data = blob_data(4 * MB, seed=24)
    origin.add("/dp", data, drop_after=MB)
    with pytest.raises(FetchError):
        fetch(store, origin.url("/dp"), data, max_retries=0)
    (p,) = list_partials(store)
    from modelfs_store.partial import PartialLock
    lock = PartialLock.try_acquire(store.layout.partial / p.sha256)
    try:
        assert list_partials(store)[0].active
        with pytest.raises(Conflict):
            discard_partial(store, p.sha256)
    finally:
        lock.release()
    assert MB <= discard_partial(store, p.sha256) < MB + 4096
    assert list_partials(store) == [] and not (store.layout.partial / p.sha256).exists()


def test_crash_after_checkpoint_loses_at_most_64_mib(tmp_path, origin):
    # A GGUF: an unsigned pull refuses anything else at its first bytes.
    data = write_model(tmp_path / "cp.gguf", tensor_bytes=80 * MB, seed=25).read_bytes()
    size = len(data)
    origin.add("/cp", data)
    cli = CLI(tmp_path / "store")
    r = cli.run("pull", origin.url("/cp"), "--sha256", sha(data), check=False,
                env={"MODELFS_CRASH_AT": "download-after-checkpoint"}, process=True)
    assert r.returncode == -signal.SIGKILL
    store = Store.open(tmp_path / "store")
    try:
        (p,) = list_partials(store)
        assert 64 * MB <= p.bytes_present < 72 * MB  # the first checkpoint
        assert store.blobs.iter_blobs() == []
        first = origin.bytes_sent("/cp")
        r = fetch(store, origin.url("/cp"), data)
        assert r.bytes_transferred == size - p.bytes_present == origin.bytes_sent("/cp") - first
    finally:
        store.close()


# -- the CLI -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("gguf")
    w = write_model(d / "tiny-Q4_K_M.gguf", arch="llama", context_length=8192, tensor_bytes=2 * MB, seed=30)
    m = write_mmproj(d / "mmproj-tiny-f16.gguf", seed=31)
    return w, m


def test_cli_pull_url_records_an_unsigned_redacted_version(cli, origin, small_gguf):
    w, m = small_gguf
    origin.add("/files/tiny-Q4_K_M.gguf", w.read_bytes())
    origin.add("/files/mmproj-tiny-f16.gguf", m.read_bytes())
    url = origin.url("/files/tiny-Q4_K_M.gguf") + "?download=1&token=sekrit"
    r = cli.run("pull", url, "--sha256", sha_file(w), "--name", "tiny",
                "--mmproj", origin.url("/files/mmproj-tiny-f16.gguf"), "--mmproj-sha256", sha_file(m))
    assert "pulled tiny version 1" in r.stdout and "unsigned" in r.stdout
    assert r.stderr == ""  # quiet in a pipe
    d = cli.run("show", "tiny", "--json").json()
    v = d["versions"][0]
    assert v["signed"] is False and v["architecture"] == "llama" and v["context_length"] == 8192
    assert v["source"] == origin.url("/files/tiny-Q4_K_M.gguf") + "?download=1&token=REDACTED"
    assert {f["role"] for f in v["files"]} == {"weights", "mmproj"}
    assert all(f["state"] == "local" for f in v["files"])
    again = cli.run("pull", url, "--sha256", sha_file(w), "--name", "tiny",
                    "--mmproj", origin.url("/files/mmproj-tiny-f16.gguf"), "--mmproj-sha256", sha_file(m))
    assert "(unchanged)" in again.stdout
    assert origin.bytes_sent("/files/tiny-Q4_K_M.gguf") == w.stat().st_size


def test_cli_pull_json_progress_lines(cli, origin, small_gguf):
    w, _ = small_gguf
    origin.add("/tiny-Q4_K_M.gguf", w.read_bytes())
    r = cli.run("pull", origin.url("/tiny-Q4_K_M.gguf"), "--sha256", sha_file(w), "--json")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[0]["total"] is None  # no --size: learnt from the server
    assert events[-2] == {"event": "progress", "file": w.name, "bytes": w.stat().st_size,
                          "total": w.stat().st_size}
    assert events[-1]["event"] == "result" and events[-1]["name"] == "tiny-Q4_K_M"
    assert events[-1]["signed"] is False


def test_cli_pull_errors_are_one_line(cli, origin, small_gguf):
    w, _ = small_gguf
    r = cli.run("pull", origin.url("/x.gguf"), check=False)
    assert r.returncode == 2 and "--sha256" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli.run("pull", origin.url("/missing.gguf"), "--sha256", "a" * 64, check=False)
    assert r.returncode == 9 and "404" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    origin.add("/not-gguf.gguf", b"hello world")
    r = cli.run("pull", origin.url("/not-gguf.gguf"), "--sha256", sha(b"hello world"), check=False)
    assert r.returncode == 6 and "Traceback" not in r.stderr


def test_cli_hf_pull_through_a_fake_hub(cli, origin, cdn, small_gguf, tmp_path):
    w, m = small_gguf
    token = "hf_testtoken1234567"
    digest = origin.add_hf("org/tiny-GGUF", w.name, w.read_bytes(), cdn=cdn, token=token)
    origin.add_hf("org/tiny-GGUF", m.name, m.read_bytes(), cdn=cdn, token=token)
    env = {"MODELFS_HF_ENDPOINT": origin.origin, "HF_TOKEN": token}
    r = cli.run("pull", f"hf://org/tiny-GGUF/{w.name}", "--mmproj", m.name, "--name", "tiny-hf", env=env)
    assert "pulled tiny-hf version 1" in r.stdout
    v = cli.run("show", "tiny-hf", "--json").json()["versions"][0]
    assert v["source"] == "hf://org/tiny-GGUF" and v["signed"] is False
    # The hub origin is kept for the mount's hub view: repo, the commit it pinned, each path.
    assert (v["hub_repo"], v["hub_commit"]) == ("org/tiny-GGUF", "a" * 40)
    weights = next(f for f in v["files"] if f["role"] == "weights")
    assert weights["sha256"] == digest
    # The hub got the token (HEAD and GET); the CDN never did.
    assert all(r.headers.get("authorization") == f"Bearer {token}"
               for r in origin.requests(f"/org/tiny-GGUF/resolve/main/{w.name}"))
    assert cdn.requests() and all("authorization" not in r.headers for r in cdn.requests())
    # The recorded URL is pinned to the hub's commit.
    files = json.loads(cli.run("show", "tiny-hf", "--json").stdout)["versions"][0]["files"]
    assert files  # url is not in show's output; check the catalog directly
    s = Store.open(cli.root)
    try:
        (_, _, rec), *_ = [x for x in s.catalog.all_files() if x[2].role == "weights"]
        assert rec.url == f"{origin.origin}/org/tiny-GGUF/resolve/{'a' * 40}/{w.name}"
        assert {r.filename: r.hub_path for _, _, r in s.catalog.all_files()} == {w.name: w.name, m.name: m.name}
    finally:
        s.close()
    # Token from the standard token file works too; without a token the gated repo refuses.
    (tmp_path / "hfhome").mkdir()
    (tmp_path / "hfhome" / "token").write_text(token + "\n")
    r = cli.run("pull", f"hf://org/tiny-GGUF/{w.name}", "--name", "tiny-hf2",
                env={"MODELFS_HF_ENDPOINT": origin.origin, "HF_TOKEN": "", "HF_HOME": str(tmp_path / "hfhome")})
    assert "pulled tiny-hf2" in r.stdout
    r = cli.run("pull", f"hf://org/tiny-GGUF/{w.name}", "--name", "tiny-hf3", check=False,
                env={"MODELFS_HF_ENDPOINT": origin.origin, "HF_TOKEN": "", "HF_HOME": str(tmp_path / "none")})
    assert r.returncode == 9 and "access denied" in r.stderr


def test_cli_status_lists_partials_and_rm_partial_discards(cli, origin, small_gguf):
    w, _ = small_gguf
    origin.add("/s.gguf", w.read_bytes(), drop_after=MB)
    r = cli.run("pull", origin.url("/s.gguf"), "--sha256", sha_file(w), check=False,
                env={"MODELFS_MAX_RETRIES": "0"})
    assert r.returncode == 9 and "lost after" in r.stderr or "closed after" in r.stderr
    st = cli.run("status", "--json").json()
    (p,) = st["partials"]
    assert p["sha256"] == sha_file(w) and p["bytes_present"] == MB and p["url"] == origin.url("/s.gguf")
    assert sha_file(w) in cli.run("status").stdout
    cli.run("rm", "--partial", sha_file(w))
    assert cli.run("status", "--json").json()["partials"] == []
    r = cli.run("rm", "--partial", sha_file(w), check=False)
    assert r.returncode == 3


def test_cli_ctrl_c_keeps_the_partial_and_says_so(cli, store_dir, origin, small_gguf):
    w, _ = small_gguf
    origin.add("/slow.gguf", w.read_bytes(), rate=MB)
    p = cli.popen("pull", origin.url("/slow.gguf"), "--sha256", sha_file(w),
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    data = store_dir / "partial" / sha_file(w) / "data"
    wait_for(lambda: data.exists() and origin.bytes_sent("/slow.gguf") > 256 * 1024, what="transfer start")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "partial download is kept" in err and "resume" in err and "Traceback" not in err
    state = json.loads((data.parent / "state.json").read_text())
    assert state["bytes"] > 0 and state["bytes"] == data.stat().st_size
    origin.add("/slow.gguf", w.read_bytes())
    cli.run("pull", origin.url("/slow.gguf"), "--sha256", sha_file(w))
    assert origin.requests("/slow.gguf")[-1].headers["range"] == f"bytes={state['bytes']}-"


# -- acceptance ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("big")
    w = write_model(d / "big-Q4_K_M.gguf", tensor_bytes=1 << 30, seed=40)
    return w, sha_file(w)


def test_acceptance_1_kill_9_at_60_percent_then_resume(cli, store_dir, origin, big_gguf):
    w, digest = big_gguf
    size = w.stat().st_size
    assert size >= 1 << 30
    origin.add("/big.gguf", w)
    data = store_dir / "partial" / digest / "data"
    p = cli.popen("pull", origin.url("/big.gguf"), "--sha256", digest,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: data.exists() and data.stat().st_size >= 0.6 * size, timeout=120, what="60%")
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert not (store_dir / "blobs" / "sha256" / digest[:2] / digest).exists()
    cli.run("pull", origin.url("/big.gguf"), "--sha256", digest)
    first, second = origin.requests("/big.gguf")
    assert second.headers["range"].startswith("bytes=")
    assert second.sent <= 0.4 * size + 64 * MB, (second.sent, size)
    assert sha_file(store_dir / "blobs" / "sha256" / digest[:2] / digest) == digest


def test_acceptance_3_two_concurrent_pulls_transfer_once(cli, store_dir, origin, small_gguf, tmp_path):
    w, _ = small_gguf
    big = write_model(tmp_path / "c-Q8_0.gguf", tensor_bytes=24 * MB, seed=41)
    digest = sha_file(big)
    origin.add("/c.gguf", big, rate=16 * MB)
    args = ("pull", origin.url("/c.gguf"), "--sha256", digest, "--name", "shared")
    a = cli.popen(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (store_dir / "partial" / digest / "data").exists(), what="first pull started")
    b = cli.popen(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=120) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    assert origin.bytes_sent("/c.gguf") == big.stat().st_size
    assert len(origin.requests("/c.gguf")) == 1
    assert [v["version"] for v in cli.run("show", "shared", "--json").json()["versions"]] == [1]


def test_acceptance_4_canary_never_persists(cli, store_dir, origin, cdn, small_gguf):
    w, m = small_gguf
    token = "hf_CANARYtoken0123456789"
    digest = sha_file(w)
    cdn.add("/cdn/blob", w)
    origin.add_redirect("/dl/tiny-Q4_K_M.gguf",
                        cdn.url("/cdn/blob?X-Amz-Signature=CANARYcdnsig&X-Amz-Credential=CANARYcred"))
    origin.add_hf("org/canary", m.name, m.read_bytes(), cdn=cdn, token=token, signature="CANARYhubsig")
    host = origin.origin.split("//")[1]
    url = (f"http://user:CANARYpass@{host}/dl/tiny-Q4_K_M.gguf"
           "?X-Amz-Signature=CANARYsig&X-Amz-Credential=CANARYcred&download=1")
    env = {"HF_TOKEN": token, "MODELFS_HF_ENDPOINT": origin.origin}
    outputs = []
    r = cli.run("-vv", "pull", url, "--sha256", digest, "--name", "canary", "--mmproj",
                f"hf://org/canary/{m.name}", env=env)
    outputs += [r.stdout, r.stderr]
    # Failures print URLs too: a wrong hash, a refused host, an HTTP error.
    for args in (("pull", url, "--sha256", "f" * 64, "--name", "canary2"),
                 ("pull", url.replace("/dl/", "/missing/"), "--sha256", "e" * 64),
                 ("pull", url.replace(host, "127.0.0.1:1"), "--sha256", "e" * 64)):
        r = cli.run("-vv", *args, check=False, env={**env, "MODELFS_MAX_RETRIES": "1", "MODELFS_BACKOFF": "0.01/0.01"})
        assert r.returncode != 0
        outputs += [r.stdout, r.stderr]
    # An interrupted pull leaves partial/<sha>/state.json behind: it must hold no secret either.
    cdn.add("/cdn/drop", w, drop_after=MB)
    origin.add_redirect("/dl2/tiny-Q4_K_M.gguf", cdn.url("/cdn/drop?X-Amz-Signature=CANARYcdnsig2"))
    r = cli.run("-vv", "pull", url.replace("/dl/", "/dl2/"), "--sha256", "9" * 64, check=False,
                env={**env, "MODELFS_MAX_RETRIES": "0"})
    assert r.returncode == 9
    outputs += [r.stdout, r.stderr]
    status = cli.run("-vv", "status", "--json")
    assert [p["bytes_present"] for p in status.json()["partials"]] == [MB]
    outputs += [status.stdout, status.stderr, cli.run("show", "canary", "--json").stdout]
    assert "Authorization" not in "".join(outputs)
    for text in outputs:
        assert "CANARY" not in text, text
    files = [p for p in store_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith("-wal") or p.name == "catalog.db" for p in files)
    for p in files:
        assert b"CANARY" not in p.read_bytes(), p
    # The userinfo and the token went only where they belong.
    hop = origin.requests("/dl/tiny-Q4_K_M.gguf")[0].headers
    assert hop["authorization"].startswith("Basic ")
    assert all("authorization" not in r.headers for r in cdn.requests())


def test_store_module_stays_free_of_front_ends():
    import ast
    for name in ("download.py", "partial.py", "sink.py", "hf.py", "pull.py"):
        tree = ast.parse((Path(__file__).parent.parent / "store" / name).read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.split(".")[0] in ("modelfs", "click", "rich") for m in mods), name


@pytest.mark.parametrize("spec", ["ftp://x/y", "hf://org", "hf://org/re po/x.gguf", "hf://../x/y.gguf"])
def test_bad_sources_are_usage_errors(cli, spec):
    r = cli.run("pull", spec, "--sha256", "a" * 64, check=False)
    assert r.returncode == 2, r.stderr


def test_pull_takes_no_token_on_the_command_line():
    # Tokens come from the environment or the token file at request time, never argv,
    # where every user of the machine could read them in /proc.
    from modelfs.cli.pull import pull
    assert not any("token" in (p.name or "") or "auth" in (p.name or "") for p in pull.params)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x.gguf"])
def test_get_and_head_refuse_the_same_unsafe_redirects(store: Store, origin: FaultServer, location: str) -> None:
    """Downloads, HEAD probes (hub metadata) and envelopes follow redirects by one rule."""
    origin.add_redirect("/r", location)
    with pytest.raises(FetchError, match="refusing a redirect to a (file|ftp) URL"):
        fetch(store, origin.url("/r"), digest="0" * 64, size=None)

    async def head() -> None:
        async with Downloader(store.blobs, **FAST) as dl:
            await dl.http.head(origin.url("/r"))

    with pytest.raises(FetchError, match="refusing a redirect to a (file|ftp) URL"):
        trio.run(head)
    assert list(store.blobs.iter_blobs()) == []
