"""The daemon owns the work: its control socket and its pull jobs, against a real
daemon (``modelfs mount --foreground`` in a subprocess) and a real origin.

- ``curl --unix-socket`` reads ``/v1/status``; a second uid (nobody, through setpriv;
  the socket is 0666) is answered, and refused with 403 the pull it may not start;
  an app's URL on 127.0.0.1 is refused under the default policy, before any request.
- ``modelfs pull`` hands the job to the daemon: killing the command (-9) or
  interrupting it leaves the pull running to its end; its output and exit codes are
  the in-process pull's.
- A daemon killed at half a pull and started again finishes it, and the origin sends
  at most the missing bytes plus 64 MiB.
- A token is never stored: the restarted job waits in ``needs_credentials`` until a
  client brings it again.
- A lazy open through the mount and a job fetching the same blob share one transfer.
"""
# ruff: noqa: F811 - the fault server's fixtures are imported by name

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI, remove_tree, wait_for
from faultserver import FaultServer, cdn, origin  # noqa: F401 - fixtures
from ggufgen import write_model
from modelfs.mount.socketclient import ControlClient
from test_mount import Mount
from test_packs import Publisher, release

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                       reason="!!! /dev/fuse is missing: the control socket tests CANNOT run on this machine !!!"),
]

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
A = "org.example.A"
MB = 1 << 20
BOUND = 64 * MB
# A client in a registered executable (app A): Python's http.client over the unix socket.
CLIENT = """
import http.client, socket, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])
c = Unix("modelfs")
c.request(sys.argv[2], sys.argv[3], body=sys.argv[4].encode(), headers={"content-type": "application/json"})
r = c.getresponse()
print(r.status)
print(r.read().decode())
"""


def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MB):
            h.update(chunk)
    return h.hexdigest()


class Daemon:
    """A store in a directory every uid may traverse, its daemon, its socket (0666)."""

    def __init__(self, top: Path, env: dict[str, str] | None = None) -> None:
        self.top = top
        self.store = top / "store"
        self.cli = CLI(self.store, env)
        self.sock = top / "c.sock"
        self.mount: Mount | None = None

    def start(self) -> Mount:
        if self.mount is None:
            self.mount = Mount(self.cli, self.top / "mnt", "--socket", str(self.sock), "--socket-mode", "666",
                               "--allow-other")
        else:
            self.mount.start()
        return self.mount

    def kill(self) -> None:
        assert self.mount is not None
        self.mount.proc.send_signal(signal.SIGKILL)
        self.mount.proc.wait()
        self.mount.logf.close()

    def client(self) -> ControlClient:
        return ControlClient(self.sock)

    def call(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        with self.client() as c:
            return c.call(method, route, body)

    def curl(self, *args: str, as_nobody: bool = False) -> tuple[int, Any]:
        argv = ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(self.sock), *args]
        r = subprocess.run([*SETPRIV, *argv] if as_nobody else argv, capture_output=True, text=True, timeout=60,
                           cwd="/")
        body, _, code = r.stdout.rpartition("\n")
        return int(code), json.loads(body)

    def job(self, job_id: int) -> dict[str, Any]:
        return self.call("GET", f"/v1/pulls/{job_id}")

    def stop(self) -> None:
        if self.mount is not None:
            self.mount.stop()


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    top = Path(tempfile.mkdtemp(prefix="mfs-", dir="/tmp"))  # short: curl needs the socket's path whole
    top.chmod(0o755)
    d = Daemon(top, {"HF_HOME": str(top / "no-hf-home")})
    try:
        yield d
    finally:
        d.stop()
        remove_tree(top)


@pytest.fixture
def curl() -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is missing: the README's test command installs it (apt-get install -y curl)")


def gguf_at(origin: FaultServer, tmp: Path, name: str, size: int, seed: int, **faults: Any) -> tuple[str, str]:
    w = write_model(tmp / name, tensor_bytes=size, seed=seed)
    origin.add(f"/{name}", w, **faults)
    return origin.url(f"/{name}"), sha_file(w)


