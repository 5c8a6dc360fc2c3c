"""Signed manifests: parsing, signature verification, schema, expiry and version floor.

This module owns the trust decision for a manifest, as pure functions: bytes and a
keyring in, a frozen :class:`Manifest` or one :class:`~store.errors.StoreError` out.
It must never touch the network, the catalog or the blob store, never read a clock
(``now`` is injected), and never accept anything it had to repair: a malformed
document is refused, not sanitised.

The envelope is the format publisher tooling already emits, byte for byte::

    {"key_id": "...", "payload_b64": "...", "sig_b64": "..."}

with an Ed25519 signature over the raw (base64-decoded) payload bytes. The order of
checks is fixed, so the first refusal is the most fundamental one:

    parse_envelope   size cap (before any parsing), HTML sniff, strict UTF-8 JSON
                     (duplicate keys refused), exactly three string fields, canonical
                     base64
    verify_envelope  key lookup (unknown, revoked), signature, strict payload JSON,
                     schema, expiry
    check_version_floor   rollback and same-version-different-content refusals,
                     against what the catalog recorded

Every refusal carries ``reason=`` (a stable machine-readable code) and, where it
applies, ``field=``, ``key_id=``, ``model_id=`` and ``version=``.

ManifestError reasons: ``too-large``, ``html``, ``not-utf8``, ``bad-json``,
``duplicate-key``, ``not-an-object``, ``missing-field``, ``unknown-field``,
``bad-field``, ``bad-base64``, ``unknown-schema``, ``bad-model-id``, ``bad-timestamp``,
``bad-url``, ``bad-sha256``, ``bad-chunks``, ``bad-filename``, ``reserved-filename``,
``duplicate-filename``.

TrustError reasons: ``unknown-key``, ``revoked-key``, ``unusable-key``,
``keyring-mismatch``, ``bad-key``, ``bad-signature``, ``expired``, ``rollback``,
``version-content-mismatch``. Keys, signing and the keyring live in ``store.keys``;
file-name rules in ``store.names``.

Schema ``modelfs.manifest/1`` (decisions):

* Top level: required ``schema``, ``model_id``, ``version``, ``family``,
  ``context_len``, ``min_device``, ``license``, ``source_url``, ``expires``,
  ``artifacts``; optional ``chunk_size`` and the metadata-card fields
  ``quantization``, ``architecture``, ``notes`` (strings) and ``runtime`` (an object
  of recommended runtime parameters, scalar values). Any other field is refused
  (``unknown-field``): a field we would silently ignore is a field a publisher
  believes is enforced. New fields mean a new schema value.
* Artifact: required ``filename``, ``url``, ``sha256``, ``size``, ``role``; optional
  ``platform`` (``any``, ``linux``, ``macos``, ``windows``; absent means ``any``),
  ``chunk_size`` (overrides the top-level one) and ``chunks`` (per-chunk SHA-256,
  ``len == ceil(size / chunk_size)``). Other fields are refused.
* Roles: ``weights``, ``mmproj``, ``shard``, ``aux`` and ``archive``. Only the
  explicit ``archive`` role is ever extracted (never guessed from a ``.zip`` name: a
  ``.zip`` with another role is served as an ordinary file). An ``archive`` filename
  must end in ``.zip``; the extracted directory takes the name without it
  (``Foo.mlmodelc.zip`` -> ``Foo.mlmodelc``), and that name must be safe and distinct
  from every other name in the payload too.
* Filenames are one safe path component: not empty, ``.`` or ``..``; no ``/``, ``\\``,
  NUL or control characters; at most 255 UTF-8 bytes; not ``model.json`` or
  ``.versions`` (reserved by the mount); distinct after Unicode canonical caseless
  matching (so ``A.gguf``/``a.gguf`` or NFC/NFD spellings collide, as they would on
  macOS).
* Strings are single-line (no control characters; ``notes`` may hold newlines and
  tabs) and bounded. URLs are ``http``/``https`` with a host and no userinfo (a
  credential in a signed URL would end up in the catalog), or a registry blob
  ``oci://HOST/REPO@sha256:HEX`` (``oci+http://`` for plain HTTP) whose digest is the
  artifact's ``sha256`` (fetched with the registry's auth, ``store.oci``). ``expires`` is
  ``YYYY-MM-DDTHH:MM:SS[.ffffff]`` followed by ``Z`` or ``+00:00``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import ManifestError, TrustError, UsageError
from .keys import ED25519_SIG_BYTES, ENVELOPE_FIELDS, MAX_ENVELOPE_BYTES, TrustedKey, key_id_problem
from .names import filename_problem, model_name_problem, reserved_problem

SCHEMA = "modelfs.manifest/1"
KNOWN_SCHEMAS = frozenset({SCHEMA})

ROLES = frozenset({"weights", "mmproj", "shard", "aux", "archive"})
PLATFORMS = frozenset({"any", "linux", "macos", "windows", "android", "ios"})
ARCHIVE_SUFFIX = ".zip"

_REQUIRED = frozenset(
    {
        "schema", "model_id", "version", "family", "context_len", "min_device",
        "license", "source_url", "expires", "artifacts",
    }
)
_OPTIONAL = frozenset({"chunk_size", "quantization", "architecture", "notes", "runtime"})
_ARTIFACT_REQUIRED = frozenset({"filename", "url", "sha256", "size", "role"})
_ARTIFACT_OPTIONAL = frozenset({"platform", "chunk_size", "chunks"})

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|\+00:00)"
)
_MAX_INT = 2**63 - 1  # what the catalog's INTEGER columns hold
_MAX_TEXT = 1024
_MAX_NOTES = 16 * 1024
_MAX_URL = 8192
_MAX_RUNTIME_PARAMS = 64

RuntimeValue = str | int | float | bool


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Envelope:
    """A parsed, not yet verified, envelope. ``payload`` is the raw signed bytes."""

    key_id: str
    payload: bytes
    signature: bytes


@dataclass(frozen=True)
class Artifact:
    filename: str
    url: str
    sha256: str
    size: int
    role: str
    platform: str = "any"
    chunk_size: int | None = None  # effective: the artifact's own, else the payload's
    chunks: tuple[str, ...] | None = None

    @property
    def is_archive(self) -> bool:
        return self.role == "archive"

    @property
    def extract_name(self) -> str | None:
        """Directory name an archive extracts to, or None for ordinary files."""
        return self.filename[: -len(ARCHIVE_SUFFIX)] if self.is_archive else None


@dataclass(frozen=True)
class MinDevice:
    """``min_device`` as an object: a soft gate, evaluated on the installing machine
    (``store.device``). Absent fields ask nothing."""
    min_ram_bytes: int | None = None
    min_free_disk_bytes: int | None = None
    cpu_features: tuple[str, ...] = ()
    gpu: str | None = None
    os_min: str | None = None

    def as_text(self) -> str:
        """The catalog's and the card's form: canonical JSON."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
             if v not in (None, ())}
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


