"""``modelfs pull``: a thin front end over ``modelfs_store.pull.pull_source``.

When the store's daemon runs, the pull is handed to it over the control socket (a job,
``POST /v1/pulls``) and this command follows the job's events, printing what it would
have printed itself: the same progress, result and exit code. ``--detach`` returns at
once; Ctrl-C (or SIGTERM, or a kill) leaves the job running, and the command says how
to cancel it. The hub token, if this user has one and the source is on the hub, goes
with the request (the daemon keeps it in memory only).

A registry pull (``oci://``) always runs in this process: the registry's credentials
are in this process's environment (``docs/fleet.md``).

With no daemon (or ``--no-daemon``) the store decides what the source is (a signed pack
or an unsigned file) with one Downloader in one ``trio.run`` in this process. Ctrl-C
(or SIGTERM) then cancels the transfer through trio, so the partial download is flushed
and kept for the next run, and says so.

Either way this module only shows progress and prints the result. Progress goes to
stderr as a bar on a terminal and nowhere in a pipe; ``--json`` prints events to
stdout, one JSON object per line. Credentials are read from the environment at request
time, never from argv.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import click

from modelfs_store.errors import StoreError, UsageError
from modelfs_store.partial import list_partials

from ._context import Ctx
from ._output import human_size, info, progress_bar

if TYPE_CHECKING:
    from modelfs.mount.socketclient import ControlClient
    from modelfs_store.core import Store
    from modelfs_store.packs import InstallResult
    from modelfs_store.pull import PullResult, PullSource
    from modelfs_store.pulloptions import PullOptions

# trio, httpx and the downloader load only when a pull runs: every other verb starts faster.


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
    sys.stdout.flush()


class _Reporter:
    """Builds the progress callbacks for the chosen output (a ``PullReporter``): one per
    file of an unsigned pull, one for a whole signed pack."""

    def __init__(self, as_json: bool, stack: ExitStack) -> None:
        self.as_json = as_json
        self.stack = stack

    def __call__(self, src: PullSource) -> Callable[[int], None]:
        return _FileProgress(self, src)

    def pack(self) -> Callable[[int], None]:
        self.stack.close()
        return self.stack.enter_context(progress_bar(None, "pulling signed pack",
                                                     enabled=False if self.as_json else None))


class _FileProgress:
    """Progress of one file: JSON lines, or a bar (reopened with a total once known)."""

    def __init__(self, reporter: _Reporter, src: PullSource) -> None:
        self.r = reporter
        self.src = src
        self.total: int | None = src.size
        self.done = 0
        self.last = 0.0
        if reporter.as_json:
            _emit({"event": "start", "file": src.filename, "role": src.role, "sha256": src.sha256,
                   "total": src.size})
        else:
            self._open_bar()

    def _open_bar(self) -> None:
        self.r.stack.close()  # one live bar at a time
        self.advance = self.r.stack.enter_context(progress_bar(self.total, self.src.filename))
        if self.done:
            self.advance(self.done)

    def set_total(self, total: int) -> None:
        if self.total is None:
            self.total = total
            if not self.r.as_json:
                self._open_bar()

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.r.as_json:
            self.advance(n)
            return
        now = time.monotonic()
        if now - self.last >= 0.25 or (self.total is not None and self.done >= self.total):
            self.last = now
            _emit({"event": "progress", "file": self.src.filename, "bytes": self.done, "total": self.total})


async def _run_pull(store: Store, source: str, options: PullOptions, reporter: _Reporter,
                    keep_awake: bool = False) -> InstallResult | PullResult | None:
    import trio

    from modelfs.mount.inhibit import Inhibitor
    from modelfs_store import settings
    from modelfs_store.pull import downloader_from_env, pull_source

    inhibitor = Inhibitor(policy=settings.get(store.catalog, "inhibit"),
                          mode=settings.get(store.catalog, "inhibit.mode"))
    async with inhibitor.hold(keep_awake), downloader_from_env(store.blobs) as dl:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_signal, scope)
                result = await pull_source(store, dl, source, options, reporter)
                nursery.cancel_scope.cancel()
                return result
    return None  # cancelled by a signal


async def _cancel_on_signal(scope: Any) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


@click.command()
@click.argument("source")
@click.option("--sha256", help="Expected SHA-256 of the weights (required for http(s):// sources).")
@click.option("--size", type=int, help="Expected size in bytes, when known.")
@click.option("--name", help="Model name (default: from the file name, or the repository and the quant).")
@click.option("--mmproj", help="Multimodal projector: a URL, or a path in the same hf:// repository.")
@click.option("--mmproj-sha256", help="Expected SHA-256 of the mmproj (required for http(s):// sources).")
@click.option("--license", "license_", help="Licence of the model.")
@click.option("--app", "owner_app", help="App that owns the model.")
@click.option("--private", is_flag=True, help="Only its app, apps granted it and your own shell see it in the mount.")
@click.option("--json", "as_json", is_flag=True, help="Progress events and the result as JSON lines.")
@click.option("--pack", is_flag=True, help="SOURCE is a signed pack envelope (a file or an http(s) URL).")
@click.option("--lazy", is_flag=True,
              help="Signed packs only: record the model now, fetch each file on first open through the mount.")
@click.option("--retry", is_flag=True,
              help="Try now the files whose download failed verification recently, instead of refusing "
                   "them until their backoff expires (see 'modelfs status').")
@click.option("--candidate", is_flag=True,
              help="Signed packs: the version it activates is a candidate, rolled back if apps' loads fail "
                   "(see `mark-good`).")
@click.option("--detach", is_flag=True, help="Hand the pull to the daemon and return at once ('modelfs pulls').")
@click.option("--no-daemon", is_flag=True, help="Download in this process even when the store's daemon runs.")
@click.option("--gated", "--background", "gated", is_flag=True,
              help="Background work: the daemon starts it only when the gates allow (gate.power, gate.metered, "
                   "gate.window; see 'modelfs config list').")
@click.option("--keep-awake", is_flag=True,
              help="The daemon holds a logind sleep inhibitor while it transfers (setting 'inhibit').")
@click.pass_obj
def pull(c: Ctx, source: str, sha256: str | None, size: int | None, name: str | None, mmproj: str | None,
         mmproj_sha256: str | None, license_: str | None, owner_app: str | None, private: bool, as_json: bool,
         pack: bool, lazy: bool, retry: bool, candidate: bool, detach: bool, no_daemon: bool, gated: bool,
         keep_awake: bool) -> None:
    """Download a model from SOURCE (https://… with --sha256, hf://org/repo[@rev]/file.gguf, or
    hf://org/repo[:QUANT][@rev], or oci://HOST/REPO:TAG), verify it, and make it the active
    version of NAME. Interrupted pulls resume. A signed pack (an envelope file or URL) is verified and
    installed as its model_id; with --lazy its files are listed at once and downloaded when
    first opened. When the store's daemon runs, it does the work: Ctrl-C leaves the pull
    running.

    oci://HOST/REPO:TAG (or @sha256:…) pulls a GGUF artifact (Docker Model Runner's or
    Ollama's media types) from an OCI registry, each layer checked by its digest, in this
    process (oci+http:// for a plain-HTTP registry).

    hf://org/repo[:QUANT][@REVISION] pulls a whole model from a hub repository, as
    `llama.cpp -hf` and `ollama pull hf.co/…` do: the GGUF weights whose file name
    carries QUANT (case-insensitive, e.g. :Q4_K_M or :q8_0), every shard of a split
    model (-00001-of-00003.gguf …), and the repository's mmproj if it has one (the one
    with the same quant in its name, else F16, BF16, F32), as one model. Without
    :QUANT it takes the first of Q4_K_M, Q4_K_S, Q4_0, IQ4_XS, Q5_K_M, Q5_K_S, Q6_K,
    Q8_0 the repository has, else its first weights file. Two weights that match are
    refused with the candidates listed. The hub's LFS SHA-256 of every file is the
    expected hash; the commit is pinned. NAME defaults to the repository's name and
    the quant (org/tiny-GGUF:Q4_K_M -> tiny-GGUF-Q4_K_M)."""
    from modelfs_store.pulloptions import PullOptions

    options = PullOptions(pack=pack, lazy=lazy, sha256=sha256, size=size, name=name, mmproj=mmproj,
                          mmproj_sha256=mmproj_sha256, license=license_, owner_app=owner_app, private=private,
                          retry=retry, candidate=candidate)
    # A registry pull runs here: its credentials live in this process's environment.
    registry = source.split("://", 1)[0].lower() in ("oci", "oci+http")
    client = None if no_daemon or registry else c.daemon()
    job_options = {k: True for k, v in (("background", gated), ("keep_awake", keep_awake)) if v}
    if client is not None:
        with client:
            _remote_pull(client, source, options, as_json, detach, job_options)
        return
    for flag, given in (("--detach", detach), ("--gated", gated)):
        if given and registry:
            raise UsageError(f"{flag} does not apply to an oci:// pull: it runs in this command's process, "
                             "where the registry credentials are")
        if given:
            raise UsageError(f"{flag} needs the store's daemon: start it with `modelfs mount MOUNTPOINT`")
    _local_pull(c, source, options, as_json, keep_awake)


def _local_pull(c: Ctx, source: str, options: PullOptions, as_json: bool, keep_awake: bool = False) -> None:
    import trio

    store = c.store
    with ExitStack() as stack:
        reporter = _Reporter(as_json, stack)
        try:
            result = trio.run(_run_pull, store, source, options, reporter, keep_awake)
        except StoreError:
            stack.close()
            raise
    if result is None:
        kept = [p for p in list_partials(store) if p.bytes_present]
        msg = "interrupted"
        if kept:
            p = max(kept, key=lambda p: p.updated_at or 0)
            total = f" of {human_size(p.expected_size)}" if p.expected_size else ""
            msg += (f"; the partial download is kept ({human_size(p.bytes_present)}{total}): "
                    "run the same command again to resume")
        click.echo(f"modelfs: {msg}", err=True)
        sys.exit(130)
    from modelfs_store.pull import result_json

    print_result(result_json(result), as_json)


# -- through the daemon -------------------------------------------------------------------
def _request(source: str, options: PullOptions) -> dict[str, Any]:
    """The POST /v1/pulls body: the options, a local envelope's absolute path, and this
    user's hub token when the source is on the hub (in memory only, on the daemon's side)."""
    if "://" not in source and os.path.exists(source):
        source = os.path.abspath(source)
    body: dict[str, Any] = {k: v for k, v in options.__dict__.items() if v not in (None, False)}
    body.pop("owner_uid", None)
    if "owner_app" in body:
        body["app"] = body.pop("owner_app")
    body["source"] = source
    if any(str(s).startswith("hf://") for s in (source, options.mmproj) if s):
        from modelfs_store import hf  # httpx: only a hub source pays for it

        token = hf.token()
        if token:
            body["token"] = token
    return body


def _remote_pull(client: ControlClient, source: str, options: PullOptions, as_json: bool, detach: bool,
                 job_options: dict[str, bool]) -> None:
    job = client.call("POST", "/v1/pulls", {**_request(source, options), **job_options})
    if detach:
        if as_json:
            _emit({"event": "job", "job": job})
        else:
            click.echo(f"job {job['id']}: {job['state']} in the daemon; `modelfs pulls` shows it, "
                       f"`modelfs pulls cancel {job['id']}` stops it")
        return
    follow(client, job["id"], as_json)


@dataclass(frozen=True)
class _File:
    """What the progress display needs of a file the daemon is pulling."""
    filename: str
    role: str
    sha256: str
    size: int | None


@contextmanager
def _term_as_interrupt() -> Iterator[None]:
    """SIGTERM stops following a job the way Ctrl-C does (the job goes on)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def follow(client: ControlClient, job_id: int, as_json: bool) -> None:
    """Show job ``job_id``'s progress as an in-process pull would, then its result or its
    error (with the exit code the pull would have had)."""
    state: dict[str, Any] = {}
    result = None
    try:
        with ExitStack() as stack, _term_as_interrupt():
            feed = _Feed(_Reporter(as_json, stack))
            for event in client.events(f"/v1/events?job={job_id}"):
                kind = event.pop("event")
                if kind == "job":
                    if event["job"]["state"].startswith("queued_") and event["job"]["reason"] != state.get("reason"):
                        info(f"modelfs: job {job_id} is {event['job']['state']}: {event['job']['reason']}")
                    state = event["job"]
                elif kind == "result":
                    event.pop("job", None)
                    result = event
                else:
                    feed(kind, event)
    except KeyboardInterrupt:
        click.echo(f"modelfs: stopped following; job {job_id} goes on in the daemon (`modelfs pulls` shows it, "
                   f"`modelfs pulls cancel {job_id}` stops it)", err=True)
        sys.exit(130)
    if result is not None:
        print_result(result, as_json)
        return
    _not_done(job_id, state)


