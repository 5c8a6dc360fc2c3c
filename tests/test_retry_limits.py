"""A fetch gives up, clearly and within a byte bound, against
origins no client can finish from; fault server on 127.0.0.1, real sockets.

Rules under test (``store/download.py``): only new bytes, past the most the partial ever
held, count as progress; ``max_retries`` attempts in a row without new bytes end the
fetch; and so does receiving more than 2 x size + 64 MiB over all attempts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import CLI, blob_data, sha
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs_store.core import Store
from modelfs_store.download import Downloader, FetchResult
from modelfs_store.errors import FetchError

MB = 1 << 20
FAST: dict[str, Any] = {"stall_timeout": 5.0, "backoff": (0.001, 0.002), "max_retries": 3}




@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def fetch(store: Store, url: str, data: bytes, **opts: Any) -> FetchResult:
    async def main() -> FetchResult:
        # A loop that never ends is the defect: fail the test instead of hanging it.
        with trio.fail_after(60):
            async with Downloader(store.blobs, **{**FAST, **opts}) as dl:
                return await dl.fetch(url, sha256=sha(data), size=len(data))
    return trio.run(main)


def bound(size: int) -> int:
    return 2 * size + 64 * MB  # the rule of item 1


# -- item 1: only new bytes are progress ------------------------------------------------------------
def test_an_origin_that_ignores_range_and_drops_every_connection_is_given_up(store: Store,
                                                                            origin: FaultServer) -> None:  # noqa: F811
    data = blob_data(32 * MB, seed=1)
    origin.add("/d", data, ignore_range=True, drop_every=4 * MB)
    with pytest.raises(FetchError) as e:
        fetch(store, origin.url("/d"), data)
    msg = str(e.value)
    assert "without new bytes" in msg and "\n" not in msg and e.value.exit_code == 9
    # One attempt brought 4 MiB; the next four brought the same 4 MiB again: given up.
    assert len(origin.requests("/d")) == 1 + 1 + FAST["max_retries"]
    assert origin.bytes_sent("/d") == 5 * 4 * MB <= bound(len(data))
    assert store.blobs.iter_blobs() == []


def test_a_server_that_honours_range_finishes_however_often_it_drops(store: Store,
                                                                     origin: FaultServer) -> None:  # noqa: F811
    data = blob_data(24 * MB, seed=2)
    origin.add("/r", data, drop_every=3 * MB)  # every connection brings 3 MiB of new bytes
    r = fetch(store, origin.url("/r"), data)
    assert r.new and r.bytes_transferred == len(data) == origin.bytes_sent("/r")
    assert len(origin.requests("/r")) == 8  # more drops than max_retries: each one was progress


def test_receiving_more_than_twice_the_file_gives_up(store: Store, origin: FaultServer) -> None:  # noqa: F811
    """Each attempt brings one new MiB (so the count of attempts without progress never
    runs out) but starts from byte zero again: the byte budget ends it."""
    size = 16 * MB
    data = blob_data(size, seed=3)
    drops = [(k + 2) * MB for k in range(14)]  # 2, 3, ... 15 MiB, then the whole file
    origin.add("/b", data, ignore_range=True, drop_after=drops)
    with pytest.raises(FetchError, match="gave up after receiving") as e:
        fetch(store, origin.url("/b"), data)
    assert e.value.exit_code == 9 and "twice its size" in str(e.value)
    received = e.value.fields["received"]
    assert bound(size) < received <= bound(size) + MB  # stopped within the chunk that crossed it
    # The server may have pushed the rest of that last connection into socket buffers.
    assert origin.bytes_sent("/b") <= bound(size) + drops[-1]
    assert store.blobs.iter_blobs() == []


# -- item 9: the two endless origins, through the CLI -------------------------------------------------
@pytest.fixture(scope="module")
def gguf64(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    w = write_model(tmp_path_factory.mktemp("limits") / "limits-Q4_K_M.gguf", tensor_bytes=64 * MB, seed=5)
    return w, w.read_bytes()


ENV = {"MODELFS_BACKOFF": "0.001/0.002"}


def the_error(stderr: str) -> str:
    """The one error line (each retry before it is a warning in the log)."""
    assert "Traceback" not in stderr
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("modelfs: error: ")]
    return line


def test_pull_from_an_origin_that_drops_and_ignores_range_is_a_clear_error(
        cli: CLI, origin: FaultServer, gguf64: tuple[Path, bytes]) -> None:  # noqa: F811
    w, data = gguf64
    origin.add("/m.gguf", w, ignore_range=True, drop_every=10 * MB)
    r = cli.run("pull", origin.url("/m.gguf"), "--sha256", sha(data), check=False, env=ENV)
    assert r.returncode == 9, r.stderr
    assert "without new bytes" in the_error(r.stderr)
    assert origin.bytes_sent("/m.gguf") <= bound(len(data))


def test_pull_from_an_origin_that_corrupts_every_response_is_a_clear_error(
        cli: CLI, origin: FaultServer, gguf64: tuple[Path, bytes]) -> None:  # noqa: F811
    w, data = gguf64
    origin.add("/c.gguf", w, corrupt_every=len(data) // 2)
    r = cli.run("pull", origin.url("/c.gguf"), "--sha256", sha(data), check=False, env=ENV)
    assert r.returncode == 5, r.stderr
    err = the_error(r.stderr)
    assert "failed verification twice" in err and "quarantine" in err
    assert origin.bytes_sent("/c.gguf") == 2 * len(data) <= bound(len(data))
