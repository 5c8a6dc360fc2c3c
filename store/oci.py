"""OCI registries: ``oci://HOST[:PORT]/REPO:TAG`` and ``…@sha256:DIGEST``, pulled and pushed.

A registry (the OCI distribution spec: Docker's ``registry``, Harbor, Zot, GHCR, Docker
Hub) is the engine for content-addressed blobs a fleet of machines already has: SHA-256
digests, range requests, mirrors and auth. This module speaks its HTTP API:

* **References.** ``oci://`` is HTTPS; ``oci+http://`` is plain HTTP, used only when
  the user writes it (a registry on a private network, the tests on 127.0.0.1). A
  reference never carries credentials (userinfo is refused). A blob reference
  ``oci://host/repo@sha256:HEX`` (what a pulled file records as its URL, and what a
  signed pack may name as a file URL) and a plain ``https://host/v2/REPO/blobs/sha256:HEX``
  URL are fetched through the registry's auth (:func:`prepare_blob`).
* **Artifacts.** A GGUF model is an image manifest (OCI or Docker v2; an index or
  manifest list is refused, naming its manifests, so the user picks one by digest)
  whose layers are GGUF weights (Docker Model Runner's ``application/vnd.docker.ai.gguf.v3``,
  Ollama's ``application/vnd.ollama.image.model``) and at most one projector
  (``application/vnd.docker.ai.mmproj``, ``application/vnd.ollama.image.projector``).
  Licences, templates and parameters (:data:`SKIPPED_TYPES`) are left out; any other
  layer type is refused by name, and so is a manifest without weights (a container
  image). Several weights layers must form one split set (``store.shards``).
* **Auth.** Both schemes of the distribution spec: ``Basic`` (an htpasswd registry)
  and ``Bearer`` (a 401 whose ``WWW-Authenticate`` names a token ``realm``, ``service``
  and ``scope``; the token is asked for with the Basic credentials when there are any).
  :class:`RegistryAuth` is the HTTP layer's per-request credential hook: it adds the
  registry's header only to requests to that registry's origin, so a blob redirect to
  storage carries none, and it answers a 401 challenge only from the registry's own
  origin (the probe follows no redirect elsewhere). Credentials (:func:`credentials`)
  come from ``$MODELFS_REGISTRY_USER``/``$MODELFS_REGISTRY_PASSWORD`` (for the registry
  ``$MODELFS_REGISTRY_HOST`` only, when it is set; else for the registry the command
  names, :meth:`RegistryAuth.name`, not one a pack or a recorded URL names), else the ``auths`` of
  Docker's ``config.json`` (``$MODELFS_REGISTRY_AUTH_FILE``, else
  ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``), which must not be
  readable by group or other. They are read at request time, held in memory only for
  the transfer, and never stored, logged or put in an exception. Over plain HTTP they
  go only to a registry the command names, or on the loopback. A Downloader bound by
  an address rule (a pull for another caller, the daemon's apps) sends none of the
  owner's credentials: only anonymous tokens.
* **Push** (:func:`push`): a model's active version as Docker Model Runner lays it out:
  a config blob (``application/vnd.docker.ai.model.config.v0.1+json``, format gguf),
  one layer per file with its ``org.opencontainers.image.title``; blobs the registry
  has are skipped (HEAD), the others uploaded in chunks (POST, PATCH, PUT ?digest=),
  then the manifest is PUT under the tag.

What is recorded of a pull is ``oci://host/repo@sha256:<manifest digest>`` (redacted),
and per file its blob reference: a later fetch of a dehydrated copy asks the same
registry for the same digest. This module never writes SQL and never commits a byte:
pulls go through :func:`store.pull.pull` (the Downloader verifies every digest).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from .blobs import BlobStore
from .catalog import Catalog
from .errors import FetchError, FormatError, IntegrityError, NotFound, UsageError
from .http import Auth, Http, status_error
from .layout import Sha256, check_sha256
from .names import filename_problem
from .owner import open_file
from .redact import redact_url
from .shards import group

log = logging.getLogger(__name__)

SCHEMES = {"oci": "https", "oci+http": "http"}

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)

DMR_CONFIG = "application/vnd.docker.ai.model.config.v0.1+json"
DMR_GGUF = "application/vnd.docker.ai.gguf.v3"
DMR_MMPROJ = "application/vnd.docker.ai.mmproj"
OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_PROJECTOR = "application/vnd.ollama.image.projector"
WEIGHTS_TYPES = frozenset({DMR_GGUF, OLLAMA_MODEL})
MMPROJ_TYPES = frozenset({DMR_MMPROJ, OLLAMA_PROJECTOR})
#: Layers of a GGUF artifact that are not GGUF files (the weights carry their own
#: template and licence metadata): left out of the entry.
SKIPPED_TYPES = frozenset({
    "application/vnd.docker.ai.license", "application/vnd.docker.ai.chat.template.jinja",
    "application/vnd.ollama.image.license", "application/vnd.ollama.image.template",
    "application/vnd.ollama.image.params", "application/vnd.ollama.image.system",
    "application/vnd.ollama.image.messages",
})
TITLE = "org.opencontainers.image.title"
DMR_FILEPATH = "org.cncf.model.filepath"

MAX_MANIFEST = 4 << 20       # the distribution spec's suggested manifest limit
MAX_TOKEN_BODY = 1 << 20
UPLOAD_CHUNK = 16 << 20      # PATCH size of a blob upload
SMALL_BODY = 1 << 20         # a request body sent within the small-document deadline

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_NETLOC = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_TOKEN = re.compile(r"[\x21-\x7e]+")
_V2_PATH = re.compile(r"/v2/(?P<repo>.+?)/(?:blobs|manifests|tags)(?:/|$)")
_BLOB_PATH = re.compile(rf"/v2/(?P<repo>{_COMPONENT}(?:/{_COMPONENT})*)/blobs/sha256:(?P<hex>[0-9a-f]{{64}})")


# -- references ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OciRef:
    """A parsed ``oci://`` or ``oci+http://`` reference."""
    scheme: str            # 'oci' or 'oci+http', as written
    netloc: str            # host[:port]
    repo: str
    tag: str | None        # None when pinned by digest
    digest: str | None     # 'sha256:<hex>'

    @property
    def base(self) -> str:
        return f"{SCHEMES[self.scheme]}://{self.netloc}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def manifest_url(self, reference: str | None = None) -> str:
        return f"{self.base}/v2/{self.repo}/manifests/{reference or self.reference}"

    def blob_url(self, digest: str) -> str:
        return f"{self.base}/v2/{self.repo}/blobs/{digest}"

    def pinned(self, digest: str) -> str:
        """``oci://host/repo@sha256:…``: the recorded source of a pull, or a blob reference."""
        return f"{self.scheme}://{self.netloc}/{self.repo}@{digest}"

    def display(self) -> str:
        where = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"{self.scheme}://{self.netloc}/{self.repo}{where}"


