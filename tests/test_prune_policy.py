"""Prune by policy: least recently used first, by age and by size, never a pinned model,
never a file a reader holds open, never an active or last-good version unless asked.
The plan is checked exactly, then the result."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import CLI, wait_for
from ggufgen import write_model
from modelfs_store.catalog import Catalog
from test_mount import Mount

DAY = 86400.0
MiB = 1 << 20

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                       reason="!!! /dev/fuse is missing: the prune-policy test (an open reader) CANNOT run !!!"),
]


def size_of(cli: CLI, name: str, version: int | None = None) -> int:
    d = cli.run("show", name, "--json").json()
    v = next(v for v in d["versions"] if v["version"] == (version or d["active_version"]))
    return int(v["size"])


def test_prune_by_age_and_size_least_recently_used_first(cli: CLI, tmp_path: Path) -> None:
    def model(name: str, mib: int, seed: int) -> Path:
        p = tmp_path / name / f"{name}.gguf"
        p.parent.mkdir(exist_ok=True)
        return write_model(p, name=name, tensor_bytes=mib * MiB, seed=seed)

    a = model("a", 1, 1)
    for name, src in (("a", a), ("b", model("b", 2, 2)), ("c", model("c", 1, 3)), ("d", model("d", 1, 4)),
                      ("f", a)):                      # f shares a's weights (one blob)
        cli.run("import", name, str(src))
    for i, seed in enumerate((5, 6, 7), 1):            # e: 3 active, 2 last-good, 1 neither
        cli.run("import", "e", str(model(f"e{i}", 1, seed)))
    cli.run("pin", "c")
    now = time.time()
    for name, age in (("a", 40), ("b", 20), ("c", 50), ("d", 30), ("e", 5), ("f", 1)):
        cat = Catalog(cli.root / "catalog.db", clock=lambda age=age: now - age * DAY)
        cat.touch(name)
        cat.close()
    sizes = {n: size_of(cli, n) for n in "abcdef"} | {"e1": size_of(cli, "e", 1)}

    m = Mount(cli, tmp_path / "mnt")
    try:
        with open(m.path / "d" / "d.gguf", "rb") as reader:  # d is the oldest left after a: but open
            wait_for(lambda: any(f["model"] == "d" for f in m.open_files()), 5, "d's reader to be published")
            plan = cli.run("prune", "--older-than", "15d", "--include-active", "--dry-run", "--json").json()
            assert [(s["model"], s["version"], s["reason"], s["freed_bytes"], s["kept_shared_bytes"])
                    for s in plan["steps"]] == [
                ("a", 1, "older than the limit", 0, sizes["a"]),   # its blob stays for f
                ("b", 1, "older than the limit", sizes["b"], 0),
            ]
            assert plan["models"] == ["a", "b"] and plan["freed_bytes"] == sizes["b"]
            assert plan["kept_shared"] == [{"sha256": plan["kept_shared"][0]["sha256"], "model": "f"}]

            # Without --include-active only old versions may go: e's version 1, by size.
            total = cli.run("status", "--json").json()["blob_bytes"]
            plan = cli.run("prune", "--max-bytes", str(total - 1), "--dry-run", "--json").json()
            assert [(s["model"], s["version"], s["reason"], s["freed_bytes"]) for s in plan["steps"]] == [
                ("e", 1, "over the size limit", sizes["e1"])]

            out = cli.run("prune", "--older-than", "15d", "--include-active").stdout
            assert out.splitlines()[0].startswith("prune a version 1 (last used ")
            assert "frees 0 B, keeps " in out.splitlines()[0]
            assert {r["name"] for r in cli.run("list", "--json").json()} == {"c", "d", "e", "f"}
            assert reader.read(4) == b"GGUF"                 # the reader was never cut off
        assert cli.run("verify").returncode == 0            # f still has a's bytes
    finally:
        m.stop()


@pytest.mark.parametrize(("args", "error"), [(["--older-than", "soon"], "invalid duration"),
                                             (["--older-than", "never"], "invalid duration"),
                                             (["--max-bytes", "lots"], "invalid size"),
                                             (["--max-bytes", "none"], "invalid size"),
                                             (["--app", "x"], "go with --older-than or --max-bytes")])
def test_bad_prune_policies_are_usage_errors(cli: CLI, args: list[str], error: str) -> None:
    r = cli.run("prune", *args, check=False)
    assert r.returncode == 2 and error in r.stderr
