"""The keyring (user keys in the catalog + the system key directory) and the publisher
CLI: keys generate/add/list/revoke, manifest sign/verify."""

from __future__ import annotations

import base64
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import CLI
from modelfs_store.catalog import Catalog
from modelfs_store.errors import Conflict, NotFound, TrustError
from modelfs_store.keys import list_keys, load_keyring, revoke_key, trust_key
from modelfs_store.manifest import SCHEMA, load_manifest

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def pub_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def payload(**over: object) -> bytes:
    body = {"schema": SCHEMA, "model_id": "demo", "version": 1, "family": "llama", "context_len": 4096,
            "min_device": "cpu", "license": "mit", "source_url": "https://example.org/demo",
            "expires": "2099-01-01T00:00:00Z",
            "artifacts": [{"filename": "demo.gguf", "url": "https://cdn.example.org/demo.gguf",
                           "sha256": "a" * 64, "size": 10, "role": "weights"}]}
    body.update(over)
    return json.dumps(body).encode()


def envelope(key: Ed25519PrivateKey, key_id: str, raw: bytes | None = None) -> bytes:
    raw = raw or payload()
    return json.dumps({"key_id": key_id, "payload_b64": base64.b64encode(raw).decode(),
                       "sig_b64": base64.b64encode(key.sign(raw)).decode()}).encode()


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    cat = Catalog(tmp_path / "catalog.db")
    yield cat
    cat.close()


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    d = tmp_path / "keys.d"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return d


def system_key(keys_dir: Path, key_id: str, key: Ed25519PrivateKey, mode: int = 0o644) -> Path:
    path = keys_dir / f"{key_id}.pub"
    path.write_text(f"# {key_id}\n\n{pub_b64(key)}\n")
    os.chmod(path, mode)
    return path


def reason_of(exc_info: pytest.ExceptionInfo[TrustError]) -> str:
    return exc_info.value.fields["reason"]


# ---------------------------------------------------------------- the merged keyring


def test_user_and_system_keys_both_verify(catalog: Catalog, keys_dir: Path) -> None:
    user, system = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    assert trust_key(catalog, "user-1", pub_b64(user), actor="t", system_dir=keys_dir) is True
    assert trust_key(catalog, "user-1", pub_b64(user), actor="t", system_dir=keys_dir) is False
    system_key(keys_dir, "sys-1", system)
    (keys_dir / "README").write_text("not a key\n")
    (keys_dir / ".sys-2.pub.swp").write_text("editor junk\n")
    ring = load_keyring(catalog, keys_dir)
    assert sorted(ring) == ["sys-1", "user-1"]
    assert load_manifest(envelope(user, "user-1"), ring, now=NOW).key_id == "user-1"
    assert load_manifest(envelope(system, "sys-1"), ring, now=NOW).key_id == "sys-1"
    listed = {k.key_id: (k.source, k.state) for k in list_keys(catalog, keys_dir)}
    assert listed == {"sys-1": ("system", "trusted"), "user-1": ("user", "trusted")}


