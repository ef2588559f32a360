"""Ollama models fetched once on the controller, in Ollama's own store layout, for shipping to hosts.

Ollama's store is content-addressed: `manifests/<registry>/<namespace>/<model>/<tag>` (a registry v2 image manifest
whose config and layers are the model's parts) and `blobs/sha256-<hex>`. A host whose Ollama volume holds those
files has the model, with no `ollama pull` and no route to the internet. So the controller fills a cache laid out
exactly like a store, from one of two sources:

- a registry speaking the v2 API (Ollama's own, a mirror, or a site registry such as Debian's `docker-registry`),
  over plain HTTP(S): every blob checked against the manifest's sha256 and size, downloads resumed with `Range`
  after a dropped connection and retried with backoff; the proxy comes from the usual environment variables;
- a local Ollama store the operator points at (a machine that already pulled the models): files are copied and
  checked the same way.

The role then ships the manifest and blobs a plan names (rsync, resumable) and checks the digests on the host
before the switch. The cache keeps the model's name path (`registry.ollama.ai/library/...`) whatever it was
fetched from, so the host's Ollama finds `qwen2.5:3b` under the name the config uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx

DEFAULT_REGISTRY = "registry.ollama.ai"
MANIFEST_TYPES = ", ".join(["application/vnd.docker.distribution.manifest.v2+json",
                            "application/vnd.oci.image.manifest.v1+json"])
_CHUNK = 1 << 20


class StoreError(Exception):
    """A model that could not be fetched or verified; the message names the model and what went wrong."""


@dataclass(frozen=True)
class ModelRef:
    """A model name as Ollama parses it: [registry/][namespace/]model[:tag]."""

    registry: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, name: str) -> "ModelRef":
        base, _, tag = name.rpartition(":") if ":" in name and "/" not in name.rpartition(":")[2] else (name, "", "")
        parts = base.split("/")
        if not all(parts) or len(parts) > 3 or any(p in (".", "..") for p in parts):
            raise StoreError(f"{name!r} is not an Ollama model name ([registry/][namespace/]model[:tag])")
        registry = parts[0] if len(parts) == 3 else DEFAULT_REGISTRY
        namespace = parts[-2] if len(parts) >= 2 else "library"
        return cls(registry, namespace, parts[-1], tag or "latest")

    @property
    def manifest_path(self) -> str:
        """Where Ollama keeps this model's manifest, relative to its models directory."""
        return f"manifests/{self.registry}/{self.namespace}/{self.model}/{self.tag}"

    @property
    def repository(self) -> str:
        return f"{self.namespace}/{self.model}"


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int

    @property
    def path(self) -> str:
        return "blobs/" + self.digest.replace(":", "-")


@dataclass
class Fetched:
    """One model in the cache: its manifest path, its blobs, and how many bytes this fetch downloaded."""

    name: str
    manifest: str
    blobs: list[Blob]
    downloaded: int = 0
    manifest_bytes: bytes = b""

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blobs)

    @property
    def files(self) -> list[dict[str, Any]]:
        """Every file the model is on a host's store, as the role's probe checks them: {path, size, sha256}.

        The manifest comes last: the role ships in this order, so a host never has a manifest without its blobs."""
        blobs = [{"path": b.path, "size": b.size, "sha256": b.digest.partition(":")[2]} for b in self.blobs]
        return blobs + [{"path": self.manifest, "size": len(self.manifest_bytes),
                         "sha256": hashlib.sha256(self.manifest_bytes).hexdigest()}]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "manifest": self.manifest, "bytes": self.total_bytes,
                "downloaded": self.downloaded,
                "blobs": [{"digest": b.digest, "size": b.size, "path": b.path} for b in self.blobs],
                "files": self.files}


@dataclass
class Retry:
    """Attempts per transfer and the first delay (doubled each time): one pair for every download."""

    attempts: int = 5
    delay: float = 2.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def run(self, what: str, action: Callable[[], Any]) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except (httpx.TransportError, _Incomplete, _Busy) as exc:
                if attempt == self.attempts:
                    raise StoreError(f"{what}: gave up after {attempt} attempts ({exc})") from None
                self.sleep(self.delay * 2 ** (attempt - 1))
        raise AssertionError("unreachable")


class _Incomplete(Exception):
    """A blob download that ended before its size (the connection dropped): resumed on the next attempt."""


class _Busy(Exception):
    """The registry answered 429 or 5xx: a passing state, tried again like a dropped link."""


def _check_busy(status: int, what: str) -> None:
    if status == 429 or status >= 500:
        raise _Busy(f"{what}: HTTP {status}")


def blobs_of(manifest: dict[str, Any], name: str) -> list[Blob]:
    """The config and layers a manifest lists, each a sha256 digest with a size."""
    try:
        parts = [manifest["config"], *manifest["layers"]]
        blobs = [Blob(str(p["digest"]), int(p["size"])) for p in parts]
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"{name}: the manifest lists no config and layers") from None
    for blob in blobs:
        algo, _, hexdigest = blob.digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
            raise StoreError(f"{name}: unsupported blob digest {blob.digest!r}")
    return blobs


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


