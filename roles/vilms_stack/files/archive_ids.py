"""Controller side: the image IDs inside `docker save` archives, read from each tar's manifest.json.

    archive_ids.py A.tar [B.tar ...]  ->  {"A.tar": {"tags": ["repo:tag", ...], "ids": ["sha256:...", ...]}, ...}

The ID of an image is the digest of its config blob, which manifest.json names (`<hex>.json` in Docker's
legacy layout, `blobs/sha256/<hex>` in the OCI layout). The role compares these with the IDs the host has for
the same tags, so an archive is loaded when its content differs, not when its tag is missing.
Only manifest.json is read: a multi-GB archive costs one tar index walk, not a decompression.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import PurePosixPath


def image_id(config_path: str) -> str:
    """sha256:<hex> from a manifest's Config entry, in either layout."""
    name = PurePosixPath(config_path).name
    return "sha256:" + name.removesuffix(".json")


def archive_ids(path: str) -> dict[str, list[str]]:
    with tarfile.open(path) as tar:
        member = tar.extractfile("manifest.json")
        if member is None:
            raise SystemExit(f"{path}: no manifest.json (not a docker save archive)")
        manifest = json.load(member)
    tags: list[str] = []
    ids: list[str] = []
    for entry in manifest:
        for tag in entry.get("RepoTags") or []:
            tags.append(tag)
            ids.append(image_id(entry["Config"]))
    if not tags:
        raise SystemExit(f"{path}: the archive's images carry no tag")
    return {"tags": tags, "ids": ids}


if __name__ == "__main__":
    print(json.dumps({path: archive_ids(path) for path in sys.argv[1:]}))
