"""Every example of ``docs/api.md`` runs against a real daemon and answers what the
document shows: the status in its "Answer" line, and the keys of its JSON at every
level (values are examples; ``null`` on either side matches anything), as
``tests/test_json.py`` holds ``docs/json.md`` to the CLI.

Each section is ``## `METHOD PATH` ``, a ``sh`` block (a curl command line, run with
``$SOCK``, ``$PACK``, ``$ID`` and ``$NAME`` set) and an answer. A section whose
title says "as another user" runs as nobody. The events example is one JSON object
per line: every event the daemon sends must be of a kind the example shows, with its
keys.
"""
# ruff: noqa: F811 - the fault server's fixtures are imported by name

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, wait_for
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from test_control import SETPRIV, Daemon, daemon  # noqa: F401 - fixture
from test_json import mismatches, shape
from test_packs import Publisher, release

DOC = REPO / "docs" / "api.md"
SECTION = re.compile(r"^## `(GET|POST|DELETE) ([^`]+)`([^\n]*)\n(.*?)```sh\n(.*?)\n```\n+Answer `(\d{3})[^`]*`:\n+"
                     r"```json\n(.*?)\n```", re.S | re.M)

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: docs/api.md CANNOT be "
                       "checked on this machine !!!"),
]


def sections() -> list[tuple[str, str, str, str, int, str]]:
    return [(m, p, title, cmd, int(status), example)
            for m, p, title, _, cmd, status, example in SECTION.findall(DOC.read_text())]


def test_every_route_has_an_example() -> None:
    from modelfs.mount.api import ROUTES
    documented = {(m, p.split("?")[0]) for m, p, *_ in sections()}
    routes = {(m, re.sub(r"\(\?P<name>[^)]*\)", "NAME", re.sub(r"\(\?P<job>[^)]*\)", "ID", p.pattern)))
              for m, p, _ in ROUTES}
    routes = {(m, p.replace("(?P<action>cancel|pause|resume)", a)) for m, p in routes
              for a in (("cancel", "pause", "resume") if "action" in p else ("",))}
    assert routes == documented


def run(cmd: str, env: dict[str, str], *, as_nobody: bool) -> tuple[int, str]:
    cmd = cmd.replace("curl ", "curl -w '\\n%{http_code}' ", 1)
    argv = ["sh", "-c", cmd]
    r = subprocess.run([*SETPRIV, *argv] if as_nobody else argv, capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ["PATH"], **env}, cwd="/")
    body, _, code = r.stdout.rpartition("\n")
    assert code.isdigit(), (cmd, r.stdout, r.stderr)
    return int(code), body


def check_events(example: str, body: str) -> list[str]:
    documented = {e["event"]: e for e in map(json.loads, example.splitlines())}
    problems = []
    kinds = []
    for line in body.splitlines():
        event = json.loads(line)
        kinds.append(event["event"])
        if event["event"] not in documented:
            problems.append(f"event {event['event']!r} is not documented")
        else:
            problems += mismatches(shape(documented[event["event"]]), shape(event), f"[{event['event']}]")
    assert {"job", "result"} <= set(kinds), kinds
    return problems


def test_every_example_answers_as_documented(daemon: Daemon, origin: FaultServer,  # noqa: F811
                                             tmp_path: Path) -> None:
    pub = Publisher(origin)
    daemon.cli.run("keys", "add", "k1", pub.pub("k1"))
    daemon.cli.run("import", "m", str(write_model(tmp_path / "w.gguf", tensor_bytes=4096, seed=1)))
    daemon.cli.run("apps", "add", "org.example.Chat")
    big = write_model(tmp_path / "big.gguf", tensor_bytes=64 << 20, seed=2)
    origin.add("/big.gguf", big, rate=1 << 20)
    daemon.start()
    env = {"SOCK": str(daemon.sock), "PACK": pub.serve("demo.json", release(pub, 1)), "NAME": "m", "ID": "0"}
    slow: dict[str, Any] = {}
    problems: dict[str, list[str]] = {}
    for method, path, title, cmd, status, example in sections():
        if path.endswith(("/pause", "/resume", "/cancel")):
            if not slow:
                from hashlib import sha256
                slow.update(daemon.call("POST", "/v1/pulls", {"source": origin.url("/big.gguf"),
                                                              "sha256": sha256(big.read_bytes()).hexdigest()}))
            env["ID"] = str(slow["id"])
        code, body = run(cmd, env, as_nobody="as another user" in title)
        where = f"{method} {path}{title}"
        assert code == status, (where, body)
        if path.startswith("/v1/events"):
            problems[where] = check_events(example, body)
            continue
        got = json.loads(body)
        problems[where] = mismatches(shape(json.loads(example)), shape(got))
        if (method, path, code) == ("POST", "/v1/pulls", 201):
            env["ID"] = str(got["id"])
            wait_for(lambda job=got["id"]: daemon.job(job)["state"] == "done", 60, "the example's pull")
    assert {k: v for k, v in problems.items() if v} == {}