# -- the socket -----------------------------------------------------------------------------
def test_curl_reads_the_status_and_every_uid_is_judged_on_its_own(daemon: Daemon, curl: None) -> None:
    daemon.start()
    code, status = daemon.curl("http://x/v1/status")
    assert code == 200 and status["store"] == str(daemon.store) and status["pid"] == daemon.mount.pid
    assert status["caller"] == {"uid": 0, "app_id": None, "rule": "none", "sure": True, "owner": True,
                                "peer": "pidfd"}
    assert status["control_socket"] == {"path": str(daemon.sock), "where": "option"}
    assert oct(daemon.sock.stat().st_mode & 0o777) == "0o666"
    code, theirs = daemon.curl("http://x/v1/status", as_nobody=True)
    assert code == 200 and theirs["caller"]["uid"] == NOBODY and theirs["caller"]["owner"] is False

    pull = json.dumps({"source": "https://example.org/w.gguf", "sha256": "a" * 64})
    code, refused = daemon.curl("-X", "POST", "-d", pull, "http://x/v1/pulls", as_nobody=True)
    assert code == 403 and refused["error"]["reason"] == "apps.pull" and refused["error"]["exit_code"] == 7
    code, _ = daemon.curl("http://x/v1/settings", as_nobody=True)
    assert code == 403
    denied = [r for r in _audit(daemon) if r["action"] == "deny"]
    assert [json.loads(r["detail"])["uid"] for r in denied] == [NOBODY, NOBODY]
    assert daemon.call("GET", "/v1/pulls") == []


def _audit(daemon: Daemon) -> list[dict[str, Any]]:
    from modelfs_store.catalog import Catalog
    cat = Catalog(daemon.store / "catalog.db")
    try:
        return cat.audit_log()
    finally:
        cat.close()


def test_an_app_url_on_loopback_is_refused_under_the_default_policy(daemon: Daemon, origin: FaultServer) -> None:
    pub = Publisher(origin)
    daemon.cli.run("keys", "add", "k1", pub.pub("k1"))
    url = pub.serve("demo.json", release(pub, 1))
    exe = daemon.top / "appA" / "python3"
    exe.parent.mkdir()
    shutil.copy2("/usr/bin/python3", exe)
    daemon.cli.run("apps", "add", A, "--exe", str(exe))
    daemon.start()
    r = subprocess.run([str(exe), "-c", CLIENT, str(daemon.sock), "POST", "/v1/pulls", json.dumps({"source": url})],
                       capture_output=True, text=True, timeout=60)
    code, body = r.stdout.split("\n", 1)
    error = json.loads(body)["error"]
    assert code == "403" and error["reason"] == "address", r.stdout + r.stderr
    assert "127.0.0.1 is a loopback address" in error["message"]
    assert origin.requests() == []  # refused before a request, the envelope's included
    # The same pull by the store owner at a shell goes through.
    job = daemon.call("POST", "/v1/pulls", {"source": url})
    wait_for(lambda: daemon.job(job["id"])["state"] == "done", 60, "the owner's pull")


