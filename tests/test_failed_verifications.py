"""A failed verification is remembered, with backoff, and quarantine
keeps one copy per distinct bad content within a cap.

In process against the fault server (the downloader with an injected wall clock), then
through ``modelfs`` (the memory is shared by separate processes: the CLI here, the
daemon in ``tests/test_mount.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import CLI, blob_data, sha
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs_store import failures
from modelfs_store.core import Store
from modelfs_store.download import Downloader, FetchResult
from modelfs_store.errors import IntegrityError

MB = 1 << 20
FAST: dict[str, Any] = {"stall_timeout": 5.0, "backoff": (0.001, 0.002), "max_retries": 2}




class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def fetch(store: Store, url: str, data: bytes, clock: Clock, **opts: Any) -> FetchResult:
    async def main() -> FetchResult:
        async with Downloader(store.blobs, wallclock=clock, **{**FAST, **opts}) as dl:
            return await dl.fetch(url, sha256=sha(data), size=len(data))
    return trio.run(main)


def quarantine_bytes(store: Store) -> int:
    return sum(p.stat().st_size for p in store.layout.quarantine.iterdir())


def test_a_failed_verification_is_refused_at_once_until_its_backoff_expires(store: Store,
                                                                          origin: FaultServer) -> None:  # noqa: F811
    data = blob_data(2 * MB, seed=1)
    origin.add("/x", data, corrupt_every=MB + 3)
    clock = Clock()
    with pytest.raises(IntegrityError, match="failed verification twice") as e:
        fetch(store, origin.url("/x"), data, clock)
    assert "no new attempt before" in str(e.value) and "--retry" in str(e.value)
    assert origin.bytes_sent("/x") == 2 * len(data)
    # Both transfers brought the same bad bytes: quarantine keeps them once.
    assert len(list(store.layout.quarantine.iterdir())) == 1 and quarantine_bytes(store) == len(data)
    mem = failures.load(store.layout, sha(data))
    assert mem is not None and (mem.failures, mem.retry_at) == (1, clock.t + 60)

    for _ in range(3):  # refused at once: no request, nothing quarantined
        with pytest.raises(IntegrityError, match="not fetched again before") as e:
            fetch(store, origin.url("/x"), data, clock)
        assert e.value.fields["reason"] == "backoff" and e.value.exit_code == 5
    assert len(origin.requests("/x")) == 2 and quarantine_bytes(store) == len(data)

    clock.t += 61  # expired: tried again, failed again, twice as long to wait
    with pytest.raises(IntegrityError, match="failed verification twice"):
        fetch(store, origin.url("/x"), data, clock)
    mem = failures.load(store.layout, sha(data))
    assert mem is not None and (mem.failures, mem.retry_at) == (2, clock.t + 120)
    assert len(origin.requests("/x")) == 4 and quarantine_bytes(store) == len(data)

    clock.t += 121
    origin.add("/x", data)  # the origin is fixed: a verified fetch forgets the failure
    assert fetch(store, origin.url("/x"), data, clock).new
    assert failures.load(store.layout, sha(data)) is None and failures.list_failed(store.layout) == []


def test_backoff_doubles_up_to_an_hour() -> None:
    assert [failures.backoff(n) for n in range(1, 9)] == [60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_retry_failed_tries_at_once(store: Store, origin: FaultServer) -> None:  # noqa: F811
    data = blob_data(MB, seed=2)
    origin.add("/y", data, corrupt_every=10)
    clock = Clock()
    with pytest.raises(IntegrityError):
        fetch(store, origin.url("/y"), data, clock)
    origin.add("/y", data)
    with pytest.raises(IntegrityError, match="not fetched again before"):
        fetch(store, origin.url("/y"), data, clock)
    assert fetch(store, origin.url("/y"), data, clock, retry_failed=True).new
    assert failures.list_failed(store.layout) == []


def test_quarantine_keeps_distinct_bad_contents_within_its_cap(store: Store, tmp_path: Path) -> None:
    def bad(seed: int, n: int = MB) -> Path:
        p = store.layout.tmp / f"bad-{seed}"
        p.write_bytes(blob_data(n, seed=100 + seed))
        return p

    def quarantine(p: Path) -> Path:
        return store.blobs.quarantine_path(p, "test", sha(p.read_bytes()))

    # The default cap is the largest model in the store: 2.5 MiB here, room for two copies.
    weights = write_model(tmp_path / "w.gguf", tensor_bytes=2 * MB + MB // 2)
    store.import_model("w", weights)
    cap = store.quarantine_cap()
    assert cap == weights.stat().st_size
    first = quarantine(bad(1))
    assert quarantine(bad(1)) == first  # the same bad bytes: one copy
    second = quarantine(bad(2))
    third = quarantine(bad(3))  # three distinct copies do not fit: the oldest goes
    names = sorted(p.name for p in store.layout.quarantine.iterdir())
    assert names == sorted([second.name, third.name]) and quarantine_bytes(store) <= cap
    huge = quarantine(bad(4, 3 * MB))  # the newest is always kept, whatever its size
    assert [p.name for p in store.layout.quarantine.iterdir()] == [huge.name]


# -- through the CLI: the memory outlives the process that failed ------------------------------------
@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("fv") / "fv-Q4_K_M.gguf", tensor_bytes=4 * MB, seed=9)


def test_pull_refuses_until_when_status_says_why_and_retry_tries_now(cli: CLI, origin: FaultServer,  # noqa: F811
                                                                      gguf: Path) -> None:
    data = gguf.read_bytes()
    digest = sha(data)
    origin.add("/fv.gguf", gguf, corrupt_every=len(data) - 100)
    url = origin.url("/fv.gguf")
    r = cli.run("pull", url, "--sha256", digest, check=False)
    assert r.returncode == 5 and "failed verification twice" in r.stderr
    served = origin.bytes_sent("/fv.gguf")
    assert served == 2 * len(data)

    r = cli.run("pull", url, "--sha256", digest, check=False)
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("modelfs: error: ")]
    assert r.returncode == 5 and "not fetched again before 20" in line and "--retry" in line
    assert origin.bytes_sent("/fv.gguf") == served  # refused before any request

    st = cli.run("status", "--json").json()
    [f] = st["failed_verifications"]
    assert f["sha256"] == digest and f["failures"] == 1 and f["blocked"] is True
    assert f["url"] == url and "SHA-256 mismatch" in f["reason"] and f["retry_at"] > f["last_failed_at"]
    text = cli.run("status").stdout
    assert f"{digest}  failed 1 time(s)" in text and "no new attempt before" in text and "SHA-256" in text
    assert len(st["quarantine"]) == 1

    origin.add("/fv.gguf", gguf)  # fixed upstream; --retry does not wait for the backoff
    r = cli.run("pull", url, "--sha256", digest, "--retry")
    assert "pulled fv version 1" in r.stdout
    assert cli.run("status", "--json").json()["failed_verifications"] == []


def test_pull_lazy_retry_lets_the_mount_try_a_pack_file_at_once(tmp_path: Path, origin: FaultServer) -> None:  # noqa: F811
    """``modelfs pull --lazy --retry PACK`` fetches nothing, but forgets the remembered
    failures of the files it leaves to the mount, so the next open tries at once."""
    from modelfs_store.keys import trust_key
    from modelfs_store.packs import install_pack
    from test_packs import Publisher

    pub = Publisher(origin)
    store = Store.open(tmp_path / "store")
    try:
        trust_key(store.catalog, "k1", pub.pub("k1"), actor="test")
        data = b"GGUF" + blob_data(10_000, seed=7)
        envelope = pub.envelope(pub.payload(1, [pub.artifact("demo.gguf", data)]))
        failures.remember(store.layout, sha(data), reason="SHA-256 mismatch", url=None, now=time.time())

        def lazy_pull(retry: bool) -> None:
            async def main() -> None:
                async with Downloader(store.blobs, retry_failed=retry) as dl:
                    await install_pack(store, dl, envelope, lazy=True)
            trio.run(main)

        lazy_pull(retry=False)
        assert failures.load(store.layout, sha(data)) is not None  # a plain pull keeps the memory
        lazy_pull(retry=True)
        assert failures.load(store.layout, sha(data)) is None and pub.artifact_bytes() == 0
    finally:
        store.close()
