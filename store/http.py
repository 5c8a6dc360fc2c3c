"""The store's one HTTP layer: every request the store sends leaves through :class:`Http`.

    Http                         owns the httpx client: fast transport, no proxies or
    │                            netrc from the environment, no automatic redirects,
    │                            the stall timeout, the User-Agent
    ├── open(method, url, ...)   one request, redirects followed by the one rule below;
    │                            the final response, streaming (the caller closes it)
    │   ├── GET downloads        Downloader._attempt   (retried by the downloader)
    │   ├── head(url)            hub metadata; 429/5xx and transient failures retried
    │   │                        here with the downloader's backoff (RetryPolicy)
    │   └── get_small(url)       a small document (a signed envelope, a hub listing):
    │                            identity encoding only, refused
    │                            over ``limit`` bytes without reading past the limit,
    │                            whole within ``small_deadline`` (4 x the timeout)
    ├── offline                  an offline store sends nothing: every request is
    │                            refused before it is built
    └── addresses                an :class:`AddressRule` (for URLs an app submitted):
                                 every connection, redirects included, resolves its
                                 host once, refuses it unless every address is public
                                 or in an allowed network, and connects to exactly the
                                 addresses it checked (no second lookup to rebind)

The redirect rule (:meth:`Http.open`): at most :data:`MAX_REDIRECTS` hops; a target
must be a valid http(s) URL and never https downgraded to http
(:func:`redirect_target`); a hop to another origin keeps only
:data:`CROSS_ORIGIN_SAFE_HEADERS`; the per-URL ``auth`` hook is asked again on every
hop, so credentials go only to the origin they belong to.

Errors (:func:`map_errors`, modelled on httpx's ``map_httpcore_exceptions``): what
httpx or httpcore raise is translated here and only here, always ``from None`` (an
httpx message may quote a URL with its secrets)::

    httpx / httpcore                     store error                             transient
    ConnectError                         OfflineError  "cannot reach HOST: WHY"     yes
    TimeoutException   (no body yet)     FetchError    "HOST did not answer ..."    yes
    RemoteProtocolError, ReadError,
    WriteError         (no body yet)     FetchError    "connection to HOST failed"  yes
    any of the above   (reading a body)  FetchError    "connection to HOST lost
                                                        after N bytes"              yes
    any other HTTPError                  FetchError    "request to HOST failed"     no
    InvalidURL         (the first URL)   UsageError    "not a valid URL"            no
    HTTP 429, 5xx      (status_error)    FetchError    "HTTP 503 from HOST"         yes

A transient error carries ``transient=True`` in its fields (and ``retry_after`` in
seconds when the server said so): :func:`is_transient` is what a caller that retries
asks. Messages name the redacted URL and the host only, never a credential.

This module never writes a byte to disk and never touches the catalog.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
import trio

from .errors import FetchError, FormatError, InternalError, ManifestError, OfflineError, StoreError, UsageError
from .redact import redact_url

__all__ = ["CROSS_ORIGIN_SAFE_HEADERS", "MAX_REDIRECTS", "AddressRule", "Auth", "BigReadStream", "Http",
           "RetryPolicy", "address_refusal", "fast_transport", "is_transient", "map_errors", "redirect_target",
           "status_error"]

log = logging.getLogger(__name__)

MAX_REDIRECTS = 10
#: A small document (an envelope, a hub listing page, a registry manifest or token) must
#: arrive whole within this many ``timeout``s: the timeout alone bounds each wait, so a
#: server that sends a byte just before every one of them would hold the caller forever.
SMALL_DEADLINE_TIMEOUTS = 4
READ_BYTES = 1 << 20  # socket read size; httpcore's 64 KiB default halves throughput
LOWAT_BYTES = 256 << 10  # wake the event loop per 256 KiB of body, not per segment
# Headers that may follow a redirect to another origin. Everything else (Authorization,
# cookies, custom tokens) stays with the origin it was meant for.
CROSS_ORIGIN_SAFE_HEADERS = frozenset({"accept", "accept-encoding", "user-agent", "range", "if-range"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

#: The per-request credential hook: headers to add for one URL (asked on every hop).
Auth = Callable[[str], Mapping[str, str]]


# -- a faster transport ----------------------------------------------------------------
class BigReadStream(httpcore.AsyncNetworkStream):
    """Reads up to :data:`READ_BYTES` per call whatever httpcore asks for.

    On a plain trio TCP socket it reads with ``recv_into`` into one reused buffer and
    returns an exact-size copy: ``recv(1 MiB)`` would allocate (and on a VM, fault in
    and unmap) a fresh 1 MiB object per read, which costs more than the read itself.
    TLS streams go through the stream as usual."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._sock: trio.socket.SocketType | None = None
        self._view: memoryview | None = None
        self._lowat = 1
        if inner.get_extra_info("ssl_object") is None:
            try:
                sock = inner.get_extra_info("socket")
            except Exception:  # an unknown backend: use the stream as it is
                sock = None
            if isinstance(sock, trio.socket.SocketType):
                self._sock = sock
                self._view = memoryview(bytearray(READ_BYTES))

    def expect(self, remaining: int | None) -> None:
        """Body bytes still to come on this connection (None: unknown or done).

        Sets ``SO_RCVLOWAT`` so the event loop wakes once a useful amount has arrived
        instead of for every segment: a fast reader otherwise spends its time on
        per-read overhead. Never above ``remaining``, so the last read cannot wait for
        bytes that will not come (the caller knows h11 holds no body bytes by then)."""
        if self._sock is None:
            return
        want = 1 if remaining is None or remaining <= 0 else min(LOWAT_BYTES, remaining)
        if want != self._lowat:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                self._lowat = want
            except OSError:
                pass  # an optimisation only

    @property
    def direct(self) -> bool:
        """A plain TCP trio socket that :meth:`recv_into` can read (not TLS, a known backend)."""
        return self._sock is not None

    async def recv_into(self, view: memoryview) -> int:
        """Body bytes straight off the socket into ``view``, past h11 (see ``direct``).
        Failures are httpcore's, so :func:`map_errors` translates them like any other."""
        assert self._sock is not None
        try:
            n = await self._sock.recv_into(view)
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc
        if n == 0:
            raise httpcore.RemoteProtocolError("peer closed connection before the end of the body")
        return n

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._sock is None or self._view is None:
            return await self._inner.read(max(max_bytes, READ_BYTES), timeout)
        try:
            with trio.fail_after(float("inf") if timeout is None else timeout):
                n = await self._sock.recv_into(self._view)
        except trio.TooSlowError:
            raise httpcore.ReadTimeout("timed out") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpcore.ReadError(str(exc)) from exc
        # httpcore hands this straight to h11, which copies it into its own buffer before
        # the next read can overwrite it; skipping our copy saves one pass over every byte.
        return self._view[:n]  # type: ignore[return-value]

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return BigReadStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _BigReadBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return BigReadStream(await self._inner.connect_tcp(*args, **kwargs))

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return BigReadStream(await self._inner.connect_unix_socket(*args, **kwargs))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def fast_transport(*, verify: ssl.SSLContext | str | bool = True,
                   addresses: AddressRule | None = None) -> httpx.AsyncHTTPTransport:
    """An ``httpx.AsyncHTTPTransport`` whose connections read 1 MiB per socket read and,
    with ``addresses``, connect only where the rule allows.

    httpx offers no public knob for either; if its internals move, the read size falls
    back to the stock transport (slower, still correct), but an address rule that cannot
    be installed is an error: it must never be skipped."""
    transport = httpx.AsyncHTTPTransport(verify=verify)
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, httpcore.AsyncNetworkBackend):
        if addresses is not None:
            backend = _GuardedBackend(backend, addresses)
        pool._network_backend = _BigReadBackend(backend)  # type: ignore[union-attr]
    elif addresses is not None:
        raise InternalError("cannot enforce the address rule: httpx's transport has no network backend to wrap")
    return transport


