"""Rebuild a `docker save` archive as a different image under the same tags (a new label in its config).

    restamp_archive.py IN.tar OUT.tar LABEL_VALUE   -> prints the new image ID

What a CI rebuild of `vilms/gateway:1.2` looks like to a host: same tag, new content, new image ID. The layers are
shared, so only the config blob and manifest.json change (Docker's legacy save layout, as the rig's Docker 20.10 writes).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile


def restamp(src: str, dst: str, value: str) -> str:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        manifest = json.load(tin.extractfile("manifest.json"))
        old_name = manifest[0]["Config"]
        assert old_name.endswith(".json") and "/" not in old_name, f"{src}: not Docker's legacy save layout"
        config = json.load(tin.extractfile(old_name))
        labels = config["config"].get("Labels") or {}
        config["config"]["Labels"] = {**labels, "vilms.rig.restamp": value}
        blob = json.dumps(config, separators=(",", ":")).encode()
        new_hex = hashlib.sha256(blob).hexdigest()
        for entry in manifest:
            entry["Config"] = f"{new_hex}.json"
        for member in tin:
            if member.name in (old_name, "manifest.json"):
                continue
            tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
        for name, data in ((f"{new_hex}.json", blob), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return f"sha256:{new_hex}"


if __name__ == "__main__":
    print(restamp(sys.argv[1], sys.argv[2], sys.argv[3]))
