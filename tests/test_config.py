"""``modelfs config``: the store's settings from the command line."""

from __future__ import annotations

from conftest import CLI


def test_config_set_get_list(cli: CLI) -> None:
    assert cli.run("config", "get", "apps.pull").stdout == "signed\n"
    assert cli.run("config", "set", "apps.pull", "any").stdout == "apps.pull = any\n"
    assert cli.run("config", "get", "apps.pull", "--json").json()["value"] == "any"
    cli.run("config", "set", "apps.quota_bytes", "1G")
    cli.run("config", "set", "apps.allowed_networks", "192.168.1.0/24")
    cli.run("config", "set", "gate.window", "23:00-06:00")
    cli.run("config", "set", "update.interval", "12h")
    listed = {e["key"]: e["value"] for e in cli.run("config", "list", "--json").json()}
    assert listed == {"apps.pull": "any", "apps.quota_bytes": 1 << 30, "apps.allowed_networks": ["192.168.1.0/24"],
                      "pulls.concurrency": 2, "rollout.good_loads": 3, "rollout.max_failure_increase": 0.2,
                      "rollout.window": 3600, "gate.power": "any", "gate.metered": "allow",
                      "gate.metered_unknown": "allow", "gate.window": "23:00-06:00", "inhibit": "on-request",
                      "inhibit.mode": "block", "update.interval": 43200}
    text = cli.run("config", "list").stdout
    assert "apps.quota_bytes" in text and "1.0 GiB" in text


def test_config_refuses_unknown_keys_and_bad_values(cli: CLI) -> None:
    r = cli.run("config", "set", "apps.pull", "sometimes", check=False)
    assert r.returncode == 2 and "apps.pull: expected one of deny, signed, any" in r.stderr
    r = cli.run("config", "get", "apps.pul", check=False)
    assert r.returncode == 2 and "no setting named 'apps.pul'" in r.stderr