def _not_done(job_id: int, job: dict[str, Any]) -> None:
    """The end of a followed job that is not done: its error, or what it waits for."""
    from modelfs.mount.socketclient import remote_error

    st = job.get("state")
    if st == "failed":
        raise remote_error({"error": {"message": job.get("reason"), "exit_code": job.get("exit_code")}}, 500)
    if st in ("queued", "queued_power", "queued_metered", "queued_window", "running", None):
        info(f"modelfs: the daemon stopped while job {job_id} was {st or 'starting'}; it resumes when the daemon "
             "starts again (`modelfs pulls` shows it)")
    else:
        hint = f"`modelfs pulls resume {job_id}`" if st != "cancelled" else "run the pull again"
        why = f" ({job['reason']})" if job.get("reason") else ""
        info(f"modelfs: job {job_id} is {st}{why}; {hint}")
    sys.exit(1)


class _Feed:
    """The daemon's start and progress events, replayed into this command's reporter."""

    def __init__(self, reporter: _Reporter) -> None:
        self.reporter = reporter
        self.bars: dict[str | None, Callable[[int], None]] = {}
        self.seen: dict[str | None, int] = {}

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        name = event.get("file")
        if kind == "start" or name not in self.bars:
            f = _File(name or "", event.get("role", "weights"), event.get("sha256", ""), event.get("total"))
            self.bars[name] = self.reporter.pack() if name is None else self.reporter(cast("PullSource", f))
            self.seen[name] = 0
        if kind != "progress":
            return
        bar = self.bars[name]
        if event.get("total") is not None and hasattr(bar, "set_total"):
            bar.set_total(event["total"])
        delta = int(event["bytes"]) - self.seen[name]
        self.seen[name] = int(event["bytes"])
        if delta:
            bar(delta)


