"""Every verb's ``--json`` output has the shape ``docs/json.md`` documents for it.

The document has one section per command, headed ``## `modelfs VERB ... --json` ``,
with an example in a ``json`` block. This test runs each command on one store (an
imported model, a signed pack pulled from a local origin, an app with a grant, a
channel) and compares the output's shape with the example's: the same keys at every
level (for a list, its first element; ``null`` in either matches anything). A key
renamed in the code or in the document fails it, so they stay one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI, REPO
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs_store.catalog import Catalog
from registry import Registry
from test_packs import Publisher, release

DOC = REPO / "docs" / "json.md"
SECTION = re.compile(r"^## `modelfs ([^`]+)`\n(.*?)```json\n(.*?)\n```", re.S | re.M)


def documented() -> dict[str, Any]:
    return {cmd: json.loads(example) for cmd, _, example in SECTION.findall(DOC.read_text())}


def shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


def mismatches(doc: Any, got: Any, where: str = "") -> list[str]:
    if doc is None or got is None:
        return []
    if isinstance(doc, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: documented, not output" for k in doc.keys() - got.keys()]
        out += [f"{where}.{k}: output, not documented" for k in got.keys() - doc.keys()]
        for k in doc.keys() & got.keys():
            out += mismatches(doc[k], got[k], f"{where}.{k}")
        return out
    if isinstance(doc, list) and isinstance(got, list):
        return mismatches(doc[0], got[0], f"{where}[0]") if doc and got else []
    if isinstance(doc, (dict, list)) or isinstance(got, (dict, list)):
        return [f"{where}: documented {type(doc).__name__}, output {type(got).__name__}"]
    return []


@pytest.fixture
def registry(tmp_path: Path) -> Any:
    """A real docker-registry for `push` (tests/registry.py)."""
    if not os.path.exists("/usr/bin/docker-registry"):
        pytest.skip("LOUD SKIP: Debian's docker-registry is not installed (see the README's setup)")
    reg = Registry(tmp_path / "registry").start()
    yield reg
    reg.stop()


@pytest.fixture
def world(cli: CLI, tmp_path: Path, origin: FaultServer, registry: Registry) -> dict[str, str]:  # noqa: F811
    w = tmp_path / "w.gguf"
    write_model(w, tensor_bytes=4096, seed=1)
    pub = Publisher(origin)
    cli.run("keys", "add", "k1", pub.pub("k1"))
    pack = pub.serve("demo.json", release(pub, 1))
    cli.run("apps", "add", "org.example.A")
    Catalog(cli.root / "catalog.db").add_job("https://origin.example/big.gguf", {"sha256": "7b" * 32}, uid=0,
                                             app_id=None, secret=False, state="queued")
    return {"weights": str(w), "pack": pack, "channel": pub.serve("chan.json", release(pub, 2)),
            "registry": registry.ref("json/m:1")}


def commands(world: dict[str, str]) -> dict[str, list[str]]:
    """Documented command -> the argv that produces it, in the order they run."""
    return {
        "import NAME FILE --json": ["import", "m", world["weights"], "--json"],
        "push NAME TARGET --json": ["push", "m", world["registry"], "--json"],
        "pull URL --json": ["pull", world["pack"], "--json"],
        "adopt --dry-run --json": ["adopt", "--from", str(Path(world["weights"]).parent), "--dry-run", "--json"],
        "list --json": ["list", "--json"],
        "show NAME --json": ["show", "m", "--json"],
        "verify --json": ["verify", "--json"],
        "pin NAME --json": ["pin", "m", "--json"],
        "unpin NAME --json": ["unpin", "m", "--json"],
        "activate NAME VERSION --json": ["activate", "m", "1", "--json"],
        "apps add APP --json": ["apps", "add", "org.example.B", "--json"],
        "grant APP NAME --json": ["grant", "org.example.A", "m", "--json"],
        "apps list --json": ["apps", "list", "--json"],
        "visibility NAME private --json": ["visibility", "m", "private", "--json"],
        "whoami --json": ["whoami", "--pid", str(os.getpid()), "--json"],
        "keys list --json": ["keys", "list", "--json"],
        "manifest verify URL --json": ["manifest", "verify", world["channel"], "--json"],
        "channels add URL --key KEY --json": ["channels", "add", world["channel"], "--key", "k1", "--json"],
        "channels list --json": ["channels", "list", "--json"],
        "update --json": ["update", "--json"],
        "rm NAME --dry-run --json": ["rm", "m", "--dry-run", "--json"],
        "prune --dry-run --json": ["prune", "--dry-run", "--json"],
        "status --json": ["status", "--json"],
        "mark-good NAME --json": ["mark-good", "demo", "--json"],  # update made version 2 a candidate
        "doctor --json": ["doctor", "--json"],
        "init PATH --json": ["init", str(Path(world["weights"]).parent / "another"), "--json"],
        "service install --user --dry-run --json": ["service", "install", "--user", "--dry-run", "--json"],
        "config list --json": ["config", "list", "--json"],
        "config set KEY VALUE --json": ["config", "set", "apps.quota_bytes", "20G", "--json"],
        "config get KEY --json": ["config", "get", "pulls.concurrency", "--json"],
        "pulls --json": ["pulls", "--json"],
        "pulls cancel ID --json": ["pulls", "cancel", "1", "--json"],
    }


def output(cli: CLI, argv: list[str]) -> Any:
    r = cli.run(*argv, check=False)
    assert r.returncode in (0, 1), (argv, r.stderr)  # doctor exits 1 when a check fails
    if argv[0] == "pull":  # newline-delimited events; the last one is the result
        return json.loads(r.stdout.strip().splitlines()[-1])
    return r.json()


def test_every_command_outputs_what_docs_json_md_says(cli: CLI, world: dict[str, str]) -> None:
    doc = documented()
    runs = commands(world)
    assert sorted(doc) == sorted(runs), "docs/json.md and this test must name the same commands"
    problems = {}
    for cmd, argv in runs.items():
        got = output(cli, argv)
        bad = mismatches(shape(doc[cmd]), shape(got))
        if bad:
            problems[cmd] = bad
            print(f"## `modelfs {cmd}`\n```json\n{json.dumps(got, indent=2, sort_keys=True)}\n```\n")
    assert problems == {}


def test_the_checker_sees_a_renamed_key() -> None:
    assert mismatches(shape({"name": "m", "files": [{"size": 1}]}), shape({"model": "m", "files": [{"size": 1}]})) \
        == [".name: documented, not output", ".model: output, not documented"]
    assert mismatches(shape({"files": [{"size": 1}]}), shape({"files": [{"bytes": 1}]})) != []
    assert mismatches(shape({"mount": None}), shape({"mount": {"pid": 1}})) == []
