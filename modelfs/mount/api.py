"""The control socket's routes: who may call what, and what each answers.

A plain module (no socket, no kernel): :meth:`Api.handle` takes a request whose caller
the server established from the peer's credentials, and returns a response; tests
call it with made-up callers. ``docs/api.md`` has an example of every route.

    route                                    who may call it           answers
    GET    /v1/status                        anyone                    the daemon, the store, the caller as seen
    GET    /v1/models                        anyone                    the models the caller sees (`list --json`)
    GET    /v1/models/NAME                   anyone                    one of them; 404 if the caller cannot see it
    DELETE /v1/models/NAME                   owner; its owning caller  the removal (a private model it owns)
    GET    /v1/pulls                         anyone                    its own jobs (the owner: every job)
    POST   /v1/pulls                         owner; others by policy   201 the job (200: its unfinished twin)
    GET    /v1/pulls/ID                      the job's caller; owner   the job
    POST   /v1/pulls/ID/cancel|pause|resume  the job's caller; owner   the job after the action
    GET    /v1/events[?job=ID]               anyone                    its jobs' events, newline-delimited JSON
    GET    /v1/grants, POST /v1/grants, POST /v1/grants/revoke        the owner only
    GET    /v1/settings, POST /v1/settings                            the owner only
    POST   /v1/models/NAME/loads             who sees NAME (identified) 201 a load reported; the rollout verdict
    -- the client API (modelfs.client), answers in llamadart's ModelCacheEntry fields --
    POST   /v1/ensure                        owner; others by policy   200 the caller's entry, or 202 a job and a waiter
    GET    /v1/entries                       anyone                    the models the caller sees, as entries
    GET    /v1/entries/NAME                  anyone                    one of them; 404 if the caller cannot see it
    POST   /v1/entries/NAME/use              anyone who sees it        the entry, its use recorded (select)
    POST   /v1/prune                         anyone                    what it removed of the caller's own models
    POST   /v1/pulls/ID/detach               the job's caller; owner   the job; the last waiter gone cancels it

The store owner (``Policy.is_admin``: its uid, no app id) may do everything.
Anyone else is an app (its app id), or another user without one, and may only: list
what it sees, start pulls within ``apps.pull`` and ``apps.quota_bytes`` (a source that
is an http(s) URL, or hf:// when unsigned pulls are allowed; never a local path), see,
pause, resume and cancel its own jobs, and remove the private models it owns. What it
pulls is owned by its (app id, uid) and private; its URLs reach public addresses only
(``apps.allowed_networks`` adds others) and carry only the token it supplied. A
refusal is 403 with a one-line reason and an audit row (``Action.DENY``).

:class:`Gate` is the same policy applied to a running job (``JobQueue``'s ``prepare``):
a job is re-judged each time it starts, so a setting changed since it was queued
applies. This module never reads the peer's credentials (``server.py`` does) and never
runs a pull itself (``jobs.py`` does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from modelfs.client._entry import ModelCacheEntry
from modelfs.client._source import ModelSource, source_of_stored_url
from modelfs_store import hf, settings
from modelfs_store.catalog import Action, FileRecord, ModelRecord
from modelfs_store.download import Downloader, Transfers
from modelfs_store.errors import (
    Conflict,
    FetchError,
    Forbidden,
    NotFound,
    SpaceError,
    StoreError,
    TrustError,
    UsageError,
)
from modelfs_store.http import AddressRule
from modelfs_store.policy import Caller, Owned, Policy, owner_key, pull_refusal, quota_refusal
from modelfs_store.redact import redact_url

from .identity import Identity
from .jobs import Job, JobQueue, State
from .runstate import open_files
from .server import Request, Response

if TYPE_CHECKING:
    from modelfs_store.core import Store
    from modelfs_store.packs import Admit

log = logging.getLogger(__name__)

API_VERSION = 1
#: What a POST /v1/pulls body may hold, and its type.
PULL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "source": str, "sha256": str, "size": int, "name": str, "mmproj": str, "mmproj_sha256": str, "license": str,
    "app": str, "private": bool, "pack": bool, "lazy": bool, "retry": bool, "platform": str, "token": str,
    "candidate": bool, "background": bool, "keep_awake": bool}
UNSIGNED_FIELDS = ("sha256", "mmproj", "mmproj_sha256")
_NAME = r"(?P<name>[A-Za-z0-9._-]+)"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [(m, re.compile(p), h) for m, p, h in (
    ("GET", r"/v1/status", "status"),
    ("GET", r"/v1/models", "models"),
    ("GET", rf"/v1/models/{_NAME}", "model"),
    ("DELETE", rf"/v1/models/{_NAME}", "remove_model"),
    ("GET", r"/v1/pulls", "pulls"),
    ("POST", r"/v1/pulls", "create_pull"),
    ("GET", r"/v1/pulls/(?P<job>\d+)", "pull"),
    ("POST", r"/v1/pulls/(?P<job>\d+)/(?P<action>cancel|pause|resume)", "pull_action"),
    ("GET", r"/v1/events", "events"),
    ("GET", r"/v1/grants", "grants"),
    ("POST", r"/v1/grants", "grant"),
    ("POST", r"/v1/grants/revoke", "revoke"),
    ("GET", r"/v1/settings", "settings"),
    ("POST", r"/v1/settings", "set_setting"),
    ("POST", rf"/v1/models/{_NAME}/loads", "report_load"),
    # the client API (``modelfs.client``): the block "the client API" of Api
    ("POST", r"/v1/ensure", "ensure"),
    ("GET", r"/v1/entries", "entries"),
    ("GET", rf"/v1/entries/{_NAME}", "entry"),
    ("POST", rf"/v1/entries/{_NAME}/use", "use"),
    ("POST", r"/v1/prune", "prune_own"),
    ("POST", r"/v1/pulls/(?P<job>\d+)/detach", "detach"),
)]
#: Routes whose answers name paths in the mount (entries, models): the tree is brought up
#: to date with the catalog first.
MOUNT_PATHS = frozenset({"models", "model", "ensure", "entries", "entry", "use"})
ENSURE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "source": str, "sha256": str, "size": int, "mmproj": str, "mmproj_sha256": str, "token": str, "pack": bool,
    "refresh": bool, "name": str, "keep_awake": bool, "background": bool}
#: What an entry's card holds of a model's description (plus its weights' ETag and Last-Modified).
ENTRY_CARD = ("license", "source", "source_url", "family", "architecture", "quantization", "context_length",
              "chat_template", "runtime_params", "compat_notes", "min_device", "signed", "key_id", "version", "state",
              "visibility", "pinned", "last_used_at", "expires")
OWNER_ONLY = frozenset({"grants", "grant", "revoke", "settings", "set_setting"})
STATUS = [(Forbidden, 403), (TrustError, 403), (UsageError, 400), (NotFound, 404), (Conflict, 409),
          (SpaceError, 507), (FetchError, 502)]


@dataclass(frozen=True)
class Who:
    """A caller as the daemon sees it (from the socket's peer, never the request)."""
    ident: Identity
    admin: bool
    via: str = ""

    @property
    def caller(self) -> Caller:
        return Caller(self.ident.uid, self.ident.app, self.ident.sure)

    @property
    def actor(self) -> str:
        return f"api:uid{self.ident.uid}" + (f":{self.ident.app}" if self.ident.app else "")

    def owns_job(self, job: Job) -> bool:
        return self.admin or (self.ident.sure and (job.uid, job.app_id) == (self.ident.uid, self.ident.app))


def _owned(m: ModelRecord) -> Owned:
    return Owned(m.name, m.visibility, m.owner_app, m.owner_uid)


def _body(req: Request) -> dict[str, Any]:
    try:
        doc = json.loads(req.body or b"{}")
    except ValueError:
        raise UsageError("the request body is not JSON") from None
    if not isinstance(doc, dict):
        raise UsageError("the request body must be a JSON object")
    return doc


def _typed(body: dict[str, Any], fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """``body`` when it holds only ``fields``, each of its type (or null)."""
    unknown = set(body) - set(fields)
    if unknown:
        raise UsageError(f"unknown field(s) {', '.join(sorted(unknown))}")
    for key, kind in fields.items():
        value = body.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            raise UsageError(f"field {key!r} has the wrong type")
    return body


def error_response(exc: StoreError) -> Response:
    status = next((code for cls, code in STATUS if isinstance(exc, cls)), 500)
    return Response(status, {"error": {"message": str(exc), "reason": exc.fields.get("reason"),
                                       "exit_code": exc.exit_code}})


class Api:
    """The routes of one daemon. ``policy()`` is the current visibility policy (rebuilt
    after every catalog change); ``daemon()`` what the daemon publishes about itself."""

    def __init__(self, store: Store, jobs: JobQueue, policy: Callable[[], Policy],
                 daemon: Callable[[], dict[str, Any]], *, gate: Gate,
                 fresh: Callable[[], Awaitable[object]] | None = None) -> None:
        self.store = store
        self.jobs = jobs
        self.policy = policy
        self.daemon = daemon
        self.gate = gate
        self.fresh = fresh

    async def handle(self, req: Request) -> Response:
        who = Who(req.caller, self.policy().is_admin(Caller(req.caller.uid, req.caller.app, req.caller.sure)), req.peer)
        found = [(m, h, p.fullmatch(req.path)) for m, p, h in ROUTES]
        matches = [(m, h, match) for m, h, match in found if match]
        if not matches:
            return Response(404, {"error": {"message": f"no route {req.path}", "exit_code": 3}})
        route = next(((h, match) for m, h, match in matches if m == req.method), None)
        if route is None:
            allowed = ", ".join(sorted({m for m, _, _ in matches}))
            return Response(405, {"error": {"message": f"{req.method} {req.path}: use {allowed}", "exit_code": 2}},
                            headers={"allow": allowed})
        name, match = route
        if name in MOUNT_PATHS and self.fresh is not None:
            # An answer naming a path in the mount names one that is there: the mount takes
            # in a catalog change (a job's model just recorded) before it is answered, not
            # at its next poll.
            try:
                await self.fresh()
            except Exception:  # noqa: BLE001 - the answer goes out; the poller retries the tree
                log.exception("catalog refresh before %s %s failed", req.method, req.path)
        try:
            if name in OWNER_ONLY and not who.admin:
                raise Forbidden(f"only the store's owner may {req.method} {req.path}", reason="owner-only")
            handler = getattr(self, f"_{name}")
            response: Response = await handler(req, who, **match.groupdict())
            return response
        except Forbidden as exc:
            self.store.catalog.audit(who.actor, Action.DENY, outcome="refused", reason=str(exc),
                                     detail={"method": req.method, "path": req.path, "uid": who.ident.uid,
                                             "app": who.ident.app, "pid": who.ident.pid})
            log.info("refused %s %s for %s: %s", req.method, req.path, who.actor, exc)
            return error_response(exc)
        except StoreError as exc:
            return error_response(exc)

    # -- status and models ---------------------------------------------------------------------
    async def _status(self, req: Request, who: Who) -> Response:
        d = self.daemon()
        counts = dict.fromkeys((s.value for s in State), 0)
        for job in self.jobs.jobs.values():
            if who.owns_job(job):
                counts[job.state.value] += 1
        return Response(200, {
            "api_version": API_VERSION, "pid": os.getpid(), "store": str(self.store.layout.root),
            "mountpoint": d.get("mountpoint"), "offline": d.get("offline"), "started_at": d.get("started_at"),
            "control_socket": d.get("control_socket"), "fetch_errors": d.get("fetch_errors", []) if who.admin else [],
            "caller": {"uid": who.ident.uid, "app_id": who.ident.app, "rule": who.ident.rule, "sure": who.ident.sure,
                       "owner": who.admin, "peer": who.via},
            "pulls": counts})

    def _visible(self, who: Who, name: str) -> ModelRecord:
        m = self.store.catalog.get_model(name)
        if not who.admin and not self.policy().sees(who.caller, _owned(m)):
            raise NotFound(f"no model named {name!r}", model=name)  # hidden is absent, as in the mount
        return m

    async def _models(self, req: Request, who: Who) -> Response:
        policy = self.policy()
        shown = [m for m in self.store.catalog.list_models() if who.admin or policy.sees(who.caller, _owned(m))]
        return Response(200, [self.store.describe(m) for m in shown])

    async def _model(self, req: Request, who: Who, name: str) -> Response:
        return Response(200, self.store.describe(self._visible(who, name)))

    async def _remove_model(self, req: Request, who: Who, name: str) -> Response:
        m = self._visible(who, name)
        if not who.admin and not (m.visibility == "private" and self.policy().owns(who.caller, _owned(m))):
            raise Forbidden(f"model {name!r} is not yours to remove (only the private models a caller pulled are)",
                            reason="not-owner")
        store = dataclasses.replace(self.store, actor=who.actor)
        plan = store.plan_remove(name)
        store.execute(plan)
        return Response(200, plan.as_dict())

    # -- pulls ------------------------------------------------------------------------------------
    async def _pulls(self, req: Request, who: Who) -> Response:
        return Response(200, [j.as_dict() for j in self.jobs.jobs.values() if who.owns_job(j)])

    def _job(self, who: Who, job_id: str) -> Job:
        job = self.jobs.get(int(job_id))
        if not who.owns_job(job):
            raise Forbidden(f"job {job.id} is not yours", reason="not-owner")
        return job

    async def _pull(self, req: Request, who: Who, job: str) -> Response:
        return Response(200, self._job(who, job).as_dict())

    async def _pull_action(self, req: Request, who: Who, job: str, action: str) -> Response:
        body = _body(req) if action == "resume" else {}
        secrets = {k: body[k] for k in ("token", "source", "mmproj") if isinstance(body.get(k), str)}
        j = self._job(who, job)
        if "source" in secrets and hf_or_url_shown(secrets["source"]) != j.source:
            raise UsageError("the source given is not this job's")
        self.jobs.act(j, action, secrets)
        self.store.catalog.audit(who.actor, Action.JOB, detail={"job": j.id, "action": action})
        return Response(200, j.as_dict())

    async def _create_pull(self, req: Request, who: Who) -> Response:
        body = _body(req)
        unknown = set(body) - set(PULL_FIELDS)
        if unknown:
            raise UsageError(f"unknown field(s) {', '.join(sorted(unknown))}")
        for key, kind in PULL_FIELDS.items():
            if body.get(key) is not None and (not isinstance(body[key], kind) or isinstance(body[key], bool)
                                              and kind is not bool):
                raise UsageError(f"field {key!r} has the wrong type")
        source = body.get("source")
        if not source:
            raise UsageError("a pull needs a source")
        options = {k: v for k, v in body.items() if k not in ("source", "token", "app")}
        options["owner_app"] = body.get("app")
        if not who.admin:
            options = await self.gate.admit_request(who, source, options)
        job, created = self.jobs.submit(source, options, {"token": body.get("token") or ""}, uid=who.ident.uid,
                                        app_id=who.ident.app)
        if created:
            self.store.catalog.audit(who.actor, Action.JOB, detail={"job": job.id, "action": "create",
                                                                    "source": job.source})
        return Response(201 if created else 200, job.as_dict())

    async def _events(self, req: Request, who: Who) -> Response:
        job_id = req.query.get("job")
        if job_id is not None:
            if not job_id.isdigit():
                raise UsageError("job must be a job number")
            self._job(who, job_id)
        return Response(200, stream=self.jobs.follow(who.owns_job, int(job_id) if job_id else None))

    # -- load reports (rollout supervision: modelfs_store.rollout) --------------------------------
    async def _report_load(self, req: Request, who: Who, name: str) -> Response:
        """An app loaded ``name`` (``ok``), one report counted once; a candidate version is
        judged at once. Who may report is who sees the model, identified; the same
        refusal for a hidden and an absent model, so a report tells nothing of either."""
        body = _body(req)
        ok, version = body.get("ok"), body.get("version")
        if not isinstance(ok, bool) or set(body) - {"ok", "version"} or version is not None and (
                not isinstance(version, int) or isinstance(version, bool)):
            raise UsageError('a load report is {"ok": true or false}, with an optional "version" number')
        if not who.admin:
            if not who.ident.sure:
                raise Forbidden(f"the daemon could not tell which process is calling ({who.ident.rule})",
                                reason="identity")
            cat = self.store.catalog
            if not cat.has_model(name) or not self.policy().sees(who.caller, _owned(cat.get_model(name))):
                raise Forbidden(f"no model named {name!r} that this caller may report on", reason="not-visible")
        store = dataclasses.replace(self.store, actor=who.actor)
        version, decision = store.report_load(name, ok, version, uid=who.ident.uid, app_id=who.ident.app)
        return Response(201, {"model": name, "version": version, "ok": ok,
                              "active_version": self.store.catalog.get_model(name).active_version,
                              "verdict": decision.as_dict() if decision is not None else None})

    # -- grants and settings (the owner's) ------------------------------------------------------------
    async def _grants(self, req: Request, who: Who) -> Response:
        return Response(200, self.store.catalog.grants())

    def _grant_args(self, req: Request) -> tuple[str, str, int | None, bool]:
        body = _body(req)
        app, model, uid, any_uid = body.get("app_id"), body.get("model"), body.get("uid"), body.get("any_uid", False)
        if not isinstance(app, str) or not isinstance(model, str):
            raise UsageError("a grant needs app_id and model")
        if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool)) or not isinstance(any_uid, bool):
            raise UsageError("uid is a number, any_uid true or false")
        return app, model, uid, any_uid

    async def _grant(self, req: Request, who: Who) -> Response:
        app, model, uid, any_uid = self._grant_args(req)
        new = self.store.catalog.grant(app, model, uid=uid, any_uid=any_uid, actor=who.actor)
        return Response(201 if new else 200, {"app_id": app, "model": model, "uid": None if any_uid else uid,
                                              "any_uid": any_uid, "changed": new})

    async def _revoke(self, req: Request, who: Who) -> Response:
        app, model, uid, any_uid = self._grant_args(req)
        gone = self.store.catalog.revoke(app, model, uid=uid, any_uid=any_uid, actor=who.actor)
        return Response(200, {"app_id": app, "model": model, "uid": None if any_uid else uid, "any_uid": any_uid,
                              "changed": gone})

    async def _settings(self, req: Request, who: Who) -> Response:
        return Response(200, settings.values(self.store.catalog))

    async def _set_setting(self, req: Request, who: Who) -> Response:
        body = _body(req)
        key = body.get("key")
        if not isinstance(key, str) or "value" not in body:
            raise UsageError("a setting needs key and value")
        value = settings.set_value(self.store.catalog, key, body["value"], actor=who.actor)
        return Response(200, {"key": key, "value": value, "default": settings.SETTINGS[key].default,
                              "help": settings.SETTINGS[key].help})

    # -- the client API (modelfs.client): entries in llamadart's ModelCacheEntry fields ------------
    def _entry_name(self, who: Who, src: ModelSource, asked: str | None) -> str:
        """The store's name of a caller's entry for ``src``: the owner's is the source's
        cache directory name (or the name it asks for); an app's is salted with who it is,
        so two apps never contend for one name (a refusal would tell one the other's)."""
        stem = src.cache_directory_name.rsplit("-", 1)[0][:100].lstrip("-.") or "model"  # names: 128 at most
        if who.admin:
            return asked or f"{stem}-{src.cache_key[:12]}"
        owner_app, owner_uid = owner_key(who.caller, self.policy().store_owner)
        salt = f"{owner_app}\n{owner_uid}\n{src.canonical_key}".encode()
        return f"{stem}-{hashlib.sha256(salt).hexdigest()[:12]}"

    def entry_json(self, who: Who, m: ModelRecord) -> dict[str, Any]:
        """A model as llamadart's ``ModelCacheEntry`` (its weights; ``mmproj`` its companion),
        with the path of its file in the mount and the model's card."""
        d = self.store.describe(m)
        files = self.store.catalog.get_version(m.name, m.active_version).files if m.active_version else ()
        weights = next((f for f in files if f.role == "weights"), files[0] if files else None)
        mm = next((f for f in files if f.role == "mmproj"), None)
        mount = self.daemon().get("mountpoint") or ""
        owner = ("app" if self.policy().owns(who.caller, _owned(m))
                 else "granted" if m.visibility == "private" and not who.admin else "shared")
        card = {k: d.get(k) for k in ENTRY_CARD}
        if weights is not None:
            card.update(etag=weights.etag, last_modified=weights.last_modified)

        def one(f: FileRecord | None, name: str | None) -> ModelCacheEntry:
            origin = source_of_stored_url(f.url, hf.endpoint()) if f is not None and f.url else None
            key = origin.metadata_source_key if origin else f"store:{m.name}"
            return ModelCacheEntry(
                key, origin.cache_key if origin else hashlib.sha256(key.encode()).hexdigest(),
                f.filename if f else "", f"{mount}/{m.name}/{f.filename}" if f else "", f.size if f else 0,
                f.sha256 if f else None, f.etag if f else None, f.last_modified if f else None, m.created_at,
                d.get("installed_at") or m.created_at, None, name=name)
        return dataclasses.replace(one(weights, m.name), mmproj=one(mm, None) if mm else None, card=card,
                                   owner=owner).to_json()

    def _own_entry(self, who: Who, name: str, sha256: str | None) -> dict[str, Any] | None:
        """The caller's entry ``name`` when it sees it and it holds ``sha256`` (if given)."""
        if not self.store.catalog.has_model(name):
            return None
        m = self.store.catalog.get_model(name)
        if not who.admin and not self.policy().sees(who.caller, _owned(m)) or m.active_version is None:
            return None
        files = self.store.catalog.get_version(name, m.active_version).files
        if sha256 is not None and not any(f.role == "weights" and f.sha256 == sha256.lower() for f in files):
            return None
        return self.entry_json(who, m)

    async def _ensure(self, req: Request, who: Who) -> Response:
        body = _typed(_body(req), ENSURE_FIELDS)
        if not body.get("source"):
            raise UsageError("ensure needs a source")
        src = ModelSource.pack(body["source"]) if body.get("pack") else ModelSource.parse(body["source"])
        if src.is_local:
            raise UsageError("the daemon reads no local file for ensure: `modelfs import` one")
        name = None if body.get("pack") else self._entry_name(who, src, body.get("name"))
        if name is not None and not body.get("refresh"):
            found = self._own_entry(who, name, body.get("sha256"))
            if found is not None:
                return Response(200, {"entry": found, "job": None, "waiter": None, "name": name})
        # keep_awake and background say how the daemon runs the job (jobs.JOB_KEYS): gated as
        # background work, under the sleep inhibitor.
        options = {k: body.get(k) for k in ("sha256", "size", "mmproj", "mmproj_sha256", "pack", "keep_awake",
                                             "background")}
        options.update(name=name, owner_app=None)
        if not who.admin:
            options = await self.gate.admit_request(who, src.spec, options)
        job, created = self.jobs.submit(src.spec, options, {"token": body.get("token") or ""}, uid=who.ident.uid,
                                        app_id=who.ident.app)
        if created:
            self.store.catalog.audit(who.actor, Action.JOB, detail={"job": job.id, "action": "ensure",
                                                                    "source": job.source})
        return Response(202, {"entry": None, "job": job.as_dict(), "waiter": self.jobs.attach(job), "name": name})

    async def _entries(self, req: Request, who: Who) -> Response:
        policy = self.policy()
        return Response(200, [self.entry_json(who, m) for m in self.store.catalog.list_models()
                              if who.admin or policy.sees(who.caller, _owned(m))])

    async def _entry(self, req: Request, who: Who, name: str) -> Response:
        return Response(200, self.entry_json(who, self._visible(who, name)))

    async def _use(self, req: Request, who: Who, name: str) -> Response:
        m = self._visible(who, name)
        with self.store.catalog.txn():
            self.store.catalog.touch(name)
        return Response(200, self.entry_json(who, self.store.catalog.get_model(m.name)))

    async def _prune_own(self, req: Request, who: Who) -> Response:
        """The caller's own models (the owner: those no app owns), least recently used
        first, older than ``max_age`` seconds or while they hold more than ``max_bytes``;
        never a pinned one nor one a reader holds open (``run/open.json``)."""
        body = _typed(_body(req), {"max_age": (int, float), "max_bytes": int, "dry_run": bool})
        policy, cat = self.policy(), self.store.catalog
        pinned = cat.pinned() | {f["model"] for f in open_files(self.store.layout)}  # in use: kept, as admin's
        mine = [m for m in cat.list_models() if (policy.owns(who.caller, _owned(m)) if not who.admin
                                                   else m.owner_app is None and m.owner_uid is None)]
        sized = sorted(((m.last_used_at or m.created_at, m, self.store.describe(m).get("size") or 0) for m in mine),
                       key=lambda t: t[0])
        total, now, removed = sum(n for *_, n in sized), self.store.catalog.clock(), []
        store = dataclasses.replace(self.store, actor=who.actor)
        for used, m, size in sized:
            old = body.get("max_age") is not None and used < now - body["max_age"]
            big = body.get("max_bytes") is not None and total > body["max_bytes"]
            if m.name in pinned or not (old or big):
                continue
            plan = store.plan_remove(m.name)
            if not body.get("dry_run"):
                store.execute(plan)
            total -= size
            removed.append({"name": m.name, "last_used_at": used, "bytes": size, "freed_bytes": plan.freed_bytes,
                            "reason": "older than max_age" if old else "over max_bytes"})
        return Response(200, {"removed": removed, "kept_bytes": total, "dry_run": bool(body.get("dry_run"))})

    async def _detach(self, req: Request, who: Who, job: str) -> Response:
        body = _typed(_body(req), {"waiter": int})
        j = self._job(who, job)
        self.jobs.detach(j, body.get("waiter"))
        return Response(200, j.as_dict())


