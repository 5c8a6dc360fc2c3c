"""Split GGUF sets: names, siblings, and the headers' split.* keys checked together."""

from __future__ import annotations

import pytest

from ggufgen import write_model, write_split
from modelfs_store import gguf
from modelfs_store.errors import UsageError
from modelfs_store.shards import check_split, find_siblings, group, incomplete, split_name


def test_split_names():
    s = split_name("Qwen3-32B-Q4_K_M-00002-of-00003.gguf")
    assert s is not None and (s.prefix, s.no, s.count) == ("Qwen3-32B-Q4_K_M", 2, 3)
    assert s.names == [f"Qwen3-32B-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for name in ("model.gguf", "m-00004-of-00003.gguf", "m-00000-of-00003.gguf", "m-1-of-3.gguf",
                 "m-00001-of-00003.gguf.part"):
        assert split_name(name) is None, name
    whole, singles = group(["a-00001-of-00002.gguf", "a-00002-of-00002.gguf", "b-00001-of-00002.gguf",
                            "mmproj.gguf"])
    assert whole == [["a-00001-of-00002.gguf", "a-00002-of-00002.gguf"]] and singles == ["mmproj.gguf"]
    assert incomplete(["b-00001-of-00002.gguf"]) == ["b-00001-of-00002.gguf: shard(s) b-00002-of-00002.gguf missing"]


def test_siblings_and_headers_of_a_whole_set(tmp_path):
    paths = write_split(tmp_path, "m", 3)
    assert find_siblings(paths[0]) == paths
    check_split([(p.name, gguf.parse_gguf(p)) for p in paths])
    single = write_model(tmp_path / "one.gguf")
    assert find_siblings(single) == [single]
    check_split([(single.name, gguf.parse_gguf(single))])


def test_a_later_missing_or_extra_shard_is_refused(tmp_path):
    paths = write_split(tmp_path, "m", 3)
    with pytest.raises(UsageError, match="shard 2 of 3; name the first one, m-00001-of-00003.gguf"):
        find_siblings(paths[1])
    (tmp_path / "m-00004-of-00004.gguf").write_bytes(b"stale")
    with pytest.raises(UsageError, match="m-00004-of-00004.gguf beside it claims another split"):
        find_siblings(paths[0])
    (tmp_path / "m-00004-of-00004.gguf").unlink()
    paths[2].unlink()
    with pytest.raises(UsageError, match="split into 3 files, and 1 of them is missing: m-00003-of-00003.gguf"):
        find_siblings(paths[0])


def test_headers_that_disagree_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_split(tmp_path / "a", "m", 3)
    b = write_split(tmp_path / "b", "m", 2)
    infos = [(p.name, gguf.parse_gguf(p)) for p in a]
    with pytest.raises(UsageError, match="split into 3 files, but the set has 2"):
        check_split(infos[:2])
    with pytest.raises(UsageError, match="says it is shard 3, but its name makes it shard 2"):
        check_split([infos[0], infos[2], infos[1]])
    b2 = (b[1].name, gguf.parse_gguf(b[1]))
    with pytest.raises(UsageError, match="split into 2 files, but the set has 3"):
        check_split([infos[0], infos[1], b2])
    (tmp_path / "c").mkdir()
    c = write_split(tmp_path / "c", "m", 2, tensors_count=5)
    with pytest.raises(UsageError, match="hold 4 tensors, but split.tensors.count says 5"):
        check_split([(p.name, gguf.parse_gguf(p)) for p in c])
    with pytest.raises(UsageError, match="disagree on split.tensors.count"):
        check_split([(b[0].name, gguf.parse_gguf(b[0])), (c[1].name, gguf.parse_gguf(c[1]))])
    plain = write_model(tmp_path / "plain.gguf")
    with pytest.raises(UsageError, match="not a shard of a split model"):
        check_split([infos[0], (plain.name, gguf.parse_gguf(plain)), infos[2]])
