#!/usr/bin/python
"""Read-only probe of a host's model-weights directory, for the vilms_stack role (tasks/weights*.yml)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: vilms_weights_probe
short_description: What a host already has of the model weights vilms ships, and how much room is left
description:
  - Compares each model directory under O(models_dir) with its manifest (path, size, sha256) and reports the
    files that are missing or differ, the bytes already present, the free space where the weights will land
    (the nearest existing parent when O(models_dir) does not exist yet), whether rsync is installed, and the
    model directories vilms shipped earlier that no release references any more.
  - Changes nothing; runs in check mode.
options:
  models_dir:
    description: Absolute path of the host's models directory.
    type: path
    required: true
  weights:
    description: "[{slug, files: [{path, size, sha256}]}], one entry per model directory."
    type: list
    elements: dict
    required: true
  checksum:
    description: Also compare sha256 (otherwise size only).
    type: bool
    default: false
  keep:
    description: Slugs a release still references (never reported as unreferenced).
    type: list
    elements: str
    default: []
  marker:
    description: File name marking a directory vilms shipped and verified.
    type: str
    default: .vilms-weights.json
author: vilms
"""

import hashlib
import os
import shutil

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.vilms_disk import existing_parent


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()



def _model_state(root, files, checksum, marker):
    present, needed, bad = 0, 0, []
    listed = set()
    for entry in files:
        listed.add(entry["path"])
        target = os.path.join(root, entry["path"])
        try:
            size = os.stat(target).st_size
        except OSError:
            size = None
        if size != int(entry["size"]) or (checksum and _sha256(target) != entry["sha256"]):
            bad.append(entry["path"])
            needed += int(entry["size"])  # rsync writes a full temporary copy before it replaces a file
            continue
        present += size
    extra = []
    if os.path.isdir(root):
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if rel not in listed and rel != marker and not rel.startswith(".rsync-partial"):
                    extra.append(rel)
    return {"present_bytes": present, "needed_bytes": needed, "bad": bad, "extra": sorted(extra)}


def main():
    module = AnsibleModule(
        argument_spec={
            "models_dir": {"type": "path", "required": True},
            "weights": {"type": "list", "elements": "dict", "required": True},
            "checksum": {"type": "bool", "default": False},
            "keep": {"type": "list", "elements": "str", "default": []},
            "marker": {"type": "str", "default": ".vilms-weights.json"},
        },
        supports_check_mode=True,
    )
    params = module.params
    models_dir = params["models_dir"]
    models = {}
    for item in params["weights"]:
        slug = item["slug"]
        if "/" in slug or slug in ("", ".", ".."):
            module.fail_json(msg="invalid weights slug %r" % slug)
        models[slug] = _model_state(os.path.join(models_dir, slug), item["files"], params["checksum"],
                                    params["marker"])
    free_path = existing_parent(models_dir)
    referenced = set(models) | set(params["keep"])
    unreferenced = []
    if os.path.isdir(models_dir):
        for name in sorted(os.listdir(models_dir)):
            if name not in referenced and os.path.isfile(os.path.join(models_dir, name, params["marker"])):
                unreferenced.append(name)
    module.exit_json(changed=False, models=models, needed_bytes=sum(m["needed_bytes"] for m in models.values()),
                     free_bytes=shutil.disk_usage(free_path).free,
                     free_path=free_path, rsync=shutil.which("rsync") or "", unreferenced=unreferenced)


if __name__ == "__main__":
    main()
