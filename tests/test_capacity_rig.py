"""The capacity preflight on a rig host: the real site.yml against a Jetson stand-in container whose config assigns
a model over its budget. The run must fail in the facts preflight, naming host, model, estimate and budget, and no
file on the host may change (checksums and modification times before and after).

The host is a plain container of the rig's Debian base image (the preflight needs no Docker inside it), with the two
things a CPU machine cannot have stood in: an L4T 36.4 release file and an Orin Nano device-tree model string.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IMAGE = "vilms-rig/debian:bookworm-2"
HOST = f"{os.environ.get('VILMS_RIG_PREFIX') or 'vilms-rig'}-capacity-jetson"

pytestmark = [pytest.mark.docker, pytest.mark.ansible]


def docker(*args: str, check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


def on_host(script: str) -> str:
    return docker("exec", HOST, "sh", "-c", script).stdout


@pytest.fixture
def jetson_host():
    if shutil.which("docker") is None or docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.skip(f"needs a Docker engine and the rig's base image {IMAGE} (devkit/rig/rig.sh images)")
    docker("rm", "-f", HOST, check=False)
    docker("run", "-d", "--name", HOST, IMAGE, "sleep", "infinity")
    try:
        on_host("mkdir -p /etc/vilms-rig /opt/vilms /etc/docker"
                " && printf '# R36 (release), REVISION: 4.0, GCID: 0, BOARD: generic, EABI: aarch64\\n' > /etc/nv_tegra_release"
                " && printf 'NVIDIA Jetson Orin Nano Developer Kit\\0' > /etc/vilms-rig/device-tree-model"
                " && echo 'previous: deployment' > /opt/vilms/config.yaml && echo '{}' > /etc/docker/daemon.json"
                " && touch /etc/vilms-rig/marker")
        yield HOST
    finally:
        docker("rm", "-f", HOST, check=False)


# Every file outside the kernel's and Ansible's own scratch space: path -> sha256, and what changed since the marker.
SNAPSHOT = ("find / -xdev -type f -not -path '/proc/*' -not -path '/sys/*' -not -path '/tmp/*' -not -path '/root/.ansible/*'"
            " -not -path '/var/lib/apt/lists/*' -print0 | xargs -0 sha256sum; echo '--- newer'; "
            "find / -xdev -newer /etc/vilms-rig/marker -not -path '/proc*' -not -path '/sys*' -not -path '/tmp*'"
            " -not -path '/root/.ansible*' -not -path /root -not -path '/dev*' -not -path '/etc/vilms-rig*' | sort")


def test_over_budget_jetson_fails_before_any_change(jetson_host, tmp_path):
    inventory = {"all": {"children": {"jetsons": {"hosts": {jetson_host: {
        "ansible_connection": "community.docker.docker", "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_become": False, "vilms_architecture": "aarch64",
        "vilms_capacity_device_model_file": "/etc/vilms-rig/device-tree-model",
        "vilms_config": {"host": {"platform": "js"}, "serving": {"engine": "ollama", "models": [
            {"name": "qwen2.5:3b", "aliases": ["LLM"], "params": {"num-ctx": 2048}},
            {"name": "qwen2.5vl:7b", "type": "vlm", "aliases": ["VLM"]}]}},
    }}}}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    before = on_host(SNAPSHOT)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path / "hosts.yml"), str(ROOT / "site.yml")],
                         capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    after = on_host(SNAPSHOT)
    text = " ".join((run.stdout + run.stderr).split())
    assert run.returncode != 0, text[-3000:]
    assert "Capacity | Fail with the host, the models, the numbers and the fix" in text, text[-3000:]
    for word in (f"{jetson_host}: the models do not fit", "Jetson Orin Nano 8 GB", "qwen2.5vl:7b",
                 "estimate 6.21 GiB", "budget 5.5 GiB", "move qwen2.5vl:7b (6.2 GiB) to a host with >= 16 GB"):
        assert word in text, f"{word!r} missing from:\n{text[-3000:]}"
    assert "TASK [docker_engine" not in run.stdout and "TASK [vilms_stack : Deploy" not in run.stdout
    assert after.split("--- newer")[1].split() == [], after.split("--- newer")[1]
    assert before == after
