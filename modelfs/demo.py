"""The README's demo: a store, a model, and a look at it. Offline, about a minute.

Run with ``python -m modelfs.demo [--keep DIR]``. Needs the ``test`` extra (the
``gguf`` writer and numpy) to generate a small but real GGUF model and projector.
Everything happens in a temporary directory through the real ``modelfs`` command.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1 << 20


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def modelfs(store: Path, *args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "modelfs", "--store", str(store), *args]
    print("$ modelfs " + " ".join(args), flush=True)
    p = subprocess.run(cmd, text=True, capture_output=capture)
    if p.returncode != 0:
        sys.exit(f"demo failed: modelfs {' '.join(args)} exited {p.returncode}\n{p.stderr or ''}")
    return p.stdout if capture else ""


def write_gguf(path: Path, *, arch: str, name: str, nbytes: int, seed: int, mmproj: bool = False) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    if mmproj:
        w.add_string("general.type", "mmproj")
        w.add_bool("clip.has_vision_encoder", True)
    else:
        w.add_context_length(4096)
        w.add_file_type(15)  # Q4_K_M label; the demo tensors themselves are f32
    rng = np.random.default_rng(seed)
    w.add_tensor("weights.0", rng.standard_normal(nbytes // 4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", type=Path, help="Work in DIR and keep it afterwards.")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="modelfs-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    t0 = time.monotonic()

    step("generating a 64 MiB GGUF model and its multimodal projector")
    weights, proj = work / "demo-llama-Q4_K_M.gguf", work / "mmproj-demo-f16.gguf"
    write_gguf(weights, arch="llama", name="demo", nbytes=64 * MB, seed=1)
    write_gguf(proj, arch="clip", name="demo-proj", nbytes=8 * MB, seed=2, mmproj=True)

    step("importing it into a fresh store (hash and copy in one pass)")
    modelfs(store, "import", "demo", str(weights), "--mmproj", str(proj), "--license", "apache-2.0")
    step("a second app importing the same bytes stores nothing new")
    modelfs(store, "import", "demo-copy", str(weights))
    modelfs(store, "list")
    modelfs(store, "verify")
    step(f"done in {time.monotonic() - t0:.1f}s; the store is in {store}")


if __name__ == "__main__":
    main()
