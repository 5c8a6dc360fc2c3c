"""``modelfs pulls``: the daemon's pull jobs, and ``pulls cancel|pause|resume ID``.

With the daemon up, everything goes through its control socket (it owns the jobs; a
caller sees its own). With no daemon the jobs are read from the catalog, and an action
changes the catalog row by the same rules (``modelfs.mount.jobs.transition``): a job
cancelled or paused now is not started by the next daemon; a job resumed is queued
for it (or waits for its credentials, which are never stored).
"""

from __future__ import annotations

import time
from typing import Any

import click

from modelfs_store.catalog import Action
from modelfs_store.errors import NotFound

from ._context import Ctx, json_option, pass_ctx
from ._output import human_size, print_json, table


def _jobs_from_catalog(c: Ctx) -> list[dict[str, Any]]:
    from modelfs.mount.jobs import Job

    return [Job.from_row(r).as_dict() for r in c.store.catalog.jobs()]


def _progress(job: dict[str, Any]) -> str:
    done, total = job["bytes_done"], job["bytes_total"]
    if total:
        return f"{human_size(done)} of {human_size(total)} ({100 * done / total:.0f}%)"
    return human_size(done) if done else "-"


def _what(job: dict[str, Any]) -> str:
    return str(job["model"] or job["source"])


@click.group(invoke_without_command=True)
@json_option
@pass_ctx
@click.pass_context
def pulls(ctx: click.Context, c: Ctx, as_json: bool) -> None:
    """Pull jobs of the store's daemon: state, bytes, rate, reason. `modelfs pull` hands its
    work to the daemon when one runs; these outlive the command that started them."""
    if ctx.invoked_subcommand is not None:
        return
    client = c.daemon()
    if client is not None:
        with client:
            jobs: list[dict[str, Any]] = client.call("GET", "/v1/pulls")
    else:
        jobs = _jobs_from_catalog(c)
    if as_json:
        print_json(jobs)
        return
    if not jobs:
        click.echo("no pull jobs")
        return
    rows = [("ID", "STATE", "BYTES", "RATE", "MODEL OR SOURCE", "REASON")]
    for j in jobs:
        rate = f"{human_size(int(j['rate']))}/s" if j.get("rate") else "-"
        rows.append((str(j["id"]), j["state"], _progress(j), rate, _what(j), j["reason"] or ""))
    table(rows)
    if client is None and any(j["state"] == "running" or j["state"].startswith("queued") for j in jobs):
        click.echo("no daemon runs for this store: queued jobs start when it does (`modelfs mount MOUNTPOINT`)")


def _act(c: Ctx, job_id: int, action: str, as_json: bool) -> None:
    client = c.daemon()
    if client is not None:
        with client:
            body: dict[str, Any] = {}
            if action == "resume":
                from modelfs_store import hf

                token = hf.token()
                if token:
                    body["token"] = token  # only sent to the hub's origin, and only if the job needs one
            job = client.call("POST", f"/v1/pulls/{job_id}/{action}", body)
    else:
        job = _act_offline(c, job_id, action)
    if as_json:
        print_json(job)
        return
    why = f" ({job['reason']})" if job.get("reason") else ""
    click.echo(f"job {job['id']}: {job['state']}{why}")


def _act_offline(c: Ctx, job_id: int, action: str) -> dict[str, Any]:
    """No daemon: the catalog row changes by the daemon's own rules."""
    from modelfs.mount.jobs import FINAL, Job, State, transition

    cat = c.store.catalog
    row = next((r for r in cat.jobs() if r["id"] == job_id), None)
    if row is None:
        raise NotFound(f"no job {job_id}", job=job_id)
    job = Job.from_row(row)
    new = transition(job.state, action, missing=bool(job.missing()))
    if new is not job.state:
        reason = {State.PAUSED: "paused", State.CANCELLED: "cancelled",
                  State.NEEDS_CREDENTIALS: "needs " + " and ".join(job.missing())}.get(new)
        finished = time.time() if new in FINAL else None
        cat.update_job(job_id, state=new.value, reason=reason, finished_at=finished)
        cat.audit(c.store.actor, Action.JOB, detail={"job": job_id, "action": action})
        job.state, job.reason, job.finished_at = new, reason, finished
    return job.as_dict()


def _action(name: str, doc: str) -> click.Command:
    @click.argument("job_id", type=int)
    @json_option
    @pass_ctx
    def command(c: Ctx, job_id: int, as_json: bool) -> None:
        _act(c, job_id, name, as_json)
    command.__doc__ = doc
    return pulls.command(name)(command)


cancel = _action("cancel", "Cancel job JOB_ID (its partial download is kept: `modelfs rm --partial` frees it).")
pause = _action("pause", "Pause job JOB_ID; `modelfs pulls resume` goes on from its partial bytes.")
resume = _action("resume", "Resume job JOB_ID (paused, failed, or waiting for its credentials).")
