"""`vilms render` (contract C1): one validation, config.yaml + docker-compose.yaml + plan.json (+ keys.yaml).

The compose files are checked by the real compose v2 CLI; the rendered config.yaml is read back the way the
gateway reads it (load_config + Router), so "the gateway reaches the service" is the URL it will really use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vilms.config.load import load_config
from vilms.config.routing import Router

SEED = {  # the shape of the seed project's own config.yaml (shared/seed README), Jetson profile
    "host": {"platform": "js"},
    "serving": {"engine": "ollama", "ollama-base-url": "http://vilms-ollama:11434", "models": [
        {"name": "qwen2.5:3b", "type": "llm", "aliases": ["LLM_SMALL"], "params": [{"max-tokens": 512}]},
        {"name": "qwen2.5vl:3b", "type": "vlm", "aliases": ["VLM_SMALL"], "params": [{"max-frames": 4}]}]},
    "embedding": {"enabled": True, "model": "intfloat/multilingual-e5-small"},
    "model-aliases": {"Embedding": "intfloat/multilingual-e5-small", "LLM": "LLM_SMALL"},
    "docker": {"docker-network": "vilms-net", "external-network": True, "dns": ["8.8.8.8"],
               "docker-registry": "registry.example.com:5000", "docker-project": "vilms-seed",
               "tag": {"gateway": "0.1.0", "engine": "r36.4.0"}, "image": {"ollama": "dustynv/ollama"}},
    "gateway": {"allow-anonymous": True},  # published on 0.0.0.0 without keys: said explicitly (C2)
}
DGPU = {
    "host": {"platform": "dgpu"},
    "serving": {"engine": "vllm", "models": [
        {"name": "Qwen/Qwen3-4B-Instruct", "path": "/models/qwen3-4b", "aliases": ["LLM"]},
        {"name": "qwen2.5vl:3b", "type": "vlm", "aliases": ["VLM"]}]},
    "embedding": {"enabled": True, "model": "all-MiniLM-L6-v2", "path": "/opt/vilms/models/minilm"},
    "docker": {"tag": {"vllm": "v0.9.2", "engine": "0.6.8"}},
    "gateway": {"allow-anonymous": True},
}
needs_docker = pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI with compose v2 is set up by `make system`")


def vilms(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vilms", *args], capture_output=True, text=True, timeout=120)


def render_dir(tmp_path: Path, data: dict, *extra: str, name: str = "out") -> tuple[Path, subprocess.CompletedProcess]:
    src = tmp_path / f"{name}.yaml"
    src.write_text(yaml.safe_dump(data))
    out = tmp_path / name
    return out, vilms("render", "--config", str(src), "--out", str(out), *extra)


def compose_config(path: Path) -> dict:
    result = subprocess.run(["docker", "compose", "-f", str(path), "config", "--format", "json"], capture_output=True,
                            text=True, env={**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"}, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@needs_docker
@pytest.mark.parametrize("url", ["http://vilms-ollama:11434", "http://vilms-ollama:11434/",
                                 "http://vilms-ollama:11434/v1", "http://vilms-ollama:11434/api"])
def test_seed_ollama_url_yields_that_service_and_the_gateway_uses_it(tmp_path, url):
    data = {**SEED, "serving": {**SEED["serving"], "ollama-base-url": url}}
    out, result = render_dir(tmp_path, data, "--gpu", "yes")
    assert result.returncode == 0, result.stderr
    services = compose_config(out / "docker-compose.yaml")["services"]
    assert set(services) == {"vilms-ollama", "gateway"}
    ollama = services["vilms-ollama"]
    assert ollama["environment"]["OLLAMA_HOST"] == "0.0.0.0:11434" and ollama["runtime"] == "nvidia"
    assert set(ollama["networks"]) == set(services["gateway"]["networks"])
    assert services["gateway"]["depends_on"]["vilms-ollama"]["condition"] == "service_healthy"
    # The gateway reads the rendered config: its URL for every chat model is that service, on that port.
    router = Router(load_config(out / "config.yaml"))
    for name in ("LLM", "VLM_SMALL", "qwen2.5:3b"):
        assert router.resolve(name).base_urls == ("http://vilms-ollama:11434",)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["ollama_pulls"] == [{"service": "vilms-ollama", "models": ["qwen2.5:3b", "qwen2.5vl:3b"]}]


@needs_docker
def test_seed_docker_registry_and_project_take_effect(tmp_path):
    out, result = render_dir(tmp_path, SEED)
    assert result.returncode == 0, result.stderr
    assert "docker.docker-registry is the seed's spelling of docker.registry" in result.stdout
    compose = compose_config(out / "docker-compose.yaml")
    assert compose["name"] == "vilms-seed"
    assert compose["services"]["vilms-ollama"]["image"] == "registry.example.com:5000/dustynv/ollama:r36.4.0"
    assert compose["services"]["gateway"]["image"] == "registry.example.com:5000/vilms/gateway:0.1.0-emb"  # local e5-small: the embeddings image (h12)
    assert compose["networks"]["vilms"]["name"] == "vilms-net" and compose["networks"]["vilms"]["external"] is True
    plan = json.loads((out / "plan.json").read_text())
    assert plan["project"] == "vilms-seed"
    assert plan["images"] == ["registry.example.com:5000/dustynv/ollama:r36.4.0",
                              "registry.example.com:5000/vilms/gateway:0.1.0-emb"]
    effective = yaml.safe_load((out / "config.yaml").read_text())["docker"]
    assert effective["registry"] == "registry.example.com:5000" and "docker-registry" not in effective
    assert effective["project-name"] == "vilms-seed" and "docker-project" not in effective


def test_validate_warns_about_seed_spellings_and_rejects_disagreeing_pairs(tmp_path):
    src = tmp_path / "seed.yaml"
    src.write_text(yaml.safe_dump(SEED))
    report = json.loads(vilms("validate", "--format", "json", str(src)).stdout)
    assert report["valid"] is True
    assert {w["pointer"] for w in report["warnings"]} == {"/docker/docker-registry", "/docker/docker-project"}
    both = {**SEED, "docker": {**SEED["docker"], "project-name": "other"}}
    src.write_text(yaml.safe_dump(both))
    report = json.loads(vilms("validate", "--format", "json", str(src)).stdout)
    assert report["valid"] is False and report["errors"][0]["pointer"] == "/docker/docker-project"


def test_plan_json_shape(tmp_path):
    out, result = render_dir(tmp_path, DGPU, "--gpu", "yes")
    assert result.returncode == 0, result.stderr
    plan = json.loads((out / "plan.json").read_text())
    vllm = "vllm-qwen-qwen3-4b-instruct"
    assert plan == {
        "version": 1, "project": "vilms", "engine_tag": "0.6.8", "platform": "dgpu", "gpu_mode": "devices",
        "config_digest": plan["config_digest"],
        "gateway": {"service": "gateway", "bind": "0.0.0.0", "port": 8989, "url": "http://127.0.0.1:8989"},
        "services": [
            {"name": vllm, "kind": "vllm", "image": "vllm/vllm-openai:v0.9.2", "port": 8000,
             "models": ["Qwen/Qwen3-4B-Instruct"], "host_port": None, "mounts": plan["services"][0]["mounts"]},
            {"name": "ollama", "kind": "ollama", "image": "ollama/ollama:0.6.8", "port": 11434,
             "models": ["qwen2.5vl:3b"], "host_port": None, "mounts": ["./ollama:/root/.ollama"]},
            {"name": "gateway", "kind": "gateway", "image": "vilms/gateway:latest-emb", "port": 8989,
             "models": ["all-MiniLM-L6-v2"], "host_port": 8989, "mounts": plan["services"][2]["mounts"]}],
        "images": ["vllm/vllm-openai:v0.9.2", "ollama/ollama:0.6.8", "vilms/gateway:latest-emb"],
        "ollama_pulls": [{"service": "ollama", "models": ["qwen2.5vl:3b"]}],
        "ollama_adapters": [],
        "gate": {"chat": ["Qwen/Qwen3-4B-Instruct", "qwen2.5vl:3b"], "embedding": ["all-MiniLM-L6-v2"],
                 "models": ["Qwen/Qwen3-4B-Instruct", "qwen2.5vl:3b", "all-MiniLM-L6-v2", "LLM", "VLM"], "key": None},
        "models_dir": "./models", "ollama_dir": "./ollama",
        "weights": plan["weights"],
        "files": ["config.yaml", "docker-compose.yaml"],
    }
    assert len(plan["config_digest"]) == 16 and isinstance(plan["weights"], list)


def test_render_is_deterministic_and_rerun_changes_nothing(tmp_path):
    out, first = render_dir(tmp_path, DGPU, "--gpu", "no", "--format", "json")
    assert json.loads(first.stdout)["changed"] == ["config.yaml", "docker-compose.yaml", "plan.json"]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    _, again = render_dir(tmp_path, DGPU, "--gpu", "no", "--format", "json")
    assert json.loads(again.stdout)["changed"] == []
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    other, _ = render_dir(tmp_path, DGPU, "--gpu", "no", name="elsewhere")
    assert {p.name: p.read_bytes() for p in other.iterdir()} == {k: v[0] for k, v in before.items()}


def test_invalid_config_writes_nothing_and_reports_json_pointers(tmp_path):
    out, good = render_dir(tmp_path, DGPU, "--gpu", "no")
    assert good.returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = {**DGPU, "serving": {**DGPU["serving"], "engine": "tgi"}, "model-aliases": {"X": "ghost"}}
    _, result = render_dir(tmp_path, bad, "--gpu", "no", "--format", "json")
    assert result.returncode == 1
    errors = json.loads(result.stdout)["errors"]
    assert {"pointer", "message", "hint"} <= set(errors[0]) and errors[0]["pointer"] == "/serving/engine"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    fresh, result = render_dir(tmp_path, bad, name="fresh")
    assert result.returncode == 1 and "nothing written" in result.stderr and not fresh.exists()


@needs_docker
def test_inline_api_keys_move_to_keys_yaml(tmp_path):
    data = {**DGPU, "gateway": {"api-keys": [{"name": "ops", "key": "sk-ops-0123456789abcdef", "models": ["LLM"]}]}}
    public = {"allow-anonymous": True}
    out, result = render_dir(tmp_path, data, "--gpu", "no")
    assert result.returncode == 0, result.stderr
    config_text = (out / "config.yaml").read_text()
    assert "sk-ops-0123456789abcdef" not in config_text
    assert yaml.safe_load(config_text)["gateway"]["api-keys-file"] == "/etc/vilms/keys.yaml"
    assert yaml.safe_load((out / "keys.yaml").read_text()) == data["gateway"]["api-keys"]
    assert (out / "keys.yaml").stat().st_mode & 0o777 == 0o600
    assert json.loads((out / "plan.json").read_text())["files"] == ["config.yaml", "docker-compose.yaml", "keys.yaml"]
    gateway = compose_config(out / "docker-compose.yaml")["services"]["gateway"]
    assert {"type": "bind", "source": str(out / "keys.yaml"), "target": "/etc/vilms/keys.yaml", "read_only": True,
            "bind": {"create_host_path": True}} in gateway["volumes"]
    digest = gateway["environment"]["VILMS_CONFIG_DIGEST"]
    data["gateway"]["api-keys"][0]["key"] = "sk-ops-rotated-0000000000"
    _, result = render_dir(tmp_path, data, "--gpu", "no")
    assert compose_config(out / "docker-compose.yaml")["services"]["gateway"]["environment"]["VILMS_CONFIG_DIGEST"] != digest
    data["gateway"] = public
    _, result = render_dir(tmp_path, data, "--gpu", "no")
    assert result.returncode == 0, result.stderr
    assert not (out / "keys.yaml").exists()  # no stale secrets left behind


def test_api_keys_file_entries_are_merged_and_checked(tmp_path):
    (tmp_path / "more-keys.yaml").write_text(yaml.safe_dump([{"name": "ci", "key": "sk-ci-0123456789abcdef"}]))
    data = {**DGPU, "gateway": {"api-keys": [{"name": "ops", "key": "sk-ops-0123456789abcdef"}],
                                "api-keys-file": "more-keys.yaml"}}
    out, result = render_dir(tmp_path, data, "--gpu", "no")
    assert result.returncode == 0, result.stderr
    assert [k["name"] for k in yaml.safe_load((out / "keys.yaml").read_text())] == ["ops", "ci"]
    (tmp_path / "more-keys.yaml").write_text(yaml.safe_dump([{"name": "ops", "key": "sk-other-0123456789"}]))
    _, result = render_dir(tmp_path, data, "--gpu", "no", "--format", "json")
    assert result.returncode == 1 and "used twice" in result.stdout


def test_engine_tag_fills_only_an_unset_engine_tag(tmp_path):
    data = {**SEED, "docker": {k: v for k, v in SEED["docker"].items() if k != "tag"}}
    out, result = render_dir(tmp_path, data, "--engine-tag", "r36.4.0")
    assert "dustynv/ollama:r36.4.0" in json.loads((out / "plan.json").read_text())["images"][0]
    out, result = render_dir(tmp_path, SEED, "--engine-tag", "r35.0.0", name="pinned")
    assert json.loads((out / "plan.json").read_text())["images"][0].endswith("dustynv/ollama:r36.4.0")


def test_retag_gives_the_bytes_a_tagged_render_gives_without_validating_again(tmp_path, monkeypatch):
    """The Jetson path: preflight renders before L4T is read; the stack play fills the tag from the render's files."""
    untagged = {**SEED, "docker": {k: v for k, v in SEED["docker"].items() if k != "tag"},
                "gateway": {"api-keys": [{"name": "ops", "key": "sk-ops-0123456789abcdef"}]}}
    tagged, _ = render_dir(tmp_path, untagged, "--gpu", "no", "--engine-tag", "r36.4.0", name="tagged")
    out, result = render_dir(tmp_path, untagged, "--gpu", "no", name="retagged")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "plan.json").read_text())["engine_tag"] is None  # what tells the role to retag

    import vilms.config.load as config_module
    import vilms.deploy.plan as plan_module

    def no_validation(*args, **kwargs):
        raise AssertionError("retag validated the config again")

    monkeypatch.setattr(config_module, "schema_issues", no_validation)
    monkeypatch.setattr(plan_module, "build_config", no_validation)
    changed = plan_module.write_render(plan_module.retag(out, gpu=False, engine_tag="r36.4.0"), out)
    assert sorted(changed) == ["config.yaml", "docker-compose.yaml", "plan.json"]
    for name in ("config.yaml", "docker-compose.yaml", "plan.json", "keys.yaml"):
        assert (out / name).read_bytes() == (tagged / name).read_bytes(), name
    plan = json.loads((out / "plan.json").read_text())
    assert plan["engine_tag"] == "r36.4.0" and "dustynv/ollama:r36.4.0" in plan["images"][0]
    assert plan_module.write_render(plan_module.retag(out, gpu=False, engine_tag="r36.4.0"), out) == []


def test_retag_keeps_a_pinned_engine_tag_and_needs_a_render(tmp_path):
    out, _ = render_dir(tmp_path, SEED, "--gpu", "no")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = vilms("retag", "--out", str(out), "--engine-tag", "r35.0.0", "--gpu", "no", "--format", "json")
    assert result.returncode == 0 and json.loads(result.stdout)["changed"] == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = vilms("retag", "--out", str(tmp_path / "nothing"), "--engine-tag", "r35.0.0")
    assert result.returncode == 1 and "holds no render" in result.stderr
