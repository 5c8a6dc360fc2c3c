"""Activation, last-good and rollback: what they mean, and that every output agrees.

Last-good is the version to go back to: the one that was active until the last
activation (it was serving). ``rollback`` makes it active again, and the version
rolled back from (the one that failed) does not become last-good: a second rollback
is refused, never a toggle between two versions. Activating the active version
changes nothing. A version signed by a key that is no longer trusted is not made
active again without ``--force``, which is audited.
"""

from __future__ import annotations

from pathlib import Path

from conftest import CLI
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs_store.core import Store
from modelfs_store.keys import revoke_key, trust_key
from test_packs import Publisher, release, run_install


def _state(cli: CLI, name: str) -> tuple[int | None, int | None]:
    d = cli.run("show", name, "--json").json()
    return d["active_version"], d["last_good_version"]


def test_activate_and_rollback_say_what_show_says(cli: CLI, tmp_path: Path) -> None:
    for seed in (1, 2, 3):
        w = tmp_path / f"w{seed}" / "m.gguf"
        w.parent.mkdir()
        write_model(w, tensor_bytes=4096, seed=seed)
        cli.run("import", "m", str(w))
    assert _state(cli, "m") == (3, 2)
    assert cli.run("activate", "m", "1").stdout == "m: version 1 active (last-good: 3)\n"
    assert _state(cli, "m") == (1, 3)
    # Activating the active version changes nothing, and says so truthfully.
    assert cli.run("activate", "m", "1").stdout == "m: version 1 active (last-good: 3)\n"
    assert cli.run("activate", "m", "1", "--json").json() == {
        "name": "m", "active_version": 1, "last_good_version": 3}
    assert cli.run("rollback", "m").stdout == "m: rolled back to version 3 (last-good: -)\n"
    assert _state(cli, "m") == (3, None)
    r = cli.run("rollback", "m", check=False)
    assert r.returncode == 4 and "no last-good version" in r.stderr
    assert _state(cli, "m") == (3, None)
    cli.run("activate", "m", "2")
    assert cli.run("rollback", "m", "--json").json() == {"name": "m", "active_version": 3, "last_good_version": None}


def test_a_version_signed_by_a_revoked_key_is_not_made_active_again(tmp_path: Path,
                                                                   origin: FaultServer) -> None:  # noqa: F811
    pub = Publisher(origin)
    store = Store.open(tmp_path / "store")
    try:
        trust_key(store.catalog, "k1", pub.pub("k1"), actor="test")
        trust_key(store.catalog, "k2", pub.pub("k2"), actor="test")
        run_install(store, release(pub, 1, key_id="k1"))
        run_install(store, release(pub, 2, key_id="k2"))
        revoke_key(store.catalog, "k1", actor="test")
    finally:
        store.close()
    cli = CLI(tmp_path / "store")
    assert _state(cli, "demo") == (2, 1)
    for argv in (["rollback", "demo"], ["activate", "demo", "1"]):
        r = cli.run(*argv, check=False)
        assert r.returncode == 7, r.stderr
        assert "signed by key 'k1', which is revoked" in r.stderr and "--force" in r.stderr
        assert _state(cli, "demo") == (2, 1)
    assert cli.run("rollback", "demo", "--force").stdout == "demo: rolled back to version 1 (last-good: -)\n"
    store = Store.open(tmp_path / "store")
    try:
        event = store.catalog.audit_log("demo", limit=1)[0]
    finally:
        store.close()
    assert event["action"] == "rollback" and event["reason"] == "forced: signed by key 'k1', which is revoked"
