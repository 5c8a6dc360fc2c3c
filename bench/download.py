"""Benchmark: ``modelfs pull`` against ``curl -o`` for the same 1 GiB file, same server.

    python bench/download.py [--size-mib 1024] [--runs 3] [--no-record]

Serves one GGUF file from nginx on 127.0.0.1 (installed with apt-get when missing and
allowed: ``--install-nginx``), else from a threaded Python server using ``sendfile``.
Runs, alternately (A B C ... A B C ...), each into a fresh target on the same filesystem:

- ``curl -s -o FILE URL``: the bytes only (no hash, no fsync);
- ``curl -s -o FILE URL && sha256sum FILE``: what a careful user does by hand;
- ``sha256sum`` of the served file, already in the page cache: the hashing limit (GNU
  coreutils' own SHA-256 where it is built without OpenSSL, as on Debian 12);
- ``openssl dgst -sha256`` of the same: OpenSSL's SHA-256, the one Python's hashlib
  and so modelfs use (with the CPU's SHA extensions where it has them);
- ``python -m modelfs --store DIR pull URL --sha256 HEX`` in-process (``--no-daemon``),
  end to end: process start-up, streaming, SHA-256, fsync, commit, GGUF header parse
  and the catalog write;
- the same ``modelfs pull`` handed to the store's daemon (started, untimed, before the
  run with ``modelfs mount``), the command following the job to its end;
- ``Downloader.fetch`` alone in a fresh process, timed inside it: the daemon's path.

It reports the median throughput of each and the ratios the issue aims at: the pull
through the daemon against ``Downloader.fetch``, and ``Downloader.fetch`` against the
lower of curl and the hashing limit.

The result is appended to the "Downloads" section of docs/performance.md (unless
``--no-record``), with the exact command line.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import platform
import shutil
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
MIB = 1 << 20


def make_gguf(path: Path, size_mib: int) -> str:
    """A valid GGUF of about ``size_mib`` MiB; returns its SHA-256."""
    sys.path.insert(0, str(REPO / "tests"))
    from ggufgen import write_model  # the test helper: random tensor data, valid header

    write_model(path, arch="llama", name="bench", tensor_bytes=size_mib * MIB, seed=7)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


# -- servers ---------------------------------------------------------------------------
class Nginx:
    def __init__(self, root: Path, workdir: Path) -> None:
        self.port = _free_port()
        conf = workdir / "nginx.conf"
        (workdir / "tmp").mkdir(exist_ok=True)
        conf.write_text(f"""
