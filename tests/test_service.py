"""``modelfs service install|uninstall`` and the units it writes; the daemon's sd_notify.

- install writes the user unit (or the system unit with its sysusers.d and tmpfiles.d
  snippets), ``--dry-run`` writes nothing, uninstall removes exactly those files;
- ``ExecStart`` is the absolute path of the installed ``modelfs`` command, with ``/`` as
  the working directory; the checked-in copies under ``packaging/`` are what install
  writes for ``/usr/bin/modelfs``;
- ``systemd-analyze verify`` accepts both units (with no warning about them);
- under the unit's own command lines, the daemon says READY=1 only once its mount
  answers, recovers the stale mount a ``kill -9`` left, and ExecStop unmounts it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import CLI, REPO, run_cli
from ggufgen import write_model
from modelfs.cli.service import installed_command
from modelfs.mount import units
from test_notify import abstract_address, needs_fuse, notify_socket, receive_from

CHECKED_IN = {"systemd/modelfs.service": 0, "systemd/modelfs-system.service": 1, "sysusers.d/modelfs.conf": 2,
              "tmpfiles.d/modelfs.conf": 3}


def _setting(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def _exec_argv(text: str, key: str) -> list[str]:
    """A unit's ``ExecStart=``/``ExecStop=`` as argv, for paths without ``%`` or ``$``."""
    [line] = _setting(text, key)
    assert "%" not in line and "$" not in line, line
    return shlex.split(line)


