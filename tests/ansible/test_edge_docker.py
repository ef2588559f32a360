"""The host's Docker on an edge box, with real rig boxes and a real proxy (issue 20, items 2 and 5).

- A Jetson-like box arrives with Debian's docker.io running, the daemon.json `nvidia-ctk runtime configure` writes
  (the nvidia runtime with `args`, not the `runtimeArgs` the role would write; 4-space layout) and a foreign
  container (`--restart=always`). docker_engine (default source auto) and jetson_runtime keep the engine (no
  docker-ce), keep daemon.json byte for byte and dockerd running (same pid: not restarted), keep the foreign
  container (same id, same start time, same runtime) and the daemon's default runtime; a rerun changes nothing. Forcing
  `docker_engine_source: docker` on it is refused before anything changes.
- A bare box whose only route out is a real proxy (tinyproxy in a second rig container, the box on an `--internal`
  network) cannot reach Debian's archive directly, and docker_engine installs Docker through `vilms_proxy`: the
  proxy's log shows apt's requests, and dockerd runs with the proxy (`docker info`, its environment), credentials
  with `%` and `$` intact through the shell-quoted, root-only /etc/default/docker; the systemd drop-in is rendered
  too (escaped `%`, 0600).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from devkit.rig_image import BASE_IMAGE

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFIX = f"{os.environ.get('VILMS_RIG_PREFIX', 'vilms-rig')}-edge-{uuid.uuid4().hex[:6]}"
COMPOSE_PLUGIN = Path.home() / ".docker" / "cli-plugins" / "docker-compose"
PID1 = 'trap "exit 0" TERM; sleep infinity & wait'
# The rig's SysV init workaround (ENVIRONMENT.md): Debian's init script raises ulimit beyond the container's limit.
ULIMIT = 'ulimit() { builtin ulimit "$@" 2>/dev/null || true; }'
# What `nvidia-ctk runtime configure --runtime=docker` writes (JetPack 6).
JETPACK_DAEMON_JSON = '{\n    "runtimes": {\n        "nvidia": {\n            "args": [],\n' \
                      '            "path": "nvidia-container-runtime"\n        }\n    }\n}\n'
WAIT_DOCKERD = "for i in $(seq 300); do docker info >/dev/null 2>&1 && break; sleep 0.1; done; docker info >/dev/null"


def sh(*args: str, check: bool = True, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=timeout, **kw)


def box_sh(box: str, script: str, check: bool = True, timeout: int = 120) -> str:
    result = sh("docker", "exec", box, "bash", "-c", script, check=False, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{box}: {script!r} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout.strip()


def start_box(name: str, *docker_args: str) -> str:
    sh("docker", "rm", "-fv", name, check=False)
    sh("docker", "run", "-d", "--name", name, "--hostname", name, "--privileged", "--cgroupns", "private",
       "-v", "/var/lib/docker", *docker_args, BASE_IMAGE, "bash", "-c", PID1)
    return name


def playbook(tmp: Path, box: str, roles: list[str], extra: dict, log: str) -> tuple[int, str]:
    inventory = tmp / f"{log}.inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {box: {
        "ansible_connection": "community.docker.docker", "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_user": "root", **extra}}}}))
    play = tmp / f"{log}.play.yml"
    play.write_text(yaml.safe_dump([{"name": "Edge docker", "hosts": "all", "gather_facts": True,
                                     "roles": [{"role": r} for r in roles]}]))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_ROLES_PATH": str(ROOT / "roles")}
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(play)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    return run.returncode, run.stdout + run.stderr


def state(box: str) -> dict:
    """What must not move: dockerd's pid, daemon.json's bytes, the foreign container, the default runtime, the engine
    packages."""
    info = json.loads(sh("docker", "exec", box, "docker", "inspect", "foreign").stdout)[0]
    return {
        "dockerd_pid": box_sh(box, "cat /var/run/docker.pid"),
        "daemon_json": box_sh(box, "sha256sum /etc/docker/daemon.json"),
        "foreign": (info["Id"], info["State"]["Running"], info["State"]["StartedAt"], info["HostConfig"]["Runtime"]),
        "default_runtime": box_sh(box, "docker info --format '{{.DefaultRuntime}}'"),
        "packages": box_sh(box, "dpkg-query -W -f='${db:Status-Abbrev}${Package}\\n' docker.io docker-ce"
                                " containerd.io 2>/dev/null | awk '$1 == \"ii\" {print $2}' || true"),
    }


@pytest.fixture()
def jetson_box(rig):
    name = start_box(f"{PREFIX}-jetson")
    try:
        yield name
    finally:
        sh("docker", "rm", "-fv", name, check=False)


@pytest.mark.timeout(300)
@pytest.mark.molecule
def test_existing_docker_io_and_a_foreign_container_are_kept(jetson_box, tmp_path):
    box = jetson_box
    # JetPack-like arrival: L4T release, the CSV runtime (a runc shim), its daemon.json; then docker.io, running.
    box_sh(box, f"""set -e
        mkdir -p /etc/docker && printf '%s' '{JETPACK_DAEMON_JSON}' >/etc/docker/daemon.json
        printf '%s\\n' '{ULIMIT}' >/etc/default/docker
        printf '#!/bin/sh\\nexec runc "$@"\\n' >/usr/bin/nvidia-container-runtime && chmod 755 /usr/bin/nvidia-container-runtime
        echo '# R36 (release), REVISION: 4.0, GCID: 0, BOARD: generic, EABI: aarch64' >/etc/nv_tegra_release
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Options::=--force-confold --no-install-recommends docker.io >/dev/null
        service docker start >/dev/null 2>&1 || true
        {WAIT_DOCKERD}
        # A foreign image made of what the box has: sleep and the libraries it needs.
        tar -ch /usr/bin/sleep /lib/x86_64-linux-gnu/libc.so.6 /lib64/ld-linux-x86-64.so.2 2>/dev/null \\
          | docker import - foreign:1 >/dev/null
        docker run -d --name foreign --restart=always foreign:1 /usr/bin/sleep infinity >/dev/null""", timeout=180)
    before = state(box)
    assert before["foreign"][1] and before["packages"] == "docker.io", before

    # Forcing Docker's packages over docker.io is refused before anything changes.
    rc, out = playbook(tmp_path, box, ["docker_engine"], {"docker_engine_source": "docker"}, "forced")
    assert rc != 0 and "docker.io" in out and "conflicting with docker-ce" in out, out[-3000:]
    assert "Nothing was changed" in out and "changed=0" in out, out[-3000:]
    assert box_sh(box, "ls /etc/apt/sources.list.d/") == "" and state(box) == before

    jetson = {"docker_engine_compose_plugin_src": str(COMPOSE_PLUGIN), "jetson_runtime_packages": [],
              "jetson_runtime_architecture": "aarch64"}
    rc, out = playbook(tmp_path, box, ["docker_engine", "jetson_runtime"], jetson, "converge")
    assert rc == 0, out[-6000:]
    assert state(box) == before, (state(box), before, out[-4000:])
    assert box_sh(box, "cat /etc/docker/daemon.json") + "\n" == JETPACK_DAEMON_JSON  # not rewritten (bytes: state())
    assert box_sh(box, "docker compose version --short")  # the one missing piece was added
    assert box_sh(box, "test -e /etc/systemd/system/docker.service.d/vilms-proxy.conf || echo none") == "none"

    rc, again = playbook(tmp_path, box, ["docker_engine", "jetson_runtime"], jetson, "rerun")
    assert rc == 0 and "changed=0" in again and "failed=0" in again, again[-4000:]
    assert state(box) == before


@pytest.fixture()
def proxied_box(rig):
    """A box on an --internal network; tinyproxy on that network and the default bridge is its only way out."""
    net, proxy, box = f"{PREFIX}-internal", f"{PREFIX}-proxy", f"{PREFIX}-proxied"
    sh("docker", "network", "create", "--internal", net)
    try:
        start_box(proxy)
        box_sh(proxy, """set -e
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tinyproxy >/dev/null
            sed -i -e 's/^Allow /#Allow /' -e 's/^LogLevel .*/LogLevel Connect/' /etc/tinyproxy/tinyproxy.conf
            mkdir -p /var/log/tinyproxy /run/tinyproxy && chown -R tinyproxy /var/log/tinyproxy /run/tinyproxy""",
               timeout=180)
        sh("docker", "network", "connect", net, proxy)
        sh("docker", "exec", "-d", proxy, "tinyproxy", "-d", "-c", "/etc/tinyproxy/tinyproxy.conf")
        box_sh(proxy, "for i in $(seq 100); do (: </dev/tcp/127.0.0.1/8888) 2>/dev/null && exit 0; sleep 0.1; done; exit 1")
        start_box(box, "--network", net)
        yield box, proxy
    finally:
        sh("docker", "rm", "-fv", box, proxy, check=False)
        sh("docker", "network", "rm", net, check=False)


@pytest.mark.timeout(300)
@pytest.mark.molecule
def test_a_box_behind_a_proxy_installs_docker_through_it(proxied_box, tmp_path):
    box, proxy = proxied_box
    # Credentials with `%` (a systemd specifier) and `$` (a shell expansion); tinyproxy without BasicAuth takes any.
    url = f"http://vilms:s3cr%40t$x@{proxy}:8888"
    # No route out but the proxy (apt directly, not the role: the apt module's retries would cost half a minute).
    direct = sh("docker", "exec", box, "apt-get", "update", "-o", "Acquire::Retries=0", check=False, timeout=60)
    said = direct.stdout + direct.stderr
    assert "Err:" in said and "Hit:" not in said and "Get:" not in said, said

    proxied = {"docker_engine_source": "distro",
               "vilms_proxy": {"http": url, "https": url, "no_proxy": ["localhost", "127.0.0.1"]}}
    rc, out = playbook(tmp_path, box, ["docker_engine"], proxied, "proxy")
    assert rc == 0, out[-6000:]
    assert "s3cr" not in out, out[-3000:]  # no_log / diff: false on what holds the proxy
    log = box_sh(proxy, "cat /var/log/tinyproxy/tinyproxy.log")
    assert "deb.debian.org" in log and "docker.io" in log, log[-3000:]
    assert f"export HTTPS_PROXY={shlex.quote(url)}" in box_sh(box, "cat /etc/default/docker")
    assert box_sh(box, "stat -c %a /etc/default/docker") == "600"
    # dockerd got the URL intact through the init script's shell (docker info masks the credentials).
    assert box_sh(box, f"{WAIT_DOCKERD}; tr '\\0' '\\n' </proc/$(cat /var/run/docker.pid)/environ"
                       " | grep '^HTTPS_PROXY='") == f"HTTPS_PROXY={url}"
    shown = box_sh(box, "docker info --format '{{.HTTPProxy}} {{.NoProxy}}'")
    assert shown.endswith(f"@{proxy}:8888 localhost,127.0.0.1") and "s3cr" not in shown, shown

    # The systemd drop-in (the rig's boxes have no systemd: rendered only, end_play before the restart handlers).
    play = tmp_path / "dropin.play.yml"
    play.write_text(yaml.safe_dump([{"name": "Drop-in", "hosts": "all", "gather_facts": False, "tasks": [
        {"name": "Render", "ansible.builtin.include_role": {"name": "docker_engine", "tasks_from": "proxy"},
         "vars": {"docker_engine_init": "systemd", "docker_engine_proxy_dropin": "/tmp/dropin/vilms-proxy.conf"}},
        {"name": "Stop before the handlers", "ansible.builtin.meta": "end_play"}]}]))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_ROLES_PATH": str(ROOT / "roles")}
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path / "proxy.inventory.yml"), str(play)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "s3cr" not in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    escaped = url.replace("%", "%%")
    assert box_sh(box, "cat /tmp/dropin/vilms-proxy.conf").splitlines()[2:] == [
        f'Environment="HTTP_PROXY={escaped}"', f'Environment="HTTPS_PROXY={escaped}"',
        'Environment="NO_PROXY=localhost,127.0.0.1"']
    assert box_sh(box, "stat -c %a /tmp/dropin/vilms-proxy.conf") == "600"
