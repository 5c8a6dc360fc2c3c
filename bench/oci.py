"""Benchmark: ``modelfs push`` and ``modelfs pull`` of an OCI artifact against curl doing
the same distribution-API steps, to and from Debian's real registry on 127.0.0.1.

    python bench/oci.py                          # 1 GiB model, 3 rounds, print the tables
    python bench/oci.py --rounds 4 --write-doc   # also update docs/performance.md

Needs ``/usr/bin/docker-registry`` (Debian's ``docker-registry``, distribution 2.8) and
curl. Everything lives in a temporary directory under ``--dir`` (default /tmp), removed
at the end. What it does:

* writes a ~``--size-mib`` MiB GGUF (``tests/ggufgen.py``) and imports it into a store
  as model ``bench``; starts the registry (``tests/registry.py``: filesystem storage,
  plain HTTP, no auth); pushes once, untimed, to learn the manifest and config blob
  ``modelfs push`` writes;
* push, alternating, each into an empty registry storage (wiped, then an untimed
  ``sync``, so every run really uploads every byte and no run pays for another's dirty
  pages):

  - ``modelfs push bench oci+http://127.0.0.1:PORT/bench/m:v1`` in its own process;
  - curl: POST an upload and PUT the config blob, POST an upload and ``curl -T FILE``
    the weights as one monolithic ``PUT ?digest=``, PUT the same manifest;

* pull, alternating, each into a fresh store (or file) on the same file system:

  - ``modelfs pull oci+http://…/bench/m:v1`` in its own process (a registry pull never
    goes through the daemon);
  - ``store.pull.pull_source`` of the same reference, timed inside a fresh process (no
    interpreter start-up, no CLI imports, no catalog open: what the command adds);
  - ``curl -o /dev/null`` and ``curl -o FILE`` of ``/v2/bench/m/blobs/sha256:HEX``;
  - ``openssl dgst -sha256`` of the blob in the page cache: the hashing limit (the
    SHA-256 that Python's hashlib, so modelfs, uses).

The order of the runs within each group rotates every round. Reported: the median
throughput of each (MB/s, 10^6 bytes a second, of the weights' size) and the ratios
modelfs / curl of medians. ``--write-doc`` replaces the measured block of the "OCI
registries" section of docs/performance.md (the reading around it is written by hand).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests")]

from registry import REGISTRY_BIN, Registry  # noqa: E402 - tests/registry.py, the tests' own

DOC = REPO / "docs" / "performance.md"
SECTION = "## OCI registries: push and pull"
BEGIN, END = "<!-- bench/oci.py: begin -->", "<!-- bench/oci.py: end -->"
MIB = 1 << 20
REPO_TAG = "bench/m:v1"

PUSH = {
    "push": "`modelfs push` (own process: start-up, HEAD, POST, 16 MiB PATCHes, PUT, manifest)",
    "curl-push": "curl push (POST, then `curl -T FILE` as one `PUT ?digest=`; config blob and manifest too)",
}
PULL = {
    "pull": "`modelfs pull oci+http://…` (own process, a fresh store)",
    "pull_source": "`store.pull.pull_source` alone, timed in a fresh process (a fresh store)",
    "curl-null": "`curl -o /dev/null` of the blob URL",
    "curl-file": "`curl -o FILE` of the blob URL (same file system)",
    "openssl": "`openssl dgst -sha256` of the blob in the page cache (hashing limit)",
}


# -- helpers -----------------------------------------------------------------------------
def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO)}
    e.pop("XDG_RUNTIME_DIR", None)
    for k in ("MODELFS_REGISTRY_USER", "MODELFS_REGISTRY_PASSWORD", "MODELFS_OFFLINE"):
        e.pop(k, None)
    return e


def modelfs(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelfs", "--store", str(store), *args], check=True, env=env(),
                          stdout=subprocess.PIPE, text=True)


def timed(fn: Callable[[], object]) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (the clients)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Cpu:
    """CPU seconds of one run: the client processes', the registry's."""

    def __init__(self, registry_pid: int) -> None:
        self.pid = registry_pid
        self.client: dict[str, list[float]] = {}
        self.server: dict[str, list[float]] = {}

    def run(self, key: str, fn: Callable[[], float]) -> float:
        c, s = children_cpu(), proc_cpu(self.pid)
        took = fn()
        self.client.setdefault(key, []).append(children_cpu() - c)
        self.server.setdefault(key, []).append(proc_cpu(self.pid) - s)
        return took


def remove_tree(top: Path) -> None:
    """A store (or anything) under the work directory, immutable blobs thawed first."""
    if not top.exists():
        return
    subprocess.run(["chattr", "-R", "-i", str(top)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(top, ignore_errors=True)


def curl(*args: str) -> str:
    return subprocess.run(["curl", "-s", "-f", "-H", "Expect:", *args], check=True, capture_output=True,
                          text=True).stdout


def start_upload(base: str, repo: str) -> str:
    """POST /v2/REPO/blobs/uploads/ with curl; the Location it answers (absolute)."""
    headers = curl("-X", "POST", "-D", "-", "-o", "/dev/null", f"{base}/v2/{repo}/blobs/uploads/")
    for line in headers.splitlines():
        if line.lower().startswith("location:"):
            loc = line.split(":", 1)[1].strip()
            return loc if loc.startswith("http") else base + loc
    raise SystemExit(f"the registry answered no Location: {headers}")


def with_digest(location: str, digest: str) -> str:
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def curl_push(base: str, weights: Path, sha: str, config: Path, config_digest: str, manifest: Path,
              manifest_type: str) -> None:
    """The same distribution-API steps as ``modelfs push``, each blob one monolithic PUT."""
    repo, tag = REPO_TAG.split(":")
    curl("-X", "PUT", "--data-binary", f"@{config}", "-H", "Content-Type: application/octet-stream",
         "-o", "/dev/null", with_digest(start_upload(base, repo), config_digest))
    curl("-T", str(weights), "-H", "Content-Type: application/octet-stream", "-o", "/dev/null",
         with_digest(start_upload(base, repo), f"sha256:{sha}"))
    curl("-X", "PUT", "--data-binary", f"@{manifest}", "-H", f"Content-Type: {manifest_type}", "-o", "/dev/null",
         f"{base}/v2/{repo}/manifests/{tag}")


_PULL_SOURCE = """
import sys, time, trio
from modelfs_store.core import Store
from modelfs_store.pull import downloader_from_env, pull_source
from modelfs_store.pulloptions import PullOptions
ref, root = sys.argv[1], sys.argv[2]
async def main():
    store = Store.open(root)
    async with downloader_from_env(store.blobs) as dl:
        t = time.monotonic()
        await pull_source(store, dl, ref, PullOptions(name="bench"))
        print(time.monotonic() - t)