# -- install and uninstall ------------------------------------------------------------------
def test_install_writes_the_user_unit_and_uninstall_removes_it(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "MODELFS_STORE": None, "XDG_DATA_HOME": None}
    unit = tmp_path / "cfg" / "systemd" / "user" / "modelfs.service"
    dry = run_cli("service", "install", "--user", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert not unit.exists() and "[Service]" in dry.stdout
    r = run_cli("service", "install", "--user", env=env)
    assert r.returncode == 0 and f"wrote {unit}" in r.stdout, r.stderr
    text = unit.read_text()
    assert dry.stdout.split("\n", 1)[1].startswith(text)  # --dry-run showed what install wrote
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    exe = installed_command()
    assert exe.is_absolute() and os.access(exe, os.X_OK) and exe.name == "modelfs"
    assert _setting(text, "ExecStart") == [f"{exe} mount %h/Models --foreground"]  # no --store: the default
    assert _setting(text, "ExecStop") == [f"{exe} unmount %h/Models"]
    assert _setting(text, "Type") == ["notify"] and _setting(text, "WorkingDirectory") == ["/"]
    assert _setting(text, "Restart") == ["on-failure"] and "python" not in text.split("[Unit]")[1]
    # Again: its own file is replaced. Enabled: uninstall refuses, and leaves the unit.
    assert run_cli("service", "install", "--user", env=env).returncode == 0
    wants = unit.parent / "default.target.wants" / unit.name
    wants.parent.mkdir()
    wants.symlink_to(unit)
    r = run_cli("service", "uninstall", "--user", env=env)
    assert r.returncode == 4 and "systemctl --user disable --now modelfs" in r.stderr
    wants.unlink()
    r = run_cli("service", "uninstall", "--user", "--json", env=env)
    assert r.returncode == 0 and r.json() == {"scope": "user", "dry_run": False, "removed": [str(unit)]}
    assert not unit.exists() and wants.parent.is_dir()  # only what install wrote is gone
    assert "nothing to remove" in run_cli("service", "uninstall", "--user", env=env).stdout


def test_the_user_unit_names_the_store_and_mountpoint_it_was_given(tmp_path: Path) -> None:
    store, mnt = tmp_path / "my store", tmp_path / "100% models"
    r = run_cli("--store", str(store), "service", "install", "--user", "--mountpoint", str(mnt), "--json",
                env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert r.returncode == 0, r.stderr
    [f] = r.json()["files"]
    [start] = _setting(f["content"], "ExecStart")
    assert start == f'{installed_command()} --store "{store}" mount "{str(mnt).replace("%", "%%")}" --foreground'


def test_a_file_install_did_not_write_is_neither_replaced_nor_removed(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    unit = tmp_path / "cfg" / "systemd" / "user" / "modelfs.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/opt/mine\n")
    for verb in ("install", "uninstall"):
        r = run_cli("service", verb, "--user", env=env)
        assert r.returncode == 4 and "was not written by `modelfs service install`" in r.stderr
    assert unit.read_text() == "[Service]\nExecStart=/opt/mine\n"
    assert run_cli("service", "install", env=env).returncode == 2  # --user or --system, said in one line


def test_system_install_writes_the_unit_and_snippets_and_uninstall_only_those(tmp_path: Path) -> None:
    root = tmp_path / "image"
    neighbour = root / "etc" / "sysusers.d" / "other.conf"
    neighbour.parent.mkdir(parents=True)
    neighbour.write_text("u other - - /\n")
    r = run_cli("service", "install", "--system", "--root", str(root), "--mountpoint", "/srv/llm", "--json",
                env={"MODELFS_STORE": None})
    assert r.returncode == 0, r.stderr
    written = [Path(f["path"]) for f in r.json()["files"]]
    assert written == [root / "etc/systemd/system/modelfs-system.service", root / "etc/sysusers.d/modelfs.conf",
                       root / "etc/tmpfiles.d/modelfs.conf"]
    unit = written[0].read_text()
    assert _setting(unit, "ExecStart") == [
        f"{installed_command()} --store /var/lib/modelfs mount /srv/llm --foreground --allow-other"]
    assert "d /srv/llm 0755 modelfs modelfs -" in written[2].read_text()
    r = run_cli("service", "install", "--system", "--root", str(root), "--mountpoint", "/srv/my models")
    assert r.returncode == 2 and "absolute path of letters" in r.stderr
    r = run_cli("--store", str(tmp_path / "s"), "service", "install", "--system", "--root", str(root))
    assert r.returncode == 2 and "the system store is /var/lib/modelfs" in r.stderr
    r = run_cli("service", "uninstall", "--system", "--root", str(root), env={"MODELFS_STORE": None})
    assert r.returncode == 0 and r.stdout.splitlines() == [f"removed {p}" for p in written]
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) == [Path("etc/sysusers.d/other.conf")]


def test_the_checked_in_packaging_is_what_install_writes() -> None:
    """packaging/ holds the files for /usr/bin/modelfs (the Debian package's); after a
    change to modelfs/mount/units.py, write them again with::

        python -c "from pathlib import Path; from modelfs.mount import units; \\
        [Path('packaging', p).write_text(f.content) for p, f in zip(['systemd/modelfs.service', \\
        'systemd/modelfs-system.service', 'sysusers.d/modelfs.conf', 'tmpfiles.d/modelfs.conf'], \\
        units.user_files(Path('/'), Path('/usr/bin/modelfs')) + units.system_files(Path('/'), \\
        Path('/usr/bin/modelfs')))]"
    """
    exe = Path("/usr/bin/modelfs")
    generated = units.user_files(Path("/home/u/.config"), exe) + units.system_files(Path("/"), exe)
    assert generated[0].path == Path("/home/u/.config/systemd/user/modelfs.service")
    assert [f.path for f in generated[1:]] == [Path("/etc/systemd/system/modelfs-system.service"),
                                               Path("/etc/sysusers.d/modelfs.conf"),
                                               Path("/etc/tmpfiles.d/modelfs.conf")]
    for rel, i in CHECKED_IN.items():
        assert (REPO / "packaging" / rel).read_text() == generated[i].content, rel


@pytest.mark.parametrize(("word", "written"), [
    ("/usr/bin/modelfs", "/usr/bin/modelfs"),
    ("/home/a b/Models", '"/home/a b/Models"'),
    ("/m/100%", "/m/100%%"),
    ("/m/$HOME", "/m/$$HOME"),
    ('/m/say "hi"\\', '"/m/say \\"hi\\"\\\\"'),
])
def test_exec_words_are_escaped_for_systemd(word: str, written: str) -> None:
    assert units.exec_word(word) == written


def test_a_newline_cannot_reach_a_unit() -> None:
    with pytest.raises(units.UsageError):
        units.exec_word("/m\nExecStartPre=/bin/evil")


# -- systemd-analyze verify --------------------------------------------------------------------
def _verify(unit: Path, *, user: bool, runtime: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("!!! systemd-analyze is missing (Debian: apt-get install systemd): "
                    "the units CANNOT be verified !!!")
    argv = [analyze, *(["--user"] if user else []), "verify", str(unit)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    # verify exits 0 after warnings such as an unknown key: any line about our unit fails.
    about_it = [line for line in r.stderr.splitlines() if unit.name in line or str(unit) in line]
    assert r.returncode == 0 and not about_it, r.stderr


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    # An ExecStart whose path needs quoting: verify fails if the quoting splits it.
    spaced = tmp_path / "with space" / "modelfs"
    spaced.parent.mkdir()
    spaced.symlink_to(installed_command())
    for exe in (installed_command(), spaced):
        [user] = units.user_files(tmp_path / f"cfg-{exe == spaced}", exe, tmp_path / "a b" / "Models")
        user.path.parent.mkdir(parents=True)
        user.path.write_text(user.content)
        _verify(user.path, user=True, runtime=runtime)
    [default_user] = units.user_files(tmp_path / "cfg-default", installed_command())
    default_user.path.parent.mkdir(parents=True)
    default_user.path.write_text(default_user.content)
    _verify(default_user.path, user=True, runtime=runtime)
    system = units.system_files(tmp_path / "root", installed_command())[0]
    system.path.parent.mkdir(parents=True)
    system.path.write_text(system.content)
    _verify(system.path, user=False, runtime=runtime)


def test_the_verification_catches_a_bad_unit(tmp_path: Path) -> None:
    [user] = units.user_files(tmp_path, installed_command())
    user.path.parent.mkdir(parents=True)
    user.path.write_text(user.content.replace("Type=notify", "Type=notify\nNotAKey=1"))
    with pytest.raises(AssertionError, match="NotAKey"):
        _verify(user.path, user=True, runtime=tmp_path)


@pytest.mark.fuse
@needs_fuse
def test_under_the_units_command_lines_ready_means_mounted_and_a_crash_is_recovered(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "Models"
    cli = CLI(store)
    write_model(tmp_path / "w.gguf", name="tiny", tensor_bytes=4096)
    cli.run("import", "tiny", str(tmp_path / "w.gguf"))
    [unit] = units.user_files(tmp_path / "cfg", installed_command(), mnt, store)
    start, stop = _exec_argv(unit.content, "ExecStart"), _exec_argv(unit.content, "ExecStop")
    # The unit's environment: WorkingDirectory=/, nothing of this test's Python path.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELFS_", "NOTIFY_")) and k != "PYTHONPATH"}
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "daemon.log"

    def start_daemon() -> dict[str, str]:
        address = abstract_address()
        with notify_socket(address) as sock, log.open("ab") as out:
            procs.append(subprocess.Popen(start, cwd="/", env={**env, "NOTIFY_SOCKET": address},
                                          stdout=out, stderr=out))
            ready, pid, _uid = receive_from(sock, "READY")
            live = os.path.ismount(mnt) and os.listdir(mnt) == ["tiny"]  # at once: READY means the mount answers
        assert live, log.read_text()
        assert pid == procs[-1].pid  # from ExecStart's own process: NotifyAccess=main
        return ready

    try:
        assert start_daemon() == {"READY": "1", "STATUS": f"serving 1 model at {mnt}"}
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(timeout=30)
        with pytest.raises(OSError, match="not connected"):
            os.listdir(mnt)  # what a crash leaves: a disconnected mount, never an empty directory
        start_daemon()  # Restart=on-failure runs the same command line: it recovers the mountpoint
        r = subprocess.run(stop, cwd="/", env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert procs[-1].wait(timeout=30) == 0 and not os.path.ismount(mnt)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