daemon off; worker_processes 1; pid {workdir}/nginx.pid; error_log {workdir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {workdir}/tmp; proxy_temp_path {workdir}/tmp; fastcgi_temp_path {workdir}/tmp;
  uwsgi_temp_path {workdir}/tmp; scgi_temp_path {workdir}/tmp;
  server {{ listen 127.0.0.1:{self.port}; root {root}; }}
}}
""")
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        self.name = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class PythonServer:
    """Fallback: stdlib server, ``sendfile`` for the body (Range not needed here)."""

    def __init__(self, root: Path, workdir: Path) -> None:
        class Handler(http.server.SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def log_message(self, *a):
                pass

            def copyfile(self, source, outputfile):
                self.wfile.flush()
                self.connection.sendfile(source)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.name = "Python http.server with sendfile"

    def close(self) -> None:
        self.server.shutdown()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int) -> None:
    import socket
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on port {port} did not start")


def start_server(root: Path, workdir: Path, install: bool) -> Nginx | PythonServer:
    if shutil.which("nginx") is None and install:
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if shutil.which("nginx"):
        return Nginx(root, workdir)
    return PythonServer(root, workdir)


# -- runs --------------------------------------------------------------------------------
def run_curl(url: str, out: Path) -> float:
    t = time.monotonic()
    subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
    return time.monotonic() - t


def run_curl_sha256sum(url: str, out: Path) -> float:
    t = time.monotonic()
    subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
    subprocess.run(["sha256sum", str(out)], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def run_hash(argv: list[str], path: Path) -> float:
    """A hashing limit: ``argv`` over a file already in the page cache."""
    subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)  # untimed: into the cache
    t = time.monotonic()
    subprocess.run([*argv, str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def _modelfs(store: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("XDG_RUNTIME_DIR", None)  # the daemon's socket goes in the store: one per store
    return subprocess.run([sys.executable, "-m", "modelfs", "--store", str(store), *args], check=True, env=env,
                          stdout=subprocess.DEVNULL, text=True, **kw)  # type: ignore[call-overload]


def run_modelfs(url: str, digest: str, store: Path) -> float:
    t = time.monotonic()
    _modelfs(store, "pull", url, "--sha256", digest, "--name", "bench", "--no-daemon")
    return time.monotonic() - t


def run_daemon_pull(url: str, digest: str, store: Path, mnt: Path) -> float:
    """``modelfs pull`` handed to a running daemon of a fresh store (start and stop untimed)."""
    mnt.mkdir(exist_ok=True)
    _modelfs(store, "mount", str(mnt))
    try:
        t = time.monotonic()
        _modelfs(store, "pull", url, "--sha256", digest, "--name", "bench")
        took = time.monotonic() - t
        if not (store / "run" / "daemon.json").exists():
            raise SystemExit("the daemon was not running: the pull ran in-process")
    finally:
        _modelfs(store, "unmount", str(mnt))
        deadline = time.monotonic() + 30
        while (store / "run" / "daemon.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the daemon removes it as it exits
    return took


_FETCH = """
import sys, time, trio
from modelfs_store.core import Store
from modelfs_store.download import Downloader
url, digest, size, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
async def main():
    store = Store.open(root)
    async with Downloader(store.blobs) as dl:
        t = time.monotonic()
        await dl.fetch(url, sha256=digest, size=size)
        print(time.monotonic() - t)
