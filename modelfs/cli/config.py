"""``modelfs config get|set|list``: the store's settings (``modelfs_store.settings``).

The settings live in the catalog, so a running daemon sees a change at its next
decision (the next pull it admits, the next job it starts) without a restart.
"""

from __future__ import annotations

import json
from typing import Any

import click

from modelfs_store import settings

from ._context import Ctx, json_option, pass_ctx
from ._output import human_size, print_json, table


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if key == "apps.quota_bytes":
        return f"{value} ({human_size(value)})"
    if isinstance(value, list):
        return ", ".join(value) or "none"
    return str(value)


def _entry(key: str, value: Any) -> dict[str, Any]:
    s = settings.SETTINGS[key]
    return {"key": key, "value": value, "default": s.default, "help": s.help}


@click.group()
def config() -> None:
    """The store's settings: what apps and other users may pull through the daemon, and how
    many pulls run at once."""


@config.command("list")
@json_option
@pass_ctx
def config_list(c: Ctx, as_json: bool) -> None:
    """Every setting, its value and what it means."""
    values = settings.values(c.store.catalog)
    if as_json:
        print_json([_entry(k, v) for k, v in values.items()])
        return
    rows = [("SETTING", "VALUE", "MEANING")]
    rows += [(k, _shown(k, v) + ("" if v == settings.SETTINGS[k].default else " *"), settings.SETTINGS[k].help)
             for k, v in values.items()]
    table(rows)
    click.echo("(* set; the others have their defaults)")


@config.command("get")
@click.argument("key")
@json_option
@pass_ctx
def config_get(c: Ctx, key: str, as_json: bool) -> None:
    """Print the value of KEY."""
    value = settings.get(c.store.catalog, key)
    if as_json:
        print_json(_entry(key, value))
    else:
        click.echo(json.dumps(value) if isinstance(value, list) else _shown(key, value))


@config.command("set")
@click.argument("key")
@click.argument("value")
@json_option
@pass_ctx
def config_set(c: Ctx, key: str, value: str, as_json: bool) -> None:
    """Set KEY to VALUE (sizes take K, M, G, T; networks are comma-separated; 'none' clears)."""
    stored = settings.set_value(c.store.catalog, key, value, actor=c.store.actor, text=True)
    if as_json:
        print_json(_entry(key, stored))
    else:
        click.echo(f"{key} = {_shown(key, stored)}")
