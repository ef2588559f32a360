#!/usr/bin/python
"""Read-only disk budget for image archives, for the vilms_stack role (tasks/images-budget.yml)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vilms_images_probe
short_description: Which image archives a host lacks, and whether shipping and loading them fits its disks
description:
  - An archive is to ship when the image IDs it holds differ from the IDs the host has under the same tags.
  - "What shipping one archive takes on the host: the archive itself in O(archive_dir) (less what an interrupted
    rsync transfer left there: it resumes in place), then what loading it adds to Docker's data root: the layers
    neither the host's images under the archives' tags nor an archive loaded before it in this run have (each
    layer's uncompressed tar, as C(docker save) stores it). The archive is removed after a verified load, so
    archives never pile up: on separate filesystems the archive directory needs the largest archive, the data root
    every new layer; on one filesystem the peak is, over the archives in order, the layers loaded so far plus the
    archive being loaded and its new layers."
  - Free space is read where the paths will be (the nearest existing parent when one does not exist yet).
  - Changes nothing; runs in check mode.
options:
  archives:
    description: "[{image, src, bytes, ids, layers: [[diff_id, bytes], ...]}] in shipping order (archive_ids.py)."
    type: list
    elements: dict
    required: true
  present:
    description: The host's images under each archive's tags (community.docker.docker_image_info's images), in the same order.
    type: list
    elements: list
    required: true
  archive_dir:
    description: Where archives land on the host.
    type: path
    required: true
  docker_root:
    description: Docker's data root on the host (docker info's DockerRootDir).
    type: path
    required: true
author: vilms
"""

import os
import shutil

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.vilms_disk import existing_parent



def _partial_bytes(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def plan(archives, present, archive_dir, same_fs):
    """(archives to ship with their figures, bytes needed in the archive dir, bytes needed in the data root)."""
    have = {layer for images in present for image in images for layer in (image.get("RootFS") or {}).get("Layers") or []}
    todo = []
    loaded = 0       # new layer bytes loaded by the archives before this one
    archive_peak = 0
    for archive, images in zip(archives, present):
        if [image.get("Id") for image in images] == list(archive["ids"]):
            continue
        dest = os.path.join(archive_dir, os.path.basename(archive["src"]))
        on_disk = _partial_bytes(dest)
        archive_bytes = max(0, int(archive["bytes"]) - on_disk)
        new_layers = 0
        for diff_id, size in archive["layers"]:
            if diff_id not in have:
                have.add(diff_id)
                new_layers += int(size)
        todo.append({"image": archive["image"], "src": archive["src"], "archive_bytes": int(archive["bytes"]),
                     "partial_bytes": min(on_disk, int(archive["bytes"])), "layer_bytes": new_layers})
        peak = archive_bytes + (loaded + new_layers if same_fs else 0)
        archive_peak = max(archive_peak, peak)
        loaded += new_layers
    return todo, archive_peak, (0 if same_fs else loaded)


def main():
    module = AnsibleModule(
        argument_spec={
            "archives": {"type": "list", "elements": "dict", "required": True},
            "present": {"type": "list", "elements": "list", "required": True},
            "archive_dir": {"type": "path", "required": True},
            "docker_root": {"type": "path", "required": True},
        },
        supports_check_mode=True,
    )
    p = module.params
    if len(p["archives"]) != len(p["present"]):
        module.fail_json(msg="archives and present differ in length")
    archive_free = existing_parent(p["archive_dir"])
    docker_free = existing_parent(p["docker_root"])
    same_fs = os.stat(archive_free).st_dev == os.stat(docker_free).st_dev
    todo, archive_needed, docker_needed = plan(p["archives"], p["present"], p["archive_dir"], same_fs)
    checks = [{"what": "archives and the layers they load" if same_fs else "archives (one at a time)",
               "path": p["archive_dir"], "free_path": archive_free, "needed_bytes": archive_needed,
               "free_bytes": shutil.disk_usage(archive_free).free}]
    if not same_fs:
        checks.append({"what": "loaded layers", "path": p["docker_root"], "free_path": docker_free,
                       "needed_bytes": docker_needed, "free_bytes": shutil.disk_usage(docker_free).free})
    module.exit_json(changed=False, todo=todo, same_filesystem=same_fs, checks=checks,
                     short=[c for c in checks if c["needed_bytes"] > c["free_bytes"]],
                     rsync=shutil.which("rsync") or "")


if __name__ == "__main__":
    main()
