"""Ollama models fetched once on the controller (`vilms ollama fetch`), from a real registry: Debian's
`docker-registry` (distribution 2.8) on loopback, holding models pushed the way `ollama push` lays them out
(a v2 manifest whose config and layers are the model's blobs). A TCP relay in front of it drops the link
mid-blob to prove the download resumes instead of starting over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from typing import Iterator

import httpx
import pytest

from devkit import ollama_models
from tests.deploy.test_render import SEED, render_dir
from tests.support import docker_registry
from vilms.deploy import ollama_store as store

REGISTRY = shutil.which("docker-registry")
pytestmark = pytest.mark.skipif(REGISTRY is None, reason="Debian's docker-registry (make system)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[str]:
    with docker_registry(tmp_path_factory.mktemp("registry")) as url:
        yield url


def push_model(url: str, repository: str, tag: str, layers: list[bytes]) -> dict:
    """Push blobs and a manifest the way `ollama push` does (config + model layers); returns the manifest."""
    config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
    return ollama_models.push_parts(url, repository, tag, [(config, "application/vnd.docker.container.image.v1+json")]
                                    + [(layer, "application/vnd.ollama.image.model") for layer in layers])


class DroppingRelay:
    """A loopback TCP relay to the registry that cuts the first `cuts` replies longer than `after` bytes."""

    def __init__(self, upstream: str, after: int, cuts: int):
        host, port = httpx.URL(upstream).host, httpx.URL(upstream).port
        self.upstream, self.after, self.cuts, self.dropped = (host, port), after, cuts, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
        self._pipe(upstream, client, self.after)

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and self.dropped < self.cuts and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    self.dropped += 1
                    break  # the link drops mid-reply
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.sock.close()


def no_wait() -> store.Retry:
    return store.Retry(attempts=4, delay=0.0, sleep=lambda _: None)


def test_fetch_from_a_registry_lays_out_ollamas_store_verified_and_a_rerun_downloads_nothing(registry, tmp_path):
    layer = os.urandom(300_000)
    manifest = push_model(registry, "library/tiny", "1", [layer])
    cache = tmp_path / "cache"
    fetched = store.fetch_model("tiny:1", cache, store.RegistrySource(registry, retry=no_wait()))
    assert (cache / "manifests/registry.ollama.ai/library/tiny/1").read_bytes() == json.dumps(manifest).encode()
    blob = cache / ("blobs/" + manifest["layers"][0]["digest"].replace(":", "-"))
    assert blob.read_bytes() == layer and fetched.total_bytes == fetched.downloaded > len(layer)
    again = store.fetch_model("tiny:1", cache, store.RegistrySource(registry, retry=no_wait()))
    assert again.downloaded == 0  # every blob already verified in the cache


def test_a_link_that_drops_mid_blob_is_resumed_not_restarted(registry, tmp_path):
    layer = os.urandom(3_000_000)
    push_model(registry, "library/big", "q4", [layer])
    relay = DroppingRelay(registry, after=1_000_000, cuts=2)  # two drops: the blob arrives in three pieces
    try:
        fetched = store.fetch_model("big:q4", tmp_path / "c", store.RegistrySource(relay.url, retry=no_wait()))
    finally:
        relay.close()
    assert relay.dropped == 2
    assert fetched.downloaded == fetched.total_bytes  # each byte once: resumed with Range, not started over
    assert store.sha256_file(tmp_path / "c" / fetched.blobs[-1].path) == fetched.blobs[-1].digest
    assert not list((tmp_path / "c" / "blobs").glob("*.partial"))


def test_a_registry_that_stays_down_fails_naming_the_model_and_leaves_no_manifest(tmp_path):
    gone = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(store.StoreError, match=r"qwen2.5:3b: manifest: gave up after 4 attempts"):
        store.fetch_model("qwen2.5:3b", tmp_path / "c", store.RegistrySource(gone, retry=no_wait()))
    assert not (tmp_path / "c" / "manifests").exists()


def test_a_local_store_with_a_tampered_blob_is_refused(tmp_path, registry):
    layer = os.urandom(50_000)
    push_model(registry, "library/local", "1", [layer])
    source = tmp_path / "ollama-models"
    store.fetch_model("local:1", source, store.RegistrySource(registry, retry=no_wait()))
    copied = store.fetch_model("local:1", tmp_path / "c1", store.StoreSource(source))
    assert copied.downloaded == copied.total_bytes
    blob = source / copied.blobs[-1].path
    data = blob.read_bytes()
    blob.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, other bytes (a flip, never the same byte)
    with pytest.raises(store.StoreError, match="does not match its digest"):
        store.fetch_model("local:1", tmp_path / "c2", store.StoreSource(source))
    assert not (tmp_path / "c2" / copied.blobs[-1].path).exists()
    assert not (tmp_path / "c2" / copied.manifest).exists()


def test_cli_fetches_every_model_a_jetson_plan_names(registry, tmp_path):
    out, result = render_dir(tmp_path, SEED, "--gpu", "no")
    assert result.returncode == 0, result.stderr
    names = store.plan_models(json.loads((out / "plan.json").read_text()))
    assert names == ["qwen2.5:3b", "qwen2.5vl:3b"]
    for name in names:
        ref = store.ModelRef.parse(name)
        push_model(registry, ref.repository, ref.tag, [os.urandom(20_000)])
    run = subprocess.run([sys.executable, "-m", "vilms", "ollama", "fetch", "--plan", str(out / "plan.json"),
                          "--cache", str(tmp_path / "cache"), "--registry", registry, "--retry-delay", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [m["name"] for m in report["models"]] == names
    unique = {b["digest"]: b["size"] for m in report["models"] for b in m["blobs"]}
    assert report["downloaded"] == sum(unique.values()) < report["bytes"]  # the shared config blob came once
    for model in report["models"]:
        assert (tmp_path / "cache" / model["manifest"]).is_file()


def test_a_run_that_died_after_the_last_byte_completes_without_downloading(registry, tmp_path):
    layer = os.urandom(40_000)
    manifest = push_model(registry, "library/done", "1", [layer])
    blob = store.Blob(manifest["layers"][0]["digest"], len(layer))
    partial = tmp_path / "c" / (blob.path + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(layer)  # every byte arrived, the rename did not: the registry would answer Range with 416
    fetched = store.fetch_model("done:1", tmp_path / "c", store.RegistrySource(registry, retry=no_wait()))
    assert (tmp_path / "c" / blob.path).read_bytes() == layer and not partial.exists()
    assert fetched.downloaded == manifest["config"]["size"]  # only the config blob came over the wire


def test_check_reads_the_manifest_only_and_writes_nothing(registry, tmp_path):
    push_model(registry, "library/checked", "1", [os.urandom(30_000)])
    run = subprocess.run([sys.executable, "-m", "vilms", "ollama", "fetch", "--model", "checked:1", "--check",
                          "--cache", str(tmp_path / "cache"), "--registry", registry, "--retry-delay", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    model = json.loads(run.stdout)["models"][0]
    assert model["bytes"] > 30_000 and json.loads(run.stdout)["downloaded"] == 0
    assert [f["path"] for f in model["files"]][-1] == "manifests/registry.ollama.ai/library/checked/1"  # last
    assert all(len(f["sha256"]) == 64 for f in model["files"])
    assert not (tmp_path / "cache").exists()  # a --check run leaves no trace on the controller


def test_a_busy_registry_is_tried_again_and_each_model_goes_to_its_own_registry(registry, tmp_path):
    """A registry (or its CDN) answering 503 or 429 is in a passing state: tried again like a dropped link.
    A front answers each path once with 503 (then 429), then redirects to the real registry."""
    from starlette.applications import Starlette
    from starlette.responses import RedirectResponse, Response
    from starlette.routing import Route

    from tests.support import ThreadedServer

    seen: dict[str, int] = {}

    async def front(request):
        path = request.url.path
        seen[path] = seen.get(path, 0) + 1
        if seen[path] <= 2:
            return Response(status_code=503 if seen[path] == 1 else 429)
        return RedirectResponse(f"{registry}{path}", status_code=307)

    push_model(registry, "library/busy", "1", [os.urandom(20_000)])
    with ThreadedServer(Starlette(routes=[Route("/{path:path}", front)])) as server:
        fetched = store.fetch_model("busy:1", tmp_path / "c", store.RegistrySource(server.url, retry=no_wait()))
    assert fetched.downloaded == fetched.total_bytes and all(n == 3 for n in seen.values()) and len(seen) == 3
    default = store.RegistrySource()
    assert default.base(store.ModelRef.parse("qwen2.5:3b")) == "https://registry.ollama.ai"
    assert default.base(store.ModelRef.parse("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M")) == "https://hf.co"


def test_a_blob_changed_in_the_cache_after_it_was_stamped_is_noticed_and_fetched_again(registry, tmp_path):
    """Every host of a rollout runs the fetch against one cache, so a blob hashed once is trusted while its size and
    mtime stay (`.vilms-verified.json`); one that changed since is hashed again, and a corrupted one fetched again."""
    push_model(registry, "library/stamped", "1", [os.urandom(40_000)])
    source = store.RegistrySource(registry, retry=no_wait())
    first = store.fetch_models(["stamped:1"], tmp_path / "c", source)[0]
    assert first.blobs[-1].digest in json.loads((tmp_path / "c" / ".vilms-verified.json").read_text())
    assert store.fetch_models(["stamped:1"], tmp_path / "c", source)[0].downloaded == 0
    layer = tmp_path / "c" / first.blobs[-1].path
    data = layer.read_bytes()
    layer.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, new mtime, other bytes
    again = store.fetch_models(["stamped:1"], tmp_path / "c", source)[0]
    assert again.downloaded == first.blobs[-1].size  # noticed, fetched again
    assert store.sha256_file(layer) == first.blobs[-1].digest
