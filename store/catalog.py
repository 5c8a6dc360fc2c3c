"""The catalog: every SQL statement of the project lives in this module.

SQLite in WAL mode with ``synchronous=FULL`` (activation records must survive power
loss), reached through sqlite-utils. The schema is written once, below, with a comment
on every column; it grows only through the numbered ``MIGRATIONS`` list, and
``PRAGMA user_version`` records how far a database has come.

Writes happen in short ``BEGIN IMMEDIATE`` transactions (:meth:`Catalog.txn`). The
mount watches ``PRAGMA data_version`` to notice writes made by other processes.

The catalog never stores secrets: callers hand it redacted URLs only
(``store.redact``). It never touches blob files.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import Conflict, NotFound, StoreError, UsageError
from .redact import redact_text, redact_url

if TYPE_CHECKING:
    import sqlite_utils

ROLES = ("weights", "mmproj", "shard", "aux")


class Action(enum.StrEnum):
    """What an audit row records; the ``action`` column holds the value."""
    IMPORT = "import"            # an imported version, or an import of bytes already present
    ADOPT = "adopt"              # a version taken from another tool's cache (modelfs adopt)
    PULL = "pull"                # an unsigned pull; a failed signed pull
    ACCEPT = "accept"            # a signed pack passed every check and was installed
    REFUSE = "refuse"            # a signed pack refused (signature, floor, content)
    ACTIVATE = "activate"        # a version made active
    ROLLBACK = "rollback"        # back to the last-good version
    RM = "rm"                    # a model or version removed
    PRUNE = "prune"              # versions removed by prune
    VERIFY = "verify"            # a blob failed re-verification
    GRANT = "grant"              # an app may see a model
    REVOKE = "revoke"            # a grant taken back
    KEY_ADD = "key-add"          # a publisher key trusted
    KEY_REVOKE = "key-revoke"    # a publisher key revoked
    CHANNEL_ADD = "channel-add"  # a trusted channel added
    APP_ADD = "app-add"          # an app registered (or its executables or uid changed)
    APP_RM = "app-rm"            # an app and its grants removed
    VISIBILITY = "visibility"    # a model made private or shared
    SETTING = "setting"          # a setting changed (modelfs config set, the control socket)
    JOB = "job"                  # a pull job of the daemon created, paused, resumed or cancelled
    DENY = "deny"                # a control-socket call refused (403): who asked for what, and why
    LOAD = "load"                # an app reported loading a version (ok or failed): rollout supervision
    GOOD = "good"                # a candidate version marked good (by successful loads or `mark-good`)


Outcome = Literal["ok", "refused", "failed"]

# Each entry moves a database from version i to i+1. Never edit a released entry:
# append a new one, and extend tests/test_catalog.py's upgrade test.
MIGRATIONS: list[str] = [
    # 1: the foundation
    """
