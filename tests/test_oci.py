"""OCI registries: ``modelfs push`` and ``modelfs pull oci://`` against a real registry.

Debian's ``docker-registry`` (distribution 2.8) runs on 127.0.0.1, started here with a
generated config (``tests/registry.py``): one without auth, one with an htpasswd file
(Basic), one with ``auth: token`` trusting the certificate of the test's token server
(Bearer: real ES256 JWTs the registry verifies). Each is shared by the module.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import CLI, sha_file
from faultserver import FaultServer, origin  # noqa: F401 - fixture
from ggufgen import write_mmproj, write_model, write_split
from modelfs_store.oci import DMR_CONFIG, DMR_GGUF, DMR_MMPROJ, OLLAMA_MODEL, OLLAMA_PROJECTOR, parse_reference
from registry import Registry, TokenServer, htpasswd, push_artifact, running, sha256_hex, with_digest
from test_packs import Publisher

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry"),
                                reason="LOUD SKIP: Debian's docker-registry is not installed (see the README's setup)")

USER, PASSWORD = "alice", "wonderland-Pa55"
ENV_VARS = ("MODELFS_REGISTRY_USER", "MODELFS_REGISTRY_PASSWORD", "MODELFS_REGISTRY_HOST", "DOCKER_CONFIG")
CREDS = {"MODELFS_REGISTRY_USER": USER, "MODELFS_REGISTRY_PASSWORD": PASSWORD}
OLLAMA_CONFIG = "application/vnd.docker.container.image.v1+json"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    d = tmp_path_factory.mktemp("basic")
    auth = {"htpasswd": {"realm": "modelfs-test", "path": str(htpasswd(d / "htpasswd", USER, PASSWORD))}}
    with running(d / "reg", auth) as reg:
        yield reg


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    ts = TokenServer(tmp_path_factory.mktemp("tokens"), {USER: PASSWORD})
    yield ts
    ts.close()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory, tokens: TokenServer) -> Iterator[Registry]:
    auth = {"token": {"realm": tokens.realm, "service": tokens.service, "issuer": tokens.issuer,
                      "rootcertbundle": str(tokens.cert_path)}}
    with running(tmp_path_factory.mktemp("token"), auth) as reg:
        yield reg


@pytest.fixture(autouse=True)
def no_host_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The machine's own registry credentials never take part: no variables, and a
    credentials file that does not exist unless a test writes it."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELFS_REGISTRY_AUTH_FILE", str(tmp_path / "docker" / "config.json"))
    monkeypatch.setenv("MODELFS_MAX_RETRIES", "1")
    monkeypatch.setenv("MODELFS_BACKOFF", "0/0")


@pytest.fixture
def model(tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Path]:
    """Weights and an mmproj, distinct per test (the registries are shared)."""
    seed = sum(request.node.name.encode()) % 10_000
    w = write_model(tmp_path / "tiny-Q4_K_M.gguf", tensor_bytes=64 << 10, seed=seed)
    p = write_mmproj(tmp_path / "mmproj-tiny-f16.gguf", seed=seed + 1)
    return {"weights": w, "mmproj": p}


def last_json(run: Any) -> dict[str, Any]:
    return json.loads(run.stdout.strip().splitlines()[-1])


def blob(store: Path, sha: str) -> Path:
    return store / "blobs" / "sha256" / sha[:2] / sha


def committed(store: Path) -> list[Path]:
    return [p for p in (store / "blobs").rglob("*") if p.is_file()]


def secrets_absent(where: list[Path], outputs: list[str], *secrets: str) -> None:
    """No secret in the catalog's files (WAL included) or in any output."""
    for path in where:
        for f in path.glob("catalog.db*"):
            data = f.read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"{s[:4]}… found in {f}"
    for text in outputs:
        for s in secrets:
            assert s not in text


