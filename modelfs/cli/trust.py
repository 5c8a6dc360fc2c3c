"""The trust verbs of ``modelfs``: keys, manifest signing and verification, channels,
``update``. Registered lazily by the group in ``modelfs.cli``.

Parsing and printing only: the keyring lives in ``store.keys``, every trust decision
in ``store.manifest`` and ``store.packs``. Store modules that pull in httpx, trio or
cryptography are imported inside the commands, so ``modelfs --help`` stays fast.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from modelfs_store.errors import StoreError, UsageError

from ._context import Ctx, json_option, pass_ctx
from ._output import info, print_json, progress_bar


def _now() -> datetime:
    return datetime.now(UTC)


def _read_source(c: Ctx, source: str) -> tuple[bytes, str]:
    """An envelope from a file, '-' (stdin) or an http(s) URL: (bytes, redacted source)."""
    from modelfs_store.keys import MAX_ENVELOPE_BYTES
    from modelfs_store.packs import fetch_envelope, read_envelope_file
    from modelfs_store.redact import redact_url

    if source == "-":
        return sys.stdin.buffer.read(MAX_ENVELOPE_BYTES + 1), "stdin"
    if source.startswith(("http://", "https://")):
        import trio

        from modelfs_store.pull import downloader_from_env

        async def get() -> bytes:
            async with downloader_from_env(c.store.blobs) as dl:
                return await fetch_envelope(dl, source)

        return trio.run(get), redact_url(source)
    return read_envelope_file(source), f"file:{Path(source).name}"


# -- keys ---------------------------------------------------------------------------------
@click.group()
def keys() -> None:
    """Trusted publisher keys (user keyring + system directory)."""


@keys.command("add")
@click.argument("key_id")
@click.argument("pubkey_b64", required=False)
@click.option("--from", "from_file", type=click.Path(dir_okay=False),
              help="Read the base64 public key from FILE (as written by 'keys generate').")
@pass_ctx
def keys_add(c: Ctx, key_id: str, pubkey_b64: str | None, from_file: str | None) -> None:
    """Trust the Ed25519 public key PUBKEY_B64 (base64 of 32 raw bytes) as KEY_ID."""
    from modelfs_store.keys import trust_key

    if (pubkey_b64 is None) == (from_file is None):
        raise UsageError("give the public key either as PUBKEY_B64 or with --from FILE (not both)")
    if from_file is not None:
        lines = [ln.strip() for ln in Path(from_file).read_text("ascii").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if len(lines) != 1:
            raise UsageError(f"{from_file} holds {len(lines)} key lines; expected one base64 public key")
        pubkey_b64 = lines[0]
    assert pubkey_b64 is not None
    new = trust_key(c.store.catalog, key_id, pubkey_b64, actor=c.store.actor)
    click.echo(f"key {key_id} {'trusted' if new else 'was already trusted'}")


@keys.command("list")
@json_option
@pass_ctx
def keys_list(c: Ctx, as_json: bool) -> None:
    """List user and system keys and whether each is trusted, revoked or unusable."""
    from modelfs_store.keys import list_keys

    rows = list_keys(c.store.catalog)
    if as_json:
        print_json([k.as_dict() for k in rows])
        return
    if not rows:
        click.echo("no keys (add one with 'modelfs keys add KEY_ID PUBKEY_B64')")
        return
    for k in rows:
        extra = f"  ({k.problem})" if k.problem else ""
        click.echo(f"{k.key_id}  {k.state}  {k.source}  {k.public_key_b64 or '-'}{extra}")


@keys.command("revoke")
@click.argument("key_id")
@pass_ctx
def keys_revoke(c: Ctx, key_id: str) -> None:
    """Revoke KEY_ID for good: it verifies nothing from now on, even from the system directory."""
    from modelfs_store.keys import revoke_key

    k = revoke_key(c.store.catalog, key_id, actor=c.store.actor)
    click.echo(f"key {key_id} revoked ({k.source})")


@keys.command("generate")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for KEY_ID.pem (private, 0600) and KEY_ID.pub.")
@click.option("--key-id", help="Key id to publish under (default: derived from the public key).")
def keys_generate(out_dir: str, key_id: str | None) -> None:
    """Create a publisher key pair; print the base64 public key on stdout."""
    import hashlib

    from modelfs_store.keys import check_key_id, generate_keypair, write_private_key
    from modelfs_store.names import check_filename

    pem, pub = generate_keypair()
    key_id = key_id or "key-" + hashlib.sha256(pub.encode()).hexdigest()[:12]
    check_key_id(key_id)
    check_filename(f"{key_id}.pem", reserved=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private = out / f"{key_id}.pem"
    public = out / f"{key_id}.pub"
    if private.exists() or public.exists():
        raise UsageError(f"{private} or {public} already exists; refusing to overwrite a key")
    write_private_key(private, pem)
    public.write_text(f"# modelfs Ed25519 public key {key_id}\n{pub}\n")
    info(f"wrote {private} (private, 0600) and {public}; trust it with: "
         f"modelfs keys add {key_id} --from {public}")
    click.echo(pub)


# -- manifest -----------------------------------------------------------------------------
@click.group()
def manifest() -> None:
    """Sign and check signed manifests (packs)."""


@manifest.command("sign")
@click.argument("payload", type=click.Path(dir_okay=False))
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False), help="Private key (PEM, 0600).")
@click.option("--key-id", required=True, help="Key id the envelope names.")
@click.option("--no-check", is_flag=True, help="Sign even if the payload does not validate.")
def manifest_sign(payload: str, key_file: str, key_id: str, no_check: bool) -> None:
    """Print the envelope for PAYLOAD.json (its raw bytes are signed as they are)."""
    from modelfs_store.keys import TrustedKey, load_private_key, public_key_b64, sign_payload
    from modelfs_store.manifest import load_manifest

    data = Path(payload).read_bytes()
    private = load_private_key(key_file)
    envelope = sign_payload(data, private, key_id)
    if not no_check:
        # A publisher should learn about a bad payload now, not from every client.
        ring = {key_id: TrustedKey(key_id, public_key_b64(private.public_key()))}
        load_manifest(envelope, ring, now=_now())
    sys.stdout.buffer.write(envelope + (b"\n" if sys.stdout.isatty() else b""))
    sys.stdout.flush()


@manifest.command("verify")
@click.argument("envelope")
@click.option("--platform", help="Platform whose artifacts to consider (default: this one).")
@json_option
@pass_ctx
def manifest_verify(c: Ctx, envelope: str, platform: str | None, as_json: bool) -> None:
    """Check ENVELOPE (file, URL or '-') against the keyring and version floors; install nothing."""
    from modelfs_store.packs import check_pack, current_platform

    data, source = _read_source(c, envelope)
    checks: list[str] = []
    error: StoreError | None = None
    m = None
    try:
        m = check_pack(c.store, data, now=_now(), platform=platform or current_platform(), checks=checks)
    except StoreError as exc:
        error = exc
    if as_json:
        print_json({"source": source, "ok": error is None, "checks": checks,
                    "refused": str(error) if error else None,
                    "reason": error.fields.get("reason") if error else None,
                    "model": m.model_id if m else None, "version": m.version if m else None,
                    "key_id": m.key_id if m else None, "payload_sha256": m.payload_sha256 if m else None,
                    "artifacts": [a.__dict__ for a in m.artifacts] if m else []})
    else:
        for line in checks:
            click.echo(f"ok       {line}")
        if error is None and m is not None:
            click.echo(f"VALID    {m.model_id} version {m.version}, signed by {m.key_id}, "
                       f"payload sha256:{m.payload_sha256}")
        elif error is not None:
            click.echo(f"REFUSED  {error}")
    if error is not None:
        sys.exit(error.exit_code)


# -- channels and update ----------------------------------------------------------------------
@click.group()
def channels() -> None:
    """Trusted manifest URLs, each bound to the keys allowed to sign it."""


@channels.command("add")
@click.argument("url")
@click.option("--key", "key_ids", multiple=True, required=True, help="Key id allowed to sign (repeatable).")
@click.option("--replace", is_flag=True, help="URL is a channel already: replace its keys with these.")
@json_option
@pass_ctx
def channels_add(c: Ctx, url: str, key_ids: tuple[str, ...], replace: bool, as_json: bool) -> None:
    """Fetch URL on every 'modelfs update'; accept only packs signed by --key. A URL that
    is a channel already keeps its keys unless --replace is given."""
    from modelfs_store.keys import load_keyring
    from modelfs_store.packs import add_channel

    add_channel(c.store, url, key_ids, replace=replace)
    ring = load_keyring(c.store.catalog)
    untrusted = [k for k in key_ids if k not in ring or ring[k].revoked or ring[k].problem]
    if untrusted:
        info(f"note: {', '.join(untrusted)} not trusted yet; add with 'modelfs keys add'")
    if as_json:
        print_json({"url": url, "key_ids": sorted(key_ids), "untrusted": untrusted})
        return
    click.echo(f"channel {url} (keys: {', '.join(sorted(key_ids))})")


@channels.command("list")
@json_option
@pass_ctx
def channels_list(c: Ctx, as_json: bool) -> None:
    """List channels, their keys and the last check."""
    rows = c.store.catalog.channels()
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no channels")
    for ch in rows:
        when = (datetime.fromtimestamp(ch["last_checked"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")
                if ch["last_checked"] else "never")
        click.echo(f"{ch['url']}  keys: {', '.join(ch['key_ids'])}  checked: {when}  "
                   f"{ch['last_result'] or ''}".rstrip())


@click.command()
@click.option("--platform", help="Platform whose artifacts to install (default: this one).")
@click.option("--check", is_flag=True, help="Check every channel and report what is newer; install nothing.")
@json_option
@pass_ctx
def update(c: Ctx, platform: str | None, check: bool, as_json: bool) -> None:
    """Fetch every channel once and install newer signed versions."""
    import trio

    from modelfs_store.packs import update_channels
    from modelfs_store.pull import downloader_from_env

    store = c.store
    if not store.catalog.channels():
        raise UsageError("no channels configured (add one with 'modelfs channels add URL --key KEY_ID')")

    async def run(advance: Any) -> list[Any]:
        async with downloader_from_env(store.blobs) as dl:
            return await update_channels(store, dl, platform=platform, progress=advance, check=check)

    with progress_bar(None, "updating") as advance:
        results = trio.run(run, advance)
    if as_json:
        print_json([r.as_dict() for r in results])
    else:
        for r in results:
            click.echo(f"{r.url}: {r.message}")
    if any(r.outcome in ("refused", "failed") for r in results):
        sys.exit(1)
