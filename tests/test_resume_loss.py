"""Whatever the moment of a ``kill -9``, a resumed pull fetches at most
64 MiB more than what was missing, socket buffers included.

Each case starts ``modelfs pull`` of a 512 MiB GGUF in a child process, kills it (a crash
point in the writer thread, or SIGKILL from here once the server has sent a share of
the file), then pulls again. What was lost is measured on the server's side, so bytes
that were in socket buffers or in the writer's queue at the kill count too::

    lost = (bytes the server sent to both pulls) - (size of the file)

``python -m pytest -s tests/test_resume_loss.py`` prints one line per kill point; the
figures in docs/performance.md come from that command.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from conftest import CLI, sha_file, wait_for
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model

MB = 1 << 20
SIZE = 512 * MB
BOUND = 64 * MB



@pytest.fixture(scope="module")
def half_gib(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("resume")
    w = write_model(d / "resume-Q4_K_M.gguf", tensor_bytes=SIZE, seed=77)
    return w, sha_file(w)


# (id, MODELFS_CRASH_AT, or the share of the file the server has sent when SIGKILL comes)
KILL_POINTS: list[tuple[str, str | None, float | None]] = [
    ("before-first-checkpoint", "download-before-checkpoint", None),
    ("after-first-checkpoint", "download-after-checkpoint", None),
    ("before-fourth-checkpoint", "download-before-checkpoint@4", None),
    ("sigkill-at-10%", None, 0.10),
    ("sigkill-at-50%", None, 0.50),
    ("sigkill-at-90%", None, 0.90),
    ("before-commit", "download-before-commit", None),
]


def _pull_and_kill(cli: CLI, server: FaultServer, url: str, digest: str, crash: str | None,
                   share: float | None) -> None:
    env = {"MODELFS_CRASH_AT": crash} if crash else None
    p = cli.popen("pull", url, "--sha256", digest, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if share is not None:
            wait_for(lambda: p.poll() is not None or server.bytes_sent("/r.gguf") >= share * SIZE,
                     timeout=120, what=f"{share:.0%} of the file sent")
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        assert p.stderr is not None
        err = p.stderr.read().decode()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL, err


@pytest.mark.parametrize(("crash", "share"), [k[1:] for k in KILL_POINTS], ids=[k[0] for k in KILL_POINTS])
def test_a_resumed_pull_loses_at_most_64_mib(cli: CLI, store_dir: Path, origin: FaultServer,  # noqa: F811
                                             half_gib: tuple[Path, str], crash: str | None,
                                             share: float | None) -> None:
    w, digest = half_gib
    size = w.stat().st_size
    origin.add("/r.gguf", w)
    url = origin.url("/r.gguf")
    _pull_and_kill(cli, origin, url, digest, crash, share)
    blob = store_dir / "blobs" / "sha256" / digest[:2] / digest
    assert not blob.exists()
    first = origin.bytes_sent("/r.gguf")
    cli.run("pull", url, "--sha256", digest)
    assert sha_file(blob) == digest
    reqs = origin.requests("/r.gguf")
    resumed_at = int(reqs[-1].headers["range"][6:].rstrip("-")) if "range" in reqs[-1].headers else 0
    lost = origin.bytes_sent("/r.gguf") - size
    print(f"\nresume after kill {crash or f'SIGKILL at {share:.0%}'}: the server had sent "
          f"{first / MB:.1f} MiB, the resume started at {resumed_at / MB:.1f} MiB, lost {lost / MB:.1f} MiB")
    assert lost <= BOUND, (first, resumed_at, lost)
    if crash == "download-before-commit":
        assert lost == 0 and len(reqs) == 1  # every byte was in: nothing fetched again
