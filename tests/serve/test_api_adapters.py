"""LoRA adapters: config rules, routing to the base's service under the adapter's name, /v1/models, compose flags,
and the role's Ollama derived-model task (idempotent against the rig's Ollama stand-in container)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import ROOT, ThreadedServer, gateway

VLLM_MODEL = {"name": "org/base", "type": "llm", "engine": "vllm", "path": "/models/base", "aliases": ["BASE"],
              "params": {"max-tokens": 3},
              "adapters": [{"name": "sql-lora", "path": "/models/loras/sql", "aliases": ["SQL"]},
                           {"name": "chat-lora", "path": "/models/loras/chat"}]}
OLLAMA_MODEL = {"name": "llama3.2:1b", "type": "llm", "engine": "ollama",
                "adapters": [{"name": "coder-lora", "path": "/adapters/coder.gguf"}]}


def config(vllm_url: str | None = None, ollama_url: str = "http://127.0.0.1:9") -> dict:
    serving: dict = {"engine": "vllm", "ollama-base-url": ollama_url, "models": [VLLM_MODEL, OLLAMA_MODEL]}
    if vllm_url:
        serving["vllm-base-url"] = vllm_url
    return {"host": {"platform": "dgpu"}, "serving": serving}


def test_adapters_route_to_the_base_service_under_their_own_name():
    from vilms.config.load import build_config
    from vilms.config.routing import Router

    router = Router(build_config(config()))
    base, sql, alias = router.resolve("org/base"), router.resolve("sql-lora"), router.resolve("SQL")
    assert sql.base_urls == base.base_urls == ("http://vllm-org-base:8000",)
    assert sql.name == "sql-lora" and sql.spec.parent == "org/base" and alias is sql
    coder = router.resolve("coder-lora")
    assert coder.engine == "ollama" and coder.base_urls == router.resolve("llama3.2:1b").base_urls


def test_compose_renders_vllm_lora_flags_and_no_service_per_adapter():
    from vilms.deploy.compose import render_compose
    from vilms.config.load import build_config

    services = yaml.safe_load(render_compose(build_config(config()), gpu=False))["services"]
    command = services["vllm-org-base"]["command"]
    assert command[command.index("--lora-modules") + 1: command.index("--lora-modules") + 3] == [
        "sql-lora=/models/loras/sql", "chat-lora=/models/loras/chat"]
    assert "--enable-lora" in command and command[command.index("--max-loras") + 1] == "2"
    assert not [name for name in services if "lora" in name]


@pytest.mark.parametrize("change,message", [
    ({"type": "embedding", "engine": "openai", "base-url": "http://e:1"}, "cannot carry LoRA adapters"),
    ({"engine": "openai", "base-url": "http://e:1"}, "openai engine"),
    ({"adapters": [{"name": "llama3.2:1b", "path": "/x"}]}, "already a model"),
    ({"adapters": [{"name": "x"}]}, "path"),
])
def test_preflight_rejects_adapters_that_cannot_be_carried(change, message):
    from vilms.config.model import ConfigError
    from vilms.config.load import build_config

    data = config()
    data["serving"]["models"][0] = {**VLLM_MODEL, **change}
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_ollama_adapters_list_for_the_role():
    from vilms.config.adapters import ollama_adapters
    from vilms.config.load import build_config
    from vilms.config.routing import chat_engine

    cfg = build_config(config())
    assert ollama_adapters(cfg, lambda spec: chat_engine(cfg, spec)) == [
        {"name": "coder-lora", "from": "llama3.2:1b", "adapter": "/adapters/coder.gguf"}]


def test_requests_reach_the_right_service_with_the_adapter_name(ollama_standin):
    from devkit.openai_standin import create_app

    import ollama

    ollama.Client(host=ollama_standin.url).create(model="coder-lora", from_="llama3.2:1b")
    app = create_app(["org/base", "sql-lora", "chat-lora"])
    with ThreadedServer(app) as engine, gateway(config(engine.url, ollama_standin.url)) as gw:
        r = httpx.post(gw.url + "/v1/completions", json={"model": "SQL", "prompt": "select"})
        assert r.status_code == 200
        path, sent, _ = app.state.standin["requests"][-1]
        assert (path, sent["model"], sent["max_tokens"]) == ("/v1/completions", "sql-lora", 3)  # base's defaults
        r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "coder-lora", "max_tokens": 1,
                                                              "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
        assert [b for k, b in ollama_standin.state["requests"] if k == "chat"][-1]["model"] == "coder-lora"
        models = {m["id"]: m for m in httpx.get(gw.url + "/v1/models").json()["data"]}
        assert models["sql-lora"]["parent"] == "org/base" and models["coder-lora"]["parent"] == "llama3.2:1b"
        assert models["SQL"]["alias_of"] == "sql-lora"
        assert httpx.get(gw.url + "/v1/models/chat-lora").json()["parent"] == "org/base"


# -- the role's task, against the rig's Ollama stand-in image ------------------------------------------------

IMAGE = "vilms-rig/engines:standin"
PROJECT = "h13-adapters"


COMPOSE = f"""name: {PROJECT}
services:
  ollama:
    image: {IMAGE}
    network_mode: none  # the rig's stand-in image, built from this tree by the session's rig fixture