# -- addresses -------------------------------------------------------------------------
#: host, port -> the IP addresses to connect to (the system resolver by default)
Resolve = Callable[[str, int], Awaitable[list[str]]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_refusal(ip: str, allowed: Sequence[Network] = ()) -> str | None:
    """Why ``ip`` may not be reached (None: it may): not public, unless in ``allowed``."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if any(addr in net for net in allowed):
        return None
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(addr, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return None if addr.is_global else "not a public address"


@dataclass(frozen=True)
class AddressRule:
    """Connections only to public addresses, and to the ``allowed`` networks."""
    allowed: tuple[Network, ...] = ()
    resolve: Resolve = _system_resolve

    @classmethod
    def of(cls, networks: Sequence[str]) -> AddressRule:
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    async def addresses(self, host: str, port: int, timeout: float | None) -> list[str]:
        """The addresses of ``host``, every one of them checked; FetchError (not
        transient) when one is refused, httpcore's connect errors when none resolves."""
        try:
            with trio.fail_after(float("inf") if timeout is None else timeout):
                ips = await self.resolve(host, port)
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        if not ips:
            raise httpcore.ConnectError(f"{host} has no address")
        for ip in ips:
            why = address_refusal(ip, self.allowed)
            if why is not None:
                raise FetchError(f"refusing to connect to {host}: {ip} is {why} (a caller's URL may reach public "
                                 "addresses only; see the setting apps.allowed_networks)", host=host,
                                 reason="address-refused")
        return ips


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the checked addresses of a host only (:class:`AddressRule`)."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend, rule: AddressRule) -> None:
        self._inner = inner
        self._rule = rule

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        last: Exception | None = None
        for ip in await self._rule.addresses(host, port, timeout):
            try:
                return await self._inner.connect_tcp(ip, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise FetchError("refusing a unix socket connection for a caller's URL", reason="address-refused")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# -- errors ----------------------------------------------------------------------------
# httpcore's own classes: BigReadStream raises them where no httpx layer wraps the read.
_BROKEN = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
           httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)
_TIMEOUT = (httpx.TimeoutException, httpcore.TimeoutException)
_HTTPCORE = (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError)


@contextlib.contextmanager
def map_errors(shown: str, host: str, *, timeout: float, received: Callable[[], int] | None = None
               ) -> Iterator[None]:
    """Translate what httpx or httpcore raise inside the block (see the module docstring).
    ``received``, while reading a body: how many body bytes had arrived."""
    try:
        yield
    except (httpx.HTTPError, *_HTTPCORE) as exc:
        raise _store_error(exc, shown, host, timeout, None if received is None else received()) from None


def _store_error(exc: Exception, shown: str, host: str, timeout: float, received: int | None) -> FetchError:
    name = type(exc).__name__
    if isinstance(exc, (httpx.ConnectError, httpcore.ConnectError)):
        return OfflineError(f"{shown}: cannot reach {host}: {_connect_reason(exc)}", host=host, transient=True)
    if isinstance(exc, _TIMEOUT + _BROKEN) and received is not None:
        return FetchError(f"{shown}: connection to {host} lost after {received} bytes ({name})", transient=True)
    if isinstance(exc, _TIMEOUT):
        return FetchError(f"{shown}: {host} did not answer within {timeout:g}s", transient=True)
    if isinstance(exc, _BROKEN):
        return FetchError(f"{shown}: connection to {host} failed ({name})", transient=True)
    return FetchError(f"{shown}: request to {host} failed ({name})")


def status_error(response: httpx.Response, shown: str) -> FetchError | None:
    """The transient error an HTTP 429 or 5xx stands for (``Retry-After`` honoured), else None."""
    status = response.status_code
    if status != 429 and not 500 <= status <= 599:
        return None
    after = _parse_retry_after(response.headers.get("retry-after"), time.time())
    return FetchError(f"{shown}: HTTP {status} from {response.url.host}", status=status, transient=True,
                      retry_after=after)


def is_transient(exc: StoreError) -> bool:
    """Worth another attempt: a network failure, a timeout, HTTP 429 or 5xx."""
    return bool(exc.fields.get("transient"))


def _connect_reason(exc: BaseException) -> str:
    """A short, secret-free reason from the OS errors behind a failed connect (trio
    wraps one OSError per address tried in a group)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cause = todo.pop(0)
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None:
            if cause.errno == errno.ECONNREFUSED:
                return "connection refused"
            if cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                return "no route to host"
            if isinstance(cause, socket.gaierror):
                return "name resolution failed"
            return cause.strerror or "connection failed"
        todo.extend(getattr(cause, "exceptions", ()))
        todo.extend(c for c in (cause.__cause__, cause.__context__) if c is not None)
    return "connection failed"


def _parse_retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


# -- redirects -------------------------------------------------------------------------
def redirect_target(current: httpx.URL, location: str, shown: str) -> httpx.URL:
    """Where a redirect from ``current`` leads; FetchError for an unsafe hop
    (invalid address, a scheme other than http(s), https downgraded to http).
    Every redirect the store follows, downloads and envelopes alike, passes here."""
    try:
        target = current.join(location)
    except httpx.InvalidURL:
        raise FetchError(f"{shown}: the server redirected to an invalid address") from None
    if target.scheme not in ("http", "https"):
        raise FetchError(f"{shown}: refusing a redirect to a {target.scheme or 'relative'} URL")
    if current.scheme == "https" and target.scheme != "https":
        raise FetchError(f"{shown}: refusing a redirect from https to plain http")
    return target


def _parse_url(url: str, shown: str) -> httpx.URL:
    try:
        return httpx.URL(url)
    except httpx.InvalidURL:
        raise UsageError(f"{shown}: not a valid URL") from None


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


# -- retries ---------------------------------------------------------------------------
@dataclass
class RetryPolicy:
    """How transient failures are retried: by the downloader's attempts and by HEAD."""
    max_retries: int = 5
    backoff: tuple[float, float] = (0.5, 30.0)      # first delay, cap (seconds)
    retry_after_cap: float = 60.0
    sleep: Callable[[float], Awaitable[None]] = trio.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, failures: int, retry_after: float | None) -> float:
        base, cap = self.backoff
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap) + self.rng.uniform(0, base / 2)
        delay = min(cap, base * 2.0 ** (failures - 1))
        return delay * (0.5 + self.rng.random() / 2)  # jitter: never all clients at once


