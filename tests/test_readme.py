"""The README opens with the two set-up commands, and CI runs the second one verbatim."""

from __future__ import annotations

import re

from conftest import REPO


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (REPO / "README.md").read_text())


def test_readme_opens_with_demo_and_test_commands():
    cmds = readme_commands()
    assert cmds[0].endswith("python -m modelfs.demo")
    assert cmds[1].endswith("python -m pytest")
    for cmd in cmds[:2]:
        assert "apt-get install -y fuse3 libfuse3-dev pkg-config" in cmd
        # systemd: systemd-analyze, which verifies the units (a Debian 12 container image lacks it)
        packages = cmd.split("apt-get install -y ", 1)[1].split(" && ", 1)[0].split()
        assert "systemd" in packages
        assert "curl" in packages  # the control socket's tests
        # a real OCI registry and its htpasswd for the registry tests (issue 15)
        assert {"docker-registry", "apache2-utils"} <= set(packages)
        assert "xfsprogs" in packages  # an XFS on a loop device: `adopt` by reflink (tests/test_adopt.py)
        assert "pip install -e '.[test]'" in cmd


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
