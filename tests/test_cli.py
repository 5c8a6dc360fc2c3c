"""The ``modelfs`` command as a program: in-process ``main(argv)``, exit codes, and
verbs that load only what they need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from modelfs.cli import EX_SOFTWARE, VERBS, main
from modelfs_store.core import Store
from modelfs_store.errors import InternalError


def test_main_returns_the_exit_code_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "s").mkdir()
    assert main(["--store", str(tmp_path / "s"), "list"]) == 0
    assert capsys.readouterr().out == "no models\n"
    assert main(["--store", str(tmp_path / "s"), "show", "nope"]) == 3  # NotFound
    assert "modelfs: error: no model named 'nope'" in capsys.readouterr().err
    assert main(["--store", str(tmp_path / "s"), "no-such-verb"]) == 2  # click usage error
    assert main(["--help"]) == 0
    assert "Commands:" in capsys.readouterr().out


@pytest.mark.parametrize("bug", [InternalError("hashed 5 bytes but wrote 6"), KeyError("oops")])
def test_a_bug_exits_70_with_its_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, bug: Exception) -> None:
    def broken(self: Store) -> None:
        raise bug

    monkeypatch.setattr(Store, "list_models", broken)
    (tmp_path / "s").mkdir()
    assert main(["--store", str(tmp_path / "s"), "list"]) == EX_SOFTWARE == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert "modelfs: internal error:" in err


def test_every_verb_resolves_to_a_command() -> None:
    from modelfs.cli import cli
    ctx = cli.make_context("modelfs", ["list"], resilient_parsing=True)
    for verb in VERBS:
        command = cli.get_command(ctx, verb)
        assert command is not None and command.name in (verb, f"{verb}_cmd", verb.replace("-", "_")), verb


#: What a listing, a status or the help must not load: the daemon's and the downloader's
#: libraries and the mount's tree, the progress bar, sqlite-utils (and numpy behind it), the
#: gguf package (numpy again; the store's own header parser is stdlib only and cheap).
HEAVY = ("trio", "httpx", "httpcore", "pyfuse3", "cryptography", "rich", "sqlite_utils", "numpy", "gguf",
         "modelfs.mount.openfiles", "modelfs.mount.tree")


def _imported_by(argv: list[str], store: Path) -> set[str]:
    """The modules ``modelfs ARGV`` imports, in a fresh interpreter."""
    code = ("import sys\nfrom modelfs.cli import main\n"
            f"assert main({['--store', str(store), *argv]!r}) == 0\n"
            "print(' '.join(sorted(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(r.stdout.strip().splitlines()[-1].split())


@pytest.mark.parametrize("argv", [["list"], ["status"], ["--help"], ["list", "--json"], ["status", "--json"]])
def test_list_status_and_help_load_nothing_heavy(tmp_path: Path, argv: list[str]) -> None:
    """Not a timing (docs/performance.md has those, from bench/cli_start.py): what makes one."""
    (tmp_path / "s").mkdir()
    modules = _imported_by(argv, tmp_path / "s")
    assert sorted(m for m in modules if m in HEAVY or m.split(".")[0] in HEAVY) == []
    if argv == ["--help"]:  # the verbs' summaries come from VERBS: no verb, and no store, is loaded
        assert sorted(m for m in modules if m.startswith("modelfs.cli.") and m.count(".") == 2
                      and not m.startswith("modelfs.cli._")) == []
        assert "modelfs_store.core" not in modules


def test_the_help_lists_every_verb_with_its_own_summary() -> None:
    """``modelfs --help`` shows VERBS' summaries; they must be what click would show from
    each verb's own help, at any width."""
    from modelfs.cli import cli

    ctx = cli.make_context("modelfs", ["list"], resilient_parsing=True)
    for width in (60, 80, 200):
        ours, theirs = click.HelpFormatter(width=width), click.HelpFormatter(width=width)
        cli.format_commands(ctx, ours)
        click.Group.format_commands(cli, ctx, theirs)  # click's own: imports every verb
        assert ours.getvalue() == theirs.getvalue()


def test_a_named_store_must_exist_and_init_makes_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    typo = tmp_path / "modles"
    for argv in (["--store", str(typo), "list"], ["list"]):
        monkeypatch.setenv("MODELFS_STORE", str(typo))
        assert main(argv) == 3
        assert f"{typo} does not exist; create a store there with `modelfs init {typo}`" in capsys.readouterr().err
        assert not typo.exists()  # nothing was created
    mnt = tmp_path / "mnt"
    assert main(["--store", str(typo), "mount", str(mnt)]) == 3  # refused before a daemon starts
    assert not typo.exists() and not mnt.exists()
    assert main(["init", str(typo), "--json"]) == 0
    assert '"created": true' in capsys.readouterr().out
    assert main(["--store", str(typo), "list"]) == 0
    assert main(["init", str(typo)]) == 0
    assert capsys.readouterr().out.endswith("is already a store\n")


def test_an_empty_directory_becomes_a_store_but_a_full_one_does_not(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    empty, full = tmp_path / "empty", tmp_path / "Downloads"
    empty.mkdir()
    full.mkdir()
    (full / "holiday.jpg").write_bytes(b"x")
    assert main(["--store", str(empty), "list"]) == 0
    assert (empty / "catalog.db").exists()
    assert main(["--store", str(full), "list"]) == 3
    assert "is not a modelfs store (no catalog.db) and is not empty" in capsys.readouterr().err
    assert main(["init", str(full)]) == 4
    assert sorted(p.name for p in full.iterdir()) == ["holiday.jpg"]


def test_the_progress_bar_speaks_binary_units_like_list(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from modelfs.cli import _output

    out = io.StringIO()
    monkeypatch.setattr(_output, "_console", lambda: Console(file=out, force_terminal=True, width=120))
    with _output.progress_bar(3 << 20, "pulling", enabled=True) as advance:
        for _ in range(3):
            advance(1 << 20)
    text = out.getvalue()
    assert "3.0/3.0 MiB" in text and " MB" not in text and "MB/s" not in text
