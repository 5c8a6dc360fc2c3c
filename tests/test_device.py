"""A pack's min_device as an object: parsed strictly, evaluated on this machine as a soft
gate (a foreground pull warns and installs, a channel update skips), and platforms
android and ios verify while this machine installs its own artifacts only."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import CLI
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from modelfs_store.device import Machine, shortfalls
from modelfs_store.errors import ManifestError
from modelfs_store.keys import TrustedKey
from modelfs_store.manifest import MinDevice, load_manifest
from test_packs import Publisher

BIG = {"min_ram_bytes": 1 << 60, "min_free_disk_bytes": 1, "cpu_features": ["sse2", "no_such_flag"],
       "gpu": "any", "os_min": "99.0"}


def machine(tmp_path: Path) -> Machine:
    (tmp_path / "meminfo").write_text("MemTotal:       16384 kB\nMemFree: 1 kB\n")
    (tmp_path / "cpuinfo").write_text("processor : 0\nflags : fpu sse sse2 avx2\n")
    return Machine(meminfo=tmp_path / "meminfo", cpuinfo=tmp_path / "cpuinfo", disk=tmp_path, release="6.1.0-9-amd64")


def test_shortfalls(tmp_path: Path) -> None:
    m = machine(tmp_path)
    assert shortfalls("4 GB of RAM", m) == []  # free text is shown, never evaluated
    assert shortfalls(MinDevice(min_ram_bytes=16384 * 1024, cpu_features=("avx2",), os_min="6.1"), m) == []
    got = shortfalls(MinDevice(1 << 60, 1, ("sse2", "no_such_flag"), "any", "99.0"), m)
    assert got == [f"min_ram_bytes: needs {1 << 60}, this machine has {16384 * 1024}",
                   "cpu_features: this CPU lacks no_such_flag", "os_min: needs 99.0, this kernel is 6.1.0-9-amd64"]


def _pack(pub: Publisher, version: int, min_device: object) -> bytes:
    arts = [pub.artifact(f"demo-{p}.gguf", b"GGUF" + f"{p}{version}".encode() * 500, platform=p)
            for p in ("linux", "android", "ios")]
    arts.append(pub.artifact("readme.txt", b"all platforms", role="aux", platform="any"))
    return pub.envelope(pub.payload(version, arts, min_device=min_device))


def test_a_pack_for_android_ios_and_linux_with_a_min_device_object(cli: CLI, origin: FaultServer,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    pub = Publisher(origin)
    cli.run("keys", "add", "k1", pub.pub("k1"))
    r = cli.run("pull", pub.serve("v1.json", _pack(pub, 1, BIG)), "--json")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(f["filename"] for f in res["files"]) == ["demo-linux.gguf", "readme.txt"]
    assert any(line.startswith("min_ram_bytes") for line in res["below_min_device"])
    assert "this machine is below the pack's min_device: min_ram_bytes" in r.stderr
    card = cli.run("show", "demo", "--json").json()
    assert card["min_device"].startswith('{"cpu_features":["sse2","no_such_flag"]')
    # A channel update is background work: a version below min_device is skipped.
    cli.run("channels", "add", pub.serve("chan.json", _pack(pub, 2, BIG)), "--key", "k1")
    [u] = cli.run("update", "--json").json()
    assert u["outcome"] == "skipped" and "below its min_device" in u["message"]
    assert cli.run("show", "demo", "--json").json()["active_version"] == 1


@pytest.mark.parametrize("bad", [{"min_ram": 1}, {"min_ram_bytes": -1}, {"cpu_features": "avx2"},
                                 {"cpu_features": ["AVX 2"]}, {"gpu": 3}])
def test_a_min_device_object_is_parsed_strictly(origin: FaultServer, bad: dict) -> None:  # noqa: F811
    pub = Publisher(origin)
    env = pub.envelope(pub.payload(1, [pub.artifact("x.gguf", b"GGUF1")], min_device=bad))
    with pytest.raises(ManifestError, match="min_device"):
        load_manifest(env, {"k1": TrustedKey("k1", pub.pub("k1"))}, now=datetime.now(UTC))
