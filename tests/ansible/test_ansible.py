"""Playbooks parse, roles lint clean (production profile), and preflight is the gate for bad inventories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ansible

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def ansible(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("playbook", ["site.yml", "playbooks/site.yml"])
def test_syntax_check(playbook):
    result = ansible(str(BIN / "ansible-playbook"), playbook, "--syntax-check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_lint_production_profile_is_clean():
    result = ansible(str(BIN / "ansible-lint"), "--profile", "production", "--nocolor", timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.parametrize("inventory", ["inventories/example/hosts.yml", "inventories/local/hosts.yml"])
def test_shipped_inventories_pass_preflight(inventory):
    result = ansible(str(BIN / "ansible-playbook"), "site.yml", "-i", inventory, "--tags", "preflight")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "failed=0" in result.stdout and "unreachable=0" in result.stdout


GOOD = {"host": {"platform": "dgpu"}, "serving": {"engine": "vllm", "models": [{"name": "m1", "aliases": ["LLM"]}]},
        "gateway": {"allow-anonymous": True}}


def write_inventory(tmp: Path, all_vars: dict, host_vars: dict[str, dict] | None = None,
                    jetsons: tuple[str, ...] = ()) -> Path:
    hosts = {"all": {"children": {"dgpu": {"hosts": {"gpu-a.invalid": None, "gpu-b.invalid": None}},
                                  "jetsons": {"hosts": {h: None for h in jetsons}}}}}
    (tmp / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (tmp / "group_vars").mkdir()
    (tmp / "group_vars" / "all.yml").write_text(yaml.safe_dump(all_vars))
    if host_vars:
        (tmp / "host_vars").mkdir()
        for host, values in host_vars.items():
            (tmp / "host_vars" / f"{host}.yml").write_text(yaml.safe_dump(values))
    return tmp / "hosts.yml"


BAD = {
    "schema-enum": ({"vilms_config": {**GOOD, "serving": {**GOOD["serving"], "engine": "tgi"}}}, None, (),
                    ["gpu-a.invalid: invalid model config", "/serving/engine"]),
    "host-param-typo": ({"vilms_config": GOOD},
                        {"gpu-b.invalid": {"vilms_config_host": {"serving": {"models": [{"name": "m1", "params": [{"temprature": 1}]}]}}}},
                        (), ["gpu-b.invalid: invalid model config", "/serving/models/0/params"]),
    "alias-loop": ({"vilms_config": {**GOOD, "model-aliases": {"A": "B", "B": "A"}}}, None, (),
                   ["gpu-a.invalid: invalid model config", "/model-aliases/", "alias loop"]),
    "alias-conflict": ({"vilms_config": {**GOOD, "model-aliases": {"LLM": "m2"},
                                         "serving": {"engine": "vllm", "models": [{"name": "m1", "aliases": ["LLM"]}, {"name": "m2"}]}}},
                       None, (), ["different targets"]),
    "published-without-keys": ({"vilms_config": {k: v for k, v in GOOD.items() if k != "gateway"}}, None, (),
                               ["gpu-a.invalid: invalid model config", "/gateway", "no API keys are configured"]),
    "jetson-platform": ({"vilms_config": GOOD}, None, ("jetson-x.invalid",),
                        ["jetson-x.invalid: /host/platform is 'dgpu'"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inventory_fails_in_preflight_before_any_host_is_touched(tmp_path, case):
    all_vars, host_vars, jetsons, expected = BAD[case]
    inventory = write_inventory(tmp_path, all_vars, host_vars, jetsons)
    # The hosts do not exist (.invalid never resolves): reaching any of them would show as UNREACHABLE.
    result = ansible(str(BIN / "ansible-playbook"), "site.yml", "-i", str(inventory))
    out = result.stdout
    assert result.returncode != 0
    for text in expected:
        assert text in out, out[-3000:]
    assert "UNREACHABLE" not in out and "Gathering Facts" not in out
    assert "PLAY [Runtime" not in out and "PLAY [Stack" not in out


def _save_archive(path: Path, manifest: list[dict], configs: dict[str, list[str]] | None = None,
                  layers: dict[str, bytes] | None = None) -> None:
    """A `docker save`-shaped tar: manifest.json, each image's config (its rootfs.diff_ids) and its layer tars."""
    import io
    import json
    import tarfile

    files = {"manifest.json": json.dumps(manifest).encode()}
    for name, diff_ids in (configs or {}).items():
        files[name] = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    files.update(layers or {})
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_archive_ids_reads_each_tags_image_id_size_and_layers_from_the_archive(tmp_path):
    """The role loads an archive when these IDs differ from the host's; both save layouts name the config blob. The
    disk budget takes the archive's size and each layer's diff ID (as the host names layers) with its tar's size."""
    import json

    legacy, oci = tmp_path / "legacy.tar", tmp_path / "oci.tar"
    _save_archive(legacy, [{"Config": "ab12.json", "RepoTags": ["vilms/gateway:1", "vilms/gateway:latest"],
                            "Layers": ["l1/layer.tar", "l2/layer.tar"]}],
                  {"ab12.json": ["sha256:d1", "sha256:d2"]}, {"l1/layer.tar": b"x" * 1024, "l2/layer.tar": b"y" * 512})
    _save_archive(oci, [{"Config": "blobs/sha256/cd34", "RepoTags": ["e:1"], "Layers": ["blobs/sha256/d1"]},
                        {"Config": "blobs/sha256/ef56", "RepoTags": ["e:2"], "Layers": ["blobs/sha256/d1", "blobs/sha256/d3"]}],
                  {"blobs/sha256/cd34": ["sha256:d1"], "blobs/sha256/ef56": ["sha256:d1", "sha256:d3"]},
                  {"blobs/sha256/d1": b"z" * 2048, "blobs/sha256/d3": b"w" * 100})
    script = ROOT / "roles" / "vilms_stack" / "files" / "archive_ids.py"
    result = subprocess.run([sys.executable, str(script), str(legacy), str(oci)], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == {
        str(legacy): {"tags": ["vilms/gateway:1", "vilms/gateway:latest"], "ids": ["sha256:ab12", "sha256:ab12"],
                      "bytes": legacy.stat().st_size, "layers": [["sha256:d1", 1024], ["sha256:d2", 512]]},
        str(oci): {"tags": ["e:1", "e:2"], "ids": ["sha256:cd34", "sha256:ef56"],
                   "bytes": oci.stat().st_size, "layers": [["sha256:d1", 2048], ["sha256:d3", 100]]}}
    untagged = tmp_path / "untagged.tar"
    _save_archive(untagged, [{"Config": "ab12.json", "RepoTags": None, "Layers": []}], {"ab12.json": []})
    bad = subprocess.run([sys.executable, str(script), str(untagged)], capture_output=True, text=True)
    assert bad.returncode != 0 and "carry no tag" in bad.stderr


def test_image_archive_budget_counts_each_archive_then_the_layers_the_host_lacks(tmp_path):
    """The disk budget's arithmetic (library/vilms_images_probe.py): archives ship and are removed one at a time;
    layers the host has (or an earlier archive of this run loaded) are not counted again; a partial archive left
    by an interrupted rsync is resumed in place; an archive whose IDs the host already has is not shipped."""
    import json

    def plan(archives, present, same_fs):
        # in a child: importing ansible.module_utils patches sys.intern for the whole pytest process
        # (the role's module_utils/ joins ansible.module_utils, as Ansible does when it ships the module)
        code = ("import json, sys; sys.path.insert(0, sys.argv[1] + '/library'); import ansible.module_utils as mu; "
                "mu.__path__.append(sys.argv[1] + '/module_utils'); import vilms_images_probe as p; "
                "a = json.loads(sys.argv[2]); print(json.dumps(p.plan(a[0], a[1], a[2], a[3])))")
        out = subprocess.run([sys.executable, "-c", code, str(ROOT / "roles" / "vilms_stack"),
                              json.dumps([archives, present, str(tmp_path), same_fs])],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    archives = [
        {"image": "e:1", "src": "/c/engines.tar", "bytes": 1000, "ids": ["sha256:e"], "layers": [["b", 600], ["e", 390]]},
        {"image": "g:1", "src": "/c/gateway.tar", "bytes": 800, "ids": ["sha256:g"], "layers": [["b", 600], ["g", 190]]},
        {"image": "o:1", "src": "/c/old.tar", "bytes": 5000, "ids": ["sha256:o"], "layers": [["o", 4990]]},
    ]
    present = [[], [{"Id": "sha256:g0", "RootFS": {"Layers": ["g"]}}], [{"Id": "sha256:o", "RootFS": {"Layers": ["o"]}}]]
    (tmp_path / "gateway.tar").write_bytes(b"p" * 300)  # an interrupted transfer left 300 bytes
    todo, archive_dir, docker_root = plan(archives, present, same_fs=False)
    assert [(a["image"], a["archive_bytes"], a["partial_bytes"], a["layer_bytes"]) for a in todo] == [
        ("e:1", 1000, 0, 990), ("g:1", 800, 300, 0)]  # g's base layer came with e, its own layer is on the host
    assert (archive_dir, docker_root) == (1000, 990)  # the largest archive; every new layer
    todo, archive_dir, docker_root = plan(archives, present, same_fs=True)
    assert (archive_dir, docker_root) == (max(1000 + 990, 990 + 500 + 0), 0)  # peak over the archives, in order


def test_the_role_validates_only_through_vilms_render():
    """One render's plan: no second validation path, no compose re-render, no guessed container names."""
    import re

    def tasks_of(role: str) -> str:
        return "\n".join(p.read_text() for p in (ROOT / "roles" / role / "tasks").glob("*.yml"))

    preflight, stack = tasks_of("vilms_preflight"), tasks_of("vilms_stack")
    assert re.search(r"^\s+- render$", preflight, re.M)  # the preflight renders ...
    assert not re.search(r"^\s+- (render|retag|plan)$|'(render|retag|plan)'", stack, re.M)  # ... the stack reads
    tasks = preflight + stack
    for banned in ("ansible.utils.validate", "'validate'", "--models-json", "'compose'", "-ollama-1",
                   "docker_container_exec"):
        assert banned not in tasks, banned