_MIN_DEVICE_FIELDS = frozenset({"min_ram_bytes", "min_free_disk_bytes", "cpu_features", "gpu", "os_min"})


@dataclass(frozen=True)
class Manifest:
    schema: str
    model_id: str
    version: int
    family: str
    context_len: int
    min_device: str | MinDevice   # free text, or the soft gate of an object
    license: str
    source_url: str
    expires: datetime
    artifacts: tuple[Artifact, ...]
    chunk_size: int | None
    quantization: str | None
    architecture: str | None
    notes: str | None
    runtime: tuple[tuple[str, RuntimeValue], ...]  # dict(m.runtime) for a mapping
    payload_sha256: str
    key_id: str
    raw_payload: bytes = dataclasses.field(repr=False)

    def artifacts_for_platform(self, platform: str) -> list[Artifact]:
        """Artifacts for ``platform``: those marked for it plus those marked ``any``."""
        if platform not in PLATFORMS:
            raise UsageError(
                f"unknown platform {platform!r} (expected one of {', '.join(sorted(PLATFORMS))})",
                reason="bad-platform",
            )
        return [a for a in self.artifacts if a.platform in ("any", platform)]


Keyring = Mapping[str, TrustedKey | Ed25519PublicKey]


# --------------------------------------------------------------------------- helpers


