"""What the roles read from a render instead of re-deriving it: the gate's key (inline or from api-keys-file), the
models dir, each service's data mounts; `vilms plan --render` plans from a render without validating again;
`vilms schema --path` names the schema the installed package ships.

Before: the role took the gate's key from inline `gateway.api-keys` only (a config with `api-keys-file` gated
without a key and failed on 401), read the models dir's default from `role_path/../../schemas`, and planned
capacity from a second merge of the inventory, validated a second time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from vilms.config.schema import schema_path

DGPU = {"host": {"platform": "dgpu"}, "docker": {"models-dir": "/srv/models"},
        "serving": {"engine": "ollama", "models": [{"name": "qwen2.5:0.5b", "aliases": ["LLM"]}]}}


def vilms(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vilms", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def render(tmp: Path, data: dict) -> Path:
    (tmp / "input.yaml").write_text(yaml.safe_dump(data))
    result = vilms("render", "--config", str(tmp / "input.yaml"), "--out", str(tmp / "out"), "--gpu", "no")
    assert result.returncode == 0, result.stderr
    return tmp / "out"


def test_gate_key_comes_from_the_keys_file_too_and_plan_json_holds_no_secret(tmp_path):
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump([
        {"name": "limited", "key": "sk-limited-0123456789abcdef", "models": ["LLM"]},
        {"name": "ops", "key": "sk-ops-0123456789abcdef0123"}]))
    out = render(tmp_path, {**DGPU, "gateway": {"api-keys-file": "keys.yaml"}})
    plan_text = (out / "plan.json").read_text()
    plan = json.loads(plan_text)
    assert plan["gate"]["key"] == "ops" and "sk-" not in plan_text
    keys = {e["name"]: e["key"] for e in yaml.safe_load((out / "keys.yaml").read_text())}
    assert keys[plan["gate"]["key"]] == "sk-ops-0123456789abcdef0123"


def test_only_limited_keys_leave_the_gate_without_one(tmp_path):
    out = render(tmp_path, {**DGPU, "gateway": {"api-keys": [
        {"name": "limited", "key": "sk-limited-0123456789abcdef", "models": ["LLM"]}]}})
    assert json.loads((out / "plan.json").read_text())["gate"]["key"] is None


def test_models_dir_and_data_mounts_are_in_the_plan(tmp_path):
    out = render(tmp_path, {**DGPU, "gateway": {"allow-anonymous": True}})
    plan = json.loads((out / "plan.json").read_text())
    assert plan["models_dir"] == "/srv/models"
    compose = yaml.safe_load((out / "docker-compose.yaml").read_text())
    for service in plan["services"]:  # the compose file's relative binds, minus the release's own files
        binds = [v for v in compose["services"][service["name"]].get("volumes", [])
                 if isinstance(v, str) and v.startswith("./") and not v.startswith(("./config.yaml:", "./keys.yaml:"))]
        assert service["mounts"] == binds
    assert {s["name"]: s["mounts"] for s in plan["services"]}["ollama"] == ["./ollama:/root/.ollama"]


def test_plan_from_a_render_does_not_validate_again(tmp_path):
    out = render(tmp_path, {**DGPU, "gateway": {"allow-anonymous": True}})
    # Break the render's config past what validation allows: planning from the render must not look at it again.
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["not-a-section"] = True
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    assert vilms("validate", str(out / "config.yaml")).returncode == 1
    result = vilms("plan", "--render", str(out), "--format", "json", "--host", "box", "--meminfo-mib", "16000")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["hosts"][0]["host"] == "box"
    assert report["hosts"][0]["memory"] == "CPU profile: host RAM only"  # the render's gpu_mode (none), no --no-gpu


def test_schema_path_names_the_shipped_schema(tmp_path):
    result = vilms("schema", "--path", cwd=tmp_path)
    assert result.returncode == 0
    path = Path(result.stdout.strip())
    assert path == schema_path() and json.loads(path.read_text())["properties"]["docker"]
    assert json.loads(vilms("schema", cwd=tmp_path).stdout) == json.loads(path.read_text())
