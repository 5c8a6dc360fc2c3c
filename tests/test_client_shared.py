"""``modelfs.client`` with a daemon: two apps (registered executables, identified by
the trust boundary's rules) share bytes, never names without consent, and never
cancel each other's downloads.

- The example app, run as app A and then as app B, gets the shared manager, paths in
  the mount, and the origin sends the file once.
- B's entry sits on A's blob (no download); A's private entry stays invisible to B
  until ``modelfs grant B NAME``; B's remove of A's is refused, B's remove of its own
  leaves A's intact and readable.
- A controller's snapshots through the daemon go through llamadart's stages in order,
  bytes never going back; a failure ends ``failed`` with a redacted message.
- An app's prune takes its own entries only, least recently used first (a select
  is a use), and never one a reader holds open.
- ``cancel()`` by the only waiter stops the origin's traffic within a second; by one
  of two waiters, it detaches that waiter and the other's download completes, from
  one transfer.
"""
# ruff: noqa: F811 - the fault server's and the daemon's fixtures are imported by name

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, wait_for
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from test_control import Daemon, daemon, sha_file  # noqa: F401 - fixture
from test_gates import supply

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                       reason="!!! /dev/fuse is missing: the client's shared-store tests CANNOT run here !!!"),
]

A, B = "org.example.A", "org.example.B"
MB = 1 << 20
# What an app runs, as its own executable: ensure (snapshots as JSON lines; "cancel" on
# stdin cancels), list, remove.
APP = """
import json, sys, threading
from modelfs.client import ModelDownloadController, ModelLoadOptions, ModelSource, open_manager
from modelfs_store.errors import StoreError
m = open_manager()
cmd = sys.argv[1]
if cmd == "ensure":
    print(json.dumps({"kind": m.kind, "reason": m.reason}), flush=True)
    c = ModelDownloadController(m)
    c.listen(lambda s: print(json.dumps({"stage": s.stage.value, "received": s.received_bytes,
        "total": s.total_bytes, "error": s.error, "wait": s.wait_reason,
        "entry": s.entry.to_json() if s.entry else None}), flush=True))
    c.start(ModelSource.url(sys.argv[2]), ModelLoadOptions(sha256=sys.argv[3]), background="--background" in sys.argv)
    threading.Thread(target=lambda: sys.stdin.readline() == "cancel\\n" and c.cancel(), daemon=True).start()
    c.wait()
    c.dispose()
elif cmd == "list":
    print(json.dumps([e.to_json() for e in m.list()]))
elif cmd == "prune":
    limits = {k: float(v) for k, v in (a.split("=") for a in sys.argv[2:])}
    print(json.dumps([e.name for e in m.prune(max_age=limits.get("max_age"),
                                              max_bytes=int(limits["max_bytes"]) if "max_bytes" in limits else None)]))
elif cmd == "select":
    print(json.dumps(m.select(sys.argv[2]).to_json()))
elif cmd == "remove":
    try:
        print(json.dumps({"removed": m.remove(sys.argv[2])}))
    except StoreError as e:
        print(json.dumps({"error": str(e), "exit_code": e.exit_code}))
"""


