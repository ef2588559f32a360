"""API key entries as the config gives them (inline plus `gateway.api-keys-file`), and the deploy-time exposure
rule. Both the controller (render, the gate's key) and the gateway (its KeyRing) read keys through `key_entries`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Mapping

import yaml
from jsonschema import Draft202012Validator

from vilms.config.schema import ConfigIssue, load_schema


def key_entries(gateway: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Inline keys plus those in `api-keys-file` (a YAML list, or a map with an `api-keys` list)."""
    entries = list(gateway.get("api-keys") or [])
    path = gateway.get("api-keys-file")
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"gateway.api-keys-file cannot be read ({exc.strerror})") from None
        except yaml.YAMLError:
            raise ValueError("gateway.api-keys-file is not valid YAML") from None  # no excerpt: it holds secrets
        if isinstance(data, Mapping):
            data = data.get("api-keys")
        errors = list(Draft202012Validator(load_schema()["properties"]["gateway"]["properties"]["api-keys"])
                      .iter_errors(data))
        if errors:  # the same rules as inline keys; the message names the place and the rule, never a value
            where = "/".join(str(p) for p in errors[0].absolute_path)
            raise ValueError(f"gateway.api-keys-file: entry {where or '(top)'} fails the {errors[0].validator!r} rule "
                             "(a list of {name, key, models?, max-concurrency?, requests-per-minute?})")
        entries += data
    return entries


def _published_beyond_loopback(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host != "localhost"


def exposure_issues(config: Any, bind: str | None = None) -> list[ConfigIssue]:
    """Deploy-time rule (called by `vilms render`, not at gateway load): a gateway reachable beyond loopback
    needs API keys, unless the operator says `gateway.allow-anonymous: true`.

    `bind` is the host address the port is published on (compose's `ports:`), when it differs from
    `gateway.host` (the address inside the container).
    """
    gw = config.gateway
    host = bind if bind is not None else str(gw.get("host", "0.0.0.0"))
    has_keys = bool(gw.get("api-keys")) or bool(gw.get("api-keys-file"))
    if has_keys or gw.get("allow-anonymous") or not _published_beyond_loopback(host):
        return []
    return [ConfigIssue("/gateway", f"the gateway is published on {host} (reachable beyond this host) and no "
                        "API keys are configured",
                        "add gateway.api-keys (key from a Vault variable), or set gateway.allow-anonymous: true "
                        "to serve anyone who can reach the port")]
