"""The preflight validates each host's config once per run on the controller, and the roles read the plan.

Before vilms_preflight, a run validated each host twice (`vilms render` in the first play, `vilms plan --config -`
again from a second Jinja merge in the facts play), merged the inventory layers three times, and probed L4T three
times; the counting test below fails on that code with two validations per host.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ansible.fleet_hosts import BIN, ansible_env, write_fleet

ROOT = Path(__file__).resolve().parents[2]
DGPU, JETSONS = ("gpu-a", "gpu-b"), ("orin-a",)

# Runs `python -m vilms ...` as the role asks, after wrapping the one validation entry point (build_config) so each
# call appends the command it served to a log: nothing of vilms is replaced, only counted.
COUNTING_PYTHON = """#!{python}
import json, os, runpy, sys
import vilms.config.load as load

_real = load.build_config
def build_config(*args, **kwargs):
    with open({log!r}, "a", encoding="utf-8") as fh:
        fh.write(json.dumps([os.getpid(), *sys.argv]) + "\\n")
    return _real(*args, **kwargs)
load.build_config = build_config

assert sys.argv[1:3] == ["-m", "vilms"], sys.argv
sys.argv = ["vilms", *sys.argv[3:]]
runpy.run_module("vilms", run_name="__main__", alter_sys=True)
"""


@pytest.mark.ansible
def test_one_validation_per_host_per_run_on_the_controller(tmp_path):
    log = tmp_path / "validations.log"
    counting = tmp_path / "counting-python"
    counting.write_text(COUNTING_PYTHON.format(python=sys.executable, log=str(log)))
    counting.chmod(0o755)
    inventory = write_fleet(tmp_path, DGPU, JETSONS, vilms_capacity_python=str(counting),
                            vilms_stack_controller_python=str(counting))  # the older roles ran vilms with both
    env = ansible_env(tmp_path, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
                      VILMS_FLEET_REPORT="off",
                      ANSIBLE_CALLBACKS_ENABLED="vilms_fleet_report")  # keep the renders to read them (no cleanup)
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(ROOT / "site.yml"),
                          "--tags", "preflight,preflight-facts"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # every validation is `vilms render --many`, one process for the whole run, one build_config per host
    assert {c[2] for c in calls} == {"render"} and all("--many" in c for c in calls), calls
    assert len({c[0] for c in calls}) == 1, "more than one render process"
    assert len(calls) == len(DGPU + JETSONS), calls
    # The Jetson's engine tag came from the one L4T probe into its render (retag, no validation), and the
    # capacity plan ran from that render for every host.
    renders = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / ".cache" / "vilms" / "rendered").glob("run-*/*/plan.json")}
    assert {h: renders[h]["engine_tag"] for h in JETSONS} == {"orin-a": "r36.4.0"}
    assert run.stdout.count("Capacity | Plan this host's models against its memory") == 1
    assert run.stdout.count("Jetson | Read the L4T release file]") == 1, "L4T probed more than once"


@pytest.mark.ansible
def test_the_inventory_proxy_reaches_the_engines_not_the_gateway(tmp_path):
    inventory = write_fleet(tmp_path, DGPU[:1], (), vilms_proxy={"https": "http://proxy.site:3128",
                                                                 "no_proxy": "corp.example,10.0.0.0/8"})
    env = ansible_env(tmp_path, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
                      VILMS_FLEET_REPORT="off",
                      ANSIBLE_CALLBACKS_ENABLED="vilms_fleet_report")  # keep the renders to read them (no cleanup)
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(ROOT / "site.yml"),
                          "--tags", "preflight"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    compose = next((tmp_path / ".cache" / "vilms" / "rendered").glob(f"run-*/{DGPU[0]}/docker-compose.yaml"))
    services = yaml.safe_load(compose.read_text())["services"]
    engines = [s for name, s in services.items() if name != "gateway"]
    assert engines and all(s["environment"]["HTTPS_PROXY"] == "http://proxy.site:3128" for s in engines)
    assert all(s["environment"]["NO_PROXY"].startswith("corp.example,10.0.0.0/8,") for s in engines)
    assert "HTTP_PROXY" not in engines[0]["environment"]  # only what the inventory set
    assert not [k for k in services["gateway"]["environment"] if "proxy" in k.lower()]
    assert not list((tmp_path / ".cache" / "vilms" / "rendered").glob("run-*/many.json"))  # the keys' file is gone


def _vaulted_fleet(tmp_path: Path, key: str, broken: bool = False) -> tuple[Path, Path]:
    """The stand-in fleet with its API key in Ansible Vault (group_vars/all/vault.yml), as operators keep it."""
    inventory = write_fleet(tmp_path, DGPU, JETSONS)
    data = yaml.safe_load(inventory.read_text())
    data["all"]["vars"]["vilms_config"]["gateway"] = {"api-keys": [{"name": "apps", "key": "{{ vault_key }}"}]}
    if broken:  # one host's config is invalid: the preflight stops every host
        data["all"]["children"]["dgpu"]["hosts"][DGPU[1]]["vilms_config_host"] = {"serving": {"default-max-frames": "x"}}
    inventory.write_text(yaml.safe_dump(data))
    password = tmp_path / "vault-pass"
    password.write_text("correct horse battery staple\n")
    vaulted = subprocess.run([str(BIN / "ansible-vault"), "encrypt_string", "--vault-password-file", str(password),
                              key, "--name", "vault_key"], capture_output=True, text=True, check=True).stdout
    (tmp_path / "group_vars" / "all").mkdir(parents=True)
    (tmp_path / "group_vars" / "all" / "vault.yml").write_text(vaulted)
    return inventory, password


@pytest.mark.ansible
@pytest.mark.parametrize("ending", ["preflight only", "invalid host"])
def test_no_decrypted_key_left_on_the_controller_however_the_run_ends(tmp_path, ending):
    """Before the render cleanup callback, `--tags preflight` left run-<pid>/<host>/keys.yaml with the key in clear."""
    key = "sk-vaulted-5f0c1d2e3a4b"
    inventory, password = _vaulted_fleet(tmp_path, key, broken=ending == "invalid host")
    env = ansible_env(tmp_path, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
                      VILMS_FLEET_REPORT="off")
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(ROOT / "site.yml"),
                          "--vault-password-file", str(password), "--tags", "preflight,preflight-facts"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert (run.returncode == 0) == (ending == "preflight only"), run.stdout[-3000:]
    if ending == "invalid host":
        assert f"{DGPU[1]}: invalid model config: [/serving/default-max-frames" in run.stdout
    cache = tmp_path / ".cache" / "vilms"
    leaks = [p for p in cache.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert leaks == []
    assert key not in run.stdout + run.stderr


def _nominal_orin_nano_gb() -> int:
    """The Orin Nano size (4 or 8 GB) nearest this machine's MemTotal: what the stand-in Jetson's probe finds."""
    kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return min((4, 8), key=lambda size: abs(size - kib / 2**20))


@pytest.mark.ansible
def test_a_declared_memory_the_probe_contradicts_fails_the_facts_preflight_naming_both(tmp_path):
    """orin-a declares 32 GB on a board the probe finds to be an Orin Nano; orin-b declares what the probe finds."""
    inventory = write_fleet(tmp_path, (), ("orin-a", "orin-b"))
    data = yaml.safe_load(inventory.read_text())
    hosts = data["all"]["children"]["jetsons"]["hosts"]
    hosts["orin-a"] = {**hosts["orin-a"], "vilms_config_host": {"host": {"memory-gb": 32}}}
    hosts["orin-b"] = {**hosts["orin-b"], "vilms_config_host": {"host": {"memory-gb": _nominal_orin_nano_gb()}}}
    inventory.write_text(yaml.safe_dump(data))
    env = ansible_env(tmp_path, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
                      VILMS_FLEET_REPORT="off")
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(ROOT / "site.yml"),
                          "--tags", "preflight,preflight-facts"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode != 0, run.stdout[-3000:]
    assert ("orin-a: no capacity plan: /host/memory-gb: host.memory-gb declares 32 GB but the host reports Jetson "
            f"Orin Nano {_nominal_orin_nano_gb()} GB (device tree, MemTotal") in " ".join(run.stdout.split()), \
        run.stdout[-3000:]
    recap = run.stdout[run.stdout.index("PLAY RECAP"):]
    assert re.search(r"orin-a\s+:.*failed=1", recap) and re.search(r"orin-b\s+:.*failed=0", recap), recap
    # the verdict stops every host there (any_errors_fatal), as a schema error does: no later play starts, for
    # orin-b either (with these tags their tasks would be skipped, but their plays would still begin)
    assert "PLAY [Runtime" not in run.stdout and "PLAY [Stack" not in run.stdout, run.stdout[-3000:]
