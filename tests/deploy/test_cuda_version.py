"""host.cuda-version (a seed key, issue #22): on dgpu it picks the CUDA build of the vLLM image when no tag is pinned.

vLLM 0.20+ publishes `vllm/vllm-openai:<tag>` for CUDA 13.0 and `<tag>-cu129` for CUDA 12.9; a CUDA 12 driver
cannot start the former. Before, the key was rejected by the schema and every host got `latest`.
"""

from __future__ import annotations

import pytest
import yaml

from vilms.config.load import build_config
from vilms.config.model import ConfigError
from vilms.config.routing import semantic_issues
from vilms.deploy.plan import render


def config(cuda=None, platform="dgpu", **docker) -> dict:
    host = {"platform": platform} | ({"cuda-version": cuda} if cuda is not None else {})
    return {"host": host, "serving": {"engine": "vllm", "models": [{"name": "Qwen/Qwen3-0.6B", "engine": "vllm"}]},
            "gateway": {"allow-anonymous": True}, "docker": docker}


def vllm_image(data: dict) -> str:
    compose = yaml.safe_load(render(data, gpu=True).files["docker-compose.yaml"])
    return next(s["image"] for name, s in compose["services"].items() if name.startswith("vllm-"))


def cuda_warnings(data: dict) -> list[str]:
    return [i.message for i in semantic_issues(build_config(data)) if i.pointer == "/host/cuda-version"]


@pytest.mark.parametrize("cuda,image", [
    (None, "vllm/vllm-openai:latest"),
    ("12.6", "vllm/vllm-openai:latest-cu129"),
    ("12.9", "vllm/vllm-openai:latest-cu129"),
    (12.4, "vllm/vllm-openai:latest-cu129"),  # unquoted YAML number
    ("13.0", "vllm/vllm-openai:latest"),
    ("13.1.1", "vllm/vllm-openai:latest"),
])
def test_the_cuda_line_picks_the_vllm_build(cuda, image):
    assert vllm_image(config(cuda)) == image


def test_a_registry_mirror_keeps_the_hint():
    assert vllm_image(config("12.6", registry="reg.example:5000/ai")) == "reg.example:5000/ai/vllm/vllm-openai:latest-cu129"


def test_a_pinned_tag_is_used_as_written_and_a_cuda12_mismatch_is_said():
    assert vllm_image(config("12.6", tag={"vllm": "v0.21.0"})) == "vllm/vllm-openai:v0.21.0"
    assert "pinned (v0.21.0)" in cuda_warnings(config("12.6", tag={"vllm": "v0.21.0"}))[0]
    assert cuda_warnings(config("12.9", tag={"vllm": "v0.21.0-cu129"})) == []
    assert vllm_image(config("12.6", image={"vllm": "vllm/vllm-openai:v0.19.0"})) == "vllm/vllm-openai:v0.19.0"


def test_below_12_9_the_minor_version_compatibility_is_said_and_12_9_is_silent():
    assert "minor-version compatibility" in cuda_warnings(config("12.6"))[0]
    assert cuda_warnings(config("12.9")) == cuda_warnings(config("13.0")) == []


def test_cuda_11_without_a_pinned_tag_is_an_error_naming_the_key():
    with pytest.raises(ConfigError) as info:
        build_config(config("11.8"))
    assert [i.pointer for i in info.value.issues] == ["/host/cuda-version"]
    assert "no image for CUDA 11.8" in info.value.issues[0].message
    assert vllm_image(config("11.8", tag={"vllm": "v0.6.1"})) == "vllm/vllm-openai:v0.6.1"


def test_another_vllm_image_is_left_alone_with_a_warning():
    data = config("12.6", image={"vllm": "acme/vllm"})
    assert vllm_image(data) == "acme/vllm:latest"
    assert "acme/vllm" in cuda_warnings(data)[0]


def test_no_effect_on_jetson_or_without_vllm_is_said():
    jetson = config("12.6", platform="js")
    assert "no effect on a Jetson" in cuda_warnings(jetson)[0]
    ollama_only = {"host": {"platform": "dgpu", "cuda-version": "12.6"}, "serving": {"models": [{"name": "qwen2.5:3b"}]}}
    assert "runs no vLLM container" in cuda_warnings(ollama_only)[0]


@pytest.mark.parametrize("bad", ["twelve", "12", "12.6-rc", True])
def test_a_malformed_cuda_version_is_a_schema_error(bad):
    with pytest.raises(ConfigError) as info:
        build_config(config(bad))
    assert [i.pointer for i in info.value.issues] == ["/host/cuda-version"]