trio.run(main)
"""


def run_pull_source(ref: str, store: Path) -> float:
    out = subprocess.run([sys.executable, "-c", _PULL_SOURCE, ref, str(store)], check=True, env=env(),
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def wipe_registry(reg: Registry) -> None:
    """Every blob, upload and repository of the running registry (filesystem storage,
    no cache configured: the next request finds nothing)."""
    shutil.rmtree(reg.storage / "docker", ignore_errors=True)


def load() -> float:
    return os.getloadavg()[0]


# -- the bench ---------------------------------------------------------------------------
@dataclass
class Result:
    size: int
    push: dict[str, list[float]]          # seconds per run
    pull: dict[str, list[float]]
    loads: list[float]                    # load average before and after each round
    registry: str                         # its version line
    client_cpu: dict[str, list[float]]    # CPU seconds per run, the client processes
    server_cpu: dict[str, list[float]]    # the registry's


def bench(args: argparse.Namespace, work: Path) -> Result:
    from ggufgen import write_model

    src = work / "bench-Q4_K_M.gguf"
    print(f"writing a {args.size_mib} MiB GGUF ...", flush=True)
    write_model(src, arch="llama", name="bench", tensor_bytes=args.size_mib * MIB, seed=7)
    size = src.stat().st_size
    h = hashlib.sha256()
    with open(src, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    sha = h.hexdigest()
    store = work / "store"
    store.mkdir()
    modelfs(store, "import", "bench", str(src))
    blob = store / "blobs" / sha[:2] / sha
    if not blob.exists():
        found = [p for p in (store / "blobs").rglob(sha) if p.is_file()]
        blob = found[0]

    reg = Registry(work / "registry").start()
    try:
        target = reg.ref(REPO_TAG)
        repo, tag = REPO_TAG.split(":")
        # Untimed: the manifest and config modelfs writes, for curl to write the same.
        modelfs(store, "push", "bench", target)
        import httpx

        accept = "application/vnd.oci.image.manifest.v1+json"
        m = httpx.get(f"{reg.base}/v2/{repo}/manifests/{tag}", headers={"Accept": accept})
        m.raise_for_status()
        manifest_type = m.headers["content-type"]
        (work / "manifest.json").write_bytes(m.content)
        cfg_digest = json.loads(m.content)["config"]["digest"]
        c = httpx.get(f"{reg.base}/v2/{repo}/blobs/{cfg_digest}")
        c.raise_for_status()
        (work / "config.json").write_bytes(c.content)
        blob_url = f"{reg.base}/v2/{repo}/blobs/sha256:{sha}"

        push_t: dict[str, list[float]] = {k: [] for k in PUSH}
        pull_t: dict[str, list[float]] = {k: [] for k in PULL}
        assert reg.process is not None
        cpu = Cpu(reg.process.pid)
        loads = [load()]
        for r in range(args.rounds):
            keys = list(PUSH)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in keys:
                wipe_registry(reg)
                os.sync()
                if key == "push":
                    push = lambda: timed(lambda: modelfs(store, "push", "bench", target))  # noqa: E731
                else:
                    push = lambda: timed(lambda: curl_push(reg.base, src, sha, work / "config.json",  # noqa: E731
                                                           cfg_digest, work / "manifest.json", manifest_type))
                push_t[key].append(cpu.run(key, push))
            # Both leave the same artifact: check it is whole before pulling it.
            if httpx.head(blob_url).headers.get("content-length") != str(size):
                raise SystemExit("the registry does not hold the pushed blob")
            keys = list(PULL)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]
            fresh = work / "pulled"
            for key in keys:
                remove_tree(fresh)
                fresh.mkdir()
                if key == "openssl":
                    subprocess.run(["cat", str(blob)], check=True, stdout=subprocess.DEVNULL)  # into the cache
                os.sync()
                pull_t[key].append(cpu.run(key, partial(one_pull, key, target, fresh, blob_url, blob)))
            remove_tree(fresh)
            loads.append(load())
            print(f"round {r + 1}: " + "  ".join(f"{k} {size / v[-1] / 1e6:.0f}"
                                                 for k, v in (*push_t.items(), *pull_t.items()))
                  + f" MB/s; load {loads[-1]:.1f}", flush=True)
    finally:
        reg.stop()
    version = subprocess.run([REGISTRY_BIN, "--version"], capture_output=True, text=True).stdout.strip()
    return Result(size, push_t, pull_t, loads, version, cpu.client, cpu.server)


def one_pull(key: str, target: str, fresh: Path, blob_url: str, blob: Path) -> float:
    if key == "pull":
        return timed(lambda: modelfs(fresh, "pull", target, "--name", "bench"))
    if key == "pull_source":
        return run_pull_source(target, fresh)
    if key == "curl-null":
        return timed(lambda: curl("-o", "/dev/null", blob_url))
    if key == "curl-file":
        return timed(lambda: curl("-o", str(fresh / "blob"), blob_url))
    return timed(lambda: subprocess.run(["openssl", "dgst", "-sha256", str(blob)], check=True,
                                        stdout=subprocess.DEVNULL))


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def table(res: Result, times: dict[str, list[float]], labels: dict[str, str], base: str) -> list[str]:
    """Throughput of each, and its ratio to ``base``'s (of medians)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    shown = labels[base].split(" (")[0]
    rows = [f"| Client | Runs (MB/s) | Median | Ratio to {shown} | CPU s, client | CPU s, registry |",
            "|---|---|---|---|---|---|"]
    for k, v in times.items():
        runs = ", ".join(f"{mbps(res.size, s):.0f}" for s in v)
        rows.append(f"| {labels[k]} | {runs} | {mbps(res.size, med[k]):.0f} MB/s | {med[base] / med[k]:.2f}x "
                    f"| {statistics.median(res.client_cpu[k]):.2f} | {statistics.median(res.server_cpu[k]):.2f} |")
    return rows


