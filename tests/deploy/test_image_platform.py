"""The right architecture on every host: the arm64 gateway image for Jetsons, and archives that say what they are.

The rig (`devkit/rig/rig.sh images`, run by `make test` before pytest) builds the Jetson gateway with
`gateway/cross_image.py` (no emulation) beside the controller-architecture one from the Dockerfile. Docker itself
loads the arm64 archive and reports its architecture; where QEMU's aarch64 interpreter is registered
(`make system` does it when the kernel allows) the image also answers /health_check under emulation.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from vilms.deploy import images

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "rig" / "images"
QEMU = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")


def vilms(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vilms", *args], capture_output=True, text=True, timeout=120)


def oci_layout(tmp_path: Path, architecture: str) -> Path:
    """A one-image OCI layout tar (index -> manifest -> config), as `docker save` of Docker 25+ or skopeo write."""
    blobs: dict[str, bytes] = {}

    def blob(data: dict) -> dict:
        raw = json.dumps(data).encode()
        digest = "sha256:" + __import__("hashlib").sha256(raw).hexdigest()
        blobs[digest] = raw
        return {"digest": digest, "size": len(raw)}

    config = blob({"architecture": architecture, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
    manifest = blob({"schemaVersion": 2, "config": config, "layers": []})
    path = tmp_path / f"oci-{architecture}.tar"
    with tarfile.open(path, "w") as tar:
        for name, raw in [("index.json", json.dumps({"manifests": [manifest]}).encode()),
                          *((f"blobs/sha256/{d.split(':')[1]}", b) for d, b in blobs.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def docker_save(tmp_path: Path, architectures: list[str]) -> Path:
    """A `docker save` archive of several images (manifest.json lists each config), one per architecture."""
    path = tmp_path / f"save-{'-'.join(architectures)}.tar"
    configs = {f"{i:064x}.json": json.dumps({"architecture": a, "os": "linux"}).encode()
               for i, a in enumerate(architectures, start=1)}
    manifest = [{"Config": name, "RepoTags": [f"img{i}:x"], "Layers": []} for i, name in enumerate(configs)]
    with tarfile.open(path, "w") as tar:
        for name, raw in [("manifest.json", json.dumps(manifest).encode()), *configs.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_every_image_of_an_archive_is_checked_not_only_the_first(tmp_path):
    assert images.mismatch(docker_save(tmp_path, ["arm64", "arm64"]), "aarch64") is None
    why = images.mismatch(docker_save(tmp_path, ["arm64", "amd64"]), "aarch64")
    assert why is not None and "built for linux/amd64 but the host is aarch64" in why


def test_oci_layouts_and_bad_archives(tmp_path):
    assert str(images.archive_platform(oci_layout(tmp_path, "arm64"))) == "linux/arm64"
    assert images.mismatch(oci_layout(tmp_path, "arm64"), "aarch64") is None
    assert "built for linux/amd64 but the host is aarch64 (arm64)" in images.mismatch(oci_layout(tmp_path, "amd64"),
                                                                                      "aarch64")
    junk = tmp_path / "junk.tar"
    with tarfile.open(junk, "w") as tar:
        tar.addfile(tarfile.TarInfo("hello"), io.BytesIO(b""))
    with pytest.raises(images.ArchiveError, match="neither a docker-save archive"):
        images.archive_platform(junk)
    (tmp_path / "not-a-tar").write_text("x")
    with pytest.raises(images.ArchiveError, match="cannot read"):
        images.archive_platform(tmp_path / "not-a-tar")


@pytest.mark.docker
def test_the_controller_image_is_refused_for_a_jetson_and_the_arm64_one_accepted(rig):
    amd64, arm64 = CACHE / "gateway.tar", CACHE / "gateway-arm64.tar"
    refused = vilms("image", "platform", str(amd64), "--machine", "aarch64")
    assert refused.returncode == 1
    assert "gateway.tar is built for linux/amd64 but the host is aarch64 (arm64)" in refused.stderr
    accepted = vilms("image", "platform", str(arm64), "--machine", "aarch64")
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["platforms"] == {str(arm64): "linux/arm64/v8"}


@pytest.mark.docker
def test_the_arm64_image_loads_as_arm64_and_answers_under_emulation(rig, tmp_path):
    subprocess.run(["docker", "load", "-i", str(CACHE / "gateway-arm64.tar")], check=True, capture_output=True)
    inspect = json.loads(subprocess.run(["docker", "image", "inspect", "vilms/gateway:rig-arm64"], check=True,
                                        capture_output=True, text=True).stdout)[0]
    assert (inspect["Architecture"], inspect["Os"], inspect["Config"]["User"]) == ("arm64", "linux", "10001:10001")
    if not QEMU.exists():
        pytest.skip("no aarch64 interpreter registered with binfmt_misc: the image cannot run on this machine")
    config = tmp_path / "config.yaml"
    config.write_text("host: {platform: dgpu}\nserving: {engine: vllm, vllm-base-url: 'http://127.0.0.1:9', "
                      "models: [{name: tiny, type: llm}]}\nembedding: {enabled: false}\n"
                      "gateway: {allow-anonymous: true}\n")
    config.chmod(0o644)
    name = "vilms-test-arm64"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    subprocess.run(["docker", "run", "-d", "--name", name, "--platform", "linux/arm64", "-p", "127.0.0.1::8989",
                    "-v", f"{config}:/etc/vilms/config.yaml:ro", "vilms/gateway:rig-arm64", "vilms", "serve",
                    "--config", "/etc/vilms/config.yaml", "--host", "0.0.0.0"], check=True, capture_output=True)
    try:
        port = subprocess.run(["docker", "port", name, "8989/tcp"], check=True, capture_output=True,
                              text=True).stdout.split(":")[-1].strip()
        machine = subprocess.run(["docker", "exec", name, "uname", "-m"], capture_output=True, text=True).stdout
        assert machine.strip() == "aarch64"
        answer = None
        for _ in range(600):  # bounded: the emulated gateway starts in seconds
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/health_check", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)  # poll, bounded by the loop
        assert answer is not None and answer.status_code == 200 and answer.json() == {"status": "ok"}
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


PLAY = """
- hosts: box
  gather_facts: true
  tasks:
    - name: The stack's archive check, as site.yml runs it before anything changes
      ansible.builtin.include_role:
        name: vilms_stack
        tasks_from: image-platform.yml