CREATE TABLE models (
    name              TEXT PRIMARY KEY,  -- logical model name [A-Za-z0-9._-]; the mount's top-level directory
    active_version    INTEGER,           -- version shown at /<name>/; NULL while none is active
    last_good_version INTEGER,           -- version active before the current one; where rollback goes
    owner_app         TEXT,              -- app that first brought the model in; NULL when the admin did
    visibility        TEXT NOT NULL DEFAULT 'shared',  -- 'shared': every app sees it; 'private': owner and grantees
    created_at        REAL NOT NULL,     -- unix time the name was first recorded
    last_used_at      REAL               -- unix time of the last open through the mount or client API
);
CREATE TABLE versions (
    model          TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,  -- owning logical model
    version        INTEGER NOT NULL,     -- positive; monotonic per model (manifest version, or import counter)
    state          TEXT NOT NULL,        -- 'partial' (files not all recorded yet) or 'installed'
    signed         INTEGER NOT NULL DEFAULT 0,  -- 1 when from a verified signed manifest; 0 for import, URL, hf://
    key_id         TEXT,                 -- key that signed the manifest; NULL when unsigned
    payload_sha256 TEXT,                 -- SHA-256 of the raw signed payload; NULL when unsigned
    manifest       TEXT,                 -- the raw signed payload (JSON) for audit and re-verification
    source         TEXT,                 -- where it came from, redacted (scheme://host/path, hf://org/repo, import:X)
    license        TEXT,                 -- licence identifier or text as given by the publisher
    source_url     TEXT,                 -- upstream project page, redacted
    family         TEXT,                 -- model family (manifest 'family', else GGUF architecture)
    architecture   TEXT,                 -- GGUF general.architecture of the weights
    quantization   TEXT,                 -- label such as Q4_K_M, from GGUF general.file_type
    context_length INTEGER,              -- <arch>.context_length from GGUF, or manifest context_len
    min_device     TEXT,                 -- manifest min_device, free text
    compat_notes   TEXT,                 -- compatibility notes, free text
    runtime_params TEXT,                 -- JSON object of recommended runtime parameters
    expires        TEXT,                 -- manifest expiry (ISO-8601 UTC); NULL when unsigned
    created_at     REAL NOT NULL,        -- unix time the version was first recorded
    installed_at   REAL,                 -- unix time every file of the version was recorded
    PRIMARY KEY (model, version)
);
CREATE TABLE files (
    model         TEXT NOT NULL,         -- logical model
    version       INTEGER NOT NULL,      -- version the file belongs to
    filename      TEXT NOT NULL,         -- path inside the model directory: safe components joined by '/'
    role          TEXT NOT NULL,         -- 'weights', 'mmproj', 'shard' or 'aux'
    size          INTEGER NOT NULL,      -- exact size in bytes, known before any byte is local
    sha256        TEXT NOT NULL,         -- content hash; names the blob holding the bytes
    url           TEXT,                  -- where the bytes can be fetched, redacted; NULL for imports
    etag          TEXT,                  -- ETag the origin gave for the bytes
    last_modified TEXT,                  -- Last-Modified the origin gave for the bytes
    chunk_size    INTEGER,               -- bytes per chunk hash; NULL when there are none
    chunks        TEXT,                  -- JSON list of per-chunk SHA-256 hex digests, or NULL
    PRIMARY KEY (model, version, filename),
    FOREIGN KEY (model, version) REFERENCES versions(model, version) ON DELETE CASCADE
);
CREATE INDEX files_by_sha256 ON files(sha256);
CREATE TABLE apps (
    app_id     TEXT PRIMARY KEY,         -- stable app identifier, e.g. 'org.example.chat'
    uid        INTEGER,                  -- unix uid the app runs as; NULL when not bound to a uid
    created_at REAL NOT NULL             -- unix time the app was registered
);
CREATE TABLE grants (
    app_id     TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,    -- app given access
    model      TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,    -- model it may see
    granted_at REAL NOT NULL,            -- unix time of the grant
    PRIMARY KEY (app_id, model)
);
CREATE TABLE pins (
    model     TEXT PRIMARY KEY REFERENCES models(name) ON DELETE CASCADE,  -- pinned model: prune keeps it
    pinned_at REAL NOT NULL,             -- unix time of the pin
    reason    TEXT                       -- why, as the admin said
);
CREATE TABLE keys (
    key_id     TEXT PRIMARY KEY,         -- identifier publishers put in the envelope's key_id
    public_key TEXT NOT NULL,            -- base64 of the raw 32-byte Ed25519 public key
    source     TEXT NOT NULL,            -- 'user' (added with the CLI); system keys are read from disk
    added_at   REAL NOT NULL,            -- unix time the key was trusted
    revoked_at REAL                      -- unix time of revocation; a revoked key verifies nothing
);
CREATE TABLE version_floors (
    model_id       TEXT PRIMARY KEY,     -- manifest model_id
    version        INTEGER NOT NULL,     -- highest version ever accepted; lower ones are rollbacks
    payload_sha256 TEXT NOT NULL,        -- payload hash of that version; same version, other bytes is refused
    updated_at     REAL NOT NULL         -- unix time the floor last moved
);
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,  -- order of events
    ts      REAL NOT NULL,               -- unix time of the event
    actor   TEXT NOT NULL,               -- who: 'cli:<user>', 'daemon', an app id
    action  TEXT NOT NULL,               -- 'import', 'pull', 'accept', 'refuse', 'activate', 'rollback', 'rm', ...
    model   TEXT,                        -- model concerned, when there is one
    version INTEGER,                     -- version concerned, when there is one
    outcome TEXT NOT NULL,               -- 'ok' or 'refused' or 'failed'
    reason  TEXT,                        -- one-line reason, redacted
    detail  TEXT                         -- JSON with structured fields, redacted
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
""",
    # 2: trusted channels (signed-pack feeds), added for `modelfs update`
    """
CREATE TABLE channels (
    url          TEXT PRIMARY KEY,       -- manifest URL, redacted form is the URL itself (no secrets allowed)
    key_ids      TEXT NOT NULL,          -- JSON list of key_ids allowed to sign what this channel serves
    last_checked REAL,                   -- unix time of the last fetch attempt
    last_result  TEXT                    -- one-line outcome of that attempt
);
""",
    # 3: per-app visibility: who owns a private model, executables that identify an app,
    #    grants bound to a uid (DESIGN §4). Grants made before bind to the store owner.
    """
ALTER TABLE models ADD COLUMN owner_uid INTEGER;  -- uid that owns the model with owner_app; NULL: the store owner
CREATE TABLE app_exes (
    app_id   TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,  -- app the executable identifies
    path     TEXT NOT NULL,              -- absolute path as registered; shown only (dev and ino identify)
    dev      INTEGER NOT NULL,           -- st_dev of the file when it was registered
    ino      INTEGER NOT NULL,           -- st_ino of the file when it was registered
    added_at REAL NOT NULL,              -- unix time of registration
    PRIMARY KEY (app_id, path)
);
CREATE TABLE grants_v3 (
    app_id     TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,  -- app given access
    model      TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE,  -- model it may see
    uid        INTEGER,                  -- uid the app must run as; NULL: the store owner's
    any_uid    INTEGER NOT NULL DEFAULT 0,  -- 1: any uid (--any-uid; advisory: any uid can claim an app id)
    granted_at REAL NOT NULL             -- unix time of the grant
);
INSERT INTO grants_v3 (app_id, model, uid, any_uid, granted_at) SELECT app_id, model, NULL, 0, granted_at FROM grants;
DROP TABLE grants;
ALTER TABLE grants_v3 RENAME TO grants;
CREATE UNIQUE INDEX grants_unique ON grants(app_id, model, IFNULL(uid, -1), any_uid);
""",
    # 4: the daemon owns the work: settings (modelfs config) and pull jobs that outlive
    #    the client that started them and the daemon that ran them.
    """
CREATE TABLE settings (
    key        TEXT PRIMARY KEY,         -- dotted name known to store/settings.py, e.g. 'apps.pull'
    value      TEXT NOT NULL,            -- the value as JSON; a key without a row has its default
    updated_at REAL NOT NULL             -- unix time it was last set
);
CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- job number, never reused
    state       TEXT NOT NULL,           -- queued, running, paused, needs_credentials, done, failed, cancelled
    source      TEXT NOT NULL,           -- what to pull, redacted (a URL with a secret keeps none of it)
    options     TEXT NOT NULL,           -- JSON of the pull options (names, hashes, flags; never a secret)
    uid         INTEGER NOT NULL,        -- uid of the caller that created it (the socket's peer credentials)
    app_id      TEXT,                    -- app id of that caller; NULL: it had none
    secret      INTEGER NOT NULL DEFAULT 0,  -- 1: it needs a credential the catalog never keeps (token, signed URL)
    model       TEXT,                    -- model it pulled into, once known
    bytes_done  INTEGER NOT NULL DEFAULT 0,  -- bytes received or present at its last state change
    bytes_total INTEGER,                 -- bytes of the whole pull, when known
    reason      TEXT,                    -- why it is in its state (a failure, a pause, a missing token), redacted
    exit_code   INTEGER,                 -- what `modelfs pull` exits with for its outcome (0: done)
    result      TEXT,                    -- JSON result of a done job, as `modelfs pull --json` prints it
    created_at  REAL NOT NULL,           -- unix time it was created
    updated_at  REAL NOT NULL,           -- unix time of its last state change
    finished_at REAL                     -- unix time it became done, failed or cancelled
);
CREATE INDEX jobs_by_state ON jobs(state);
""",
    # 5: rollout supervision: a version activated by a channel update (or pull --candidate)
    #    is on probation until apps' loads or the admin mark it good; failed loads roll it back.
    """
ALTER TABLE models ADD COLUMN candidate_since REAL;  -- unix time the active version became a candidate; NULL: not one
CREATE TABLE loads (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,  -- order of reports
    model   TEXT NOT NULL,               -- model the caller loaded
    version INTEGER NOT NULL,            -- version it loaded
    ok      INTEGER NOT NULL,            -- 1: the load worked; 0: it failed
    ts      REAL NOT NULL,               -- unix time of the report
    uid     INTEGER,                     -- uid of the reporter (the socket's peer); NULL: recorded in-process
    app_id  TEXT,                        -- app id of the reporter; NULL: it had none
    FOREIGN KEY (model, version) REFERENCES versions(model, version) ON DELETE CASCADE
);
CREATE INDEX loads_by_version ON loads(model, version, ts);
""",
    # 6: the card says whether the weights carry a chat template (the boolean only: a
    #    template can be tens of KiB, and the file itself holds it).
    """
ALTER TABLE versions ADD COLUMN chat_template INTEGER;  -- 1: weights have tokenizer.chat_template; 0: not; NULL: unread
""",
    # 7: where on the Hugging Face hub a version's files came from (a repo pull, an adopted
    #    hub cache), so the mount's hub view can lay them out as the hub cache does.
    """
ALTER TABLE versions ADD COLUMN hub_repo TEXT;    -- hub repository 'org/name' of the files; NULL: not from the hub
ALTER TABLE versions ADD COLUMN hub_commit TEXT;  -- commit (40 hex) the files were pinned to; NULL: unknown
ALTER TABLE files ADD COLUMN hub_path TEXT;       -- the file's path inside hub_repo; NULL: not from the hub
""",
]

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class FileRecord:
    filename: str
    role: str
    size: int
    sha256: str
    url: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    chunk_size: int | None = None
    chunks: list[str] | None = None
    hub_path: str | None = None   # path inside the version's hub_repo, when it came from the hub

    def row(self, model: str, version: int) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["url"] = redact_url(self.url) if self.url else None  # callers redact; the catalog makes sure
        d["chunks"] = json.dumps(self.chunks) if self.chunks is not None else None
        return {"model": model, "version": version, **d}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> FileRecord:
        chunks = json.loads(row["chunks"]) if row.get("chunks") else None
        return cls(row["filename"], row["role"], row["size"], row["sha256"], row["url"],
                   row["etag"], row["last_modified"], row["chunk_size"], chunks, row.get("hub_path"))


@dataclass(frozen=True)
class VersionRecord:
    model: str
    version: int
    state: str
    signed: bool
    card: dict[str, Any]
    files: tuple[FileRecord, ...] = field(default=())


@dataclass(frozen=True)
class ModelRecord:
    name: str
    active_version: int | None
    last_good_version: int | None
    owner_app: str | None
    visibility: str
    created_at: float
    last_used_at: float | None
    owner_uid: int | None = None   # with owner_app, who owns a private model; None: the store owner
    candidate_since: float | None = None  # the active version is a candidate (on probation) since then


CARD_FIELDS = ("key_id", "payload_sha256", "source", "license", "source_url", "family",
               "architecture", "quantization", "context_length", "chat_template", "min_device", "compat_notes",
               "runtime_params", "expires", "hub_repo", "hub_commit")


def _card_of_row(row: dict[str, Any]) -> dict[str, Any]:
    """A version row's card fields, in their Python types (JSON, booleans)."""
    card = {k: row[k] for k in CARD_FIELDS}
    if card["runtime_params"]:
        card["runtime_params"] = json.loads(card["runtime_params"])
    if card["chat_template"] is not None:
        card["chat_template"] = bool(card["chat_template"])
    card["created_at"] = row["created_at"]
    card["installed_at"] = row["installed_at"]
    return card


def _redacted_card(card: dict[str, Any]) -> dict[str, Any]:
    """Every free-text field of a card through the one redactor, before it is stored:
    a licence or a note may quote a signed URL or a token."""
    out = dict(card)
    for key, value in card.items():
        if key == "source_url" and isinstance(value, str):
            out[key] = redact_url(value)
        elif isinstance(value, str):
            out[key] = redact_text(value)
        elif key == "runtime_params" and isinstance(value, dict):
            out[key] = {k: redact_text(v) if isinstance(v, str) else v for k, v in value.items()}
    return out


def _model(row: dict[str, Any]) -> ModelRecord:
    return ModelRecord(row["name"], row["active_version"], row["last_good_version"],
                       row["owner_app"], row["visibility"], row["created_at"], row["last_used_at"],
                       row.get("owner_uid"), row.get("candidate_since"))


class Catalog:
    """One connection to the catalog. Not shared between threads."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        self.conn = conn
        self._db: sqlite_utils.Database | None = None
        self._migrate()

    @property
    def db(self) -> sqlite_utils.Database:
        # sqlite-utils imports numpy when it can (~250 ms); read-only commands skip it.
        if self._db is None:
            import sqlite_utils
            self._db = sqlite_utils.Database(self.conn)
        return self._db

    def close(self) -> None:
        self.conn.close()

    # -- schema ----------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(f"catalog {self.path} has schema {current}, newer than this modelfs "
                             f"({SCHEMA_VERSION}); upgrade modelfs")
        for number in range(current, SCHEMA_VERSION):
            with self.txn():
                for stmt in _split_sql(MIGRATIONS[number]):
                    self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version={number + 1}")

    @contextmanager
    def txn(self) -> Iterator[None]:
        """A write transaction; the write lock is taken at once so it cannot deadlock."""
        if self.conn.in_transaction:
            yield  # nested: the outer transaction commits
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def integrity_check(self) -> str:
        """SQLite's own check of the database file: 'ok', or the first problem."""
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])

    def data_version(self) -> int:
        """Changes whenever another connection commits; cheap to poll."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    # -- models ----------------------------------------------------------------
    def get_model(self, name: str) -> ModelRecord:
        row = self.conn.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no model named {name!r}", model=name)
        return _model(dict(row))

    def has_model(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone() is not None

    def list_models(self) -> list[ModelRecord]:
        return [_model(dict(r)) for r in self.conn.execute("SELECT * FROM models ORDER BY name")]

    def ensure_model(self, name: str, owner_app: str | None = None, visibility: str = "shared",
                     owner_uid: int | None = None) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO models (name, owner_app, visibility, created_at, owner_uid) VALUES (?, ?, ?, ?, ?)",
            (name, owner_app, visibility, self.clock(), owner_uid))

    def delete_model(self, name: str) -> None:
        with self.txn():
            self.conn.execute("DELETE FROM files WHERE model = ?", (name,))
            self.conn.execute("DELETE FROM versions WHERE model = ?", (name,))
            self.conn.execute("DELETE FROM models WHERE name = ?", (name,))

    def touch(self, name: str) -> None:
        self.conn.execute("UPDATE models SET last_used_at = ? WHERE name = ?", (self.clock(), name))

    # -- versions and files -------------------------------------------------------
    def versions(self, model: str) -> list[VersionRecord]:
        rows = self.conn.execute(
            "SELECT * FROM versions WHERE model = ? ORDER BY version", (model,)).fetchall()
        return [self._version(dict(r)) for r in rows]

    def get_version(self, model: str, version: int) -> VersionRecord:
        row = self.conn.execute("SELECT * FROM versions WHERE model = ? AND version = ?",
                                (model, version)).fetchone()
        if row is None:
            raise NotFound(f"model {model!r} has no version {version}", model=model, version=version)
        return self._version(dict(row))

    def _version(self, row: dict[str, Any]) -> VersionRecord:
        files = tuple(FileRecord.from_row(dict(r)) for r in self.conn.execute(
            "SELECT * FROM files WHERE model = ? AND version = ? ORDER BY filename",
            (row["model"], row["version"])))
        return VersionRecord(row["model"], row["version"], row["state"], bool(row["signed"]), _card_of_row(row),
                             files)

    def snapshot_rows(self) -> tuple[set[str], dict[str, tuple[Any, ...]]]:
        """Pins, and per model its raw rows ``(model_row, version_rows, file_rows)`` as
        plain tuples, from one read transaction (four queries however many models).

        The mount polls this on every catalog change: comparing raw tuples with the
        previous read is cheap, so only changed models are turned into records
        (:meth:`model_from_rows`)."""
        cur = self.conn.cursor()
        cur.row_factory = None
        cur.execute("BEGIN")  # deferred: a consistent read that blocks no writer
        try:
            pinned = {r[0] for r in cur.execute("SELECT model FROM pins").fetchall()}
            models = cur.execute("SELECT * FROM models ORDER BY name").fetchall()
            self._mcols = [d[0] for d in cur.description]
            versions = cur.execute("SELECT * FROM versions ORDER BY model, version").fetchall()
            self._vcols = [d[0] for d in cur.description]
            files = cur.execute("SELECT * FROM files ORDER BY model, version, filename").fetchall()
            self._fcols = [d[0] for d in cur.description]
        finally:
            cur.execute("COMMIT")
        by_model_v: dict[str, list[tuple[Any, ...]]] = {}
        for r in versions:
            by_model_v.setdefault(r[0], []).append(r)  # column 0 of versions is model
        by_model_f: dict[str, list[tuple[Any, ...]]] = {}
        for r in files:
            by_model_f.setdefault(r[0], []).append(r)  # column 0 of files is model
        return pinned, {m[0]: (m, tuple(by_model_v.get(m[0], ())), tuple(by_model_f.get(m[0], ())))
                        for m in models}

    def model_from_rows(self, rows: tuple[Any, ...]) -> tuple[ModelRecord, list[VersionRecord]]:
        """Records from one model's raw rows, as returned by :meth:`snapshot_rows`."""
        mrow, vrows, frows = rows
        m = _model(dict(zip(self._mcols, mrow, strict=True)))
        files: dict[int, list[FileRecord]] = {}
        for r in frows:
            d = dict(zip(self._fcols, r, strict=True))
            files.setdefault(d["version"], []).append(FileRecord.from_row(d))
        out = []
        for r in vrows:
            d = dict(zip(self._vcols, r, strict=True))
            out.append(VersionRecord(d["model"], d["version"], d["state"], bool(d["signed"]), _card_of_row(d),
                                     tuple(files.get(d["version"], ()))))
        return m, out

    def next_version(self, model: str) -> int:
        row = self.conn.execute("SELECT MAX(version) FROM versions WHERE model = ?", (model,)).fetchone()
        return (row[0] or 0) + 1

    def add_version(self, model: str, version: int, files: list[FileRecord], *, signed: bool,
                    state: str = "installed", **card: Any) -> None:
        """Record a version and all its files in one transaction."""
        unknown = set(card) - set(CARD_FIELDS)
        if unknown:
            raise ValueError(f"unknown card fields {sorted(unknown)}")
        card = _redacted_card(card)
        if card.get("runtime_params") is not None:
            card["runtime_params"] = json.dumps(card["runtime_params"], sort_keys=True)
        now = self.clock()
        with self.txn():
            self.ensure_model(model, card.pop("owner_app", None))
            if self.conn.execute("SELECT 1 FROM versions WHERE model = ? AND version = ?",
                                 (model, version)).fetchone():
                raise Conflict(f"model {model!r} already has version {version}", model=model, version=version)
            self.db.table("versions").insert({
                "model": model, "version": version, "state": state, "signed": int(signed),
                "created_at": now, "installed_at": now if state == "installed" else None, **card})
            self.db.table("files").insert_all([f.row(model, version) for f in files])

    def set_version_manifest(self, model: str, version: int, payload: str) -> None:
        """Keep the raw signed payload of a version, for audit and re-verification."""
        self.conn.execute("UPDATE versions SET manifest = ? WHERE model = ? AND version = ?",
                          (payload, model, version))

    def delete_version(self, model: str, version: int) -> None:
        with self.txn():
            self.conn.execute("DELETE FROM files WHERE model = ? AND version = ?", (model, version))
            self.conn.execute("DELETE FROM versions WHERE model = ? AND version = ?", (model, version))

    def all_files(self) -> list[tuple[str, int, FileRecord]]:
        return [(r["model"], r["version"], FileRecord.from_row(dict(r)))
                for r in self.conn.execute("SELECT * FROM files ORDER BY model, version, filename")]

    def largest_version_bytes(self) -> int:
        """The size of the largest version of any model (the sum of its files), 0 when none."""
        row = self.conn.execute("SELECT MAX(total) FROM (SELECT SUM(size) AS total FROM files "
                                "GROUP BY model, version)").fetchone()
        return int(row[0] or 0)

    def referenced_shas(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT DISTINCT sha256 FROM files")}

    def card_gaps(self, sha256: str) -> bool:
        """Whether a version whose weights are ``sha256`` lacks an architecture, a
        quantization, a context length or the chat template's presence on its card."""
        return self.conn.execute(
            "SELECT 1 FROM versions v JOIN files f ON f.model = v.model AND f.version = v.version "
            "WHERE f.sha256 = ? AND f.role = 'weights' AND (v.architecture IS NULL OR v.quantization IS NULL "
            "OR v.context_length IS NULL OR v.chat_template IS NULL) LIMIT 1", (sha256,)).fetchone() is not None

    def fill_card(self, sha256: str, *, architecture: str | None, quantization: str | None,
                  context_length: int | None, chat_template: bool | None) -> None:
        """Fill the card fields that are still empty on every version whose weights are
        ``sha256`` (what the signed payload did not give, from the GGUF header); a
        field that has a value keeps it."""
        card = _redacted_card({"architecture": architecture, "quantization": quantization})
        self.conn.execute(
            "UPDATE versions SET architecture = COALESCE(architecture, ?), quantization = COALESCE(quantization, ?), "
            "context_length = COALESCE(context_length, ?), chat_template = COALESCE(chat_template, ?) "
            "WHERE (model, version) IN (SELECT model, version FROM files WHERE sha256 = ? AND role = 'weights')",
            (card["architecture"], card["quantization"], context_length,
             None if chat_template is None else int(chat_template), sha256))

    def set_validators(self, sha256: str, etag: str | None, last_modified: str | None) -> None:
        self.conn.execute("UPDATE files SET etag = ?, last_modified = ? WHERE sha256 = ?",
                          (etag, last_modified, sha256))

    # -- activation ------------------------------------------------------------
    def activate(self, model: str, version: int, *, actor: str, reason: str | None = None,
                 candidate: bool = False) -> int | None:
        """Make ``version`` active in one durable transaction; returns the previous active one.

        Last-good is the version to go back to: the one that was active until now (it
        was serving), unless that one was still a candidate that never proved good, in
        which case last-good stays where it was. ``candidate`` puts the new version on
        probation (rollout supervision). Activating the active version changes nothing,
        last-good included."""
        with self.txn():
            m = self.get_model(model)
            v = self.get_version(model, version)
            if v.state != "installed":
                raise Conflict(f"version {version} of {model!r} is not fully installed ({v.state})",
                               model=model, version=version)
            if m.active_version == version:
                return m.active_version
            proven = m.active_version is not None and m.candidate_since is None
            last_good = m.active_version if proven else m.last_good_version
            self.conn.execute("UPDATE models SET active_version = ?, last_good_version = ?, candidate_since = ? "
                              "WHERE name = ?", (version, last_good, self.clock() if candidate else None, model))
            detail: dict[str, Any] = {"previous": m.active_version}
            if candidate:
                detail["candidate"] = True
            self.audit(actor, Action.ACTIVATE, model=model, version=version, reason=reason, detail=detail)
            return m.active_version

    def rollback(self, model: str, *, actor: str, reason: str | None = None,
                 detail: dict[str, Any] | None = None) -> int:
        """Make last-good active again, in one durable transaction. The version rolled
        back from is not last-good afterwards (it is the one that failed), so there is
        none until the next activation: a second rollback is refused, never a toggle."""
        with self.txn():
            m = self.get_model(model)
            if m.last_good_version is None:
                raise Conflict(f"model {model!r} has no last-good version to roll back to", model=model)
            target = m.last_good_version
            self.get_version(model, target)
            self.conn.execute("UPDATE models SET active_version = ?, last_good_version = NULL, "
                              "candidate_since = NULL WHERE name = ?", (target, model))
            self.audit(actor, Action.ROLLBACK, model=model, version=target, reason=reason,
                       detail={"from": m.active_version, **(detail or {})})
            return target

    # -- rollout supervision -------------------------------------------------------------
    def add_load(self, model: str, version: int, ok: bool, *, uid: int | None, app_id: str | None) -> None:
        """One load reported by an app (``store.rollout``): counted once, as it came."""
        self.conn.execute("INSERT INTO loads (model, version, ok, ts, uid, app_id) VALUES (?, ?, ?, ?, ?, ?)",
                          (model, version, int(ok), self.clock(), uid, app_id))

    def load_counts(self, model: str, version: int, start: float, end: float) -> tuple[int, int]:
        """(successful, failed) loads of a version reported in [start, end)."""
        row = self.conn.execute("SELECT COALESCE(SUM(ok), 0), COUNT(*) - COALESCE(SUM(ok), 0) FROM loads "
                                "WHERE model = ? AND version = ? AND ts >= ? AND ts < ?",
                                (model, version, start, end)).fetchone()
        return int(row[0]), int(row[1])

    def mark_good(self, model: str, *, actor: str, reason: str, detail: dict[str, Any] | None = None) -> int:
        """End the probation of the active version: it is good (a later activation makes
        it last-good). Returns that version; Conflict when it is not a candidate."""
        with self.txn():
            m = self.get_model(model)
            if m.candidate_since is None or m.active_version is None:
                raise Conflict(f"model {model!r} has no candidate version (its active version is not on "
                               "probation)", model=model, reason="not-candidate")
            self.conn.execute("UPDATE models SET candidate_since = NULL WHERE name = ?", (model,))
            self.audit(actor, Action.GOOD, model=model, version=m.active_version, reason=reason, detail=detail)
            return m.active_version

    def rollbacks(self, actor: str, limit: int = 20) -> list[dict[str, Any]]:
        """The last rollbacks ``actor`` made (the supervisor's, for ``status``), newest first."""
        rows = self.conn.execute("SELECT * FROM audit WHERE action = ? AND actor = ? ORDER BY id DESC LIMIT ?",
                                 (Action.ROLLBACK.value, actor, limit))
        return [dict(r) for r in rows]

    # -- apps, grants, pins ---------------------------------------------------------
    def pin(self, model: str, reason: str | None = None) -> None:
        self.get_model(model)
        self.conn.execute("INSERT OR REPLACE INTO pins (model, pinned_at, reason) VALUES (?, ?, ?)",
                          (model, self.clock(), reason))

    def unpin(self, model: str) -> bool:
        return self.conn.execute("DELETE FROM pins WHERE model = ?", (model,)).rowcount > 0

    def pinned(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT model FROM pins")}

    def add_app(self, app_id: str, uid: int | None, exes: Sequence[tuple[str, int, int]] = (), *,
                actor: str = "catalog") -> None:
        """Register ``app_id`` (or update it): its uid, and executables (path, dev, ino)
        that identify it, added to those it had."""
        with self.txn():
            self.conn.execute("INSERT INTO apps (app_id, uid, created_at) VALUES (?, ?, ?) "
                              "ON CONFLICT(app_id) DO UPDATE SET uid = COALESCE(excluded.uid, apps.uid)",
                              (app_id, uid, self.clock()))
            for path, dev, ino in exes:
                self.conn.execute("INSERT OR REPLACE INTO app_exes (app_id, path, dev, ino, added_at) "
                                  "VALUES (?, ?, ?, ?, ?)", (app_id, path, dev, ino, self.clock()))
            self.audit(actor, Action.APP_ADD, detail={"app": app_id, "uid": uid, "exes": [e[0] for e in exes]})

    def remove_app(self, app_id: str, *, actor: str) -> bool:
        with self.txn():
            gone = self.conn.execute("DELETE FROM apps WHERE app_id = ?", (app_id,)).rowcount > 0
            if gone:
                self.audit(actor, Action.APP_RM, detail={"app": app_id})
        return gone

    def apps(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM apps ORDER BY app_id")]

    def app_exes(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM app_exes ORDER BY app_id, path")]

    def grant(self, app_id: str, model: str, *, uid: int | None = None, any_uid: bool = False,
              actor: str) -> bool:
        """Let ``app_id`` running as ``uid`` (None: the store owner; ``any_uid``: any)
        see ``model``. Returns False when that grant existed already."""
        with self.txn():
            self.get_model(model)
            if not self.conn.execute("SELECT 1 FROM apps WHERE app_id = ?", (app_id,)).fetchone():
                raise NotFound(f"no app named {app_id!r}", app=app_id)
            uid = None if any_uid else uid
            new = self.conn.execute("INSERT OR IGNORE INTO grants (app_id, model, uid, any_uid, granted_at) "
                                    "VALUES (?, ?, ?, ?, ?)", (app_id, model, uid, int(any_uid), self.clock())
                                    ).rowcount > 0
            if new:
                self.audit(actor, Action.GRANT, model=model, detail={"app": app_id, "uid": uid, "any_uid": any_uid})
        return new

    def revoke(self, app_id: str, model: str, *, uid: int | None = None, any_uid: bool = False,
               actor: str) -> bool:
        with self.txn():
            uid = None if any_uid else uid
            gone = self.conn.execute("DELETE FROM grants WHERE app_id = ? AND model = ? AND uid IS ? AND any_uid = ?",
                                     (app_id, model, uid, int(any_uid))).rowcount > 0
            if gone:
                self.audit(actor, Action.REVOKE, model=model, detail={"app": app_id, "uid": uid, "any_uid": any_uid})
        return gone

    def grants(self) -> list[dict[str, Any]]:
        return [{**dict(r), "any_uid": bool(r["any_uid"])} for r in
                self.conn.execute("SELECT * FROM grants ORDER BY app_id, model, IFNULL(uid, -1), any_uid")]

    def set_visibility(self, model: str, visibility: str, *, owner_app: str | None = None,
                       owner_uid: int | None = None, actor: str) -> None:
        """Make ``model`` 'private' or 'shared'; ``owner_app`` and ``owner_uid`` (when
        given) become its owner."""
        if visibility not in ("shared", "private"):
            raise UsageError(f"visibility is 'shared' or 'private', not {visibility!r}")
        with self.txn():
            m = self.get_model(model)
            app = owner_app if owner_app is not None else m.owner_app
            uid = owner_uid if owner_uid is not None else m.owner_uid
            self.conn.execute("UPDATE models SET visibility = ?, owner_app = ?, owner_uid = ? WHERE name = ?",
                              (visibility, app, uid, model))
            detail: dict[str, Any] = {"from": m.visibility, "to": visibility, "owner_app": app}
            if uid is not None:
                detail["owner_uid"] = uid
            self.audit(actor, Action.VISIBILITY, model=model, detail=detail)

    def owned_bytes(self, owner_app: str | None, owner_uid: int | None) -> int:
        """Bytes of the distinct blobs of every version of the models owned by
        (``owner_app``, ``owner_uid``): what an app's quota counts."""
        row = self.conn.execute(
            "SELECT SUM(size) FROM (SELECT DISTINCT f.sha256, f.size FROM files f JOIN models m ON m.name = f.model "
            "WHERE m.owner_app IS ? AND m.owner_uid IS ?)", (owner_app, owner_uid)).fetchone()
        return int(row[0] or 0)

    # -- keys and version floors --------------------------------------------------------
    def add_key(self, key_id: str, public_key_b64: str) -> None:
        row = self.conn.execute("SELECT public_key, revoked_at FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is not None:
            if row["revoked_at"] is not None:
                raise Conflict(f"key {key_id!r} was revoked; a revoked key_id cannot be trusted again", key_id=key_id)
            if row["public_key"] != public_key_b64:
                raise Conflict(f"key_id {key_id!r} is already trusted with a different key", key_id=key_id)
            return
        self.conn.execute("INSERT INTO keys (key_id, public_key, source, added_at) VALUES (?, ?, 'user', ?)",
                          (key_id, public_key_b64, self.clock()))

    def revoke_key(self, key_id: str) -> None:
        if self.conn.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone() is None:
            raise NotFound(f"no key with key_id {key_id!r}", key_id=key_id)
        self.conn.execute("UPDATE keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?",
                          (self.clock(), key_id))

    def record_revoked_key(self, key_id: str, public_key_b64: str) -> None:
        """Revoke a key that was trusted from the system directory, not the catalog."""
        self.conn.execute("INSERT INTO keys (key_id, public_key, source, added_at, revoked_at) "
                          "VALUES (?, ?, 'system', ?, ?) ON CONFLICT(key_id) DO UPDATE SET "
                          "revoked_at = COALESCE(keys.revoked_at, excluded.revoked_at)",
                          (key_id, public_key_b64, self.clock(), self.clock()))

    def key_rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM keys ORDER BY key_id")]

    def version_floor(self, model_id: str) -> tuple[int, str] | None:
        row = self.conn.execute("SELECT version, payload_sha256 FROM version_floors WHERE model_id = ?",
                                (model_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def raise_floor(self, model_id: str, version: int, payload_sha256: str) -> None:
        self.conn.execute(
            "INSERT INTO version_floors (model_id, version, payload_sha256, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(model_id) DO UPDATE SET version = excluded.version, "
            "payload_sha256 = excluded.payload_sha256, updated_at = excluded.updated_at "
            "WHERE excluded.version > version_floors.version",
            (model_id, version, payload_sha256, self.clock()))

    # -- channels ----------------------------------------------------------------------
    def add_channel(self, url: str, key_ids: list[str]) -> None:
        self.conn.execute("INSERT INTO channels (url, key_ids) VALUES (?, ?) "
                          "ON CONFLICT(url) DO UPDATE SET key_ids = excluded.key_ids",
                          (url, json.dumps(sorted(key_ids))))

    def channel_keys(self, url: str) -> list[str] | None:
        """The key ids ``url`` allows, or None when it is not a channel."""
        row = self.conn.execute("SELECT key_ids FROM channels WHERE url = ?", (url,)).fetchone()
        return None if row is None else list(json.loads(row[0]))

    def channels(self) -> list[dict[str, Any]]:
        out = []
        for r in self.conn.execute("SELECT * FROM channels ORDER BY url"):
            d = dict(r)
            d["key_ids"] = json.loads(d["key_ids"])
            out.append(d)
        return out

    def channel_checked(self, url: str, result: str) -> None:
        self.conn.execute("UPDATE channels SET last_checked = ?, last_result = ? WHERE url = ?",
                          (self.clock(), result, url))

    # -- settings and jobs ---------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Every setting that was set (key -> value); the others have their defaults."""
        return {r[0]: json.loads(r[1]) for r in self.conn.execute("SELECT key, value FROM settings ORDER BY key")}

    def set_setting(self, key: str, value: Any, *, actor: str) -> None:
        """Set ``key`` (already validated by ``store.settings``), audited; None restores the default."""
        with self.txn():
            old = self.settings().get(key)
            if value is None:
                self.conn.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                self.conn.execute("INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(key) "
                                  "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                                  (key, json.dumps(value), self.clock()))
            self.audit(actor, Action.SETTING, detail={"key": key, "from": old, "to": value})

    def add_job(self, source: str, options: dict[str, Any], *, uid: int, app_id: str | None, secret: bool,
                state: str) -> int:
        """A new pull job; ``source`` and ``options`` hold no secret (redacted here again)."""
        now = self.clock()
        cur = self.conn.execute(
            "INSERT INTO jobs (state, source, options, uid, app_id, secret, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (state, redact_url(source), json.dumps(options, sort_keys=True), uid, app_id, int(secret), now, now))
        return int(cur.lastrowid or 0)

    JOB_FIELDS = frozenset({"state", "model", "bytes_done", "bytes_total", "reason", "exit_code", "result",
                            "finished_at"})

    def update_job(self, job_id: int, **fields: Any) -> None:
        """Record a job's new state (and what goes with it); ``result`` is stored as JSON."""
        unknown = set(fields) - self.JOB_FIELDS
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        if fields.get("reason") is not None:
            fields["reason"] = redact_text(str(fields["reason"]))
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"], sort_keys=True)
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(f"UPDATE jobs SET {cols}, updated_at = ? WHERE id = ?",  # noqa: S608 - names checked
                          (*fields.values(), self.clock(), job_id))

    def jobs(self, states: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Jobs, oldest first (only those in ``states`` when given), options and result decoded."""
        rows = self.conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        out = []
        for r in rows:
            if states is None or r["state"] in states:
                d = dict(r)
                d["options"] = json.loads(d["options"])
                d["result"] = json.loads(d["result"]) if d["result"] else None
                d["secret"] = bool(d["secret"])
                out.append(d)
        return out

    # -- audit -------------------------------------------------------------------------
    def audit(self, actor: str, action: Action, *, model: str | None = None, version: int | None = None,
              outcome: Outcome = "ok", reason: str | None = None, detail: dict[str, Any] | None = None) -> None:
        """Append one event; the only way a row reaches the audit log."""
        action = Action(action)  # a free string that is not an action is a bug
        if outcome not in ("ok", "refused", "failed"):
            raise ValueError(f"unknown audit outcome {outcome!r}")
        self.conn.execute(
            "INSERT INTO audit (ts, actor, action, model, version, outcome, reason, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (self.clock(), actor, action, model, version, outcome, reason,
             json.dumps(detail, sort_keys=True) if detail else None))

    def audit_log(self, model: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        if model is None:
            rows = self.conn.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self.conn.execute("SELECT * FROM audit WHERE model = ? ORDER BY id DESC LIMIT ?",
                                     (model, limit))
        return [dict(r) for r in rows]


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    out: list[str] = []
    buf: list[str] = []
    for line in script.splitlines():
        buf.append(line)
        candidate = "\n".join(buf)
        if sqlite3.complete_statement(candidate):
            if candidate.strip():
                out.append(candidate.strip())
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        out.append(rest)
    return out