def is_reference(text: str) -> bool:
    return text.split("://", 1)[0].lower() in SCHEMES and "://" in text


def parse_reference(text: str) -> OciRef:
    """``oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`` (tag ``latest`` when neither is given)."""
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise UsageError("an OCI reference starts with oci:// (HTTPS) or oci+http:// (plain HTTP)")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        raise UsageError("an oci:// reference must not carry credentials: set MODELFS_REGISTRY_USER and "
                         "MODELFS_REGISTRY_PASSWORD, or use a credentials file (docs/fleet.md)")
    try:
        parts = urlsplit(f"http://{netloc}")
        host, _port = parts.hostname, parts.port
    except ValueError:
        raise UsageError(f"{scheme}://: invalid registry address {netloc[:80]!r}") from None
    if not _NETLOC.fullmatch(netloc):
        raise UsageError(f"{scheme}://: invalid registry address {netloc[:80]!r}")
    if not host or not slash or not path:
        raise UsageError(f"{scheme}://{netloc[:80]}: name the repository, e.g. {scheme}://HOST/REPO:TAG")
    digest = tag = None
    if "@" in path:
        path, digest = path.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise UsageError(f"{scheme}://{netloc}/{path[:80]}: a digest is sha256: and 64 lowercase hex digits")
        if ":" in path.rsplit("/", 1)[-1]:
            path = path.rsplit(":", 1)[0]  # REPO:TAG@DIGEST: the digest decides, as docker does
    elif ":" in path.rsplit("/", 1)[-1]:
        path, tag = path.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise UsageError(f"invalid tag {tag[:80]!r} (letters, digits, '_', '.', '-'; at most 128)")
    else:
        tag = "latest"
    if not _REPO.fullmatch(path) or len(path) > 255:
        raise UsageError(f"invalid repository name {path[:80]!r}: lowercase letters, digits and "
                         "separators ('.', '_', '-', '/')")
    return OciRef(scheme, netloc.lower(), path, tag, digest)


def blob_reference(url: str) -> tuple[OciRef, Sha256] | None:
    """The registry and digest of a blob reference (``oci://host/repo@sha256:HEX``) or of a
    plain ``http(s)://host/v2/REPO/blobs/sha256:HEX`` URL; None for any other URL."""
    if is_reference(url):
        ref = parse_reference(url)
        if ref.digest is None:
            raise UsageError(f"{ref.display()} names a tag, not a blob: a file URL is oci://HOST/REPO@sha256:HEX")
        return ref, check_sha256(ref.digest[7:])
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or parts.query or not parts.netloc or "@" in parts.netloc:
        return None
    m = _BLOB_PATH.fullmatch(parts.path)
    if m is None:
        return None
    scheme = "oci" if parts.scheme == "https" else "oci+http"
    return OciRef(scheme, parts.netloc.lower(), m["repo"], None, f"sha256:{m['hex']}"), check_sha256(m["hex"])


# -- credentials --------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def auth_file() -> Path:
    """Where the registry credentials file is (Docker's ``config.json``)."""
    explicit = os.environ.get("MODELFS_REGISTRY_AUTH_FILE")
    if explicit:
        return Path(explicit)
    docker = os.environ.get("DOCKER_CONFIG")
    return Path(docker) / "config.json" if docker else Path.home() / ".docker" / "config.json"


