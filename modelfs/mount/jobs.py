"""Pull jobs: the daemon's queue of work that outlives the client that asked for it.

A job is one ``modelfs pull`` (``store.pull.pull_source``) run by the daemon for a
caller. Its life::

    queued ──────> running ─────> done
      ▲  │           │  └───────> failed ──resume──> queued
      │  │           ├──pause───> paused ──resume──> queued
      │  └───────────┴──cancel──> cancelled
      │  └──> queued_power | queued_metered | queued_window ──(the gate clears)──> running
      │       (pause and cancel as from queued)
      └──── needs_credentials <── (a restarted job that needs a secret it never stored)

The scheduler starts queued jobs, oldest first, while fewer than ``pulls.concurrency``
run. A *background* job (an app's ``"background": true``, or ``pull --gated``) starts
only when the gates allow (``gates.py``: mains power, an unmetered network, a time
window); until then it waits in ``queued_power``, ``queued_metered`` or
``queued_window`` with the reason in words, and the scheduler looks again every
``RECHECK`` seconds while any job waits, so it starts within seconds once its
condition clears. A gate is checked when a job starts, not while it runs. Every
other job starts at once. A job asked with ``keep_awake`` holds the daemon's sleep
inhibitor (``inhibit.py``, the ``inhibit`` setting decides) while it transfers.

Every state change is written to the catalog before it is announced, so a daemon
started again, after ``kill -9`` too, finds every job that was running or queued and
queues it again: the downloader resumes its files from their partial bytes on disk.
A job never stores a secret. A hub token, a URL whose query carries a signature (the
source or an mmproj) stay in memory; the catalog keeps their redacted form and their
names. A restarted job that needs one waits in ``needs_credentials`` until a client
supplies it again (``POST /v1/pulls/ID/resume``, or the same pull again).

A job started or joined by a client's ``ensure_model`` (``POST /v1/ensure``) has
waiters, in memory: each ensure attaches one, its ``cancel()`` detaches it, and the
job is cancelled when its last waiter has gone, never before (another waiter's
download goes on). A job nobody attached to (``modelfs pull``) has none and runs on.

Every change and the progress of running jobs go to subscribers as events (the
control socket's ``/v1/events``): ``job`` (a snapshot, at every state change),
``start`` and ``progress`` (per file, as ``modelfs pull --json`` prints them; a signed
pack reports one ``progress`` with ``file`` null), ``result`` (before the final
``job`` event of a job that is done). A follower of one job gets its snapshot and
what happened so far first, and its stream ends when the job stops running.

This module must never decide what a caller may do (the ``prepare`` hook it is given
does: which downloader, which admission check), store a secret, or write SQL itself.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from modelfs_store.errors import Conflict, NotFound, StoreError
from modelfs_store.pull import pull_source, result_json
from modelfs_store.pulloptions import PullOptions
from modelfs_store.redact import drops_secrets, redact_text, redact_url

if TYPE_CHECKING:
    from modelfs_store.core import Store
    from modelfs_store.download import Downloader
    from modelfs_store.packs import Admit
    from modelfs_store.pull import PullSource

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    QUEUED = "queued"
    QUEUED_POWER = "queued_power"
    QUEUED_METERED = "queued_metered"
    QUEUED_WINDOW = "queued_window"
    RUNNING = "running"
    PAUSED = "paused"
    NEEDS_CREDENTIALS = "needs_credentials"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({State.DONE, State.FAILED, State.CANCELLED})
UNFINISHED = tuple(s.value for s in State if s not in FINAL)
GATED = frozenset({State.QUEUED_POWER, State.QUEUED_METERED, State.QUEUED_WINDOW})  # a background job waits
WAITING = GATED | {State.QUEUED}  # what the scheduler may start
ACTIVE = WAITING | {State.RUNNING}  # a follower's stream ends when a job leaves these
#: What a pull request may ask for (store.pull.PullOptions), and the secrets a job keeps in memory only.
OPTION_KEYS = ("pack", "lazy", "sha256", "size", "name", "mmproj", "mmproj_sha256", "license", "owner_app",
               "owner_uid", "private", "platform", "retry", "candidate")
#: How the daemon runs a job (not the pull's options): gated as background work, keeping the machine awake.
JOB_KEYS = ("background", "keep_awake")
SECRETS = ("token", "source", "mmproj")
RECHECK = 1.0           # seconds between looks at the gates while a job waits on one
PROGRESS_EVERY = 0.25   # seconds between progress events of one file
RATE_WINDOW = 5.0       # seconds of progress the rate is measured over
KEEP_FINISHED = 200     # finished jobs listed (the catalog keeps them all)


def transition(state: State, action: str, *, missing: bool) -> State:
    """The state ``action`` ('cancel', 'pause' or 'resume') leads to from ``state``
    (``missing``: a secret the job needs is not in memory); Conflict when it cannot."""
    if action == "cancel" and state not in FINAL:
        return State.CANCELLED
    if action == "pause" and state in ACTIVE | {State.PAUSED}:
        return State.PAUSED
    if action == "resume" and state in (State.PAUSED, State.NEEDS_CREDENTIALS, State.FAILED):
        return State.NEEDS_CREDENTIALS if missing else State.QUEUED
    if action == "resume" and state in ACTIVE:
        return state
    if action not in ("cancel", "pause", "resume"):
        raise NotFound(f"no job action {action!r}")
    done = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}[action]
    raise Conflict(f"a {state.value.replace('_', ' ')} job cannot be {done}", state=state.value)


@dataclass
class Job:
    id: int
    state: State
    source: str                      # redacted
    options: dict[str, Any]          # redacted; "secrets": names of the secrets it needs
    uid: int
    app_id: str | None
    created_at: float
    updated_at: float
    model: str | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    reason: str | None = None
    exit_code: int | None = None
    result: dict[str, Any] | None = None
    finished_at: float | None = None
    secrets: dict[str, str] = field(default_factory=dict, repr=False)       # in memory only
    waiters: set[int] = field(default_factory=set, repr=False)              # clients of ensure still waiting
    replay: dict[tuple[str, str | None], dict[str, Any]] = field(default_factory=dict, repr=False)
    marks: deque[tuple[float, int]] = field(default_factory=deque, repr=False)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        return cls(row["id"], State(row["state"]), row["source"], row["options"], row["uid"], row["app_id"],
                   row["created_at"], row["updated_at"], row["model"], row["bytes_done"], row["bytes_total"],
                   row["reason"], row["exit_code"], row["result"], row["finished_at"])

    @property
    def actor(self) -> str:
        return f"daemon:uid{self.uid}" + (f":{self.app_id}" if self.app_id else "")

    def missing(self) -> list[str]:
        return [name for name in self.options.get("secrets", ()) if name not in self.secrets]

    def pull_options(self) -> PullOptions:
        opts = {k: v for k, v in self.options.items() if k in OPTION_KEYS}
        if "mmproj" in self.secrets:
            opts["mmproj"] = self.secrets["mmproj"]
        return PullOptions(**opts)

    def rate(self) -> float | None:
        if self.state is not State.RUNNING or len(self.marks) < 2:
            return None
        (t0, b0), (t1, b1) = self.marks[0], self.marks[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def as_dict(self) -> dict[str, Any]:
        """The JSON of a job (``GET /v1/pulls``, ``modelfs pulls --json``): no secret."""
        return {"id": self.id, "state": self.state.value, "source": self.source, "model": self.model,
                "uid": self.uid, "app_id": self.app_id, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "rate": self.rate(), "reason": self.reason,
                "exit_code": self.exit_code, "result": self.result, "created_at": self.created_at,
                "updated_at": self.updated_at, "finished_at": self.finished_at,
                "options": {k: v for k, v in self.options.items() if k != "secrets"},
                "credentials": self.missing() if self.state is State.NEEDS_CREDENTIALS else []}


#: A job -> (its Downloader, not yet entered; its admission check or None). The
#: caller's policy lives there, not here.
Prepare = Callable[[Job], "tuple[Downloader, Admit | None]"]
#: What holds background work back now: (the waiting state, the reason in words), or None.
GateCheck = Callable[[], Awaitable["tuple[str, str] | None"]]
#: Whether a job asked to keep the machine awake -> what to hold while it transfers.
KeepAwake = Callable[[bool], AbstractAsyncContextManager[None]]


async def _no_gate() -> tuple[str, str] | None:
    return None


@dataclass(eq=False)
class _Subscriber:
    accept: Callable[[Job], bool]
    send: trio.MemorySendChannel[dict[str, Any]]
    receive: trio.MemoryReceiveChannel[dict[str, Any]]


class Events:
    """Fan-out of job events to subscribers; a subscriber that falls 1024 events behind
    is dropped (its stream ends; it can follow again)."""

    def __init__(self) -> None:
        self._subs: set[_Subscriber] = set()

    def open(self, accept: Callable[[Job], bool]) -> _Subscriber:
        send, receive = trio.open_memory_channel[dict[str, Any]](1024)
        sub = _Subscriber(accept, send, receive)
        self._subs.add(sub)
        return sub

    def close(self, sub: _Subscriber) -> None:
        self._subs.discard(sub)
        sub.send.close()

    def publish(self, job: Job, event: dict[str, Any]) -> None:
        for sub in list(self._subs):
            if sub.accept(job):
                try:
                    sub.send.send_nowait(event)
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    self.close(sub)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class JobQueue:
    """The daemon's jobs: requests change them (on the trio thread), :meth:`run`
    starts and supervises them, :attr:`events` tells subscribers."""

    def __init__(self, store: Store, prepare: Prepare, *, concurrency: Callable[[], int] = lambda: 2,
                 clock: Callable[[], float] = time.time, gates: GateCheck = _no_gate,
                 keep_awake: KeepAwake = lambda requested: nullcontext(),
                 landed: Callable[[], Awaitable[object]] | None = None) -> None:
        self.store = store
        self.prepare = prepare
        self.landed = landed  # the mount takes in a job's model before the job says it is done
        self.concurrency = concurrency
        self.clock = clock
        self.gates = gates
        self.keep_awake = keep_awake
        self.jobs: dict[int, Job] = {}
        self.events = Events()
        self._scopes: dict[int, trio.CancelScope] = {}
        self._wake = trio.Event()
        self._waiter_ids = 0

    # -- loading ---------------------------------------------------------------------------
    def load(self) -> None:
        """The jobs of the catalog; those a previous daemon was running or had queued are
        queued again (or wait for their credentials)."""
        rows = self.store.catalog.jobs()
        finished = [r for r in rows if r["state"] not in UNFINISHED][-KEEP_FINISHED:]
        for row in finished + [r for r in rows if r["state"] in UNFINISHED]:
            job = Job.from_row(row)
            self.jobs[job.id] = job
            if job.state in ACTIVE:
                if job.missing():
                    self._save(job, state=State.NEEDS_CREDENTIALS,
                               reason="the daemon restarted, and the job's " + " and ".join(job.missing())
                               + " was never stored: pull again, or resume it with the credentials")
                else:
                    self._save(job, state=State.QUEUED, reason="resumed after the daemon restarted"
                               if job.state is State.RUNNING else job.reason)
        self._wake.set()

    # -- requests ----------------------------------------------------------------------------
    def submit(self, source: str, options: dict[str, Any], secrets: dict[str, str], *, uid: int,
               app_id: str | None) -> tuple[Job, bool]:
        """A new job (True), or the caller's unfinished job for the same request, given the
        secrets it brings (False)."""
        secrets = {k: v for k, v in secrets.items() if k in SECRETS and v}
        stored = {k: v for k, v in options.items() if k in OPTION_KEYS + JOB_KEYS and v not in (None, False, "")}
        if "://" in source and drops_secrets(source):
            secrets["source"] = source
        if isinstance(stored.get("mmproj"), str) and drops_secrets(stored["mmproj"]):
            secrets["mmproj"] = stored["mmproj"]
            stored["mmproj"] = redact_url(stored["mmproj"])
        shown = redact_url(source) if "://" in source else source
        for job in self.jobs.values():
            if job.state.value in UNFINISHED and (job.uid, job.app_id, job.source) == (uid, app_id, shown) \
                    and {k: v for k, v in job.options.items() if k != "secrets"} == stored:
                job.secrets.update(secrets)
                if job.state in (State.PAUSED, State.NEEDS_CREDENTIALS):
                    self.act(job, "resume")
                return job, False
        if secrets:
            stored["secrets"] = sorted(secrets)
        now = self.clock()
        job_id = self.store.catalog.add_job(shown, stored, uid=uid, app_id=app_id, secret=bool(secrets),
                                            state=State.QUEUED.value)
        job = Job(job_id, State.QUEUED, shown, stored, uid, app_id, now, now, secrets=secrets)
        self.jobs[job_id] = job
        self.events.publish(job, {"event": "job", "job": job.as_dict()})
        self._wake.set()
        return job, True

    def act(self, job: Job, action: str, secrets: dict[str, str] | None = None) -> Job:
        """Cancel, pause or resume ``job`` (``transition`` says what is allowed)."""
        job.secrets.update({k: v for k, v in (secrets or {}).items() if k in SECRETS and v})
        new = transition(job.state, action, missing=bool(job.missing()))
        if new is not job.state:
            reason = {State.PAUSED: "paused", State.CANCELLED: "cancelled",
                      State.NEEDS_CREDENTIALS: "needs " + " and ".join(job.missing())}.get(new)
            self._save(job, state=new, reason=reason, finished_at=self.clock() if new in FINAL else None)
            scope = self._scopes.get(job.id)
            if scope is not None and new is not State.RUNNING:
                scope.cancel()
            self._wake.set()
        return job

    # -- waiters (the client API's ensure) ---------------------------------------------------
    def attach(self, job: Job) -> int:
        """A new waiter on ``job``: a client's ``ensure_model`` that waits for it. The
        number is the waiter's, for :meth:`detach`."""
        self._waiter_ids += 1
        job.waiters.add(self._waiter_ids)
        return self._waiter_ids

    def detach(self, job: Job, waiter: int | None) -> Job:
        """``waiter`` stops waiting (its ``cancel()``). The job is cancelled when it was the
        last waiter of a job that waiters started: another waiter's transfer never stops
        for it, and neither does a job nobody waits on (a plain pull). An unknown waiter
        (gone already) changes nothing."""
        if waiter in job.waiters:
            job.waiters.discard(waiter)
            if not job.waiters and job.state not in FINAL:
                log.info("pull job %d: its last waiter detached; cancelling it", job.id)
                self.act(job, "cancel")
        return job

    def get(self, job_id: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}", job=job_id)
        return job

    async def follow(self, accept: Callable[[Job], bool], job_id: int | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """Events of the jobs ``accept`` lets through (of one job: what happened so far
        first, and the stream ends when it stops running)."""
        sub = self.events.open(lambda j: accept(j) and (job_id is None or j.id == job_id))
        try:
            if job_id is not None:
                job = self.get(job_id)
                yield {"event": "job", "job": job.as_dict()}
                for event in job.replay.values():
                    yield {**event, "job": job.id}
                if job.state not in ACTIVE:
                    if job.state is State.DONE and job.result is not None:
                        yield {"event": "result", "job": job.id, **job.result}
                    return
            async for event in sub.receive:
                yield event
                if job_id is not None and event["event"] == "job" and State(event["job"]["state"]) not in ACTIVE:
                    return
        finally:
            self.events.close(sub)

    def stopped(self) -> None:
        """The daemon stops serving: what was running is queued again in the catalog (its
        task is being cancelled), so the next daemon, or ``modelfs pulls``, says so."""
        for job in self.jobs.values():
            if job.state is State.RUNNING:
                self._save(job, state=State.QUEUED, reason="the daemon stopped; it resumes when the daemon starts")

    # -- running -----------------------------------------------------------------------------
    async def run(self) -> None:
        """Start queued jobs while fewer than ``concurrency()`` run; until cancelled (the
        jobs it was running stay 'running' in the catalog: the next daemon resumes them)."""
        async with trio.open_nursery() as nursery:
            while True:
                held = await self._held() if any(self._gated(j) for j in self.jobs.values()) else None
                self._start_ready(nursery, held)
                with trio.move_on_after(RECHECK if any(j.state in GATED for j in self.jobs.values()) else
                                        float("inf")):
                    await self._wake.wait()
                self._wake = trio.Event()

    @staticmethod
    def _gated(job: Job) -> bool:
        return job.state in WAITING and bool(job.options.get("background"))

    async def _held(self) -> tuple[str, str] | None:
        try:
            return await self.gates()
        except Exception:  # noqa: BLE001 - a broken gate source must not stop every background job for good
            log.exception("could not check the gates; background jobs run")
            return None

    def _start_ready(self, nursery: trio.Nursery, held: tuple[str, str] | None) -> None:
        """Start what may start; a background job the gates hold back (``held``) shows why."""
        running = sum(job.state is State.RUNNING for job in self.jobs.values())
        for job in sorted(self.jobs.values(), key=lambda j: j.id):
            if job.state not in WAITING:
                continue
            if held is not None and self._gated(job):
                if (job.state.value, job.reason) != held:
                    self._save(job, state=State(held[0]), reason=held[1])
                continue
            if running >= self.concurrency():
                if job.state in GATED:  # its gate cleared: it waits for a free slot like any other
                    self._save(job, state=State.QUEUED, reason=None)
                continue
            self._save(job, state=State.RUNNING, reason=None, exit_code=None)
            scope = self._scopes[job.id] = trio.CancelScope()
            nursery.start_soon(self._run_job, job, scope, name=f"pull-job-{job.id}")
            running += 1

    async def _land(self) -> None:
        """Before a job is done: the mount's tree holds what it recorded, so whoever follows
        the job (``modelfs pull``, an app's ensure) finds the model in the mount at once."""
        if self.landed is None:
            return
        try:
            await self.landed()
        except Exception:  # noqa: BLE001 - the job is done all the same; the poller retries the tree
            log.exception("the mount did not take in a finished job's model; its poller will")

    async def _run_job(self, job: Job, scope: trio.CancelScope) -> None:
        try:
            with scope:
                result = await self._pull(job)
            if not scope.cancelled_caught:
                await self._land()
                self._finish(job, State.DONE, result=result, exit_code=0, model=result.get("name"), reason=None)
        except Exception as exc:  # noqa: BLE001 - a failed job never takes the daemon down
            if job.state is not State.RUNNING:
                return  # paused or cancelled while it failed: that is what it is now
            err = _leaf(exc)
            if isinstance(err, StoreError):
                self._finish(job, State.FAILED, reason=redact_text(str(err)), exit_code=err.exit_code)
            else:
                log.error("pull job %d failed with a bug", job.id, exc_info=exc)
                self._finish(job, State.FAILED, reason=f"internal error ({type(err).__name__}); see the daemon's log",
                             exit_code=70)
        finally:
            self._scopes.pop(job.id, None)
            self._wake.set()

    async def _pull(self, job: Job) -> dict[str, Any]:
        job.replay.clear()
        job.bytes_done = 0  # a resumed file reports its partial bytes again
        job.marks.clear()
        downloader, admit = self.prepare(job)
        store = dataclasses.replace(self.store, actor=job.actor)
        source = job.secrets.get("source", job.source)
        log.info("pull job %d: %s for uid %d%s", job.id, job.source, job.uid, f" ({job.app_id})" if job.app_id else "")
        async with self.keep_awake(bool(job.options.get("keep_awake"))), downloader:
            res = await pull_source(store, downloader, source, job.pull_options(), _Progress(self, job), admit=admit)
        return result_json(res)

    # -- recording ---------------------------------------------------------------------------
    def _save(self, job: Job, **fields: Any) -> None:
        """Change ``job``, write it to the catalog, then tell the subscribers."""
        for key, value in fields.items():
            setattr(job, key, value)
        job.updated_at = self.clock()
        row = {k: (v.value if isinstance(v, State) else v) for k, v in fields.items()}
        self.store.catalog.update_job(job.id, bytes_done=job.bytes_done, **row)
        self.events.publish(job, {"event": "job", "job": job.as_dict()})

    def _finish(self, job: Job, state: State, **fields: Any) -> None:
        if state is State.DONE:
            job.result = fields["result"]
            job.bytes_total = job.bytes_total if job.bytes_total is not None else job.bytes_done
            self.events.publish(job, {"event": "result", "job": job.id, **job.result})
        self._save(job, state=state, finished_at=self.clock(), bytes_total=job.bytes_total, **fields)
        log.info("pull job %d: %s%s", job.id, state.value, f" ({job.reason})" if job.reason else "")
        finished = [j.id for j in self.jobs.values() if j.state in FINAL]
        for old in finished[:-KEEP_FINISHED]:  # the catalog keeps them all
            del self.jobs[old]

    def progress(self, job: Job, n: int) -> None:
        job.bytes_done += n
        now = trio.current_time()
        job.marks.append((now, job.bytes_done))
        while len(job.marks) > 2 and now - job.marks[0][0] > RATE_WINDOW:
            job.marks.popleft()

    def tell(self, job: Job, event: dict[str, Any]) -> None:
        """A start or progress event: kept for followers who come later, and sent."""
        job.replay[(event["event"], event.get("file"))] = event
        self.events.publish(job, {**event, "job": job.id})


class _Progress:
    """The ``PullReporter`` of one job: per-file counters that feed the job's bytes and
    events (the shapes of ``modelfs pull --json``)."""

    def __init__(self, queue: JobQueue, job: Job) -> None:
        self.queue = queue
        self.job = job

    def __call__(self, src: PullSource) -> _Counter:
        self.queue.tell(self.job, {"event": "start", "file": src.filename, "role": src.role, "sha256": src.sha256,
                                   "total": src.size})
        if src.size is not None:
            self.job.bytes_total = (self.job.bytes_total or 0) + src.size
        return _Counter(self, src.filename, src.size)

    def pack(self) -> _Counter:
        return _Counter(self, None, None)


class _Counter:
    def __init__(self, progress: _Progress, filename: str | None, total: int | None) -> None:
        self.p = progress
        self.filename = filename
        self.total = total
        self.done = 0
        self.last = -PROGRESS_EVERY

    def set_total(self, total: int) -> None:
        if self.total is None:
            self.total = total
            job = self.p.job
            job.bytes_total = (job.bytes_total or 0) + total

    def __call__(self, n: int) -> None:
        self.done += n
        self.p.queue.progress(self.p.job, n)
        now = trio.current_time()
        if now - self.last >= PROGRESS_EVERY or (self.total is not None and self.done >= self.total):
            self.last = now
            self.p.queue.tell(self.p.job, {"event": "progress", "file": self.filename, "bytes": self.done,
                                           "total": self.total})
