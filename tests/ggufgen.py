"""Tiny, valid GGUF files for tests: weights (``write_model``) and projectors
(``write_mmproj``), written with the PyPI ``gguf`` package's ``GGUFWriter``.

Tensor data is random bits from ``numpy.random.default_rng(seed)``: the same
arguments give the same bytes (same SHA-256), a different seed gives different
bytes. Tensors are generated and written one at a time (at most
:data:`CHUNK_BYTES` each), so a 300 MB model costs about a second and little
memory. Tests only; the store never imports the ``gguf`` package.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter

__all__ = ["CHUNK_BYTES", "ROW", "split_gguf", "write_model", "write_mmproj", "write_split"]

#: Largest single tensor written; bigger ``tensor_bytes`` is split across tensors.
CHUNK_BYTES = 64 * 1024 * 1024
#: Elements per row of every generated tensor (float32, so 256 bytes a row).
ROW = 64
_ROW_BYTES = ROW * 4

# GGUFWriter logs an INFO line per file; keep test output quiet.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)


def _chunks(total: int) -> Iterator[int]:
    """Split ``total`` bytes (a multiple of a row) into tensor sizes."""
    while total > 0:
        n = min(total, CHUNK_BYTES)
        yield n
        total -= n


def _random_f32(rng: np.random.Generator, nbytes: int) -> np.ndarray[Any, Any]:
    top = np.iinfo(np.uint64).max
    bits = rng.integers(0, top, size=nbytes // 8, dtype=np.uint64, endpoint=True)
    return bits.view(np.float32).reshape(-1, ROW)


def _write(
    path: str | os.PathLike[str],
    arch: str,
    kv: Mapping[str, tuple[Any, GGUFValueType]],
    tensor_names: list[str],
    tensor_bytes: int,
    seed: int,
    alignment: int | None,
    norm_name: str | None = None,
    bare: bool = False,
) -> Path:
    """Write ``kv`` and one small 1-D tensor plus ``tensor_bytes`` of 2-D tensors. ``bare``
    leaves out ``general.architecture`` (GGUFWriter adds it): only ``kv`` is written."""
    path = Path(path)
    total = max(_ROW_BYTES, -(-tensor_bytes // _ROW_BYTES) * _ROW_BYTES)
    sizes = list(_chunks(total))
    names = [tensor_names[i % len(tensor_names)].format(i=i) for i in range(len(sizes))]

    w = GGUFWriter(path, arch)
    if bare:
        w.kv_data[0].pop("general.architecture", None)
    try:
        if alignment is not None:
            w.add_custom_alignment(alignment)
        for key, (value, vtype) in kv.items():
            if vtype == GGUFValueType.ARRAY:
                w.add_array(key, value)
            else:
                w.add_key_value(key, value, vtype)
        norm_name = norm_name or ("output_norm.weight" if arch != "clip" else "v.post_ln.weight")
        w.add_tensor_info(norm_name, (ROW,), np.dtype(np.float32), _ROW_BYTES)
        for name, size in zip(names, sizes, strict=True):
            w.add_tensor_info(name, (size // _ROW_BYTES, ROW), np.dtype(np.float32), size)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        w.write_tensor_data(_random_f32(rng, _ROW_BYTES).reshape(ROW))
        for size in sizes:
            w.write_tensor_data(_random_f32(rng, size))
    finally:
        w.close()
    return path


def write_model(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    name: str = "tiny",
    file_type: int | None = 15,
    context_length: int | None = 4096,
    tensor_bytes: int = 64 * 1024,
    seed: int = 0,
    vocab_size: int = 32,
    alignment: int | None = None,
    extra_kv: Mapping[str, tuple[Any, GGUFValueType]] | None = None,
    chat_template: str | None = None,
) -> Path:
    """A weights file: ``general.*``, ``<arch>.*`` hyperparameters, a tokenizer of
    ``vocab_size`` tokens (0 for none), and about ``tensor_bytes`` of tensor data
    (rounded up to 256 bytes). ``file_type`` is llama.cpp's ftype (15 = Q4_K_M; the
    tensors themselves are F32). ``chat_template`` (a Jinja text) goes under
    ``tokenizer.chat_template``. ``extra_kv`` maps key -> (value, GGUFValueType)."""
    kv: dict[str, tuple[Any, GGUFValueType]] = {
        "general.type": ("model", GGUFValueType.STRING),
        "general.name": (name, GGUFValueType.STRING),
        "general.quantization_version": (2, GGUFValueType.UINT32),
    }
    if file_type is not None:
        kv["general.file_type"] = (file_type, GGUFValueType.UINT32)
    if context_length is not None:
        kv[f"{arch}.context_length"] = (context_length, GGUFValueType.UINT32)
    kv[f"{arch}.embedding_length"] = (ROW, GGUFValueType.UINT32)
    kv[f"{arch}.block_count"] = (1, GGUFValueType.UINT32)
    kv[f"{arch}.attention.head_count"] = (4, GGUFValueType.UINT32)
    kv[f"{arch}.rope.freq_base"] = (10000.0, GGUFValueType.FLOAT32)
    if vocab_size:
        kv["tokenizer.ggml.model"] = ("llama", GGUFValueType.STRING)
        kv["tokenizer.ggml.tokens"] = ([f"<t{i}>" for i in range(vocab_size)], GGUFValueType.ARRAY)
        kv["tokenizer.ggml.scores"] = ([float(-i) for i in range(vocab_size)], GGUFValueType.ARRAY)
        kv["tokenizer.ggml.token_type"] = ([1] * vocab_size, GGUFValueType.ARRAY)
        kv["tokenizer.ggml.bos_token_id"] = (1, GGUFValueType.UINT32)
    if chat_template is not None:
        kv["tokenizer.chat_template"] = (chat_template, GGUFValueType.STRING)
    kv.update(extra_kv or {})
    return _write(path, arch, kv, ["blk.{i}.ffn_up.weight"], tensor_bytes, seed, alignment)


def write_mmproj(
    path: str | os.PathLike[str],
    *,
    name: str = "tiny-mmproj",
    projector_type: str = "mlp",
    file_type: int | None = 1,
    tensor_bytes: int = 16 * 1024,
    seed: int = 1,
    alignment: int | None = None,
) -> Path:
    """A multimodal projector (``clip`` architecture, ``general.type = mmproj``),
    the kind llama.cpp loads with ``--mmproj``."""
    kv: dict[str, tuple[Any, GGUFValueType]] = {
        "general.type": ("mmproj", GGUFValueType.STRING),
        "general.name": (name, GGUFValueType.STRING),
        "clip.has_vision_encoder": (True, GGUFValueType.BOOL),
        "clip.has_text_encoder": (False, GGUFValueType.BOOL),
        "clip.projector_type": (projector_type, GGUFValueType.STRING),
        "clip.vision.image_size": (224, GGUFValueType.UINT32),
        "clip.vision.patch_size": (14, GGUFValueType.UINT32),
        "clip.vision.embedding_length": (ROW, GGUFValueType.UINT32),
        "clip.vision.block_count": (1, GGUFValueType.UINT32),
        "clip.vision.image_mean": ([0.5, 0.5, 0.5], GGUFValueType.ARRAY),
        "clip.vision.image_std": ([0.5, 0.5, 0.5], GGUFValueType.ARRAY),
    }
    if file_type is not None:
        kv["general.file_type"] = (file_type, GGUFValueType.UINT32)
    return _write(path, "clip", kv, ["mm.{i}.weight"], tensor_bytes, seed, alignment)


def write_split(
    directory: str | os.PathLike[str],
    prefix: str,
    count: int,
    *,
    tensor_bytes: int = 16 * 1024,
    seed: int = 0,
    name_count: int | None = None,
    tensors_count: int | None = None,
    **model_kv: Any,
) -> list[Path]:
    """A split model as llama.cpp's ``gguf-split`` writes it: ``count`` files named
    ``{prefix}-{no:05d}-of-{count:05d}.gguf``. The first is a :func:`write_model` file
    (``model_kv`` passes through); each holds its own tensors (``tensor_bytes`` of them)
    and ``split.no`` (0-based), ``split.count`` and ``split.tensors.count``.
    ``name_count`` names the files with another count than the headers say;
    ``tensors_count`` puts another ``split.tensors.count`` in the headers. The later files
    hold nothing but the ``split.*`` keys, as ``gguf-split`` writes them (no ``general.*``)."""
    directory = Path(directory)
    per_file = 1 + len(list(_chunks(max(_ROW_BYTES, -(-tensor_bytes // _ROW_BYTES) * _ROW_BYTES))))
    paths = []
    for i in range(count):
        split = {
            "split.no": (i, GGUFValueType.UINT16),
            "split.count": (count, GGUFValueType.UINT16),
            "split.tensors.count": (tensors_count or per_file * count, GGUFValueType.INT32),
        }
        path = directory / f"{prefix}-{i + 1:05d}-of-{name_count or count:05d}.gguf"
        if i == 0:
            write_model(path, tensor_bytes=tensor_bytes, seed=seed, extra_kv=split, **model_kv)
        else:
            _write(path, model_kv.get("arch", "llama"), split, [f"blk.{i}.{{i}}.ffn_down.weight"],
                   tensor_bytes, seed + i, None, norm_name=f"blk.{i}.attn_norm.weight", bare=True)
        paths.append(path)
    return paths


def split_gguf(src: str | os.PathLike[str], directory: str | os.PathLike[str], prefix: str, count: int) -> list[Path]:
    """Split a real GGUF file the way ``llama-gguf-split --split-max-tensors`` does, with
    the ``gguf`` package's own writer: every key in the first file, the tensors spread
    over ``count`` files named ``{prefix}-{no:05d}-of-{count:05d}.gguf`` with their
    ``split.*`` keys. For the opt-in runtime test (a real model split in three)."""
    from gguf import GGUFReader, Keys

    reader = GGUFReader(src)
    arch = str(reader.fields[Keys.General.ARCHITECTURE].contents())
    per_file = -(-len(reader.tensors) // count)
    w = GGUFWriter(Path(directory) / f"{prefix}.gguf", arch, split_max_tensors=per_file)
    try:
        for f in reader.fields.values():
            if f.name == Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
        for t in reader.tensors:
            w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in reader.tensors:
            w.write_tensor_data(t.data)
    finally:
        w.close()
    paths = sorted(Path(directory).glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].gguf"))
    if len(paths) != count:
        raise ValueError(f"{src}: {len(reader.tensors)} tensors make {len(paths)} files, not {count}")
    return paths
