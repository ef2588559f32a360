"""The one config contract: locate `vilms-config.schema.json`, validate, fill defaults.

The schema file lives at the repo root (`schemas/`) and is force-included in the wheel under
`vilms/_data/`, so an installed gateway and a source checkout read the very same file.
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

SCHEMA_NAME = "vilms-config.schema.json"


def schema_path() -> Path:
    """Packaged copy first (wheel / image), then the source checkout's `schemas/`."""
    packaged = Path(__file__).resolve().parents[1] / "_data" / SCHEMA_NAME
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[3] / "schemas" / SCHEMA_NAME


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    return json.loads(schema_path().read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def validator() -> Draft202012Validator:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config, addressed by RFC 6901 JSON pointer."""

    pointer: str
    message: str
    hint: str = ""
    severity: str = "error"

    def render(self) -> str:
        text = f"{self.severity}: {self.pointer or '/'}: {self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "pointer": self.pointer or "/", "message": self.message, "hint": self.hint}


def pointer(parts: Any) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _hint(error: ValidationError) -> str:
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        unknown = [k for k in error.instance if k not in allowed]
        guesses = [g for k in unknown for g in difflib.get_close_matches(str(k), allowed, n=1)]
        if guesses:
            return f"did you mean {', '.join(repr(g) for g in guesses)}? allowed keys: {', '.join(allowed)}"
        return f"allowed keys: {', '.join(allowed)}"
    if error.validator == "enum":
        return "one of: " + ", ".join(json.dumps(v) for v in error.validator_value)
    if error.validator == "required":
        return "add the missing key"
    if error.validator == "pattern" and str(error.validator_value).startswith("^https?"):
        return "use an http:// or https:// URL"
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    return description or ""


def schema_issues(data: Any) -> list[ConfigIssue]:
    """All schema violations, deepest useful cause for oneOf/anyOf branches."""
    issues = []
    for error in sorted(validator().iter_errors(data), key=lambda e: list(e.absolute_path)):
        while error.context:
            error = _deepest(error.context)
        message = error.message
        if "api-keys" in error.absolute_path:  # never echo a secret: name the rule, not the value
            message = f"fails the {error.validator!r} rule ({json.dumps(error.validator_value)[:80]}); value not shown"
        issues.append(ConfigIssue(pointer(error.absolute_path), message, _hint(error)))
    return issues


def _deepest(errors: list[ValidationError]) -> ValidationError:
    """Of a oneOf's branch errors, the one that got furthest into the data (and not a mere type miss)."""
    return max(errors, key=lambda e: (len(e.absolute_path), e.validator != "type", -errors.index(e)))


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a valid config with every schema `default` filled in, recursively through objects.

    Defaults thus live in the schema alone; code reads filled values and never repeats them.
    """
    schema = load_schema()
    result = copy.deepcopy(data)

    def fill(node: Any, sub: dict[str, Any]) -> None:
        if "$ref" in sub:
            sub = _resolve(schema, sub["$ref"])
        if not isinstance(node, dict):
            return
        for key, prop in sub.get("properties", {}).items():
            if "$ref" in prop and len(prop) <= 2:
                prop = {**_resolve(schema, prop["$ref"]), **{k: v for k, v in prop.items() if k != "$ref"}}
            if key not in node:
                if "default" in prop:
                    node[key] = copy.deepcopy(prop["default"])
                elif prop.get("type") == "object" and "properties" in prop:
                    node[key] = {}
            if key in node:
                fill(node[key], prop)
                if prop.get("type") == "array" and isinstance(node[key], list) and "items" in prop:
                    for item in node[key]:
                        fill(item, prop["items"])

    fill(result, schema)
    return result


def _resolve(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = schema
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node