"""


def stack_archive_check(tmp_path: Path, archive: Path, machine: str) -> subprocess.CompletedProcess:
    """The vilms_stack role's check on a local-connection host whose kernel says `machine` (the one stand-in)."""
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"box": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "vilms_stack_image_source": "archive",
        "vilms_stack_image_archives": [{"image": "vilms/gateway:x", "src": str(archive)}]}}}}))
    (tmp_path / "play.yml").write_text(PLAY)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "ANSIBLE_NOCOLOR": "1", "HOME": str(tmp_path)}
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
                           str(tmp_path / "play.yml"), "-e", f"vilms_stack_image_machine={machine}"],
                          capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)


@pytest.mark.ansible
def test_the_stack_refuses_an_amd64_archive_for_a_jetson_before_anything_changes(tmp_path):
    amd64 = oci_layout(tmp_path, "amd64")
    refused = stack_archive_check(tmp_path, amd64, "aarch64")
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert "box: vilms image platform: oci-amd64.tar is built for linux/amd64 but the host is aarch64 (arm64)" in \
        refused.stdout and "Nothing was changed." in refused.stdout, refused.stdout[-3000:]
    accepted = stack_archive_check(tmp_path, oci_layout(tmp_path, "arm64"), "aarch64")
    assert accepted.returncode == 0, accepted.stdout[-3000:]
