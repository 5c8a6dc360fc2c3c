"""The daemon's update timer (acceptance 6), against a real daemon and a real origin
serving a signed channel:

- when the active version is the channel's, the timer's checks fetch the envelope and
  the origin serves 0 artifact bytes; a newer signed version is installed and active;
- while the gates hold background work back it fetches nothing, and it checks once
  they clear;
- when a channel is due: never checked, or ``update.interval`` plus its jitter after
  its last check (the catalog's ``last_checked``).
"""
# ruff: noqa: F811 - fixtures are imported by name

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from conftest import wait_for
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from modelfs.mount.jobs import GateCheck
from modelfs.mount.updates import MAX_JITTER, UpdateTimer
from modelfs_store.core import Store
from modelfs_store.download import Downloader
from modelfs_store.packs import add_channel
from test_control import Daemon, _audit
from test_control import pytestmark as needs_fuse
from test_gates import supply
from test_gating import top  # noqa: F401 - fixture
from test_packs import Publisher, release

FEED = "/p/feed.json"


def channels(d: Daemon) -> list[dict[str, Any]]:
    return d.cli.run("channels", "list", "--json").json()


def active(d: Daemon, model: str = "demo") -> int | None:
    listed = {m["name"]: m for m in d.cli.run("list", "--json").json()}
    return listed[model]["version"] if model in listed else None


def envelope_fetches(origin: FaultServer) -> int:
    return len(origin.requests(FEED))


@needs_fuse[0]
@needs_fuse[1]
def test_the_timer_fetches_no_artifact_when_current_and_installs_a_newer_version(
        top: Path, tmp_path: Path, origin: FaultServer) -> None:
    pub = Publisher(origin)
    d = Daemon(top, {"HF_HOME": str(tmp_path / "no-hf")})
    try:
        d.cli.run("keys", "add", "k1", pub.pub("k1"))
        url = pub.serve("feed.json", release(pub, 1))
        d.cli.run("channels", "add", url, "--key", "k1")
        d.cli.run("update")  # version 1 is active before the daemon starts
        assert active(d) == 1
        served, fetched = pub.artifact_bytes(), envelope_fetches(origin)
        d.cli.run("config", "set", "update.interval", "1")
        d.start()
        wait_for(lambda: envelope_fetches(origin) >= fetched + 2, 30, "two checks by the timer")
        assert pub.artifact_bytes() == served  # the active version is current: 0 artifact bytes
        assert channels(d)[0]["last_result"] == "up to date: demo version 1 is installed"

        pub.serve("feed.json", release(pub, 2))
        wait_for(lambda: active(d) == 2, 30, "the timer to install version 2")
        # The check is recorded once the install returns: just after the version is active.
        wait_for(lambda: channels(d)[0]["last_result"] == "installed demo version 2 (active, a candidate)", 30,
                 "the record")
        assert pub.artifact_bytes() == served + len(b"GGUF" + b"demo-2" * 4000)  # the new weights, once
        assert any(r["actor"] == "daemon:update-timer" and r["model"] == "demo" for r in _audit(d))
    finally:
        d.stop()


@needs_fuse[0]
@needs_fuse[1]
def test_the_timer_waits_for_the_gates(top: Path, tmp_path: Path, origin: FaultServer) -> None:
    pub = Publisher(origin)
    power = tmp_path / "power"
    ac = supply(power, "AC", type="Mains", online="0")
    supply(power, "BAT0", type="Battery", present="1")
    d = Daemon(top, {"HF_HOME": str(tmp_path / "no-hf"), "MODELFS_POWER_SUPPLY_ROOT": str(power)})
    try:
        d.cli.run("keys", "add", "k1", pub.pub("k1"))
        url = pub.serve("feed.json", release(pub, 1))
        d.cli.run("channels", "add", url, "--key", "k1")
        d.cli.run("config", "set", "gate.power", "ac")
        mount = d.start()
        wait_for(lambda: "channel updates wait: waiting for mains power" in mount.log.read_text(), 30,
                 "the timer to find the channel due and held back")
        assert envelope_fetches(origin) == 0 and channels(d)[0]["last_checked"] is None
        (ac / "online").write_text("1\n")
        wait_for(lambda: active(d) == 1, 30, "the timer to install version 1 on AC")
        wait_for(lambda: channels(d)[0]["last_result"] == "installed demo version 1 (active, a candidate)", 30,
                 "the record")
        assert channels(d)[0]["last_checked"] is not None
    finally:
        d.stop()


def test_a_channel_is_due_when_never_checked_or_an_interval_and_its_jitter_after(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    try:
        for url in ("https://a.example/feed.json", "https://b.example/feed.json"):
            add_channel(store, url, ["k1"])
        store.catalog.channel_checked("https://a.example/feed.json", "up to date")
        checked = store.catalog.channels()[0]["last_checked"]
        gates: GateCheck = _never_held
        now = [checked + 10.0]
        timer = UpdateTimer(store, lambda: Downloader(store.blobs), gates, interval=lambda: 86400,
                            clock=lambda: now[0], rng=random.Random(7))
        due, wait = timer.due(86400)
        assert [c["url"] for c in due] == ["https://b.example/feed.json"]  # never checked: at once
        assert wait == 60.0  # the longest sleep: settings and new channels apply within a minute
        jitter = timer._jitter["https://a.example/feed.json"]
        assert 0 <= jitter <= MAX_JITTER
        now[0] = checked + 86400 + jitter - 1
        assert [c["url"] for c in timer.due(86400)[0]] == ["https://b.example/feed.json"]
        now[0] = checked + 86400 + jitter
        assert len(timer.due(86400)[0]) == 2
        assert 0 <= UpdateTimer(store, lambda: Downloader(store.blobs), gates, interval=lambda: 10,
                                clock=lambda: checked).due(10)[1] <= 11  # a short interval: jitter a tenth of it
    finally:
        store.close()


async def _never_held() -> tuple[str, str] | None:
    return None