"""


def compose(release, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "compose", "--project-directory", str(release), "-f",
                           str(release / "docker-compose.yaml"), "-f", str(release / "docker-compose.pinned.yaml"),
                           *args], capture_output=True, text=True, timeout=120, check=check)


@pytest.fixture()
def release(rig, tmp_path):
    """A release directory whose compose project runs the Ollama stand-in as service "ollama" (a real compose up)."""
    (tmp_path / "docker-compose.yaml").write_text(COMPOSE)
    (tmp_path / "docker-compose.pinned.yaml").write_text("services:\n  ollama:\n    restart: \"no\"\n")
    compose(tmp_path, "down", "-v", check=False)
    compose(tmp_path, "up", "-d")
    try:
        for _ in range(120):
            if compose(tmp_path, "exec", "-T", "ollama", "ollama", "list", check=False).returncode == 0:
                break
            time.sleep(0.5)
        compose(tmp_path, "exec", "-T", "ollama", "ollama", "pull", "llama3.2:1b")
        yield tmp_path
    finally:
        compose(tmp_path, "down", "-v", check=False)


def run_play(tmp_path, adapters: list[dict]) -> str:
    """The role's task file as deploy.yml runs it: by compose service, from a release directory and plan."""
    plan = {"ollama_adapters": [{**a, "service": "ollama"} for a in adapters]}
    play = tmp_path / "play.yml"
    play.write_text(textwrap.dedent(f"""\
        - hosts: localhost
          connection: local
          gather_facts: false
          vars:
            vilms_stack_release_dir: {tmp_path}
            vilms_stack_pull: {{service: ollama}}
            vilms_stack_plan: {plan!r}
          tasks:
            - ansible.builtin.include_tasks: {ROOT}/roles/vilms_stack/tasks/ollama-adapters.yml
        """))
    done = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-e", f"ansible_python_interpreter={sys.executable}",
                           str(play)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return re.search(r"changed=(\d+)", done.stdout).group(1)


@pytest.mark.docker
@pytest.mark.ansible
def test_ollama_adapter_task_creates_once_then_reports_no_change(release, tmp_path):
    adapters = [{"name": "coder-lora", "from": "llama3.2:1b", "adapter": "/adapters/coder.gguf"}]
    assert run_play(tmp_path, adapters) == "1"
    listed = compose(release, "exec", "-T", "ollama", "ollama", "list").stdout
    assert "coder-lora:latest" in listed
    assert run_play(tmp_path, adapters) == "0"
