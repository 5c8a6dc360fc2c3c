"""Per-app visibility, enforced by a real mount.

A store owned by root (the test's uid), mounted with ``--allow-other``: a shared model
and a private model of app A. Processes of a second uid (``nobody``, through setpriv)
and of the owner present themselves as plain processes, as app A or B by a registered
executable (a copy of /usr/bin/python3), and as app A by a faked Flatpak identity (a
user namespace whose root holds a ``.flatpak-info``). What each sees is checked
through the mount, by lookup, listing and open; a hidden model's name never shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI, remove_tree, thaw_tree, wait_for
from ggufgen import write_model
from test_mount import Mount

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
A, B = "org.example.A", "org.example.B"
LIVE = 30.0  # a deadline, not the target: bench/visibility.py measures how soon a grant shows

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                       reason="!!! /dev/fuse is missing: the visibility tests CANNOT run on this machine !!!"),
    pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root to act as two users (setpriv) !!!"),
]

# What a reader reports: the listing, and for each model whether lookup and open work.
PROBE = """
import errno, json, os, sys
mnt = sys.argv[1]
out = {"list": sorted(os.listdir(mnt)), "open": {}}
for name in sys.argv[2:]:
    try:
        with open(os.path.join(mnt, name, "model.json"), "rb") as f:
            f.read(1)
        out["open"][name] = "ok"
    except OSError as exc:
        out["open"][name] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""


class World:
    def __init__(self, top: Path, cli: CLI, mount: Mount) -> None:
        self.top, self.cli, self.mount = top, cli, mount
        self.app_a, self.app_b = top / "appA" / "python3", top / "appB" / "python3"

    @property
    def mnt(self) -> str:
        return str(self.mount.path)

    def see(self, *, as_nobody: bool, exe: str | Path = "/usr/bin/python3") -> dict:
        argv = [str(exe), "-c", PROBE, self.mnt, "open", "secret"]
        r = subprocess.run([*SETPRIV, *argv] if as_nobody else argv, capture_output=True, text=True, timeout=60,
                           cwd="/")
        assert r.returncode == 0, r.stderr
        assert as_nobody is False or "secret" not in r.stderr
        return json.loads(r.stdout)

    def see_as_flatpak(self) -> dict:
        """A process of nobody in a user namespace whose root holds a .flatpak-info of app A."""
        root = self.top / "fakeroot"
        script = (f"mount --bind /usr {root}/usr && mount --bind {self.mnt} {root}/mnt && "
                  f"exec chroot {root} /usr/bin/python3 -c '{PROBE}' /mnt open secret")
        r = subprocess.run([*SETPRIV, "unshare", "-U", "-r", "-m", "sh", "-c", script], capture_output=True,
                           text=True, timeout=60, cwd="/")
        if r.returncode != 0 and "unshare" in r.stderr:
            pytest.skip(f"!!! no unprivileged user namespaces here ({r.stderr.strip()}): the faked-Flatpak part "
                        "CANNOT run !!!")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def _fake_flatpak_root(root: Path, app: str) -> None:
    for d in ("usr", "mnt"):
        (root / d).mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        (root / link).symlink_to(f"usr/{link}")
    (root / ".flatpak-info").write_text(f"[Application]\nname={app}\nruntime=runtime/org.example.Platform\n")


@pytest.fixture
def world() -> Iterator[World]:
    top = Path(tempfile.mkdtemp(prefix="modelfs-vis-", dir="/tmp"))
    top.chmod(0o755)
    store = top / "store"
    store.mkdir()
    cli = CLI(store)
    for name, seed, extra in (("open", 1, []), ("secret", 2, ["--app", A, "--private"])):
        w = top / f"{name}.gguf"
        write_model(w, name=name, tensor_bytes=4096, seed=seed)
        cli.run("import", name, str(w), *extra)
    for app, exe in ((A, top / "appA" / "python3"), (B, top / "appB" / "python3")):
        exe.parent.mkdir()
        shutil.copy2("/usr/bin/python3", exe)
        cli.run("apps", "add", app, "--exe", str(exe))
    _fake_flatpak_root(top / "fakeroot", A)
    for p in [top, *top.rglob("*")]:
        if not p.is_symlink() and not p.is_relative_to(store):
            p.chmod(p.stat().st_mode | 0o555 if p.is_dir() else p.stat().st_mode | 0o444)
    mount = Mount(cli, top / "mnt", "--allow-other")
    try:
        yield World(top, cli, mount)
    finally:
        mount.stop()
        thaw_tree(top)
        remove_tree(top)


SHARED_ONLY = {"list": ["open"], "open": {"open": "ok", "secret": "ENOENT"}}
BOTH = {"list": ["open", "secret"], "open": {"open": "ok", "secret": "ok"}}


def test_another_uid_sees_a_private_model_only_when_its_app_is_granted_for_that_uid(world: World) -> None:
    # Presenting app A's identity (registered executable) does not make nobody app A's owner.
    assert world.see(as_nobody=True) == SHARED_ONLY
    assert world.see(as_nobody=True, exe=world.app_a) == SHARED_ONLY
    assert world.see_as_flatpak() == SHARED_ONLY

    world.cli.run("grant", A, "secret", "--uid", str(NOBODY))
    wait_for(lambda: world.see(as_nobody=True, exe=world.app_a) == BOTH, LIVE, "the grant to show in the mount")
    # Acceptance 4: right after app A looked it up, a plain process of that uid gets ENOENT.
    assert world.see(as_nobody=True) == SHARED_ONLY
    assert world.see_as_flatpak() == BOTH  # the same app and uid, by another rule
    assert world.see(as_nobody=True, exe=world.app_b) == SHARED_ONLY

    world.cli.run("revoke", A, "secret", "--uid", str(NOBODY))
    wait_for(lambda: world.see(as_nobody=True, exe=world.app_a) == SHARED_ONLY, LIVE, "the revoke to show")


def test_the_owners_apps_see_what_they_may(world: World) -> None:
    assert world.see(as_nobody=False) == BOTH                     # the owner at a shell
    assert world.see(as_nobody=False, exe=world.app_a) == BOTH    # the owning app
    assert world.see(as_nobody=False, exe=world.app_b) == SHARED_ONLY
    world.cli.run("grant", B, "secret")
    wait_for(lambda: world.see(as_nobody=False, exe=world.app_b) == BOTH, LIVE, "the grant to B")
    world.cli.run("visibility", "secret", "shared")
    wait_for(lambda: world.see(as_nobody=True) == BOTH, LIVE, "the model to become shared")


def test_whoami_names_the_rule(world: World) -> None:
    sleeper = subprocess.Popen([str(world.app_a), "-c", "import time; time.sleep(30)"])
    try:
        me = world.cli.run("whoami", "--pid", str(sleeper.pid), "--json").json()
        assert (me["app"], me["rule"], me["uid"], me["sure"]) == (A, "exe", 0, True)
        assert me["sees"] == ["open", "secret"] and me["hidden"] == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    out = world.cli.run("whoami", "--pid", "1").stdout
    assert out.startswith("pid 1: root (uid 0), no app id")