def _no_credentials(url: str) -> Mapping[str, str]:
    return {}


# -- the layer -------------------------------------------------------------------------
class Http:
    """The store's HTTP client. Use from one trio thread; close with :meth:`aclose`.

    ``auth(url)`` gives the credentials for one URL (default: none); ``timeout`` is the
    longest wait for a connection, a response or the next body bytes; ``addresses``
    restricts where it connects (module docstring)."""

    def __init__(self, *, offline: bool = False, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 verify: ssl.SSLContext | str | bool = True, user_agent: str = "modelfs/0.1",
                 auth: Auth | None = None, retry: RetryPolicy | None = None,
                 addresses: AddressRule | None = None) -> None:
        if addresses is not None and transport is not None:
            raise InternalError("an address rule needs the store's own transport")
        self.offline = offline
        self.timeout = timeout
        self.addresses = addresses  # installed in the transport: kept here to be asked about
        self.auth: Auth = auth or _no_credentials
        self.retry = retry or RetryPolicy()
        self._client = httpx.AsyncClient(
            transport=transport or fast_transport(verify=verify, addresses=addresses),
            follow_redirects=False,
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": user_agent},
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def check_online(self, shown: str) -> None:
        if self.offline:
            raise OfflineError(f"{shown}: the store is offline")

    @contextlib.contextmanager
    def small_deadline(self, shown: str) -> Iterator[None]:
        """The whole of one small exchange (:data:`SMALL_DEADLINE_TIMEOUTS` x ``timeout``):
        a server that trickles it is cut off with a transient FetchError."""
        limit = SMALL_DEADLINE_TIMEOUTS * self.timeout
        try:
            with trio.fail_after(limit):
                yield
        except trio.TooSlowError:
            raise FetchError(f"{shown}: the server did not send this small document within {limit:g}s",
                             transient=True) from None

    @contextlib.contextmanager
    def body_errors(self, response: httpx.Response, shown: str, received: Callable[[], int]) -> Iterator[None]:
        """:func:`map_errors` for reading ``response``'s body."""
        with map_errors(shown, response.url.host, timeout=self.timeout, received=received):
            yield

    async def open(self, method: str, url: str, headers: Mapping[str, str], shown: str, *,
                   follow_cross_origin: bool = True, content: bytes | None = None) -> httpx.Response:
        """Send ``method``, following redirects by the one rule (module docstring); the
        final response, streaming: the caller closes it. With ``follow_cross_origin``
        False, a redirect to another origin is the (closed) final response. ``content``
        is a small request body (a registry upload's chunk), sent again on every hop."""
        self.check_online(shown)
        current = _parse_url(url, shown)
        hdrs = dict(headers)
        for hop in range(MAX_REDIRECTS + 1):
            request = self._client.build_request(method, current, headers={**hdrs, **self.auth(str(current))},
                                                 content=content)
            with map_errors(shown, current.host, timeout=self.timeout):
                response = await self._client.send(request, stream=True)
            if response.status_code not in REDIRECT_STATUSES or "location" not in response.headers:
                return response
            await response.aclose()
            target = redirect_target(current, response.headers["location"], shown)
            cross = _origin(target) != _origin(current)
            if cross and not follow_cross_origin:
                return response
            if cross:
                hdrs = {k: v for k, v in hdrs.items() if k.lower() in CROSS_ORIGIN_SAFE_HEADERS}
            log.debug("redirect %d of %s (%s)", hop + 1, shown, "to another origin" if cross else "same origin")
            current = target
        raise FetchError(f"{shown}: too many redirects (more than {MAX_REDIRECTS})")

    async def head(self, url: str, *, follow_cross_origin: bool = False) -> httpx.Response:
        """HEAD ``url`` with retries, following same-origin redirects only (unless asked):
        the hub answers a resolve URL with a 302 whose headers carry the file's hash.
        The response is closed; its status and headers are what is left to read."""
        shown = redact_url(url)
        failures = 0
        while True:
            try:
                with self.small_deadline(shown):  # headers only: a trickle of them is cut off too
                    response = await self.open("HEAD", url, {"Accept-Encoding": "identity"}, shown,
                                               follow_cross_origin=follow_cross_origin)
                await response.aclose()
                error = status_error(response, shown)
                if error is not None:
                    raise error
                return response
            except FetchError as exc:
                failures += 1
                if not is_transient(exc) or failures > self.retry.max_retries:
                    raise
                await self.retry.sleep(self.retry.delay(failures, exc.fields.get("retry_after")))

    async def get_envelope(self, url: str, *, limit: int) -> bytes:
        """GET a small signed document (an envelope), refusing a compressed body or one over
        ``limit`` bytes without reading it past the limit. Not retried."""
        body, _ = await self.get_small(url, limit=limit, too_large=lambda: _too_large(limit))
        return body

    async def get_small(self, url: str, *, limit: int, too_large: Callable[[], StoreError],
                        follow_cross_origin: bool = True) -> tuple[bytes, httpx.Response]:
        """GET a small document (an envelope, a hub listing) whole: HTTP 200 only, identity
        encoding only, ``too_large()`` raised for a body over ``limit`` bytes, never read
        past the limit. Returns the body and the (closed) response, whose headers are
        left to read, within :meth:`small_deadline`. Not retried."""
        shown = redact_url(url)
        self.check_online(shown)
        if _parse_url(url, shown).scheme not in ("http", "https"):
            raise UsageError(f"{shown}: not an http(s) URL")
        with self.small_deadline(shown):
            return await self._get_small(url, shown, limit, too_large, follow_cross_origin)

    async def _get_small(self, url: str, shown: str, limit: int, too_large: Callable[[], StoreError],
                         follow_cross_origin: bool) -> tuple[bytes, httpx.Response]:
        response = await self.open("GET", url, {"Accept": "application/json", "Accept-Encoding": "identity"},
                                   shown, follow_cross_origin=follow_cross_origin)
        try:
            if response.status_code != 200:
                error = status_error(response, shown)
                raise error or FetchError(f"{shown}: HTTP {response.status_code} from {response.url.host}",
                                          status=response.status_code)
            if response.headers.get("content-encoding", "identity").lower() != "identity":
                raise FormatError(f"{shown}: refused: the server sent the document compressed", reason="encoded")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise too_large()
            body = bytearray()
            with self.body_errors(response, shown, lambda: len(body)):
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > limit:
                        raise too_large()
            return bytes(body), response
        finally:
            await response.aclose()


def _too_large(limit: int) -> ManifestError:
    return ManifestError(f"manifest refused: envelope is larger than {limit} bytes", reason="too-large")
