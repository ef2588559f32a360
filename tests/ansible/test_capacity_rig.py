"""The capacity preflight on rig hosts: the real site.yml against a stand-in host whose config assigns models over
its budget (a Jetson Orin Nano given a 7B VLM; one 24 GB GPU given two vLLM services at 0.9). The run must fail in
the facts preflight, naming host, model, estimate and budget, and no file on the host may change (checksums and
modification times before and after).

Each host is a plain container of the rig's Debian base image (the preflight needs no Docker inside it), with what a
CPU machine cannot have stood in: an L4T 36.4 release file and an Orin Nano device-tree model string, or an
nvidia-smi printing one 24 GB GPU (the same form as molecule/resources/prepare.yml's).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devkit.rig_image import BASE_IMAGE as IMAGE

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFIX = os.environ.get("VILMS_RIG_PREFIX") or "vilms-rig"

pytestmark = [pytest.mark.docker, pytest.mark.ansible]


def docker(*args: str, check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


def on_host(host: str, script: str) -> str:
    return docker("exec", host, "sh", "-c", script).stdout


# What each kind of host has that a CPU container cannot: stood in, as molecule/resources/prepare.yml does.
STAND_INS = {
    "jetsons": "printf '# R36 (release), REVISION: 4.0, GCID: 0, BOARD: generic, EABI: aarch64\\n' > /etc/nv_tegra_release"
               " && printf 'NVIDIA Jetson Orin Nano Developer Kit\\0' > /etc/vilms-rig/device-tree-model",
    "dgpu": "printf '#!/bin/sh\\necho \"NVIDIA Stand-in GPU, 24564, 580.00\"\\n' > /usr/bin/nvidia-smi && chmod 755 /usr/bin/nvidia-smi",
}

CASES = {
    # An Orin Nano 8 GB (5.5 GiB after the OS) given a 7B VLM on top of a 3B LLM.
    "jetsons": ({"vilms_architecture": "aarch64", "vilms_capacity_device_model_file": "/etc/vilms-rig/device-tree-model",
                 "vilms_config": {"host": {"platform": "js"}, "gateway": {"allow-anonymous": True}, "serving": {"engine": "ollama", "models": [
                     {"name": "qwen2.5:3b", "aliases": ["LLM"], "params": {"num-ctx": 2048}},
                     {"name": "qwen2.5vl:7b", "type": "vlm", "aliases": ["VLM"]}]}}},
                ["the models do not fit", "Jetson Orin Nano 8 GB", "qwen2.5vl:7b", "estimate 6.21 GiB", "budget 5.5 GiB",
                 "move qwen2.5vl:7b (6.2 GiB) to a host with >= 16 GB"]),
    # One 24 GB GPU (the stand-in nvidia-smi) given two vLLM services at the default 0.9.
    "dgpu": ({"vilms_gpu": True, "vilms_config": {"host": {"platform": "dgpu"}, "gateway": {"allow-anonymous": True}, "serving": {"engine": "vllm", "models": [
                 {"name": "Qwen/Qwen2.5-7B-Instruct", "aliases": ["LLM"], "params": {"max-model-len": 8192}},
                 {"name": "Qwen/Qwen2.5-3B-Instruct", "params": {"max-model-len": 8192}}]}}},
             ["the models do not fit", "1 GPU(s), 24.0 GiB (nvidia-smi)", "Qwen/Qwen2.5-7B-Instruct",
              "estimate 21.59 GiB", "budget 23.99 GiB", "reserve 1.80 of its 24.0 GiB", "sum <= 1"]),
}


@pytest.fixture
def rig_hosts(rig):
    """One container per case, each with its stand-ins and a previous deployment's files; removed afterwards."""
    # After the session's rig fixture (which skips where the rig cannot run) a missing base image is a failure.
    assert docker("image", "inspect", IMAGE, check=False).returncode == 0, f"the rig did not build {IMAGE}"
    hosts = {group: f"{PREFIX}-capacity-{group}" for group in sorted(CASES)}
    try:
        for group, host in hosts.items():
            docker("rm", "-f", host, check=False)
            docker("run", "-d", "--name", host, IMAGE, "sleep", "infinity")
            on_host(host, "mkdir -p /etc/vilms-rig /opt/vilms /etc/docker && " + STAND_INS[group] +
                    " && echo 'previous: deployment' > /opt/vilms/config.yaml && echo '{}' > /etc/docker/daemon.json"
                    " && touch /etc/vilms-rig/marker")
        yield hosts
    finally:
        for host in hosts.values():
            docker("rm", "-f", host, check=False)


# Every file outside the kernel's and Ansible's own scratch space: path -> sha256, and what changed since the marker.
SNAPSHOT = ("find / -xdev -type f -not -path '/proc/*' -not -path '/sys/*' -not -path '/tmp/*' -not -path '/root/.ansible/*'"
            " -not -path '/var/lib/apt/lists/*' -print0 | xargs -0 sha256sum; echo '--- newer'; "
            "find / -xdev -newer /etc/vilms-rig/marker -not -path '/proc*' -not -path '/sys*' -not -path '/tmp*'"
            " -not -path '/root/.ansible*' -not -path /root -not -path '/dev*' -not -path '/etc/vilms-rig*' | sort")


def test_over_budget_hosts_fail_before_any_change(rig_hosts, tmp_path):
    children = {group: {"hosts": {host: {"ansible_connection": "community.docker.docker", "ansible_become": False,
                                         "ansible_python_interpreter": "/usr/bin/python3", **CASES[group][0]}}}
                for group, host in rig_hosts.items()}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": children}}))
    before = {host: on_host(host, SNAPSHOT) for host in rig_hosts.values()}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path / "hosts.yml"), str(ROOT / "site.yml")],
                         capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    text = " ".join((run.stdout + run.stderr).split())
    assert run.returncode != 0, text[-3000:]
    for group, host in rig_hosts.items():
        after = on_host(host, SNAPSHOT)
        failure = text[text.index(f"fatal: [{host}]: FAILED!"):][:3000]
        assert text.index("Capacity | Fail with the host, the models, the numbers and the fix]") < text.index(
            f"fatal: [{host}]: FAILED!"), failure
        for word in [f"{host}: the models do not fit", *CASES[group][1]]:
            assert word in failure, f"{word!r} missing from:\n{failure}"
        assert after.split("--- newer")[1].split() == [], (host, after.split("--- newer")[1])
        assert before[host] == after, host
    assert "TASK [docker_engine" not in run.stdout and "TASK [vilms_stack : Deploy" not in run.stdout
