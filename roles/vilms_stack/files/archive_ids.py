"""Controller side: the image IDs inside `docker save` archives, read from each tar's manifest.json.

    archive_ids.py A.tar [B.tar ...]  ->  {"A.tar": {"tags": ["repo:tag", ...], "ids": ["sha256:...", ...],
                                                     "bytes": N, "layers": [["sha256:<diff_id>", N], ...]}, ...}

The ID of an image is the digest of its config blob, which manifest.json names (`<hex>.json` in Docker's
legacy layout, `blobs/sha256/<hex>` in the OCI layout). The role compares these with the IDs the host has for
the same tags, so an archive is loaded when its content differs, not when its tag is missing.
Only manifest.json and the (small) image configs are read: a multi-GB archive costs one tar index walk, not a
decompression.

For the disk budget (tasks/images-budget.yml): `bytes` is the archive's size (what lands in the host's archive
directory), `layers` each layer's uncompressed diff ID (the config's rootfs.diff_ids, which is how the host's
`docker image inspect` names layers it already has) with the size of its tar in the archive: what loading it
writes into Docker's data root, at most (`docker save` stores layers uncompressed).
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import PurePosixPath


def image_id(config_path: str) -> str:
    """sha256:<hex> from a manifest's Config entry, in either layout."""
    name = PurePosixPath(config_path).name
    return "sha256:" + name.removesuffix(".json")


def _layers(tar: tarfile.TarFile, entry: dict) -> list[tuple[str, int]]:
    """(diff ID, bytes in the archive) of each layer of one manifest entry, in order."""
    config = tar.extractfile(entry["Config"])
    if config is None:
        raise SystemExit(f"{tar.name}: no config {entry['Config']}")
    diff_ids = json.load(config)["rootfs"]["diff_ids"]
    return [(diff_id, tar.getmember(layer).size) for diff_id, layer in zip(diff_ids, entry["Layers"])]


def archive_ids(path: str) -> dict:
    tags: list[str] = []
    ids: list[str] = []
    layers: dict[str, int] = {}
    with tarfile.open(path) as tar:
        member = tar.extractfile("manifest.json")
        if member is None:
            raise SystemExit(f"{path}: no manifest.json (not a docker save archive)")
        manifest = json.load(member)
        for entry in manifest:
            for tag in entry.get("RepoTags") or []:
                tags.append(tag)
                ids.append(image_id(entry["Config"]))
            for diff_id, size in _layers(tar, entry):
                layers.setdefault(diff_id, size)
    if not tags:
        raise SystemExit(f"{path}: the archive's images carry no tag")
    return {"tags": tags, "ids": ids, "bytes": os.path.getsize(path), "layers": [[d, n] for d, n in layers.items()]}


if __name__ == "__main__":
    print(json.dumps({path: archive_ids(path) for path in sys.argv[1:]}))
