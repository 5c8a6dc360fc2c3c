"""Gating background work: power from a fake /sys/class/power_supply, the metered state
from an injected source and from a NetworkManager stand-in on the test's own bus, and
time windows (crossing midnight too)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, time
from pathlib import Path

import pytest
import trio

from modelfs.mount.gates import Gates, GateSettings, in_window, nm_metered, on_ac, parse_window
from test_inhibit import bus  # noqa: F401 - fixture: a dbus-daemon of the test's own


def supply(root: Path, name: str, **attrs: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for key, value in attrs.items():
        (d / key).write_text(value + "\n")
    return d


def test_power(tmp_path: Path) -> None:
    assert on_ac(tmp_path / "none")                      # no power_supply class: a desktop
    assert on_ac(tmp_path)                               # no supplies at all
    ac = supply(tmp_path, "AC", type="Mains", online="0")
    supply(tmp_path, "BAT0", type="Battery", present="1", status="Discharging")
    assert not on_ac(tmp_path)
    (ac / "online").write_text("1\n")
    assert on_ac(tmp_path)


def test_a_background_job_waits_for_mains_power_and_starts_when_it_comes(tmp_path: Path) -> None:
    ac = supply(tmp_path, "AC", type="Mains", online="0")
    supply(tmp_path, "BAT0", type="Battery", present="1")
    gates = Gates(power_root=tmp_path, metered=_never_metered)
    settings = GateSettings.parse({"gate.power": "ac"})
    state = trio.run(gates.check, settings)
    assert state is not None and state[0] == "queued_power" and "battery" in state[1]
    assert trio.run(gates.check, GateSettings.parse({"gate.power": "any"})) is None
    (ac / "online").write_text("1\n")
    assert trio.run(gates.check, settings) is None


async def _never_metered() -> bool | None:
    return False


@pytest.mark.parametrize(("metered", "unknown", "held"), [
    (True, "allow", True), (False, "allow", False), (None, "allow", False), (None, "deny", True)])
def test_metered(metered: bool | None, unknown: str, held: bool) -> None:
    async def source() -> bool | None:
        return metered

    gates = Gates(metered=source, power_root=Path("/nonexistent"))
    state = trio.run(gates.check, GateSettings.parse({"gate.metered": "deny", "gate.metered_unknown": unknown}))
    assert (state is not None and state[0] == "queued_metered") is held


def test_windows() -> None:
    night = parse_window("23:00-06:30")
    assert night is not None and in_window(night, time(23, 30)) and in_window(night, time(2, 0))
    assert not in_window(night, time(12, 0)) and not in_window(night, time(6, 30))
    day = parse_window("09:00-17:00")
    assert day is not None and in_window(day, time(9, 0)) and not in_window(day, time(17, 0))
    assert parse_window("none") is None
    with pytest.raises(ValueError):
        parse_window("25:00-26:00")
    gates = Gates(clock=lambda: datetime(2026, 12, 4, 12, 0), power_root=Path("/nonexistent"))
    state = trio.run(gates.check, GateSettings.parse({"gate.window": "23:00-06:30"}))
    assert state is not None and state[0] == "queued_window" and "23:00-06:30" in state[1]


NM_STANDIN = """
import sys
from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
conn = open_dbus_connection(bus=sys.argv[1])
conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.NetworkManager"))
print("ready", flush=True)
while True:
    msg = conn.receive()
    if msg.header.message_type is not MessageType.method_call:
        continue
    if msg.header.fields.get(HeaderFields.member) == "Get" and msg.body[1] == "Metered":
        conn.send(new_method_return(msg, "v", (("u", int(sys.argv[2])),)))
    else:
        conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod"))
"""


@pytest.mark.parametrize(("nm_value", "metered"), [(1, True), (4, False), (0, None)])
def test_networkmanagers_metered_property(bus: str, nm_value: int, metered: bool | None) -> None:  # noqa: F811
    nm = subprocess.Popen([sys.executable, "-c", NM_STANDIN, bus, str(nm_value)], stdout=subprocess.PIPE, text=True)
    try:
        assert nm.stdout is not None and nm.stdout.readline().strip() == "ready"
        assert trio.run(nm_metered, bus) is metered
    finally:
        nm.kill()
        nm.wait(10)
    assert trio.run(nm_metered, bus) is None  # nobody answers: unknown
