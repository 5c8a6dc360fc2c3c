"""The control socket's routes and who may call them (modelfs/mount/api.py), without a
socket or a kernel: requests with made-up callers against a real store.

The store owner (its uid or root, no app id) may do everything. Anyone else lists what
it sees, pulls within ``apps.pull`` (URLs to public addresses only), and handles its
own jobs and private models; every other call is a 403 with a reason, audited.
"""
# ruff: noqa: F811 - the fault server's fixtures are imported by name

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs.mount.api import Api, Gate
from modelfs.mount.identity import Identity
from modelfs.mount.jobs import JobQueue
from modelfs.mount.server import Request, Response
from modelfs_store import settings
from modelfs_store.core import Store
from modelfs_store.policy import Grant, Policy

OWNER = os.geteuid()
OTHER = 1001
A, B = "org.example.A", "org.example.B"


class World:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.grants: list[Grant] = []
        gate = Gate(store, self.policy, {})
        self.jobs = JobQueue(store, gate.prepare)
        self.api = Api(store, self.jobs, self.policy, lambda: {"mountpoint": "/m", "fetch_errors": [{"x": 1}]},
                       gate=gate)

    def policy(self) -> Policy:
        return Policy(OWNER, self.grants)

    def call(self, method: str, path: str, body: Any = None, *, uid: int = OWNER, app: str | None = None,
             sure: bool = True) -> Response:
        target, _, query = path.partition("?")
        req = Request(method, target, dict(q.split("=") for q in query.split("&") if q),
                      json.dumps(body).encode() if body is not None else b"",
                      Identity(uid, app, "test", 4242, sure), "pidfd")
        return trio.run(self.api.handle, req)

    def denials(self) -> list[dict[str, Any]]:
        return [r for r in self.store.catalog.audit_log() if r["action"] == "deny"]


@pytest.fixture
def world(tmp_path: Path) -> World:
    store = Store.open(tmp_path / "store")
    for name, seed, private in (("open", 1, False), ("secret", 2, True)):
        w = write_model(tmp_path / f"{name}.gguf", tensor_bytes=4096, seed=seed)
        store.import_model(name, w, owner_app=A if private else None, private=private)
    yield World(store)
    store.close()


def test_unknown_routes_and_methods(world: World) -> None:
    assert world.call("GET", "/v1/nothing").status == 404
    r = world.call("DELETE", "/v1/pulls")
    assert r.status == 405 and r.headers["allow"] == "GET, POST"


def test_status_says_who_asks(world: World) -> None:
    owner = world.call("GET", "/v1/status").body
    assert owner["caller"] == {"uid": OWNER, "app_id": None, "rule": "test", "sure": True, "owner": True,
                               "peer": "pidfd"}
    assert owner["fetch_errors"] == [{"x": 1}]
    other = world.call("GET", "/v1/status", uid=OTHER, app=A).body
    assert other["caller"]["owner"] is False and other["fetch_errors"] == []  # model names stay the owner's


def test_models_are_what_the_caller_sees(world: World) -> None:
    def names(**who: Any) -> list[str]:
        return [m["name"] for m in world.call("GET", "/v1/models", **who).body]
    assert names() == ["open", "secret"]
    assert names(app=A) == ["open", "secret"]
    assert names(uid=OTHER) == ["open"] and names(app=B) == ["open"]
    assert names(uid=OTHER, app=A, sure=False) == ["open"]
    r = world.call("GET", "/v1/models/secret", uid=OTHER)
    assert r.status == 404 and "secret" in r.body["error"]["message"]  # the name it asked for, nothing more
    world.grants.append(Grant(B, "secret", OWNER))
    assert names(app=B) == ["open", "secret"]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/settings", None), ("POST", "/v1/settings", {"key": "apps.pull", "value": "any"}),
    ("GET", "/v1/grants", None), ("POST", "/v1/grants", {"app_id": A, "model": "open"}),
    ("POST", "/v1/grants/revoke", {"app_id": A, "model": "open"}),
])
def test_owner_only_routes_refuse_everyone_else_and_audit_it(world: World, method: str, path: str,
                                                             body: Any) -> None:
    for who in ({"uid": OTHER}, {"app": A}, {"uid": OWNER, "sure": False}):
        r = world.call(method, path, body, **who)
        assert r.status == 403 and r.body["error"]["reason"] == "owner-only" and r.body["error"]["exit_code"] == 7
    assert len(world.denials()) == 3
    assert json.loads(world.denials()[0]["detail"])["path"] == path
    assert settings.get(world.store.catalog, "apps.pull") == "signed"


