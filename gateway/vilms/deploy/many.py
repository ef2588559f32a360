"""`vilms render --many`: every targeted host rendered in one process, all or nothing.

The preflight used to start one Python per host (import, schema load, template compile each time): about 1.2 s a
host on two cores, 9.5 minutes for a 500-host fleet before a single box was contacted. Here the schema validator
and the compose template are built once and each host costs only its own validation and rendering.

Input (JSON or YAML): `{"hosts": {NAME: {"config": {...}, "gpu": true|false|null, "engine_tag": str|null}}}`, as
vilms_preflight's tasks/effective.yml writes it (it adds `layers`, the config layers in merge order, and
`bad_layers`, those that are not maps and were left out of the merge: such a host is an error).
Each host's files go to `OUT/NAME/` exactly as `vilms render --out OUT/NAME` would write them. If any host has an
error, nothing is written for any host (a bad inventory stops the run before any host is touched), and the report
names every failing host with its JSON pointers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vilms.config.model import ConfigError
from vilms.config.schema import ConfigIssue
from vilms.deploy.plan import Render, render, write_render

_HOST_NAME = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9._:-]{0,252}")  # also a safe directory name (IPv6 hosts too)


@dataclass
class ManyResult:
    """Per host: its render (when valid) or its issues; `changed` is filled once the renders are written."""

    renders: dict[str, Render] = field(default_factory=dict)
    errors: dict[str, list[ConfigIssue]] = field(default_factory=dict)
    changed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        hosts: dict[str, Any] = {}
        for name in sorted(set(self.renders) | set(self.errors)):
            if name in self.errors:
                hosts[name] = {"ok": False, "errors": [i.as_dict() for i in self.errors[name]]}
                continue
            result = self.renders[name]
            hosts[name] = {"ok": True, "changed": self.changed.get(name, []),
                           "warnings": [i.as_dict() for i in result.warnings],
                           "engine_tag": result.plan.get("engine_tag")}
        return {"ok": self.ok, "hosts": hosts, "failed": sorted(self.errors)}


def _entry_issues(name: Any, entry: Any) -> list[ConfigIssue]:
    if not isinstance(name, str) or not _HOST_NAME.fullmatch(name):
        return [ConfigIssue("", f"host name {name!r} cannot name a render directory")]
    if not isinstance(entry, Mapping) or not isinstance(entry.get("config"), Mapping):
        return [ConfigIssue("", "the entry has no 'config' mapping (the host's effective vilms config)")]
    return layer_issues(entry)


def layer_issues(entry: Mapping[str, Any]) -> list[ConfigIssue]:
    """The inventory's config layers that are not maps (vilms_preflight names them; docs/config.md)."""
    bad = entry.get("bad_layers") or []
    if not bad:
        return []
    order = " <- ".join(entry.get("layers") or [])
    return [ConfigIssue("", f"config layers must be maps (as in config.yaml): {', '.join(bad)} (merge order: {order})",
                        "give each vilms_config* variable a map in config.yaml's shape, or null")]


def render_many(spec: Any, base_dir: Path = Path(".")) -> ManyResult:
    """Validate and render every host in `spec`; nothing is written here (see `write_many`)."""
    result = ManyResult()
    hosts = spec.get("hosts") if isinstance(spec, Mapping) else None
    if not isinstance(hosts, Mapping):
        result.errors["(input)"] = [ConfigIssue("/hosts", "expected {\"hosts\": {NAME: {\"config\": ...}}}")]
        return result
    for name, entry in hosts.items():
        issues = _entry_issues(name, entry)
        if issues:
            result.errors[str(name)] = issues
            continue
        try:
            result.renders[name] = render(entry["config"], gpu=entry.get("gpu"), engine_tag=entry.get("engine_tag"),
                                          base_dir=base_dir)
        except ConfigError as exc:
            result.errors[name] = list(exc.issues)
    return result


def write_many(result: ManyResult, out: Path) -> ManyResult:
    """Write every host's files under `out/NAME/`, only when every host rendered (all or nothing)."""
    if result.ok:
        for name, one in result.renders.items():
            result.changed[name] = write_render(one, out / name)
    return result
