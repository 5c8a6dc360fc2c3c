"""``modelfs pull``: a thin front end over ``modelfs_store.pull`` and ``modelfs_store.packs``.

Progress goes to stderr as a bar on a terminal and nowhere in a pipe; ``--json`` prints
events to stdout, one JSON object per line. Ctrl-C (or SIGTERM) cancels the transfer
through trio, so the partial download is flushed and kept for the next run, and says so.
Credentials are read from the environment by the store at request time, never from argv.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import click

from modelfs_store.errors import StoreError, UsageError
from modelfs_store.partial import list_partials

from ._output import human_size, info, print_json, progress_bar

# trio, httpx and the downloader load only when a pull runs: every other verb starts faster.


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
    sys.stdout.flush()


class _Reporter:
    """Builds the per-file progress callback for the chosen output."""

    def __init__(self, as_json: bool, stack: ExitStack) -> None:
        self.as_json = as_json
        self.stack = stack

    def __call__(self, src: Any) -> Callable[[int], None]:
        return _FileProgress(self, src)


class _FileProgress:
    """Progress of one file: JSON lines, or a bar (reopened with a total once known)."""

    def __init__(self, reporter: _Reporter, src: Any) -> None:
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


async def _run_pull(store: Any, source: str, sha256: str | None, size: int | None, name: str | None,
                    mmproj: str | None, mmproj_sha256: str | None, license_: str | None,
                    owner_app: str | None, reporter: _Reporter) -> Any:
    import trio

    from modelfs_store.download import Downloader
    from modelfs_store.pull import downloader_options_from_env, pull as store_pull, resolve

    opts = downloader_options_from_env()
    offline = os.environ.get("MODELFS_OFFLINE", "") not in ("", "0")
    async with Downloader(store.blobs, offline=offline, **opts) as dl:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_signal, scope)
                sources = [await resolve(dl, source, role="weights", sha256=sha256, size=size)]
                if mmproj:
                    base = None
                    if source.startswith("hf://") and "://" not in mmproj:
                        from modelfs_store.hf import parse_hf_url
                        base = parse_hf_url(source)
                    sources.append(await resolve(dl, mmproj, role="mmproj", sha256=mmproj_sha256, base=base))
                result = await store_pull(store, dl, sources, name=name, owner_app=owner_app,
                                          license=license_, progress=reporter)
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
@click.option("--sha256", help="Expected SHA-256 of the weights (required for https:// sources).")
@click.option("--size", type=int, help="Expected size in bytes, when known.")
@click.option("--name", help="Model name (default: from the file name).")
@click.option("--mmproj", help="Multimodal projector: a URL, or a path in the same hf:// repository.")
@click.option("--mmproj-sha256", help="Expected SHA-256 of the mmproj (required for https:// sources).")
@click.option("--license", "license_", help="Licence of the model.")
@click.option("--app", "owner_app", help="App that owns the model.")
@click.option("--json", "as_json", is_flag=True, help="Progress events and the result as JSON lines.")
@click.option("--pack", is_flag=True, help="SOURCE is a signed pack envelope (a file or an http(s) URL).")
@click.option("--lazy", is_flag=True,
              help="Signed packs only: record the model now, fetch each file on first open through the mount.")
@click.pass_obj
def pull(c: Any, source: str, sha256: str | None, size: int | None, name: str | None, mmproj: str | None,
         mmproj_sha256: str | None, license_: str | None, owner_app: str | None, as_json: bool,
         pack: bool, lazy: bool) -> None:
    """Download a model from SOURCE (https://… with --sha256, or hf://org/repo[@rev]/file.gguf),
    verify it, and make it the active version of NAME. Interrupted pulls resume.
    A signed pack (an envelope file or URL) is verified and installed as its model_id;
    with --lazy its files are listed at once and downloaded when first opened."""
    import trio

    from .trust import maybe_pull_pack  # signed packs (issue 5): a file, --pack, or a URL serving one
    if maybe_pull_pack(c, source, force=pack, probe_url=sha256 is None, as_json=as_json, lazy=lazy):
        return
    if lazy:
        raise UsageError("--lazy needs a signed pack: only its manifest vouches for every file's size and "
                         "SHA-256 before a byte is local")
    store = c.store
    with ExitStack() as stack:
        reporter = _Reporter(as_json, stack)
        try:
            result = trio.run(_run_pull, store, source, sha256, size, name, mmproj, mmproj_sha256,
                              license_, owner_app, reporter)
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
    if as_json:
        _emit({"event": "result", **result.as_dict()})
        return
    what = f"version {result.version}" if result.new_version else f"version {result.version} (unchanged)"
    click.echo(f"pulled {result.model} {what}: {len(result.files)} file(s), "
               f"{human_size(result.new_bytes)} new in the store, unsigned")
