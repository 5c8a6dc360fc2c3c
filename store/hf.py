"""Hugging Face hub sources: ``hf://org/repo[@revision]/path/file.gguf``, and repositories.

A file is fetched from ``{endpoint}/{org}/{repo}/resolve/{revision}/{path}``; the
endpoint is ``$MODELFS_HF_ENDPOINT`` (else ``$HF_ENDPOINT``, else the public hub), so
mirrors and tests can stand in for it. As ``huggingface_hub`` does, the metadata comes
from a HEAD of that URL that follows same-origin redirects only: for an LFS file the
hub answers 302 (to its CDN) with ``X-Linked-Etag`` (the SHA-256, quoted) and
``X-Linked-Size``; ``X-Repo-Commit`` names the commit, which pins the recorded URL so a
later lazy fetch gets the same bytes.

A repository's files come from the hub's tree listing (:func:`list_tree`: ``GET
{endpoint}/api/models/{org}/{repo}/tree/{revision}?recursive=true``, a JSON list of
``{"type": "file", "path", "size", "oid", "lfs": {"oid": SHA-256, "size", …}}``), paginated
by a ``Link: <…>; rel="next"`` header that is followed on the endpoint's origin only.

The token comes from ``$HF_TOKEN`` (or the legacy ``$HUGGING_FACE_HUB_TOKEN``), else
the token file (``$HF_TOKEN_PATH``, else ``$HF_HOME/token``, default
``~/.cache/huggingface/token``), read at request time and sent only to the endpoint's
origin: :func:`auth_headers` is the downloader's per-request credential hook (the HTTP
layer asks it on every hop), so a redirect to the CDN carries no token. The token is
never stored, logged or put in argv.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

import httpx

from .errors import FetchError, UsageError
from .layout import Sha256, check_sha256
from .names import check_filename

if TYPE_CHECKING:
    from .http import Http

DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class HFRef:
    repo: str          # "org/name"
    revision: str      # branch, tag or commit; "main" by default
    path: str          # file path inside the repo

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def display(self) -> str:
        rev = "" if self.revision == "main" else "@" + quote(self.revision, safe="")
        return f"hf://{self.repo}{rev}/{self.path}"


@dataclass(frozen=True)
class HFFile:
    ref: HFRef
    url: str           # resolve URL pinned to the commit when the hub named one
    sha256: Sha256
    size: int
    commit: str | None
    etag: str | None


def endpoint() -> str:
    value = os.environ.get("MODELFS_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return value.rstrip("/")


def parse_hf_url(url: str) -> HFRef:
    """``hf://org/repo[@revision]/path/to/file`` -> :class:`HFRef`. A revision with a
    slash (``refs/pr/1``) is written percent-encoded (``refs%2Fpr%2F1``)."""
    if not url.startswith("hf://"):
        raise UsageError(f"not an hf:// URL: {url[:80]!r}")
    parts = url[5:].split("/")
    if len(parts) < 3:
        raise UsageError("an hf:// URL needs org/repo/path: hf://org/repo[@revision]/file.gguf")
    org, name = parts[0], parts[1]
    revision = "main"
    if "@" in name:
        name, revision = name.split("@", 1)
        revision = unquote(revision)
    for part in (org, name):
        if not _REPO_PART.fullmatch(part) or ".." in part:
            raise UsageError(f"invalid hub repository name {org}/{name}"[:120])
    if not revision or any(c in revision for c in "\0\n\r") or ".." in revision:
        raise UsageError("invalid revision in hf:// URL")
    path_parts = parts[2:]
    for p in path_parts:
        check_filename(p, reserved=False)
    return HFRef(f"{org}/{name}", revision, "/".join(path_parts))


def resolve_url(ref: HFRef, revision: str | None = None, base: str | None = None) -> str:
    rev = quote(revision or ref.revision, safe="")
    return f"{base or endpoint()}/{ref.repo}/resolve/{rev}/{quote(ref.path)}"


def token() -> str | None:
    """The user's hub token, read now (never cached, never logged)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    path = os.environ.get("HF_TOKEN_PATH")
    if not path:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "huggingface")
        path = os.path.join(home, "token")
    try:
        value = Path(path).read_text().strip()
    except OSError:
        return None
    return value or None


