"""Manifest trust: envelopes built with nothing but ``cryptography`` verify, and every
malformed, forged, replayed or expired document is refused with its specific reason."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import os
import stat
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelfs_store.errors import ManifestError, NotFound, StoreError, TrustError
from modelfs_store.keys import (
    MAX_ENVELOPE_BYTES,
    TrustedKey,
    generate_keypair,
    load_private_key,
    private_key_from_pem,
    public_key_from_b64,
    sign_payload,
    write_private_key,
)
from modelfs_store.manifest import (
    SCHEMA,
    Envelope,
    Manifest,
    check_version_floor,
    load_manifest,
    parse_envelope,
    verify_envelope,
)
from modelfs_store.names import filename_problem

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _pub_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64(raw)


def payload_dict(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "model_id": "qwen2-vl-2b",
        "version": 3,
        "family": "qwen2-vl",
        "context_len": 32768,
        "min_device": "8GB",
        "license": "apache-2.0",
        "source_url": "https://example.org/qwen2-vl",
        "expires": "2027-01-01T00:00:00Z",
        "artifacts": [
            {"filename": "qwen2-vl-2b-Q4_K_M.gguf", "url": "https://cdn.example.org/w.gguf",
             "sha256": SHA_A, "size": 1000, "role": "weights"},
            {"filename": "mmproj-qwen2-vl-2b-f16.gguf", "url": "https://cdn.example.org/m.gguf",
             "sha256": SHA_B, "size": 10, "role": "mmproj", "platform": "any"},
        ],
    }
    body.update(overrides)
    return body


def envelope_bytes(key: Ed25519PrivateKey, key_id: str, payload: bytes) -> bytes:
    """What publisher tooling emits, built with the cryptography library only."""
    return json.dumps(
        {"key_id": key_id, "payload_b64": _b64(payload), "sig_b64": _b64(key.sign(payload))}
    ).encode()


def raw_envelope(key_id: str, payload_b64: str, sig_b64: str) -> bytes:
    return f'{{"key_id": "{key_id}", "payload_b64": "{payload_b64}", "sig_b64": "{sig_b64}"}}'.encode()


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def keyring(key: Ed25519PrivateKey) -> dict[str, TrustedKey]:
    return {"pub-2026": TrustedKey("pub-2026", _pub_b64(key), revoked=False, source="test")}


def signed(key: Ed25519PrivateKey, body: dict[str, Any] | None = None, key_id: str = "pub-2026") -> bytes:
    payload = json.dumps(body if body is not None else payload_dict()).encode()
    return envelope_bytes(key, key_id, payload)


def refused(exc_type: type[StoreError], reason: str, fn: Any, *args: Any, **kwargs: Any) -> StoreError:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    exc = info.value
    assert exc.fields["reason"] == reason, str(exc)
    message = str(exc)
    assert "\n" not in message and "\r" not in message and message.strip() == message
    return exc


# ---------------------------------------------------------------- the happy path


def test_envelope_from_plain_cryptography_verifies(key, keyring) -> None:
    body = payload_dict()
    payload = json.dumps(body).encode()
    data = envelope_bytes(key, "pub-2026", payload)
    checks: list[str] = []
    manifest = load_manifest(data, keyring, now=NOW, checks=checks)
    assert isinstance(manifest, Manifest)
    assert manifest.model_id == "qwen2-vl-2b" and manifest.version == 3
    assert manifest.key_id == "pub-2026"
    assert manifest.raw_payload == payload
    assert manifest.payload_sha256 == hashlib.sha256(payload).hexdigest()
    assert manifest.expires == datetime(2027, 1, 1, tzinfo=UTC)
    assert [a.role for a in manifest.artifacts] == ["weights", "mmproj"]
    assert all(a.platform == "any" for a in manifest.artifacts)
    assert len(checks) >= 6 and any("signature" in c for c in checks)


def test_bare_public_key_keyring_is_accepted(key) -> None:
    manifest = load_manifest(signed(key), {"pub-2026": key.public_key()}, now=NOW)
    assert manifest.version == 3


def test_sign_payload_matches_publisher_format_byte_for_byte(key, keyring) -> None:
    payload = json.dumps(payload_dict()).encode()
    ours = sign_payload(payload, key, "pub-2026")
    # Ed25519 is deterministic, so the reference envelope is identical.
    assert ours == envelope_bytes(key, "pub-2026", payload)
    assert ours.startswith(b'{"key_id": "pub-2026", "payload_b64": "')
    assert load_manifest(ours, keyring, now=NOW).payload_sha256 == hashlib.sha256(payload).hexdigest()


def test_generated_keypair_round_trip(tmp_path, keyring) -> None:
    pem, pub = generate_keypair()
    path = tmp_path / "publisher.pem"
    write_private_key(path, pem)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    private = load_private_key(path)
    data = sign_payload(json.dumps(payload_dict()).encode(), private, "gen")
    ring = {"gen": TrustedKey("gen", pub)}
    assert load_manifest(data, ring, now=NOW).key_id == "gen"
    assert public_key_from_b64(pub).public_bytes_raw() == base64.b64decode(pub)
    with pytest.raises(FileExistsError):
        write_private_key(path, pem)  # O_EXCL: never overwrite a key


def test_private_key_file_readable_by_others_is_refused(tmp_path) -> None:
    pem, _ = generate_keypair()
    path = tmp_path / "k.pem"
    write_private_key(path, pem)
    os.chmod(path, 0o644)
    refused(TrustError, "insecure-key-file", load_private_key, path)
    refused(NotFound, "no-key-file", load_private_key, tmp_path / "absent.pem")
    refused(TrustError, "bad-key", private_key_from_pem, b"-----BEGIN NOTHING-----")


def test_bad_public_keys_are_refused() -> None:
    refused(TrustError, "bad-key", public_key_from_b64, _b64(b"x" * 31))
    refused(TrustError, "bad-key", public_key_from_b64, "not base64!")


def test_artifacts_for_platform(key, keyring) -> None:
    body = payload_dict()
    body["artifacts"] = [
        {"filename": "a.gguf", "url": "https://h/a", "sha256": SHA_A, "size": 1, "role": "weights"},
        {"filename": "lin.so", "url": "https://h/l", "sha256": SHA_A, "size": 1, "role": "aux",
         "platform": "linux"},
        {"filename": "mac.zip", "url": "https://h/m", "sha256": SHA_B, "size": 1, "role": "archive",
         "platform": "macos"},
    ]
    manifest = load_manifest(signed(key, body), keyring, now=NOW)
    assert [a.filename for a in manifest.artifacts_for_platform("linux")] == ["a.gguf", "lin.so"]
    assert [a.filename for a in manifest.artifacts_for_platform("macos")] == ["a.gguf", "mac.zip"]
    assert manifest.artifacts[2].extract_name == "mac"
    assert manifest.artifacts[0].extract_name is None


def test_chunks_are_validated(key, keyring) -> None:
    body = payload_dict(chunk_size=400)
    body["artifacts"][0]["chunks"] = [SHA_A, SHA_B, SHA_A]  # ceil(1000 / 400) == 3
    manifest = load_manifest(signed(key, body), keyring, now=NOW)
    assert manifest.artifacts[0].chunks == (SHA_A, SHA_B, SHA_A)
    assert manifest.artifacts[0].chunk_size == 400
    body["artifacts"][0]["chunks"] = [SHA_A, SHA_B]
    refused(ManifestError, "bad-chunks", load_manifest, signed(key, body), keyring, now=NOW)
    body = payload_dict()
    body["artifacts"][0]["chunks"] = [SHA_A]
    refused(ManifestError, "bad-chunks", load_manifest, signed(key, body), keyring, now=NOW)


# ---------------------------------------------------------------- signatures and keys


def test_tampered_payload_is_refused(key, keyring) -> None:
    payload = json.dumps(payload_dict()).encode()
    sig = key.sign(payload)
    tampered = payload.replace(b'"version": 3', b'"version": 4')
    assert tampered != payload and len(tampered) == len(payload)
    data = raw_envelope("pub-2026", _b64(tampered), _b64(sig))
    exc = refused(TrustError, "bad-signature", load_manifest, data, keyring, now=NOW)
    assert str(exc) == "manifest refused: signature does not verify with key 'pub-2026'"
    assert exc.fields["key_id"] == "pub-2026"


def test_wrong_key_is_refused(keyring) -> None:
    other = Ed25519PrivateKey.generate()
    refused(TrustError, "bad-signature", load_manifest, signed(other), keyring, now=NOW)


def test_unknown_key_id_is_refused(key, keyring) -> None:
    exc = refused(TrustError, "unknown-key", load_manifest, signed(key, key_id="pub-2099"), keyring, now=NOW)
    assert "pub-2099" in str(exc)


def test_revoked_key_is_refused(key) -> None:
    ring = {"pub-2026": TrustedKey("pub-2026", _pub_b64(key), revoked=True, source="test")}
    refused(TrustError, "revoked-key", load_manifest, signed(key), ring, now=NOW)


def test_keyring_entry_under_wrong_id_is_refused(key) -> None:
    ring = {"pub-2026": TrustedKey("someone-else", _pub_b64(key))}
    refused(TrustError, "keyring-mismatch", load_manifest, signed(key), ring, now=NOW)


OLD = Ed25519PrivateKey.generate()
NEW = Ed25519PrivateKey.generate()


@pytest.mark.parametrize(
    ("ring_spec", "signer", "expected"),
    [
        ({"old": False}, "old", None),
        ({"old": True}, "old", "revoked-key"),
        ({"old": False, "new": False}, "old", None),
        ({"old": False, "new": False}, "new", None),
        ({"old": True, "new": False}, "new", None),
        ({"old": True, "new": False}, "old", "revoked-key"),
        ({"new": False}, "old", "unknown-key"),
    ],
    ids=["old-only", "old-revoked", "both-old", "both-new", "rotated-new", "rotated-old", "old-forgotten"],
)
def test_key_rotation(ring_spec: dict[str, bool], signer: str, expected: str | None) -> None:
    keys = {"old": OLD, "new": NEW}
    ring = {kid: TrustedKey(kid, _pub_b64(keys[kid]), revoked=rev) for kid, rev in ring_spec.items()}
    data = signed(keys[signer], key_id=signer)
    if expected is None:
        assert load_manifest(data, ring, now=NOW).key_id == signer
    else:
        refused(TrustError, expected, load_manifest, data, ring, now=NOW)


# ---------------------------------------------------------------- envelope parsing


@pytest.mark.parametrize(
    ("mangle", "what"),
    [
        (lambda s: s[:10] + "\n" + s[10:], "newline"),
        (lambda s: " " + s, "leading space"),
        (lambda s: s.rstrip("="), "missing padding"),
        (lambda s: s.replace("+", "-").replace("/", "_"), "urlsafe"),
    ],
)
def test_sloppy_base64_is_refused(key, keyring, mangle: Any, what: str) -> None:
    payload = b'{"schema": "modelfs.manifest/1", "x": ">>>???~~~"}'  # has + and / in base64
    good = _b64(payload)
    assert "+" in good or "/" in good
    bad = mangle(good)
    if what == "missing padding":
        assert bad != good
    data = json.dumps({"key_id": "pub-2026", "payload_b64": bad, "sig_b64": _b64(key.sign(payload))}).encode()
    refused(ManifestError, "bad-base64", parse_envelope, data)


def test_non_canonical_base64_padding_bits_are_refused(key) -> None:
    # "QQ==" is b"A"; "QR==" decodes to the same byte with non-zero padding bits.
    data = raw_envelope("pub-2026", "QR==", _b64(b"s" * 64))
    exc = refused(ManifestError, "bad-base64", parse_envelope, data)
    assert "payload_b64" in str(exc)


def test_sloppy_signature_base64_is_refused(key) -> None:
    sig = _b64(key.sign(b"x"))
    data = raw_envelope("pub-2026", _b64(b"x"), sig.rstrip("="))
    refused(ManifestError, "bad-base64", parse_envelope, data)


def test_duplicate_keys_in_envelope_are_refused(key) -> None:
    payload = json.dumps(payload_dict()).encode()
    sig = _b64(key.sign(payload))
    data = (f'{{"key_id": "evil", "key_id": "pub-2026", "payload_b64": "{_b64(payload)}", '
            f'"sig_b64": "{sig}"}}').encode()
    exc = refused(ManifestError, "duplicate-key", parse_envelope, data)
    assert "'key_id'" in str(exc)


def test_duplicate_keys_in_payload_are_refused(key, keyring) -> None:
    text = json.dumps(payload_dict())
    payload = text.replace('"version": 3', '"version": 3, "version": 9').encode()
    exc = refused(ManifestError, "duplicate-key", load_manifest, envelope_bytes(key, "pub-2026", payload),
                  keyring, now=NOW)
    assert "payload" in str(exc)


def test_oversized_envelope_is_refused_before_parsing() -> None:
    # Not even JSON: the cap must come first.
    data = b"\xff" * (MAX_ENVELOPE_BYTES + 1)
    exc = refused(ManifestError, "too-large", parse_envelope, data)
    assert exc.fields["size"] == MAX_ENVELOPE_BYTES + 1


def test_html_captive_portal_is_refused() -> None:
    page = b"\n<!DOCTYPE html>\n<html><head><title>Hotel WiFi</title></head><body>Log in</body></html>\n"
    exc = refused(ManifestError, "html", parse_envelope, page)
    assert str(exc) == "manifest refused: not a manifest envelope (looks like HTML)"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad-json"),
        (b"\xef\xbb\xbf{}", "bad-json"),
        (b'{"key_id": "\xff"}', "not-utf8"),
        (b"[1, 2]", "not-an-object"),
        (b'{"key_id": "k", "payload_b64": "QQ=="}', "missing-field"),
        (b'{"key_id": "k", "payload_b64": "QQ==", "sig_b64": "QQ==", "extra": 1}', "unknown-field"),
        (b'{"key_id": 7, "payload_b64": "QQ==", "sig_b64": "QQ=="}', "bad-field"),
        (b'{"key_id": "", "payload_b64": "QQ==", "sig_b64": "QQ=="}', "bad-field"),
        (b'{"key_id": "k", "payload_b64": "QQ==", "sig_b64": "QQ=="}', "bad-field"),  # 1-byte sig
        (b'{"key_id": "k", "payload_b64": NaN, "sig_b64": "QQ=="}', "bad-json"),
        (b'{"key_id": "k",', "bad-json"),
        (b"[" * 100000 + b"]" * 100000, "bad-json"),
    ],
    ids=["empty", "bom", "not-utf8", "array", "missing", "extra", "type", "empty-key-id", "short-sig",
         "nan", "truncated", "deep"],
)
def test_malformed_envelopes(data: bytes, reason: str) -> None:
    exc = refused(ManifestError, reason, parse_envelope, data)
    assert str(exc).startswith("manifest refused: ")


def test_parse_envelope_returns_raw_bytes(key) -> None:
    payload = b'{"a": 1}'
    env = parse_envelope(envelope_bytes(key, "k", payload))
    assert env == Envelope(key_id="k", payload=payload, signature=key.sign(payload))


def test_parse_then_verify_in_two_steps_collects_checks(key, keyring) -> None:
    checks: list[str] = []
    env = parse_envelope(signed(key), checks=checks)
    parsed = len(checks)
    manifest = verify_envelope(env, keyring, now=NOW, checks=checks)
    assert manifest.key_id == env.key_id == "pub-2026"
    assert parsed >= 3 and len(checks) > parsed
    assert checks[parsed] == "key 'pub-2026' is trusted, not revoked (source: test)"
    assert checks[-1].startswith("not expired: expires 2027-01-01T00:00:00Z")


# ---------------------------------------------------------------- payload schema


def test_expired_manifest_is_refused(key, keyring) -> None:
    data = signed(key, payload_dict(expires="2026-03-01T12:00:00Z"))
    exc = refused(TrustError, "expired", load_manifest, data, keyring, now=NOW)
    assert exc.fields["version"] == 3
    later = datetime(2026, 3, 1, 11, 59, 59, tzinfo=UTC)
    assert load_manifest(data, keyring, now=later).version == 3


def test_naive_now_is_a_caller_bug(key, keyring) -> None:
    with pytest.raises(ValueError):
        load_manifest(signed(key), keyring, now=datetime(2026, 1, 1))


def test_unknown_schema_is_refused(key, keyring) -> None:
    exc = refused(ManifestError, "unknown-schema", load_manifest,
                  signed(key, payload_dict(schema="modelfs.manifest/2")), keyring, now=NOW)
    assert "modelfs.manifest/2" in str(exc)


@pytest.mark.parametrize(
    "name",
    ["../x", "a/b", "/abs", "x\x00y", "..", ".", "", "a\\b", "tab\there", "x" * 256, "é" * 128],
)
def test_unsafe_filenames_are_refused(key, keyring, name: str) -> None:
    body = payload_dict()
    body["artifacts"][0]["filename"] = name
    exc = refused(ManifestError, "bad-filename", load_manifest, signed(key, body), keyring, now=NOW)
    assert exc.fields["field"] == "artifacts[0].filename"
    assert filename_problem(name) is not None


@pytest.mark.parametrize("name", ["model.json", ".versions", "MODEL.JSON"])
def test_reserved_filenames_are_refused(key, keyring, name: str) -> None:
    body = payload_dict()
    body["artifacts"][0]["filename"] = name
    refused(ManifestError, "reserved-filename", load_manifest, signed(key, body), keyring, now=NOW)


@pytest.mark.parametrize(
    ("first", "second"),
    [("w.gguf", "w.gguf"), ("W.gguf", "w.GGUF"), ("caf\u00e9.gguf", "cafe\u0301.gguf"), ("Foo.zip", "foo")],
)
def test_colliding_filenames_are_refused(key, keyring, first: str, second: str) -> None:
    body = payload_dict()
    body["artifacts"][0]["filename"] = first
    body["artifacts"][1]["filename"] = second
    if first.endswith(".zip"):
        body["artifacts"][0]["role"] = "archive"
    refused(ManifestError, "duplicate-filename", load_manifest, signed(key, body), keyring, now=NOW)


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    target: Any = body
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is _DELETE:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("version", 0, "bad-field"),
        ("version", -1, "bad-field"),
        ("version", True, "bad-field"),
        ("version", 3.0, "bad-field"),
        ("version", "3", "bad-field"),
        ("version", 2**63, "bad-field"),
        ("context_len", 0, "bad-field"),
        ("family", "", "bad-field"),
        ("family", "a\x1bb", "bad-field"),
        ("family", _DELETE, "missing-field"),
        ("schema", _DELETE, "missing-field"),
        ("schema", 1, "unknown-schema"),
        ("colour", "red", "unknown-field"),
        ("model_id", "a/b", "bad-model-id"),
        ("model_id", "..", "bad-model-id"),
        ("model_id", "x" * 129, "bad-model-id"),
        ("model_id", "", "bad-model-id"),
        ("expires", "2027-01-01", "bad-timestamp"),
        ("expires", "2027-01-01T00:00:00+01:00", "bad-timestamp"),
        ("expires", "2027-01-01T00:00:00", "bad-timestamp"),
        ("expires", "2027-02-30T00:00:00Z", "bad-timestamp"),
        ("source_url", "ftp://example.org/x", "bad-url"),
        ("artifacts", [], "bad-field"),
        ("artifacts", {}, "bad-field"),
        ("artifacts.0.url", "file:///etc/passwd", "bad-url"),
        ("artifacts.0.url", "https://user:secret@host/x", "bad-url"),
        ("artifacts.0.url", "https:///nohost", "bad-url"),
        ("artifacts.0.url", "https://h/a b", "bad-url"),
        ("artifacts.0.sha256", "A" * 64, "bad-sha256"),
        ("artifacts.0.sha256", "a" * 63, "bad-sha256"),
        ("artifacts.0.sha256", "a" * 64 + "\n", "bad-sha256"),
        ("artifacts.0.size", -1, "bad-field"),
        ("artifacts.0.size", False, "bad-field"),
        ("artifacts.0.role", "model", "bad-field"),
        ("artifacts.0.role", ["weights"], "bad-field"),
        ("artifacts.0.platform", "beos", "bad-field"),
        ("artifacts.0.mirror", "https://h/x", "unknown-field"),
        ("artifacts.0.sha256", _DELETE, "missing-field"),
        ("artifacts.0.filename", 5, "bad-filename"),
        # Names that are not what they look like (invisible, format, unassigned characters,
        # misleading edges): the right-to-left override makes this read "model.exe.gguf".
        ("artifacts.0.filename", "model\u202efugg.exe", "bad-filename"),
        ("artifacts.0.filename", "mo\u200bdel.gguf", "bad-filename"),
        ("artifacts.0.filename", "model.gguf. ", "bad-filename"),
        ("artifacts.0.filename", "model.gguf.", "bad-filename"),
        ("artifacts.0.filename", "-rf.gguf", "bad-filename"),
        ("artifacts.0.filename", "a\u2028b.gguf", "bad-filename"),
        ("artifacts.0.filename", "a\ue000b.gguf", "bad-filename"),
        ("artifacts.0.filename", "a\U000e0001b.gguf", "bad-filename"),
        ("artifacts.0.filename", "a\u0378b.gguf", "bad-filename"),  # unassigned
        ("model_id", "model.", "bad-model-id"),
        ("model_id", "-model", "bad-model-id"),
        ("runtime", [], "bad-field"),
        ("runtime", {"n_gpu_layers": [1]}, "bad-field"),
        ("chunk_size", 0, "bad-field"),
    ],
)
def test_schema_violations(key, keyring, path: str, value: Any, reason: str) -> None:
    body = payload_dict()
    _set(body, path, value)
    exc = refused(ManifestError, reason, load_manifest, signed(key, body), keyring, now=NOW)
    assert "secret" not in str(exc)


def test_archive_role_needs_zip_name(key, keyring) -> None:
    body = payload_dict()
    body["artifacts"][0]["role"] = "archive"
    refused(ManifestError, "bad-filename", load_manifest, signed(key, body), keyring, now=NOW)
    body["artifacts"][0]["filename"] = ".zip"
    refused(ManifestError, "bad-filename", load_manifest, signed(key, body), keyring, now=NOW)


def test_optional_metadata_fields(key, keyring) -> None:
    body = payload_dict(quantization="Q4_K_M", architecture="qwen2vl", notes="line one\nline two",
                        runtime={"n_ctx": 4096, "temp": 0.7, "flash_attn": True, "chat": "chatml"})
    manifest = load_manifest(signed(key, body), keyring, now=NOW)
    assert manifest.quantization == "Q4_K_M"
    assert dict(manifest.runtime) == {"n_ctx": 4096, "temp": 0.7, "flash_attn": True, "chat": "chatml"}
    assert manifest.notes == "line one\nline two"


def test_payload_that_is_not_json_is_refused_after_signature(key, keyring) -> None:
    data = envelope_bytes(key, "pub-2026", b"\x00\x01 not json")
    refused(ManifestError, "bad-json", load_manifest, data, keyring, now=NOW)
    data = envelope_bytes(key, "pub-2026", b"\xc3(")
    refused(ManifestError, "not-utf8", load_manifest, data, keyring, now=NOW)


def test_signature_is_checked_before_the_payload_is_parsed(keyring) -> None:
    other = Ed25519PrivateKey.generate()
    data = envelope_bytes(other, "pub-2026", b"not json at all")
    refused(TrustError, "bad-signature", load_manifest, data, keyring, now=NOW)


# ---------------------------------------------------------------- version floor


def _manifest_v(key: Ed25519PrivateKey, keyring: Any, version: int, family: str = "qwen2-vl") -> Manifest:
    return load_manifest(signed(key, payload_dict(version=version, family=family)), keyring, now=NOW)


def test_first_and_newer_versions_pass(key, keyring) -> None:
    m = _manifest_v(key, keyring, 3)
    check_version_floor(m, None, None)
    checks: list[str] = []
    check_version_floor(m, 2, SHA_A, checks=checks)
    assert checks == ["version 3 is above the accepted floor 2"]


def test_older_version_replayed_is_refused(key, keyring) -> None:
    m = _manifest_v(key, keyring, 2)
    exc = refused(TrustError, "rollback", check_version_floor, m, 3, SHA_A)
    assert exc.fields["floor"] == 3 and exc.fields["model_id"] == "qwen2-vl-2b"


def test_older_version_already_installed_may_be_pulled_again(key, keyring) -> None:
    m = _manifest_v(key, keyring, 2)
    check_version_floor(m, 3, SHA_A, {2: m.payload_sha256, 3: SHA_A})
    exc = refused(TrustError, "version-content-mismatch", check_version_floor, m, 3, SHA_A, {2: SHA_B})
    assert exc.fields["version"] == 2


def test_same_version_same_content_passes(key, keyring) -> None:
    m = _manifest_v(key, keyring, 3)
    check_version_floor(m, 3, m.payload_sha256, {3: m.payload_sha256})


def test_same_version_different_content_is_refused(key, keyring) -> None:
    first = _manifest_v(key, keyring, 3)
    second = _manifest_v(key, keyring, 3, family="qwen2-vl-evil")
    assert first.payload_sha256 != second.payload_sha256
    refused(TrustError, "version-content-mismatch", check_version_floor, second, 3, first.payload_sha256)
    refused(TrustError, "version-content-mismatch", check_version_floor, second, 2, SHA_A,
            {3: first.payload_sha256})


def test_floor_without_its_hash_is_a_caller_bug(key, keyring) -> None:
    with pytest.raises(ValueError):
        check_version_floor(_manifest_v(key, keyring, 3), 3, None)


def test_manifest_is_frozen(key, keyring) -> None:
    m = _manifest_v(key, keyring, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.version = 4  # type: ignore[misc]
    assert copy.copy(m) == m
