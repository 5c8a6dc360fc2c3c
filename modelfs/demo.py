"""The README's demo: a store, a model, a signed pack, and reading it through the mount.
Offline, well under a minute.

Run with ``python -m modelfs.demo [--keep DIR]``. Needs the ``test`` extra (the
``gguf`` writer and numpy) to generate small but real GGUF models and projectors.
Everything happens in a temporary directory through the real ``modelfs`` command;
the "publisher" serves its signed pack from an HTTP origin on 127.0.0.1 that the
demo starts itself.

The pack is pulled ``--lazy``: the model is listed with its exact sizes before a
byte is local, and the first ``open`` through the mount downloads and verifies it
(from the 127.0.0.1 origin; nothing leaves the machine). Readers are real: the
``gguf`` package's ``GGUFReader`` (llama.cpp's own reader, which mmaps the file) and
``numpy.memmap``. The mount needs ``/dev/fuse`` and root (or ``user_allow_other``).

The demo is a list of steps (:data:`STEPS`), each a function of one shared
:class:`Demo`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MB = 1 << 20
PUBLISHER_KEY_ID = "demo-publisher-2026"


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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MB):
            h.update(chunk)
    return h.hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep the demo's output readable
        pass


@dataclass
class Origin:
    """A publisher's web server: a directory served on 127.0.0.1 by a thread."""

    root: Path
    server: http.server.ThreadingHTTPServer = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, name="demo-origin", daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Demo:
    work: Path
    store: Path
    origin: Origin | None = None
    pack_url: str = ""
    t0: float = field(default_factory=time.monotonic)

    def modelfs(self, *args: str, capture: bool = False) -> str:
        return modelfs(self.store, *args, capture=capture)


# -- steps ----------------------------------------------------------------------------------
def import_local_model(d: Demo) -> None:
    step("generating a 64 MiB GGUF model and its multimodal projector")
    weights, proj = d.work / "demo-llama-Q4_K_M.gguf", d.work / "mmproj-demo-f16.gguf"
    write_gguf(weights, arch="llama", name="demo", nbytes=64 * MB, seed=1)
    write_gguf(proj, arch="clip", name="demo-proj", nbytes=8 * MB, seed=2, mmproj=True)

    step("a fresh store, and the model imported into it (hash and copy in one pass)")
    d.modelfs("init", str(d.store))
    d.modelfs("import", "demo", str(weights), "--mmproj", str(proj), "--license", "apache-2.0")
    step("a second app importing the same bytes stores nothing new")
    d.modelfs("import", "demo-copy", str(weights))
    d.modelfs("list")
    d.modelfs("verify")


def publish_signed_pack(d: Demo) -> None:
    step("a publisher generates an Ed25519 key (the private half stays 0600 on their side)")
    keys = d.work / "publisher"
    d.modelfs("keys", "generate", "--out", str(keys), "--key-id", PUBLISHER_KEY_ID)

    step("... builds a pack (a 32 MiB model and its projector) and serves it from http://127.0.0.1")
    d.origin = Origin(d.work / "origin")
    weights, proj = d.origin.root / "vision-Q4_K_M.gguf", d.origin.root / "mmproj-vision-f16.gguf"
    write_gguf(weights, arch="llama", name="vision", nbytes=32 * MB, seed=3)
    write_gguf(proj, arch="clip", name="vision-proj", nbytes=4 * MB, seed=4, mmproj=True)
    payload = {
        "schema": "modelfs.manifest/1", "model_id": "vision", "version": 1, "family": "llama",
        "context_len": 4096, "min_device": "cpu", "license": "apache-2.0",
        "source_url": "https://example.org/vision", "expires": "2099-01-01T00:00:00Z",
        "quantization": "Q4_K_M",
        "artifacts": [
            {"filename": p.name, "url": d.origin.url(p.name), "sha256": sha256_of(p),
             "size": p.stat().st_size, "role": role}
            for p, role in ((weights, "weights"), (proj, "mmproj"))
        ],
    }
    payload_file = d.work / "vision-payload.json"
    payload_file.write_text(json.dumps(payload, indent=2) + "\n")

    step("... and signs it: the envelope is {key_id, payload_b64, sig_b64}")
    envelope = d.modelfs("manifest", "sign", str(payload_file), "--key", str(keys / f"{PUBLISHER_KEY_ID}.pem"),
                         "--key-id", PUBLISHER_KEY_ID, capture=True)
    (d.origin.root / "vision.pack.json").write_text(envelope)
    d.pack_url = d.origin.url("vision.pack.json")


