"""Stand-in Ollama models for the rig: the real store layout and registry protocol, tiny contents.

Ollama's registry cannot be reached here, so the rig makes models shaped like Ollama's own (a v2 manifest whose
config and `application/vnd.ollama.image.*` layers are sha256 blobs) either as a local store on the controller
(`write_store`, what `vilms_stack_ollama_local_store` points at) or pushed to a real registry (`push`, Debian's
`docker-registry`), which is what `vilms ollama fetch` reads in both cases. The model layer is the tiny offline GGUF
when one is given: the stand-in engine does not load it, but every byte of it is shipped and verified.

    python -m devkit.ollama_models DIR [--gguf tiny.gguf] NAME...
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import httpx

from vilms.deploy.ollama_store import ModelRef

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def parts_of(name: str, model: bytes) -> list[tuple[bytes, str]]:
    """(data, mediaType) of a model's config and layers: the model weights and a chat template, as Ollama has."""
    config = json.dumps({"model_format": "gguf", "model_family": "llama", "name": name}).encode()
    return [(config, "application/vnd.docker.container.image.v1+json"), (model, "application/vnd.ollama.image.model"),
            (b"{{ .Prompt }}", "application/vnd.ollama.image.template")]


def _manifest(parts: list[tuple[bytes, str]]) -> dict:
    entries = [{"mediaType": media, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}
               for data, media in parts]
    return {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": entries[0], "layers": entries[1:]}


def write_store(root: Path, names: list[str], model: bytes) -> None:
    """A local Ollama models directory (manifests/, blobs/) holding `names`."""
    for name in names:
        parts = parts_of(name, model)
        manifest = _manifest(parts)
        for (data, _), entry in zip(parts, [manifest["config"], *manifest["layers"]]):
            blob = root / "blobs" / entry["digest"].replace(":", "-")
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                blob.write_bytes(data)
        path = root / ModelRef.parse(name).manifest_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest))


def push(url: str, name: str, model: bytes) -> dict:
    """Push a model to a registry's v2 API the way `ollama push` does (blobs, then the manifest); returns it."""
    ref = ModelRef.parse(name)
    return push_parts(url, ref.repository, ref.tag, parts_of(name, model))


def push_parts(url: str, repository: str, tag: str, parts: list[tuple[bytes, str]]) -> dict:
    """Push (data, mediaType) parts, the first being the config, then their manifest; returns the manifest."""
    manifest = _manifest(parts)
    for (data, _), entry in zip(parts, [manifest["config"], *manifest["layers"]]):
        start = httpx.post(f"{url}/v2/{repository}/blobs/uploads/")
        start.raise_for_status()
        location = httpx.URL(url).join(start.headers["Location"])
        httpx.put(location.copy_merge_params({"digest": entry["digest"]}), content=data,
                  headers={"Content-Type": "application/octet-stream"}).raise_for_status()
    httpx.put(f"{url}/v2/{repository}/manifests/{tag}", content=json.dumps(manifest),
              headers={"Content-Type": MANIFEST_TYPE}).raise_for_status()
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--gguf", type=Path, help="the model layer's bytes (default: a few stand-in bytes)")
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    write_store(args.dir, args.names, args.gguf.read_bytes() if args.gguf else b"stand-in model weights")


if __name__ == "__main__":
    main()
