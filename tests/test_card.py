"""The shared metadata card's GGUF-derived facts (issue 13, "the card is shared").

- Whether the weights carry a chat template (``tokenizer.chat_template``) is on the
  card: ``show`` (text and ``--json``), ``list --json``, the mount's ``model.json``,
  the control socket's entry card and the client's. Only the boolean is kept, never
  the template's text.
- A lazily pulled pack has no GGUF facts until its weights are local. An open through
  the mount fills the ones the signed payload left empty, never one it gave.
"""
# ruff: noqa: F811 - the fault server's and the daemon's fixtures are imported by name

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from conftest import CLI, wait_for
from conftest import sha_file as sha256_of
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_model
from modelfs.client import SharedStoreManager
from modelfs_store.gguf import parse_gguf
from test_control import Daemon, daemon  # noqa: F401 - fixture
from test_packs import Publisher

MB = 1 << 20
# A template in the shape real ones take (Jinja), with a marker the catalog must not hold.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}{# marker-7f3a9c #}")

fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                          reason="!!! /dev/fuse is missing: the mount's card tests CANNOT run here !!!")


def test_the_header_says_whether_a_chat_template_is_there(tmp_path: Path) -> None:
    assert parse_gguf(write_model(tmp_path / "t.gguf", chat_template=TEMPLATE)).has_chat_template
    assert not parse_gguf(write_model(tmp_path / "n.gguf")).has_chat_template
    assert not parse_gguf(write_model(tmp_path / "e.gguf", chat_template="")).has_chat_template


def test_an_import_records_the_chat_templates_presence_and_not_its_text(cli: CLI, tmp_path: Path) -> None:
    cli.run("import", "chat", str(write_model(tmp_path / "chat.gguf", chat_template=TEMPLATE)))
    cli.run("import", "base", str(write_model(tmp_path / "base.gguf", seed=1)))
    assert cli.run("show", "chat", "--json").json()["chat_template"] is True
    assert cli.run("show", "base", "--json").json()["chat_template"] is False
    assert "  chat_template: yes" in cli.run("show", "chat").stdout.splitlines()
    assert "  chat_template: no" in cli.run("show", "base").stdout.splitlines()
    listed = {m["name"]: m["chat_template"] for m in cli.run("list", "--json").json()}
    assert listed == {"chat": True, "base": False}
    db = sqlite3.connect(cli.root / "catalog.db")
    try:
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    assert "marker-7f3a9c" not in dump  # the boolean only: the template stays in the file


@fuse
def test_the_api_and_client_cards_say_it_and_a_lazy_pack_fills_its_card_when_opened(
        daemon: Daemon, origin: FaultServer, tmp_path: Path) -> None:
    """A lazy pack: no GGUF facts on any card until the weights are local; the open
    through the mount fills architecture, quantization and the chat template's
    presence, and keeps the signed context length (4096, not the header's 8192)."""
    pub = Publisher(origin)
    w = write_model(tmp_path / "demo-Q4_K_M.gguf", tensor_bytes=MB, context_length=8192, chat_template=TEMPLATE)
    art = pub.artifact(w.name, w.read_bytes())
    daemon.cli.run("keys", "add", "k1", pub.pub("k1"))
    daemon.cli.run("pull", "--lazy", pub.serve("v1.json", pub.envelope(pub.payload(1, [art]))))
    m = daemon.start()
    gguf_facts = ("architecture", "quantization", "context_length", "chat_template")

    card = daemon.call("GET", "/v1/entries/demo")["card"]
    assert [card[k] for k in gguf_facts] == [None, None, 4096, None]
    assert json.loads((m.path / "demo" / "model.json").read_bytes())["chat_template"] is None

    assert sha256_of(m.path / "demo" / w.name) == art["sha256"]  # fetched by this open
    card = daemon.call("GET", "/v1/entries/demo")["card"]
    assert [card[k] for k in gguf_facts] == ["llama", "Q4_K_M", 4096, True]
    manager = SharedStoreManager(daemon.sock)
    try:
        [entry] = manager.list()
    finally:
        manager.close()
    assert entry.name == "demo" and [entry.card[k] for k in gguf_facts] == ["llama", "Q4_K_M", 4096, True]
    shown = daemon.cli.run("show", "demo", "--json").json()
    assert [shown[k] for k in gguf_facts] == ["llama", "Q4_K_M", 4096, True]
    wait_for(lambda: [json.loads((m.path / "demo" / "model.json").read_bytes()).get(k) for k in gguf_facts]
             == ["llama", "Q4_K_M", 4096, True], what="the filled card in the mount's model.json")


def test_an_eager_pack_reads_the_chat_template_from_its_verified_weights(cli: CLI, origin: FaultServer,
                                                                         tmp_path: Path) -> None:
    pub = Publisher(origin)
    w = write_model(tmp_path / "demo-Q4_K_M.gguf", tensor_bytes=MB, chat_template=TEMPLATE)
    cli.run("keys", "add", "k1", pub.pub("k1"))
    cli.run("pull", pub.serve("v1.json", pub.envelope(pub.payload(1, [pub.artifact(w.name, w.read_bytes())]))))
    assert cli.run("show", "demo", "--json").json()["chat_template"] is True


def test_a_later_pull_fills_only_what_the_signed_payload_left_empty(cli: CLI, origin: FaultServer,
                                                                    tmp_path: Path) -> None:
    """The payload names the architecture and a quantization (not the header's): the
    only gap is the chat template, filled when the bytes come; the signed values stay."""
    pub = Publisher(origin)
    w = write_model(tmp_path / "demo.gguf", tensor_bytes=MB, chat_template=TEMPLATE)
    payload = pub.payload(1, [pub.artifact(w.name, w.read_bytes())], architecture="llama", quantization="Q4_K_S")
    cli.run("keys", "add", "k1", pub.pub("k1"))
    env = pub.serve("v1.json", pub.envelope(payload))
    cli.run("pull", "--lazy", env)
    facts = ("architecture", "quantization", "context_length", "chat_template")
    shown = cli.run("show", "demo", "--json").json()
    assert [shown[k] for k in facts] == ["llama", "Q4_K_S", 4096, None]
    assert "chat_template" not in cli.run("show", "demo").stdout  # unknown yet: not shown as "no"
    cli.run("pull", env)  # the bytes come now
    shown = cli.run("show", "demo", "--json").json()
    assert [shown[k] for k in facts] == ["llama", "Q4_K_S", 4096, True]  # the header said Q4_K_M: not taken


def test_verify_fills_the_chat_template_of_a_version_recorded_before_the_column(cli: CLI, tmp_path: Path) -> None:
    cli.run("import", "chat", str(write_model(tmp_path / "chat.gguf", chat_template=TEMPLATE)))
    db = sqlite3.connect(cli.root / "catalog.db")
    try:
        with db:
            db.execute("UPDATE versions SET chat_template = NULL")  # as the schema 5 -> 6 upgrade leaves it
    finally:
        db.close()
    assert cli.run("show", "chat", "--json").json()["chat_template"] is None
    cli.run("verify")
    assert cli.run("show", "chat", "--json").json()["chat_template"] is True
