"""Rollout supervision in one process: the exact decision table of ``store.rollout``,
the store carrying verdicts out (rollback to last-good, marked good), the windows, the
settings, which activations make a candidate (a channel update, ``pull --candidate``),
and ``mark-good``, ``list``, ``show`` and ``status`` showing it.
"""
# ruff: noqa: F811 - the fault server's fixtures are imported by name

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs_store.core import Store
from modelfs_store.rollout import SUPERVISOR, Rules, Tally, decide, windows
from test_packs import Publisher, release

RULES = Rules(good_loads=3, max_failure_increase=0.2, window=3600.0)


# -- the decision, pure ----------------------------------------------------------------------
@pytest.mark.parametrize(("cand", "base", "last_good", "over", "verdict"), [
    ((0, 0), (0, 0), True, False, "wait"),          # nothing reported yet
    ((2, 0), (0, 0), True, False, "wait"),          # too few to judge
    ((0, 2), (0, 0), True, False, "wait"),          # two failures are still too few
    ((0, 3), (0, 0), True, False, "rollback"),      # 100% failed against 0%
    ((1, 2), (0, 0), True, False, "rollback"),      # 67% against 0%
    ((3, 0), (0, 0), True, False, "good"),          # N successful loads
    ((3, 1), (0, 0), True, False, "rollback"),      # N successes, but 25% failed against 0%: worse by > 20%
    ((4, 1), (0, 0), True, False, "good"),          # 20% against 0%: not worse by MORE than 20%
    ((3, 2), (1, 1), True, False, "good"),          # 40% against last-good's 50%: better
    ((1, 2), (1, 1), True, False, "wait"),          # 67% against 50%: within the threshold, 1 of 3 successes
    ((0, 3), (0, 0), False, False, "unhappy"),      # worse, but no last-good to go back to
    ((1, 0), (0, 0), True, True, "wait"),           # the window ended undecided: the admin decides
    ((2, 1), (0, 2), True, True, "wait"),           # enough reports, better than baseline, too few successes
])
def test_the_decision_table(cand: tuple[int, int], base: tuple[int, int], last_good: bool, over: bool,
                            verdict: str) -> None:
    d = decide(Tally(*cand), Tally(*base), RULES, has_last_good=last_good, window_over=over)
    assert d.verdict == verdict, d.reason
    if over and verdict == "wait":
        assert "mark-good" in d.reason


def test_a_threshold_of_zero_rolls_back_on_any_increase_and_the_windows_are_equal() -> None:
    strict = Rules(good_loads=1, max_failure_increase=0.0, window=60.0)
    assert decide(Tally(9, 1), Tally(10, 0), strict, has_last_good=True).verdict == "rollback"
    assert decide(Tally(9, 1), Tally(9, 1), strict, has_last_good=True).verdict == "good"
    assert windows(1000.0, strict) == ((1000.0, 1060.0), (940.0, 1000.0))


# -- the store carries the verdict out ----------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Store, Clock]]:
    """A store with model m: version 1 active (good), version 2 installed; a clock the test moves."""
    store = Store.open(tmp_path / "store")
    clock = Clock()
    store.catalog.clock = clock
    for seed in (1, 2):
        store.import_model("m", write_model(tmp_path / f"w{seed}.gguf", tensor_bytes=4096, seed=seed))
    store.activate("m", 1)
    yield store, clock
    store.close()


def candidate(store: Store, version: int = 2) -> None:
    store.catalog.activate("m", version, actor="test", candidate=True)


def test_failed_loads_past_the_threshold_roll_back_to_last_good(two: tuple[Store, Clock]) -> None:
    store, clock = two
    candidate(store)
    m = store.catalog.get_model("m")
    assert (m.active_version, m.last_good_version, m.candidate_since) == (2, 1, clock.t)
    assert store.report_load("m", False, uid=1000, app_id="org.example.A")[1].verdict == "wait"
    clock.t += 10
    assert store.report_load("m", True)[1].verdict == "wait"
    clock.t += 10
    version, d = store.report_load("m", False)
    assert version == 2 and d is not None and d.verdict == "rollback"
    m = store.catalog.get_model("m")
    assert (m.active_version, m.last_good_version, m.candidate_since) == (1, None, None)
    (row,) = store.catalog.rollbacks(SUPERVISOR)
    detail = json.loads(row["detail"])
    assert (row["model"], row["version"], row["outcome"]) == ("m", 1, "ok")
    assert detail["from"] == 2 and detail["by"] == "loads" and detail["candidate"]["failed_count"] == 2
    loads = [r for r in store.catalog.audit_log("m") if r["action"] == "load"]
    assert [r["outcome"] for r in reversed(loads)] == ["failed", "ok", "failed"]  # one row per report
    assert json.loads(loads[-1]["detail"]) == {"uid": 1000, "app": "org.example.A"}
    # The version rolled back from is no candidate any more: later reports change nothing.
    assert store.report_load("m", False, version=2)[1] is None
    assert store.catalog.get_model("m").active_version == 1