def report(res: Result, command: str, rounds: int) -> str:
    size, loads = res.size, res.loads
    lines = [
        BEGIN,
        f"Measured by `{command}` on {time.strftime('%Y-%m-%d')} on this machine: {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}, Python {platform.python_version()}; registry: {res.registry} "
        f"(filesystem storage in /tmp, plain HTTP, no auth) on 127.0.0.1; a {size / MIB:.0f} MiB GGUF; "
        f"medians of {rounds} rounds, runs alternating in an order that rotates every round; load "
        f"average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs during the runs. CPU seconds "
        "are medians per run: the client's processes (user + system), and the registry process's.",
        "",
        "Push (each run into an emptied registry storage):",
        "",
        *table(res, res.push, PUSH, "curl-push"),
        "",
        "Pull (each run into a fresh store or file; the registry's blob in the page cache):",
        "",
        *table(res, res.pull, PULL, "curl-null"),
        "",
    ]
    med = {k: statistics.median(v) for k, v in (*res.push.items(), *res.pull.items())}
    lines.append(
        f"Ratios of medians: `modelfs push` / curl push **{med['curl-push'] / med['push']:.2f}x**; "
        f"`modelfs pull` / `curl -o /dev/null` **{med['curl-null'] / med['pull']:.2f}x**, / `curl -o FILE` "
        f"**{med['curl-file'] / med['pull']:.2f}x**; `pull_source` / `curl -o /dev/null` "
        f"**{med['curl-null'] / med['pull_source']:.2f}x**, / `curl -o FILE` "
        f"**{med['curl-file'] / med['pull_source']:.2f}x**; the command's own cost (start-up, imports, catalog "
        f"open) {med['pull'] - med['pull_source']:.2f} s.")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_doc(block: str) -> None:
    """Replace the measured block of SECTION (adding the section, after the Downloads one
    or at the end, when it is missing); the reading around the block stays."""
    text = DOC.read_text()
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END) + 1
        text = text[:a] + block + text[b:]
    else:
        new = f"{SECTION}\n\n{block}\n"
        nxt = text.find("\n## ", text.find("## Downloads") + 1) if "## Downloads" in text else -1
        text = text.rstrip() + "\n\n" + new if nxt < 0 else text[:nxt + 1] + new + text[nxt + 1:]
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp"), help="where the work directory goes (default /tmp)")
    ap.add_argument("--write-doc", action="store_true", help="update the OCI section of docs/performance.md")
    args = ap.parse_args()
    if not os.path.exists(REGISTRY_BIN):
        raise SystemExit(f"{REGISTRY_BIN} is missing: apt-get install docker-registry")
    command = "python bench/oci.py " + " ".join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-oci-", dir=args.dir))
    try:
        res = bench(args, work)
    finally:
        remove_tree(work)
    block = report(res, command.strip(), args.rounds)
    print(block)
    if args.write_doc:
        write_doc(block)
        print(f"wrote the measured block of {SECTION!r} in {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