class Stamps:
    """Blobs of a cache already hashed, by digest, with the size and mtime they had then (`.vilms-verified.json`).

    A rollout runs the fetch once per host against the same cache: without these, each run hashes every cached blob
    again (seconds per GB, times the fleet). A blob whose size or mtime changed since is hashed again."""

    def __init__(self, cache: Path):
        self.path = cache / ".vilms-verified.json"
        try:
            self.seen: dict[str, list[int]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.seen = {}

    def verified(self, path: Path, blob: Blob) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_size != blob.size:
            return False
        if self.seen.get(blob.digest) == [st.st_size, st.st_mtime_ns]:
            return True
        if sha256_file(path) != blob.digest:
            return False
        self.seen[blob.digest] = [st.st_size, st.st_mtime_ns]
        return True

    def save(self) -> None:
        if self.seen:
            _write_atomic(self.path, json.dumps(self.seen).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RegistrySource:
    """Manifests and blobs from a registry's v2 API: `url` (a mirror or a site registry, e.g. http://host:5000) for
    every model, or, with no url, each model's own registry (https://registry.ollama.ai for `qwen2.5:3b`,
    https://hf.co for `hf.co/user/repo:tag`), as `ollama pull` would reach it."""

    def __init__(self, url: str | None = None, *, retry: Retry | None = None, timeout: float = 60.0,
                 client: httpx.Client | None = None):
        self.url = url.rstrip("/") if url else None
        self.retry = retry or Retry()
        self.client = client or httpx.Client(timeout=timeout, follow_redirects=True)  # proxy: *_PROXY variables

    def base(self, ref: ModelRef) -> str:
        return self.url or f"https://{ref.registry}"

    def manifest(self, ref: ModelRef, name: str) -> bytes:
        def get() -> bytes:
            reply = self.client.get(f"{self.base(ref)}/v2/{ref.repository}/manifests/{ref.tag}",
                                    headers={"Accept": MANIFEST_TYPES})
            _check_busy(reply.status_code, "manifest")
            if reply.status_code == 404:
                raise StoreError(f"{name}: not found at {self.base(ref)}")
            if reply.status_code != 200:
                raise StoreError(f"{name}: the registry answered HTTP {reply.status_code} for the manifest")
            return reply.content

        return self.retry.run(f"{name}: manifest", get)

    def blob(self, ref: ModelRef, blob: Blob, target: Path) -> int:
        """Download `blob` to `target`, resuming a `.partial` file; returns the bytes transferred."""
        partial = target.with_name(target.name + ".partial")
        moved = 0

        def attempt() -> None:
            nonlocal moved
            have = partial.stat().st_size if partial.exists() else 0
            if have > blob.size:
                partial.unlink()
                have = 0
            if have == blob.size:  # a run that died between the last byte and the rename: verified by the caller
                return
            headers = {"Range": f"bytes={have}-"} if have else {}
            with self.client.stream("GET", f"{self.base(ref)}/v2/{ref.repository}/blobs/{blob.digest}",
                                    headers=headers) as reply:
                _check_busy(reply.status_code, f"blob {blob.digest}")
                if reply.status_code == 200 and have:  # the server ignored Range: start over
                    partial.unlink()
                elif reply.status_code not in (200, 206):
                    raise StoreError(f"blob {blob.digest}: HTTP {reply.status_code}")
                with partial.open("ab") as fh:
                    for chunk in reply.iter_bytes(_CHUNK):
                        fh.write(chunk)
                        moved += len(chunk)
            if partial.stat().st_size < blob.size:
                raise _Incomplete(f"{partial.stat().st_size} of {blob.size} bytes")

        target.parent.mkdir(parents=True, exist_ok=True)
        self.retry.run(f"blob {blob.digest}", attempt)
        os.replace(partial, target)
        return moved


class StoreSource:
    """Manifests and blobs from a local Ollama models directory (e.g. ~/.ollama/models of a machine that pulled)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def manifest(self, ref: ModelRef, name: str) -> bytes:
        path = self.root / ref.manifest_path
        if not path.is_file():
            raise StoreError(f"{name}: no manifest at {path}")
        return path.read_bytes()

    def blob(self, ref: ModelRef, blob: Blob, target: Path) -> int:
        source = self.root / blob.path
        if not source.is_file():
            raise StoreError(f"blob {blob.digest}: missing from {self.root}")
        tmp = target.with_name(target.name + ".partial")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return blob.size


def fetch_model(name: str, cache: str | os.PathLike[str], source: RegistrySource | StoreSource,
                check: bool = False, stamps: Stamps | None = None) -> Fetched:
    """Bring one model into `cache` (a store layout) and verify every blob; a blob already there is not fetched.

    `check` (a rollout's --check): read the manifest only, so the sizes are known; no blob, nothing written."""
    ref = ModelRef.parse(name)
    root = Path(cache)
    stamps = stamps if stamps is not None else Stamps(root)
    raw = source.manifest(ref, name)
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise StoreError(f"{name}: the manifest is not JSON") from None
    blobs = blobs_of(manifest, name)
    fetched = Fetched(name, ref.manifest_path, blobs, manifest_bytes=raw)
    if check:
        return fetched
    for blob in blobs:
        target = root / blob.path
        if stamps.verified(target, blob):
            continue
        fetched.downloaded += source.blob(ref, blob, target)
        if not stamps.verified(target, blob):
            target.unlink(missing_ok=True)  # never leave a wrong file under a digest's name
            raise StoreError(f"{name}: blob {blob.digest} does not match its digest or size ({blob.size} bytes)")
    _write_atomic(root / ref.manifest_path, raw)  # last: a manifest in the cache means every blob is there
    return fetched


def fetch_models(names: Iterable[str], cache: str | os.PathLike[str],
                 source: RegistrySource | StoreSource, check: bool = False) -> list[Fetched]:
    stamps = Stamps(Path(cache))
    try:
        return [fetch_model(name, cache, source, check, stamps) for name in dict.fromkeys(names)]
    finally:
        if not check:
            stamps.save()


def plan_models(plan: dict[str, Any]) -> list[str]:
    """Every Ollama model a render's plan.json names (its `ollama_pulls`), in order, once each."""
    return list(dict.fromkeys(m for pull in plan.get("ollama_pulls") or [] for m in pull.get("models") or []))
