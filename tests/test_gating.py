"""Background work waits for the gates; everything else runs at once.

- In the queue: a background job the gates hold back shows the gate's state and reason,
  a foreground job beside it runs, and the background job starts once the gate clears.
- Against a real daemon and a fake /sys/class/power_supply on battery with
  ``gate.power=ac``: a background job (``pull --gated``) shows ``queued_power`` and
  starts within 5 s of the fake supply switching to AC (acceptance 4), while a
  foreground pull runs at once on battery.
"""
# ruff: noqa: F811 - fixtures are imported by name

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import remove_tree, wait_for
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from modelfs.mount.jobs import JobQueue, State
from modelfs_store.core import Store
from test_control import MB, Daemon, gguf_at
from test_control import pytestmark as needs_fuse
from test_gates import supply
from test_jobs import model, queue, run_with, until  # noqa: F401 - fixture


def test_a_background_job_waits_for_its_gate_and_a_foreground_one_does_not(tmp_path: Path,
                                                                           model: tuple[str, str, int]) -> None:
    url, digest, _size = model
    store = Store.open(tmp_path / "s")
    held: list[tuple[str, str] | None] = [("queued_power", "waiting for mains power")]

    async def gates() -> tuple[str, str] | None:
        return held[0]

    q = queue(store, concurrency=2)
    q.gates = gates

    async def body(q: JobQueue) -> None:
        bg, _ = q.submit(url, {"sha256": digest, "name": "bg", "background": True}, {}, uid=0, app_id=None)
        fg, _ = q.submit(url, {"sha256": digest, "name": "fg"}, {}, uid=0, app_id=None)
        await until(lambda: fg.state is State.DONE and bg.state is State.QUEUED_POWER)
        assert bg.reason == "waiting for mains power" and bg.options["background"] is True
        assert store.catalog.jobs()[0]["state"] == "queued_power"  # written before it is announced
        held[0] = None
        await until(lambda: bg.state is State.DONE)

    try:
        run_with(q, body)
    finally:
        store.close()


def _state(daemon: Daemon, job_id: int) -> dict[str, Any]:
    return daemon.job(job_id)


@needs_fuse[0]
@needs_fuse[1]
def test_a_background_job_waits_on_battery_and_starts_on_ac(tmp_path: Path, top: Path, origin: FaultServer) -> None:
    power = Path(tmp_path / "power")
    ac = supply(power, "AC", type="Mains", online="0")
    supply(power, "BAT0", type="Battery", present="1", status="Discharging")
    d = Daemon(top, {"MODELFS_POWER_SUPPLY_ROOT": str(power), "HF_HOME": str(tmp_path / "no-hf")})
    try:
        d.cli.run("config", "set", "gate.power", "ac")
        d.start()
        url, digest = gguf_at(origin, tmp_path, "bg.gguf", 2 * MB, 41)
        r = d.cli.run("pull", url, "--sha256", digest, "--name", "bg", "--gated", "--detach", "--json", process=True)
        job = json.loads(r.stdout)["job"]
        assert job["options"]["background"] is True
        waiting = wait_for(lambda: (j := _state(d, job["id"]))["state"] == "queued_power" and j, 10, "queued_power")
        assert isinstance(waiting, dict) and "battery" in waiting["reason"]
        listed = d.cli.run("pulls", "--json", process=True).json()
        assert [(j["state"], j["reason"]) for j in listed] == [("queued_power", waiting["reason"])]
        # A foreground pull runs at once on battery; the background one still waits.
        fg_url, fg_digest = gguf_at(origin, tmp_path, "fg.gguf", MB, 42)
        d.cli.run("pull", fg_url, "--sha256", fg_digest, "--name", "fg", process=True)
        assert _state(d, job["id"])["state"] == "queued_power" and origin.requests("/bg.gguf") == []
        (ac / "online").write_text("1\n")
        wait_for(lambda: _state(d, job["id"])["state"] in ("running", "done"), 5, "the job to start on AC")
        wait_for(lambda: _state(d, job["id"])["state"] == "done", 60, "the job to finish")
    finally:
        d.stop()


@needs_fuse[0]
@needs_fuse[1]
def test_pull_gated_follows_and_says_what_it_waits_for(tmp_path: Path, top: Path, origin: FaultServer) -> None:
    power = Path(tmp_path / "power")
    ac = supply(power, "AC", type="Mains", online="0")
    supply(power, "BAT0", type="Battery", present="1")
    d = Daemon(top, {"MODELFS_POWER_SUPPLY_ROOT": str(power), "HF_HOME": str(tmp_path / "no-hf")})
    try:
        d.cli.run("config", "set", "gate.power", "ac")
        d.start()
        url, digest = gguf_at(origin, tmp_path, "w.gguf", MB, 43)
        p = d.cli.popen("pull", url, "--sha256", digest, "--name", "w", "--gated", stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
        wait_for(lambda: d.call("GET", "/v1/pulls") and d.call("GET", "/v1/pulls")[0]["state"] == "queued_power",
                 30, "queued_power")
        (ac / "online").write_text("1\n")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "job 1 is queued_power: waiting for mains power" in err and out.startswith("pulled w version 1")
    finally:
        d.stop()


@pytest.fixture
def top() -> Iterator[Path]:
    """A short directory for a daemon's store and socket (a unix socket's path is bounded)."""
    top = Path(tempfile.mkdtemp(prefix="mfs-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    remove_tree(top)
