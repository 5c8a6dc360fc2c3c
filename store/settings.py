"""The store's settings: which exist, their types, defaults and meaning, here and only here.

A setting lives in the catalog (table ``settings``, one JSON value per key); a key
with no row has its default. ``modelfs config get|set|list`` and the control socket's
``/v1/settings`` read and write them through :func:`set_value`, which refuses a key
this module does not know and a value of the wrong kind, so the catalog never holds
one the daemon could misread.

    apps.pull              deny | signed | any       (default signed)
        what a caller that is not the store owner may start through the daemon:
        nothing, signed packs from trusted keys (and a channel's keys for a channel's
        URL), or unsigned files with a known SHA-256 too
    apps.allowed_networks  list of CIDR networks     (default none)
        addresses that are not public (loopback, link-local, private, ...) which such a
        caller's URLs may reach anyway, e.g. a LAN mirror; every other one is refused
    apps.quota_bytes       bytes, or null            (default null: no quota)
        how many bytes the models one app (or one other user) owns may hold
    pulls.concurrency      1..16                     (default 2)
        how many pull jobs the daemon runs at once; the others wait, queued
    rollout.good_loads     1..10000                  (default 3)
        successful loads apps report that end a candidate version's probation
        (and the reports needed before it is judged at all; store/rollout.py)
    rollout.max_failure_increase  0..1               (default 0.2)
        how much higher a candidate's failed-load share may be than last-good's
        before it is rolled back
    rollout.window         seconds, e.g. 1h          (default 3600)
        a candidate's probation, and the time before it that last-good is judged on
    gate.power             ac | any                  (default any)
    gate.metered           allow | deny              (default allow)
    gate.metered_unknown   allow | deny              (default allow)
    gate.window            HH:MM-HH:MM | none        (default none)
        when background work (channel updates, jobs started with "background" or
        ``pull --gated``) may run: on mains power only, on an unmetered network only
        (and what a network NetworkManager cannot tell counts as), inside a daily
        window (it may cross midnight); foreground pulls and opens run at once
    inhibit                never | on-request | always  (default on-request)
    inhibit.mode           block | delay             (default block)
        whether a transferring job holds a logind sleep inhibitor: never, when it asked
        (``keep_awake``, ``pull --keep-awake``), or always; and its logind mode
    update.interval        seconds, 0: never         (default 86400)
        how often the daemon checks each trusted channel for a newer signed version
        (plus up to a tenth of it, at most an hour, of jitter), when the gates allow

Settings hold no secrets. Pure logic and the catalog: no network, no daemon.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from .catalog import Catalog

PULL_MODES = ("deny", "signed", "any")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.I)


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    parse: Callable[[str], Any]      # from the command line's text to the JSON value
    check: Callable[[Any], Any]      # a JSON value (the socket's) to the stored value, or UsageError
    help: str


def _choice(*choices: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in choices:
            raise UsageError(f"expected one of {', '.join(choices)}, not {value!r}")
        return value
    return check


def _networks(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError("expected a list of networks such as 192.168.1.0/24")
    try:
        return [str(ipaddress.ip_network(v.strip(), strict=False)) for v in value]
    except ValueError as exc:
        raise UsageError(f"not a network: {exc}") from None


def _parse_networks(text: str) -> list[str]:
    return _networks([t for t in re.split(r"[,\s]+", text) if t and t.lower() != "none"])


def _quota(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError("expected a number of bytes (or null: no quota)")
    return value


def parse_size(text: str) -> int | None:
    """``10G``, ``1.5T``, ``512MiB``, ``1000`` (binary units); ``none`` for no limit."""
    if text.strip().lower() in ("none", "null", ""):
        return None
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise UsageError(f"not a size: {text!r} (e.g. 20G, 512MiB, or none)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _concurrency(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        raise UsageError("expected a whole number from 1 to 16")
    return value


_WINDOW = re.compile(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.I)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _window(value: Any) -> str:
    if isinstance(value, str) and value.strip().lower() == "none":
        return "none"
    if not isinstance(value, str) or not _WINDOW.fullmatch(value.replace(" ", "")):
        raise UsageError("expected HH:MM-HH:MM (it may cross midnight) or none")
    return value.replace(" ", "")


def _interval(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError("expected a number of seconds (0: never)")
    return value


def parse_duration(text: str) -> int:
    """``86400``, ``24h``, ``1.5h``, ``30m``, ``2s``, ``2d``, ``1w`` -> whole seconds; ``never``
    or ``0`` for never."""
    if text.strip().lower() in ("never", "off"):
        return 0
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise UsageError(f"not a duration: {text!r} (e.g. 24h, 30m, 86400, or never)")
    return int(float(m.group(1)) * _SECONDS[m.group(2).lower()])


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"not a whole number: {text!r}") from None


def _good_loads(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10000:
        raise UsageError("expected a whole number from 1 to 10000")
    return value


def _share(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UsageError("expected a share from 0 to 1, e.g. 0.2")
    return float(value)


def _parse_share(text: str) -> float:
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UsageError(f"not a share: {text!r} (e.g. 0.2 or 20%)") from None


def _probation(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 365 * 86400:
        raise UsageError("expected seconds from 1 to a year (e.g. 1h)")
    return value


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    Setting("apps.pull", "signed", str.strip, _choice(*PULL_MODES),
            "what callers other than the store owner may pull through the daemon: deny, signed (packs from "
            "trusted keys only) or any (unsigned files with a known SHA-256 too)"),
    Setting("apps.allowed_networks", [], _parse_networks, _networks,
            "non-public networks (CIDR, comma-separated) those callers' URLs may reach, e.g. a LAN mirror; "
            "loopback, link-local and private addresses are refused otherwise"),
    Setting("apps.quota_bytes", None, parse_size, _quota,
            "bytes the models of one app (or of one other user) may hold; none: no quota"),
    Setting("pulls.concurrency", 2, _parse_int, _concurrency,
            "how many pull jobs the daemon runs at once"),
    Setting("rollout.good_loads", 3, _parse_int, _good_loads,
            "successful loads reported by apps that make a candidate version good (and the reports needed "
            "before it is judged)"),
    Setting("rollout.max_failure_increase", 0.2, _parse_share, _share,
            "how much higher a candidate's failed-load share may be than last-good's before the daemon rolls "
            "it back (0 to 1)"),
    Setting("rollout.window", 3600, parse_duration, _probation,
            "a candidate's probation (e.g. 1h), and the time before it that last-good's loads are counted over"),
    Setting("gate.power", "any", str.strip, _choice("ac", "any"),
            "background work (channel updates, background and --gated pulls) waits for mains power (ac), "
            "or runs on battery too (any)"),
    Setting("gate.metered", "allow", str.strip, _choice("allow", "deny"),
            "background work waits while NetworkManager says the network is metered (deny), or not (allow)"),
    Setting("gate.metered_unknown", "allow", str.strip, _choice("allow", "deny"),
            "what a network counts as when NetworkManager cannot tell whether it is metered"),
    Setting("gate.window", "none", str.strip, _window,
            "background work runs only inside this daily window, HH:MM-HH:MM (it may cross midnight); none: any time"),
    Setting("inhibit", "on-request", str.strip, _choice("never", "on-request", "always"),
            "whether a transferring job holds a logind sleep inhibitor: never, when it asked (keep_awake, "
            "pull --keep-awake), or always"),
    Setting("inhibit.mode", "block", str.strip, _choice("block", "delay"),
            "the logind inhibitor's mode: block sleep, or delay it a few seconds"),
    Setting("update.interval", 86400, parse_duration, _interval,
            "seconds between the daemon's checks of each trusted channel (24h by default, with jitter); 0: never"),
)}


def known(key: str) -> Setting:
    setting = SETTINGS.get(key)
    if setting is None:
        raise UsageError(f"no setting named {key!r}; known: {', '.join(sorted(SETTINGS))}")
    return setting


def values(catalog: Catalog) -> dict[str, Any]:
    """Every setting with its value (the default unless set); keys the catalog holds but
    this version does not know are left out."""
    stored = catalog.settings()
    return {k: stored.get(k, s.default) for k, s in sorted(SETTINGS.items())}


def get(catalog: Catalog, key: str) -> Any:
    setting = known(key)
    return catalog.settings().get(key, setting.default)


def set_value(catalog: Catalog, key: str, value: Any, *, actor: str, text: bool = False) -> Any:
    """Check and store ``value`` (text from the command line when ``text``); returns what
    was stored. The default value removes the row, so a later default applies."""
    setting = known(key)
    try:
        checked = setting.check(setting.parse(value) if text else value)
    except UsageError as exc:
        raise UsageError(f"{key}: {exc}") from None
    catalog.set_setting(key, None if checked == setting.default else checked, actor=actor)
    return checked