def credentials(netloc: str, *, named: bool = True) -> Credentials | None:
    """The user's credentials for the registry ``netloc``, read now: the environment, else
    the credentials file (refused when group or other may read it). The environment's
    go to ``$MODELFS_REGISTRY_HOST`` when it is set, else only to a registry the command
    itself ``named`` (not one a signed pack or a recorded URL names: a publisher is
    trusted for bytes, not with the user's password)."""
    user = os.environ.get("MODELFS_REGISTRY_USER")
    password = os.environ.get("MODELFS_REGISTRY_PASSWORD")
    if bool(user) != (password is not None):
        raise UsageError("set both MODELFS_REGISTRY_USER and MODELFS_REGISTRY_PASSWORD, or neither")
    only = os.environ.get("MODELFS_REGISTRY_HOST", "").strip().lower()
    if user and password is not None and (only == netloc if only else named):
        return Credentials(user, password)
    path = auth_file()
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the command (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot read the registry credentials file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"the registry credentials file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(f"the registry credentials file {path} is readable by others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); make it private: chmod 600 {path}")
        if st.st_uid != os.getuid():
            raise UsageError(f"the registry credentials file {path} belongs to another user")
        data = f.read(1 << 20)
    try:
        auths = json.loads(data).get("auths") or {}
    except (ValueError, AttributeError):
        raise UsageError(f"the registry credentials file {path} is not JSON with an \"auths\" object") from None
    if not isinstance(auths, dict):
        return None
    # Docker Hub's credentials are filed under its index's name, not the registry's.
    wanted = {netloc, "index.docker.io"} if netloc in ("registry-1.docker.io", "docker.io") else {netloc}
    for key, entry in auths.items():
        if not isinstance(entry, dict) or _auth_host(str(key)) not in wanted:
            continue
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
        encoded = entry.get("auth")
        if isinstance(encoded, str):
            try:
                user, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise UsageError(f"the registry credentials file {path}: the \"auth\" of {netloc} is not "
                                 "base64 of user:password") from None
            return Credentials(user, secret)
    return None


def _auth_host(key: str) -> str:
    """A key of ``auths`` (``host:port`` or ``https://host:port/v1/``) as host[:port]."""
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0].lower()


