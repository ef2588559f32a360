"""Edge networks, on one simulated box (a dgpu box of devkit/fleet.py, images from the fleet's site registry) and the
real site.yml: a disk too small for the update fails before anything on the box changes, naming the figures; a
registry that drops out while the box pulls is retried and the box converges.

One box for both tests (the disk test leaves it as it found it, so the second deploys onto a fresh box).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from devkit import fleet as fleetlib

pytestmark = [pytest.mark.docker, pytest.mark.ansible, pytest.mark.timeout(600)]

PREFIX = os.environ.get("VILMS_EDGE_TEST_PREFIX", "vilms-tedge")
TMPFS_BYTES = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def box(rig) -> Iterator[tuple[fleetlib.Fleet, str]]:
    assert fleetlib.REGISTRY_BINARY.exists(), "Debian's docker-registry package is not installed"
    f = fleetlib.Fleet(PREFIX)
    fleetlib.down(f)
    fleetlib.up(f, 1, registry=True)
    try:
        yield f, fleetlib.boxes(f)[0]
    finally:
        if not os.environ.get("VILMS_FLEET_KEEP"):
            fleetlib.down(f)


def box_sh(name: str, script: str) -> str:
    res = fleetlib.docker_client().containers.get(name).exec_run(["sh", "-c", script])
    assert res.exit_code == 0, res.output.decode()[-2000:]
    return res.output.decode()


def set_host_vars(f: fleetlib.Fleet, name: str, data: dict[str, Any]) -> None:
    (f.inventory / "host_vars" / f"{name}.yml").write_text("---\n" + yaml.safe_dump(data, sort_keys=False))


def site_command(f: fleetlib.Fleet, extra: dict[str, Any]) -> list[str]:
    return [str(Path(sys.executable).with_name("ansible-playbook")), str(fleetlib.ROOT / "site.yml"),
            "-i", str(f.inventory), "-e", json.dumps({"vilms_rollout_batches": ["100%"], **extra})]


def latest_report(f: fleetlib.Fleet) -> dict[str, Any]:
    return json.loads((f.reports / "latest.json").read_text())


def test_a_box_whose_disk_is_too_small_fails_before_anything_changes(box):
    """Archives to ship: the rig's engines and gateway archives (the box has neither). Its archive directory is a
    64 MiB tmpfs: the largest archive does not fit there, while Docker's data root (another filesystem) has room."""
    f, name = box
    images = fleetlib.rig_cache() / "images"
    archives = [{"image": "vilms-rig/engines:standin", "src": str(images / "engines.tar")},
                {"image": "vilms/gateway:rig", "src": str(images / "gateway.tar")}]
    largest = max(os.path.getsize(a["src"]) for a in archives)
    assert largest > TMPFS_BYTES
    set_host_vars(f, name, {"vilms_stack_image_source": "archive", "vilms_stack_image_archives": archives})
    box_sh(name, f"mkdir -p /opt/vilms/images && mount -t tmpfs -o size={TMPFS_BYTES} vilms-edge /opt/vilms/images")
    log = f.state / "test-disk.log"
    try:
        with open(log, "w") as out:
            rc = subprocess.run(site_command(f, {}), cwd=fleetlib.ROOT, env=fleetlib.ansible_env(f, report=True),
                                stdout=out, stderr=subprocess.STDOUT, timeout=400).returncode
        text = log.read_text()
        # Nothing of the stack changed: no release, no lock, no archive shipped, no image loaded, no container.
        assert box_sh(name, "ls -A /opt/vilms").split() == ["images"], text[-4000:]
        assert box_sh(name, "ls -A /opt/vilms/images") == ""
        assert box_sh(name, "docker images -q; docker ps -aq") == ""
    finally:
        fleetlib.docker_client().containers.get(name).exec_run(["sh", "-c", "umount /opt/vilms/images; rm -rf /opt/vilms"])
        set_host_vars(f, name, {})
    assert rc != 0
    host = latest_report(f)["hosts"][name]
    assert host["outcome"] == "failed" and host["failed_task"] == "Images | Disk budget (each archive, then the layers loading it adds)", host
    error = host["error"]
    assert error.startswith(f"{name}: not enough disk for the image archives:"), error
    # the figures: bytes needed (the largest archive: they are shipped and removed one at a time), bytes free, path
    assert f"{largest} bytes needed for archives (one at a time) in /opt/vilms/images, {TMPFS_BYTES} free on " \
           f"/opt/vilms/images" in error, error
    for a in archives:
        assert f"{a['image']}: archive {os.path.getsize(a['src'])} bytes" in error, error
    assert error.endswith("Nothing was changed."), error


def test_a_registry_that_drops_out_mid_run_is_retried_and_the_box_converges(box):
    """The site registry is down when the box starts pulling; it comes back when the play reports the first retry
    of the pull (the test waits on that line, not on time). The same run converges: deployed and gated."""
    f, name = box
    registry = fleetlib.docker_client().containers.get(f.registry)
    registry.stop(timeout=1)
    log = f.state / "test-retry.log"
    restarted_after: list[str] = []
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(site_command(f, {"vilms_retry_delay": 2}), cwd=fleetlib.ROOT,
                                    env={**fleetlib.ansible_env(f, report=True), "PYTHONUNBUFFERED": "1"},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if not restarted_after and line.startswith("FAILED - RETRYING:") and "Images | Pull every image" in line:
                    registry.start()
                    restarted_after.append(line.strip())
            rc = proc.wait(timeout=60)
    finally:
        registry.reload()
        if registry.status != "running":
            registry.start()
    text = log.read_text()
    assert restarted_after, f"the pull was never retried; last lines:\n{text[-4000:]}"
    assert f"[{name}]" in restarted_after[0]
    assert rc == 0, text[-6000:]
    host = latest_report(f)["hosts"][name]
    assert host["outcome"] == "updated", host
    assert box_sh(name, "readlink /opt/vilms/current").startswith("releases/")
    running = box_sh(name, "docker ps --format '{{.Names}} {{.Status}}'")
    assert "gateway" in running and "(healthy)" in running, running
