"""``modelfs adopt``: the plan (what, from where, how, what it costs on disk), then, unless
``--dry-run``, carrying it out with a progress bar over the bytes it hashes.

Parsing and printing only; ``modelfs_store.adopt`` finds, plans and adopts.
"""

from __future__ import annotations

import click

from modelfs_store import adopt as adopting

from ._context import Ctx, json_option, pass_ctx
from ._output import human_size, info, print_json, progress_bar

HOW = {
    "present": "already in the store",
    "reflink": "reflink (shares its extents, no copy)",
    "hardlink": "hard link (the cache's file becomes read-only, 0444)",
    "copy": "copy",
    "needs-copy": "needs --copy",
}


@click.command()
@click.option("--from", "sources", multiple=True, metavar="hf|ollama|lmstudio|DIR",
              help="Where to look (repeatable): a tool's own place, or a directory (of GGUF files, or a Hugging "
                   "Face, Ollama or LM Studio cache kept elsewhere). Default: the Hugging Face cache, Ollama and "
                   "LM Studio.")
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@click.option("--copy", is_flag=True, help="Copy what cannot be linked (another file system, another owner, "
                                           "a file its tool may rewrite) instead of skipping it.")
@json_option
@pass_ctx
def adopt(c: Ctx, sources: tuple[str, ...], dry_run: bool, copy: bool, as_json: bool) -> None:
    """Take the models of other tools' caches (Hugging Face, Ollama, LM Studio, a directory)
    into the store without a second copy on disk. A reflink where the file system has
    them, else a hard link to the cache's own content-addressed blob (made read-only,
    0444), else a copy only with --copy. Every file is hashed once against the name its
    cache gave it; a mismatch is reported and that model skipped. Nothing in the other
    tool's cache is rewritten, renamed or deleted (a hard-linked file becomes 0444)."""
    store = c.store
    plan = adopting.plan(store, sources, copy=copy)
    if not as_json:
        _print_plan(plan, dry_run)
    outcomes = None
    if not dry_run:
        with progress_bar(plan.read_bytes or None, "adopting") as advance:
            outcomes = adopting.execute(store, plan, advance, on_done=None if as_json else _print_outcome)
    if as_json:
        print_json(adopting.as_dict(plan, outcomes))
    elif outcomes is not None:
        done = [o for o in outcomes if o.status == "adopted"]
        click.echo(f"adopted {len(done)} model(s): {human_size(sum(o.cost_bytes for o in done))} copied, "
                   f"{human_size(sum(o.saved_bytes for o in done))} saved")
    failed = [o.exit_code for o in outcomes or [] if o.status == "failed"]
    if failed:  # the others were adopted; 5 (as `verify`) when a file failed its hash
        raise SystemExit(5 if 5 in failed else failed[0])


def _print_plan(plan: adopting.AdoptPlan, dry_run: bool) -> None:
    for pl in plan.places:
        if pl.found:
            click.echo(f"looking in {pl.tool}: {pl.path} ({pl.reason})")
    verb = "would adopt" if dry_run else "adopt"
    for e in plan.entries:
        if e.skip:
            click.echo(f"skip {e.name}  ({e.candidate.origin}): {e.skip}")
            continue
        update = " (a new version: it came from there before, with other files)" if e.update else ""
        click.echo(f"{verb} {e.name}  from {e.candidate.origin}{update}")
        for f in e.files:
            why = f" ({f.why})" if f.why else ""
            click.echo(f"  {f.found.filename}  {f.found.role}  {human_size(f.found.where.size)}  "
                       f"{HOW[f.method]}{why}")
    for r in plan.refused:
        click.echo(f"refused {r.path}: {r.reason}")
    if not any(not e.skip for e in plan.entries):
        click.echo("nothing to adopt")
    click.echo(f"{'would cost' if dry_run else 'costs'} {human_size(plan.cost_bytes)} on disk, "
               f"saves {human_size(plan.saved_bytes)}")


def _print_outcome(o: adopting.Outcome) -> None:
    if o.status == "adopted":
        how = ", ".join(sorted(set(o.methods.values())))
        click.echo(f"adopted {o.name} version {o.version} ({how})")
    elif o.status == "failed":
        info(f"modelfs: not adopted: {o.entry.name}: {o.reason}")
    elif o.entry.skip is None:  # found only now (files named by no hash, seen after hashing)
        click.echo(f"skipped {o.entry.name}: {o.reason}")
