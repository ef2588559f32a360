"""Every user of the rig's base image asks for the one rig.sh builds (a bump once left two of them behind)."""

from __future__ import annotations

from pathlib import Path

import yaml

from devkit.rig_image import BASE_IMAGE, RIG_SCRIPT

ROOT = Path(__file__).resolve().parents[2]


def test_rig_script_names_the_base_image():
    assert f"base_image={BASE_IMAGE}" in RIG_SCRIPT.read_text()


def test_molecule_scenarios_use_the_rig_base_image():
    scenarios = sorted((ROOT / "molecule").glob("*/molecule.yml"))
    assert scenarios
    for path in scenarios:
        platforms = yaml.safe_load(path.read_text())["platforms"]
        assert {p["image"] for p in platforms} == {BASE_IMAGE}, path


def test_no_python_file_names_another_base_tag():
    stale = [str(p.relative_to(ROOT)) for folder in ("devkit", "tests", "bench") for p in (ROOT / folder).rglob("*.py")
             if "vilms-rig/debian:" in p.read_text() and p.name != "test_rig_image.py"]
    assert stale == []
