"""Shared by the vilms_stack probes (library/vilms_weights_probe.py, library/vilms_images_probe.py)."""

from __future__ import annotations

import os


def existing_parent(path):
    """`path`, or its nearest existing parent: where free space is measured before a directory exists."""
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path
