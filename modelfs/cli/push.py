"""``modelfs push``: publish a model to an OCI registry, so a fleet pulls it from there.

A thin front end over ``modelfs_store.oci.push``: one ``trio.run`` with the pull's
Downloader set-up (its HTTP layer: the redirect rule, the registry's credentials for
its own origin only, ``MODELFS_OFFLINE``), a progress bar over every byte it sends,
and the result as a line or as JSON. Registry credentials come from the environment
or the credentials file at request time (``docs/fleet.md``), never from argv.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import click

from ._context import Ctx, json_option, pass_ctx
from ._output import human_size, print_json, progress_bar

if TYPE_CHECKING:
    from modelfs_store.core import Store
    from modelfs_store.oci import PushResult


class _Bar:
    """The progress bar, opened once the total is known."""

    def __init__(self, stack: ExitStack, enabled: bool) -> None:
        self.stack = stack
        self.enabled = enabled
        self.advance: Callable[[int], None] = lambda n: None

    def set_total(self, total: int) -> None:
        if self.enabled:
            self.advance = self.stack.enter_context(progress_bar(total, "pushing"))

    def __call__(self, n: int) -> None:
        self.advance(n)


async def _run(store: Store, name: str, target: str, bar: _Bar) -> PushResult:
    from modelfs_store import oci
    from modelfs_store.pull import downloader_from_env

    async with downloader_from_env(store.blobs) as dl:
        return await oci.push(store.catalog, store.blobs, dl.http, name, target, progress=bar, set_total=bar.set_total)


@click.command()
@click.argument("name")
@click.argument("target")
@json_option
@pass_ctx
def push(c: Ctx, name: str, target: str, as_json: bool) -> None:
    """Publish model NAME's active version (weights, shards and mmproj) to an OCI registry as one artifact.
    TARGET is oci://HOST[:PORT]/REPO:TAG (HTTPS) or oci+http://… (plain HTTP, when asked for).
    Blobs the registry already has are not sent again; other machines then
    `modelfs pull` TARGET. Credentials: MODELFS_REGISTRY_USER and MODELFS_REGISTRY_PASSWORD,
    or the auths of Docker's config.json (mode 0600); see docs/fleet.md."""
    import trio

    store = c.store
    with ExitStack() as stack:
        result = trio.run(_run, store, name, target, _Bar(stack, not as_json and sys.stderr.isatty()))
    d: dict[str, Any] = result.as_dict()
    if as_json:
        print_json(d)
        return
    click.echo(f"pushed {d['name']} version {d['version']} to {d['reference']}: {d['digest']}; "
               f"{d['blobs'] - d['blobs_skipped']} of {d['blobs']} blob(s) sent ({human_size(d['bytes_uploaded'])}), "
               f"{d['blobs_skipped']} already there")
    click.echo(f"pull it elsewhere with: modelfs pull {d['source']}")
