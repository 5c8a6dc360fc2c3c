"""Keeping the machine awake while a download needs it: one logind sleep inhibitor.

Never automatic. A job asks for it (``keep_awake``: an app through the API, or
``pull --keep-awake``), and the ``inhibit`` setting decides: ``never``, ``on-request``
(the default) or ``always``. While at least one such job transfers, the daemon holds
exactly one inhibitor from logind (``org.freedesktop.login1.Manager.Inhibit``,
what=``sleep``, mode ``block`` or ``delay``): a file descriptor that holds the inhibitor
while it is open. The last such job to stop closes it.

With no logind (no system bus, or nobody owning ``org.freedesktop.login1``) nothing
breaks: the job runs without an inhibitor, the reason is logged once, and
``modelfs doctor`` says so. D-Bus is spoken with jeepney, which runs under trio; the
system bus is ``$DBUS_SYSTEM_BUS_ADDRESS`` when set (tests start their own bus).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

import trio
from jeepney import DBusAddress, new_method_call
from jeepney.io.trio import open_dbus_router
from jeepney.wrappers import DBusErrorResponse

log = logging.getLogger(__name__)

LOGIN1 = DBusAddress("/org/freedesktop/login1", bus_name="org.freedesktop.login1",
                     interface="org.freedesktop.login1.Manager")
POLICIES = ("never", "on-request", "always")
TIMEOUT = 5.0  # seconds logind has to answer; a download never waits longer for it
MODES = ("block", "delay")


class Inhibitor:
    """One shared sleep inhibitor, held while any holder holds it. Loop thread only."""

    def __init__(self, *, policy: str = "on-request", mode: str = "block", bus: str = "SYSTEM",
                 why: str = "modelfs is downloading a model") -> None:
        if policy not in POLICIES or mode not in MODES:
            raise ValueError(f"inhibit policy {policy!r} or mode {mode!r} is unknown")
        self.policy, self.mode, self.bus, self.why = policy, mode, bus, why
        self.holders = 0
        self._fd = -1
        self.unavailable: str | None = None  # why logind could not be asked, once it failed

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def wanted(self, requested: bool) -> bool:
        """Whether a job that did (or did not) ask for it gets the inhibitor."""
        return self.policy == "always" or (self.policy == "on-request" and requested)

    @contextlib.asynccontextmanager
    async def hold(self, requested: bool = True) -> AsyncIterator[None]:
        """Hold the inhibitor for the length of the block (shared with other holders)."""
        if not self.wanted(requested):
            yield
            return
        self.holders += 1
        try:
            if self.holders == 1 and not self.held:
                self._fd = await self._inhibit()
            yield
        finally:
            self.holders -= 1
            if self.holders == 0:
                self.release()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # logind sees the descriptor close: the inhibitor is gone
            self._fd = -1
            log.info("sleep inhibitor released")

    async def _inhibit(self) -> int:
        """An inhibitor's descriptor from logind, or -1 where there is none to ask."""
        try:
            with trio.fail_after(TIMEOUT):
                async with open_dbus_router(bus=self.bus, enable_fds=True) as router:
                    msg = new_method_call(LOGIN1, "Inhibit", "ssss", ("sleep", "modelfs", self.why, self.mode))
                    reply = await router.send_and_get_reply(msg)
        except (OSError, KeyError, ValueError, DBusErrorResponse, trio.TooSlowError) as exc:
            if self.unavailable is None:
                log.warning("no sleep inhibitor (logind did not answer: %s); downloading anyway", exc)
            self.unavailable = str(exc) or type(exc).__name__
            return -1
        if reply.header.message_type.name == "error":
            if self.unavailable is None:
                log.warning("no sleep inhibitor (%s); downloading anyway", reply.body[0] if reply.body else "refused")
            self.unavailable = str(reply.body[0]) if reply.body else "logind refused"
            return -1
        self.unavailable = None
        fd = reply.body[0].to_raw_fd()
        log.info("holding a sleep inhibitor (%s) while downloading", self.mode)
        return int(fd)


def logind_answers(bus: str = "SYSTEM", timeout: float = 2.0) -> str | None:
    """None when logind owns its name on the system bus; else why not (for ``doctor``)."""
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    try:
        with open_dbus_connection(bus=bus, auth_timeout=timeout) as conn:
            reply = conn.send_and_get_reply(message_bus.NameHasOwner(LOGIN1.bus_name), timeout=timeout)
    except (OSError, KeyError, ValueError, TimeoutError, DBusErrorResponse) as exc:
        return f"no system bus ({exc or type(exc).__name__})"
    return None if reply.body and reply.body[0] else "nobody owns org.freedesktop.login1 on the system bus"
