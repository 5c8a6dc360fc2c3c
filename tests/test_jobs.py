"""The daemon's pull jobs (modelfs/mount/jobs.py) without a daemon or a kernel: a
JobQueue on a real store, pulling from the fault server, under trio.

What a job must do whoever runs it: finish and say so in events and in the catalog;
survive a new queue started on the same catalog (a restarted daemon), resuming from
its partial bytes; never keep a secret, and wait for it instead; pause, resume and
cancel by the rules of ``transition``; run no more than ``pulls.concurrency`` at once.
"""
# ruff: noqa: F811 - the fault server's fixtures are imported by name

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs.mount.jobs import Job, JobQueue, State, transition
from modelfs_store.core import Store
from modelfs_store.download import Downloader
from modelfs_store.errors import Conflict

FAST = {"stall_timeout": 5.0, "backoff": (0.01, 0.05), "max_retries": 2}
MB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def model(tmp_path: Path, origin: FaultServer) -> tuple[str, str, int]:  # noqa: F811
    w = write_model(tmp_path / "j.gguf", tensor_bytes=8 * MB, seed=11)
    origin.add("/j.gguf", w, rate=16 * MB)
    return origin.url("/j.gguf"), hashlib.sha256(w.read_bytes()).hexdigest(), w.stat().st_size


def queue(store: Store, concurrency: int = 2, seen: list[str] | None = None) -> JobQueue:
    def prepare(job: Job) -> tuple[Downloader, None]:
        if seen is not None:
            seen.append(job.secrets.get("token", ""))
        return Downloader(store.blobs, **FAST), None
    return JobQueue(store, prepare, concurrency=lambda: concurrency)


