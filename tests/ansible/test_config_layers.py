"""Layered config (docs/config.md "Layered config"): vilms_config <- vilms_config_group <- vilms_config__* sorted by
name <- vilms_config_host; maps merge, lists are replaced, each layer templated for its host.

Read through `effective_configs`, which is what `vilms plan --inventory` plans from: it runs vilms_preflight's own
merge (tasks/effective.yml) with ansible-playbook, no host contacted; the preflight's render reads the same. `community.general.merge_variables` would fail
the list assertions here (it appends the SKU's models to the fleet's); a merge in the order of the group tree would
fail the `__90_late` one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ansible.fleet_hosts import BIN, ansible_env

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ansible

FLEET = {"vilms_config": {
    "host": {"platform": "dgpu"},
    "serving": {"engine": "vllm", "default-max-frames": 8, "models": [{"name": "Qwen/Qwen2.5-7B-Instruct", "aliases": ["LLM"]}]},
    "docker": {"tag": {"gateway": "{{ site_gateway_tag }}"}, "project-name": "vilms-{{ inventory_hostname | replace('.', '-') }}"},
    "gateway": {"api-keys": [{"name": "apps", "key": "{{ site_key }}"}]}},
    "site_gateway_tag": "0.1.0", "site_key": "k" * 24,
    # In group_vars/all, the top of the tree, yet merged after every __2x layer: the order is the name's.
    "vilms_config__90_late": {"serving": {"default-max-frames": 1}}}


def write_inventory(tmp: Path, **layers: dict) -> Path:
    """all > jetsons > {nano, nx}; nano-1, nano-2 (with a host_vars exception), nx-1; and dgpu's gpu-1."""
    hosts = {"all": {"children": {
        "dgpu": {"hosts": {"gpu-1": None}},
        "jetsons": {"children": {"nano": {"hosts": {"nano-1": None, "nano-2": None}}, "nx": {"hosts": {"nx-1": None}}}}}}}
    (tmp / "hosts.yml").write_text(yaml.safe_dump(hosts))
    files = {"group_vars/all.yml": FLEET,
             # the older inventories' group layer: merged before every __ layer
             "group_vars/jetsons.yml": {"vilms_config_group": {
                 "host": {"platform": "js"}, "serving": {"engine": "ollama", "default-max-frames": 4,
                                                         "models": [{"name": "qwen2.5vl:3b", "aliases": ["LLM", "VLM"]}]}}},
             "group_vars/nano.yml": {"vilms_config__20_sku_nano": {
                 "host": {"memory-gb": 8}, "serving": {"default-max-frames": 3, "models": [{"name": "qwen2.5:1.5b", "aliases": ["LLM"]}]}}},
             "group_vars/nx.yml": {"vilms_config__20_sku_nx": {"host": {"memory-gb": 16}},
                                   "vilms_config__50_empty": None},
             "host_vars/nano-2.yml": {"vilms_config_host": {"serving": {"default-max-frames": 2}}},
             **layers}
    for name, data in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(yaml.safe_dump(data))
    return tmp / "hosts.yml"


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ['PATH']}")
    for name in ("ANSIBLE_CONFIG", "ANSIBLE_ROLES_PATH", "VILMS_PREFLIGHT_ROLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ansible.cfg of the checkout: the role is found by path, as installed users get it


def test_layers_merge_in_the_documented_order(tmp_path, env):
    from vilms.deploy.capacity_inventory import effective_configs

    hosts = effective_configs(str(write_inventory(tmp_path)))
    assert {h: e["layers"] for h, e in hosts.items()} == {
        "gpu-1": ["vilms_config", "vilms_config__90_late"],
        "nano-1": ["vilms_config", "vilms_config_group", "vilms_config__20_sku_nano", "vilms_config__90_late"],
        "nano-2": ["vilms_config", "vilms_config_group", "vilms_config__20_sku_nano", "vilms_config__90_late",
                   "vilms_config_host"],
        "nx-1": ["vilms_config", "vilms_config_group", "vilms_config__20_sku_nx", "vilms_config__50_empty",
                 "vilms_config__90_late"]}
    config = {h: e["config"] for h, e in hosts.items()}
    # lists are replaced whole: each SKU's models, not the fleet's plus the group's plus the SKU's
    assert [m["name"] for m in config["nano-1"]["serving"]["models"]] == ["qwen2.5:1.5b"]
    assert [m["name"] for m in config["nx-1"]["serving"]["models"]] == ["qwen2.5vl:3b"]  # the NX layer sets none
    assert [m["name"] for m in config["gpu-1"]["serving"]["models"]] == ["Qwen/Qwen2.5-7B-Instruct"]
    # maps merge key by key; later wins: __90_late over __20_sku_nano, the host's exception over everything
    assert {h: c["serving"]["default-max-frames"] for h, c in config.items()} == {
        "gpu-1": 1, "nano-1": 1, "nano-2": 2, "nx-1": 1}
    assert config["nano-1"]["host"] == {"platform": "js", "memory-gb": 8}
    assert config["nx-1"]["host"] == {"platform": "js", "memory-gb": 16}
    assert config["nano-1"]["serving"]["engine"] == "ollama" and config["gpu-1"]["serving"]["engine"] == "vllm"
    # every layer templated for its own host
    assert {h: c["docker"]["project-name"] for h, c in config.items()} == {h: f"vilms-{h}" for h in config}
    assert all(c["docker"]["tag"]["gateway"] == "0.1.0" and c["gateway"]["api-keys"][0]["key"] == "k" * 24
               for c in config.values())
    assert {h: e["gpu"] for h, e in hosts.items()} == dict.fromkeys(config, True)


def test_a_layer_that_is_not_a_map_stops_its_host_in_both_paths(tmp_path, env):
    """Left out of the merge and named: by `vilms plan --inventory` and by the preflight's render."""
    from vilms.deploy.capacity_inventory import HostError, plan_inventory

    inventory = write_inventory(tmp_path, **{"host_vars/nx-1.yml": {"vilms_config__30_rack": ["not", "a", "map"]}})
    expected = ("config layers must be maps (as in config.yaml): vilms_config__30_rack (merge order: vilms_config <- "
                "vilms_config_group <- vilms_config__20_sku_nx <- vilms_config__30_rack <- vilms_config__50_empty <- "
                "vilms_config__90_late)")
    planned = {r.host: r for r in plan_inventory(str(inventory))}
    assert isinstance(planned["nx-1"], HostError) and expected in planned["nx-1"].message
    assert not isinstance(planned["nano-1"], HostError)  # the other hosts are planned
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(ROOT / "site.yml"), "--tags", "preflight"],
                         cwd=ROOT, env=ansible_env(tmp_path, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
                                                   ANSIBLE_ROLES_PATH=str(ROOT / "roles"), VILMS_FLEET_REPORT="off"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert f"nx-1: invalid model config: [/: {expected}]" in " ".join(run.stdout.split()), run.stdout[-3000:]


def test_vaulted_values_resolve_with_the_vault_password(tmp_path, env):
    """`vilms plan --inventory --vault-password-file`: a vaulted key in a layer resolves as in a run."""
    from vilms.deploy.capacity_inventory import effective_configs

    password = tmp_path / "vault-pass"
    password.write_text("correct horse battery staple\n")
    vaulted = subprocess.run([str(BIN / "ansible-vault"), "encrypt_string", "--vault-password-file", str(password),
                              "sk-vaulted-5f0c1d2e3a4b", "--name", "site_key"], capture_output=True, text=True,
                             check=True).stdout
    inventory = write_inventory(tmp_path)
    fleet = yaml.safe_load((tmp_path / "group_vars" / "all.yml").read_text())
    del fleet["site_key"]
    (tmp_path / "group_vars" / "all.yml").write_text(yaml.safe_dump(fleet) + vaulted)
    hosts = effective_configs(str(inventory), vault_password_file=str(password))
    assert {e["config"]["gateway"]["api-keys"][0]["key"] for e in hosts.values()} == {"sk-vaulted-5f0c1d2e3a4b"}
    with pytest.raises(ValueError, match="could not be read") as caught:
        effective_configs(str(inventory))
    assert "gpu-1, nano-1, nano-2, nx-1: the merge failed" in str(caught.value) and "--vault-password-file" in str(caught.value)