def test_keys_dir_comes_from_the_environment(catalog: Catalog, keys_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    key = Ed25519PrivateKey.generate()
    system_key(keys_dir, "env-key", key)
    assert "env-key" not in load_keyring(catalog, keys_dir / "absent")
    monkeypatch.setenv("MODELFS_KEYS_DIR", str(keys_dir))
    assert "env-key" in load_keyring(catalog)


def test_revocation_in_the_catalog_wins_over_the_system_file(catalog: Catalog, keys_dir: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = system_key(keys_dir, "sys-1", key)
    info = revoke_key(catalog, "sys-1", actor="t", system_dir=keys_dir)
    assert (info.source, info.state) == ("system", "revoked")
    with pytest.raises(TrustError) as exc:
        load_manifest(envelope(key, "sys-1"), load_keyring(catalog, keys_dir), now=NOW)
    assert reason_of(exc) == "revoked-key"
    # A package update that puts other key bytes under the revoked id changes nothing.
    other = Ed25519PrivateKey.generate()
    path.write_text(pub_b64(other) + "\n")
    with pytest.raises(TrustError) as exc:
        load_manifest(envelope(other, "sys-1"), load_keyring(catalog, keys_dir), now=NOW)
    assert reason_of(exc) == "revoked-key"
    # ... nor does deleting the file: the revocation record stays.
    path.unlink()
    assert [(k.key_id, k.state) for k in list_keys(catalog, keys_dir)] == [("sys-1", "revoked")]
    assert [a["action"] for a in catalog.audit_log()] == ["key-revoke"]


def test_revoked_user_key_verifies_nothing_and_cannot_come_back(catalog: Catalog, keys_dir: Path) -> None:
    key = Ed25519PrivateKey.generate()
    trust_key(catalog, "k", pub_b64(key), actor="t", system_dir=keys_dir)
    revoke_key(catalog, "k", actor="t", system_dir=keys_dir)
    with pytest.raises(TrustError) as exc:
        load_manifest(envelope(key, "k"), load_keyring(catalog, keys_dir), now=NOW)
    assert reason_of(exc) == "revoked-key"
    with pytest.raises(Conflict):
        trust_key(catalog, "k", pub_b64(key), actor="t", system_dir=keys_dir)
    with pytest.raises(NotFound):
        revoke_key(catalog, "nobody", actor="t", system_dir=keys_dir)


def test_user_and_system_disagreeing_on_a_key_id_makes_it_unusable(catalog: Catalog, keys_dir: Path) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    trust_key(catalog, "k", pub_b64(a), actor="t", system_dir=keys_dir)
    system_key(keys_dir, "k", b)  # appeared later
    for signer in (a, b):
        with pytest.raises(TrustError) as exc:
            load_manifest(envelope(signer, "k"), load_keyring(catalog, keys_dir), now=NOW)
        assert reason_of(exc) == "unusable-key" and "different keys" in str(exc.value)
    # Adding a user key under an id the system directory already binds differently is refused.
    system_key(keys_dir, "k2", b)
    with pytest.raises(Conflict):
        trust_key(catalog, "k2", pub_b64(a), actor="t", system_dir=keys_dir)


@pytest.mark.parametrize(
    ("content", "mode", "problem"),
    [
        (None, 0o666, "writable by group or others"),
        ("two\nlines\n", 0o644, "2 key lines"),
        ("bm90IGEga2V5\n", 0o644, "is 9 bytes"),
        ("not base64!\n", 0o644, "not canonical base64"),
    ],
    ids=["world-writable", "two-lines", "short-key", "not-base64"],
)
def test_untrustworthy_system_key_files_verify_nothing(catalog: Catalog, keys_dir: Path, content: str | None,
                                                       mode: int, problem: str) -> None:
    key = Ed25519PrivateKey.generate()
    path = system_key(keys_dir, "sys", key, mode=mode)
    if content is not None:
        path.write_text(content)
    [info] = list_keys(catalog, keys_dir)
    assert info.state == "unusable" and problem in (info.problem or "")
    with pytest.raises(TrustError) as exc:
        load_manifest(envelope(key, "sys"), load_keyring(catalog, keys_dir), now=NOW)
    assert reason_of(exc) == "unusable-key"


def test_writable_key_directory_trusts_nothing(catalog: Catalog, keys_dir: Path) -> None:
    system_key(keys_dir, "sys", Ed25519PrivateKey.generate())
    os.chmod(keys_dir, 0o777)
    [info] = list_keys(catalog, keys_dir)
    assert info.state == "unusable" and "directory" in (info.problem or "")


# ---------------------------------------------------------------- publisher CLI


@pytest.fixture
def keys_env(cli: CLI, keys_dir: Path) -> CLI:
    return CLI(cli.root, {"MODELFS_KEYS_DIR": str(keys_dir)})


def test_generate_sign_trust_verify_through_the_cli(keys_env: CLI, tmp_path: Path) -> None:
    cli = keys_env
    out = tmp_path / "publisher"
    r = cli.run("keys", "generate", "--out", str(out), "--key-id", "pub-2026")
    pub = r.stdout.strip()
    assert len(base64.b64decode(pub, validate=True)) == 32
    assert stat.S_IMODE((out / "pub-2026.pem").stat().st_mode) == 0o600
    assert pub in (out / "pub-2026.pub").read_text()
    assert cli.run("keys", "generate", "--out", str(out), "--key-id", "pub-2026", check=False).returncode == 2

    body = tmp_path / "payload.json"
    body.write_bytes(payload())
    env = cli.run("manifest", "sign", str(body), "--key", str(out / "pub-2026.pem"), "--key-id", "pub-2026")
    data = env.stdout.encode()
    # Byte for byte what the cryptography library alone produces (Ed25519 is deterministic).
    private = serialization.load_pem_private_key((out / "pub-2026.pem").read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    assert data == envelope(private, "pub-2026", body.read_bytes())
    env_file = tmp_path / "pack.json"
    env_file.write_bytes(data)

    r = cli.run("manifest", "verify", str(env_file), check=False)
    assert r.returncode == 7 and "REFUSED" in r.stdout and "not in the keyring" in r.stdout

    cli.run("keys", "add", "pub-2026", "--from", str(out / "pub-2026.pub"))
    r = cli.run("manifest", "verify", str(env_file))
    lines = r.stdout.splitlines()
    assert lines[-1].startswith("VALID    demo version 1, signed by pub-2026")
    for what in ("cap", "canonical base64", "signature verifies", "not expired", "first version"):
        assert any(what in ln for ln in lines), (what, lines)
    j = cli.run("manifest", "verify", str(env_file), "--json").json()
    assert j["ok"] and j["model"] == "demo" and j["key_id"] == "pub-2026" and len(j["checks"]) >= 7

    tampered = json.loads(data)
    tampered["payload_b64"] = base64.b64encode(payload(version=2)).decode()
    env_file.write_text(json.dumps(tampered))
    r = cli.run("manifest", "verify", str(env_file), "--json", check=False)
    assert r.returncode == 7 and r.json()["reason"] == "bad-signature" and not r.json()["ok"]

    # verify is read-only: no audit record, no floor.
    import sqlite3
    db = sqlite3.connect(cli.root / "catalog.db")
    assert [a for (a,) in db.execute("SELECT action FROM audit")] == ["key-add"]
    assert db.execute("SELECT COUNT(*) FROM version_floors").fetchone()[0] == 0


def test_sign_refuses_a_payload_that_would_not_verify(keys_env: CLI, tmp_path: Path) -> None:
    cli = keys_env
    cli.run("keys", "generate", "--out", str(tmp_path / "k"), "--key-id", "p")
    bad = tmp_path / "bad.json"
    bad.write_bytes(payload(schema="modelfs.manifest/2"))
    r = cli.run("manifest", "sign", str(bad), "--key", str(tmp_path / "k" / "p.pem"), "--key-id", "p", check=False)
    assert r.returncode == 6 and "unknown schema" in r.stderr and r.stdout == ""
    r = cli.run("manifest", "sign", str(bad), "--key", str(tmp_path / "k" / "p.pem"), "--key-id", "p",
                "--no-check")
    assert json.loads(r.stdout)["key_id"] == "p"
    os.chmod(tmp_path / "k" / "p.pem", 0o644)
    r = cli.run("manifest", "sign", str(bad), "--key", str(tmp_path / "k" / "p.pem"), "--key-id", "p", check=False)
    assert r.returncode == 7 and "readable by others" in r.stderr


def test_keys_list_add_revoke_with_a_system_key(keys_env: CLI, keys_dir: Path, tmp_path: Path) -> None:
    cli = keys_env
    system = Ed25519PrivateKey.generate()
    system_key(keys_dir, "vendor", system)
    user = Ed25519PrivateKey.generate()
    cli.run("keys", "add", "mine", pub_b64(user))
    r = cli.run("keys", "add", "bad", "QUJD", check=False)
    assert r.returncode == 7 and "is 3 bytes" in r.stderr
    r = cli.run("keys", "add", "vendor", pub_b64(user), check=False)
    assert r.returncode == 4 and "different key" in r.stderr
    rows = {k["key_id"]: k for k in cli.run("keys", "list", "--json").json()}
    assert {k: (v["source"], v["state"]) for k, v in rows.items()} == {
        "mine": ("user", "trusted"), "vendor": ("system", "trusted")}
    assert rows["vendor"]["path"] == str(keys_dir / "vendor.pub")
    assert "vendor  trusted  system" in cli.run("keys", "list").stdout

    env_file = tmp_path / "e.json"
    env_file.write_bytes(envelope(system, "vendor"))
    cli.run("manifest", "verify", str(env_file))
    assert "revoked (system)" in cli.run("keys", "revoke", "vendor").stdout
    r = cli.run("manifest", "verify", str(env_file), check=False)
    assert r.returncode == 7 and "key 'vendor' is revoked" in r.stdout
    assert cli.run("keys", "revoke", "ghost", check=False).returncode == 3
