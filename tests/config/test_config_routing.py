"""The schema contract, `vilms validate`, alias resolution and the seed's five routing rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vilms.config.model import ConfigError
from vilms.config.load import build_config
from vilms.config.routing import Router, semantic_issues, stack_host, stack_services, vllm_service_name
from vilms.config.schema import with_defaults

SEED_CONFIG = {
    "host": {"platform": "dgpu"},
    "serving": {
        "engine": "vllm",
        "models": [
            {"name": "qwen3:4b-instruct", "type": "llm", "engine": "vllm", "aliases": ["LLM", "LLM_SMALL"],
             "params": [{"temperature": 0.7}, {"max-tokens": 1024}]},
            {"name": "qwen3-vl:4b-instruct", "type": "vlm", "engine": "ollama", "aliases": ["VLM", "VLM_SMALL"],
             "params": [{"max-frames": 8}, {"max-tokens": 1024}]},
        ],
    },
    "embedding": {"enabled": True, "model": "intfloat/multilingual-e5-small"},
    "docker": {"docker-network": "vilms-net", "dns": ["8.8.8.8"], "tag": {"gateway": "latest", "engine": "latest"},
               "image": {"ollama": "dustynv/ollama"}},
    "model-aliases": {"Embedding": "intfloat/multilingual-e5-small", "LLM_QWEN3": "LLM"},
}


def issues(data) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        build_config(data)
    return [(i.pointer, i.message) for i in info.value.issues]


def test_seed_config_is_valid_and_resolves():
    router = Router(build_config(SEED_CONFIG))
    assert router.resolve("LLM_QWEN3").name == "qwen3:4b-instruct"
    assert router.resolve("Embedding").engine == "local"
    assert router.resolve("VLM_SMALL").engine == "ollama"
    assert router.resolve("LLM").base_urls == (f"http://{vllm_service_name('qwen3:4b-instruct')}:8000",)
    assert router.resolve("nope") is None


@pytest.mark.parametrize("serving_engine,platform,model,expected", [
    ("ollama", "dgpu", {"name": "m", "engine": "vllm"}, "ollama"),          # rule 1 beats everything
    ("vllm", "js", {"name": "m", "engine": "vllm"}, "ollama"),              # rule 2: Jetson prefers Ollama
    ("vllm", "dgpu", {"name": "m", "engine": "openai", "base-url": "http://x:1"}, "openai"),  # rule 3
    ("vllm", "dgpu", {"name": "m", "type": "vlm"}, "ollama"),               # rule 4
    ("vllm", "dgpu", {"name": "qwen2.5vl:3b"}, "ollama"),                    # rule 5: name heuristic
    ("vllm", "dgpu", {"name": "qwen3:4b"}, "vllm"),                          # rule 5: default engine
])
def test_five_routing_rules_in_priority_order(serving_engine, platform, model, expected):
    config = build_config({"host": {"platform": platform}, "serving": {"engine": serving_engine, "models": [model]}})
    assert Router(config).resolve(model["name"]).engine == expected


def test_params_accept_seed_list_and_map_forms():
    a = build_config({"serving": {"models": [{"name": "m", "params": [{"temperature": 0.1}, {"num-ctx": 2048}]}]}})
    b = build_config({"serving": {"models": [{"name": "m", "params": {"temperature": 0.1, "num-ctx": 2048}}]}})
    assert dict(a.models[0].params) == dict(b.models[0].params) == {"temperature": 0.1, "num-ctx": 2048}


def test_schema_errors_carry_json_pointers():
    found = issues({"serving": {"engine": "tgi", "models": [{"name": "m", "params": [{"temprature": 1}]},
                                                             {"type": "llm"}]},
                    "gateway": {"port": 99999}})
    pointers = {p for p, _ in found}
    assert {"/serving/engine", "/serving/models/0/params/0", "/serving/models/1", "/gateway/port"} <= pointers


def test_alias_loop_is_an_error():
    found = issues({"serving": {"models": [{"name": "m"}]}, "model-aliases": {"A": "B", "B": "A"}})
    assert any("alias loop" in m for _, m in found)


def test_conflicting_alias_definitions_are_errors_not_overrides():
    found = issues({"serving": {"models": [{"name": "m1", "aliases": ["LLM"]}, {"name": "m2", "aliases": ["LLM"]}]}})
    assert found[0][0] == "/serving/models/1/aliases/0" and "different targets" in found[0][1]
    found = issues({"serving": {"models": [{"name": "m1", "aliases": ["LLM"]}, {"name": "m2"}]},
                    "model-aliases": {"LLM": "m2"}})
    assert any("different targets" in m for _, m in found)


def test_alias_to_unknown_model_is_a_warning_and_alias_shadowing_a_model_an_error():
    """The seed kept aliases to models it did not list (issue #22): they load, warn, and resolve to nothing."""
    config = build_config({"serving": {"models": [{"name": "m"}]}, "model-aliases": {"X": "ghost", "Y": "X"}})
    found = [(i.pointer, i.severity) for i in semantic_issues(config) if "does not serve" in i.message]
    assert found == [("/model-aliases/X", "warning"), ("/model-aliases/Y", "warning")]
    assert Router(config).resolve("X") is None and Router(config).resolve("Y") is None
    assert any("same name as a model" in m for _, m in issues({"serving": {"models": [{"name": "m"}, {"name": "n"}]},
                                                                "model-aliases": {"m": "n"}}))


def test_openai_engine_without_url_and_duplicate_models():
    assert any("no URL" in m for _, m in issues({"serving": {"engine": "vllm", "models": [{"name": "m", "engine": "openai"}]}}))
    assert any("defined twice" in m for _, m in issues({"serving": {"models": [{"name": "m"}, {"name": "m"}]}}))


def test_defaults_come_from_the_schema():
    filled = with_defaults({"serving": {"models": []}})
    assert filled["gateway"]["port"] == 8989 and filled["serving"]["engine"] == "ollama"
    assert filled["media"]["remote-fetch"] is True and filled["embedding"]["enabled"] is False


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vilms", *args], capture_output=True, text=True, timeout=60)


def test_vilms_validate_cli(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(SEED_CONFIG))
    result = run_cli("validate", str(good))
    assert result.returncode == 0 and "valid" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"serving": {"engin": "vllm", "models": [{"name": "m"}]},
                                   "model-aliases": {"A": "B", "B": "A"}}))
    result = run_cli("validate", str(bad))
    assert result.returncode == 1
    assert "/serving: Additional properties" in result.stderr and "did you mean 'engine'" in result.stderr
    report = json.loads(run_cli("validate", "--format", "json", str(bad)).stdout)
    assert report["valid"] is False and report["errors"][0]["pointer"] == "/serving"
    broken = tmp_path / "broken.yaml"
    broken.write_text("serving: [\n")
    result = run_cli("validate", str(broken))
    assert result.returncode == 1 and "not valid YAML (line" in result.stderr


