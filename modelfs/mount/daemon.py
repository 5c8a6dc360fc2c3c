"""The mount daemon: one process that serves the FUSE file system and runs the downloads.

Life of a mount::

    prepare   take the store's daemon lock (one daemon per store); a mountpoint left
              stale by a killed daemon ("Transport endpoint is not connected") is
              lazily unmounted first; the first tree is built before mounting
    mount     the control socket is bound (server.py: while a system store's daemon
              may still create /run/modelfs), then pyfuse3.init, then pyfuse3.main
              under trio with several worker tasks, beside: the catalog poller, the
              signal handler, the announcer (sets the bdi's read_ahead_kb, writes
              run/daemon.json, tells a waiting parent and systemd: READY=1, see
              :mod:`.notify`), and the services: the control socket (api.py), the
              pull jobs (jobs.py), resumed from the catalog, the update timer
              (updates.py; not when offline) and the rollout supervisor (a candidate
              version judged on apps' load reports: ``Store.supervise``). Background
              work waits for the gates (gates.py, the ``gate.*`` settings); a job asked
              to keep the machine awake holds the one logind inhibitor (inhibit.py)
              while it transfers
    serve     every ~200 ms the poller checks ``PRAGMA data_version``; on a change it
              rebuilds the tree (in a worker thread) and invalidates the kernel's
              entries and attributes that changed, so CLI changes show within a second
    stop      SIGTERM/SIGINT detach the mount (lazy unmount): nothing new can be
              opened, files already open keep being served, and the daemon exits when
              the kernel closes the session after the last release; a second SIGINT
              ends at once (a second SIGTERM does not: systemd sends one after ExecStop).
              The control socket closes and running pulls stop (queued again in the
              catalog: the next daemon resumes them from their partial bytes)

The daemon is a thin owner: what the socket answers is ``api.py``'s, the queue is
``jobs.py``'s, and a pull is the store's (``modelfs_store.pull``); the daemon builds
them, shares one table of transfers between the jobs and the lazy opens of the mount
(one transfer per blob, whoever waits), and runs them in its nursery.

Never unmount after a crash: an unexpected error leaves the mountpoint dead
(ENOTCONN) rather than an empty directory a consumer could mistake for "no models";
the next ``modelfs mount`` recovers it.

Runtime state goes to ``run/`` (atomic writes): ``daemon.json`` (pid, mountpoint,
offline, the control socket, last fetch errors with reasons) for ``modelfs status``, ``open.json`` (what is
open, by whom) so the CLI can tell what is in use. A detached daemon gives ``run/`` up
to the next one and publishes the files it still serves in ``detached-<pid>.json``
instead, alive while it holds an flock on ``detached-<pid>.lock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio

from modelfs_store import settings
from modelfs_store.blobs import lock_free
from modelfs_store.catalog import Catalog
from modelfs_store.core import Store
from modelfs_store.download import Downloader
from modelfs_store.errors import Conflict
from modelfs_store.owner import foreign_owner, open_file, owner_gid, user_name
from modelfs_store.pull import downloader_options_from_env

from . import caps, peer
from .access import AppVisibility
from .api import Api, Gate
from .config import READY_ENV, MountConfig
from .gates import Gates, GateSettings, power_root
from .inhibit import Inhibitor
from .jobs import JobQueue
from .links import FastPath
from .mountpoint import check_allow_other, lazy_unmount, prepare_mountpoint
from .notify import Notifier
from .openfiles import Materialiser, OpenFiles
from .runstate import already_mounted, detached_path, lock_path, write_json
from .server import ControlServer, Handler, bind, socket_choice
from .tree import Invalidation, Namespace, Node, SnapshotReader, Tree
from .updates import UpdateTimer
from .views import Views

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2          # seconds between catalog data_version checks
READ_AHEAD_KB = 4096         # 2-2.5x the 128 KiB default on uncached reads; 16 MiB was worse
MIN_TASKS, MAX_TASKS = 4, 256  # opens waiting on a download each hold a worker task
SUPERVISE_INTERVAL = 10.0    # seconds between rollout passes (a report is judged at once besides)


def set_read_ahead(st_dev: int, kb: int = READ_AHEAD_KB) -> bool:
    bdi = Path(f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb")
    try:
        bdi.write_text(f"{kb}\n")
    except OSError as exc:
        log.info("could not set %s to %d (%s); reads stay at the default readahead", bdi, kb, exc.strerror)
        return False
    return True


def mount_options(allow_other: bool) -> set[str]:
    import pyfuse3
    opts = set(pyfuse3.default_options) | {"fsname=modelfs", "subtype=modelfs", "ro"}
    if allow_other:  # other uids may ask; what each sees is decided per request (access.py)
        check_allow_other()
        opts.add("allow_other")
    return opts



# -- the daemon --------------------------------------------------------------------------------
class Daemon:
    def __init__(self, cfg: MountConfig, *, privileged_mount: bool = False) -> None:
        self.cfg = cfg
        self.privileged_mount = privileged_mount  # holds CAP_SYS_ADMIN until mounted (system store)
        self.store = Store.open(cfg.store_root)
        self.layout = self.store.layout
        self.mountpoint = cfg.mountpoint
        self.access = AppVisibility(os.geteuid())  # the daemon runs as the store's owner (Store.open)
        self.fast = FastPath(cfg.links, os.geteuid(), self.access.resolver, self.store.blobs)
        self.ns = Namespace(cfg.visibility or self.access, self.fast, Views())  # .hf/hub, .lmstudio
        self.poll_catalog = Catalog(self.layout.catalog)  # used only in worker threads, one at a time
        self.snapshots = SnapshotReader(self.poll_catalog)
        self.db_limiter = trio.CapacityLimiter(1)
        self._refresh_lock = trio.Lock()
        self.materialiser = Materialiser(self.store, None, offline=cfg.offline,
                                         fetch_timeout=cfg.fetch_timeout, on_failure=self.publish_status,
                                         on_local=self._became_local)
        self.files = OpenFiles(self.materialiser, read_mode=cfg.read_mode, on_change=self._open_changed)
        self._open_dirty = trio.Event()
        self.started_at = time.time()
        self.detached = False
        self._detached_fd = -1
        self._lock_fd = -1
        self._data_version: int | None = None
        self.notify = Notifier.from_environ()  # systemd's Type=notify; a no-op elsewhere
        self.control: ControlServer | None = None
        self.jobs: JobQueue | None = None
        self.updates: UpdateTimer | None = None
        self.gates = Gates(power_root=power_root())
        self.inhibitor = Inhibitor()
        self._services = trio.CancelScope()

    # -- state files ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What run/daemon.json says, and /v1/status tells the store owner."""
        return {
            "pid": os.getpid(), "mountpoint": str(self.mountpoint), "store": str(self.layout.root),
            "offline": self.cfg.offline, "fetch_timeout": self.cfg.fetch_timeout,
            "read_mode": self.cfg.read_mode, "links": self.cfg.links, "started_at": self.started_at,
            "fetch_errors": [f.as_dict() for f in self.materialiser.failures],
            "control_socket": self.control.describe() if self.control else None,
        }

    def publish_status(self) -> None:
        if self.detached:
            return  # a newer daemon may own run/ now
        write_json(self.layout.run / "daemon.json", self.status())

    def publish_open(self, table: list[dict[str, Any]] | None = None) -> None:
        table = self.files.table() if table is None else table
        if self.detached:  # run/open.json may be a newer daemon's now
            write_json(self._detached_path(".json"), {
                "pid": os.getpid(), "mountpoint": str(self.mountpoint), "open_files": table})
            return
        write_json(self.layout.run / "open.json", {"pid": os.getpid(), "files": table})

    def _detached_path(self, suffix: str) -> Path:
        return detached_path(self.layout, os.getpid(), suffix)

    def _sweep_detached(self) -> None:
        """Remove what detached daemons that were killed left behind."""
        for lock in self.layout.run.glob("detached-*.lock"):
            if lock_free(lock):
                for path in (lock.with_suffix(".json"), lock):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    def _detach(self) -> None:
        """After the unmount: hand run/ to the next daemon, keep telling what is open."""
        self._stop_services()
        fd = open_file(self._detached_path(".lock"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._detached_fd = fd
        self.detached = True
        self.publish_open()
        self._unlock()

    def _open_changed(self) -> None:
        self._open_dirty.set()

    async def _open_publisher(self) -> None:
        """Writes open.json after changes, coalesced: an atomic write costs ~1 ms here,
        which must not sit on the open/release path."""
        while True:
            await self._open_dirty.wait()
            self._open_dirty = trio.Event()
            table = self.files.table()  # taken on the loop thread
            try:
                await trio.to_thread.run_sync(self.publish_open, table)
            except OSError as exc:
                log.warning("could not write open.json: %s", exc)
            await trio.sleep(0.02)

    def _lock(self) -> None:
        fd = open_file(lock_path(self.layout), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise already_mounted(self.layout) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- catalog → tree --------------------------------------------------------------------
    def _load(self) -> Tree | None:  # runs in a worker thread, one at a time (db_limiter)
        cat = self.poll_catalog
        for name in list(self.files.pending_touch):
            self.files.pending_touch.discard(name)
            cat.touch(name)
        version = cat.data_version()
        if version == self._data_version:
            return None
        self.access.update(cat.grants(), {(e["dev"], e["ino"]): e["app_id"] for e in cat.app_exes()})
        tree = self.ns.build(self.snapshots.read())
        self._data_version = version  # only now: a failed build is retried at the next poll
        return tree

    async def refresh(self) -> bool:
        """Take in the catalog's changes, if any (the poller, and the control socket before
        an answer that names paths in the mount). One at a time: a caller that found
        nothing new returns only once a rebuild another started is in place."""
        async with self._refresh_lock:
            return await self._refresh()

    async def _refresh(self) -> bool:
        t0 = time.perf_counter()
        new = await trio.to_thread.run_sync(self._load, limiter=self.db_limiter)
        if new is None:
            return False
        change = self.ns.swap(new)
        if change:
            await self._invalidate(change)
        if not self.detached:
            self.notify.status(self._serving())
        log.debug("catalog changed: tree of %d models rebuilt in %.0f ms", len(new.entries),
                  (time.perf_counter() - t0) * 1e3)
        return True

    async def _invalidate(self, change: Invalidation) -> None:
        import pyfuse3
        for parent, name, deleted in change.entries:
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), deleted=deleted, ignore_enoent=True)
        if change.inodes:
            await trio.to_thread.run_sync(_invalidate_inodes, change.inodes)
        log.debug("tree rebuilt: %d entries and %d inodes invalidated", len(change.entries), len(change.inodes))

    def _became_local(self, node: Node) -> None:
        """A file fetched on open may now be a link for the owner: the kernel forgets
        its names and asks again (readers that opened it keep their descriptors)."""
        if self.fast.enabled:
            import pyfuse3
            for parent, name in self.ns.names_of(node.ino):
                pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)

    async def _poller(self) -> None:
        while True:
            await trio.sleep(POLL_INTERVAL)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the mount keeps serving the last good tree
                log.exception("catalog refresh failed; serving the previous tree")

    # -- lifecycle ------------------------------------------------------------------------------
    async def _signals(self) -> None:
        import pyfuse3
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self.detached:
                    # systemd sends SIGTERM after ExecStop=modelfs unmount: repeated
                    # SIGTERMs must not cut off readers that still map a file.
                    if signum == signal.SIGINT:
                        log.warning("second SIGINT: stopping now; %d open file(s) lose the mount",
                                    len(self.files))
                        pyfuse3.terminate()
                        return
                    log.info("already unmounted; %d file(s) still open", len(self.files))
                    continue
                log.info("%s: unmounting %s", signal.Signals(signum).name, self.mountpoint)
                # `modelfs unmount` as root may have detached it. Asked from a worker thread:
                # once the root's attributes are no longer cached, the stat is a request to
                # this very loop, which must be free to answer it.
                if await trio.to_thread.run_sync(os.path.ismount, self.mountpoint):
                    await trio.to_thread.run_sync(lazy_unmount, self.mountpoint)
                self._detach()
                self.notify.stopping(f"unmounted {self.mountpoint}; serving {len(self.files)} open file(s)")
                if len(self.files):
                    log.info("%d file(s) still open; serving them until they are closed", len(self.files))

    async def _announce(self) -> None:
        # A stat through the mount proves the kernel and pyfuse3.main are talking.
        st = await trio.to_thread.run_sync(os.stat, self.mountpoint)
        await trio.to_thread.run_sync(set_read_ahead, st.st_dev)
        self.publish_status()
        self.publish_open()
        log.info("mounted %s at %s (pid %d%s)", self.layout.root, self.mountpoint, os.getpid(),
                 ", offline" if self.cfg.offline else "")
        ready = os.environ.pop(READY_ENV, None)
        if ready:
            with os.fdopen(int(ready), "w") as f:
                f.write(f"ready {os.getpid()}\n")
        self.notify.ready(self._serving())

    def _serving(self) -> str:
        n = len(self.ns.tree.entries)
        return (f"serving {n} model{'' if n == 1 else 's'} at {self.mountpoint}"
                + (" (offline)" if self.cfg.offline else ""))

    # -- the control socket and the pull jobs ------------------------------------------------
    def _bind_control(self, handler: Handler) -> ControlServer:
        """Listen where :func:`server.socket_choice` says; the store's run/ when the
        per-user socket is another store's live daemon's."""
        system = self.privileged_mount  # root-started for the store's user: a system store
        path, where = socket_choice(self.layout, self.cfg.socket, system=system,
                                    runtime_dir=os.environ.get("XDG_RUNTIME_DIR"))
        mode = self.cfg.socket_mode if self.cfg.socket_mode is not None else 0o666 if system else 0o600
        try:
            sock = bind(path, mode, dir_mode=0o755 if system else 0o700)
        except (Conflict, OSError) as exc:
            if where in ("option", "store"):
                raise
            log.warning("%s; listening in the store instead", exc)
            path, where = self.layout.run / "control.sock", "store"
            sock = bind(path, mode)
        log.info("control socket %s (%s, mode %o)", path, where, mode)
        return ControlServer(sock, path, where, handler, lambda p: peer.identify(p, self.access.resolver))

    def _start_services(self, fetcher: Downloader) -> None:
        options: dict[str, Any] = {"offline": self.cfg.offline, **downloader_options_from_env()}
        policy = lambda: self.access.policy  # noqa: E731 - rebuilt after every catalog change
        gate = Gate(self.store, policy, fetcher.transfers, downloader_options=options)
        cat = self.store.catalog
        self.jobs = JobQueue(self.store, gate.prepare, gates=self._gates_hold, keep_awake=self._keep_awake,
                             concurrency=lambda: int(settings.get(cat, "pulls.concurrency")), landed=self.refresh)
        self.jobs.load()
        if not self.cfg.offline:
            self.updates = UpdateTimer(self.store, lambda: Downloader(self.store.blobs, transfers=fetcher.transfers,
                                                                      **options),
                                       self._gates_hold, interval=lambda: int(settings.get(cat, "update.interval")))
        api = Api(self.store, self.jobs, policy, self.status, gate=gate, fresh=self.refresh)
        self.control = self._bind_control(api.handle)

    async def _services_task(self) -> None:
        assert self.control is not None and self.jobs is not None
        with self._services:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.control.serve, name="control-socket")
                nursery.start_soon(self.jobs.run, name="pull-jobs")
                nursery.start_soon(self._supervisor, name="rollout-supervisor")
                if self.updates is not None:
                    nursery.start_soon(self.updates.run, name="update-timer")

    async def _supervisor(self) -> None:
        """Judge every candidate version now and then: a report recorded without the daemon,
        or a setting changed, is acted on here (``Store.supervise``; atomic, audited)."""
        while True:
            try:
                for name, d in self.store.supervise_all():
                    if d.verdict in ("good", "rollback"):
                        log.info("rollout of %s: %s (%s)", name, d.verdict, d.reason)
            except Exception:  # noqa: BLE001 - the next pass tries again; the mount keeps serving
                log.exception("rollout supervision failed")
            await trio.sleep(SUPERVISE_INTERVAL)

    async def _gates_hold(self) -> tuple[str, str] | None:
        """What holds background work back now (the ``gate.*`` settings), or None."""
        values = settings.values(self.store.catalog)
        return await self.gates.check(GateSettings.parse({k: str(v) for k, v in values.items()
                                                          if k.startswith("gate.")}))

    def _keep_awake(self, requested: bool) -> contextlib.AbstractAsyncContextManager[None]:
        """The inhibitor a transferring job holds, under the current ``inhibit`` settings."""
        self.inhibitor.policy = str(settings.get(self.store.catalog, "inhibit"))
        self.inhibitor.mode = str(settings.get(self.store.catalog, "inhibit.mode"))
        return self.inhibitor.hold(requested)

    def _stop_services(self) -> None:
        """Close the socket; running pulls go back to queued (the next daemon resumes them)."""
        self._services.cancel()
        if self.control is not None:
            self.control.remove()
        if self.jobs is not None:
            self.jobs.stopped()

    async def serve(self) -> None:
        import pyfuse3

        from .fuse_ops import ModelOps

        self._lock()
        self._sweep_detached()
        self.mountpoint = prepare_mountpoint(self.mountpoint)
        first = await trio.to_thread.run_sync(self._load)  # never None: no data_version seen yet
        if first is not None:
            self.ns.swap(first)
        blobs = self.store.blobs
        ops = ModelOps(self.ns, self.files, lambda sha: "local" if blobs.has(sha) else "dehydrated")
        fetcher = self.materialiser.fetcher = Downloader(self.store.blobs, offline=self.cfg.offline)
        self._start_services(fetcher)  # before the mount: a system store's daemon may still create /run/modelfs
        pyfuse3.init(ops, str(self.mountpoint), mount_options(self.cfg.allow_other))
        if self.privileged_mount:
            caps.set_caps(caps.SERVING)  # mounted: CAP_SYS_ADMIN and CAP_DAC_OVERRIDE go for good
            log.info("mounted; keeping only %s (app identities of other users' processes)",
                     caps.names(caps.effective()))
        clean = False
        # From here on _signals answers SIGTERM and SIGINT; outside it (once the session
        # ended, while cleaning up, until the process exits) they are ignored, not fatal:
        # root's `modelfs unmount` detaches the mount and then signals, and a signal landing
        # after the kernel let go must not kill the daemon before the socket and run/ are
        # cleaned up. trio restores this disposition when _signals' receiver closes.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poller, name="catalog-poller")
                nursery.start_soon(self._signals, name="signals")
                nursery.start_soon(self._announce, name="announce")
                nursery.start_soon(self._open_publisher, name="open-publisher")
                nursery.start_soon(self._services_task, name="services")
                await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
                nursery.cancel_scope.cancel()
            clean = True
        finally:
            if not clean:
                log.critical("the daemon failed; leaving %s mounted but disconnected (never an empty "
                             "directory); `modelfs mount` recovers it", self.mountpoint)
            self._stop_services()
            self.files.close_all()
            with trio.CancelScope(shield=True):
                await fetcher.aclose()
            # After a detach the kernel has already let go; after a crash, never unmount.
            pyfuse3.close(unmount=clean and not self.detached)
            if clean:
                log.info("session with the kernel closed; %s unmounted", self.mountpoint)
            self._cleanup_run_files()

    def _cleanup_run_files(self) -> None:
        if self._detached_fd >= 0:
            for suffix in (".json", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    self._detached_path(suffix).unlink()
            os.close(self._detached_fd)
            self._detached_fd = -1
        if self.detached or self._lock_fd < 0:
            return
        for name in ("daemon.json", "open.json"):
            with contextlib.suppress(FileNotFoundError):
                (self.layout.run / name).unlink()
        self._unlock()

    def close(self) -> None:
        self._unlock()
        self.poll_catalog.close()
        self.store.close()


def _invalidate_inodes(inodes: tuple[int, ...]) -> None:
    import pyfuse3
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the kernel never saw it: nothing to forget
                log.warning("could not invalidate inode %d: %s", ino, exc)


def run_foreground(cfg: MountConfig, argv: list[str] | None = None) -> int:
    """Mount and serve until unmounted or signalled. Returns the exit status.

    Started as root for another user's store (a system store, or root serving a user),
    the daemon becomes that user before it opens anything in the store and starts
    again as ``argv``, keeping only the capabilities of :mod:`.caps`: it mounts with
    ``allow_other`` without /etc/fuse.conf, then keeps CAP_SYS_PTRACE alone."""
    uid = foreign_owner(cfg.store_root)
    if uid is not None and argv is not None:
        log.info("becoming %s (the store's owner) with %s until mounted", user_name(uid), caps.names(caps.MOUNTING))
        caps.exec_as(uid, owner_gid(cfg.store_root, uid), caps.MOUNTING, argv)
    privileged = os.geteuid() != 0 and caps.CAP_SYS_ADMIN in caps.effective()
    daemon = Daemon(cfg, privileged_mount=privileged)
    try:
        trio.run(daemon.serve)
    finally:
        daemon.close()
    return 0


def log_to_stderr(verbose: int) -> None:
    """The daemon logs its own events at INFO (journald picks stderr up under systemd)."""
    level = logging.INFO if verbose <= 1 else logging.DEBUG
    for name in ("modelfs", "modelfs_store"):
        logging.getLogger(name).setLevel(level)


