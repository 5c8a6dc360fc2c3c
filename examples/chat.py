"""A chat app that gets its model the way every app should: from the shared store when
there is one, from its own cache otherwise.

    python examples/chat.py hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf
    python examples/chat.py https://host/model.gguf --sha256 HEX --prompt "Why is the sky blue?"

It prints which manager it got and why, ensures the model with a progress bar (on a
terminal), and then, with llama-cpp-python installed, loads the model and answers one
prompt; without it, opens the file with a GGUF reader and prints its card.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from modelfs.client import (
    DownloadSnapshot,
    ModelCacheEntry,
    ModelDownloadController,
    ModelLoadOptions,
    ModelSource,
    Stage,
    open_manager,
)

APP_ID = "org.example.Chat"


def bar(snap: DownloadSnapshot, width: int = 30) -> str:
    """One line: the stage, a bar of the bytes, and why it waits if it does."""
    done = snap.progress
    filled = int(width * done) if done is not None else 0
    mib = f"{snap.received_bytes / 2**20:.1f}/{(snap.total_bytes or 0) / 2**20:.1f} MiB"
    wait = f" (waiting: {snap.wait_reason})" if snap.wait_reason else ""
    return f"\r{snap.stage.value:<14} [{'#' * filled}{' ' * (width - filled)}] {mib}{wait}"


def ensure(source: ModelSource, options: ModelLoadOptions, mmproj: ModelSource | None = None) -> ModelCacheEntry:
    """The example's logic, without the model runtime: pick a manager, say which, and
    ensure the model with progress. Raises the download's error as a SystemExit line."""
    manager = open_manager(APP_ID)
    print(f"manager: {manager.kind} ({manager.reason})", flush=True)
    controller = ModelDownloadController(manager)
    tty = sys.stderr.isatty()
    if tty:
        controller.listen(lambda s: print(bar(s), end="", file=sys.stderr, flush=True))
    controller.start(source, options, mmproj=mmproj)
    try:
        final = controller.wait()
    except KeyboardInterrupt:
        controller.cancel()  # a shared download goes on for other apps that wait for it
        final = controller.wait()
    finally:
        if tty:
            print(file=sys.stderr)
    controller.dispose()
    manager.close()
    if final.stage is not Stage.READY or final.entry is None:
        raise SystemExit(f"chat: {final.error or final.stage.value}")
    return final.entry


def card_of(path: str) -> dict[str, Any]:
    """The model's card from its GGUF header: the ``gguf`` package's reader when it is
    installed, else the store's own bounded parser."""
    try:
        from gguf import GGUFReader
    except ImportError:
        from modelfs_store.gguf import parse_gguf
        info = parse_gguf(path)
        keys = info.metadata
        return {"architecture": info.architecture, "name": info.name, "quantization": info.quantization,
                "context_length": info.context_length, "chat_template": "tokenizer.chat_template" in keys}
    reader = GGUFReader(path)
    fields = reader.fields

    def text(key: str) -> str | None:
        f = fields.get(key)
        return bytes(f.parts[f.data[0]]).decode(errors="replace") if f is not None and f.data else None
    arch = text("general.architecture")
    ctx = fields.get(f"{arch}.context_length") if arch else None
    return {"architecture": arch, "name": text("general.name"), "tensors": len(reader.tensors),
            "context_length": int(ctx.parts[ctx.data[0]][0]) if ctx is not None else None,
            "chat_template": "tokenizer.chat_template" in fields}


def answer(path: str, prompt: str) -> bool:
    """One answer from llama-cpp-python; False when it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return False
    llm = Llama(model_path=path, n_ctx=2048, verbose=False)
    out: Any = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=128)
    print(out["choices"][0]["message"]["content"])
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="http(s) URL, hf://owner/repo[@rev]/file.gguf, or a pack with --pack")
    p.add_argument("--sha256", help="the file's SHA-256 (required for a plain URL)")
    p.add_argument("--mmproj", help="the companion projector (a source, like the model's)")
    p.add_argument("--pack", action="store_true", help="the source is a signed pack's envelope")
    p.add_argument("--prompt", default="Say hello in one sentence.")
    p.add_argument("--card", action="store_true", help="print the model's card instead of answering")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    source = ModelSource.pack(args.source) if args.pack else ModelSource.parse(args.source)
    mmproj = ModelSource.parse(args.mmproj) if args.mmproj else None
    entry = ensure(source, ModelLoadOptions(sha256=args.sha256), mmproj)
    print(f"file: {entry.file_path}")
    if args.card or not answer(entry.file_path, args.prompt):
        print("the model's card:" if args.card else "llama-cpp-python is not installed; the model's card:")
        print(json.dumps({**card_of(entry.file_path), "sha256": entry.sha256, "bytes": entry.bytes,
                          "store_card": entry.card}, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
