"""The update timer: the daemon checks each trusted channel for a newer signed version.

Each channel (``modelfs channel add``) is checked at most once per ``update.interval``
seconds (a day by default) plus a jitter drawn again after every check (up to a
tenth of the interval, at most an hour), so machines that started together do not
reach a publisher together. A channel never checked is due at once. The time of the
last check and its outcome are the catalog's (``channels.last_checked`` and
``last_result``, as ``modelfs update`` records them), so a restarted daemon does not
check again early.

A check is background work: it runs only when the gates allow (``gates.py``; while
they hold it back the timer looks again every ``GATE_RECHECK`` seconds), and it is
``modelfs_store.packs.update_channel``'s: the envelope is fetched and verified, a newer
signed version is installed as a background install (skipped below this machine's
min_device), and nothing but the envelope is fetched when that version is already
installed. ``update.interval = 0`` turns the timer off; an offline daemon has none.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from modelfs_store.packs import update_channel

if TYPE_CHECKING:
    from modelfs_store.core import Store
    from modelfs_store.download import Downloader

    from .jobs import GateCheck

log = logging.getLogger(__name__)

JITTER = 0.1          # of the interval, drawn per channel after each check
MAX_JITTER = 3600.0   # seconds
IDLE = 60.0           # longest sleep: a changed setting or a new channel applies within a minute
GATE_RECHECK = 2.0    # seconds between looks at the gates while they hold a due check back
ACTOR = "daemon:update-timer"


class UpdateTimer:
    def __init__(self, store: Store, downloader: Callable[[], Downloader], gates: GateCheck, *,
                 interval: Callable[[], int], clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.store = dataclasses.replace(store, actor=ACTOR)
        self.downloader = downloader      # a new Downloader, not yet entered, for each check
        self.gates = gates
        self.interval = interval
        self.clock = clock
        self.rng = rng or random.Random()
        self._jitter: dict[str, float] = {}
        self._held: tuple[str, str] | None = None

    def due(self, interval: int) -> tuple[list[dict[str, Any]], float]:
        """The channels due now, and the seconds until the next one is."""
        now = self.clock()
        due, wait = [], IDLE
        for ch in self.store.catalog.channels():
            if ch["last_checked"] is None:
                due.append(ch)
                continue
            jitter = self._jitter.setdefault(ch["url"], self.rng.uniform(0, min(interval * JITTER, MAX_JITTER)))
            left = ch["last_checked"] + interval + jitter - now
            if left <= 0:
                due.append(ch)
            else:
                wait = min(wait, left)
        return due, wait

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            interval = self.interval()
            if interval <= 0:
                await trio.sleep(IDLE)
                continue
            due, wait = self.due(interval)
            if not due:
                await trio.sleep(wait)
                continue
            held = await self.gates()
            if held != self._held and held is not None:
                log.info("channel updates wait: %s", held[1])
            self._held = held
            if held is not None:
                await trio.sleep(GATE_RECHECK)
                continue
            for ch in due:
                await self.check(ch["url"], ch["key_ids"])

    async def check(self, url: str, key_ids: list[str]) -> None:
        """One channel, now; its outcome is recorded in the catalog."""
        self._jitter.pop(url, None)
        try:
            async with self.downloader() as dl:
                result = await update_channel(self.store, dl, url, key_ids, actor=ACTOR)
        except Exception:  # noqa: BLE001 - a bug in one check must not stop the timer, or retry it at once
            log.exception("channel %s: the update check failed", url)
            self.store.catalog.channel_checked(url, "failed: internal error; see the daemon's log")
            return
        log.info("channel %s: %s", url, result.message)