async def until(cond: Callable[[], object], timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


def run_with(q: JobQueue, body: Callable[[JobQueue], Any]) -> Any:
    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(q.run)
            out = await body(q)
            nursery.cancel_scope.cancel()
        return out
    return trio.run(main)


def test_a_job_runs_to_done_and_says_so(store: Store, model: tuple[str, str, int]) -> None:
    url, digest, size = model
    q = queue(store)

    async def body(q: JobQueue) -> list[dict[str, Any]]:
        job, created = q.submit(url, {"sha256": digest, "name": "j"}, {}, uid=0, app_id=None)
        assert created
        events = [e async for e in q.follow(lambda j: True, job.id)]
        return events

    events = run_with(q, body)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "job" and "start" in kinds and kinds[-2:] == ["result", "job"]
    assert events[-1]["job"]["state"] == "done" and events[-2]["name"] == "j"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["bytes"] == size
    (row,) = store.catalog.jobs()
    assert (row["state"], row["exit_code"], row["model"], row["bytes_done"]) == ("done", 0, "j", size)
    assert store.blobs.has(digest)


def test_a_failed_job_keeps_its_reason_and_exit_code(store: Store, origin: FaultServer) -> None:  # noqa: F811
    q = queue(store)

    async def body(q: JobQueue) -> Job:
        job, _ = q.submit(origin.url("/missing.gguf"), {"sha256": "0" * 64}, {}, uid=0, app_id=None)
        await until(lambda: job.state is State.FAILED)
        return job

    job = run_with(q, body)
    assert job.exit_code == 9 and "404" in (job.reason or "")
    assert store.catalog.jobs()[0]["state"] == "failed"


def test_a_restarted_queue_resumes_from_the_partial_bytes(store: Store, model: tuple[str, str, int],
                                                          origin: FaultServer) -> None:  # noqa: F811
    url, digest, size = model
    first = queue(store)

    async def start_then_stop(q: JobQueue) -> None:
        job, _ = q.submit(url, {"sha256": digest}, {}, uid=0, app_id=None)
        await until(lambda: job.bytes_done >= size // 2)
        # the daemon dies here: nothing more is recorded (the row still says running)

    run_with(first, start_then_stop)
    assert store.catalog.jobs()[0]["state"] == "running"
    sent_before = origin.bytes_sent("/j.gguf")
    second = queue(store)
    second.load()
    assert second.get(1).state is State.QUEUED and "restarted" in (second.get(1).reason or "")

    async def finish(q: JobQueue) -> None:
        await until(lambda: q.get(1).state is State.DONE)

    run_with(second, finish)
    assert store.blobs.has(digest)
    assert origin.bytes_sent("/j.gguf") - sent_before < size - sent_before + 4 * MB  # not from zero
    assert "range" in origin.requests("/j.gguf")[-1].headers


def test_secrets_are_never_stored_and_a_restarted_job_waits_for_them(store: Store,
                                                                     model: tuple[str, str, int]) -> None:
    url, digest, _ = model
    signed = url + "?X-Amz-Signature=s3cr3t&download=1"
    q = queue(store)
    job, _ = q.submit(signed, {"sha256": digest}, {"token": "hf_abcdefgh123"}, uid=0, app_id=None)
    raw = Path(store.layout.catalog).read_bytes() + Path(f"{store.layout.catalog}-wal").read_bytes()
    assert b"s3cr3t" not in raw and b"hf_abcdefgh123" not in raw
    assert job.options["secrets"] == ["source", "token"] and "REDACTED" in job.source

    again = queue(store)
    again.load()
    waiting = again.get(job.id)
    assert waiting.state is State.NEEDS_CREDENTIALS and waiting.as_dict()["credentials"] == ["source", "token"]
    again.act(waiting, "resume", {"token": "hf_abcdefgh123"})
    assert waiting.state is State.NEEDS_CREDENTIALS  # the signed URL is still missing
    # the same pull again brings everything: it joins the waiting job
    joined, created = again.submit(signed, {"sha256": digest}, {"token": "hf_abcdefgh123"}, uid=0, app_id=None)
    assert not created and joined is waiting and waiting.state is State.QUEUED
    seen: list[str] = []
    again.prepare = queue(store, seen=seen).prepare

    async def finish(q: JobQueue) -> None:
        await until(lambda: waiting.state in (State.DONE, State.FAILED))

    run_with(again, finish)
    assert waiting.state is State.DONE and seen == ["hf_abcdefgh123"]


def test_pause_resume_and_cancel(store: Store, model: tuple[str, str, int], origin: FaultServer) -> None:  # noqa: F811
    url, digest, size = model
    q = queue(store)

    async def body(q: JobQueue) -> Job:
        job, _ = q.submit(url, {"sha256": digest}, {}, uid=0, app_id=None)
        await until(lambda: job.bytes_done > MB and job.rate())
        assert 0 < (job.as_dict()["rate"] or 0) < 64 * MB  # the origin sends 16 MiB/s
        q.act(job, "pause")
        assert job.state is State.PAUSED and store.catalog.jobs()[0]["state"] == "paused"
        await until(lambda: job.id not in q._scopes)
        q.act(job, "resume")
        await until(lambda: job.state is State.DONE)
        with pytest.raises(Conflict, match="a done job cannot be cancelled"):
            q.act(job, "cancel")
        return job

    run_with(q, body)
    assert origin.bytes_sent("/j.gguf") < size + 4 * MB  # the resume went on from the partial


def test_no_more_than_the_concurrency_setting_run_at_once(store: Store, origin: FaultServer,  # noqa: F811
                                                          tmp_path: Path) -> None:
    q = queue(store, concurrency=1)
    items = []
    for i in range(3):
        data = hashlib.shake_256(bytes([i])).digest(2 * MB)
        origin.add(f"/{i}.bin", data, rate=8 * MB)
        items.append((origin.url(f"/{i}.bin"), hashlib.sha256(data).hexdigest()))
    most = [0]

    async def body(q: JobQueue) -> None:
        jobs = [q.submit(u, {"sha256": s, "name": f"m{i}"}, {}, uid=0, app_id=None)[0]
                for i, (u, s) in enumerate(items)]
        while not all(j.state in (State.DONE, State.FAILED) for j in jobs):
            most[0] = max(most[0], sum(j.state is State.RUNNING for j in jobs))
            await trio.sleep(0.002)

    run_with(q, body)
    assert most[0] == 1
    assert [r["state"] for r in store.catalog.jobs()] == ["failed"] * 3  # not GGUF: refused, but one at a time


@pytest.mark.parametrize(("state", "action", "missing", "after"), [
    (State.QUEUED, "pause", False, State.PAUSED), (State.RUNNING, "pause", False, State.PAUSED),
    (State.PAUSED, "resume", False, State.QUEUED), (State.PAUSED, "resume", True, State.NEEDS_CREDENTIALS),
    (State.NEEDS_CREDENTIALS, "resume", False, State.QUEUED), (State.FAILED, "resume", False, State.QUEUED),
    (State.RUNNING, "resume", False, State.RUNNING), (State.RUNNING, "cancel", False, State.CANCELLED),
    (State.NEEDS_CREDENTIALS, "cancel", True, State.CANCELLED),
    (State.DONE, "resume", False, None), (State.CANCELLED, "resume", False, None), (State.DONE, "pause", False, None),
    (State.FAILED, "cancel", False, None),
    (State.QUEUED_POWER, "pause", False, State.PAUSED), (State.QUEUED_METERED, "cancel", False, State.CANCELLED),
    (State.QUEUED_WINDOW, "resume", False, State.QUEUED_WINDOW),
])
def test_transitions(state: State, action: str, missing: bool, after: State | None) -> None:
    if after is None:
        with pytest.raises(Conflict):
            transition(state, action, missing=missing)
    else:
        assert transition(state, action, missing=missing) is after
