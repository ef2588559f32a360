"""The repository builds as the collection vilms.fleet, installs with ansible-galaxy, and its preflight runs from a
directory outside the checkout: no ansible.cfg, no roles path, only the installed collection and the vilms package.

Before the collection, a role read `role_path ~ '/../../schemas/...'` (nothing there once installed), the callback
sat in callback_plugins/ beside ansible.cfg, and `vilms.fleet.site` did not exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ansible.fleet_hosts import BIN, ansible_env, write_fleet

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ansible


def galaxy(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ansible-galaxy"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def installed_package(site: Path) -> Path:
    """The vilms package laid out as its wheel installs it (pyproject's force-include puts the schema in _data), away
    from the checkout: what `pip install 'vilms[deploy]'` gives, without building a wheel (hatchling is not here)."""
    import shutil

    shutil.copytree(ROOT / "gateway" / "vilms", site / "vilms", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "schemas" / "vilms-config.schema.json", site / "vilms" / "_data" / "vilms-config.schema.json")
    return site


def test_collection_builds_installs_and_runs_its_preflight_outside_the_checkout(tmp_path):
    work = tmp_path / "operator"
    work.mkdir()
    site = installed_package(tmp_path / "site-packages")
    schema = subprocess.run([sys.executable, "-m", "vilms", "schema", "--path"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(site)}, cwd=work, check=True).stdout.strip()
    assert schema == str(site / "vilms" / "_data" / "vilms-config.schema.json")
    env = ansible_env(tmp_path, PYTHONPATH=str(site), ANSIBLE_COLLECTIONS_PATH=str(work / "collections"),
                      ANSIBLE_CALLBACKS_ENABLED="vilms.fleet.vilms_fleet_report",
                      VILMS_FLEET_REPORT_DIR=str(tmp_path / "reports"))
    built = galaxy("collection", "build", str(ROOT), "--output-path", str(tmp_path / "dist"), cwd=work, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    tarball = tmp_path / "dist" / "vilms-fleet-0.1.0.tar.gz"
    names = subprocess.run(["tar", "tzf", str(tarball)], capture_output=True, text=True, check=True).stdout.split()
    assert {"playbooks/site.yml", "plugins/callback/vilms_fleet_report.py", "roles/vilms_preflight/tasks/main.yml",
            "meta/runtime.yml"} <= set(names)
    assert not [n for n in names if n.split("/")[0] in ("gateway", "tests", "bench", "devkit", "molecule", ".venv")]

    # Dependencies (community.docker, ansible.posix) resolve to the copies the `ansible` package bundles: offline.
    installed = galaxy("collection", "install", str(tarball), "-p", str(work / "collections"), cwd=work, env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    inventory = write_fleet(work, ("gpu-a",), ("orin-a",))
    run = subprocess.run([str(BIN / "ansible-playbook"), "vilms.fleet.site", "-i", str(inventory),
                          "--tags", "preflight,preflight-facts"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    out = run.stdout
    assert run.returncode == 0, out[-4000:] + run.stderr[-2000:]
    assert "TASK [vilms.fleet.vilms_preflight : Render | Run vilms render --many (every host validated once, in one process)]" in out
    assert "TASK [vilms.fleet.vilms_preflight : Capacity | Plan this host's models against its memory" in out
    assert str(ROOT) not in out, "ran something from the checkout"
    assert "failed=0" in out and "unreachable=0" in out
    # The Jetson's L4T tag went into its render; the installed callback wrote the fleet report.
    plans = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / ".cache" / "vilms" / "rendered").glob("run-*/*/plan.json")}
    assert plans["orin-a"]["engine_tag"] == "r36.4.0" and plans["gpu-a"]["gpu_mode"] == "none"
    report = json.loads((tmp_path / "reports" / "latest.json").read_text())
    assert set(report["hosts"]) >= {"gpu-a", "orin-a"}


def test_galaxy_metadata_names_the_collection_and_its_dependencies():
    meta = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    required = yaml.safe_load((ROOT / "requirements.yml").read_text())
    assert (meta["namespace"], meta["name"]) == ("vilms", "fleet")
    assert set(meta["dependencies"]) == {c["name"] for c in required["collections"]}


def test_execution_environment_ships_what_the_builds_produce(tmp_path):
    """The EE names the artifacts `ansible-galaxy collection build` and the wheel build write, vilms with [deploy],
    and rsync; with ansible-builder installed, `ansible-builder create` accepts it and writes the build context."""
    import shutil
    import tomllib

    meta = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    ee = yaml.safe_load((ROOT / "execution-environment.yml").read_text())
    collection = f"{meta['namespace']}-{meta['name']}-{meta['version']}.tar.gz"
    wheel = f"vilms-{version}-py3-none-any.whl"
    assert {f["src"] for f in ee["additional_build_files"]} == {f"dist/{collection}", f"dist/{wheel}"}
    deps = ee["dependencies"]
    assert {"name": f"/build/artifacts/{collection}", "type": "file"} in deps["galaxy"]["collections"]
    assert deps["python"] == [f"vilms[deploy] @ file:///build/artifacts/{wheel}"]
    assert any(p.startswith("rsync") for p in deps["system"])
    builder = shutil.which("ansible-builder", path=f"{BIN}:{os.environ['PATH']}")
    if builder is None:
        return  # not a dev dependency: the structure above is what can be checked without it
    (tmp_path / "dist").mkdir()
    for name in (collection, wheel):
        (tmp_path / "dist" / name).write_bytes(b"")
    shutil.copy(ROOT / "execution-environment.yml", tmp_path)
    created = subprocess.run([builder, "create", "-f", "execution-environment.yml", "-c", "ctx"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    assert "rsync" in (tmp_path / "ctx" / "_build" / "bindep.txt").read_text()
