"""`vilms plan --inventory`: the capacity plan for every host of an Ansible inventory, from the controller alone.

Why: an operator assigning models across a fleet wants every host's verdict before a run, not one host at a time.
Hosts are not contacted, so a host's memory comes from its config (`host.memory-gb`, `host.gpus`, e.g. in a SKU
group's layer) or from the command line; a host with no figure is reported, not guessed.

One merge, one code path: a host's effective config is what the vilms_preflight role merges (its config layers
`vilms_config` <- `vilms_config_group` <- `vilms_config__*` by name <- `vilms_config_host`, docs/config.md "Layered
config"). This module does not merge anything: it runs that role's `tasks/effective.yml` with `ansible-playbook`
(facts off, so no host is contacted; the only thing written is one JSON file in a private temporary directory on the
controller) and plans from what it wrote, the same file the preflight hands to `vilms render --many`. Layers, their
order, `{{ }}` templates, vaulted values and variable precedence therefore resolve exactly as in a run, which
`ansible-inventory --list` cannot give (it does not template values).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vilms.deploy.capacity_plan import Facts, HostPlan, host_memory, plan_host
from vilms.deploy.many import layer_issues
from vilms.config.model import ConfigError
from vilms.config.load import build_config

ROLE_ENV = "VILMS_PREFLIGHT_ROLE"  # the vilms_preflight role to ask: a role name or a role directory
COLLECTION_ROLE = "vilms.fleet.vilms_preflight"
PLAYBOOK = """---
- name: Effective config of every host (vilms plan --inventory; no host is contacted)
  hosts: all
  gather_facts: false
  tasks:
    - name: Merge each host's config layers as the preflight does
      ansible.builtin.include_role:
        name: {role}
        tasks_from: effective
"""
TIMEOUT_S = 1800


@dataclass(frozen=True)
class HostError:
    host: str
    message: str
    layers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "ok": False, "errors": [self.message], "layers": self.layers}


def preflight_role() -> str:
    """$VILMS_PREFLIGHT_ROLE, else this checkout's roles/vilms_preflight, else the installed collection's role."""
    if os.environ.get(ROLE_ENV):
        return os.environ[ROLE_ENV]
    checkout = Path(__file__).resolve().parents[3] / "roles" / "vilms_preflight"
    return str(checkout) if (checkout / "tasks" / "effective.yml").is_file() else COLLECTION_ROLE


def _tool(name: str) -> str:
    tool = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if tool is None:
        raise ValueError(f"{name} not found: install the controller (pip install 'vilms[deploy]')")
    return tool


HIDDEN = ("the merge failed in a task that hides its output (it may hold API keys): usually a vaulted value and no "
          "vault password (--vault-password-file, or ANSIBLE_VAULT_PASSWORD_FILE), or a {{ }} in a config layer that "
          "does not resolve; `ansible-playbook site.yml -i INVENTORY --tags preflight` names the error")


def _failures(stdout: str) -> str:
    """The hosts Ansible failed and their messages, from its default output."""
    hidden, messages = [], []
    for m in re.finditer(r"^fatal: \[([^\]]+)\]: FAILED! => (.*)$", stdout, re.M):
        try:
            result = json.loads(m.group(2))
        except ValueError:
            result = {"msg": m.group(2)}
        if "censored" in result:
            hidden.append(m.group(1))
        else:
            messages.append(f"{m.group(1)}: {result.get('msg', m.group(2))}")
    if hidden:
        hidden.sort()
        shown = ", ".join(hidden[:5]) + (f" and {len(hidden) - 5} more" if len(hidden) > 5 else "")
        messages.append(f"{shown}: {HIDDEN}")
    return "; ".join(messages)


def effective_configs(inventory: str, limit: str | None = None,
                      vault_password_file: str | None = None) -> dict[str, dict[str, Any]]:
    """{host: {"config", "gpu", "layers", "bad_layers"}} for every host of the inventory, as vilms_preflight merges them."""
    with tempfile.TemporaryDirectory(prefix="vilms-effective-") as tmp:  # 0700: the configs may hold API keys
        out = Path(tmp) / "effective.json"
        book = Path(tmp) / "effective.yml"
        book.write_text(PLAYBOOK.format(role=json.dumps(preflight_role())), encoding="utf-8")
        argv = [_tool("ansible-playbook"), "-i", inventory, str(book),
                "-e", json.dumps({"vilms_preflight_effective_file": str(out)})]
        if limit:
            argv += ["--limit", limit]
        if vault_password_file:
            argv += ["--vault-password-file", vault_password_file]
        env = {**os.environ, "VILMS_FLEET_REPORT": "off", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
               "ANSIBLE_RETRY_FILES_ENABLED": "0"}
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        if result.returncode != 0:
            detail = _failures(result.stdout) or (result.stderr.strip() or result.stdout.strip())[-800:]
            raise ValueError(f"the effective config of {inventory} could not be read (ansible-playbook, "
                             f"exit {result.returncode}): {detail}")
        if not out.is_file():  # no host matched
            return {}
        return json.loads(out.read_text(encoding="utf-8")).get("hosts") or {}


def plan_inventory(path: str, limit: str | None = None, memory_gb: float | None = None, gpus: int | None = None,
                   vault_password_file: str | None = None) -> list[HostPlan | HostError]:
    """A plan (or the reason there is none) for each host that has a vilms config layer."""
    out: list[HostPlan | HostError] = []
    for host, entry in sorted(effective_configs(path, limit, vault_password_file).items()):
        layers = list(entry.get("layers") or [])
        if not layers:
            continue
        issues = layer_issues(entry)
        try:
            if issues:
                raise ConfigError(issues)
            config = build_config(entry["config"], source=f"{path}:{host}")
            memory = host_memory(config, Facts(gpu=bool(entry.get("gpu", True))), memory_gb, gpus)
        except ConfigError as exc:
            out.append(HostError(host, "invalid model config: " + "; ".join(i.render() for i in exc.issues), layers))
            continue
        except ValueError as exc:
            out.append(HostError(host, f"{exc} (in a config layer, or run the preflight, which probes the host)",
                                 layers))
            continue
        plan = plan_host(host, config, memory)
        plan.layers = layers
        out.append(plan)
    return out