def test_the_owner_sets_settings_and_grants(world: World) -> None:
    world.store.catalog.add_app(A, None)
    r = world.call("POST", "/v1/settings", {"key": "apps.pull", "value": "any"})
    assert r.status == 200 and r.body["value"] == "any"
    assert world.call("POST", "/v1/settings", {"key": "apps.pull", "value": "yes"}).status == 400
    assert world.call("GET", "/v1/settings").body["apps.pull"] == "any"
    assert world.call("POST", "/v1/grants", {"app_id": A, "model": "open", "uid": OTHER}).status == 201
    assert world.call("GET", "/v1/grants").body[0]["uid"] == OTHER
    assert world.call("POST", "/v1/grants/revoke", {"app_id": A, "model": "open", "uid": OTHER}).body["changed"]


def test_an_app_pull_is_refused_by_apps_pull(world: World) -> None:
    unsigned = {"source": "https://example.org/w.gguf", "sha256": "a" * 64}
    r = world.call("POST", "/v1/pulls", unsigned, uid=OTHER)
    assert r.status == 403 and r.body["error"]["reason"] == "apps.pull"
    settings.set_value(world.store.catalog, "apps.pull", "deny", actor="t")
    r = world.call("POST", "/v1/pulls", {"source": "https://example.org/p.json"}, app=A)
    assert r.status == 403 and "apps.pull = deny" in r.body["error"]["message"]
    assert len(world.denials()) == 2 and world.jobs.jobs == {}


@pytest.mark.parametrize("source", ["/etc/passwd", "file:///etc/passwd", "relative/pack.json"])
def test_an_app_never_makes_the_daemon_read_a_file(world: World, source: str) -> None:
    r = world.call("POST", "/v1/pulls", {"source": source}, app=A)
    assert r.status == 403 and r.body["error"]["reason"] == "source"


def test_an_app_url_on_loopback_is_refused_at_once(world: World, origin: FaultServer) -> None:
    settings.set_value(world.store.catalog, "apps.pull", "any", actor="t")
    r = world.call("POST", "/v1/pulls", {"source": origin.url("/w.gguf"), "sha256": "a" * 64}, app=A)
    assert r.status == 403 and r.body["error"]["reason"] == "address"
    assert "127.0.0.1 is a loopback address" in r.body["error"]["message"]
    assert origin.requests() == [] and world.jobs.jobs == {}


def test_an_app_pull_is_its_own_private_model(world: World) -> None:
    r = world.call("POST", "/v1/pulls", {"source": "https://example.org/p.json", "app": A, "private": False},
                   uid=OTHER, app=A)
    assert r.status == 201
    assert r.body["options"] == {"owner_app": A, "owner_uid": OTHER, "pack": True, "private": True}
    r = world.call("POST", "/v1/pulls", {"source": "https://example.org/p.json", "app": B}, app=A)
    assert r.status == 403 and r.body["error"]["reason"] == "app"
    r = world.call("POST", "/v1/pulls", {"source": "https://example.org/q.json"}, app=A)
    assert "owner_uid" not in r.body["options"]  # the store owner's uid is recorded as NULL
    assert world.call("POST", "/v1/pulls", {"source": "https://x.org/p.json"}, uid=OTHER, sure=False).status == 403


def test_a_caller_sees_and_handles_its_own_jobs_only(world: World) -> None:
    mine = world.call("POST", "/v1/pulls", {"source": "https://example.org/p.json"}, uid=OTHER).body
    theirs = world.call("POST", "/v1/pulls", {"source": "https://example.org/o.json"}).body
    assert [j["id"] for j in world.call("GET", "/v1/pulls", uid=OTHER).body] == [mine["id"]]
    assert len(world.call("GET", "/v1/pulls").body) == 2  # the owner sees every job
    assert world.call("GET", f"/v1/pulls/{theirs['id']}", uid=OTHER).status == 403
    assert world.call("POST", f"/v1/pulls/{theirs['id']}/cancel", uid=OTHER).status == 403
    assert world.call("GET", f"/v1/events?job={theirs['id']}", uid=OTHER).status == 403
    assert world.call("POST", f"/v1/pulls/{theirs['id']}/cancel", uid=OTHER, app=A).status == 403
    r = world.call("POST", f"/v1/pulls/{mine['id']}/pause", uid=OTHER)
    assert r.status == 200 and r.body["state"] == "paused"
    r = world.call("POST", f"/v1/pulls/{mine['id']}/cancel", uid=OTHER)
    assert r.body["state"] == "cancelled"
    assert world.call("POST", f"/v1/pulls/{mine['id']}/resume", uid=OTHER).status == 409
    assert world.call("GET", "/v1/pulls/999").status == 404


