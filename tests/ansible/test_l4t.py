"""L4T release -> engine image tag: the role's own detect tasks, run by ansible-playbook over local stand-in hosts.

Each case is one inventory host (connection local) with its own release file; the NVIDIA apt package that cannot
exist here is stood in for by a `dpkg-query` script on that host's PATH. One playbook run covers every case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ansible


def _release(major: int, revision: str) -> str:
    return (f"# R{major} (release), REVISION: {revision}, GCID: 38968081, BOARD: generic, EABI: aarch64, "
            "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n")


# (case, release file text or None, package version or None, extra host vars, expected tag or refusal words)
CASES = [
    ("r35.3.1", _release(35, "3.1"), None, {}, "r35.3.1"),
    ("r35.4.1", _release(35, "4.1"), None, {}, "r35.4.1"),
    ("r35.6.0", _release(35, "6.0"), None, {}, "r35.4.1"),
    ("r36.3.0", _release(36, "3.0"), None, {}, "r36.2.0"),
    ("r36.4.0", _release(36, "4.0"), None, {}, "r36.4.0"),  # the molecule rig's release
    ("r36.4.3", _release(36, "4.3"), None, {}, "r36.4.0"),
    ("r36.4.4", _release(36, "4.4"), None, {}, "r36.4.0"),
    ("r38.2.0", _release(38, "2.0"), None, {}, "r38.2.0"),
    ("r38.4.0", _release(38, "4.0"), None, {}, "r38.2.0"),
    ("pkg-36.4.3", None, "36.4.3-20250107174145", {}, "r36.4.0"),
    ("pkg-35.5.0", None, "35.5.0-20240219203809", {}, "r35.4.1"),
    ("r32.7.4", _release(32, "7.4"), None, {}, ["r32.7.4", "L4T release '32.7.4'", "not in jetson_runtime_releases"]),
    ("r39.0.0", _release(39, "0.0"), None, {}, ["r39.0.0", "'39.0.0'", "jetson_runtime_engine_tag"]),
    ("r39-forced", _release(39, "0.0"), None, {"jetson_runtime_engine_tag": "r38.2.0"}, "r38.2.0"),
    ("garbage", "not a release file\n", None, {}, ["garbage", "'unreadable'"]),
    ("no-l4t", None, None, {}, ["no-l4t", "nvidia-l4t-core"]),
    # Forcing a tag from the other side of 36.4 is refused, both ways, and so is a config's engine tag (which
    # vilms_preflight passes as jetson_runtime_image_tags).
    ("r36.3-with-r36.4", _release(36, "3.0"), None, {"jetson_runtime_engine_tag": "r36.4.0"},
     ["r36.3-with-r36.4", "r36.4.0", "L4T 36.3.0", "same side of L4T 36.4"]),
    ("r36.4-with-r36.2", _release(36, "4.3"), None, {"jetson_runtime_image_tags": ["r36.2.0"]},
     ["r36.4-with-r36.2", "r36.2.0", "L4T 36.4.3", "same side of L4T 36.4"]),
    ("r35-with-r36", _release(35, "4.1"), None, {"jetson_runtime_engine_tag": "r36.4.0"}, ["r35-with-r36", "L4T 35.4.1"]),
    ("r36.4-with-r36.4.3", _release(36, "4.0"), None, {"jetson_runtime_engine_tag": "r36.4.3"}, "r36.4.3"),
]

PLAYBOOK = """\
- name: Detect L4T on each stand-in host
  hosts: all
  gather_facts: false
  environment: "{{ l4t_env | default({}) }}"
  tasks:
    - name: Detect
      ansible.builtin.include_role:
        name: jetson_runtime
        tasks_from: detect
    - name: Report
      ansible.builtin.debug:
        msg: "{{ jetson_runtime_tag }}"
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    if not shutil.which("ansible-playbook", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]):
        pytest.skip("ansible-playbook not installed")
    tmp = tmp_path_factory.mktemp("l4t")
    hosts: dict[str, dict] = {}
    for name, release, package, extra, _ in CASES:
        hostvars = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                    "jetson_runtime_release_file": str(tmp / name / "nv_tegra_release"), **extra}
        (tmp / name).mkdir()
        if release is not None:
            (tmp / name / "nv_tegra_release").write_text(release)
        if package is not None:
            fake = tmp / name / "bin" / "dpkg-query"
            fake.parent.mkdir()
            fake.write_text(f"#!/bin/sh\n# stand-in for the NVIDIA apt package nvidia-l4t-core\nprintf '%s' '{package}'\n")
            fake.chmod(0o755)
            hostvars["l4t_env"] = {"PATH": f"{fake.parent}:{os.environ['PATH']}"}
        hosts[name] = hostvars
    (tmp / "hosts.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    (tmp / "play.yml").write_text(PLAYBOOK)
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
           "ANSIBLE_FORKS": "10", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    bindir = os.path.dirname(sys.executable)
    run = subprocess.run([os.path.join(bindir, "ansible-playbook"), "-i", str(tmp / "hosts.yml"), str(tmp / "play.yml")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    report = json.loads(run.stdout[run.stdout.index("{"):])
    results: dict[str, dict] = {name: {} for name in hosts}
    for task in report["plays"][0]["tasks"]:
        for host, result in task["hosts"].items():
            if result.get("failed"):
                results[host] = {"failed": result.get("msg", "")}
            elif task["task"]["name"] == "Report":
                results[host] = {"tag": result["msg"]}
    return results


@pytest.mark.parametrize("name,release,package,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_l4t_maps_to_tag_or_refuses(outcomes, name, release, package, extra, expected):
    got = outcomes[name]
    if isinstance(expected, str):
        assert got == {"tag": expected}
    else:
        assert "failed" in got, got
        message = " ".join(got["failed"].split())
        for word in expected:
            assert word in message, message