def _loopback(netloc: str) -> bool:
    """Whether the registry ``host[:port]`` is this machine's loopback (plain HTTP to it
    crosses no network)."""
    host = urlsplit(f"http://{netloc}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, f"{(parts.hostname or '').lower()}:{port}"


# -- auth ---------------------------------------------------------------------------------
@dataclass
class _Grant:
    header: str                                  # the Authorization value
    expires: float = float("inf")                # monotonic time


class RegistryAuth:
    """The HTTP layer's credential hook with the registries' credentials added: for a
    URL on a registry this process authorised, its Basic header or the Bearer token of
    the URL's repository; for every other URL, what the wrapped hook gives."""

    def __init__(self, inner: Auth, *, user_credentials: bool) -> None:
        self.inner = inner
        self.user_credentials = user_credentials
        #: (scheme, netloc) of the registries the command itself names (``pull oci://…``,
        #: ``push``), as against those a signed pack or a recorded URL names
        self.named: set[tuple[str, str]] = set()
        self._grants: dict[tuple[tuple[str, str], str], _Grant] = {}   # (origin, repo) -> grant
        self._authorised: dict[tuple[tuple[str, str], str, str], float] = {}  # (origin, repo, actions) -> until

    def __call__(self, url: str) -> Mapping[str, str]:
        headers = dict(self.inner(url))
        if self._grants:
            origin = _origin(url)
            m = _V2_PATH.match(urlsplit(url).path)
            grant = self._grants.get((origin, m["repo"])) if m else None
            if grant is not None and grant.expires > time.monotonic():
                headers["Authorization"] = grant.header
        return headers

    def has(self, base: str, repo: str, actions: str) -> bool:
        """Whether requests for ``actions`` on ``repo`` were authorised, for another 30 s at least."""
        until = self._authorised.get((_origin(base), repo, actions))
        return until is not None and until > time.monotonic() + 30

    def name(self, ref: OciRef) -> None:
        """``ref``'s registry is the one the command names (module docstring, Auth)."""
        self.named.add((ref.scheme, ref.netloc))

    def credentials(self, ref: OciRef) -> Credentials | None:
        """The user's credentials for ``ref``'s registry, if they may go there: never for a
        Downloader bound by an address rule; over plain HTTP only to a registry the
        command names or on the loopback (a pack's ``oci+http://`` for a registry the
        user logs into over HTTPS would put the password on the network in clear)."""
        if not self.user_credentials:
            return None
        named = (ref.scheme, ref.netloc) in self.named
        if SCHEMES[ref.scheme] == "http" and not named and not _loopback(ref.netloc):
            return None
        return credentials(ref.netloc, named=named)

    async def authorize(self, http: Http, ref: OciRef, actions: str, probe: str, method: str = "HEAD",
                        headers: Mapping[str, str] | None = None) -> None:
        """Make requests to ``ref``'s repository carry what the registry asks for:
        ``probe`` (a URL in the repository) is sent; a 401 is answered by its
        ``WWW-Authenticate`` challenge (Basic, or a Bearer token from the realm for the
        scope ``repository:REPO:ACTIONS``) and the probe is sent again."""
        if self.has(ref.base, ref.repo, actions):
            return
        origin = _origin(ref.base)
        grant = self._grants.get((origin, ref.repo))
        if grant is not None and grant.expires <= time.monotonic() + 30:
            del self._grants[(origin, ref.repo)]  # a token about to expire: ask for a new one now
        shown = redact_url(probe)
        # The probe stays on the registry's origin: a redirect elsewhere (a blob's storage)
        # means the registry let it through, and a challenge from that other origin would
        # send the registry's credentials to whatever token realm it names.
        response = await _send(http, method, probe, shown, headers, cross_origin=False)
        if response.status == 401 and self._grants.pop((origin, ref.repo), None) is not None:
            # a grant of fewer actions, or expired
            response = await _send(http, method, probe, shown, headers, cross_origin=False)
        if response.status != 401:  # let in: anonymously, or by a grant until it expires
            grant = self._grants.get((origin, ref.repo))
            self._authorised[(origin, ref.repo, actions)] = grant.expires if grant is not None else float("inf")
            return
        scheme, params = parse_challenge(response.headers.get("www-authenticate", ""))
        creds = self.credentials(ref)
        if scheme == "basic":
            if creds is None:
                raise FetchError(f"{ref.display()}: the registry asks for a user name and password: "
                                 f"{self._missing(ref)} (docs/fleet.md)", status=401, reason="credentials")
            self._grants[(origin, ref.repo)] = _Grant(creds.basic())
        elif scheme == "bearer":
            token, lifetime = await self._token(http, ref, params, actions, creds)
            self._grants[(origin, ref.repo)] = _Grant(f"Bearer {token}", time.monotonic() + lifetime)
        else:
            raise FetchError(f"{ref.display()}: the registry asks for an authentication scheme modelfs does not "
                             f"speak ({scheme or 'none named'})", status=401)
        response = await _send(http, method, probe, shown, headers, cross_origin=False)
        if response.status == 401:
            self._grants.pop((origin, ref.repo), None)
            if creds is None:
                raise FetchError(f"{ref.display()}: the registry refused an anonymous token (HTTP 401): "
                                 f"{self._missing(ref)}", status=401, reason="credentials")
            raise FetchError(f"{ref.display()}: the registry refused these credentials (HTTP 401): check the user "
                             "name and password (MODELFS_REGISTRY_USER / MODELFS_REGISTRY_PASSWORD or "
                             f"{auth_file()})", status=401, reason="credentials")
        self._authorised[(origin, ref.repo, actions)] = self._grants[(origin, ref.repo)].expires

    def _missing(self, ref: OciRef) -> str:
        """What to do about credentials that were not sent to ``ref``'s registry."""
        if not self.user_credentials:
            return "a pull for an app uses none of the owner's registry credentials"
        if (ref.scheme, ref.netloc) not in self.named:
            if SCHEMES[ref.scheme] == "http" and not _loopback(ref.netloc):
                return ("credentials never go over plain HTTP to a registry this command does not name "
                        "(a signed pack or a recorded URL names it)")
            if os.environ.get("MODELFS_REGISTRY_USER") and not os.environ.get("MODELFS_REGISTRY_HOST"):
                return (f"this command does not name {ref.netloc} (a signed pack or a recorded URL does), so "
                        f"MODELFS_REGISTRY_USER's credentials go there only with MODELFS_REGISTRY_HOST={ref.netloc}, "
                        f"or add the registry to {auth_file()}")
        return f"set MODELFS_REGISTRY_USER and MODELFS_REGISTRY_PASSWORD, or add the registry to {auth_file()}"

    async def _token(self, http: Http, ref: OciRef, params: dict[str, str], actions: str,
                     creds: Credentials | None) -> tuple[str, float]:
        realm = params.get("realm", "")
        try:
            target = httpx.URL(realm)
        except httpx.InvalidURL:
            target = None
        if target is None or target.scheme not in ("http", "https") or not target.host:
            raise FetchError(f"{ref.display()}: the registry named no valid token realm", status=401)
        if SCHEMES[ref.scheme] == "https" and target.scheme != "https":
            raise FetchError(f"{ref.display()}: refusing a token realm over plain http for an https registry",
                             status=401)
        query = {"scope": f"repository:{ref.repo}:{actions}"}
        if params.get("service"):
            query["service"] = params["service"]
        url = str(target.copy_merge_params(query))
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if creds is not None:
            headers["Authorization"] = creds.basic()
        shown = redact_url(realm)
        with http.small_deadline(shown):
            body = await self._token_body(http, ref, url, headers, shown, creds)
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError, RecursionError):
            token, lifetime = None, 0.0
        # A header value: visible ASCII only (a JWT, base64): anything else would break the
        # request line, or make httpx fail to encode the header (an internal error).
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise FetchError(f"{ref.display()}: the token server's answer holds no token")
        return token, max(lifetime, 1.0)

    async def _token_body(self, http: Http, ref: OciRef, url: str, headers: Mapping[str, str], shown: str,
                          creds: Credentials | None) -> bytes:
        response = await http.open("GET", url, headers, shown, follow_cross_origin=False)
        try:
            if response.status_code in (401, 403):
                hint = (f"check MODELFS_REGISTRY_USER / MODELFS_REGISTRY_PASSWORD or {auth_file()}" if creds
                        else self._missing(ref))
                raise FetchError(f"{ref.display()}: the registry's token server refused "
                                 f"{'these credentials' if creds else 'an anonymous token'} "
                                 f"(HTTP {response.status_code}): {hint}", status=response.status_code,
                                 reason="credentials")
            if response.status_code != 200:
                raise status_error(response, shown) or FetchError(
                    f"{ref.display()}: the token server answered HTTP {response.status_code}",
                    status=response.status_code)
            return await _read(http, response, shown, MAX_TOKEN_BODY)
        finally:
            await response.aclose()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` -> ('bearer', {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m[1].lower(): m[2] if m[2] is not None else m[3]
              for m in re.finditer(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))', rest)}
    return scheme.lower(), params


def registry_auth(http: Http) -> RegistryAuth:
    """``http``'s credential hook, with the registries' added (once per Http). The
    owner's credentials only when no address rule binds it (not a pull for an app)."""
    if not isinstance(http.auth, RegistryAuth):
        http.auth = RegistryAuth(http.auth, user_credentials=http.addresses is None)
    return http.auth


async def prepare_blob(http: Http, url: str, sha256: str) -> str | None:
    """For a registry blob URL (:func:`blob_reference`): authorise its repository and
    return the URL to GET; None for any other URL. Its digest must be ``sha256``."""
    found = blob_reference(url)
    if found is None:
        return None
    ref, digest = found
    if digest != sha256:
        raise IntegrityError(f"{redact_url(url)} names blob {digest[:16]}…, but the file's SHA-256 is "
                             f"{sha256[:16]}…", sha256=sha256)
    target = ref.blob_url(f"sha256:{digest}")
    await registry_auth(http).authorize(http, ref, "pull", target)
    return target


async def renew_blob_auth(http: Http, url: str) -> None:
    """Before another request for a registry blob URL that :func:`prepare_blob` authorised:
    a new token if the one it had expires within 30 s (:meth:`RegistryAuth.has`)."""
    if not isinstance(http.auth, RegistryAuth):
        return  # nothing was authorised: not a registry blob
    found = blob_reference(url)
    if found is not None:
        await http.auth.authorize(http, found[0], "pull", url)


# -- requests -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Answer:
    """A small response, read whole."""
    status: int
    headers: httpx.Headers
    body: bytes
    response: httpx.Response = field(repr=False)


async def _send(http: Http, method: str, url: str, shown: str, headers: Mapping[str, str] | None = None,
                content: bytes | None = None, cross_origin: bool | None = None) -> _Answer:
    """One small request, its body read (never more than a manifest's worth), the whole
    exchange within the HTTP layer's deadline for small documents. A request with a body
    (or with ``cross_origin`` False) never follows a redirect to another origin."""
    follow = content is None if cross_origin is None else cross_origin
    # An upload chunk takes what the uplink takes: only its answer is held to the deadline.
    sending = contextlib.nullcontext() if content and len(content) > SMALL_BODY else http.small_deadline(shown)
    with sending:
        response = await http.open(method, url, {"Accept-Encoding": "identity", **(headers or {})}, shown,
                                   follow_cross_origin=follow, content=content)
    try:
        with http.small_deadline(shown):
            # (a redirect to another origin not followed comes back closed: no body to read)
            body = b"" if method == "HEAD" or response.is_closed else await _read(http, response, shown,
                                                                                   MAX_MANIFEST)
    finally:
        await response.aclose()
    return _Answer(response.status_code, response.headers, body, response)


async def _read(http: Http, response: httpx.Response, shown: str, limit: int) -> bytes:
    body = bytearray()
    with http.body_errors(response, shown, lambda: len(body)):
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise FormatError(f"{shown}: the registry's answer is larger than {limit} bytes")
    return bytes(body)


def _fail(answer: _Answer, what: str) -> FetchError | NotFound:
    status = answer.status
    transient = status_error(answer.response, what)
    if transient is not None:
        return transient
    detail = ""
    try:
        errors = json.loads(answer.body).get("errors") or []
        detail = "; ".join(str(e.get("message") or e.get("code"))[:120] for e in errors[:2] if isinstance(e, dict))
    except (ValueError, AttributeError, RecursionError):
        pass
    if 300 <= status <= 399 and "location" in answer.headers:
        return FetchError(f"{what}: the registry redirected this request to another origin; not followed "
                          "(it would carry the request's body and credentials there)", status=status)
    if status == 404:
        return NotFound(f"{what}: not found in the registry" + (f" ({detail})" if detail else ""), status=status)
    if status == 403:
        return FetchError(f"{what}: the registry denied access (HTTP 403)" + (f": {detail}" if detail else ""),
                          status=status, reason="credentials")
    return FetchError(f"{what}: the registry answered HTTP {status}" + (f" ({detail})" if detail else ""),
                      status=status)


@contextlib.contextmanager
def _tls_hint(ref: OciRef) -> Iterator[None]:
    """A registry that answers plain HTTP to ``oci://``: say which scheme reaches it."""
    try:
        yield
    except FetchError as exc:
        if SCHEMES[ref.scheme] == "https" and "SSL" in str(exc):
            raise type(exc)(f"{ref.display()}: {ref.netloc} does not answer HTTPS (oci:// is HTTPS); a registry "
                            "that speaks plain HTTP on a network you trust is oci+http://…", **exc.fields) from None
        raise


# -- pull ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    media_type: str
    sha256: Sha256
    size: int
    filename: str
    role: str              # 'weights', 'shard' or 'mmproj'


@dataclass(frozen=True)
class Artifact:
    ref: OciRef
    digest: str            # 'sha256:<hex>' of the manifest
    layers: tuple[Layer, ...]

    @property
    def source(self) -> str:
        return self.ref.pinned(self.digest)


async def resolve(http: Http, ref: OciRef) -> Artifact:
    """Read ``ref``'s manifest and tell its GGUF files (module docstring)."""
    url = ref.manifest_url()
    accept = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
    auth = registry_auth(http)
    auth.name(ref)
    with _tls_hint(ref):
        await auth.authorize(http, ref, "pull", url, headers={"Accept": accept})
    response = await _send(http, "GET", url, redact_url(url), {"Accept": accept})
    if response.status != 200:
        raise _fail(response, ref.display())
    body = response.body
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest is not None and digest != ref.digest:
        raise IntegrityError(f"{ref.display()}: the registry sent a manifest whose digest is {digest[:23]}…",
                             reason="digest")
    said = response.headers.get("docker-content-digest")
    if said and said != digest:
        raise IntegrityError(f"{ref.display()}: the manifest does not match the digest the registry gave "
                             f"({said[:23]}…)", reason="digest")
    try:
        doc = json.loads(body)
    except ValueError:
        raise FormatError(f"{ref.display()}: the manifest is not JSON") from None
    except RecursionError:
        raise FormatError(f"{ref.display()}: the manifest is nested too deeply") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{ref.display()}: the manifest is not a JSON object")
    kind = doc.get("mediaType") or response.headers.get("content-type", "").split(";")[0].strip()
    if kind in INDEX_TYPES or "manifests" in doc:
        listed = [m.get("digest") for m in doc.get("manifests") or [] if isinstance(m, dict)]
        names = ", ".join(f"{ref.pinned(str(d))}" for d in listed[:4] if isinstance(d, str))
        raise UsageError(f"{ref.display()} is an index of {len(listed)} manifest(s) (a multi-platform list); "
                         f"pull one of them by digest{': ' + names if names else ''}")
    if doc.get("schemaVersion") != 2 or kind not in (*MANIFEST_TYPES, ""):
        raise UsageError(f"{ref.display()}: unsupported manifest type {str(kind or doc.get('schemaVersion'))[:80]!r}"
                         " (an OCI or Docker v2 image manifest is expected)")
    return Artifact(ref, digest, _layers(ref, doc))


def _layers(ref: OciRef, doc: dict[str, Any]) -> tuple[Layer, ...]:
    config: dict[str, Any] = doc["config"] if isinstance(doc.get("config"), dict) else {}
    raw = doc.get("layers")
    if not isinstance(raw, list):
        raise FormatError(f"{ref.display()}: the manifest has no layers list")
    weights: list[tuple[str, Sha256, int, str | None]] = []
    mmproj: list[tuple[str, Sha256, int, str | None]] = []
    unknown: list[str] = []
    for layer in raw:
        if not isinstance(layer, dict):
            raise FormatError(f"{ref.display()}: a layer of the manifest is not an object")
        media = str(layer.get("mediaType", ""))
        if media in SKIPPED_TYPES:
            continue
        if media not in WEIGHTS_TYPES and media not in MMPROJ_TYPES:
            unknown.append(media[:100] or "(none)")
            continue
        m = _DIGEST.fullmatch(str(layer.get("digest", "")))
        size = layer.get("size")
        if m is None or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{ref.display()}: a {media} layer has no valid sha256 digest and size")
        entry = (media, check_sha256(m[1]), size, _title(layer.get("annotations")))
        (weights if media in WEIGHTS_TYPES else mmproj).append(entry)
    if not weights:
        kind = doc.get("artifactType") or config.get("mediaType") or "unknown"
        types = ", ".join(sorted(set(unknown))) or "none"
        raise UsageError(f"{ref.display()} is not a GGUF model artifact: its type is {str(kind)[:100]} with "
                         f"layers of type {types[:300]} (modelfs pulls Docker Model Runner's {DMR_GGUF} and "
                         f"Ollama's {OLLAMA_MODEL})")
    if unknown:
        raise UsageError(f"{ref.display()}: unsupported layer type(s) {', '.join(sorted(set(unknown)))[:300]} "
                         "beside the GGUF weights; modelfs takes GGUF weights and their projector only")
    if len(mmproj) > 1:
        raise UsageError(f"{ref.display()} has {len(mmproj)} projector layers; modelfs takes one mmproj per model")
    out = _name_weights(ref, weights)
    for media, sha, size, title in mmproj:
        out.append(Layer(media, sha, size, title or "mmproj.gguf", "mmproj"))
    if len({layer.filename for layer in out}) != len(out):
        raise UsageError(f"{ref.display()}: two layers carry the same file name")
    return tuple(out)


def _name_weights(ref: OciRef, weights: list[tuple[str, Sha256, int, str | None]]) -> list[Layer]:
    if len(weights) == 1:
        media, sha, size, title = weights[0]
        return [Layer(media, sha, size, title or "model.gguf", "weights")]
    titles = [w[3] for w in weights]
    if None in titles:  # names derived in layer order, as a split set
        names = [f"model-{i:05d}-of-{len(weights):05d}.gguf" for i in range(1, len(weights) + 1)]
    else:
        names = [t for t in titles if t is not None]
        sets, singles = group(names)
        if len(sets) != 1 or singles or len(sets[0]) != len(names):
            raise UsageError(f"{ref.display()} has {len(weights)} weights layers that are not one split GGUF set "
                             f"({', '.join(names[:4])}); modelfs takes one model per artifact")
    by_name = dict(zip(names, weights, strict=True))
    ordered = group(names)[0][0]
    return [Layer(by_name[n][0], by_name[n][1], by_name[n][2], n, "weights" if i == 0 else "shard")
            for i, n in enumerate(ordered)]


def _title(annotations: object) -> str | None:
    """The file name a layer's annotations give, when it is a safe one."""
    if not isinstance(annotations, dict):
        return None
    for key in (TITLE, DMR_FILEPATH):
        value = annotations.get(key)
        if isinstance(value, str):
            value = value.rsplit("/", 1)[-1]
            if filename_problem(value) is None and value.lower().endswith(".gguf"):
                return value
    return None


def default_name(ref: OciRef) -> str:
    """A model name from a reference: ``oci://h/ai/qwen3:0.6b`` -> ``qwen3-0.6b``."""
    stem = ref.repo.rsplit("/", 1)[-1]
    if ref.tag and ref.tag != "latest":
        stem += f"-{ref.tag}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip(".-")[:128] or "model"


# -- push ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PushResult:
    name: str
    version: int
    reference: str            # what was pushed to (oci://host/repo:tag)
    digest: str               # sha256:<hex> of the manifest
    blobs: int                # config + files
    blobs_skipped: int        # already in the registry
    bytes_uploaded: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "reference": self.reference, "digest": self.digest,
                "source": parse_reference(self.reference).pinned(self.digest), "blobs": self.blobs,
                "blobs_skipped": self.blobs_skipped, "bytes_uploaded": self.bytes_uploaded}


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int
    path: Path | None = None
    data: bytes | None = None


LAYER_TYPES = {"weights": DMR_GGUF, "shard": DMR_GGUF, "mmproj": DMR_MMPROJ}


async def push(catalog: Catalog, blobs: BlobStore, http: Http, name: str, target: str,
               progress: Callable[[int], None] | None = None,
               set_total: Callable[[int], None] | None = None) -> PushResult:
    """Publish ``name``'s active version at ``target`` (``oci://HOST/REPO:TAG``)."""
    ref = parse_reference(target)
    if ref.digest is not None:
        raise UsageError("push to a tag (oci://HOST/REPO:TAG): a registry names a pushed manifest by its digest")
    model = catalog.get_model(name)
    if model.active_version is None:
        raise NotFound(f"model {name!r} has no active version")
    version = catalog.get_version(name, model.active_version)
    files = sorted((f for f in version.files if f.role in LAYER_TYPES),
                   key=lambda f: ({"weights": 0, "shard": 1, "mmproj": 2}[f.role], f.filename))
    if not files or files[0].role != "weights":
        raise UsageError(f"model {name!r} version {version.version} has no GGUF weights to push")
    for f in files:
        if not blobs.has(f.sha256):
            raise UsageError(f"{name}/{f.filename} is not local (dehydrated): open it through the mount or pull "
                             "the model again first, then push")
    skipped_roles = sorted({f.filename for f in version.files if f.role not in LAYER_TYPES})
    if skipped_roles:
        log.info("push of %s leaves out %s (not GGUF weights or projector)", name, ", ".join(skipped_roles))
    card = version.card
    cfg: dict[str, Any] = {"format": "gguf"}
    for key, src in (("architecture", "architecture"), ("quantization", "quantization")):
        if card.get(src):
            cfg[key] = str(card[src])
    if card.get("context_length"):
        cfg["context_size"] = int(card["context_length"])
    cfg["size"] = str(sum(f.size for f in files))
    config_doc = {"config": cfg, "descriptor": {}, "rootfs": {"type": "rewritten",
                                                              "diff_ids": [f"sha256:{f.sha256}" for f in files]}}
    config = json.dumps(config_doc, sort_keys=True, separators=(",", ":")).encode()
    config_blob = _Blob("sha256:" + hashlib.sha256(config).hexdigest(), len(config), data=config)
    uploads = [config_blob, *(_Blob(f"sha256:{f.sha256}", f.size, path=blobs.path(f.sha256)) for f in files)]

    auth = registry_auth(http)
    auth.name(ref)
    with _tls_hint(ref):
        await auth.authorize(http, ref, "pull,push", ref.blob_url(config_blob.digest))
    if set_total is not None:
        set_total(sum(b.size for b in uploads))
    skipped = uploaded = 0
    renew = _Renew(http, auth, ref, ref.blob_url(config_blob.digest))
    for blob in uploads:
        await renew()
        url = ref.blob_url(blob.digest)
        head = await _send(http, "HEAD", url, redact_url(url))
        if head.status == 200:
            skipped += 1
            if progress is not None:
                progress(blob.size)
            continue
        if head.status != 404:
            raise _fail(head, f"{ref.display()}: blob {blob.digest[:19]}…")
        uploaded += await _upload(http, ref, blob, progress, renew)

    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": DMR_CONFIG, "digest": config_blob.digest, "size": config_blob.size},
        "layers": [{"mediaType": LAYER_TYPES[f.role], "digest": f"sha256:{f.sha256}", "size": f.size,
                    "annotations": {TITLE: f.filename}} for f in files],
    }
    body = json.dumps(manifest, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    url = ref.manifest_url()
    await renew()
    response = await _send(http, "PUT", url, redact_url(url), {"Content-Type": OCI_MANIFEST}, content=body)
    if response.status not in (200, 201):
        raise _fail(response, f"{ref.display()}: the manifest")
    said = response.headers.get("docker-content-digest")
    if said and said != digest:
        raise IntegrityError(f"{ref.display()}: the registry stored the manifest as {said[:23]}…, not {digest[:23]}…")
    return PushResult(name, version.version, ref.display(), digest, len(uploads), skipped, uploaded)


@dataclass(frozen=True)
class _Renew:
    """Before each request of a push: a new token when the one it has is near expiry (a
    long upload outlives a registry's token)."""
    http: Http
    auth: RegistryAuth
    ref: OciRef
    probe: str

    async def __call__(self) -> None:
        await self.auth.authorize(self.http, self.ref, "pull,push", self.probe)


async def _upload(http: Http, ref: OciRef, blob: _Blob, progress: Callable[[int], None] | None,
                  renew: _Renew) -> int:
    """One blob: POST an upload, PATCH it in chunks, PUT ``?digest=``. Returns its size."""
    what = f"{ref.display()}: upload of {blob.digest[:19]}…"
    start = f"{ref.base}/v2/{ref.repo}/blobs/uploads/"
    response = await _send(http, "POST", start, redact_url(start), {"Content-Length": "0"}, content=b"")
    if response.status != 202 or "location" not in response.headers:
        raise _fail(response, what)
    location = _location(ref, start, response.headers["location"], what)
    offset = 0
    # A store blob, never through a link planted in its place.
    f = os.fdopen(open_file(blob.path, os.O_RDONLY), "rb") if blob.path is not None else None
    try:
        while offset < blob.size:
            chunk = blob.data[offset:offset + UPLOAD_CHUNK] if blob.data is not None else \
                f.read(UPLOAD_CHUNK) if f is not None else b""
            if not chunk:
                raise IntegrityError(f"{what}: the local blob is shorter than its recorded size")
            await renew()
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(chunk)),
                       "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
            response = await _send(http, "PATCH", location, redact_url(location), headers, content=chunk)
            if response.status != 202 or "location" not in response.headers:
                raise _fail(response, what)
            location = _location(ref, location, response.headers["location"], what)
            offset += len(chunk)
            if progress is not None:
                progress(len(chunk))
    finally:
        if f is not None:
            f.close()
    await renew()
    sep = "&" if "?" in location else "?"
    final = f"{location}{sep}{urlencode({'digest': blob.digest})}"
    response = await _send(http, "PUT", final, redact_url(location), {"Content-Length": "0"}, content=b"")
    if response.status != 201:
        raise _fail(response, what)
    return blob.size


def _location(ref: OciRef, current: str, location: str, what: str) -> str:
    """An upload's next URL; it must stay on the registry's origin (it carries our credentials)."""
    target = str(httpx.URL(current).join(location))
    if _origin(target) != _origin(ref.base):
        raise FetchError(f"{what}: the registry sent the upload to another origin; refusing to follow with "
                         "credentials")
    return target