def test_successful_loads_make_it_good_and_the_next_version_keeps_it_as_last_good(
        two: tuple[Store, Clock], tmp_path: Path) -> None:
    store, clock = two
    candidate(store)
    for _ in range(2):
        assert store.report_load("m", True)[1].verdict == "wait"
    assert store.report_load("m", True)[1].verdict == "good"
    m = store.catalog.get_model("m")
    assert (m.active_version, m.candidate_since) == (2, None) and store.describe(m)["rollout"] is None
    good = [r for r in store.catalog.audit_log("m") if r["action"] == "good"]
    assert good[0]["actor"] == SUPERVISOR and json.loads(good[0]["detail"])["candidate"]["ok_count"] == 3
    store.import_model("m", write_model(tmp_path / "w3.gguf", tensor_bytes=4096, seed=3))  # v3, active
    assert store.catalog.get_model("m").last_good_version == 2


def test_a_candidate_replaced_before_it_proved_good_is_not_last_good(two: tuple[Store, Clock],
                                                                     tmp_path: Path) -> None:
    store, _ = two
    candidate(store)
    store.import_model("m", write_model(tmp_path / "w3.gguf", tensor_bytes=4096, seed=3))  # v3 over candidate v2
    m = store.catalog.get_model("m")
    assert (m.active_version, m.last_good_version, m.candidate_since) == (3, 1, None)


def test_the_baseline_is_last_good_over_the_same_length_of_time_before(two: tuple[Store, Clock]) -> None:
    store, clock = two
    start = clock.t
    clock.t = start - 7200  # two hours before: outside the baseline window, ignored
    for _ in range(5):
        store.report_load("m", True, version=1)
    clock.t = start - 1800  # half an hour before: last-good failed half of its loads
    store.report_load("m", True, version=1)
    store.report_load("m", False, version=1)
    clock.t = start
    candidate(store)
    for ok in (False, False, True):
        d = store.report_load("m", ok)[1]
    assert d is not None and d.verdict == "wait"  # 67% against 50%: within 20%
    assert (d.baseline.ok, d.baseline.failed) == (1, 1)
    assert store.rollout_state(store.catalog.get_model("m"))["baseline"]["failed_share"] == 0.5
    clock.t = start + 3600  # the window is over: what comes now counts for nothing
    for _ in range(5):
        store.report_load("m", True)
    d = store.supervise("m")
    assert d is not None and d.verdict == "wait" and "mark-good" in d.reason
    assert store.catalog.get_model("m").candidate_since == start


def test_settings_change_the_verdict_at_the_next_pass(two: tuple[Store, Clock]) -> None:
    store, _ = two
    candidate(store)
    store.report_load("m", True)
    store.report_load("m", False)
    ((_, d),) = store.supervise_all()
    assert d.verdict == "wait" and store.catalog.get_model("m").active_version == 2
    other = CLI(store.layout.root)
    assert other.run("config", "set", "rollout.good_loads", "2", "--json").json()["value"] == 2
    assert other.run("config", "set", "rollout.window", "30m", "--json").json()["value"] == 1800
    assert other.run("config", "set", "rollout.max_failure_increase", "10%", "--json").json()["value"] == 0.1
    for bad in (("rollout.good_loads", "0"), ("rollout.window", "soon"), ("rollout.max_failure_increase", "2")):
        assert other.run("config", "set", *bad, check=False).returncode == 2
    ((name, d),) = store.supervise_all()
    assert (name, d.verdict) == ("m", "rollback") and store.catalog.get_model("m").active_version == 1


# -- through the CLI: mark-good, list, show, status; which activations make a candidate ------------
def test_mark_good_ends_the_probation_and_is_refused_without_a_candidate(two: tuple[Store, Clock]) -> None:
    store, _ = two
    cli = CLI(store.layout.root)
    r = cli.run("mark-good", "m", check=False)
    assert r.returncode == 4 and "no candidate version" in r.stderr
    candidate(store)
    assert "2 (candidate)" in cli.run("list").stdout
    shown = cli.run("show", "m").stdout
    assert "rollout: version 2 is a candidate (last-good: 1" in shown and "version 2  active, candidate" in shown
    assert cli.run("show", "m", "--json").json()["rollout"]["version"] == 2
    assert cli.run("status", "--json").json()["rollouts"]["candidates"][0]["model"] == "m"
    assert cli.run("mark-good", "m", "--json").json() == {"name": "m", "active_version": 2, "last_good_version": 1}
    assert cli.run("show", "m", "--json").json()["rollout"] is None
    (row,) = [r for r in store.catalog.audit_log("m") if r["action"] == "good"]
    assert json.loads(row["detail"])["by"] == "admin" and row["actor"].startswith("cli:")
    # Good now: failed loads roll nothing back.
    for _ in range(3):
        assert store.report_load("m", False)[1] is None
    assert store.catalog.get_model("m").active_version == 2


