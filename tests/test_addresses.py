"""Where a caller's URL may lead (store/http.py ``AddressRule``), one transfer shared by
Downloaders that share a ``Transfers`` table, and the ``admit`` hook of a pull.

The rule is what keeps an app's pull request from reaching the machine's own services
or the LAN: every connection, redirects included, resolves its host once, checks every
address, and connects only to what it checked.
"""
# ruff: noqa: F811 - the fault server's fixtures are imported by name

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path

import pytest
import trio

from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs_store.core import Store
from modelfs_store.download import Downloader, FetchResult
from modelfs_store.errors import FetchError, Forbidden
from modelfs_store.http import AddressRule, address_refusal
from modelfs_store.keys import trust_key
from modelfs_store.pull import PullOptions, pull_source
from test_packs import Publisher, release

FAST = {"stall_timeout": 5.0, "backoff": (0.01, 0.05), "max_retries": 1}
LOOPBACK = AddressRule.of(["127.0.0.1/32"])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


@pytest.mark.parametrize(("ip", "refused"), [
    ("127.0.0.1", "a loopback address"), ("127.9.9.9", "a loopback address"), ("::1", "a loopback address"),
    ("::ffff:127.0.0.1", "a loopback address"), ("10.1.2.3", "a private address"),
    ("192.168.0.10", "a private address"), ("169.254.169.254", "a link-local address"),
    ("fe80::1%eth0", "a link-local address"), ("0.0.0.0", "a private address"), ("224.0.0.1", "a multicast address"),
    ("100.64.0.1", "not a public address"), ("fd00::1", "a private address"),
    ("93.184.216.34", None), ("2606:4700::1111", None),
])
def test_what_is_not_public(ip: str, refused: str | None) -> None:
    assert address_refusal(ip) == refused


def test_allowed_networks_let_a_lan_mirror_in() -> None:
    assert address_refusal("192.168.1.7", [ipaddress.ip_network("192.168.1.0/24")]) is None
    assert address_refusal("192.168.2.7", [ipaddress.ip_network("192.168.1.0/24")]) == "a private address"


def fetch(store: Store, url: str, data: bytes, rule: AddressRule | None) -> FetchResult:
    async def main() -> FetchResult:
        async with Downloader(store.blobs, addresses=rule, **FAST) as dl:
            return await dl.fetch(url, sha256=sha(data), size=len(data))
    return trio.run(main)


def test_a_loopback_url_is_refused_before_a_byte_is_asked(store: Store, origin: FaultServer) -> None:
    data = b"x" * 1000
    origin.add("/w.bin", data)
    with pytest.raises(FetchError, match="127.0.0.1 is a loopback address") as info:
        fetch(store, origin.url("/w.bin"), data, AddressRule())
    assert info.value.fields["reason"] == "address-refused"
    assert origin.requests() == [] and not store.blobs.has(sha(data))
    assert fetch(store, origin.url("/w.bin"), data, LOOPBACK).new  # allowed by the setting: fetched


def test_a_redirect_to_a_refused_address_is_refused(store: Store, origin: FaultServer) -> None:
    data = b"y" * 1000
    origin.add_redirect("/hop", f"http://127.0.0.2:{origin.port}/w.bin")
    with pytest.raises(FetchError, match="127.0.0.2 is a loopback address"):
        fetch(store, origin.url("/hop"), data, LOOPBACK)
    assert [r.path for r in origin.requests()] == ["/hop"]


def test_every_address_of_a_name_is_checked_and_only_those_are_used(store: Store, origin: FaultServer) -> None:
    data = b"z" * 1000
    origin.add("/w.bin", data)
    url = f"http://mirror.test:{origin.port}/w.bin"

    async def mixed(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "127.0.0.1"]

    async def mapped(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    with pytest.raises(FetchError, match="127.0.0.1 is a loopback address"):
        fetch(store, url, data, AddressRule(resolve=mixed))
    assert origin.requests() == []
    # mirror.test exists only in the rule's resolver: the connection goes to the address it checked
    res = fetch(store, url, data, AddressRule(LOOPBACK.allowed, resolve=mapped))
    assert res.new and origin.requests()[0].headers["host"] == f"mirror.test:{origin.port}"


def test_downloaders_sharing_transfers_make_one_transfer(store: Store, origin: FaultServer) -> None:
    data = hashlib.shake_256(b"shared").digest(4 << 20)
    origin.add("/w.bin", data, rate=8 << 20)
    seen: list[int] = []

    async def main() -> tuple[FetchResult, FetchResult]:
        first = Downloader(store.blobs, **FAST)
        second = Downloader(store.blobs, transfers=first.transfers, **FAST)
        async with first, second, trio.open_nursery() as nursery:
            out: list[FetchResult] = []

            async def one(dl: Downloader, progress: object = None) -> None:
                out.append(await dl.fetch(origin.url("/w.bin"), sha256=sha(data), size=len(data),
                                          progress=progress))  # type: ignore[arg-type]
            nursery.start_soon(one, first)
            while sha(data) not in first.transfers:
                await trio.sleep(0.001)
            nursery.start_soon(one, second, seen.append)
        return out[0], out[1]

    a, b = trio.run(main)
    assert len(origin.requests("/w.bin")) == 1 and {a.new, b.new} == {True, False}
    assert sum(seen) == len(data)  # the joiner saw the whole transfer's progress


def test_admit_refuses_a_pack_before_any_artifact_byte(store: Store, origin: FaultServer) -> None:
    pub = Publisher(origin)
    trust_key(store.catalog, "k1", pub.pub("k1"), actor="test")
    url = pub.serve("demo.json", release(pub, 1))
    asked: list[tuple[str, int | None]] = []

    def admit(model: str, size: int | None) -> None:
        asked.append((model, size))
        raise Forbidden("not yours", reason="not-owner")

    async def main() -> object:
        async with Downloader(store.blobs, **FAST) as dl:
            return await pull_source(store, dl, url, PullOptions(), admit=admit)

    with pytest.raises(Forbidden):
        trio.run(main)
    assert asked == [("demo", 4 + 4 * len(b"demo-1") * 1000)] and pub.artifact_bytes() == 0
    rec = store.catalog.audit_log(limit=1)[0]
    assert (rec["action"], rec["outcome"], rec["reason"]) == ("refuse", "refused", "not yours")


def test_admit_sees_an_unsigned_pull_before_its_bytes(store: Store, origin: FaultServer, tmp_path: Path) -> None:
    w = write_model(tmp_path / "u.gguf", tensor_bytes=4096, seed=3)
    origin.add("/u.gguf", w)
    digest = sha(w.read_bytes())
    sizes: list[int | None] = []

    def admit(model: str, size: int | None) -> None:
        sizes.append(size)
        raise Forbidden("over the quota")

    async def main(options: PullOptions) -> object:
        async with Downloader(store.blobs, **FAST) as dl:
            return await pull_source(store, dl, origin.url("/u.gguf"), options, admit=admit)

    for options in (PullOptions(sha256=digest), PullOptions(sha256=digest, size=w.stat().st_size)):
        with pytest.raises(Forbidden):
            trio.run(main, options)
    assert sizes == [None, w.stat().st_size] and origin.requests() == []
