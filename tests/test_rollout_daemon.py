"""Rollout supervision through a real daemon (``modelfs mount`` in a subprocess) and its
control socket: an app's failed loads roll a channel update's candidate back on their
own, ``status`` tells; the daemon's periodic pass acts on a changed setting; a caller
that cannot see a model is refused its report (403, audited) exactly as for a model
that does not exist.
"""
# ruff: noqa: F811 - the fault server's fixtures are imported by name

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from conftest import wait_for
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from test_control import CLIENT, NOBODY, SETPRIV, Daemon, _audit, daemon  # noqa: F401 - fixture
from test_control import pytestmark as control_marks
from test_packs import Publisher, release

pytestmark = control_marks
A = "org.example.A"


def app_call(exe: Path, daemon: Daemon, method: str, route: str, body: dict[str, Any], *,
             as_nobody: bool = False) -> tuple[int, dict[str, Any]]:
    argv = [str(exe), "-c", CLIENT, str(daemon.sock), method, route, json.dumps(body)]
    r = subprocess.run([*SETPRIV, *argv] if as_nobody else argv, capture_output=True, text=True, timeout=60, cwd="/")
    code, answer = r.stdout.split("\n", 1)
    return int(code), json.loads(answer)


def test_an_apps_failed_loads_roll_a_channel_update_back(daemon: Daemon, origin: FaultServer,
                                                         tmp_path: Path) -> None:
    pub = Publisher(origin)
    cli = daemon.cli
    cli.run("keys", "add", "k1", pub.pub("k1"))
    url = pub.serve("chan.json", release(pub, 1))
    cli.run("pull", url)
    cli.run("channels", "add", url, "--key", "k1")
    pub.serve("chan.json", release(pub, 2))
    cli.run("update")
    exe = daemon.top / "appA" / "python3"
    exe.parent.mkdir()
    shutil.copy2("/usr/bin/python3", exe)
    cli.run("apps", "add", A, "--exe", str(exe))
    daemon.start()
    assert daemon.call("GET", "/v1/models/demo")["rollout"]["version"] == 2

    answers = [app_call(exe, daemon, "POST", "/v1/models/demo/loads", {"ok": ok}) for ok in (False, True, False)]
    assert [code for code, _ in answers] == [201, 201, 201]
    assert [a["verdict"]["verdict"] for _, a in answers] == ["wait", "wait", "rollback"]
    assert answers[-1][1]["active_version"] == 1 and answers[-1][1]["version"] == 2
    shown = daemon.call("GET", "/v1/models/demo")
    assert (shown["active_version"], shown["rollout"]) == (1, None)
    status = cli.run("status", "--json").json()["rollouts"]
    assert [(r["model"], r["from_version"], r["version"]) for r in status["rollbacks"]] == [("demo", 2, 1)]
    assert "rolled back: demo from version 2 to 1" in cli.run("status").stdout
    audit = _audit(daemon)
    loads = [r for r in audit if r["action"] == "load"]
    assert len(loads) == 3 and all(json.loads(r["detail"])["app"] == A for r in loads)
    assert [r["actor"] for r in audit if r["action"] == "rollback"] == ["supervisor"]
    # The mount shows the version gone back to.
    wait_for(lambda: (daemon.mount.path / "demo" / "demo-Q4_K_M.gguf").read_bytes().startswith(b"GGUFdemo-1"),
             30, "the mount to show version 1 again")


def test_the_daemon_acts_on_a_changed_setting_and_refuses_who_cannot_see(daemon: Daemon, origin: FaultServer,
                                                                        tmp_path: Path) -> None:
    pub = Publisher(origin)
    cli = daemon.cli
    cli.run("keys", "add", "k1", pub.pub("k1"))
    cli.run("apps", "add", A)
    cli.run("import", "secret", str(write_model(tmp_path / "s.gguf", tensor_bytes=4096, seed=3)), "--private",
            "--app", A)
    daemon.start()
    cli.run("pull", pub.serve("v1.json", release(pub, 1)))  # through the daemon: jobs keep --candidate
    cli.run("pull", pub.serve("v2.json", release(pub, 2)), "--candidate")
    assert [j["options"].get("candidate") for j in daemon.call("GET", "/v1/pulls")] == [None, True]
    assert daemon.call("GET", "/v1/models/demo")["rollout"]["last_good_version"] == 1
    py = Path("/usr/bin/python3")
    # Another user sees the shared model and may report on it; not the private one, nor one that is absent.
    code, ok = app_call(py, daemon, "POST", "/v1/models/demo/loads", {"ok": True}, as_nobody=True)
    assert code == 201 and ok["verdict"]["verdict"] == "wait"
    hidden = app_call(py, daemon, "POST", "/v1/models/secret/loads", {"ok": False}, as_nobody=True)
    absent = app_call(py, daemon, "POST", "/v1/models/nothing/loads", {"ok": False}, as_nobody=True)
    assert hidden[0] == absent[0] == 403 and hidden[1]["error"]["reason"] == absent[1]["error"]["reason"] == \
        "not-visible"
    denied = [r for r in _audit(daemon) if r["action"] == "deny"]
    assert [json.loads(r["detail"])["path"] for r in reversed(denied)] == ["/v1/models/secret/loads",
                                                                          "/v1/models/nothing/loads"]
    assert all(json.loads(r["detail"])["uid"] == NOBODY for r in denied)
    assert not [r for r in _audit(daemon) if r["action"] == "load" and r["model"] == "secret"]
    code, bad = app_call(py, daemon, "POST", "/v1/models/demo/loads", {"ok": "yes"})
    assert code == 400
    # One successful load was reported; with rollout.good_loads 1 the daemon's next pass marks it good.
    cli.run("config", "set", "rollout.good_loads", "1")
    wait_for(lambda: daemon.call("GET", "/v1/models/demo")["rollout"] is None, 60, "the supervisor's pass")
    (good,) = [r for r in _audit(daemon) if r["action"] == "good"]
    assert good["actor"] == "supervisor" and good["version"] == 2