class Apps:
    """Apps A and B: copies of this Python, registered by executable, importing modelfs."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        farm = d.top / "pypath"
        farm.mkdir()
        (farm / "modelfs").symlink_to(REPO / "modelfs")
        (farm / "modelfs_store").symlink_to(REPO / "store")
        site = next(p for p in sys.path if p.endswith("site-packages"))
        self.env = {"PATH": os.environ["PATH"], "PYTHONHOME": sys.base_prefix,
                    "PYTHONPATH": f"{farm}:{site}", "MODELFS_SOCKET": str(d.sock), "HOME": str(d.top)}
        self.exe = {}
        for app in (A, B):
            exe = d.top / app / "python3"
            exe.parent.mkdir()
            shutil.copy2(os.path.realpath(sys.executable), exe)
            d.cli.run("apps", "add", app, "--exe", str(exe))
            self.exe[app] = exe

    def popen(self, app: str, *args: str, script: str = APP) -> subprocess.Popen[str]:
        return subprocess.Popen([str(self.exe[app]), "-c", script, *args], env=self.env, cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def run(self, app: str, *args: str) -> Any:
        p = self.popen(app, *args)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        return [json.loads(line) for line in out.splitlines()] if args[0] == "ensure" else json.loads(out)

    def example(self, app: str, url: str, digest: str) -> list[str]:
        r = subprocess.run([str(self.exe[app]), "examples/chat.py", url, "--sha256", digest, "--card"], env=self.env,
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()


@pytest.fixture
def apps(daemon: Daemon) -> Apps:
    daemon.cli.run("config", "set", "apps.pull", "any")
    daemon.cli.run("config", "set", "apps.allowed_networks", "127.0.0.0/8")
    return Apps(daemon)


def model_at(origin: FaultServer, tmp: Path, name: str, size: int, **faults: Any) -> tuple[str, str, Path]:
    w = write_model(tmp / name, tensor_bytes=size, seed=len(name))
    origin.add(f"/{name}", w, **faults)
    return origin.url(f"/{name}"), sha_file(w), w


def test_two_apps_share_bytes_but_not_names_without_consent(daemon: Daemon, apps: Apps, origin: FaultServer,
                                                             tmp_path: Path) -> None:
    url, digest, w = model_at(origin, tmp_path, "tiny-Q4_K_M.gguf", 256 * 1024)
    mount = daemon.start()
    # The example app as A: the shared manager, a path in the mount, the bytes once.
    out = apps.example(A, url, digest)
    assert out[0].startswith(f"manager: shared (the daemon at {daemon.sock} answered; it sees this process as "
                             f"app {A} (exe))"), out
    path_a = Path(out[1].removeprefix("file: "))
    assert path_a.parent.parent == Path(mount.path) and path_a.name == "tiny-Q4_K_M.gguf"
    assert origin.bytes_sent("/tiny-Q4_K_M.gguf") == w.stat().st_size
    # B, the same source and hash: its own entry on the same blob, no download.
    path_b = Path(apps.example(B, url, digest)[1].removeprefix("file: "))
    assert path_b != path_a and path_b.parent.parent == Path(mount.path)
    assert origin.bytes_sent("/tiny-Q4_K_M.gguf") == w.stat().st_size
    name_a, name_b = path_a.parent.name, path_b.parent.name
    models = {m["name"]: m for m in daemon.call("GET", "/v1/models")}
    assert models[name_a]["files"][0]["sha256"] == models[name_b]["files"][0]["sha256"] == digest
    assert (models[name_a]["owner_app"], models[name_b]["owner_app"]) == (A, B)

    # A's private entry is invisible to B, and so B cannot remove it.
    assert [(e["name"], e["owner"]) for e in apps.run(B, "list")] == [(name_b, "app")]
    assert apps.run(B, "remove", name_a) == {"removed": False}
    # Consent is about names: after the grant B sees A's entry, and still may not remove it.
    daemon.cli.run("grant", B, name_a)
    wait_for(lambda: len(apps.run(B, "list")) == 2, 10, "the grant")
    seen = {e["name"]: e for e in apps.run(B, "list")}
    assert seen[name_a]["owner"] == "granted" and seen[name_a]["file_path"] == str(path_a)
    refused = apps.run(B, "remove", name_a)
    assert refused["exit_code"] == 7 and "not yours to remove" in refused["error"]
    # B's remove of its own entry leaves A's intact, and its bytes readable.
    assert apps.run(B, "remove", name_b) == {"removed": True}
    assert [e["name"] for e in apps.run(A, "list")] == [name_a]
    assert sha_file(path_a) == digest


def test_an_apps_prune_takes_its_own_least_recently_used_entries(daemon: Daemon, apps: Apps, origin: FaultServer,
                                                                 tmp_path: Path) -> None:
    daemon.start()
    sources = [model_at(origin, tmp_path, f"p{i}.gguf", 64 * 1024 * (i + 1)) for i in range(3)]
    names = {}
    for i, (url, digest, _) in enumerate(sources):
        *_, ready = apps.run(A, "ensure", url, digest)
        names[i] = ready["entry"]["name"]
    *_, theirs = apps.run(B, "ensure", sources[0][0], sources[0][1])
    apps.run(A, "select", names[0])  # used last: kept
    held = open(Path(apps.run(A, "list")[0]["file_path"]).parent.parent / names[1] / "p1.gguf", "rb")  # noqa: SIM115
    try:
        wait_for(lambda: any(f["model"] == names[1] for f in daemon.mount.open_files()), 10, "the reader")
        # Over a limit of two files: p1 is the least recently used but held open, so p2 goes,
        # and that is enough (p0 was selected last).
        limit = sources[0][2].stat().st_size + sources[1][2].stat().st_size
        assert apps.run(A, "prune", f"max_bytes={limit}") == [names[2]]
    finally:
        held.close()
    left = {e["name"] for e in apps.run(A, "list")}
    assert left == {names[0], names[1]}
    assert [e["name"] for e in apps.run(B, "list")] == [theirs["entry"]["name"]]  # B's untouched
    assert apps.run(B, "prune", "max_age=0") == [theirs["entry"]["name"]]
    assert {e["name"] for e in apps.run(A, "list")} == left  # A's untouched by B's prune


def stages_in_order(snaps: list[dict[str, Any]]) -> None:
    order = ["idle", "resolving", "checking_cache", "downloading", "verifying", "ready", "failed", "cancelled"]
    stages = [s["stage"] for s in snaps]
    assert stages == sorted(stages, key=order.index), stages
    got = [s["received"] for s in snaps]
    assert got == sorted(got), got


def test_snapshots_through_the_daemon_and_a_redacted_failure(daemon: Daemon, apps: Apps, origin: FaultServer,
                                                             tmp_path: Path) -> None:
    url, digest, w = model_at(origin, tmp_path, "s.gguf", 8 * MB, rate=16 * MB)
    daemon.start()
    kind, *snaps = apps.run(A, "ensure", url, digest)
    assert kind["kind"] == "shared"
    stages_in_order(snaps)
    assert {"resolving", "checking_cache", "downloading", "verifying", "ready"} <= {s["stage"] for s in snaps}
    assert snaps[-1]["stage"] == "ready" and snaps[-1]["received"] == w.stat().st_size
    assert snaps[-1]["entry"]["sha256"] == digest
    # A wrong hash of a signed URL: failed, with the signature kept out of the message.
    _, *snaps = apps.run(A, "ensure", url + "?X-Amz-Signature=s3cr3t", "0" * 64)
    stages_in_order(snaps)
    assert snaps[-1]["stage"] == "failed" and "SHA-256" in snaps[-1]["error"]
    assert "s3cr3t" not in snaps[-1]["error"]


def test_a_snapshot_says_why_it_waits(daemon: Daemon, apps: Apps, origin: FaultServer, tmp_path: Path) -> None:
    daemon.cli.run("config", "set", "pulls.concurrency", "1")
    big_url, big_digest, _ = model_at(origin, tmp_path, "first.gguf", 64 * MB, rate=2 * MB)
    url, digest, _ = model_at(origin, tmp_path, "second.gguf", 64 * 1024)
    daemon.start()
    first = daemon.call("POST", "/v1/pulls", {"source": big_url, "sha256": big_digest})
    wait_for(lambda: daemon.job(first["id"])["state"] == "running", 30, "the first job")
    p = apps.popen(A, "ensure", url, digest)
    snaps: list[dict[str, Any]] = []
    reader = follow(p, snaps)
    wait_for(lambda: any(s.get("wait") == "queued" for s in snaps), 30, "a snapshot waiting in the queue")
    assert all(s["stage"] == "downloading" for s in snaps if s.get("wait"))
    daemon.call("POST", f"/v1/pulls/{first['id']}/cancel")
    assert p.wait(60) == 0
    reader.join(10)
    assert snaps[-1]["stage"] == "ready" and snaps[-1]["wait"] is None
    stages_in_order(snaps[1:])


def test_a_background_ensure_on_battery_says_it_waits_for_mains_power(apps: Apps, origin: FaultServer,
                                                                    tmp_path: Path) -> None:
    """The snapshot's wait reason is the gate's job state (issue 12's gates, issue 13's
    snapshots): a background ensure waits in ``queued_power`` until the supply is on AC."""
    d = apps.d
    power = tmp_path / "power"
    ac = supply(power, "AC", type="Mains", online="0")
    supply(power, "BAT0", type="Battery", present="1", status="Discharging")
    d.cli.overrides["MODELFS_POWER_SUPPLY_ROOT"] = str(power)  # the daemon reads this fake supply
    d.cli.run("config", "set", "gate.power", "ac")
    url, digest, _ = model_at(origin, tmp_path, "bg.gguf", 64 * 1024)
    d.start()
    p = apps.popen(A, "ensure", url, digest, "--background")
    snaps: list[dict[str, Any]] = []
    reader = follow(p, snaps)
    wait_for(lambda: any(s.get("wait") == "queued_power" for s in snaps), 30, "a snapshot waiting for mains power")
    assert origin.requests("/bg.gguf") == []
    (ac / "online").write_text("1\n")
    assert p.wait(60) == 0
    reader.join(10)
    assert snaps[-1]["stage"] == "ready" and snaps[-1]["wait"] is None
    stages_in_order(snaps[1:])


def follow(p: subprocess.Popen[str], snaps: list[dict[str, Any]]) -> threading.Thread:
    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            snaps.append(json.loads(line))
    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_cancel_by_the_only_waiter_stops_the_origin(daemon: Daemon, apps: Apps, origin: FaultServer,
                                                    tmp_path: Path) -> None:
    url, digest, w = model_at(origin, tmp_path, "slow.gguf", 64 * MB, rate=4 * MB)
    daemon.start()
    p = apps.popen(A, "ensure", url, digest)
    snaps: list[dict[str, Any]] = []
    reader = follow(p, snaps)
    wait_for(lambda: any(s.get("received", 0) > MB for s in snaps), 60, "the first bytes")
    assert p.stdin is not None
    p.stdin.write("cancel\n")
    p.stdin.flush()
    assert p.wait(30) == 0
    reader.join(10)
    assert snaps[-1]["stage"] == "cancelled"
    (job,) = daemon.call("GET", "/v1/pulls")
    assert job["state"] == "cancelled"
    # Within a second the origin sends nothing more: what it sent a second after the
    # cancel is all it ever sends.
    threading.Event().wait(1.0)
    after_1s = origin.bytes_sent("/slow.gguf")
    threading.Event().wait(1.0)
    assert origin.bytes_sent("/slow.gguf") == after_1s < w.stat().st_size


def test_cancel_by_one_of_two_waiters_detaches_it_and_the_other_completes(
        daemon: Daemon, apps: Apps, origin: FaultServer, tmp_path: Path) -> None:
    url, digest, w = model_at(origin, tmp_path, "two.gguf", 24 * MB, rate=8 * MB)
    daemon.start()
    first, second = apps.popen(A, "ensure", url, digest), apps.popen(A, "ensure", url, digest)
    s1: list[dict[str, Any]] = []
    s2: list[dict[str, Any]] = []
    r1, r2 = follow(first, s1), follow(second, s2)
    wait_for(lambda: any(s.get("received", 0) > MB for s in s1) and any(s.get("received", 0) > MB for s in s2),
             60, "both waiters to see bytes")
    assert first.stdin is not None
    first.stdin.write("cancel\n")
    first.stdin.flush()
    assert first.wait(30) == 0 and second.wait(120) == 0
    r1.join(10)
    r2.join(10)
    assert s1[-1]["stage"] == "cancelled"
    assert s2[-1]["stage"] == "ready" and s2[-1]["entry"]["sha256"] == digest
    stages_in_order(s2[1:])
    (job,) = daemon.call("GET", "/v1/pulls")  # one job, two waiters, one transfer
    assert job["state"] == "done"
    assert origin.bytes_sent("/two.gguf") == w.stat().st_size


def test_an_entry_the_socket_names_is_already_in_the_mount(daemon: Daemon, tmp_path: Path) -> None:
    """A model recorded a moment ago (here by `modelfs import`; in an app's case, its pull
    job): the socket's answer names its path in the mount, and that path is there at once,
    not at the mount's next look at the catalog (every 0.2 s). Ten in a row, each asked
    right after it was recorded."""
    daemon.start()
    w = write_model(tmp_path / "w.gguf", tensor_bytes=4096, seed=9)
    for i in range(10):
        daemon.cli.run("import", f"m{i}", str(w))
        entry = daemon.call("GET", f"/v1/entries/m{i}")
        assert os.path.exists(entry["file_path"]), (i, entry["file_path"])
