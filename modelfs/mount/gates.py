"""When background work may run: on mains power, on an unmetered network, in a window.

Three settings (``modelfs config``) govern background work only: channel updates and
jobs an app starts with its "background" flag. A foreground ``pull`` or an open through
the mount runs at once, unless it asks to be gated.

    gate.power    ac | any          ac: wait while the machine runs on battery
    gate.metered  allow | deny      deny: wait while the network is metered
    gate.window   HH:MM-HH:MM | none  run only inside the window (it may cross midnight)
    gate.metered_unknown  allow | deny  what an unknown metered state means

:meth:`Gates.check` answers the first gate that holds a job back, as the job state it
shows (``queued_power``, ``queued_metered``, ``queued_window``) with the reason in
words, or None when the job may run.

Sources. Power comes from ``/sys/class/power_supply`` (the root can be moved, for
tests: ``$MODELFS_POWER_SUPPLY_ROOT``, read by the daemon): on AC when a mains
supply is online, or when there is no battery at all (a desktop); on battery when
batteries exist and no mains supply is online. "Metered"
comes from NetworkManager's ``Metered`` property on the system bus when it answers
(``$DBUS_SYSTEM_BUS_ADDRESS`` when set), else it is unknown.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from datetime import time as dtime
from pathlib import Path

log = logging.getLogger(__name__)

POWER_ROOT = Path("/sys/class/power_supply")
POWER_ROOT_ENV = "MODELFS_POWER_SUPPLY_ROOT"  # for tests: a fake power_supply directory
NM_TIMEOUT = 2.0  # seconds NetworkManager has to answer before the metered state counts as unknown
NM_METERED = {1: True, 3: True, 2: False, 4: False}  # NMMetered: yes, guess-yes, no, guess-no; 0 unknown


@dataclass(frozen=True)
class GateSettings:
    power: str = "any"                 # 'ac' or 'any'
    metered: str = "allow"             # 'allow' or 'deny'
    window: tuple[dtime, dtime] | None = None
    metered_unknown: str = "allow"     # what an unknown metered state counts as

    @classmethod
    def parse(cls, values: dict[str, str]) -> GateSettings:
        """From the ``gate.*`` settings as stored (strings); ValueError on a bad one."""
        power = values.get("gate.power", "any")
        metered = values.get("gate.metered", "allow")
        unknown = values.get("gate.metered_unknown", "allow")
        if power not in ("ac", "any") or metered not in ("allow", "deny") or unknown not in ("allow", "deny"):
            raise ValueError("gate.power is ac|any; gate.metered and gate.metered_unknown are allow|deny")
        return cls(power, metered, parse_window(values.get("gate.window", "none")), unknown)


def parse_window(text: str) -> tuple[dtime, dtime] | None:
    """``HH:MM-HH:MM`` (may cross midnight) or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        start, end = (datetime.strptime(part.strip(), "%H:%M").time() for part in text.split("-"))
    except ValueError:
        raise ValueError(f"gate.window is HH:MM-HH:MM or none, not {text!r}") from None
    return start, end


def in_window(window: tuple[dtime, dtime], now: dtime) -> bool:
    start, end = window
    return start <= now < end if start <= end else now >= start or now < end


def on_ac(root: Path = POWER_ROOT) -> bool:
    """Whether the machine runs on mains power (a machine without batteries does)."""
    mains_online = False
    batteries = 0
    try:
        supplies = list(root.iterdir())
    except OSError:
        return True
    for supply in supplies:
        kind = _read(supply / "type")
        if kind == "Mains" and _read(supply / "online") == "1":
            mains_online = True
        elif kind == "Battery" and _read(supply / "present") != "0":
            batteries += 1
    return mains_online or batteries == 0


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


async def nm_metered(bus: str = "SYSTEM") -> bool | None:
    """NetworkManager's view of whether the network is metered; None when unknown."""
    from jeepney import DBusAddress, Properties
    from jeepney.io.trio import open_dbus_router
    from jeepney.wrappers import DBusErrorResponse

    nm = DBusAddress("/org/freedesktop/NetworkManager", bus_name="org.freedesktop.NetworkManager",
                     interface="org.freedesktop.NetworkManager")
    import trio

    reply = None
    try:
        with trio.move_on_after(NM_TIMEOUT):
            async with open_dbus_router(bus=bus) as router:
                reply = await router.send_and_get_reply(Properties(nm).get("Metered"))
    except (OSError, KeyError, ValueError, DBusErrorResponse):
        return None
    if reply is None or reply.header.message_type.name == "error" or not reply.body:
        return None
    _signature, value = reply.body[0]
    return NM_METERED.get(int(value))


def power_root() -> Path:
    """Where the power supplies are: /sys/class/power_supply, or the tests' fake one."""
    return Path(os.environ.get(POWER_ROOT_ENV) or POWER_ROOT)


class Gates:
    def __init__(self, *, power_root: Path = POWER_ROOT,
                 metered: Callable[[], Awaitable[bool | None]] = nm_metered,
                 clock: Callable[[], datetime] = datetime.now) -> None:
        self.power_root = power_root
        self.metered = metered
        self.clock = clock

    async def check(self, settings: GateSettings) -> tuple[str, str] | None:
        """(state, reason) of the first gate that holds background work back, or None."""
        if settings.power == "ac" and not on_ac(self.power_root):
            return "queued_power", "waiting for mains power (gate.power=ac; the machine runs on battery)"
        if settings.metered == "deny":
            metered = await self.metered()
            if metered or (metered is None and settings.metered_unknown == "deny"):
                why = "the network is metered" if metered else "whether the network is metered is unknown"
                return "queued_metered", f"waiting for an unmetered network (gate.metered=deny; {why})"
        if settings.window is not None and not in_window(settings.window, self.clock().time()):
            start, end = settings.window
            return "queued_window", f"waiting for the window {start:%H:%M}-{end:%H:%M} (gate.window)"
        return None