def print_result(d: dict[str, Any], as_json: bool) -> None:
    """A pull's result (``store.pull.result_json``), as this command prints it."""
    for line in d.get("below_min_device") or ():  # a soft gate: installed anyway, and said so
        info(f"modelfs: warning: this machine is below the pack's min_device: {line}")
    if as_json:
        _emit({"event": "result", **d})
    elif d.get("signed"):
        _print_pack(d)
    else:
        _print_unsigned(d)


def _print_unsigned(d: dict[str, Any]) -> None:
    what = f"version {d['version']}" if d["new_version"] else f"version {d['version']} (unchanged)"
    click.echo(f"pulled {d['name']} {what}: {len(d['files'])} file(s), "
               f"{human_size(d['new_bytes'])} new in the store, unsigned")


def _print_pack(d: dict[str, Any]) -> None:
    model, version, files = d["name"], d["version"], d["files"]
    if d["outcome"] == "installed":
        state = "active" if d["activated"] else f"installed; version {d['active_version']} stays active"
        if d["dehydrated"]:
            click.echo(f"{model} version {version} {state}: signed by {d['key_id']}; "
                       f"{len(d['dehydrated'])} of {len(files)} file(s) not fetched yet: each is downloaded "
                       "and verified when first opened through the mount (or pull again without --lazy)")
        else:
            click.echo(f"{model} version {version} {state}: {len(files)} file(s) verified, "
                       f"signed by {d['key_id']}")
    elif d["outcome"] == "already-active":
        click.echo(f"{model} version {version} is already active; nothing downloaded"
                   if not d["bytes_downloaded"] else
                   f"{model} version {version} is already active; fetched "
                   f"{human_size(d['bytes_downloaded'])} of files that were not local")
    else:
        click.echo(f"{model} version {version} is already installed (active: "
                   f"{d['active_version']}); use 'modelfs activate {model} {version}' to switch")