def test_a_caller_removes_only_the_private_models_it_owns(world: World) -> None:
    cat = world.store.catalog
    w = write_model(world.store.layout.root.parent / "mine.gguf", tensor_bytes=4096, seed=9)
    world.store.import_model("mine", w, private=True)
    cat.set_visibility("mine", "private", owner_uid=OTHER, actor="t")
    assert world.call("DELETE", "/v1/models/open", uid=OTHER).status == 403      # shared: the owner's
    assert world.call("DELETE", "/v1/models/secret", uid=OTHER).status == 404    # not even visible
    assert world.call("DELETE", "/v1/models/mine", uid=OTHER, app=A).status == 404
    r = world.call("DELETE", "/v1/models/mine", uid=OTHER)
    assert r.status == 200 and r.body["models"] == ["mine"] and not cat.has_model("mine")
    assert world.call("DELETE", "/v1/models/secret").status == 200               # the owner may


def test_a_running_app_job_is_held_to_ownership_quota_addresses_and_its_own_token(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelfs_store.errors import Forbidden

    monkeypatch.setenv("HF_TOKEN", "hf_theownerstoken1")  # the daemon user's: never an app's
    monkeypatch.setenv("MODELFS_HF_ENDPOINT", "https://hub.example")
    created = world.call("POST", "/v1/pulls", {"source": "https://example.org/p.json"}, uid=OTHER, app=A).body
    job = world.jobs.get(created["id"])
    dl, admit = world.api.gate.prepare(job)
    assert admit is not None and dl.http.auth("https://hub.example/x") == {}
    assert dl.http.addresses is not None and dl.http.addresses.allowed == ()
    with pytest.raises(Forbidden, match="exists and is not this caller's"):
        admit("open", 10)
    admit("new-model", 10**12)  # no quota by default
    settings.set_value(world.store.catalog, "apps.quota_bytes", 1 << 20, actor="t")
    with pytest.raises(Forbidden, match="over the quota"):
        admit("new-model", 2 << 20)
    with pytest.raises(Forbidden, match="not known"):
        admit("new-model", None)
    admit("new-model", 1 << 20)
    assert [r["reason"] for r in world.denials()][:1] == ["a quota of 1048576 bytes applies, and the size of this "
                                                          "pull is not known (give its size)"]
    # The setting changed since the job was queued: it is judged again when it starts.
    settings.set_value(world.store.catalog, "apps.pull", "deny", actor="t")
    with pytest.raises(Forbidden, match="apps.pull = deny"):
        world.api.gate.prepare(job)
    # The owner's jobs use the daemon user's token, unless the request brought one.
    owner_job = world.jobs.get(world.call("POST", "/v1/pulls", {"source": "https://example.org/o.json"}).body["id"])
    dl, admit = world.api.gate.prepare(owner_job)
    assert admit is None and dl.http.addresses is None
    assert dl.http.auth("https://hub.example/x") == {"Authorization": "Bearer hf_theownerstoken1"}


def test_a_channel_url_holds_its_pack_to_the_channel_s_keys(tmp_path: Path, origin: FaultServer) -> None:
    from modelfs_store.download import Downloader
    from modelfs_store.errors import TrustError
    from modelfs_store.keys import trust_key
    from modelfs_store.pull import PullOptions, pull_source
    from test_packs import Publisher, release

    store = Store.open(tmp_path / "store")
    pub = Publisher(origin)
    for key in ("k1", "k2"):
        trust_key(store.catalog, key, pub.pub(key), actor="t")
    url = pub.serve("chan.json", release(pub, 1, key_id="k2"))
    store.catalog.add_channel(url, ["k1"])

    async def main() -> object:
        async with Downloader(store.blobs) as dl:
            return await pull_source(store, dl, url, PullOptions())

    with pytest.raises(TrustError, match="may not sign packs from this channel"):
        trio.run(main)
    assert pub.artifact_bytes() == 0
    store.close()
