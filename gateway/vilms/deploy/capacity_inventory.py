"""`vilms plan --inventory`: the capacity plan for every host of an Ansible inventory, from the controller alone.

Why: an operator assigning models across a fleet wants every host's verdict before a run, not one host at a time.
Hosts are not contacted, so a host's memory comes from its config (`host.memory-gb`, `host.gpus`, set in
`vilms_config_host`) or from the command line; a host with no figure is reported, not guessed. The effective config
is merged as the vilms_stack role merges it (vilms_config <- vilms_config_group <- vilms_config_host; maps merge key
by key, lists are replaced), from `ansible-inventory --list`, so group_vars and host_vars resolve as in a run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from vilms.deploy.capacity_plan import Facts, HostPlan, host_memory, plan_host
from vilms.config.model import ConfigError
from vilms.config.load import build_config

LAYERS = ("vilms_config", "vilms_config_group", "vilms_config_host")


@dataclass(frozen=True)
class HostError:
    host: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "ok": False, "errors": [self.message]}


def merge(base: Any, extra: Any) -> Any:
    """Ansible's combine(recursive=True): maps merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            out[key] = merge(out[key], value) if key in out else value
        return out
    return extra


def inventory_hostvars(path: str) -> dict[str, dict[str, Any]]:
    """Every host's variables as Ansible resolves them (group_vars, host_vars, precedence)."""
    tool = shutil.which("ansible-inventory", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if tool is None:
        raise ValueError("ansible-inventory not found: install the controller (make install)")
    result = subprocess.run([tool, "-i", path, "--list"], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ValueError(f"ansible-inventory -i {path} failed: {result.stderr.strip()[-500:]}")
    data = json.loads(result.stdout)
    return data.get("_meta", {}).get("hostvars", {})


def plan_inventory(path: str, limit: set[str] | None = None, memory_gb: float | None = None,
                   gpus: int | None = None) -> list[HostPlan | HostError]:
    """A plan (or the reason there is none) for each host that has a vilms config."""
    out: list[HostPlan | HostError] = []
    for host, hostvars in sorted(inventory_hostvars(path).items()):
        if limit and host not in limit:
            continue
        layers = [hostvars.get(name) or {} for name in LAYERS]
        if not any(layers):
            continue
        raw: Any = {}
        for layer in layers:
            raw = merge(raw, layer)
        try:
            config = build_config(raw, source=f"{path}:{host}")
            memory = host_memory(config, Facts(gpu=bool(hostvars.get("vilms_gpu", True))), memory_gb, gpus)
        except ConfigError as exc:
            out.append(HostError(host, "invalid model config: " + "; ".join(i.render() for i in exc.issues)))
            continue
        except ValueError as exc:
            out.append(HostError(host, f"{exc} (in vilms_config_host, or run the preflight, which probes the host)"))
            continue
        out.append(plan_host(host, config, memory))
    return out
