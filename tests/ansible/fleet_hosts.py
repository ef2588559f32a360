"""Local stand-in fleets for running the preflight for real: every host is this machine (connection local), with
what it cannot have stood in per host (an L4T release file and a device-tree model string for Jetsons; dgpu
hosts run the CPU profile). Shared by the preflight tests run from the checkout and from the installed collection.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
L4T_36_4 = "# R36 (release), REVISION: 4.0, GCID: 0, BOARD: generic, EABI: aarch64\n"
TINY = {"serving": {"engine": "ollama", "models": [{"name": "qwen2.5:0.5b", "aliases": ["LLM"]}]},
        "docker": {"gateway-bind": "127.0.0.1"}}


def write_fleet(tmp: Path, dgpu: tuple[str, ...], jetsons: tuple[str, ...], **all_vars: object) -> Path:
    """An inventory with the config split over its three layers (all, group, host), as operators write it."""
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    standins = tmp / "standins"
    standins.mkdir()
    (standins / "nv_tegra_release").write_text(L4T_36_4)
    (standins / "device-tree-model").write_text("NVIDIA Jetson Orin Nano Developer Kit\0")
    jetson_vars = {"vilms_architecture": "aarch64", "jetson_runtime_release_file": str(standins / "nv_tegra_release"),
                   "vilms_capacity_device_model_file": str(standins / "device-tree-model"),
                   "vilms_config_group": {"host": {"platform": "js"}}}
    inventory = {"all": {
        "vars": {"vilms_gpu": False, "vilms_config": {"host": {"platform": "dgpu"}, **TINY}, **all_vars},
        "children": {
            "dgpu": {"hosts": {h: {**local, "vilms_config_host": {"serving": {"default-max-frames": 2}}} for h in dgpu}},
            "jetsons": {"hosts": {h: local for h in jetsons}, "vars": jetson_vars}}}}
    path = tmp / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def ansible_env(home: Path, **extra: str) -> dict[str, str]:
    """ansible-playbook's environment with HOME in the test's directory (renders, reports, Ansible's temp files)."""
    drop = ("ANSIBLE_CONFIG", "ANSIBLE_ROLES_PATH", "ANSIBLE_COLLECTIONS_PATH", "ANSIBLE_CALLBACK_PLUGINS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "HOME": str(home), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_LOCALHOST_WARNING": "0", "PATH": f"{BIN}:{os.environ['PATH']}", **extra}