def test_status_shows_the_supervisors_rollback(two: tuple[Store, Clock]) -> None:
    store, _ = two
    candidate(store)
    for _ in range(3):
        store.report_load("m", False)
    cli = CLI(store.layout.root)
    (rb,) = cli.run("status", "--json").json()["rollouts"]["rollbacks"]
    assert (rb["model"], rb["from_version"], rb["version"]) == ("m", 2, 1)
    assert "rolled back: m from version 2 to 1" in cli.run("status").stdout


@pytest.fixture
def published(cli: CLI, origin: FaultServer) -> tuple[Publisher, str]:
    pub = Publisher(origin)
    cli.run("keys", "add", "k1", pub.pub("k1"))
    return pub, pub.serve("chan.json", release(pub, 1))


def _show(cli: CLI) -> dict[str, Any]:
    return cli.run("show", "demo", "--json").json()


def test_a_channel_updates_version_is_a_candidate_a_plain_pull_is_not(cli: CLI, published: tuple[Publisher, str],
                                                                      ) -> None:
    pub, url = published
    cli.run("pull", url)
    assert _show(cli)["rollout"] is None  # pulled by hand: trusted as it is
    cli.run("channels", "add", url, "--key", "k1")
    pub.serve("chan.json", release(pub, 2))
    cli.run("update")
    shown = _show(cli)
    assert shown["active_version"] == 2 and shown["rollout"]["version"] == 2
    assert shown["rollout"]["last_good_version"] == 1
    activated = [r for r in cli_store_audit(cli) if r["action"] == "activate" and r["version"] == 2]
    assert json.loads(activated[0]["detail"])["candidate"] is True


def test_pull_candidate_makes_a_pack_a_candidate_and_refuses_an_unsigned_file(
        cli: CLI, published: tuple[Publisher, str], tmp_path: Path) -> None:
    pub, url = published
    cli.run("pull", url)
    cli.run("pull", pub.serve("v2.json", release(pub, 2)), "--candidate")
    assert _show(cli)["rollout"]["version"] == 2
    r = cli.run("pull", "https://example.org/w.gguf", "--sha256", "a" * 64, "--candidate", check=False)
    assert r.returncode == 2 and "--candidate needs a signed pack" in r.stderr


def cli_store_audit(cli: CLI) -> list[dict[str, Any]]:
    store = Store.open(cli.root)
    try:
        return store.catalog.audit_log()
    finally:
        store.close()


# -- the report route, without a socket (modelfs/mount/api.py) -------------------------------------
def test_the_report_route_judges_reports_and_refuses_who_cannot_see(tmp_path: Path) -> None:
    from test_api import OTHER, A, World

    store = Store.open(tmp_path / "store")
    for name, seed, private in (("open", 1, False), ("secret", 2, True), ("open", 3, False)):
        store.import_model(name, write_model(tmp_path / f"{name}{seed}.gguf", tensor_bytes=4096, seed=seed),
                           owner_app=A if private else None, private=private)
    store.activate("open", 1)
    store.catalog.activate("open", 2, actor="test", candidate=True)
    world = World(store)
    try:
        r = world.call("POST", "/v1/models/open/loads", {"ok": False}, uid=OTHER, app=A)
        assert r.status == 201 and r.body["verdict"]["verdict"] == "wait" and r.body["version"] == 2
        # A report of version 1 is recorded, and is not the candidate's.
        r = world.call("POST", "/v1/models/open/loads", {"ok": True, "version": 1})
        assert r.body["version"] == 1
        assert r.body["verdict"]["candidate"] == {"ok_count": 0, "failed_count": 1, "failed_share": 1.0}
        # The identity comes from the peer: a caller the daemon could not identify reports nothing.
        r = world.call("POST", "/v1/models/open/loads", {"ok": False}, uid=OTHER, sure=False)
        assert r.status == 403 and r.body["error"]["reason"] == "identity"
        hidden = world.call("POST", "/v1/models/secret/loads", {"ok": False}, uid=OTHER)
        absent = world.call("POST", "/v1/models/gone/loads", {"ok": False}, uid=OTHER)
        assert hidden.status == absent.status == 403 and hidden.body["error"]["message"].replace("secret", "gone") \
            == absent.body["error"]["message"]
        assert world.call("POST", "/v1/models/secret/loads", {"ok": True}, app=A).status == 201  # its own app
        assert world.call("POST", "/v1/models/gone/loads", {"ok": True}).status == 404  # the owner is told
        for bad in ({}, {"ok": 1}, {"ok": True, "version": "2"}, {"ok": True, "count": 5}):
            assert world.call("POST", "/v1/models/open/loads", bad).status == 400
        assert world.call("POST", "/v1/models/open/loads", {"ok": True, "version": 9}).status == 404
        assert len(world.denials()) == 3
        for _ in range(2):
            r = world.call("POST", "/v1/models/open/loads", {"ok": False}, uid=OTHER)
        assert r.body["verdict"]["verdict"] == "rollback" and r.body["active_version"] == 1
    finally:
        store.close()