def hf_or_url_shown(source: str) -> str:
    return redact_url(source) if "://" in source else source


class Gate:
    """What a caller other than the store owner may pull, applied when the request comes
    (:meth:`admit_request`) and each time its job starts (:meth:`prepare`)."""

    def __init__(self, store: Store, policy: Callable[[], Policy], transfers: Transfers, *,
                 downloader_options: dict[str, Any] | None = None) -> None:
        self.store = store
        self.policy = policy
        self.transfers = transfers
        self.downloader_options = downloader_options or {}

    def _mode_refusal(self, source: str, options: dict[str, Any]) -> None:
        scheme = urlsplit(source).scheme.lower() if "://" in source else ""
        if scheme not in ("http", "https", "hf"):
            raise Forbidden("a caller's source must be an http(s) or hf:// URL (the daemon reads no file for it)",
                            reason="source")
        signed = scheme != "hf" and not any(options.get(k) for k in UNSIGNED_FIELDS)
        why = pull_refusal(settings.get(self.store.catalog, "apps.pull"), signed=signed)
        if why is not None:
            raise Forbidden(why, reason="apps.pull")

    async def admit_request(self, who: Who, source: str, options: dict[str, Any]) -> dict[str, Any]:
        """The options of a caller's pull as the policy allows them, or Forbidden."""
        if not who.ident.sure:
            raise Forbidden(f"the daemon could not tell which process is calling ({who.ident.rule})",
                            reason="identity")
        self._mode_refusal(source, options)
        if options.get("owner_app") not in (None, who.ident.app):
            raise Forbidden("a caller pulls for its own app only", reason="app")
        owner_app, owner_uid = owner_key(who.caller, self.policy().store_owner)
        options = {**options, "owner_app": owner_app, "owner_uid": owner_uid, "private": True}
        if settings.get(self.store.catalog, "apps.pull") == "signed":
            options["pack"] = True
        if urlsplit(source).scheme.lower() in ("http", "https"):
            await self._check_address(source)
        return options

    async def _check_address(self, url: str) -> None:
        """Refuse at once a URL whose host is not public (the connection is checked again,
        redirects included, when the job runs)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            await self._rule().addresses(host, port, 10.0)
        except FetchError as exc:
            if exc.fields.get("reason") == "address-refused":
                raise Forbidden(str(exc), reason="address") from None
        except Exception:  # noqa: BLE001 - a name that does not resolve now: the job says so when it runs
            return

    def _rule(self) -> AddressRule:
        return AddressRule.of(settings.get(self.store.catalog, "apps.allowed_networks"))

    def prepare(self, job: Job) -> tuple[Downloader, Admit | None]:
        """The Downloader of ``job`` (its own credentials, the address rule, the daemon's
        shared transfers) and its admission check; Forbidden when the policy no longer
        allows it."""
        caller = Caller(job.uid, job.app_id)
        token = job.secrets.get("token")
        if self.policy().is_admin(caller):
            auth = hf.token_auth(token) if token else hf.auth_headers
            return Downloader(self.store.blobs, transfers=self.transfers, auth=auth,
                              **self.downloader_options), None
        self._mode_refusal(job.secrets.get("source", job.source), job.options)
        dl = Downloader(self.store.blobs, transfers=self.transfers, auth=hf.token_auth(token), addresses=self._rule(),
                        **self.downloader_options)
        return dl, self._admit(job, caller)

    def _admit(self, job: Job, caller: Caller) -> Admit:
        def admit(model: str, size: int | None) -> None:
            cat = self.store.catalog
            why = None
            if cat.has_model(model) and not self.policy().owns(caller, _owned(cat.get_model(model))):
                why, reason = f"model {model!r} exists and is not this caller's", "not-owner"
            else:
                owner_app, owner_uid = owner_key(caller, self.policy().store_owner)
                why, reason = quota_refusal(cat.owned_bytes(owner_app, owner_uid), size,
                                            settings.get(cat, "apps.quota_bytes")), "quota"
            if why is not None:
                cat.audit(job.actor, Action.DENY, model=model, outcome="refused", reason=why,
                          detail={"job": job.id, "uid": job.uid, "app": job.app_id})
                raise Forbidden(why, reason=reason)
        return admit
