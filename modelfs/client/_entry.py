"""One cached model file: :class:`ModelCacheEntry`, with llamadart's JSON field names.

llamadart's ``ModelCacheEntry`` serialises as ``source_canonical_key``, ``cache_key``,
``file_name``, ``file_path``, ``bytes``, ``sha256``, ``etag``, ``last_modified``,
``created_at``, ``updated_at``, ``expires_at`` (times as ISO 8601 strings, UTC). This
module writes exactly those, plus, beyond llamadart, ``mmproj`` (the companion file's
entry), ``card`` (the store's metadata card: licence, quantization, runtime
parameters...), ``name`` (the shared store's model name) and ``owner`` (``app`` when
the caller owns it, else ``granted`` or ``shared``). A reader that knows only
llamadart's fields ignores the others; one that knows ours maps the daemon's
``/v1/entries`` answers one to one.

``source_canonical_key`` holds a source's ``metadata_source_key``: never a secret.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any

from modelfs_store.errors import UsageError

LLAMADART_FIELDS = ("source_canonical_key", "cache_key", "file_name", "file_path", "bytes", "sha256", "etag",
                    "last_modified", "created_at", "updated_at", "expires_at")


def iso(t: float | None) -> str | None:
    """Unix time -> llamadart's ISO 8601 (UTC, microseconds, ``Z``)."""
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unix(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise UsageError(f"not a time: {str(value)[:40]!r}")


@dataclass(frozen=True)
class ModelCacheEntry:
    source_canonical_key: str
    cache_key: str
    file_name: str
    file_path: str
    bytes: int
    sha256: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    expires_at: float | None = None
    mmproj: ModelCacheEntry | None = None
    card: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    owner: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source_canonical_key": self.source_canonical_key, "cache_key": self.cache_key,
            "file_name": self.file_name, "file_path": self.file_path, "bytes": self.bytes, "sha256": self.sha256,
            "etag": self.etag, "last_modified": self.last_modified, "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at), "expires_at": iso(self.expires_at),
            "mmproj": self.mmproj.to_json() if self.mmproj is not None else None, "card": self.card}
        if self.name is not None:
            out["name"] = self.name
        if self.owner is not None:
            out["owner"] = self.owner
        return out

    @classmethod
    def from_json(cls, doc: Any) -> ModelCacheEntry:
        if not isinstance(doc, dict):
            raise UsageError("a cache entry is a JSON object")
        try:
            mm = doc.get("mmproj")
            return cls(str(doc["source_canonical_key"]), str(doc["cache_key"]), str(doc["file_name"]),
                       str(doc["file_path"]), int(doc["bytes"]), doc.get("sha256"), doc.get("etag"),
                       doc.get("last_modified"), unix(doc.get("created_at")), unix(doc.get("updated_at")),
                       unix(doc.get("expires_at")), cls.from_json(mm) if mm else None,
                       dict(doc.get("card") or {}), doc.get("name"), doc.get("owner"))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"a cache entry lacks or mistypes a field ({exc})") from None

    def touched(self, now: float) -> ModelCacheEntry:
        return replace(self, updated_at=now)
