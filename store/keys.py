"""Ed25519 keys: the publisher's side (generate, store, sign) and the keyring.

This module owns what a key is, how a publisher's private key is kept (a 0600 PEM
file, never overwritten), how an envelope is signed, and which public keys this
machine trusts. It never decides whether a manifest is acceptable (that is
``store.manifest``), never writes a private key anywhere but the path it is given,
and never logs or stores a private key.

The envelope wire format is fixed by publisher tooling that already exists::

    {"key_id": "...", "payload_b64": "...", "sig_b64": "..."}

``json.dumps`` of exactly those three keys in that order, standard padded base64,
Ed25519 over the raw payload bytes. :func:`sign_payload` writes it; the reader is
``store.manifest.parse_envelope``.

The keyring (:func:`load_keyring`) merges two sources:

* the **user keyring**: rows of the catalog's ``keys`` table with ``source='user'``,
  added with ``modelfs keys add``;
* the **system directory**, ``/etc/modelfs/keys.d`` unless ``$MODELFS_KEYS_DIR`` (or
  the ``system_dir`` argument) says otherwise. One file per key, named
  ``<key_id>.pub``, holding the base64 of the raw 32-byte Ed25519 public key (what
  ``modelfs keys generate`` prints) on one line; blank lines and lines starting with
  ``#`` are ignored. Other file names (``README``, ``*.pem``, dot-files) are skipped.
  A key file, or the directory, that is writable by group or others, or owned by
  someone other than root or the current user, is not trusted: anyone who can write
  there could add a publisher.

Merge rules: a revocation recorded in the catalog (``modelfs keys revoke``; for a
system key a ``source='system'`` row with ``revoked_at``) wins over any file in the
system directory, whatever key bytes it holds. A key_id that the user keyring and the
system directory bind to *different* keys is unusable until one of them is removed.
Revoked and unusable keys stay in the keyring (with ``revoked``/``problem`` set) so a
refusal can say why instead of "unknown key".
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .catalog import Action, Catalog
from .durable import create_new
from .errors import Conflict, NotFound, TrustError, UsageError
from .names import filename_problem

log = logging.getLogger(__name__)

MAX_ENVELOPE_BYTES = 1024 * 1024
ENVELOPE_FIELDS = ("key_id", "payload_b64", "sig_b64")
MAX_KEY_ID = 128
ED25519_KEY_BYTES = 32
ED25519_SIG_BYTES = 64
SYSTEM_KEYS_DIR = Path("/etc/modelfs/keys.d")
KEY_FILE_SUFFIX = ".pub"
_MAX_KEY_FILE = 4096


# --------------------------------------------------------------------------- key ids


def key_id_problem(key_id: object) -> str | None:
    """Why ``key_id`` cannot name a key, or None. Shared by signer, parser and keyring."""
    if not isinstance(key_id, str):
        return "is not a string"
    if not key_id:
        return "is empty"
    if len(key_id) > MAX_KEY_ID:
        return f"is longer than {MAX_KEY_ID} characters"
    if any(unicodedata.category(c) == "Cc" for c in key_id):
        return "contains a control character"
    return None


def _shown(value: object) -> str:
    if not isinstance(value, str):
        return type(value).__name__
    return repr(value if len(value) <= 80 else value[:80] + "...")


def check_key_id(key_id: str) -> str:
    problem = key_id_problem(key_id)
    if problem is not None:
        raise UsageError(f"invalid key id {_shown(key_id)}: it {problem}", reason="bad-key-id")
    return key_id


# --------------------------------------------------------------------------- keyring entries


@dataclass(frozen=True)
class TrustedKey:
    """One keyring entry. Revoked and unusable keys stay in the keyring so refusals can
    say so; ``problem`` (when set) is why the entry verifies nothing."""

    key_id: str
    public_key_b64: str
    revoked: bool = False
    source: str = ""
    problem: str | None = None

    def public_key(self) -> Ed25519PublicKey:
        return public_key_from_b64(self.public_key_b64, key_id=self.key_id)


@dataclass(frozen=True)
class KeyInfo:
    """One row of ``modelfs keys list``: a key from either source, with its state."""

    key_id: str
    public_key_b64: str | None
    source: str                   # 'user', 'system' or 'user+system'
    state: str                    # 'trusted', 'revoked' or 'unusable'
    added_at: float | None = None
    revoked_at: float | None = None
    path: str | None = None       # the system key file, when there is one
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SystemKey:
    key_id: str
    path: Path
    public_key_b64: str | None
    problem: str | None


# --------------------------------------------------------------------------- public keys


def public_key_b64(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_b64(value: str, *, key_id: str | None = None) -> Ed25519PublicKey:
    """A raw 32-byte Ed25519 public key from canonical base64."""
    label = f"key {key_id!r}" if key_id is not None else "public key"
    fields = {"key_id": key_id} if key_id is not None else {}
    try:
        raw = base64.b64decode(value, validate=True)
        canonical = base64.b64encode(raw).decode("ascii") == value
    except (binascii.Error, ValueError, TypeError):
        canonical = False
    if not canonical:
        raise TrustError(f"key refused: {label} is not canonical base64", reason="bad-key", **fields)
    if len(raw) != ED25519_KEY_BYTES:
        raise TrustError(
            f"key refused: {label} is {len(raw)} bytes (an Ed25519 public key is {ED25519_KEY_BYTES})",
            reason="bad-key",
            **fields,
        )
    return Ed25519PublicKey.from_public_bytes(raw)


# --------------------------------------------------------------------------- private keys


def generate_keypair() -> tuple[bytes, str]:
    """A new Ed25519 key: (unencrypted PKCS8 PEM private key, base64 raw public key)."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, public_key_b64(private.public_key())