def auth_headers(url: str, supplied: str | None = None) -> dict[str, str]:
    """Credentials for one request: the hub token (``supplied``, else the user's, read
    now), only for the endpoint's origin."""
    try:
        target, hub = httpx.URL(url), httpx.URL(endpoint())
    except httpx.InvalidURL:
        return {}
    if (target.scheme, target.host, target.port) != (hub.scheme, hub.host, hub.port):
        return {}
    tok = supplied or token()
    return {"Authorization": f"Bearer {tok}"} if tok else {}


def token_auth(supplied: str | None) -> Callable[[str], dict[str, str]]:
    """The credential hook of a pull run for someone else (the daemon's jobs): the token
    they supplied, for the hub's origin only, and never the daemon user's own."""
    def auth(url: str) -> dict[str, str]:
        return auth_headers(url, supplied) if supplied else {}
    return auth


def _normalize_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


async def file_metadata(http: Http, ref: HFRef) -> HFFile:
    """HEAD the resolve URL; the expected SHA-256 and size of an LFS file."""
    url = resolve_url(ref)
    response = await http.head(url)
    shown = ref.display()
    status = response.status_code
    if status in (401, 403):
        raise FetchError(f"{shown}: access denied by the hub (HTTP {status}); a gated or private repo needs "
                         "HF_TOKEN or a token file", status=status)
    if status == 404:
        raise FetchError(f"{shown}: no such repository, revision or file on the hub", status=status)
    if status >= 400:
        raise FetchError(f"{shown}: the hub answered HTTP {status}", status=status)
    headers = response.headers
    # As huggingface_hub: X-Linked-Etag for LFS files, else the ETag (a SHA-256 only for LFS).
    linked = _normalize_etag(headers.get("x-linked-etag")) or _normalize_etag(headers.get("etag"))
    if not linked or not _SHA256.fullmatch(linked.lower()):
        raise FetchError(f"{shown}: the hub gave no SHA-256 for this file (not an LFS file?); "
                         "pass --sha256 and a plain https URL instead")
    size_text = headers.get("x-linked-size") or headers.get("content-length")
    if not size_text or not size_text.isdigit():
        raise FetchError(f"{shown}: the hub did not say how large the file is")
    commit = headers.get("x-repo-commit")
    if commit and not re.fullmatch(r"[0-9a-f]{40}", commit):
        commit = None
    url = resolve_url(ref, revision=commit) if commit else url
    return HFFile(ref, url, check_sha256(linked.lower()), int(size_text), commit,
                  _normalize_etag(headers.get("etag")))


# -- a repository's files -----------------------------------------------------------------
@dataclass(frozen=True)
class TreeFile:
    """One file of a repository listing: its path, size and (LFS files only) SHA-256."""
    path: str
    size: int
    sha256: Sha256 | None   # the LFS object's SHA-256 (``lfs.oid``); None for a plain git file


LISTING_PAGE_BYTES = 16 << 20   # one page of the tree listing (the hub sends about 1,000 entries)
LISTING_MAX_PAGES = 1000
LISTING_MAX_FILES = 100_000
#: All pages together (100,000 entries of the hub's are about 30 MB): without it a hub
#: could make a pull download, and keep in memory, 1,000 pages of 16 MiB.
LISTING_MAX_BYTES = 128 << 20


def tree_url(repo: str, revision: str, base: str | None = None) -> str:
    """The hub's listing of every file of ``repo`` at ``revision`` (``huggingface_hub``'s
    ``list_repo_tree(recursive=True)``)."""
    return f"{base or endpoint()}/api/models/{repo}/tree/{quote(revision, safe='')}?recursive=true"


