"""Load and validate a config: schema, seed spellings, then the cross-field rules (routing owns those)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from vilms.config.model import CONFIG_ENV, LEGACY_KEYS, Config, ConfigError, _model_specs
from vilms.config.routing import semantic_issues
from vilms.config.schema import ConfigIssue, schema_issues, with_defaults


def apply_legacy_keys(data: dict[str, Any], filled: dict[str, Any]) -> tuple[list[ConfigIssue], list[ConfigIssue]]:
    """Move seed spellings to their new keys in `filled`: (errors, deprecation warnings).

    Both spellings with different values is an error: silently preferring one would deploy the other's surprise.
    """
    errors, warnings = [], []
    for (section, old), new in LEGACY_KEYS.items():
        given = data.get(section) or {}
        if old not in given:
            continue
        where = f"/{section}/{old}"
        if new in given and given[new] != given[old]:
            errors.append(ConfigIssue(where, f"{section}.{old} ({given[old]!r}) and {section}.{new} ({given[new]!r}) disagree",
                                      f"keep {section}.{new} only"))
            continue
        filled[section][new] = filled[section].pop(old)
        warnings.append(ConfigIssue(where, f"{section}.{old} is the seed's spelling of {section}.{new}; it is applied as such",
                                    f"rename it to {section}.{new}", severity="warning"))
    return errors, warnings


def build_config(data: Any, source: str = "<memory>") -> Config:
    """Validate `data` (schema, then cross-field rules) and return a Config, or raise ConfigError."""
    issues = schema_issues(data)
    if issues:
        raise ConfigError(issues)
    filled = with_defaults(data)
    legacy_errors, notes = apply_legacy_keys(data, filled)
    if legacy_errors:
        raise ConfigError(legacy_errors)
    config = Config(raw=filled, models=tuple(_model_specs(filled)), source=source, notes=tuple(notes))
    errors = [i for i in semantic_issues(config) if i.severity == "error"]
    if errors:
        raise ConfigError(errors)
    return config


def accepted_config(data: dict[str, Any], source: str = "<render>") -> Config:
    """A Config from data `build_config` already accepted and `vilms render` wrote out (seed spellings renamed).

    Defaults are filled, nothing is re-checked: a render's second step (the Jetson engine tag, known only once
    the host's L4T release is read) must not validate the config a second time.
    """
    filled = with_defaults(data)
    return Config(raw=filled, models=tuple(_model_specs(filled)), source=source)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {path}: {exc.strerror}")]) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([ConfigIssue("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")]) from exc


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError([ConfigIssue("", f"no config given: pass --config or set {CONFIG_ENV}")])
    return build_config(read_yaml(path), source=str(path))
