"""Shared fixtures: a fresh store per test, and the CLI, run in this process unless a
test needs a real one.

``CLI.run`` calls :func:`modelfs.cli.main` in the test process (S3QL's tests call
``main([...])`` too): a process costs ~1 s of interpreter start-up and imports, and a
run of the suite made over 200 of them. A test asks for a real process with
``process=True`` (or ``popen``) where it needs one: a crash point (the process
SIGKILLs itself), a signal, a mount (its daemon), a reading of ``/proc/self/io``, root
acting on another user's store (it drops privileges and re-executes itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Set in a run's environment, this makes the process kill itself with SIGKILL.
CRASH_ENV = "MODELFS_CRASH_AT"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


class _Captured(io.TextIOWrapper):
    """A text stream like a pipe's ``sys.stdout``: not a terminal (so no progress bars),
    with the ``.buffer`` that binary output (``manifest sign``) writes to."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8", write_through=True)

    def text(self) -> str:
        raw = self.buffer.getvalue()  # type: ignore[attr-defined]
        # Decoded as ``subprocess.run(text=True)`` does: universal newlines.
        return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8").read()


@contextlib.contextmanager
def _environ(overrides: Mapping[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``overrides`` (None: unset) for the block, then exactly as
    before. A run that changed the environment itself is a bug in the CLI: it fails."""
    saved = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    expected = dict(os.environ)
    try:
        yield
        leaked = {k: os.environ.get(k) for k in set(expected) | set(os.environ)
                  if os.environ.get(k) != expected.get(k)}
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
    assert not leaked, f"the command changed os.environ: {leaked}"


@contextlib.contextmanager
def _logging_state() -> Iterator[None]:
    """The CLI's ``setup_logging`` replaces the root logger's handlers (pytest's caplog
    handlers among them) with one bound to the captured stderr, and sets levels: all
    of it is put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
              if isinstance(lg, logging.Logger)}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lg in logging.root.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                lg.setLevel(levels.get(name, logging.NOTSET))


def _refuse_a_privilege_drop(args: Sequence[str]) -> None:
    """Root running a command on another user's store drops to that user for good and
    re-executes itself (``modelfs_store.owner``): never in the test process."""
    from modelfs_store.errors import StoreError
    from modelfs_store.layout import default_root
    from modelfs_store.owner import foreign_owner

    root: str | Path = default_root()
    for i, arg in enumerate(args):
        if arg == "--store" and i + 1 < len(args):
            root = args[i + 1]
        elif arg.startswith("--store="):
            root = arg.split("=", 1)[1]
    try:
        uid = foreign_owner(Path(root))
    except StoreError:
        return  # refused before anything changes hands: the command reports it
    if uid is not None:
        raise AssertionError(f"{root} belongs to uid {uid}: root would become that user and exec itself; "
                             "use run(..., process=True)")


def run_cli(*args: str, env: Mapping[str, str | None] | None = None) -> Run:
    """``modelfs ARGS`` in this process, with ``env`` applied to ``os.environ`` (None
    unsets a variable) for the duration of the call; stdin is empty, stdout and stderr
    are captured as text."""
    overrides = dict(env or {})
    if overrides.get(CRASH_ENV, os.environ.get(CRASH_ENV)):
        raise AssertionError(f"{CRASH_ENV} kills the process it is set in: use run(..., process=True)")
    from modelfs.cli import main

    out, err = _Captured(), _Captured()
    stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8")
    try:
        with _environ(overrides), _logging_state(), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            _refuse_a_privilege_drop(args)
            code = main(list(args))
    finally:
        sys.stdin = stdin
    return Run(code, out.text(), err.text())


class CLI:
    """Runs ``modelfs`` against one store directory: in this process by default, as
    ``python -m modelfs`` with ``process=True`` or :meth:`popen`."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)  # a named store must exist: an empty directory becomes one
        self.overrides: dict[str, str] = {"MODELFS_STORE": str(root), "PYTHONPATH": str(REPO), **(env or {})}

    @property
    def env(self) -> Mapping[str, str]:
        """The environment of a process started for this store (read-only: an
        in-process run applies ``overrides``, so give variables to the constructor)."""
        return MappingProxyType({**os.environ, **self.overrides})

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "modelfs", *args]

    def run(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 300, process: bool = False) -> Run:
        """``timeout`` bounds a process only; an in-process run has no way to be stopped."""
        if process:
            p = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                               env={**self.env, **(env or {})})
            r = Run(p.returncode, p.stdout, p.stderr)
        else:
            r = run_cli(*args, env={**self.overrides, **(env or {})})
        if check and r.returncode != 0:
            raise AssertionError(f"modelfs {' '.join(args)} exited {r.returncode}\n{r.stderr}\n{r.stdout}")
        return r

    def popen(self, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), env={**self.env, **(env or {})}, **kw)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def cli(store_dir: Path) -> CLI:
    return CLI(store_dir)


def wait_for(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll ``cond`` until it returns something truthy; tests never sleep blindly."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path: Path | str) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def blob_data(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic, incompressible bytes."""
    return hashlib.shake_256(seed.to_bytes(8, "little")).digest(n)


def du_bytes(path: Path) -> int:
    """Bytes actually allocated on disk below ``path`` (what the store costs)."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_blocks * 512
    return total


def thaw_tree(top: Path) -> None:
    """Clear the immutable flag that commits give blobs where the kernel allows it
    (a store owned by root: this suite's own), so a test's directory can be removed."""
    from modelfs_store.seal import thaw

    for dirpath, _dirs, files in os.walk(top):
        if "blobs" in Path(dirpath).parts or "quarantine" in Path(dirpath).parts:
            for name in files:
                if not os.path.islink(os.path.join(dirpath, name)):
                    with contextlib.suppress(OSError):
                        thaw(Path(dirpath) / name)


def remove_tree(top: Path | str) -> None:
    """Remove a test's own directory (made with mkdtemp), immutable blobs and all."""
    import shutil

    thaw_tree(Path(top))
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(autouse=True)
def _removable_tmp_path(request: pytest.FixtureRequest) -> Iterator[None]:
    top = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if top is not None:
        thaw_tree(top)
