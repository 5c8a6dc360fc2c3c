"""The sleep inhibitor against a real dbus-daemon the test starts, with a logind
stand-in on it (tests/login1_standin.py) that records Inhibit calls and checks that the
descriptor it handed out is closed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from conftest import wait_for
from modelfs.mount.inhibit import Inhibitor

HERE = Path(__file__).parent
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[str]:
    if shutil.which("dbus-daemon") is None:
        pytest.skip("!!! dbus-daemon is missing: the sleep-inhibitor tests CANNOT run !!!")
    socket = tmp_path / "system_bus_socket"
    (tmp_path / "bus.conf").write_text(BUS_CONFIG.format(socket=socket))
    daemon = subprocess.Popen(["dbus-daemon", f"--config-file={tmp_path / 'bus.conf'}", "--nofork"])
    try:
        wait_for(socket.exists, 10, "the bus to listen")
        yield f"unix:path={socket}"
    finally:
        daemon.terminate()
        daemon.wait(10)


@pytest.fixture
def login1(bus: str, tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "login1.log"
    standin = subprocess.Popen([sys.executable, str(HERE / "login1_standin.py"), bus, str(log)])
    try:
        wait_for(lambda: any(e["event"] == "ready" for e in events(log)), 10, "the logind stand-in")
        yield log
    finally:
        standin.kill()
        standin.wait(10)


def test_one_inhibitor_for_every_keep_awake_transfer_closed_after_the_last(bus: str, login1: Path) -> None:
    inhibitor = Inhibitor(bus=bus, mode="delay")

    async def main() -> None:
        async with inhibitor.hold(requested=True):
            async with inhibitor.hold(requested=True):  # a second transfer shares it
                assert inhibitor.held
            assert inhibitor.held
            calls = [e for e in events(login1) if e["event"] == "inhibit"]
            assert calls == [{"event": "inhibit", "inhibitor": 1, "what": "sleep", "who": "modelfs",
                              "why": "modelfs is downloading a model", "mode": "delay"}]
            assert not any(e["event"] == "closed" for e in events(login1))
        assert not inhibitor.held

    trio.run(main)
    wait_for(lambda: {"event": "closed", "inhibitor": 1} in events(login1), 5, "the descriptor to be closed")


def test_a_transfer_that_did_not_ask_takes_none_unless_always(bus: str, login1: Path) -> None:
    async def main(policy: str) -> None:
        inhibitor = Inhibitor(bus=bus, policy=policy)
        async with inhibitor.hold(requested=False):
            assert inhibitor.held is (policy == "always")
        async with Inhibitor(bus=bus, policy="never").hold(requested=True):
            pass

    trio.run(main, "on-request")
    assert [e for e in events(login1) if e["event"] == "inhibit"] == []
    trio.run(main, "always")
    assert len([e for e in events(login1) if e["event"] == "inhibit"]) == 1


def test_without_logind_nothing_breaks(tmp_path: Path) -> None:
    inhibitor = Inhibitor(bus=f"unix:path={tmp_path / 'no-such-bus'}")

    async def main() -> None:
        async with inhibitor.hold():
            assert not inhibitor.held

    trio.run(main)
    assert inhibitor.unavailable


def test_without_logind_on_the_bus_nothing_breaks(bus: str) -> None:
    inhibitor = Inhibitor(bus=bus)

    async def main() -> None:
        async with inhibitor.hold():
            assert not inhibitor.held

    trio.run(main)
    assert inhibitor.unavailable and "login1" in inhibitor.unavailable
