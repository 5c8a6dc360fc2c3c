"""The store's settings (store/settings.py): known keys only, checked values, defaults
when unset, every change audited."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfs_store import settings
from modelfs_store.catalog import Catalog
from modelfs_store.errors import UsageError


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "c.db")


def test_defaults_until_set(cat: Catalog) -> None:
    assert settings.values(cat) == {"apps.allowed_networks": [], "apps.pull": "signed", "apps.quota_bytes": None,
                                    "pulls.concurrency": 2, "rollout.good_loads": 3,
                                    "rollout.max_failure_increase": 0.2, "rollout.window": 3600,
                                    "gate.power": "any", "gate.metered": "allow",
                                    "gate.metered_unknown": "allow", "gate.window": "none",
                                    "inhibit": "on-request", "inhibit.mode": "block", "update.interval": 86400}


@pytest.mark.parametrize(("key", "text", "stored"), [
    ("apps.pull", "any", "any"),
    ("apps.pull", "deny", "deny"),
    ("apps.quota_bytes", "20G", 20 << 30),
    ("apps.quota_bytes", "512MiB", 512 << 20),
    ("apps.quota_bytes", "1000", 1000),
    ("apps.quota_bytes", "1.5T", 3 << 39),  # the syntax of prune --max-bytes too
    ("apps.allowed_networks", "192.168.1.0/24, 10.1.2.3", ["192.168.1.0/24", "10.1.2.3/32"]),
    ("pulls.concurrency", "4", 4),
    ("rollout.good_loads", "5", 5),
    ("rollout.max_failure_increase", "0.5", 0.5),
    ("rollout.max_failure_increase", "20%", 0.2),
    ("rollout.window", "1h", 3600),
    ("rollout.window", "90", 90),
    ("rollout.window", "2d", 2 * 86400),
    ("gate.power", "ac", "ac"),
    ("gate.metered", "deny", "deny"),
    ("gate.metered_unknown", "deny", "deny"),
    ("gate.window", "23:00-06:30", "23:00-06:30"),
    ("gate.window", "none", "none"),
    ("inhibit", "always", "always"),
    ("inhibit.mode", "delay", "delay"),
    ("update.interval", "12h", 43200),
    ("update.interval", "90", 90),
    ("update.interval", "never", 0),
])
def test_set_from_text(cat: Catalog, key: str, text: str, stored: object) -> None:
    assert settings.set_value(cat, key, text, actor="t", text=True) == stored
    assert settings.get(cat, key) == stored
    rec = cat.audit_log(limit=1)[0]
    assert rec["action"] == "setting" and key in rec["detail"]


@pytest.mark.parametrize(("key", "value"), [
    ("apps.pull", "maybe"), ("apps.quota_bytes", -1), ("apps.quota_bytes", "10"), ("apps.quota_bytes", True),
    ("apps.allowed_networks", "10.0.0.0/8"), ("apps.allowed_networks", ["not-a-net"]),
    ("pulls.concurrency", 0), ("pulls.concurrency", 99), ("no.such", 1),
    ("rollout.good_loads", 0), ("rollout.good_loads", 2.5), ("rollout.max_failure_increase", 1.5),
    ("rollout.max_failure_increase", True), ("rollout.window", 0), ("rollout.window", "1h"),
    ("gate.power", "battery"), ("gate.metered", "yes"), ("gate.window", "25:00-01:00"), ("gate.window", "9-17"),
    ("inhibit", "sometimes"), ("inhibit.mode", "sleep"), ("update.interval", -1), ("update.interval", "1h"),
])
def test_bad_values_and_keys_are_refused(cat: Catalog, key: str, value: object) -> None:
    with pytest.raises(UsageError):
        settings.set_value(cat, key, value, actor="t")
    assert cat.settings() == {}


def test_setting_the_default_removes_the_row(cat: Catalog) -> None:
    settings.set_value(cat, "apps.pull", "any", actor="t")
    settings.set_value(cat, "apps.pull", "signed", actor="t")
    assert cat.settings() == {}
    assert settings.set_value(cat, "apps.quota_bytes", "none", actor="t", text=True) is None
