"""``modelfs pull``: a thin front end over ``modelfs_store.pull.pull_source``.

The store decides what the source is (a signed pack or an unsigned file) with one
Downloader in one ``trio.run``; this module only shows progress and prints the result.
Progress goes to stderr as a bar on a terminal and nowhere in a pipe; ``--json`` prints
events to stdout, one JSON object per line. Ctrl-C (or SIGTERM) cancels the transfer
through trio, so the partial download is flushed and kept for the next run, and says so.
Credentials are read from the environment by the store at request time, never from argv.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import click

from modelfs_store.errors import StoreError
from modelfs_store.partial import list_partials

from ._context import Ctx
from ._output import human_size, info, progress_bar

if TYPE_CHECKING:
    from modelfs_store.core import Store
    from modelfs_store.packs import InstallResult
    from modelfs_store.pull import PullOptions, PullResult, PullSource

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


async def _run_pull(store: Store, source: str, options: PullOptions,
                    reporter: _Reporter) -> InstallResult | PullResult | None:
    import trio

    from modelfs_store.pull import downloader_from_env, pull_source

    async with downloader_from_env(store.blobs) as dl:
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
@click.option("--name", help="Model name (default: from the file name).")
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
@click.pass_obj
def pull(c: Ctx, source: str, sha256: str | None, size: int | None, name: str | None, mmproj: str | None,
         mmproj_sha256: str | None, license_: str | None, owner_app: str | None, private: bool, as_json: bool,
         pack: bool, lazy: bool, retry: bool) -> None:
    """Download a model from SOURCE (https://… with --sha256, or hf://org/repo[@rev]/file.gguf),
    verify it, and make it the active version of NAME. Interrupted pulls resume.
    A signed pack (an envelope file or URL) is verified and installed as its model_id;
    with --lazy its files are listed at once and downloaded when first opened."""
    import trio

    from modelfs_store.pull import PullOptions, PullResult

    options = PullOptions(pack=pack, lazy=lazy, sha256=sha256, size=size, name=name, mmproj=mmproj,
                          mmproj_sha256=mmproj_sha256, license=license_, owner_app=owner_app, private=private,
                          retry=retry)
    store = c.store
    with ExitStack() as stack:
        reporter = _Reporter(as_json, stack)
        try:
            result = trio.run(_run_pull, store, source, options, reporter)
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
    if isinstance(result, PullResult):
        _print_unsigned(result, as_json)
    else:
        _print_pack(result, as_json)


def _print_unsigned(result: PullResult, as_json: bool) -> None:
    if as_json:
        _emit({"event": "result", **result.as_dict()})
        return
    what = f"version {result.version}" if result.new_version else f"version {result.version} (unchanged)"
    click.echo(f"pulled {result.model} {what}: {len(result.files)} file(s), "
               f"{human_size(result.new_bytes)} new in the store, unsigned")


def _print_pack(res: InstallResult, as_json: bool) -> None:
    for line in res.below_min_device:  # a soft gate: installed anyway, and said so
        info(f"modelfs: warning: this machine is below the pack's min_device: {line}")
    if as_json:  # one JSON line, like the unsigned pull's final event
        click.echo(json.dumps({"event": "result", "signed": True, **res.as_dict()}, sort_keys=True))
        return
    if res.outcome == "installed":
        state = "active" if res.activated else f"installed; version {res.active_version} stays active"
        if res.dehydrated:
            click.echo(f"{res.model} version {res.version} {state}: signed by {res.key_id}; "
                       f"{len(res.dehydrated)} of {len(res.files)} file(s) not fetched yet: each is downloaded "
                       "and verified when first opened through the mount (or pull again without --lazy)")
        else:
            click.echo(f"{res.model} version {res.version} {state}: {len(res.files)} file(s) verified, "
                       f"signed by {res.key_id}")
    elif res.outcome == "already-active":
        click.echo(f"{res.model} version {res.version} is already active; nothing downloaded"
                   if not res.bytes_downloaded else
                   f"{res.model} version {res.version} is already active; fetched "
                   f"{human_size(res.bytes_downloaded)} of files that were not local")
    else:
        click.echo(f"{res.model} version {res.version} is already installed (active: "
                   f"{res.active_version}); use 'modelfs activate {res.model} {res.version}' to switch")