def pull_signed_pack(d: Demo) -> None:
    step("this machine trusts the publisher's public key")
    d.modelfs("keys", "add", PUBLISHER_KEY_ID, "--from", str(d.work / "publisher" / f"{PUBLISHER_KEY_ID}.pub"))
    d.modelfs("keys", "list")

    step("every check happens before a single artifact byte is fetched")
    d.modelfs("manifest", "verify", d.pack_url)

    step("pulling it --lazy: the signed version is recorded and listed, no byte is fetched yet")
    d.modelfs("pull", "--lazy", d.pack_url)
    d.modelfs("list")


def _state(path: Path) -> str:
    """A file's state in the mount. Once local, your own process sees a symbolic link to
    the blob (the link fast path), which carries no state attribute: a link is local."""
    if os.path.islink(path):
        return f"local (a link to its blob: {os.readlink(path)})"
    return os.getxattr(path, "user.modelfs.state").decode()


def read_through_the_mount(d: Demo) -> None:
    from .mount.control import mounted

    if not os.path.exists("/dev/fuse"):
        sys.exit("demo failed: /dev/fuse is missing, so this machine cannot mount FUSE file systems "
                 "(apt-get install fuse3; in a container, pass --device /dev/fuse)")
    import gguf
    import numpy as np

    mnt = d.work / "models"
    step(f"mounting the store at {mnt} (one daemon; it fetches dehydrated files on open)")
    with mounted(d.store, mnt, offline=False):
        names = sorted(os.listdir(mnt))
        print(f"$ ls {mnt}\n" + "  ".join(names))
        weights = mnt / "vision" / "vision-Q4_K_M.gguf"
        print(f"{weights.relative_to(mnt)}: {os.stat(weights).st_size} bytes, state {_state(weights)}")

        step("gguf.GGUFReader opens it through the mount: the open downloads and verifies it first")
        t = time.monotonic()
        reader = gguf.GGUFReader(weights)
        print(f"opened in {time.monotonic() - t:.2f}s; state now "
              f"{_state(weights)}; "
              f"general.name = {bytes(reader.fields['general.name'].parts[-1]).decode()!r}")
        assert d.origin is not None  # publish_signed_pack ran
        original = gguf.GGUFReader(d.origin.root / weights.name)
        same = [a.name == b.name and np.array_equal(a.data, b.data)
                for a, b in zip(reader.tensors, original.tensors, strict=True)]
        print(f"{len(same)} tensor(s), identical to the publisher's file: {all(same)}")
        if not all(same):
            sys.exit("demo failed: the tensors read through the mount differ from the original")
        d.modelfs("status")
        del reader, original

        step("numpy.memmap of the locally imported model, through the mount")
        local = mnt / "demo" / "demo-llama-Q4_K_M.gguf"
        data = np.memmap(local, dtype=np.uint8, mode="r")
        digest = hashlib.sha256(data.data).hexdigest()
        want = os.getxattr(local, "user.modelfs.sha256").decode()
        print(f"sha256 over the mmap {digest[:16]}… matches user.modelfs.sha256: {digest == want}")
        data._mmap.close()  # type: ignore[attr-defined]  # numpy keeps it mapped until collected
        del data
        if digest != want:
            sys.exit("demo failed: the bytes read through the mount do not match their SHA-256")
    step(f"unmounted {mnt}")

    step("pulling the pack again without --lazy fetches only what no reader opened (the projector)")
    d.modelfs("pull", d.pack_url)
    d.modelfs("verify", "vision")


STEPS: list[Callable[[Demo], None]] = [import_local_model, publish_signed_pack, pull_signed_pack,
                                       read_through_the_mount]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", type=Path, help="Work in DIR and keep it afterwards.")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="modelfs-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    d = Demo(work, work / "store")
    try:
        for run_step in STEPS:
            run_step(d)
    finally:
        if d.origin is not None:
            d.origin.close()
    step(f"done in {time.monotonic() - d.t0:.1f}s; the store is in {d.store}")


if __name__ == "__main__":
    main()