# -- push, then pull ----------------------------------------------------------------------
def test_push_then_pull_into_a_second_store_gives_identical_blobs(cli: CLI, tmp_path: Path, registry: Registry,
                                                                  model: dict[str, Path]) -> None:
    w, p = model["weights"], model["mmproj"]
    cli.run("import", "tiny", str(w), "--mmproj", str(p))
    target = registry.ref("fleet/tiny:q4")
    pushed = cli.run("push", "tiny", target, "--json").json()
    assert pushed["blobs"] == 3 and pushed["blobs_skipped"] == 0
    assert pushed["bytes_uploaded"] > w.stat().st_size + p.stat().st_size  # and the config blob
    assert pushed["reference"] == target
    assert pushed["source"] == f"oci+http://{registry.netloc}/fleet/tiny@{pushed['digest']}"
    # The registry holds exactly the artifact modelfs laid out (Docker Model Runner's).
    manifest = httpx.get(f"{registry.base}/v2/fleet/tiny/manifests/q4",
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    assert manifest["config"]["mediaType"] == DMR_CONFIG
    assert [(la["mediaType"], la["digest"], la["annotations"]["org.opencontainers.image.title"])
            for la in manifest["layers"]] == [(DMR_GGUF, f"sha256:{sha_file(w)}", w.name),
                                              (DMR_MMPROJ, f"sha256:{sha_file(p)}", p.name)]
    again = cli.run("push", "tiny", target, "--json").json()
    assert (again["blobs_skipped"], again["bytes_uploaded"], again["digest"]) == (3, 0, pushed["digest"])

    other = CLI(tmp_path / "second")
    pulled = last_json(other.run("pull", pushed["source"], "--json"))
    assert pulled["name"] == "tiny" and pulled["signed"] is False
    assert {f["filename"]: (f["role"], f["sha256"]) for f in pulled["files"]} == {
        w.name: ("weights", sha_file(w)), p.name: ("mmproj", sha_file(p))}
    for f in pulled["files"]:
        assert blob(other.root, f["sha256"]).read_bytes() == blob(cli.root, f["sha256"]).read_bytes()
        assert f["url"] == f"oci+http://{registry.netloc}/fleet/tiny@sha256:{f['sha256']}"
    shown = other.run("show", "tiny", "--json").json()
    assert shown["source"] == pushed["source"] and shown["architecture"] == "llama"
    # By tag, into the same store: the same bytes, nothing new (named from repo and tag).
    by_tag = last_json(other.run("pull", target, "--json"))
    assert by_tag["name"] == "tiny-q4" and by_tag["new_bytes"] == 0
    assert sorted(f["sha256"] for f in by_tag["files"]) == sorted(f["sha256"] for f in pulled["files"])


def test_a_split_model_is_pulled_as_one_entry_and_pushed_back(cli: CLI, tmp_path: Path, registry: Registry) -> None:
    (tmp_path / "split").mkdir()
    shards = write_split(tmp_path / "split", "big-Q4_K_M", 3, seed=77)
    layers = [(DMR_GGUF, s.read_bytes(), {"org.opencontainers.image.title": s.name}) for s in reversed(shards)]
    push_artifact(registry.base, "fleet/big", "q4", (DMR_CONFIG, b"{}"), layers)
    pulled = last_json(cli.run("pull", registry.ref("fleet/big:q4"), "--json"))
    assert {f["filename"]: (f["role"], f["sha256"]) for f in pulled["files"]} == {
        shards[0].name: ("weights", sha_file(shards[0])), shards[1].name: ("shard", sha_file(shards[1])),
        shards[2].name: ("shard", sha_file(shards[2]))}
    # Without titles, the names are derived as one split set in layer order.
    push_artifact(registry.base, "fleet/big", "untitled", (DMR_CONFIG, b"{}"),
                  [(DMR_GGUF, s.read_bytes(), None) for s in shards])
    pulled = last_json(cli.run("pull", registry.ref("fleet/big:untitled"), "--json"))
    assert sorted((f["filename"], f["role"]) for f in pulled["files"]) == [
        ("model-00001-of-00003.gguf", "weights"), ("model-00002-of-00003.gguf", "shard"),
        ("model-00003-of-00003.gguf", "shard")]
    # And the entry goes back out as one artifact, with its shards.
    pushed = cli.run("push", "big-q4", registry.ref("fleet/big:again"), "--json").json()
    assert (pushed["blobs"], pushed["blobs_skipped"]) == (4, 3)  # the shards are in the registry already
    manifest = httpx.get(f"{registry.base}/v2/fleet/big/manifests/again",
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    assert [la["annotations"]["org.opencontainers.image.title"] for la in manifest["layers"]] == [
        s.name for s in shards]


# -- artifacts pushed by the test ---------------------------------------------------------
def test_pull_of_an_ollama_artifact_gives_an_entry_with_its_projector(cli: CLI, registry: Registry,
                                                                      model: dict[str, Path]) -> None:
    w, p = model["weights"].read_bytes(), model["mmproj"].read_bytes()
    config = json.dumps({"model_format": "gguf", "model_family": "llama", "file_type": "Q4_K_M"}).encode()
    digest = push_artifact(registry.base, "library/tiny", "7b", (OLLAMA_CONFIG, config), [
        (OLLAMA_MODEL, w, None), (OLLAMA_PROJECTOR, p, None),
        ("application/vnd.ollama.image.license", b"Apache-2.0", None),
        ("application/vnd.ollama.image.template", b"{{ .Prompt }}", None),
        ("application/vnd.ollama.image.params", b'{"temperature": 0.7}', None),
    ], manifest_type="application/vnd.docker.distribution.manifest.v2+json")
    pulled = last_json(cli.run("pull", registry.ref("library/tiny:7b"), "--json"))
    assert pulled["name"] == "tiny-7b"
    assert {f["filename"]: (f["role"], f["sha256"], f["size"]) for f in pulled["files"]} == {
        "model.gguf": ("weights", sha256_hex(w), len(w)), "mmproj.gguf": ("mmproj", sha256_hex(p), len(p))}
    shown = cli.run("show", "tiny-7b", "--json").json()
    assert shown["source"] == f"oci+http://{registry.netloc}/library/tiny@{digest}"
    assert shown["source_url"] == f"oci+http://{registry.netloc}/library/tiny:7b"


def test_a_blob_the_registry_serves_corrupted_is_refused_with_nothing_visible(
        cli: CLI, registry: Registry, model: dict[str, Path]) -> None:
    w = model["weights"].read_bytes()
    push_artifact(registry.base, "fleet/corrupt", "v1", (DMR_CONFIG, b'{"config":{"format":"gguf"}}'),
                  [(DMR_GGUF, w, {"org.opencontainers.image.title": "c.gguf"})])
    data = registry.blob_data(sha256_hex(w))
    bad = bytearray(data.read_bytes())
    bad[len(bad) // 2] ^= 0xFF  # the same size, other bytes: only the digest can tell
    data.write_bytes(bytes(bad))
    r = cli.run("pull", registry.ref("fleet/corrupt:v1"), check=False)
    assert r.returncode == 5, r.stderr  # IntegrityError
    assert "SHA-256" in r.stderr or "sha256" in r.stderr.lower()
    assert committed(cli.root) == []
    assert cli.run("list", "--json").json() == []


def test_unknown_artifact_types_are_refused_by_name(cli: CLI, registry: Registry, model: dict[str, Path]) -> None:
    image = "application/vnd.oci.image.layer.v1.tar+gzip"
    push_artifact(registry.base, "fleet/image", "v1", ("application/vnd.oci.image.config.v1+json", b"{}"),
                  [(image, b"\x1f\x8b not really a tarball", None)])
    r = cli.run("pull", registry.ref("fleet/image:v1"), check=False)
    assert r.returncode == 2 and "not a GGUF model artifact" in r.stderr and image in r.stderr, r.stderr

    safetensors = "application/vnd.docker.ai.safetensors"
    push_artifact(registry.base, "fleet/mixed", "v1", (DMR_CONFIG, b"{}"),
                  [(DMR_GGUF, model["weights"].read_bytes(), None), (safetensors, b"{}", None)])
    r = cli.run("pull", registry.ref("fleet/mixed:v1"), check=False)
    assert r.returncode == 2 and safetensors in r.stderr, r.stderr

    # An index (a multi-platform list) names its manifests instead of guessing one.
    manifest = push_artifact(registry.base, "fleet/multi", "one", (DMR_CONFIG, b"{}"),
                             [(DMR_GGUF, model["weights"].read_bytes(), None)])
    size = len(httpx.get(f"{registry.base}/v2/fleet/multi/manifests/one",
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).content)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest,
                            "size": size, "platform": {"architecture": "amd64", "os": "linux"}}]}
    put = httpx.put(f"{registry.base}/v2/fleet/multi/manifests/multi", content=json.dumps(index).encode(),
                    headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
    assert put.status_code == 201, put.text
    r = cli.run("pull", registry.ref("fleet/multi:multi"), check=False)
    assert r.returncode == 2 and "index" in r.stderr and manifest in r.stderr, r.stderr
    assert cli.run("list", "--json").json() == [] and committed(cli.root) == []


def test_oci_is_https_and_references_carry_no_credentials(cli: CLI, registry: Registry) -> None:
    r = cli.run("pull", f"oci://{registry.netloc}/fleet/tiny:q4", check=False)  # a plain-http registry
    assert r.returncode == 9 and "does not answer HTTPS" in r.stderr and "oci+http://" in r.stderr, r.stderr
    r = cli.run("pull", f"oci://{USER}:{PASSWORD}@{registry.netloc}/fleet/tiny:q4", check=False)
    assert r.returncode == 2 and "credentials" in r.stderr and PASSWORD not in r.stderr + r.stdout
    assert parse_reference("oci://Reg.example:5000/a/b").tag == "latest"
    assert parse_reference("oci+http://h/a/b@sha256:" + "a" * 64).base == "http://h"
    pinned = parse_reference("oci://h:5000/a/b:t@sha256:" + "a" * 64)
    assert (pinned.repo, pinned.tag, pinned.manifest_url()) == ("a/b", None, "https://h:5000/v2/a/b/manifests/sha256:"
                                                                + "a" * 64)
    for bad in ("oci://h/UPPER:1", "oci://h/a:b@c", "oci://h", "docker://h/a:1", "oci://h/a:" + "x" * 200,
                "oci://ho st/a:1", "oci://h/a/../b:1"):
        r = cli.run("pull", bad, "--no-daemon", check=False)
        assert r.returncode == 2, (bad, r.stderr)
    assert cli.run("list", "--json").json() == []


# -- auth ---------------------------------------------------------------------------------
def write_docker_config(tmp_path: Path, netloc: str, mode: int) -> Path:
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    path.write_text(json.dumps({"auths": {netloc: {"auth": auth}}}))
    path.chmod(mode)
    return path


def test_basic_auth_from_the_environment_and_a_0600_credentials_file(
        cli: CLI, tmp_path: Path, basic_registry: Registry, model: dict[str, Path]) -> None:
    cli.run("import", "tiny", str(model["weights"]), "--mmproj", str(model["mmproj"]))
    target = basic_registry.ref("fleet/tiny:basic")
    outputs = []
    r = cli.run("push", "tiny", target, check=False)
    assert r.returncode == 9 and "MODELFS_REGISTRY_USER" in r.stderr, r.stderr
    r = cli.run("push", "tiny", target, check=False, env={**CREDS, "MODELFS_REGISTRY_PASSWORD": "wrong"})
    assert r.returncode == 9 and "refused these credentials" in r.stderr, r.stderr
    outputs += [r.stdout, r.stderr]
    r = cli.run("push", "tiny", target, "--json", env=CREDS)
    outputs += [r.stdout, r.stderr]
    # Credentials for another registry are not sent to this one.
    r = cli.run("push", "tiny", target, check=False, env={**CREDS, "MODELFS_REGISTRY_HOST": "elsewhere:5000"})
    assert r.returncode == 9, r.stderr

    other = CLI(tmp_path / "second")
    config = write_docker_config(tmp_path, basic_registry.netloc, 0o644)
    r = other.run("pull", target, check=False)
    assert r.returncode == 2 and "chmod 600" in r.stderr, r.stderr
    config.chmod(0o600)
    r = other.run("pull", target, "--json")
    outputs += [r.stdout, r.stderr]
    assert {f["filename"] for f in last_json(r)["files"]} == {model["weights"].name, model["mmproj"].name}
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    secrets_absent([cli.root, other.root], outputs, PASSWORD, basic)


def test_bearer_tokens_from_the_registrys_realm(cli: CLI, tmp_path: Path, token_registry: Registry,
                                                tokens: TokenServer, model: dict[str, Path]) -> None:
    cli.run("import", "tiny", str(model["weights"]), "--mmproj", str(model["mmproj"]))
    target = token_registry.ref("fleet/tiny:bearer")
    outputs = []
    r = cli.run("push", "tiny", target, check=False)
    assert r.returncode == 9 and "token server refused an anonymous token" in r.stderr, r.stderr
    r = cli.run("push", "tiny", target, check=False, env={**CREDS, "MODELFS_REGISTRY_PASSWORD": "wrong"})
    assert r.returncode == 9 and "token server refused these credentials" in r.stderr, r.stderr
    tokens.requests.clear()
    r = cli.run("push", "tiny", target, "--json", env=CREDS)
    outputs += [r.stdout, r.stderr]
    pushed = r.json()
    assert [(q["granted"], q["query"]["scope"], q["query"]["service"]) for q in tokens.requests] == [
        (True, ["repository:fleet/tiny:pull,push"], [tokens.service])]

    other = CLI(tmp_path / "second")
    tokens.requests.clear()
    r = other.run("pull", pushed["source"], "--json", env=CREDS)
    outputs += [r.stdout, r.stderr]
    assert {f["sha256"] for f in last_json(r)["files"]} == {sha_file(model["weights"]), sha_file(model["mmproj"])}
    assert [q["query"]["scope"] for q in tokens.requests] == [["repository:fleet/tiny:pull"]]
    # Without the token, the registry itself refuses: the tokens were what let us in.
    assert httpx.get(f"{token_registry.base}/v2/fleet/tiny/manifests/bearer").status_code == 401
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    secrets_absent([cli.root, other.root], outputs, PASSWORD, basic, "eyJ")


# -- signed packs -------------------------------------------------------------------------
def upload_blob(reg: Registry, repo: str, data: bytes, auth: tuple[str, str] | None = None) -> str:
    digest = f"sha256:{sha256_hex(data)}"
    with httpx.Client(base_url=reg.base, auth=auth, timeout=10) as c:
        r = c.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, r.text
        r = c.put(with_digest(r.headers["location"], digest), content=data)
        assert r.status_code == 201, r.text
    return digest


def test_a_signed_pack_whose_file_url_is_a_registry_blob(cli: CLI, tmp_path: Path, origin: FaultServer,  # noqa: F811
                                                          basic_registry: Registry) -> None:
    pub = Publisher(origin)
    cli.run("keys", "add", "k1", pub.pub("k1"))
    data = b"GGUF" + os.urandom(200_000)
    digest = upload_blob(basic_registry, "packs/demo", data, (USER, PASSWORD))
    art = {"filename": "demo-Q4_K_M.gguf", "url": f"oci+http://{basic_registry.netloc}/packs/demo@{digest}",
           "sha256": sha256_hex(data), "size": len(data), "role": "weights"}
    url = pub.serve("demo.json", pub.envelope(pub.payload(1, [art])))

    r = cli.run("pull", url, "--no-daemon", check=False)
    assert r.returncode == 9 and "MODELFS_REGISTRY_USER" in r.stderr, r.stderr
    # The pack names the registry, not the command: the environment's credentials go to it
    # only when MODELFS_REGISTRY_HOST names it.
    creds = {**CREDS, "MODELFS_REGISTRY_HOST": basic_registry.netloc}
    r = cli.run("pull", url, "--no-daemon", "--json", env=creds)
    result = last_json(r)
    assert result["signed"] is True and result["name"] == "demo"
    assert blob(cli.root, sha256_hex(data)).read_bytes() == data
    # The trust rules hold as before: a URL naming another blob than the signed sha256 is refused
    # before any byte moves.
    other = {**art, "url": f"oci+http://{basic_registry.netloc}/packs/demo@sha256:{'0' * 64}"}
    bad = pub.serve("bad.json", pub.envelope(pub.payload(2, [other])))
    r = cli.run("pull", bad, "--no-daemon", check=False, env=creds)
    assert r.returncode == 6 and "registry blob" in r.stderr, r.stderr
    secrets_absent([cli.root], [r.stdout, r.stderr], PASSWORD)


# -- the Downloader's side: a dehydrated file's blob, and whose credentials ----------------
def test_a_recorded_registry_blob_is_fetched_again_with_the_owners_credentials_only(
        tmp_path: Path, basic_registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the mount's lazy open does for a file whose URL is a registry blob
    (``Downloader.ensure``): the registry's auth from the owner's credentials, and none
    of them for a Downloader bound by an address rule (a pull for an app)."""
    import trio

    from modelfs_store.catalog import FileRecord
    from modelfs_store.core import Store
    from modelfs_store.download import Downloader
    from modelfs_store.errors import FetchError
    from modelfs_store.http import AddressRule

    data = b"GGUF" + os.urandom(100_000)
    digest = upload_blob(basic_registry, "lazy/blob", data, (USER, PASSWORD))
    rec = FileRecord("x.gguf", "weights", len(data), digest[7:],
                     url=f"oci+http://{basic_registry.netloc}/lazy/blob@{digest}")
    for var, value in {**CREDS, "MODELFS_REGISTRY_HOST": basic_registry.netloc}.items():
        monkeypatch.setenv(var, value)
    store = Store.open(tmp_path / "store")
    try:
        async def for_an_app() -> None:
            async with Downloader(store.blobs, max_retries=0, addresses=AddressRule.of(["127.0.0.0/8"])) as dl:
                await dl.ensure(rec)

        with pytest.raises(FetchError, match="asks for a user name and password"):
            trio.run(for_an_app)
        assert not store.blobs.has(rec.sha256)

        async def for_the_owner() -> None:
            async with Downloader(store.blobs, max_retries=0) as dl:
                await dl.ensure(rec)

        trio.run(for_the_owner)
        assert store.blobs.path(rec.sha256).read_bytes() == data
    finally:
        store.close()


def test_a_blob_redirected_to_storage_carries_no_credentials(tmp_path: Path, origin: FaultServer,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Registries often answer a blob GET with a redirect to object storage: the
    registry gets the credentials, the storage origin (another port) gets none."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import trio

    from modelfs_store.core import Store
    from modelfs_store.download import Downloader

    data = b"GGUF" + os.urandom(50_000)
    sha = sha256_hex(data)
    origin.add("/bucket/blob", data)
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    seen: list[str | None] = []

    class Front(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != basic:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="front"')
            else:
                self.send_response(307)
                self.send_header("Location", origin.url("/bucket/blob"))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    front = ThreadingHTTPServer(("127.0.0.1", 0), Front)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    for var, value in {**CREDS, "MODELFS_REGISTRY_HOST": f"127.0.0.1:{front.server_address[1]}"}.items():
        monkeypatch.setenv(var, value)
    store = Store.open(tmp_path / "store")
    try:
        async def fetch() -> None:
            async with Downloader(store.blobs, max_retries=0) as dl:
                await dl.fetch(f"oci+http://127.0.0.1:{front.server_address[1]}/r/x@sha256:{sha}", sha256=sha,
                               size=len(data))

        trio.run(fetch)
        assert store.blobs.path(sha).read_bytes() == data
    finally:
        store.close()
        front.shutdown()
        front.server_close()
    assert basic in seen  # the registry was asked with the credentials
    storage = origin.requests("/bucket/blob")
    assert storage and all("authorization" not in r.headers for r in storage)
