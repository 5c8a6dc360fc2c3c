"""Issue 15 end to end: models adopted from other tools' caches are read back through the
mount in those tools' own layouts, by their own libraries.

The parts are tested on their own elsewhere (test_adopt, test_views, test_hf_repo,
test_split_models, test_oci); this checks that they meet: what ``adopt`` records is what
the views lay out, so ``huggingface_hub`` finds an adopted model in the mount's hub view
under the commit the user's cache had, LM Studio's tree shows it under its publisher and
repo, and a split model adopted from a directory loads from its first shard through the
mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import CLI, sha_file
from ggufgen import write_mmproj, write_model, write_split
from test_adopt import hf_repo, lmstudio_repo

COMMIT = "0123456789abcdef0123456789abcdef01234567"

HF_PROBE = """
    import hashlib, json, sys
    from huggingface_hub import hf_hub_download
    out = []
    for repo, filename in json.loads(sys.argv[1]):
        path = hf_hub_download(repo, filename)
        with open(path, "rb") as f:
            out.append([path, hashlib.sha256(f.read()).hexdigest()])
    print(json.dumps(out))
"""

SPLIT_PROBE = """
    import json, os, sys
    from gguf import GGUFReader
    first = GGUFReader(sys.argv[1])
    count = int(first.fields["split.count"].parts[-1][0])
    folder, name = os.path.split(sys.argv[1])
    prefix = name[: -len("-00001-of-00003.gguf")]
    tensors = sum(len(GGUFReader(os.path.join(folder, f"{prefix}-{i:05d}-of-{count:05d}.gguf")).tensors)
                  for i in range(1, count + 1))
    print(json.dumps([count, tensors, int(first.fields["split.tensors.count"].parts[-1][0])]))
"""


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="!!! /dev/fuse is missing: CANNOT mount here !!!")
def test_adopted_models_are_found_by_their_own_tools_through_the_mount(cli: CLI, tmp_path: Path) -> None:
    from test_mount import Mount

    home = tmp_path / "home"
    gen, hub, lms, loose = (tmp_path / "gen", tmp_path / "hub", home / ".lmstudio" / "models", tmp_path / "loose")
    for d in (gen, hub, lms, loose):
        d.mkdir(parents=True)
    q4 = write_model(gen / "q4", name="tiny", tensor_bytes=256 << 10, seed=11)
    proj = write_mmproj(gen / "proj", seed=12)
    lm = write_model(gen / "lm", name="other", tensor_bytes=128 << 10, seed=13)
    want = {"tiny-Q4_K_M.gguf": sha_file(q4), "mmproj-tiny-f16.gguf": sha_file(proj),
            "Other-Q8_0.gguf": sha_file(lm)}
    hf_repo(hub, "acme/Tiny-GGUF", {"tiny-Q4_K_M.gguf": q4, "mmproj-tiny-f16.gguf": proj}, commit=COMMIT)
    lmstudio_repo(lms, "lmstudio-community/Other-GGUF", {"Other-Q8_0.gguf": lm})
    split = write_split(loose, "big-Q4_K_M", 3, tensor_bytes=64 << 10, seed=14)

    env = {"HF_HUB_CACHE": str(hub), "HOME": str(home)}
    cli.run("adopt", "--from", "hf", env=env)
    # LM Studio's files and a plain directory's may be rewritten by their owners: they are
    # never hard-linked, and (with no reflinks here) come in only by --copy.
    plan = cli.run("adopt", "--from", "lmstudio", "--from", str(loose), "--dry-run", "--json", env=env).json()
    assert sorted((m["tool"], m["status"], m["reason"].split(" (")[0]) for m in plan["models"]) == \
        [("dir", "skipped", "needs --copy"), ("lmstudio", "skipped", "needs --copy")]
    # A models folder named by path is read in LM Studio's layout too.
    moved = cli.run("adopt", "--from", str(lms), "--dry-run", "--json", env=env).json()
    assert [(p["tool"], p["path"]) for p in moved["places"]] == [("lmstudio", str(lms))]
    assert [m["name"] for m in moved["models"]] == [m["name"] for m in plan["models"] if m["tool"] == "lmstudio"]
    cli.run("adopt", "--from", "lmstudio", "--from", str(loose), "--copy", env=env)
    models = {m["name"]: m for m in cli.run("list", "--json").json()}
    tiny = next(m for m in models.values() if m["hub_repo"] == "acme/Tiny-GGUF")
    assert tiny["hub_commit"] == COMMIT and sorted(f["role"] for f in tiny["files"]) == ["mmproj", "weights"]
    big = next(m for m in models.values() if any(f["filename"] == split[0].name for f in m["files"]))
    assert sorted(f["role"] for f in big["files"]) == ["shard", "shard", "weights"]

    (tmp_path / "mnt").mkdir()
    mount = Mount(cli, tmp_path / "mnt")
    try:
        mnt = mount.path
        probe_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(mnt / ".hf" / "hub"),
                     "HF_HOME": str(tmp_path / "hfhome"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(HF_PROBE),
                            json.dumps([["acme/Tiny-GGUF", "tiny-Q4_K_M.gguf"],
                                        ["acme/Tiny-GGUF", "mmproj-tiny-f16.gguf"]])],
                           capture_output=True, text=True, timeout=120, env=probe_env, cwd="/")
        assert r.returncode == 0, r.stderr
        for (path, digest), name in zip(json.loads(r.stdout), ["tiny-Q4_K_M.gguf", "mmproj-tiny-f16.gguf"],
                                        strict=True):
            assert path == str(mnt / ".hf/hub/models--acme--Tiny-GGUF/snapshots" / COMMIT / name)
            assert digest == want[name]
        lm_file = mnt / ".lmstudio/lmstudio-community/Other-GGUF/Other-Q8_0.gguf"
        assert hashlib.sha256(lm_file.read_bytes()).hexdigest() == want["Other-Q8_0.gguf"]
        # The top-level listing is the models, nothing else.
        assert sorted(os.listdir(mnt)) == sorted(models)
        # The split model adopted from a directory loads from its first shard.
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(SPLIT_PROBE),
                            str(mnt / big["name"] / split[0].name)],
                           capture_output=True, text=True, timeout=120, cwd="/")
        assert r.returncode == 0, r.stderr
        count, tensors, declared = json.loads(r.stdout)
        assert (count, tensors) == (3, declared)
    finally:
        mount.stop()