trio.run(main)
"""


def run_fetch(url: str, digest: str, size: int, store: Path) -> float:
    """``Downloader.fetch`` alone, timed inside a fresh process: the mount daemon's cost."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _FETCH, url, digest, str(size), str(store)],
                         check=True, env=env, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def record(lines: list[str]) -> None:
    DOC.parent.mkdir(exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    heading = "## Downloads"
    block = "\n".join(lines) + "\n"
    if heading not in text:
        text = text.rstrip() + f"\n\n{heading}\n\n{block}"
    else:
        # Append at the end of the Downloads section, before the next "## " heading.
        start = text.index(heading) + len(heading)
        nxt = text.find("\n## ", start)
        end = len(text) if nxt < 0 else nxt + 1
        section = text[start:end].rstrip() + "\n\n" + block
        text = text[:start] + section + ("\n" if nxt >= 0 else "") + text[end:]
    DOC.write_text(text)


COLUMNS = {
    "curl": "`curl -s -o FILE`",
    "curl+sha256sum": "`curl -s -o FILE` then `sha256sum FILE` (by hand)",
    "sha256sum": "`sha256sum` of the file in the page cache (the hashing limit)",
    "openssl": "`openssl dgst -sha256` of the same (OpenSSL's SHA-256, the one hashlib and modelfs use)",
    "pull": "`modelfs pull --no-daemon` end to end (start-up, SHA-256, fsync, commit, GGUF, catalog)",
    "daemon": "`modelfs pull` through the daemon, end to end (the command hands over and follows)",
    "fetch": "`Downloader.fetch` alone (the daemon's path: SHA-256, fsync, commit)",
}


def one_run(times: dict[str, list[float]], url: str, digest: str, size: int, src: Path, work: Path,
            i: int) -> None:
    """One of each, with an untimed ``sync`` before each so no client pays for another's
    dirty pages."""
    out, store = work / "curl.out", work / f"store{i}"
    for key in COLUMNS:
        store.mkdir()  # an empty directory becomes a store; a missing one is refused
        subprocess.run(["sync"])
        if key == "curl":
            times[key].append(run_curl(url, out))
        elif key == "curl+sha256sum":
            times[key].append(run_curl_sha256sum(url, out))
        elif key == "sha256sum":
            times[key].append(run_hash(["sha256sum"], src))
        elif key == "openssl":
            times[key].append(run_hash(["openssl", "dgst", "-sha256"], src))
        elif key == "pull":
            times[key].append(run_modelfs(url, digest, store))
        elif key == "daemon":
            times[key].append(run_daemon_pull(url, digest, store, work / "mnt"))
        else:
            times[key].append(run_fetch(url, digest, size, store))
        out.unlink(missing_ok=True)
        remove_store(store)


def remove_store(store: Path) -> None:
    """A run's store, its blobs thawed first (root's are immutable once committed)."""
    from modelfs_store.seal import thaw

    for blob in store.glob("blobs/**/*"):
        if blob.is_file() and not blob.is_symlink():
            thaw(blob)
    shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir under /var/tmp)")
    ap.add_argument("--install-nginx", action="store_true", help="apt-get install nginx-light if missing")
    ap.add_argument("--no-record", action="store_true", help="do not append to docs/performance.md")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-", dir=args.dir or "/var/tmp"))
    try:
        os.chmod(work, 0o755)  # nginx workers run as an unprivileged user
        www = work / "www"
        www.mkdir(mode=0o755)
        src = www / "bench-Q4_K_M.gguf"
        print(f"writing a {args.size_mib} MiB GGUF ...", flush=True)
        digest = make_gguf(src, args.size_mib)
        os.chmod(src, 0o644)
        size = src.stat().st_size
        server = start_server(www, work, args.install_nginx)
        url = f"http://127.0.0.1:{server.port}/{src.name}"
        times: dict[str, list[float]] = {k: [] for k in COLUMNS}
        try:
            run_curl(url, work / "warm.out")  # warm the server's page cache for the source
            (work / "warm.out").unlink()
            for i in range(args.runs):
                one_run(times, url, digest, size, src, work, i)
                print(f"run {i + 1}: " + "   ".join(f"{k} {size / v[-1] / 1e6:5.0f} MB/s" for k, v in times.items())
                      + f"   load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            server.close()
        med = {k: size / statistics.median(v) / 1e6 for k, v in times.items()}
        ratios = (f"`modelfs pull` through the daemon / `Downloader.fetch`: **{med['daemon'] / med['fetch']:.2f}x** "
                  f"(aim: 0.9x); `Downloader.fetch` / the lower of curl and the hashing limit: "
                  f"**{med['fetch'] / min(med['curl'], med['sha256sum']):.2f}x** (aim: 0.8x), the lower of curl "
                  f"and OpenSSL's: **{med['fetch'] / min(med['curl'], med['openssl']):.2f}x**; in-process "
                  f"`modelfs pull` / curl: **{med['pull'] / med['curl']:.2f}x**.")
        print("median: " + ", ".join(f"{k} {v:.0f} MB/s" for k, v in med.items()))
        print(ratios.replace("**", "").replace("`", ""))
        if not args.no_record:
            cmd = "python bench/download.py " + " ".join(sys.argv[1:])
            record([
                f"### {time.strftime('%Y-%m-%d')}: `{cmd.strip()}`",
                "",
                f"{size / MIB:.0f} MiB GGUF from {server.name} on 127.0.0.1; {platform.node() and 'this machine'}: "
                f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}. "
                f"Alternating runs, median of {args.runs}.",
                "",
                "| Client | Runs (MB/s) | Median |",
                "|---|---|---|",
                *(f"| {COLUMNS[k]} | {', '.join(f'{size / s / 1e6:.0f}' for s in v)} | {med[k]:.0f} MB/s |"
                  for k, v in times.items()),
                "",
                f"{ratios} Load average during the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
            ])
            print(f"recorded in {DOC.relative_to(REPO)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