def private_key_from_pem(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise TrustError("key refused: not an unencrypted PEM private key", reason="bad-key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError(f"key refused: private key is {type(key).__name__}, not Ed25519", reason="bad-key")
    return key


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a publisher's private key; refuse one that group or others can read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise NotFound(f"no private key file at {path}", reason="no-key-file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise TrustError(f"key refused: {path} is not a regular file", reason="bad-key")
        if mode & 0o077:
            raise TrustError(
                f"key refused: {path} is readable by others (mode {stat.S_IMODE(mode):04o}, want 0600)",
                reason="insecure-key-file",
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            pem = f.read(64 * 1024)
    finally:
        os.close(fd)
    return private_key_from_pem(pem)


def write_private_key(path: str | os.PathLike[str], pem: bytes) -> None:
    """Create ``path`` mode 0600 (never overwriting) and write the PEM key, durably."""
    create_new(Path(path), pem, mode=0o600)


def sign_payload(payload: bytes, private_key: Ed25519PrivateKey, key_id: str) -> bytes:
    """The envelope, byte for byte as publisher tooling emits it, signing raw payload bytes."""
    check_key_id(key_id)
    if not payload:
        raise UsageError("refusing to sign an empty payload", reason="empty-payload")
    envelope = {
        "key_id": key_id,
        "payload_b64": base64.b64encode(payload).decode("ascii"),
        "sig_b64": base64.b64encode(private_key.sign(payload)).decode("ascii"),
    }
    data = json.dumps(envelope).encode("utf-8")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise UsageError(f"envelope would be {len(data)} bytes (limit {MAX_ENVELOPE_BYTES})", reason="too-large")
    return data


# --------------------------------------------------------------------------- system directory


def system_keys_dir(system_dir: str | os.PathLike[str] | None = None) -> Path:
    """The system key directory: the argument, else ``$MODELFS_KEYS_DIR``, else /etc."""
    if system_dir is not None:
        return Path(system_dir)
    env = os.environ.get("MODELFS_KEYS_DIR")
    return Path(env) if env else SYSTEM_KEYS_DIR


def _unsafe_owner_or_mode(st: os.stat_result) -> str | None:
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid} (want root or uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def read_system_keys(system_dir: str | os.PathLike[str] | None = None) -> list[SystemKey]:
    """Every ``<key_id>.pub`` in the system directory, with the reason it is unusable if
    it is. A missing directory means no system keys."""
    directory = system_keys_dir(system_dir)
    try:
        dir_st = directory.stat()
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError:
        log.warning("cannot read the system key directory %s", directory)
        return []
    dir_problem = _unsafe_owner_or_mode(dir_st)
    out: list[SystemKey] = []
    for name in names:
        if name.startswith(".") or not name.endswith(KEY_FILE_SUFFIX):
            continue
        key_id = name[: -len(KEY_FILE_SUFFIX)]
        path = directory / name
        if filename_problem(name) or key_id_problem(key_id):
            out.append(SystemKey(key_id, path, None, "file name is not a valid key id"))
            continue
        b64, problem = _read_key_file(path)
        if dir_problem is not None:
            problem = f"directory {directory} {dir_problem}"
        out.append(SystemKey(key_id, path, b64, problem))
    for key in out:
        if key.problem:
            log.warning("system key %s is not trusted: %s", key.path, key.problem)
    return out


def _read_key_file(path: Path) -> tuple[str | None, str | None]:
    try:
        st = path.stat()  # follows a symlink: what matters is the file read
        if not stat.S_ISREG(st.st_mode):
            return None, "is not a regular file"
        problem = _unsafe_owner_or_mode(st)
        if problem is not None:
            return None, problem
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    if len(data) > _MAX_KEY_FILE:
        return None, f"is larger than {_MAX_KEY_FILE} bytes"
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None, "is not ASCII"
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(lines) != 1:
        return None, f"holds {len(lines)} key lines (want exactly one base64 public key)"
    try:
        public_key_from_b64(lines[0])
    except TrustError as exc:
        return None, str(exc).removeprefix("key refused: public key ")
    return lines[0], None


# --------------------------------------------------------------------------- merged keyring


def list_keys(catalog: Catalog, system_dir: str | os.PathLike[str] | None = None) -> list[KeyInfo]:
    """Every key either source knows, merged by the rules in the module docstring."""
    rows = {r["key_id"]: r for r in catalog.key_rows()}
    system = {k.key_id: k for k in read_system_keys(system_dir)}
    out: list[KeyInfo] = []
    for key_id in sorted(set(rows) | set(system)):
        row, sys_key = rows.get(key_id), system.get(key_id)
        revoked_at = row["revoked_at"] if row else None
        added_at = row["added_at"] if row else None
        path = str(sys_key.path) if sys_key else None
        if row is not None and row["source"] == "user":
            b64 = row["public_key"]
            source = "user"
            problem = None
            if sys_key is not None and sys_key.public_key_b64 is not None:
                source = "user+system"
                if sys_key.public_key_b64 != b64:
                    problem = f"the user keyring and {sys_key.path} hold different keys under this key_id"
        elif sys_key is not None:
            b64 = sys_key.public_key_b64 or (row["public_key"] if row else None)
            source = "system"
            problem = sys_key.problem
        elif row is not None:  # a revocation record of a system key whose file is gone
            b64, source, problem = row["public_key"], "system", None
        else:
            raise AssertionError(f"key {key_id!r} is in neither source")  # key_id came from one of them
        state = "revoked" if revoked_at is not None else "unusable" if problem else "trusted"
        out.append(KeyInfo(key_id, b64, source, state, added_at, revoked_at, path, problem))
    return out


def load_keyring(catalog: Catalog, system_dir: str | os.PathLike[str] | None = None) -> dict[str, TrustedKey]:
    """The keyring the manifest verifier uses: key_id -> TrustedKey (revoked ones included)."""
    ring: dict[str, TrustedKey] = {}
    for k in list_keys(catalog, system_dir):
        if k.public_key_b64 is None and k.problem is None and k.state != "revoked":
            continue
        ring[k.key_id] = TrustedKey(
            k.key_id, k.public_key_b64 or "", revoked=k.state == "revoked", source=k.source,
            problem=k.problem if k.state != "revoked" else None,
        )
    return ring


def trust_key(catalog: Catalog, key_id: str, public_b64: str, *, actor: str,
              system_dir: str | os.PathLike[str] | None = None) -> bool:
    """Add a key to the user keyring; returns False if it was already trusted there."""
    check_key_id(key_id)
    public_b64 = public_b64.strip()
    public_key_from_b64(public_b64, key_id=key_id)
    for sys_key in read_system_keys(system_dir):
        if sys_key.key_id == key_id and sys_key.public_key_b64 not in (None, public_b64):
            raise Conflict(f"key_id {key_id!r} is already bound to a different key by {sys_key.path}",
                           key_id=key_id)
    with catalog.txn():
        existed = any(r["key_id"] == key_id for r in catalog.key_rows())
        catalog.add_key(key_id, public_b64)
        if not existed:
            catalog.audit(actor, Action.KEY_ADD, reason=f"trusted key {key_id!r}",
                          detail={"key_id": key_id, "public_key": public_b64})
    return not existed


def revoke_key(catalog: Catalog, key_id: str, *, actor: str,
               system_dir: str | os.PathLike[str] | None = None) -> KeyInfo:
    """Revoke a user or system key. Revocation is recorded in the catalog and is final."""
    known = {k.key_id: k for k in list_keys(catalog, system_dir)}
    info = known.get(key_id)
    if info is None:
        raise NotFound(f"no key with key_id {key_id!r} in the user keyring or {system_keys_dir(system_dir)}",
                       key_id=key_id)
    with catalog.txn():
        if info.source == "system":
            catalog.record_revoked_key(key_id, info.public_key_b64 or "")
        else:
            catalog.revoke_key(key_id)
        if info.state != "revoked":
            catalog.audit(actor, Action.KEY_REVOKE, reason=f"revoked key {key_id!r}",
                          detail={"key_id": key_id, "source": info.source})
    return {k.key_id: k for k in list_keys(catalog, system_dir)}[key_id]
