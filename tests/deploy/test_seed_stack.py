"""A seed project's config, rendered by `vilms render` and run by the real compose v2 on a real Docker engine.

The seed wrote `serving.ollama-base-url: http://vilms-ollama:11434` and `docker.docker-project`; before, that
rendered no Ollama service and the project key was rejected. Here the render must yield a service named
`vilms-ollama` in a compose project of that name, and the gateway (built from this tree) must reach it: its
readiness lists the model as ready only once the engine holds it, and a chat completion through the official
`openai` client is answered by that engine (the Ollama stand-in with the real llama.cpp on the tiny model).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from devkit.rig_image import BASE_IMAGE
from tests.support import free_port

pytestmark = [pytest.mark.docker,
              pytest.mark.skipif(shutil.which("docker") is None or os.geteuid() != 0,
                                 reason="needs root and the Docker engine (make system)")]

ROOT = Path(__file__).resolve().parents[2]
RIG = ROOT / "devkit" / "rig" / "rig.sh"
PREFIX = os.environ.get("VILMS_TEST_PREFIX", "vilmstest")
GATEWAY_IMAGE = f"{PREFIX}/gateway:seed-stack"
ENGINE_IMAGE = "vilms-rig/engines:standin"


def docker_ok() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def have_image(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def images(rig):
    """A Docker engine (the rig's, stopped afterwards only if started here), the stand-in, a gateway of this tree."""
    started = False
    if not docker_ok():
        subprocess.run(["bash", str(RIG), "daemon-up"], check=True, timeout=120)
        started = True
    try:
        wheels = ROOT / "gateway" / "wheels"
        if not (have_image(ENGINE_IMAGE) and have_image(BASE_IMAGE) and any(wheels.glob("*.whl"))):
            subprocess.run(["bash", str(RIG), "images"], check=True, timeout=1800)
        subprocess.run(["docker", "build", "-q", "-f", "gateway/Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                        "--build-arg", "PIP_ARGS=--no-index", "-t", GATEWAY_IMAGE, "."],
                       cwd=ROOT, check=True, capture_output=True, timeout=900)
        yield
    finally:
        if started:
            subprocess.run(["bash", str(RIG), "daemon-down"], timeout=120)


def seed_config(port: int) -> dict:
    repo, _, tag = ENGINE_IMAGE.partition(":")
    return {
        "host": {"platform": "js"},
        "serving": {"engine": "ollama", "ollama-base-url": "http://vilms-ollama:11434", "models": [
            {"name": "qwen2.5:3b", "type": "llm", "aliases": ["LLM_SMALL"], "params": [{"max-tokens": 8}]}]},
        "model-aliases": {"LLM": "LLM_SMALL"},
        "docker": {"docker-project": f"{PREFIX}-seed", "docker-network": f"{PREFIX}-seed-net",
                   "pull-policy": "never", "gateway-bind": "127.0.0.1", "gateway-port": port,
                   "image": {"gateway": GATEWAY_IMAGE.rpartition(":")[0], "ollama": repo},
                   "tag": {"gateway": GATEWAY_IMAGE.rpartition(":")[2], "engine": tag}},
    }


def compose(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "compose", "-f", str(out / "docker-compose.yaml"), *args], cwd=out,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_seed_config_runs_vilms_ollama_and_the_gateway_reaches_it(images, tmp_path):
    port = free_port()
    src, out = tmp_path / "config.yaml", tmp_path / "stack"
    src.write_text(yaml.safe_dump(seed_config(port)))
    rendered = subprocess.run([sys.executable, "-m", "vilms", "render", "--config", str(src), "--out", str(out),
                               "--gpu", "no"], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["project"] == f"{PREFIX}-seed" and plan["ollama_pulls"] == [
        {"service": "vilms-ollama", "models": ["qwen2.5:3b"]}]
    try:
        up = compose(out, "up", "-d", "--wait", "--wait-timeout", "240")
        assert up.returncode == 0, up.stderr[-3000:] + compose(out, "logs", "--no-color").stdout[-3000:]
        listed = [json.loads(line) for line in compose(out, "ps", "--format", "json").stdout.splitlines() if line]
        assert {c["Service"] for c in listed} == {"vilms-ollama", "gateway"}
        assert {c["Project"] for c in listed} == {f"{PREFIX}-seed"}
        base = plan["gateway"]["url"]
        assert base == f"http://127.0.0.1:{port}"
        report = httpx.get(base + "/health/ready", timeout=30)
        assert report.status_code == 503  # the engine answers, the model is not pulled yet
        assert [(m["model"], m["state"]) for m in report.json()["models"]] == [("qwen2.5:3b", "missing")]
        for pull in plan["ollama_pulls"]:
            for model in pull["models"]:
                pulled = compose(out, "exec", "-T", pull["service"], "ollama", "pull", model)
                assert pulled.returncode == 0, pulled.stderr
        report = httpx.get(base + "/health/ready", timeout=30)
        assert report.status_code == 200, report.text
        import openai

        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="LLM", messages=[{"role": "user", "content": "hello"}])
        assert answer.model == "qwen2.5:3b" and answer.choices[0].message.content
    finally:
        compose(out, "down", "--volumes", "--remove-orphans", timeout=180)
