"""The rig's base image name, read from devkit/rig/rig.sh.

rig.sh builds the image and bumps its tag when the package list changes; every Python user (the simulated fleet,
the rig tests) reads the name from there, so a bump cannot leave one of them asking for an image nobody builds.
"""

from __future__ import annotations

import re
from pathlib import Path

RIG_SCRIPT = Path(__file__).resolve().parent / "rig" / "rig.sh"


def _read() -> str:
    match = re.search(r"^base_image=(\S+)", RIG_SCRIPT.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{RIG_SCRIPT} names no base_image=")
    return match.group(1)


BASE_IMAGE = _read()