# -- pulls that outlive the command -----------------------------------------------------------
def test_a_pull_started_by_the_cli_finishes_after_the_cli_was_killed(daemon: Daemon, origin: FaultServer,
                                                                      tmp_path: Path) -> None:
    daemon.start()
    url, digest = gguf_at(origin, tmp_path, "k.gguf", 24 * MB, 21, rate=8 * MB)
    p = daemon.cli.popen("pull", url, "--sha256", digest, "--name", "k", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_for(lambda: origin.bytes_sent("/k.gguf") > MB, 60, "the daemon's transfer to start")
    p.kill()
    p.wait()
    [job] = daemon.call("GET", "/v1/pulls")
    assert job["state"] == "running"
    wait_for(lambda: daemon.job(job["id"])["state"] == "done", 60, "the job to finish without its command")
    assert (daemon.store / "blobs" / "sha256" / digest[:2] / digest).exists()
    assert [m["name"] for m in daemon.call("GET", "/v1/models")] == ["k"]


def test_a_model_pulled_through_the_daemon_is_in_the_mount_when_pull_returns(daemon: Daemon, origin: FaultServer,
                                                                             tmp_path: Path) -> None:
    """`modelfs pull` ends when its job is done; the mount takes in the job's model before
    that, not at its next look at the catalog (every 0.2 s): `ls` right after finds it."""
    mount = daemon.start()
    for i in range(6):
        url, digest = gguf_at(origin, tmp_path, f"n{i}.gguf", 64 << 10, 40 + i)
        daemon.cli.run("pull", url, "--sha256", digest, "--name", f"n{i}")
        assert (mount.path / f"n{i}" / f"n{i}.gguf").exists(), i


def test_interrupting_pull_leaves_the_job_running_and_says_how_to_cancel(daemon: Daemon, origin: FaultServer,
                                                                         tmp_path: Path) -> None:
    daemon.start()
    url, digest = gguf_at(origin, tmp_path, "i.gguf", 24 * MB, 22, rate=8 * MB)
    p = daemon.cli.popen("pull", url, "--sha256", digest, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: origin.bytes_sent("/i.gguf") > MB, 60, "the daemon's transfer to start")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "`modelfs pulls cancel 1` stops it" in err, err
    assert daemon.job(1)["state"] == "running"
    r = daemon.cli.run("pulls", "cancel", "1", process=True)
    assert r.stdout == "job 1: cancelled (cancelled)\n"
    assert daemon.job(1)["state"] == "cancelled"


def test_pull_through_the_daemon_prints_what_an_in_process_pull_prints(daemon: Daemon, origin: FaultServer,
                                                                       tmp_path: Path) -> None:
    url, digest = gguf_at(origin, tmp_path, "same.gguf", 2 * MB, 23)
    local = daemon.cli.run("pull", url, "--sha256", digest, "--name", "one", "--json", process=True)
    daemon.start()
    remote = daemon.cli.run("pull", url, "--sha256", digest, "--name", "two", "--json", process=True)
    assert remote.stderr == ""
    strip = [json.loads(line) for line in local.stdout.splitlines()], [json.loads(line) for line in
                                                                      remote.stdout.splitlines()]
    assert [sorted(e) for e in strip[0][:1]] == [sorted(e) for e in strip[1][:1]]  # the start event
    assert sorted(strip[0][-1]) == sorted(strip[1][-1]) and strip[1][-1]["name"] == "two"
    # An error is the same line and exit code.
    local_err = daemon.cli.run("pull", origin.url("/nothing.gguf"), "--sha256", "0" * 64, "--no-daemon",
                               check=False, process=True)
    remote_err = daemon.cli.run("pull", origin.url("/nothing.gguf"), "--sha256", "0" * 64, check=False, process=True)
    assert (remote_err.returncode, remote_err.stderr) == (local_err.returncode, local_err.stderr) == \
        (9, f"modelfs: error: {origin.url('/nothing.gguf')}: HTTP 404: not found on 127.0.0.1\n")
    # --detach returns at once with the job; pulls lists it.
    r = daemon.cli.run("pull", url, "--sha256", digest, "--name", "three", "--detach", "--json", process=True)
    event = json.loads(r.stdout)
    assert event["event"] == "job" and event["job"]["source"] == url
    wait_for(lambda: daemon.job(event["job"]["id"])["state"] == "done", 60, "the detached job")
    listed = daemon.cli.run("pulls", "--json", process=True).json()
    assert [(j["state"], j["model"]) for j in listed] == [("done", "two"), ("failed", None), ("done", "three")]


# -- a daemon that dies -------------------------------------------------------------------------
def test_a_daemon_killed_at_half_a_pull_finishes_it_after_a_restart(daemon: Daemon, origin: FaultServer,
                                                                    tmp_path: Path) -> None:
    size_wanted = 256 * MB
    url, digest = gguf_at(origin, tmp_path, "half.gguf", size_wanted, 24, rate=256 * MB)
    size = (tmp_path / "half.gguf").stat().st_size
    daemon.start()
    job = daemon.call("POST", "/v1/pulls", {"source": url, "sha256": digest})
    wait_for(lambda: origin.bytes_sent("/half.gguf") >= size // 2, 120, "half of the file sent")
    daemon.kill()
    first = origin.bytes_sent("/half.gguf")
    assert first < size
    daemon.start()
    wait_for(lambda: daemon.job(job["id"])["state"] in ("done", "failed"), 120, "the resumed job")
    assert daemon.job(job["id"])["state"] == "done"
    assert sha_file(daemon.store / "blobs" / "sha256" / digest[:2] / digest) == digest
    reqs = origin.requests("/half.gguf")
    assert "range" in reqs[-1].headers
    lost = origin.bytes_sent("/half.gguf") - size
    print(f"\ndaemon killed after {first / MB:.0f} MiB sent; the resume lost {lost / MB:.1f} MiB")
    assert lost <= BOUND, (first, lost)


def test_a_token_is_never_stored_and_the_restarted_job_waits_for_it(daemon: Daemon, origin: FaultServer,
                                                                    cdn: FaultServer, tmp_path: Path) -> None:
    token = "hf_secrettoken98765"
    w = write_model(tmp_path / "gated-Q4_K_M.gguf", tensor_bytes=64 * MB, seed=25)
    digest = origin.add_hf("org/gated", w.name, w, cdn=cdn, token=token, rate=32 * MB)
    daemon.cli.overrides["MODELFS_HF_ENDPOINT"] = origin.origin  # the daemon's hub, not the token
    daemon.start()
    p = daemon.cli.popen("pull", f"hf://org/gated/{w.name}", "--detach", env={"HF_TOKEN": token},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    wait_for(lambda: cdn.bytes_sent(f"/repos/{digest[:2]}/{digest}") > 8 * MB, 60, "the transfer to start")
    daemon.kill()
    for f in daemon.store.glob("catalog.db*"):
        assert token.encode() not in f.read_bytes()
    daemon.start()
    job = daemon.job(1)
    assert (job["state"], job["credentials"]) == ("needs_credentials", ["token"]), job
    still = daemon.cli.run("pulls", "resume", "1", process=True).stdout  # no token here: it still waits
    assert still.startswith("job 1: needs_credentials (") and "token" in still
    r = daemon.cli.run("pulls", "resume", "1", process=True, env={"HF_TOKEN": token})
    assert r.stdout.startswith("job 1: queued")
    wait_for(lambda: daemon.job(1)["state"] in ("done", "failed"), 60, "the job with its token back")
    assert daemon.job(1)["state"] == "done"
    assert all(r.headers.get("authorization") == f"Bearer {token}"
               for r in origin.requests(f"/org/gated/resolve/main/{w.name}"))


def test_a_lazy_open_and_a_job_share_one_transfer(daemon: Daemon, origin: FaultServer, tmp_path: Path) -> None:
    pub = Publisher(origin)
    daemon.cli.run("keys", "add", "k1", pub.pub("k1"))
    w = write_model(tmp_path / "demo-Q4_K_M.gguf", tensor_bytes=24 * MB, seed=26)
    art = pub.artifact(w.name, w.read_bytes())
    [path] = pub.artifact_paths
    origin.resources[path].rate = 8 * MB
    url = pub.serve("v1.json", pub.envelope(pub.payload(1, [art])))
    daemon.cli.run("pull", "--lazy", url)
    mount = daemon.start()
    reader = subprocess.Popen([sys.executable, "-c", "import hashlib, sys; print(hashlib.sha256("
                               "open(sys.argv[1], 'rb').read()).hexdigest())", str(mount.path / "demo" / w.name)],
                              stdout=subprocess.PIPE, text=True)
    wait_for(lambda: origin.bytes_sent(path) > MB, 60, "the open's transfer to start")
    job = daemon.call("POST", "/v1/pulls", {"source": url})
    # The job joins the open's transfer: it reports its bytes while they arrive.
    wait_for(lambda: reader.poll() is not None or daemon.job(job["id"])["bytes_done"] > 0, 60, "the job to join")
    assert reader.poll() is None, "the transfer ended before the job could join it"
    assert reader.communicate(timeout=60)[0].strip() == art["sha256"]
    wait_for(lambda: daemon.job(job["id"])["state"] == "done", 60, "the job")
    assert len(origin.requests(path)) == 1 and origin.bytes_sent(path) == art["size"]


def test_the_socket_is_in_the_runtime_dir_unless_another_store_holds_it(tmp_path: Path, origin: FaultServer) -> None:
    run = Path(tempfile.mkdtemp(prefix="mfs-xdg-", dir="/tmp"))
    mounts: list[Mount] = []
    try:
        clis = [CLI(tmp_path / f"s{i}", {"XDG_RUNTIME_DIR": str(run)}) for i in (1, 2)]
        for i, c in enumerate(clis, 1):
            mounts.append(Mount(c, tmp_path / f"m{i}"))
        first, second = (c.run("status", "--json").json()["mount"]["control_socket"] for c in clis)
        assert first == {"path": str(run / "modelfs" / "control.sock"), "where": "runtime-dir"}
        assert second == {"path": str(tmp_path / "s2" / "run" / "control.sock"), "where": "store"}
        assert (run / "modelfs").stat().st_mode & 0o777 == 0o700
        assert Path(first["path"]).stat().st_mode & 0o777 == 0o600
        assert "(in the store (no $XDG_RUNTIME_DIR, or it was taken))" in clis[1].run("status").stdout
        # Each store's CLI hands its pulls to its own daemon.
        url, digest = gguf_at(origin, tmp_path, "x.gguf", MB, 27)
        clis[1].run("pull", url, "--sha256", digest, "--detach")
        assert clis[0].run("pulls", "--json").json() == []
        assert [j["source"] for j in clis[1].run("pulls", "--json").json()] == [url]
    finally:
        for m in mounts:
            m.stop()
        remove_tree(run)


def test_sigterms_after_the_kernel_let_go_never_cut_the_cleanup_short(daemon: Daemon) -> None:
    """`modelfs unmount` as root detaches a system store's mount itself, then sends SIGTERM:
    the signal may land after the kernel ended the session, while the daemon cleans up.
    It must not kill it there: the socket and run/daemon.json would be left behind."""
    m = daemon.start()
    pid = m.proc.pid
    subprocess.run(["umount", "-l", str(m.path)], check=True, timeout=30)
    while m.proc.poll() is None:  # a SIGTERM at every moment of the shutdown
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert m.proc.returncode == 0, m.proc.returncode
    assert not daemon.sock.exists()
    assert not (daemon.store / "run" / "daemon.json").exists()