@pytest.mark.parametrize("url,expected", [
    ("http://vilms-ollama:11434", ("vilms-ollama", 11434)),
    ("http://vilms-ollama:11434/api", ("vilms-ollama", 11434)),
    ("http://Ollama", ("ollama", 80)),
    ("http://ollama.lan:11434", None),          # a dotted name is a server elsewhere
    ("http://10.0.0.5:11434", None),            # so is an IP literal
    ("http://[::1]:11434", None),
    ("http://localhost:11434", None),           # the gateway container's own loopback, not a service
])
def test_stack_host_rule(url, expected):
    assert stack_host(url) == expected


def test_stack_services_follow_the_urls_the_gateway_uses():
    config = build_config({"host": {"platform": "dgpu"}, "serving": {
        "engine": "vllm", "ollama-base-url": ["http://vilms-ollama:11434", "http://10.0.0.5:11434"], "models": [
            {"name": "big", "aliases": ["LLM"]},
            {"name": "qwen2.5vl:3b", "type": "vlm"},
            {"name": "ext", "engine": "openai", "base-url": "http://llamacpp:8080"},  # openai: never run by the stack
            {"name": "e5", "type": "embedding", "engine": "ollama"}]}})
    services = {s.name: s for s in stack_services(config)}
    assert set(services) == {"vllm-big", "vilms-ollama"}
    assert services["vilms-ollama"].models == ("qwen2.5vl:3b", "e5") and services["vilms-ollama"].kind == "ollama"
    router = Router(config)
    for svc in services.values():
        for model in svc.models:
            assert router.resolve(model).base_urls[0] == svc.url


def test_external_services_opt_out_of_the_rule():
    config = build_config({"serving": {"ollama-base-url": "http://shared-ollama:11434", "models": [{"name": "m"}]},
                           "docker": {"external-services": ["shared-ollama"]}})
    assert stack_services(config) == []


@pytest.mark.parametrize("serving,message", [
    ({"engine": "vllm", "vllm-base-url": "http://vllm:8000", "models": [{"name": "a"}, {"name": "b"}]},
     "map to the same vLLM service 'vllm'"),
    ({"ollama-base-url": "http://gateway:11434", "models": [{"name": "a"}]}, "which is the gateway"),
    ({"ollama-base-url": "https://ollama:11434", "models": [{"name": "a"}]}, "serves plain http"),
    ({"engine": "vllm", "ollama-base-url": "http://engine:11434", "vllm-base-url": "http://engine:11434",
      "models": [{"name": "a", "type": "vlm"}, {"name": "b"}]}, "would run both ollama"),
    ({"ollama-base-url": "http://o:1", "models": [{"name": "a"}, {"name": "b", "base-url": "http://o:2"}]},
     "used on port 1 and port 2"),
])
def test_one_service_name_means_one_container(serving, message):
    assert any(message in m for _, m in issues({"serving": serving}))


def test_every_schema_key_is_described():
    """The README promises a description for every key of the schema (tools and editors show them)."""
    import json
    from pathlib import Path

    schema = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "vilms-config.schema.json").read_text())
    missing: list[str] = []

    def walk(node: object, path: str) -> None:
        if not isinstance(node, dict):
            return
        for key, sub in (node.get("properties") or {}).items():
            if isinstance(sub, dict) and "description" not in sub and "$ref" not in sub:
                missing.append(f"{path}/{key}")
            walk(sub, f"{path}/{key}")
        for key in ("items", "additionalProperties"):
            walk(node.get(key), f"{path}/{key}")
        for key in ("oneOf", "anyOf", "allOf"):
            for i, sub in enumerate(node.get(key) or []):
                walk(sub, f"{path}/{key}/{i}")
        for name, sub in (node.get("$defs") or {}).items():
            walk(sub, f"#/$defs/{name}")

    walk(schema, "")
    assert missing == []
