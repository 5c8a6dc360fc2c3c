"""The daemon's sleep inhibitor, against a real dbus-daemon the test starts (the
daemon's ``DBUS_SYSTEM_BUS_ADDRESS``) with the logind stand-in on it
(tests/login1_standin.py), and a real origin (acceptance 5):

- during ``pull --keep-awake`` transfers (two at once) the stand-in has handed out
  exactly one inhibitor, and its descriptor is closed within 1 s of the last one
  ending; a transfer without it takes none;
- ``inhibit=never`` takes none even when asked; with no logind the pull works;
- ``modelfs doctor`` says whether logind answers;
- with no daemon, ``pull --keep-awake`` holds one in its own process.
"""
# ruff: noqa: F811 - fixtures are imported by name

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import wait_for
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from test_control import MB, Daemon, gguf_at
from test_control import pytestmark as needs_fuse
from test_gating import top  # noqa: F401 - fixture
from test_inhibit import bus, events, login1  # noqa: F401 - fixtures

pytestmark = needs_fuse


def inhibits(log: Path) -> list[dict]:
    return [e for e in events(log) if e["event"] == "inhibit"]


def closed(log: Path) -> list[dict]:
    return [e for e in events(log) if e["event"] == "closed"]


def _detach(d: Daemon, *args: str) -> int:
    r = d.cli.run("pull", *args, "--detach", "--json", process=True)
    return int(json.loads(r.stdout)["job"]["id"])


def test_keep_awake_transfers_hold_one_inhibitor_closed_when_they_end(top: Path, tmp_path: Path, bus: str,
                                                                      login1: Path, origin: FaultServer) -> None:
    d = Daemon(top, {"DBUS_SYSTEM_BUS_ADDRESS": bus, "HF_HOME": str(tmp_path / "no-hf")})
    try:
        d.start()
        # Without --keep-awake: no inhibitor.
        url, digest = gguf_at(origin, tmp_path, "plain.gguf", 8 * MB, 51, rate=8 * MB)
        plain = _detach(d, url, "--sha256", digest, "--name", "plain")
        wait_for(lambda: origin.bytes_sent("/plain.gguf") > MB, 30, "the plain transfer")
        wait_for(lambda: d.job(plain)["state"] == "done", 60, "the plain job")
        assert inhibits(login1) == []

        # Two --keep-awake transfers at once share one inhibitor.
        jobs = []
        for i in (1, 2):
            url, digest = gguf_at(origin, tmp_path, f"a{i}.gguf", 16 * MB, 51 + i, rate=8 * MB)
            jobs.append(_detach(d, url, "--sha256", digest, "--name", f"a{i}", "--keep-awake"))
        assert d.job(jobs[0])["options"]["keep_awake"] is True
        wait_for(lambda: all(origin.bytes_sent(f"/a{i}.gguf") > MB for i in (1, 2)), 30, "both transfers")
        assert [d.job(j)["state"] for j in jobs] == ["running", "running"]
        assert [(e["what"], e["who"], e["mode"]) for e in inhibits(login1)] == [("sleep", "modelfs", "block")]
        assert closed(login1) == []
        wait_for(lambda: all(d.job(j)["state"] == "done" for j in jobs), 60, "the keep-awake jobs")
        # Released before the job is announced done; the stand-in records the close at once.
        wait_for(lambda: closed(login1) == [{"event": "closed", "inhibitor": 1}], 1, "the inhibitor's close")
        assert len(inhibits(login1)) == 1

        # inhibit=never: asked, and not taken; inhibit.mode reaches logind.
        d.cli.run("config", "set", "inhibit", "never", process=True)
        url, digest = gguf_at(origin, tmp_path, "n.gguf", 2 * MB, 54)
        never = _detach(d, url, "--sha256", digest, "--name", "n", "--keep-awake")
        wait_for(lambda: d.job(never)["state"] == "done", 60, "the job under inhibit=never")
        assert len(inhibits(login1)) == 1
        d.cli.run("config", "set", "inhibit", "on-request", process=True)
        d.cli.run("config", "set", "inhibit.mode", "delay", process=True)
        url, digest = gguf_at(origin, tmp_path, "m.gguf", 2 * MB, 55)
        delay = _detach(d, url, "--sha256", digest, "--name", "m", "--keep-awake")
        wait_for(lambda: d.job(delay)["state"] == "done", 60, "the job in delay mode")
        assert [e["mode"] for e in inhibits(login1)] == ["block", "delay"]
        wait_for(lambda: len(closed(login1)) == 2, 1, "the second inhibitor's close")
    finally:
        d.stop()


def test_without_logind_a_keep_awake_pull_works_and_doctor_says_so(top: Path, tmp_path: Path, bus: str,
                                                                   origin: FaultServer) -> None:
    d = Daemon(top, {"DBUS_SYSTEM_BUS_ADDRESS": bus, "HF_HOME": str(tmp_path / "no-hf")})
    try:
        row = [c for c in d.cli.run("doctor", "--json", process=True).json() if c["name"] == "logind"]
        assert row[0]["ok"] is True and "does not answer" in row[0]["detail"] and "login1" in row[0]["detail"]
        d.start()
        url, digest = gguf_at(origin, tmp_path, "k.gguf", 2 * MB, 56)
        r = d.cli.run("pull", url, "--sha256", digest, "--name", "k", "--keep-awake", process=True)
        assert r.stdout.startswith("pulled k version 1")
        assert "no sleep inhibitor" in d.mount.log.read_text()
    finally:
        d.stop()


def test_doctor_says_logind_answers(tmp_path: Path, bus: str, login1: Path) -> None:
    r = subprocess.run(Daemon(tmp_path).cli.argv("doctor", "--json"), capture_output=True, text=True, timeout=60,
                       env={**Daemon(tmp_path).cli.env, "DBUS_SYSTEM_BUS_ADDRESS": bus})
    [row] = [c for c in json.loads(r.stdout) if c["name"] == "logind"]
    assert row == {"name": "logind", "ok": True, "detail": "answers: --keep-awake downloads hold a sleep inhibitor"}


def test_an_in_process_keep_awake_pull_holds_one_too(tmp_path: Path, bus: str, login1: Path,
                                                     origin: FaultServer) -> None:
    d = Daemon(tmp_path, {"DBUS_SYSTEM_BUS_ADDRESS": bus, "HF_HOME": str(tmp_path / "no-hf")})
    url, digest = gguf_at(origin, tmp_path, "l.gguf", 2 * MB, 57)
    d.cli.run("pull", url, "--sha256", digest, "--name", "l", "--keep-awake", "--no-daemon", process=True)
    assert [e["what"] for e in inhibits(login1)] == ["sleep"]
    wait_for(lambda: closed(login1) == [{"event": "closed", "inhibitor": 1}], 5, "the descriptor to be closed")
    d.cli.run("pull", url, "--sha256", digest, "--name", "l2", "--no-daemon", process=True)
    assert len(inhibits(login1)) == 1