async def list_tree(http: Http, repo: str, revision: str) -> list[TreeFile]:
    """Every file of ``repo`` at ``revision``, following the listing's pages (``Link:
    <…>; rel="next"``, as the hub paginates, on the hub's origin only). Folders are left
    out; an entry that is not what the hub sends is refused, not guessed at."""
    shown = f"hf://{repo}" + ("" if revision == "main" else "@" + quote(revision, safe=""))
    url: str | None = tree_url(repo, revision)
    hub = httpx.URL(endpoint())
    files: list[TreeFile] = []
    pages = received = 0
    while url is not None:
        pages += 1
        if pages > LISTING_MAX_PAGES:
            raise FetchError(f"{shown}: the hub's file listing has more than {LISTING_MAX_PAGES} pages")
        try:
            body, response = await _get_page(http, url, shown)
        except FetchError as exc:
            status = exc.fields.get("status")
            if status in (401, 403):
                raise FetchError(f"{shown}: access denied by the hub (HTTP {status}); a gated or private repo "
                                 "needs HF_TOKEN or a token file", status=status) from None
            if status == 404:
                raise FetchError(f"{shown}: no such repository or revision on the hub", status=status) from None
            raise
        received += len(body)
        if received > LISTING_MAX_BYTES:
            raise FetchError(f"{shown}: the hub's file listing is larger than {LISTING_MAX_BYTES >> 20} MiB")
        files += _tree_entries(body, shown)
        if len(files) > LISTING_MAX_FILES:
            raise FetchError(f"{shown}: the repository has more than {LISTING_MAX_FILES} files")
        url = _next_page(response, hub, shown)
    return files


async def _get_page(http: Http, url: str, shown: str) -> tuple[bytes, httpx.Response]:
    """One page of the listing; a transient failure (the network, HTTP 429 or 5xx) is tried
    again with the downloader's backoff, as a HEAD is."""
    failures = 0
    while True:
        try:
            return await http.get_small(
                url, limit=LISTING_PAGE_BYTES, follow_cross_origin=False,
                too_large=lambda: FetchError(f"{shown}: a page of the hub's file listing is over "
                                             f"{LISTING_PAGE_BYTES >> 20} MiB"))
        except FetchError as exc:
            failures += 1
            if not exc.fields.get("transient") or failures > http.retry.max_retries:
                raise
            await http.retry.sleep(http.retry.delay(failures, exc.fields.get("retry_after")))


def _next_page(response: httpx.Response, hub: httpx.URL, shown: str) -> str | None:
    nxt = response.links.get("next", {}).get("url")
    if not nxt:
        return None
    target = response.url.join(nxt)
    if (target.scheme, target.host, target.port) != (hub.scheme, hub.host, hub.port):
        raise FetchError(f"{shown}: the hub's listing points its next page at another origin; refused")
    return str(target)


def _tree_entries(body: bytes, shown: str) -> list[TreeFile]:
    def bad(why: str) -> FetchError:
        return FetchError(f"{shown}: the hub's file listing is malformed ({why})")

    try:
        doc = json.loads(body)
    except ValueError:
        raise bad("not JSON") from None
    except RecursionError:
        raise bad("nested too deeply") from None
    if not isinstance(doc, list):
        raise bad("not a list")
    out = []
    for entry in doc:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise bad("an entry without a path")
        if entry.get("type") != "file":
            continue  # a folder: recursive listings name its files too
        size, lfs = entry.get("size"), entry.get("lfs")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"no size for {entry['path'][:80]!r}")
        sha = None
        if lfs is not None:
            oid = lfs.get("oid") if isinstance(lfs, dict) else None
            if not isinstance(oid, str) or not _SHA256.fullmatch(oid.lower()) or lfs.get("size", size) != size:
                raise bad(f"an LFS entry without a SHA-256 or with another size for {entry['path'][:80]!r}")
            sha = check_sha256(oid.lower())
        out.append(TreeFile(entry["path"], size, sha))
    return out
