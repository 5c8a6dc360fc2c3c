"""Names that become paths: refused, never repaired, when they are not what they look like."""

from __future__ import annotations

import pytest

from modelfs_store.errors import UsageError
from modelfs_store.names import check_filename, check_model_name, check_relpath

MISLEADING = [
    "model\u202efugg.exe",   # right-to-left override: shows as "modelexe.gguf"
    "mo\u200bdel.gguf",      # zero-width space
    "model\u2060.gguf",      # word joiner (Cf)
    "a\u2028b.gguf",         # line separator (Zl)
    "a\u2029b.gguf",         # paragraph separator (Zp)
    "a\ue000b.gguf",         # private use (Co)
    "a\u0378b.gguf",         # unassigned (Cn)
    "model.gguf. ",          # trailing ". "
    "model.gguf.",           # trailing dot
    "model.gguf ",           # trailing space
    "-rf.gguf",              # read as an option
]


@pytest.mark.parametrize("name", MISLEADING)
def test_misleading_file_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="invalid file name"):
        check_filename(name)
    with pytest.raises(UsageError):
        check_relpath(f"dir/{name}")


@pytest.mark.parametrize("name", ["model.", "-model", "model\u202e", "mo\u200bdel", "a b"])
def test_misleading_model_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="invalid model name"):
        check_model_name(name)


@pytest.mark.parametrize("name", ["Qwen2-7B.Q4_K_M", ".hidden", "a_b", "x" * 128])
def test_plain_model_names_pass(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["mmproj-gemma3.gguf", "modèle.gguf", "模型.gguf", ".hidden.gguf",
                                  "model-00001-of-00003.gguf"])
def test_plain_file_names_pass(name: str) -> None:
    assert check_filename(name) == name
