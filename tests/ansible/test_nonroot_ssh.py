"""The play as a non-root SSH user with passwordless sudo (issue 20 item 6): a rig box with sshd and a user `deploy`,
reached with the ssh connection, `ansible_user: deploy` and `ansible_become: true` in all's vars (as an operator
writes them, which also gives them to the implicit localhost). Weights are shipped with rsync into root's /opt
(synchronize runs `sudo rsync` on the box under become) and module tasks run there with sudo; on the controller a
`sudo` that records its call and fails comes first on PATH, so any controller-side task that used become fails the run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from devkit.hub_standin import publish_tiny
from devkit.rig_image import BASE_IMAGE

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RIG = ROOT / "devkit" / "rig" / "rig.sh"
PREFIX = os.environ.get("VILMS_RIG_PREFIX", "vilms-rig")
BOX = f"{PREFIX}-nonroot-{os.getpid()}"
REPO = "acme/tiny-llm"
MODELS = "/opt/vilms/models/acme-tiny-llm"

SETUP = """set -e
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server sudo >/dev/null
useradd -m -s /bin/bash deploy
echo 'deploy ALL=(ALL) NOPASSWD: ALL' >/etc/sudoers.d/deploy
chmod 0440 /etc/sudoers.d/deploy
install -d -m 0700 -o deploy -g deploy /home/deploy/.ssh
cat >/home/deploy/.ssh/authorized_keys
chown deploy:deploy /home/deploy/.ssh/authorized_keys
chmod 0600 /home/deploy/.ssh/authorized_keys
mkdir -p /run/sshd
/usr/sbin/sshd
"""

# Records that something on the controller asked for sudo, and fails as a controller without sudo rights would.
TRAP = """#!/bin/sh
echo "sudo $*" >>{log}
echo "sudo on the controller: $*" >&2
exit 1
"""


def docker(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, **kw)


def wait_for_port(host: str, port: int, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # polling the port, not timing: returns as soon as sshd listens


@pytest.fixture()
def box(rig, tmp_path):
    subprocess.run(["bash", str(RIG), "base-image"], check=True, timeout=600,
                   env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    key = tmp_path / "id_deploy"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    docker("rm", "-fv", BOX)
    docker("run", "-d", "--name", BOX, "--hostname", BOX, BASE_IMAGE,
           "bash", "-c", 'trap "exit 0" TERM; sleep infinity & wait', check=True)
    try:
        setup = subprocess.run(["docker", "exec", "-i", BOX, "bash", "-c", SETUP], input=key.with_suffix(".pub").read_text(),
                               capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0, setup.stderr[-3000:]
        ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", BOX,
                    check=True).stdout.strip()
        wait_for_port(ip, 22, 20)
        yield ip, key
    finally:
        docker("rm", "-fv", BOX)


def recap(output: str) -> dict[str, dict[str, int]]:
    rows = re.findall(r"^(\S+)\s+:\s+(.*)$", output.split("PLAY RECAP")[-1], re.M)
    return {host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", stats)} for host, stats in rows}


@pytest.mark.ansible
@pytest.mark.docker
@pytest.mark.timeout(300)
def test_ships_weights_as_a_non_root_ssh_user_with_sudo_and_never_sudo_on_the_controller(box, tmp_path):
    ip, key = box
    src = publish_tiny(tmp_path / "offline", REPO)  # an air-gapped site's local copy: the controller "fetches" it
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {
        "children": {"dgpu": {"hosts": {BOX: {
            "ansible_host": ip, "ansible_connection": "ssh", "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_ssh_private_key_file": str(key)}}}},
        # as an operator writes them: all's vars, which reach the implicit localhost too
        "vars": {"ansible_user": "deploy", "ansible_become": True,
                 "vilms_config": {"host": {"platform": "dgpu"}, "gateway": {"allow-anonymous": True},
                                  "serving": {"engine": "vllm", "models": [
                                      {"name": REPO, "aliases": ["LLM"], "weights": {"local-dir": str(src)}}]}},
                 "vilms_gpu": False, "vilms_stack_dir": "/opt/vilms", "vilms_stack_weights_cache": str(tmp_path / "cache"),
                 "vilms_preflight_render_dir": str(tmp_path / "render" / BOX)}}}))
    trap_dir = tmp_path / "controller-bin"
    trap_dir.mkdir()
    log = tmp_path / "controller-sudo.log"
    (trap_dir / "sudo").write_text(TRAP.format(log=log))
    (trap_dir / "sudo").chmod(0o755)
    env = {**os.environ, "PATH": f"{trap_dir}:{BIN}:{os.environ['PATH']}", "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_HOST_KEY_CHECKING": "False",
           "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_PIPELINING": "False",
           # This controller runs as root, and Ansible skips become when the user already is the become_user: here it
           # does not, as on an operator's machine where the user is not root.
           "ANSIBLE_BECOME_ALLOW_SAME_USER": "True"}

    # The trap is live: a controller task with become reaches it and fails.
    probe = subprocess.run([str(BIN / "ansible"), "-i", str(inventory), "localhost", "-b", "-m", "ansible.builtin.command",
                            "-a", "true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and log.read_text().startswith("sudo "), probe.stdout[-2000:]
    log.unlink()

    # deploy alone cannot write root's /opt: what lands there came through sudo
    assert docker("exec", "-u", "deploy", BOX, "mkdir", "/opt/vilms").returncode != 0

    def ship() -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory),
                               str(ROOT / "tests" / "ansible" / "nonroot" / "ship.yml")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)

    first = ship()
    assert first.returncode == 0, first.stdout[-6000:]
    assert not log.exists(), f"a controller-side task ran sudo on the controller: {log.read_text()}"
    sent = first.stdout.split("TASK [vilms_stack : Weights | Send with rsync]")[1].split("TASK [")[0]
    assert len(re.findall(r"^changed: \[" + re.escape(BOX), sent, re.M)) == 3, sent  # three files, by rsync
    assert "Verify size and sha256 of every file on the host" in first.stdout
    owners = docker("exec", BOX, "stat", "-c", "%U %n", "/opt/vilms", f"{MODELS}/model.safetensors",
                    f"{MODELS}/.vilms-weights.json", check=True).stdout.split("\n")
    assert [line.split()[0] for line in owners if line] == ["root", "root", "root"]

    again = ship()  # a rerun as deploy changes nothing and still never asks the controller for sudo
    assert again.returncode == 0, again.stdout[-6000:]
    assert recap(again.stdout)[BOX]["changed"] == 0, again.stdout[-4000:]
    assert not log.exists()
