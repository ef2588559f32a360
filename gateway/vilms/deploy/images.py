"""What an image archive says about itself: its platform (os/architecture), read without loading it.

A gateway archive built on an amd64 controller and shipped to a Jetson fails with `exec format error` only at the
gate, after the switch. The preflight reads the architecture from the archive's image config (a `docker save`
archive: manifest.json -> Config; an OCI layout: index.json -> manifest -> config) and refuses a mismatch before
anything on the host changes, naming both architectures.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ansible's `ansible_architecture` (uname -m) -> the architecture names image configs use.
MACHINE_TO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
                   "ppc64le": "ppc64le", "s390x": "s390x"}
_MAX_JSON = 4 << 20  # manifest/config members are small; a larger one is not an image archive


class ArchiveError(Exception):
    pass


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _json_member(tar: tarfile.TarFile, name: str) -> Any:
    try:
        member = tar.getmember(name)
    except KeyError:
        raise ArchiveError(f"no {name} in the archive") from None
    if not member.isfile() or member.size > _MAX_JSON:
        raise ArchiveError(f"{name} in the archive is not a small regular file")
    handle = tar.extractfile(member)
    assert handle is not None
    try:
        return json.loads(handle.read())
    except ValueError:
        raise ArchiveError(f"{name} in the archive is not JSON") from None


def _blob_name(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    return f"blobs/{algo}/{hexdigest}"


def _configs(tar: tarfile.TarFile) -> list[dict[str, Any]]:
    """The config of every image in the archive (a `docker save` of several images lists each in manifest.json)."""
    names = set(tar.getnames())
    if "manifest.json" in names:  # docker save (also written by docker 25+ beside index.json)
        manifest = _json_member(tar, "manifest.json")
        if not isinstance(manifest, list) or not manifest or not all("Config" in m for m in manifest):
            raise ArchiveError("manifest.json names no image config")
        return [_json_member(tar, m["Config"]) for m in manifest]
    if "index.json" in names:  # OCI image layout
        index = _json_member(tar, "index.json")
        descriptors = index.get("manifests") or []
        if not descriptors:
            raise ArchiveError("index.json lists no manifest")
        configs = []
        for descriptor in descriptors:
            manifest = _json_member(tar, _blob_name(descriptor["digest"]))
            if "config" not in manifest:  # an index of several platforms: not one image
                raise ArchiveError("the archive holds an index of several platforms, not one image")
            configs.append(_json_member(tar, _blob_name(manifest["config"]["digest"])))
        return configs
    raise ArchiveError("neither a docker-save archive (manifest.json) nor an OCI layout (index.json)")


def archive_platforms(path: str | Path) -> list[Platform]:
    """The os/architecture/variant each image in an archive declares, in archive order."""
    try:
        with tarfile.open(path) as tar:
            configs = _configs(tar)
    except (OSError, tarfile.TarError) as exc:
        raise ArchiveError(f"{path}: cannot read ({exc})") from None
    except ArchiveError as exc:
        raise ArchiveError(f"{path}: {exc}") from None
    platforms = []
    for config in configs:
        arch = config.get("architecture")
        if not arch:
            raise ArchiveError(f"{path}: an image config names no architecture")
        platforms.append(Platform(str(config.get("os") or "linux"), str(arch), str(config.get("variant") or "")))
    return platforms


def archive_platform(path: str | Path) -> Platform:
    """The platform of an archive's first image (what `vilms image platform` reports)."""
    return archive_platforms(path)[0]


def mismatch(path: str | Path, machine: str) -> str | None:
    """None when the archive runs on a host whose `uname -m` is `machine`, else why not (both named)."""
    want = MACHINE_TO_ARCH.get(machine, machine)
    wrong = [p for p in archive_platforms(path) if p.architecture != want]
    if not wrong:
        return None
    got = wrong[0]  # every image of the archive must run on the host, not only the first
    return (f"{Path(path).name} is built for {got} but the host is {machine} ({want}): it would fail with "
            f"'exec format error' after the switch; build it for linux/{want} (make image-arm64 for Jetsons)")