def _refuse(reason: str, message: str, **fields: Any) -> ManifestError:
    return ManifestError(f"manifest refused: {message}", reason=reason, **fields)


def _distrust(reason: str, message: str, **fields: Any) -> TrustError:
    return TrustError(f"manifest refused: {message}", reason=reason, **fields)


def _short(value: str, limit: int = 80) -> str:
    """repr() of a possibly hostile string, bounded: escapes control characters."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _note(checks: list[str] | None, text: str) -> None:
    if checks is not None:
        checks.append(text)


def _no_duplicates(what: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise _refuse("duplicate-key", f"{what} has duplicate JSON key {_short(key)}", key=key)
            obj[key] = value
        return obj

    return hook


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _strict_json(data: bytes, what: str) -> Any:
    """UTF-8 JSON with no duplicate keys, no NaN/Infinity and no byte-order mark."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse("not-utf8", f"{what} is not valid UTF-8 (byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise _refuse("bad-json", f"{what} starts with a byte-order mark")
    if not text.strip():
        raise _refuse("bad-json", f"{what} is empty")
    try:
        return json.loads(
            text, object_pairs_hook=_no_duplicates(what), parse_constant=_no_constant
        )
    except json.JSONDecodeError as exc:
        raise _refuse(
            "bad-json", f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise _refuse("bad-json", f"{what} is nested too deeply") from None
    except ValueError as exc:
        # NaN/Infinity, or an integer too long to convert.
        detail = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise _refuse("bad-json", f"{what} is not acceptable JSON ({detail})") from None


def _strict_b64(value: str, field: str) -> bytes:
    """Standard-alphabet, padded, canonical base64; anything else is refused."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse("bad-base64", f"{field} is not strict base64", field=field) from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise _refuse("bad-base64", f"{field} is not canonical base64", field=field)
    return raw


def _has_control(value: str, allow: str = "") -> bool:
    return any(unicodedata.category(c) == "Cc" and c not in allow for c in value)


def _caseless(name: str) -> str:
    """Unicode canonical caseless matching key (NFC/NFD and case variants collide)."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


# --------------------------------------------------------------------------- envelope


def parse_envelope(data: bytes, *, checks: list[str] | None = None) -> Envelope:
    """Parse an envelope strictly. Nothing about trust is decided here."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise _refuse(
            "too-large",
            f"envelope is {len(data)} bytes (limit {MAX_ENVELOPE_BYTES})",
            size=len(data),
        )
    _note(checks, f"envelope size {len(data)} bytes is within the {MAX_ENVELOPE_BYTES}-byte cap")
    head = data.lstrip()[:512].lower()
    if head.startswith(b"<"):
        looks = "HTML" if (b"html" in head or b"<!doctype" in head or b"<head" in head) else "markup"
        raise _refuse("html", f"not a manifest envelope (looks like {looks})")
    obj = _strict_json(data, "envelope")
    if not isinstance(obj, dict):
        raise _refuse("not-an-object", f"envelope is a JSON {type(obj).__name__}, not an object")
    for name in ENVELOPE_FIELDS:
        if name not in obj:
            raise _refuse("missing-field", f"envelope has no {name!r} field", field=name)
    extra = sorted(set(obj) - set(ENVELOPE_FIELDS))
    if extra:
        raise _refuse("unknown-field", f"envelope has unknown field {_short(extra[0])}", field=extra[0])
    for name in ENVELOPE_FIELDS:
        if not isinstance(obj[name], str):
            raise _refuse("bad-field", f"envelope field {name!r} is not a string", field=name)
    key_id = obj["key_id"]
    if key_id_problem(key_id) is not None:
        raise _refuse("bad-field", f"envelope key_id {_short(key_id)} is not a valid key id", field="key_id")
    _note(checks, "envelope is strict UTF-8 JSON: no duplicate keys, exactly key_id/payload_b64/sig_b64")
    payload = _strict_b64(obj["payload_b64"], "payload_b64")
    signature = _strict_b64(obj["sig_b64"], "sig_b64")
    if not payload:
        raise _refuse("bad-field", "payload_b64 is empty", field="payload_b64")
    if len(signature) != ED25519_SIG_BYTES:
        raise _refuse(
            "bad-field",
            f"sig_b64 decodes to {len(signature)} bytes (an Ed25519 signature is {ED25519_SIG_BYTES})",
            field="sig_b64",
        )
    _note(checks, "payload_b64 and sig_b64 are canonical base64")
    return Envelope(key_id=key_id, payload=payload, signature=signature)


def _resolve_key(key_id: str, keyring: Keyring) -> tuple[Ed25519PublicKey, str]:
    entry = keyring.get(key_id)
    if entry is None:
        raise _distrust("unknown-key", f"key {key_id!r} is not in the keyring", key_id=key_id)
    if isinstance(entry, Ed25519PublicKey):
        return entry, "trusted"
    if not isinstance(entry, TrustedKey):
        raise TypeError(f"keyring entry for {key_id!r} is {type(entry).__name__}")
    if entry.key_id != key_id:
        raise _distrust(
            "keyring-mismatch",
            f"keyring entry {key_id!r} holds key {entry.key_id!r}",
            key_id=key_id,
        )
    if entry.revoked:
        raise _distrust("revoked-key", f"key {key_id!r} is revoked", key_id=key_id)
    if entry.problem:
        raise _distrust("unusable-key", f"key {key_id!r} is not usable: {entry.problem}", key_id=key_id)
    source = f" (source: {entry.source})" if entry.source else ""
    return entry.public_key(), f"trusted, not revoked{source}"


def verify_envelope(
    env: Envelope,
    keyring: Keyring,
    *,
    now: datetime,
    checks: list[str] | None = None,
) -> Manifest:
    """Verify the signature, then parse and validate the payload, then check expiry.

    ``now`` must be timezone-aware. If ``checks`` is a list, a line describing each
    check that passed is appended to it (for ``modelfs manifest verify``).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    public_key, status = _resolve_key(env.key_id, keyring)
    _note(checks, f"key {env.key_id!r} is {status}")
    try:
        public_key.verify(env.signature, env.payload)
    except InvalidSignature:
        raise _distrust(
            "bad-signature",
            f"signature does not verify with key {env.key_id!r}",
            key_id=env.key_id,
        ) from None
    _note(checks, f"Ed25519 signature verifies over the {len(env.payload)} raw payload bytes")
    obj = _strict_json(env.payload, "payload")
    _note(checks, "payload is strict UTF-8 JSON with no duplicate keys")
    manifest = _validate_payload(obj, env)
    _note(
        checks,
        f"schema {manifest.schema}: model {manifest.model_id!r} version {manifest.version}, "
        f"{len(manifest.artifacts)} artifact(s) with safe, distinct filenames",
    )
    if now >= manifest.expires:
        raise _distrust(
            "expired",
            f"manifest for {manifest.model_id!r} version {manifest.version} expired at "
            f"{_iso(manifest.expires)} (now {_iso(now)})",
            model_id=manifest.model_id,
            version=manifest.version,
        )
    _note(checks, f"not expired: expires {_iso(manifest.expires)}, now {_iso(now)}")
    return manifest


def load_manifest(
    data: bytes, keyring: Keyring, *, now: datetime, checks: list[str] | None = None
) -> Manifest:
    """parse_envelope then verify_envelope: the usual entry point."""
    return verify_envelope(parse_envelope(data, checks=checks), keyring, now=now, checks=checks)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- payload


def _text(obj: Mapping[str, Any], key: str, field: str, *, limit: int = _MAX_TEXT,
          allow: str = "", empty: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _refuse("bad-field", f"{field} is not a string", field=field)
    if not value and not empty:
        raise _refuse("bad-field", f"{field} is empty", field=field)
    if len(value) > limit:
        raise _refuse("bad-field", f"{field} is longer than {limit} characters", field=field)
    if _has_control(value, allow):
        raise _refuse("bad-field", f"{field} contains a control character", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse("bad-field", f"{field} is not valid Unicode", field=field) from None
    return value


def _int(obj: Mapping[str, Any], key: str, field: str, *, minimum: int) -> int:
    value = obj[key]
    # bool is an int subclass: `true` is not a version.
    if type(value) is not int:
        raise _refuse("bad-field", f"{field} is not an integer", field=field)
    if value < minimum or value > _MAX_INT:
        raise _refuse("bad-field", f"{field} {value} is out of range ({minimum}..2^63-1)", field=field)
    return value


# A registry blob: oci://HOST/REPO@sha256:HEX (store.oci); REPO as the distribution spec spells it.
_OCI_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_OCI_BLOB_PATH = re.compile(rf"/(?P<repo>{_OCI_COMPONENT}(?:/{_OCI_COMPONENT})*)@sha256:(?P<hex>[0-9a-f]{{64}})")


def _url(obj: Mapping[str, Any], key: str, field: str) -> str:
    value = _text(obj, key, field, limit=_MAX_URL)
    if any(c.isspace() for c in value):
        raise _refuse("bad-url", f"{field} contains whitespace", field=field)
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise _refuse("bad-url", f"{field} is not a valid URL", field=field) from None
    if parts.scheme not in ("https", "http", "oci", "oci+http"):
        raise _refuse("bad-url", f"{field} is not an http(s) URL or an oci:// blob reference", field=field)
    if parts.scheme in ("oci", "oci+http") and not _OCI_BLOB_PATH.fullmatch(parts.path):
        raise _refuse("bad-url", f"{field} is not an oci:// blob reference (oci://HOST/REPO@sha256:HEX)",
                      field=field)
    if not host:
        raise _refuse("bad-url", f"{field} has no host", field=field)
    if "@" in parts.netloc:
        # Never repeat the URL: it carries a credential.
        raise _refuse("bad-url", f"{field} carries credentials (userinfo)", field=field)
    return value


def _sha256(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise _refuse("bad-sha256", f"{field} is not 64 lowercase hex digits", field=field)
    return value


def _timestamp(obj: Mapping[str, Any], key: str, field: str) -> datetime:
    value = obj[key]
    if not isinstance(value, str) or not _TIMESTAMP_RE.fullmatch(value):
        raise _refuse(
            "bad-timestamp",
            f"{field} is not a UTC ISO-8601 timestamp (YYYY-MM-DDTHH:MM:SSZ)",
            field=field,
        )
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _refuse("bad-timestamp", f"{field} {value!r} is not a real date and time", field=field) from None
    if moment.utcoffset() != timedelta(0):  # pragma: no cover - the regex only admits UTC
        raise _refuse("bad-timestamp", f"{field} is not in UTC", field=field)
    return moment


def _check_fields(obj: Mapping[str, Any], required: frozenset[str], optional: frozenset[str],
                  where: str, prefix: str) -> None:
    for name in sorted(required):
        if name not in obj:
            raise _refuse("missing-field", f"{where} has no {name!r} field", field=prefix + name)
    unknown = sorted(set(obj) - required - optional)
    if unknown:
        raise _refuse(
            "unknown-field",
            f"{where} has unknown field {_short(unknown[0])} (not in schema {SCHEMA})",
            field=prefix + unknown[0],
        )


def _filename(value: Any, field: str) -> str:
    problem = filename_problem(value)
    if problem is not None:
        shown = _short(value) if isinstance(value, str) else type(value).__name__
        raise _refuse("bad-filename", f"{field} {shown} {problem}", field=field)
    if reserved_problem(value) is not None:
        raise _refuse("reserved-filename", f"{field} {value!r} is reserved by the mount", field=field)
    assert isinstance(value, str)  # filename_problem refuses every non-string
    return value


def _chunks(art: Mapping[str, Any], size: int, chunk_size: int | None, field: str) -> tuple[str, ...] | None:
    if "chunks" not in art:
        return None
    chunks = art["chunks"]
    if not isinstance(chunks, list):
        raise _refuse("bad-chunks", f"{field}.chunks is not a list", field=f"{field}.chunks")
    if chunk_size is None:
        raise _refuse("bad-chunks", f"{field}.chunks is given without a chunk_size", field=f"{field}.chunks")
    expected = -(-size // chunk_size)  # ceil without floats: sizes exceed 2^53
    if len(chunks) != expected:
        raise _refuse(
            "bad-chunks",
            f"{field}.chunks has {len(chunks)} hashes, size {size} in chunks of {chunk_size} needs {expected}",
            field=f"{field}.chunks",
        )
    return tuple(_sha256(c, f"{field}.chunks[{i}]") for i, c in enumerate(chunks))


def _artifact(art: Any, index: int, default_chunk_size: int | None) -> Artifact:
    field = f"artifacts[{index}]"
    if not isinstance(art, dict):
        raise _refuse("bad-field", f"{field} is not an object", field=field)
    _check_fields(art, _ARTIFACT_REQUIRED, _ARTIFACT_OPTIONAL, field, f"{field}.")
    filename = _filename(art["filename"], f"{field}.filename")
    url = _url(art, "url", f"{field}.url")
    sha256 = _sha256(art["sha256"], f"{field}.sha256")
    blob = _OCI_BLOB_PATH.fullmatch(urlsplit(url).path) if url.startswith("oci") else None
    if blob is not None and blob["hex"] != sha256:
        raise _refuse("bad-url", f"{field}.url names registry blob sha256:{blob['hex'][:12]}…, not the "
                      "artifact's sha256", field=f"{field}.url")
    size = _int(art, "size", f"{field}.size", minimum=0)
    role = art["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise _refuse(
            "bad-field",
            f"{field}.role {_short(str(role))} is not one of {', '.join(sorted(ROLES))}",
            field=f"{field}.role",
        )
    platform = art.get("platform", "any")
    if not isinstance(platform, str) or platform not in PLATFORMS:
        raise _refuse(
            "bad-field",
            f"{field}.platform {_short(str(platform))} is not one of {', '.join(sorted(PLATFORMS))}",
            field=f"{field}.platform",
        )
    chunk_size = default_chunk_size
    if "chunk_size" in art:
        chunk_size = _int(art, "chunk_size", f"{field}.chunk_size", minimum=1)
    if role == "archive":
        if not filename.casefold().endswith(ARCHIVE_SUFFIX):
            raise _refuse(
                "bad-filename",
                f"{field}.filename {filename!r} has role archive but does not end in {ARCHIVE_SUFFIX}",
                field=f"{field}.filename",
            )
        extract = filename[: -len(ARCHIVE_SUFFIX)]
        problem = filename_problem(extract)
        if problem is None:
            problem = reserved_problem(extract)
        if problem is not None:
            raise _refuse(
                "bad-filename",
                f"{field}.filename {filename!r} extracts to {extract!r}, which {problem}",
                field=f"{field}.filename",
            )
    return Artifact(
        filename=filename,
        url=url,
        sha256=sha256,
        size=size,
        role=role,
        platform=platform,
        chunk_size=chunk_size,
        chunks=_chunks(art, size, chunk_size, field),
    )


def _runtime(value: Any) -> tuple[tuple[str, RuntimeValue], ...]:
    if not isinstance(value, dict):
        raise _refuse("bad-field", "runtime is not an object", field="runtime")
    if len(value) > _MAX_RUNTIME_PARAMS:
        raise _refuse("bad-field", f"runtime has more than {_MAX_RUNTIME_PARAMS} parameters", field="runtime")
    out = []
    for key in sorted(value):
        field = f"runtime.{key}"
        if not key or len(key) > 128 or _has_control(key):
            raise _refuse("bad-field", f"runtime has an invalid parameter name {_short(key)}", field="runtime")
        item = value[key]
        if isinstance(item, str):
            item = _text(value, key, field, empty=True)
        elif not isinstance(item, (int, float, bool)):
            raise _refuse("bad-field", f"{field} is not a string, number or boolean", field=field)
        out.append((key, item))
    return tuple(out)


def _model_id(model_id: Any) -> str:
    problem = model_name_problem(model_id)
    if problem is not None:
        shown = _short(model_id) if isinstance(model_id, str) else type(model_id).__name__
        raise _refuse("bad-model-id", f"model_id {shown} {problem}", field="model_id")
    assert isinstance(model_id, str)
    return model_id


def _check_unique_names(artifacts: tuple[Artifact, ...]) -> None:
    """No two artifacts (or an artifact and an archive's directory) share a name, caselessly."""
    seen: dict[str, str] = {}
    for i, art in enumerate(artifacts):
        names = [art.filename] + ([art.extract_name] if art.extract_name else [])
        for name in names:
            key = _caseless(name)
            if key in seen:
                raise _refuse(
                    "duplicate-filename",
                    f"artifacts[{i}].filename {name!r} collides with {seen[key]!r}",
                    field=f"artifacts[{i}].filename",
                )
            seen[key] = name


def _min_device(value: dict[str, Any]) -> MinDevice:
    _check_fields(value, frozenset(), _MIN_DEVICE_FIELDS, "min_device", "min_device.")
    ints = {k: _int(value, k, f"min_device.{k}", minimum=0) for k in ("min_ram_bytes", "min_free_disk_bytes")
            if k in value}
    features = value.get("cpu_features", [])
    if not isinstance(features, list) or len(features) > 64 or not all(
            isinstance(f, str) and re.fullmatch(r"[a-z0-9_.]{1,32}", f) for f in features):
        raise _refuse("bad-field", "min_device.cpu_features is not a list of cpu flag names", field="min_device")
    texts = {k: _text(value, k, f"min_device.{k}", limit=64) for k in ("gpu", "os_min") if k in value}
    return MinDevice(ints.get("min_ram_bytes"), ints.get("min_free_disk_bytes"), tuple(features),
                     texts.get("gpu"), texts.get("os_min"))


def _validate_payload(obj: Any, env: Envelope) -> Manifest:
    if not isinstance(obj, dict):
        raise _refuse("not-an-object", f"payload is a JSON {type(obj).__name__}, not an object")
    if "schema" not in obj:
        raise _refuse("missing-field", "payload has no 'schema' field", field="schema")
    schema = obj["schema"]
    if not isinstance(schema, str) or schema not in KNOWN_SCHEMAS:
        shown = _short(schema) if isinstance(schema, str) else type(schema).__name__
        raise _refuse("unknown-schema", f"unknown schema {shown} (expected {SCHEMA!r})", field="schema")
    _check_fields(obj, _REQUIRED, _OPTIONAL, "payload", "")

    model_id = _model_id(obj["model_id"])
    version = _int(obj, "version", "version", minimum=1)
    family = _text(obj, "family", "family")
    context_len = _int(obj, "context_len", "context_len", minimum=1)
    min_device = _min_device(obj["min_device"]) if isinstance(obj.get("min_device"), dict) else \
        _text(obj, "min_device", "min_device")
    license_ = _text(obj, "license", "license")
    source_url = _url(obj, "source_url", "source_url")
    expires = _timestamp(obj, "expires", "expires")
    chunk_size = _int(obj, "chunk_size", "chunk_size", minimum=1) if "chunk_size" in obj else None
    optional = {
        key: _text(obj, key, key, limit=_MAX_NOTES if key == "notes" else _MAX_TEXT,
                   allow="\n\t" if key == "notes" else "")
        for key in ("quantization", "architecture", "notes")
        if key in obj
    }
    runtime = _runtime(obj["runtime"]) if "runtime" in obj else ()

    raw_artifacts = obj["artifacts"]
    if not isinstance(raw_artifacts, list) or not raw_artifacts:
        raise _refuse("bad-field", "artifacts is not a non-empty list", field="artifacts")
    artifacts = tuple(_artifact(a, i, chunk_size) for i, a in enumerate(raw_artifacts))
    _check_unique_names(artifacts)
    return Manifest(
        schema=schema,
        model_id=model_id,
        version=version,
        family=family,
        context_len=context_len,
        min_device=min_device,
        license=license_,
        source_url=source_url,
        expires=expires,
        artifacts=artifacts,
        chunk_size=chunk_size,
        quantization=optional.get("quantization"),
        architecture=optional.get("architecture"),
        notes=optional.get("notes"),
        runtime=runtime,
        payload_sha256=hashlib.sha256(env.payload).hexdigest(),
        key_id=env.key_id,
        raw_payload=env.payload,
    )


# --------------------------------------------------------------------------- version floor


def check_version_floor(
    manifest: Manifest,
    floor: int | None,
    floor_payload_sha256: str | None,
    installed_versions: Mapping[int, str] | None = None,
    *,
    checks: list[str] | None = None,
) -> None:
    """Refuse rollback and same-version-different-content, against the catalog's record.

    ``floor`` is the highest version ever accepted for this model_id (None: never
    seen) and ``floor_payload_sha256`` the payload hash accepted for it; the catalog
    records both together, so a floor without its hash is a caller bug (ValueError).
    ``installed_versions`` maps each installed version to its payload hash.

    * a version that is installed with a different payload hash: version-content-mismatch
      (checked first, whatever the floor);
    * version > floor: accepted;
    * version == floor: accepted only with the same payload hash;
    * version < floor: rollback, unless that exact (version, payload hash) is already
      installed: re-pulling what is already on disk is not a downgrade attack.
    """
    installed = installed_versions or {}
    version, digest = manifest.version, manifest.payload_sha256
    fields = {"model_id": manifest.model_id, "version": version}
    if floor is not None and floor_payload_sha256 is None:
        raise ValueError("a version floor needs the payload sha256 accepted with it")
    known = installed.get(version)
    if known is not None and known != digest:
        raise _distrust(
            "version-content-mismatch",
            f"version {version} of {manifest.model_id!r} is installed with different content",
            **fields,
        )
    if floor is None:
        _note(checks, f"first version seen for {manifest.model_id!r}: {version}")
        return
    if version > floor:
        _note(checks, f"version {version} is above the accepted floor {floor}")
        return
    if version == floor:
        if digest != floor_payload_sha256:
            raise _distrust(
                "version-content-mismatch",
                f"version {version} of {manifest.model_id!r} was accepted before with different content",
                **fields,
            )
        _note(checks, f"version {version} is the accepted floor, same content")
        return
    if known == digest:
        _note(checks, f"version {version} is below the floor {floor} but already installed with this content")
        return
    raise _distrust(
        "rollback",
        f"version {version} of {manifest.model_id!r} is older than the accepted version {floor} (rollback)",
        floor=floor,
        **fields,
    )
