"""The catalog: schema, migrations, append-only audit, activation."""

from __future__ import annotations

import sqlite3

import pytest

from modelfs_store.catalog import MIGRATIONS, SCHEMA_VERSION, Catalog, FileRecord, _split_sql
from modelfs_store.errors import Conflict, NotFound

SHA = "ab" * 32


def test_every_column_has_a_comment():
    for number, script in enumerate(MIGRATIONS, 1):
        for stmt in _split_sql(script):
            if not stmt.startswith("CREATE TABLE"):
                continue
            for line in stmt.splitlines()[1:]:
                line = line.strip()
                if not line or line.startswith(("PRIMARY KEY", "FOREIGN KEY", ")")):
                    continue
                assert "--" in line, f"migration {number}: column without a comment: {line}"


def test_upgrade_from_schema_1_keeps_data(tmp_path):
    path = tmp_path / "catalog.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in _split_sql(MIGRATIONS[0]):
        conn.execute(stmt)
    conn.execute("PRAGMA user_version=1")
    conn.execute("INSERT INTO models (name, active_version, created_at) VALUES ('m', 1, 0)")
    conn.execute("INSERT INTO versions (model, version, state, created_at) VALUES ('m', 1, 'installed', 0)")
    conn.execute("INSERT INTO files (model, version, filename, role, size, sha256) "
                 "VALUES ('m', 1, 'w.gguf', 'weights', 5, ?)", (SHA,))
    conn.execute("INSERT INTO apps (app_id, uid, created_at) VALUES ('org.example.A', NULL, 0)")
    conn.execute("INSERT INTO grants (app_id, model, granted_at) VALUES ('org.example.A', 'm', 0)")
    conn.close()

    cat = Catalog(path)
    assert cat.schema_version() == SCHEMA_VERSION == 7
    assert cat.get_model("m").active_version == 1
    assert cat.get_version("m", 1).files[0].sha256 == SHA
    cat.add_channel("https://example.test/chan.json", ["k1"])
    assert cat.channels()[0]["key_ids"] == ["k1"]
    # 3: a grant made before uids were bound binds to the store owner (uid NULL), never to any uid
    assert cat.grants() == [{"app_id": "org.example.A", "model": "m", "uid": None, "any_uid": False,
                             "granted_at": 0}]
    assert cat.get_model("m").owner_uid is None and cat.app_exes() == []
    assert cat.grant("org.example.A", "m", uid=1001, actor="t")
    assert not cat.grant("org.example.A", "m", uid=1001, actor="t")
    assert cat.grant("org.example.A", "m", any_uid=True, actor="t")
    assert not cat.grant("org.example.A", "m", actor="t")  # the migrated one
    assert cat.revoke("org.example.A", "m", uid=1001, actor="t") and len(cat.grants()) == 2
    # 4: settings (none set: every one has its default) and the daemon's pull jobs
    assert cat.settings() == {}
    cat.set_setting("apps.pull", "any", actor="t")
    assert cat.settings() == {"apps.pull": "any"}
    cat.set_setting("apps.pull", None, actor="t")
    assert cat.settings() == {}
    job = cat.add_job("https://h.example/w.gguf?X-Amz-Signature=s3cr3t", {"sha256": SHA}, uid=1001,
                      app_id="org.example.A", secret=True, state="queued")
    cat.update_job(job, state="failed", reason="token=abc123 refused", exit_code=9, result={"name": "m"})
    (row,) = cat.jobs()
    assert "s3cr3t" not in row["source"] and "abc123" not in row["reason"]
    assert (row["state"], row["uid"], row["app_id"], row["secret"], row["options"], row["result"]) == \
        ("failed", 1001, "org.example.A", True, {"sha256": SHA}, {"name": "m"})
    assert cat.jobs(["queued"]) == []
    # 5: rollout supervision: no model is a candidate; load reports are counted per version and window
    assert cat.get_model("m").candidate_since is None
    cat.add_load("m", 1, True, uid=1001, app_id="org.example.A")
    cat.add_load("m", 1, False, uid=None, app_id=None)
    assert cat.load_counts("m", 1, 0, float("inf")) == (1, 1)
    assert cat.load_counts("m", 1, 0, 1) == (0, 0)
    # 6: whether the weights carry a chat template: unknown for a version recorded before,
    #    until its header is read; then filled once, never overwritten
    assert cat.get_version("m", 1).card["chat_template"] is None and cat.card_gaps(SHA)
    cat.fill_card(SHA, architecture="llama", quantization="Q4_K_M", context_length=4096, chat_template=False)
    assert cat.get_version("m", 1).card["chat_template"] is False and not cat.card_gaps(SHA)
    cat.fill_card(SHA, architecture="qwen2", quantization="Q8_0", context_length=8192, chat_template=True)
    card = cat.get_version("m", 1).card
    assert (card["architecture"], card["quantization"], card["context_length"], card["chat_template"]) == \
        ("llama", "Q4_K_M", 4096, False)
    # 7: where on the hub a version came from: nothing for a version recorded before
    assert (card["hub_repo"], card["hub_commit"]) == (None, None)
    assert cat.get_version("m", 1).files[0].hub_path is None
    cat.add_version("m", 2, [FileRecord("w.gguf", "weights", 5, SHA, hub_path="sub/w.gguf")], signed=False,
                    hub_repo="org/repo", hub_commit="c" * 40)
    v2 = cat.get_version("m", 2)
    assert (v2.card["hub_repo"], v2.card["hub_commit"], v2.files[0].hub_path) == ("org/repo", "c" * 40, "sub/w.gguf")
    cat.delete_version("m", 1)  # reports go with their version
    assert cat.load_counts("m", 1, 0, float("inf")) == (0, 0)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "catalog.db"
    Catalog(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(Exception, match="newer than this modelfs"):
        Catalog(path)


def test_wal_and_full_sync(tmp_path):
    cat = Catalog(tmp_path / "c.db")
    assert cat.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert cat.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_audit_is_append_only(tmp_path):
    cat = Catalog(tmp_path / "c.db")
    cat.audit("test", "import", model="m", reason="first")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        cat.conn.execute("UPDATE audit SET reason = 'rewritten'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        cat.conn.execute("DELETE FROM audit")
    assert [r["reason"] for r in cat.audit_log()] == ["first"]


def _add(cat: Catalog, version: int) -> None:
    cat.add_version("m", version, [FileRecord("w.gguf", "weights", 1, SHA)], signed=False)


def test_activation_records_last_good_and_rollback(tmp_path):
    cat = Catalog(tmp_path / "c.db")
    _add(cat, 1)
    _add(cat, 2)
    assert cat.activate("m", 1, actor="t") is None
    assert cat.activate("m", 2, actor="t") == 1
    m = cat.get_model("m")
    assert (m.active_version, m.last_good_version) == (2, 1)
    assert cat.rollback("m", actor="t") == 1
    m = cat.get_model("m")
    # The version rolled back from failed: it is not last-good, and a second rollback
    # is refused rather than toggling back to it.
    assert (m.active_version, m.last_good_version) == (1, None)
    with pytest.raises(Conflict, match="no last-good version"):
        cat.rollback("m", actor="t")
    actions = [r["action"] for r in cat.audit_log("m")]
    assert actions == ["rollback", "activate", "activate"]


def test_activate_needs_installed_version(tmp_path):
    cat = Catalog(tmp_path / "c.db")
    cat.add_version("m", 1, [FileRecord("w.gguf", "weights", 1, SHA)], signed=False, state="partial")
    with pytest.raises(Conflict, match="not fully installed"):
        cat.activate("m", 1, actor="t")
    with pytest.raises(NotFound):
        cat.activate("m", 7, actor="t")


def test_duplicate_version_refused_and_nothing_half_written(tmp_path):
    cat = Catalog(tmp_path / "c.db")
    _add(cat, 1)
    with pytest.raises(Conflict):
        _add(cat, 1)
    assert len(cat.get_version("m", 1).files) == 1


def test_version_floor_only_rises(tmp_path):
    cat = Catalog(tmp_path / "c.db")
    cat.raise_floor("m", 3, SHA)
    cat.raise_floor("m", 2, "cd" * 32)
    assert cat.version_floor("m") == (3, SHA)
    cat.raise_floor("m", 4, "cd" * 32)
    assert cat.version_floor("m") == (4, "cd" * 32)


def test_data_version_changes_on_foreign_commit(tmp_path):
    a = Catalog(tmp_path / "c.db")
    b = Catalog(tmp_path / "c.db")
    before = a.data_version()
    _add(b, 1)
    assert a.data_version() != before
