"""The store end to end: import, list, dedup, verify, rm, crash recovery, and the CLI's errors."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CLI, du_bytes, run_cli, wait_for
from conftest import sha_file as sha
from ggufgen import write_mmproj, write_model
from modelfs_store import seal

MB = 1 << 20


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("models")
    weights = d / "tiny-llama-Q4_K_M.gguf"
    mmproj = d / "mmproj-tiny-f16.gguf"
    write_model(weights, arch="llama", name="tiny", file_type=15, context_length=8192,
                tensor_bytes=300 * MB, seed=1)
    write_mmproj(mmproj, seed=2)
    return weights, mmproj



def import_reading_bytes(cli: CLI, *args: str) -> int:
    """Run an import in a child and return how many bytes it read (``rchar``)."""
    code = ("import sys\nfrom modelfs.cli import main\nsys.argv=['modelfs', *sys.argv[1:]]\n"
            "try:\n    rc = main()\nfinally:\n"
            "    io=dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())\n"
            "    print('RCHAR', io['rchar'], file=sys.stderr)\n"
            "raise SystemExit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code, *args], env=cli.env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return int(p.stderr.split("RCHAR ")[1].split()[0])


def test_import_large_model_with_mmproj_one_pass_and_dedup(cli, store_dir, big_model):
    weights, mmproj = big_model
    size = weights.stat().st_size
    assert size >= 300 * MB
    read = import_reading_bytes(cli, "import", "gemma-tiny", str(weights), "--mmproj", str(mmproj),
                                "--license", "apache-2.0", "--source-url", "https://example.test/tiny")
    # One pass: the weights are read once for copy+hash (plus the bounded header parse and
    # Python's own start-up), not twice.
    assert read < size * 1.2, f"import read {read} bytes for a {size} byte file"

    listed = cli.run("list", "--json").json()
    assert [m["name"] for m in listed] == ["gemma-tiny"]
    m = listed[0]
    assert (m["architecture"], m["quantization"], m["context_length"]) == ("llama", "Q4_K_M", 8192)
    files = {f["filename"]: f for f in m["files"]}
    assert files[weights.name]["size"] == size and files[weights.name]["role"] == "weights"
    assert files[weights.name]["sha256"] == sha(weights)
    assert files[mmproj.name]["role"] == "mmproj"
    assert files[mmproj.name]["sha256"] == sha(mmproj)
    blob = store_dir / "blobs" / "sha256" / sha(weights)[:2] / sha(weights)
    assert blob.stat().st_mode & 0o777 == 0o444

    before = du_bytes(store_dir / "blobs") + du_bytes(store_dir / "tmp")
    out = cli.run("import", "second-app-copy", str(weights))
    assert "0 B new" in out.stdout
    after = du_bytes(store_dir / "blobs") + du_bytes(store_dir / "tmp")
    assert after == before
    assert len(cli.run("list", "--json").json()) == 2

    # Re-importing identical files under the same name is a no-op, not a new version.
    again = cli.run("import", "gemma-tiny", str(weights), "--mmproj", str(mmproj), "--json").json()
    assert again["new_version"] is False and again["version"] == 1


def test_verify_quarantines_a_flipped_byte_and_spares_others(cli, store_dir, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_model(a, name="a", tensor_bytes=2 * MB, seed=10)
    write_model(b, name="b", tensor_bytes=2 * MB, seed=11)
    cli.run("import", "model-a", str(a))
    cli.run("import", "model-b", str(b))
    digest = sha(a)
    blob = store_dir / "blobs" / "sha256" / digest[:2] / digest
    frozen = seal.marks(blob, digest).immutable  # root's store: committed immutable (store/seal.py)
    seal.thaw(blob)
    with open(blob, "r+b") as f:  # bit rot, below the file's flags
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    if frozen:
        seal.freeze(blob)  # verify must clear it to move the blob to quarantine

    r = cli.run("verify", check=False)
    assert r.returncode != 0
    assert "CORRUPT  model-a v1 a.gguf" in r.stdout
    assert "OK       model-b v1 b.gguf" in r.stdout
    assert not blob.exists()
    assert len(list((store_dir / "quarantine").iterdir())) == 1
    assert cli.run("verify", "model-b").returncode == 0
    ok = cli.run("verify", "--json", check=False).json()
    assert {(x["model"], x["status"]) for x in ok} == {("model-a", "missing"), ("model-b", "ok")}
    # The quarantined blob had no source: model-a's active version lost its bytes, and
    # every later verify says so (exit 5), as list does.
    again = cli.run("verify", check=False)
    assert again.returncode == 5 and "MISSING  model-a v1 a.gguf" in again.stdout
    assert "no bytes and no source" in again.stderr
    listed = {row.split()[0]: row.split()[-1] for row in cli.run("list").stdout.splitlines()[1:]}
    assert listed == {"model-a": "missing", "model-b": "local"}
    doctor = {c["name"]: c for c in cli.run("doctor", "--json", check=False).json()}
    assert not doctor["blobs"]["ok"] and "1 missing (no bytes and no source" in doctor["blobs"]["detail"]


def test_malformed_gguf_refused_and_nothing_stored(cli, store_dir, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    r = cli.run("import", "bad", str(bad), check=False)
    assert r.returncode == 6
    assert r.stderr.count("\n") == 1 and "bad.gguf" in r.stderr and "Traceback" not in r.stderr
    assert list((store_dir / "blobs" / "sha256").iterdir()) == []
    assert list((store_dir / "tmp").iterdir()) == []
    assert cli.run("list", "--json").json() == []


@pytest.mark.parametrize("how", ["crash-point", "signal-at-60-percent"])
def test_kill_9_during_import_leaves_nothing_visible(cli, store_dir, big_model, how):
    weights, _ = big_model
    if how == "crash-point":
        r = cli.run("import", "big", str(weights), check=False,
                    env={"MODELFS_CRASH_AT": "import-mid-copy"}, process=True)
        assert r.returncode == -signal.SIGKILL
    else:
        p = cli.popen("import", "big", str(weights), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp = store_dir / "tmp"

        def temp_60_percent():
            try:
                return any(e.stat().st_size > weights.stat().st_size * 0.6 for e in tmp.iterdir())
            except FileNotFoundError:
                return False
        wait_for(temp_60_percent, what="the import's temp file to reach 60%")
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
    temps = list((store_dir / "tmp").iterdir())
    assert temps, "the crash should have left a temp file behind"
    blobs = store_dir / "blobs" / "sha256"
    assert not any(blobs.rglob("*")) or all(p.is_dir() for p in blobs.rglob("*"))

    r = cli.run("list", "--json")
    assert r.json() == []
    assert "removed 1 stale temp file" in r.stderr
    assert list((store_dir / "tmp").iterdir()) == []

    cli.run("import", "big", str(weights))
    assert cli.run("verify", "big").returncode == 0


def test_rm_plans_and_keeps_shared_blobs(cli, store_dir, tmp_path):
    w, w2 = tmp_path / "w.gguf", tmp_path / "w2.gguf"
    write_model(w, tensor_bytes=1 * MB, seed=20)
    write_model(w2, tensor_bytes=1 * MB, seed=21)
    cli.run("import", "one", str(w))
    cli.run("import", "two", str(w))
    cli.run("import", "three", str(w2))
    plan = cli.run("rm", "one", "--dry-run", "--json").json()
    assert plan["blobs"] == [] and plan["kept_shared"][0]["model"] == "two"
    assert {m["name"] for m in cli.run("list", "--json").json()} == {"one", "two", "three"}

    out = cli.run("rm", "one").stdout
    assert "keep blob" in out and "frees 0 B" in out
    assert cli.run("verify", "two").returncode == 0
    out = cli.run("rm", "three").stdout
    assert "delete blob" in out
    digest = sha(w2)
    assert not (store_dir / "blobs" / "sha256" / digest[:2] / digest).exists()
    assert {m["name"] for m in cli.run("list", "--json").json()} == {"two"}
    audit_actions = [r for r in cli.run("list").stdout.splitlines()]
    assert audit_actions


def test_user_errors_are_one_line_with_exit_code(cli, tmp_path):
    r = cli.run("show", "nope", check=False)
    assert r.returncode == 3 and r.stderr == "modelfs: error: no model named 'nope'\n"
    w = tmp_path / "w.gguf"
    write_model(w, tensor_bytes=4096, seed=3)
    r = cli.run("import", "bad/name", str(w), check=False)
    assert r.returncode == 2 and "invalid model name" in r.stderr and "Traceback" not in r.stderr
    r = cli.run("import", "x", str(tmp_path / "missing.gguf"), check=False)
    assert r.returncode == 3 and "no such file" in r.stderr


def test_store_from_env_flag_and_xdg(tmp_path):
    w = tmp_path / "w.gguf"
    write_model(w, tensor_bytes=4096, seed=4)
    env: dict[str, str | None] = {"MODELFS_STORE": None, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    r = run_cli("import", "m", str(w), env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "xdg" / "modelfs" / "catalog.db").exists()
    (tmp_path / "flag").mkdir()  # a named store must exist (only the default is created)
    r = run_cli("--store", str(tmp_path / "flag"), "import", "m", str(w), env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "flag" / "catalog.db").exists()


def test_apps_grants_pins_and_doctor(cli, tmp_path):
    w = tmp_path / "w.gguf"
    write_model(w, tensor_bytes=4096, seed=5)
    cli.run("import", "m", str(w))
    cli.run("apps", "add", "org.example.chat", "--uid", "1000")
    cli.run("grant", "org.example.chat", "m")
    assert cli.run("apps", "list", "--json").json()[0]["grants"] == [{"model": "m", "uid": None, "any_uid": False}]
    r = cli.run("grant", "org.example.other", "m", check=False)
    assert r.returncode == 3 and "no app named" in r.stderr
    cli.run("revoke", "org.example.chat", "m")
    assert cli.run("apps", "list", "--json").json()[0]["grants"] == []
    cli.run("pin", "m")
    assert cli.run("show", "m", "--json").json()["pinned"] is True
    checks = {c["name"]: c for c in cli.run("doctor", "--json").json()}
    assert checks["catalog integrity"]["ok"] and checks["/dev/fuse"]["ok"]


def test_prune_keeps_active_last_good_and_pinned(cli, store_dir, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"v{i}" / "w.gguf"
        p.parent.mkdir()
        write_model(p, tensor_bytes=64 * 1024, seed=100 + i)
        paths.append(p)
        cli.run("import", "m", str(p))
    assert [v["version"] for v in cli.run("show", "m", "--json").json()["versions"]] == [1, 2, 3]
    plan = cli.run("prune", "--dry-run", "--json").json()
    assert plan["versions"] == [["m", 1]] and len(plan["blobs"]) == 1
    cli.run("pin", "m")
    assert cli.run("prune", "--dry-run", "--json").json()["versions"] == []
    cli.run("unpin", "m")
    cli.run("prune")
    show = cli.run("show", "m", "--json").json()
    assert [(v["version"], v["state"]) for v in show["versions"]] == [(2, "last-good"), (3, "active")]
    assert cli.run("verify").returncode == 0


def test_user_error_inside_exception_groups_is_unwrapped():
    """trio >= 0.25 wraps nursery errors in ExceptionGroup; main() must still see the StoreError."""
    from modelfs.cli import _leaf
    from modelfs_store.errors import UsageError

    err = UsageError("bad source")
    assert _leaf(ExceptionGroup("outer", [ExceptionGroup("inner", [err])])) is err
    two = ExceptionGroup("two", [err, ValueError("other")])
    assert _leaf(two) is two


def test_free_text_is_redacted_before_it_is_stored(cli, store_dir, tmp_path):
    w = tmp_path / "w.gguf"
    write_model(w, tensor_bytes=4096, seed=12)
    secret = "MIT, mirror at https://cdn.example/m.gguf?X-Amz-Signature=abc123SECRET&download=1 token=hf_SECRETSECRET"
    cli.run("import", "m", str(w), "--license", secret, "--source-url", "https://u:pw@example.org/m?sig=SECRET#frag")
    stored = [p.read_bytes().decode("latin-1") for p in store_dir.glob("catalog.db*")]
    for out in (cli.run("show", "m", "--json").stdout, cli.run("list", "--json").stdout, *stored):
        assert "SECRET" not in out and "u:pw" not in out
    card = cli.run("show", "m", "--json").json()
    assert card["license"].startswith("MIT, mirror at https://cdn.example/m.gguf?X-Amz-Signature=REDACTED")
    assert card["source_url"] == "https://example.org/m?sig=REDACTED"
