"""The example inventory deploys as written: copy inventories/example/, swap only what the rig cannot have, run
site.yml, pass the full health gate, then answer through the official openai client. Before that, in seconds and
without the rig: its SKU layers fit every board (`vilms plan --inventory`), and the preflight and
`vilms plan --inventory` see the same effective config for every host.

Swapped: host names (one dgpu rig host, one Orin Nano rig host), the stand-in images (shipped as archives, as
air-gapped sites do), the stand-ins for the NVIDIA driver and JetPack (molecule/resources/prepare.yml), and the two
sources the controller fetches models from: the example's own model ids are published to a loopback stand-in of the
Hugging Face file API (tiny random weights for the vLLM model, MiniLM's files for the embedding model), fetched with
the real huggingface_hub; the Jetson's Ollama model is pushed to a real registry (Debian's docker-registry) on the
controller's loopback, as a site mirror of Ollama's registry would hold it. Both boxes start with Debian's Docker installed (as a
flashed Jetson does; `docker_engine_source: auto` keeps it) and sit on a Docker network with no route out (`--internal`): everything else they get comes
from the controller. Everything else — models, aliases,
engines, SKU layers, gateway tag with the embeddings variant chosen automatically — is the example's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devkit import ollama_models
from devkit.hub_standin import HubStandin, publish_tiny
from devkit.fleet import box_image, docker_client
from tests.support import docker_registry, minilm_path, tiny_gguf

NEEDS_RIG = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("dockerd") is None,
                               reason="the rig needs root and dockerd (make system)")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RIG = ROOT / "devkit" / "rig" / "rig.sh"
PREFIX = os.environ.get("VILMS_RIG_PREFIX", "vilms-rig")
HOST = f"{PREFIX}-example-gpu-01"
JETSON = f"{PREFIX}-example-jetson-01"
OFFLINE = f"{PREFIX}-example-offline"  # a Docker network with no route out
CACHE = Path(os.environ.get("VILMS_RIG_CACHE", ROOT / ".cache" / "rig"))
# The gateway image as the rig builds it; a session that must not retag shared images passes its own.
GATEWAY = os.environ.get("VILMS_EXAMPLE_GATEWAY", "vilms/gateway:rig-emb")
GATEWAY_ARCHIVE = os.environ.get("VILMS_EXAMPLE_GATEWAY_ARCHIVE", str(CACHE / "images" / "gateway-emb.tar"))


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "VILMS_RIG_CACHE": str(CACHE)}


@pytest.fixture(scope="module")
def example_rig(rig):
    running = subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    subprocess.run(["bash", str(RIG), "daemon-up"], check=True, env=env(), timeout=120)
    try:
        if os.environ.get("VILMS_EXAMPLE_PREBUILT") != "1" and os.environ.get("VILMS_RIG_READY") != "1":
            subprocess.run(["bash", str(RIG), "images"], check=True, env=env(), timeout=1800)
        subprocess.run(["bash", str(RIG), "base-image"], check=True, env=env(), timeout=600)
        yield
    finally:
        if not running:  # stop only a daemon this fixture started
            subprocess.run(["bash", str(RIG), "daemon-down"], env=env(), timeout=120)


@pytest.fixture()
def host(example_rig):
    def clean() -> None:
        subprocess.run(["docker", "rm", "-fv", HOST, JETSON], capture_output=True)
        subprocess.run(["docker", "network", "rm", OFFLINE], capture_output=True)

    clean()
    image = box_image(docker_client(), bare=False)  # Docker preinstalled, as a flashed Jetson or an offline server has
    subprocess.run(["docker", "network", "create", "--internal", OFFLINE], check=True, capture_output=True)
    for name in (HOST, JETSON):
        subprocess.run(["docker", "run", "-d", "--name", name, "--hostname", name, "--network", OFFLINE,
                        "--privileged", "--cgroupns", "private", "-v", "/var/lib/docker", image,
                        "bash", "-c", 'trap "exit 0" TERM; sleep infinity & wait'], check=True, capture_output=True)
    try:
        yield HOST
    finally:
        clean()


def publish_example_models(hub_root: Path) -> None:
    """The example's own repo ids, served by the loopback hub stand-in."""
    publish_tiny(hub_root, "Qwen/Qwen3-4B-Instruct-2507")
    e5 = hub_root / "intfloat" / "multilingual-e5-small"
    shutil.copytree(minilm_path(), e5, ignore=shutil.ignore_patterns(".*"))


def copy_example(tmp: Path, hub_url: str, ollama_registry: str) -> Path:
    """inventories/example/ as a new site would copy it; then only the rig's swaps are added."""
    site = tmp / "site"
    shutil.copytree(ROOT / "inventories" / "example", site)
    repo, _, tag = GATEWAY.rpartition(":")
    hosts = yaml.safe_load((site / "hosts.yml").read_text())
    hosts["all"]["children"]["dgpu"]["hosts"] = {HOST: None}  # one rig host for the example's dgpu servers
    for sku in hosts["all"]["children"]["jetsons"]["children"].values():
        sku["hosts"] = {}
    hosts["all"]["children"]["jetsons"]["children"]["orin_nano_8gb"]["hosts"] = {JETSON: None}  # and its smallest board
    (site / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (site / "host_vars" / f"{JETSON}.yml").write_text(yaml.safe_dump({
        "ansible_connection": "community.docker.docker", "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_become": False, "ansible_user": "root",
        # An x86_64 box stands in for the arm64 board (the L4T file and nvidia runtime come from prepare.yml); its
        # memory is the controller's, not the Orin Nano's 8 GB, so the capacity plan (tested without the rig) is off.
        "vilms_architecture": "aarch64", "jetson_runtime_packages": [], "vilms_capacity_check": False,
        "vilms_stack_image_archives": [
            {"image": "vilms/gateway:rig", "src": str(CACHE / "images" / "gateway.tar")},
            {"image": "vilms-rig/engines:r36.4.0", "src": str(CACHE / "images" / "engines.tar")}],
        "vilms_config_host": {"docker": {
            "pull-policy": "never", "image": {"gateway": "vilms/gateway", "ollama": "vilms-rig/engines"},
            "tag": {"gateway": "rig"}}}}))
    (site / "host_vars" / f"{HOST}.yml").write_text(yaml.safe_dump({
        "ansible_connection": "community.docker.docker", "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_become": False, "ansible_user": "root",
        # Stand-in images under the example's own model config; the gateway tag is the slim name: the role
        # picks the embeddings variant (-emb) itself because the example embeds locally.
        "vilms_config_host": {"docker": {
            "pull-policy": "never",
            "image": {"gateway": repo, "vllm": "vilms-rig/engines", "ollama": "vilms-rig/engines"},
            "tag": {"gateway": tag.removesuffix("-emb"), "vllm": "standin", "engine": "standin"}}}}))
    (site / "group_vars" / "all" / "rig.yml").write_text(yaml.safe_dump({
        "vilms_rig_minilm": minilm_path(),
        "docker_engine_compose_plugin_src": str(Path.home() / ".docker" / "cli-plugins" / "docker-compose"),
        "nvidia_container_toolkit_repo_enabled": False, "nvidia_container_toolkit_packages": [],
        "nvidia_container_toolkit_require_driver": True,
        "vilms_stack_image_source": "archive",
        "vilms_stack_image_archives": [{"image": GATEWAY, "src": GATEWAY_ARCHIVE},
                                       {"image": "vilms-rig/engines:standin", "src": str(CACHE / "images" / "engines.tar")}],
        "vilms_stack_gate_delay": 2,
        "vilms_stack_hf_endpoint": hub_url,
        "vilms_stack_weights_cache": str(tmp / "weights-cache"),
        "vilms_stack_ollama_registry": ollama_registry,
        "vilms_stack_ollama_cache": str(tmp / "ollama-cache")}))
    return site / "hosts.yml"


def playbook(inventory: Path, playbook_path: Path, log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        return subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook_path)], cwd=ROOT,
                              env=env(), stdout=out, stderr=subprocess.STDOUT, timeout=1500)


def container_ip(name: str) -> str:
    return subprocess.run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.timeout(2400)
@pytest.mark.molecule
@NEEDS_RIG
def test_example_inventory_deploys_as_written(host, tmp_path):
    hub_root = tmp_path / "hub"
    publish_example_models(hub_root)
    with HubStandin(hub_root) as hub, docker_registry(tmp_path / "ollama-registry") as ollama_registry:
        pushed = ollama_models.push(ollama_registry, "qwen2.5vl:3b", tiny_gguf().read_bytes())  # the Orin Nano's model
        inventory = copy_example(tmp_path, hub.url, ollama_registry)
        prepared = playbook(inventory, ROOT / "molecule" / "resources" / "prepare.yml", tmp_path / "prepare.log")
        assert prepared.returncode == 0, (tmp_path / "prepare.log").read_text()[-4000:]
        log = ROOT / ".cache" / "example-inventory.log"
        log.parent.mkdir(exist_ok=True)
        result = playbook(inventory, ROOT / "site.yml", log)
        text = log.read_text()
        assert result.returncode == 0, f"site.yml on the example inventory failed; last lines of {log}:\n{text[-8000:]}"
        assert "Gate | One short chat completion per chat model" in text and "Gate | One embedding per" in text
        assert "Weights | Verify size and sha256 of every file on the host" in text
        assert "Ollama | Verify size and sha256 of every blob and manifest on the host" in text
        downloads = [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]
        assert len(downloads) == len(set(downloads)) and downloads  # each file fetched once

    # The boxes have no route out; the Jetson's model arrived from the controller, every blob equal to its digest,
    # and its Ollama pulled nothing (the stand-in records a pull in its store, as Ollama keeps what it pulled).
    debian = socket.gethostbyname("deb.debian.org")  # the archive the controller itself reaches
    socket.create_connection((debian, 80), timeout=10).close()
    for box in (HOST, JETSON):
        probe = subprocess.run(["docker", "exec", box, "python3", "-c",
                                f"import socket; socket.create_connection(({debian!r}, 80), timeout=5)"],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and ("unreachable" in probe.stderr or "timed out" in probe.stderr), probe.stderr
    store = "/opt/vilms/ollama/models"
    for part in [pushed["config"], *pushed["layers"]]:
        path = f"{store}/blobs/{part['digest'].replace(':', '-')}"
        digest = subprocess.run(["docker", "exec", JETSON, "sha256sum", path], check=True, capture_output=True,
                                text=True).stdout.split()[0]
        assert f"sha256:{digest}" == part["digest"]
    assert subprocess.run(["docker", "exec", JETSON, "test", "-e", f"{store}/vilms-standin-models.json"]).returncode == 1
    assert not [line for line in text.splitlines() if "Pull Ollama models on the host" in line and "included" in line]

    modes = subprocess.run(["docker", "exec", HOST, "stat", "-c", "%n %a %u:%g", "/opt/vilms/current/config.yaml",
                            "/opt/vilms/current/docker-compose.yaml"], check=True, capture_output=True, text=True)
    assert modes.stdout.split("\n")[:2] == ["/opt/vilms/current/config.yaml 640 0:10001",  # may hold a proxy's password
                                             "/opt/vilms/current/docker-compose.yaml 600 0:0"]

    shipped = subprocess.run(["docker", "exec", HOST, "cat",
                              "/opt/vilms/models/qwen-qwen3-4b-instruct-2507/.vilms-weights.json"],
                             check=True, capture_output=True, text=True).stdout
    assert {f["path"] for f in json.loads(shipped)["files"]} == {"config.json", "model.safetensors",
                                                                 "tokenizer_config.json"}
    compose = yaml.safe_load(subprocess.run(["docker", "exec", HOST, "cat", "/opt/vilms/current/docker-compose.yaml"],
                                            check=True, capture_output=True, text=True).stdout)
    assert compose["services"]["gateway"]["image"].endswith("-emb")

    import openai

    key = yaml.safe_load((tmp_path / "site" / "group_vars" / "all" / "vault.yml").read_text())["vault_vilms_gateway_key"]
    keyless = openai.OpenAI(base_url=f"http://{container_ip(HOST)}:8989/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.AuthenticationError):  # published on the LAN: the example's key is required
        keyless.models.list()
    client = openai.OpenAI(base_url=f"http://{container_ip(HOST)}:8989/v1", api_key=key, max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="LLM", max_tokens=4, messages=[{"role": "user", "content": "1+1?"}])
    assert answer.choices[0].message.content is not None
    vectors = client.embeddings.create(model="Embedding", input=["xin chao", "hello"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 384
    listed = {m.id for m in client.models.list().data}
    assert {"LLM", "LLM_SMALL", "LLM_QWEN3", "VLM", "Embedding", "Qwen/Qwen3-4B-Instruct-2507"} <= listed

    jetson = openai.OpenAI(base_url=f"http://{container_ip(JETSON)}:8989/v1", api_key=key, max_retries=0, timeout=120)
    answer = jetson.chat.completions.create(model="VLM_SMALL", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content is not None
    assert {m.id for m in jetson.models.list().data} >= {"qwen2.5vl:3b", "LLM", "VLM_SMALL"}


# --- the example's layers, without the rig ------------------------------------------------------------------------

EXAMPLE = ROOT / "inventories" / "example" / "hosts.yml"
# Each host's layers in merge order (docs/config.md "Layered config"): platform group, SKU group, host exception.
EXAMPLE_LAYERS = {
    "gpu-server-01.example": ["vilms_config", "vilms_config__10_dgpu"],
    "gpu-server-02.example": ["vilms_config", "vilms_config__10_dgpu"],
    "jetson-orin-01.example": ["vilms_config", "vilms_config__10_jetsons", "vilms_config__20_orin_nano_8gb"],
    "jetson-orin-02.example": ["vilms_config", "vilms_config__10_jetsons", "vilms_config__20_orin_nano_8gb",
                               "vilms_config_host"],
    "jetson-nx-01.example": ["vilms_config", "vilms_config__10_jetsons", "vilms_config__20_orin_nx_16gb"],
    "jetson-agx-01.example": ["vilms_config", "vilms_config__10_jetsons", "vilms_config__20_agx_orin_64gb"],
}

# Runs `python -m vilms ...` as the role asks, keeping a copy of the `render --many` input (every host's effective
# config as the preflight merged it; the role removes it after the render).
CAPTURING_PYTHON = """#!{python}
import runpy, shutil, sys
if "--many" in sys.argv:
    shutil.copyfile(sys.argv[sys.argv.index("--many") + 1], {capture!r})
assert sys.argv[1:3] == ["-m", "vilms"], sys.argv
sys.argv = ["vilms", *sys.argv[3:]]
runpy.run_module("vilms", run_name="__main__", alter_sys=True)
"""


def plan_inventory_json(*args: str) -> tuple[int, dict]:
    run = subprocess.run([sys.executable, "-m", "vilms", "plan", "--inventory", str(EXAMPLE), "--format", "json", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.stdout.strip(), run.stderr
    return run.returncode, json.loads(run.stdout)


@pytest.mark.ansible
def test_every_example_host_fits_with_its_sku_layers():
    """`vilms plan --inventory inventories/example/hosts.yml`: every host fits on its declared memory."""
    rc, report = plan_inventory_json()
    hosts = {h["host"]: h for h in report["hosts"]}
    assert {h: r.get("verdict") for h, r in hosts.items()} == dict.fromkeys(EXAMPLE_LAYERS, "fits"), report
    assert rc == 0 and report["ok"] is True
    assert {h: r["layers"] for h, r in hosts.items()} == EXAMPLE_LAYERS
    models = {h: [m["model"] for m in r["models"] if m["engine"] == "ollama" or m["engine"] == "vllm"]
              for h, r in hosts.items()}
    assert models["jetson-orin-01.example"] == ["qwen2.5vl:3b"]            # the SKU layer replaced the list
    assert models["jetson-nx-01.example"] == ["qwen2.5:3b", "qwen2.5vl:7b"]
    assert models["jetson-agx-01.example"] == ["qwen3:32b", "qwen2.5vl:32b"]
    assert hosts["jetson-agx-01.example"]["unified_gib"] == 64 and hosts["jetson-nx-01.example"]["unified_gib"] == 16
    assert hosts["gpu-server-01.example"]["gpus_gib"] == [80]


@pytest.mark.ansible
def test_the_preflight_and_plan_inventory_see_the_same_config_for_every_example_host(tmp_path):
    """The real preflight (site.yml --tags preflight) against the example inventory, and `vilms plan --inventory`."""
    from vilms.deploy.capacity_inventory import effective_configs

    from tests.ansible.fleet_hosts import ansible_env

    capture = tmp_path / "many.json"
    python = tmp_path / "capturing-python"
    python.write_text(CAPTURING_PYTHON.format(python=sys.executable, capture=str(capture)))
    python.chmod(0o755)
    env = ansible_env(tmp_path, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
                      VILMS_FLEET_REPORT="off",
                      ANSIBLE_CALLBACKS_ENABLED="vilms_fleet_report")  # keep the renders to plan from them (no cleanup)
    run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(EXAMPLE), str(ROOT / "site.yml"), "--tags", "preflight",
                          "-e", f"vilms_capacity_python={python}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    rendered = json.loads(capture.read_text())["hosts"]
    planned = effective_configs(str(EXAMPLE))
    assert set(rendered) == set(planned) == set(EXAMPLE_LAYERS)
    for host in EXAMPLE_LAYERS:  # config, gpu and layers, host by host (a diff names the host)
        assert (host, rendered[host]) == (host, planned[host])
    # the inventory's {{ vault_vilms_gateway_key }} resolved, in both
    vault = yaml.safe_load((ROOT / "inventories" / "example" / "group_vars" / "all" / "vault.yml").read_text())
    assert {planned[h]["config"]["gateway"]["api-keys"][0]["key"] for h in planned} == {vault["vault_vilms_gateway_key"]}

    # And the verdicts: `vilms plan --render` on each preflight render says what `vilms plan --inventory` says.
    _, report = plan_inventory_json()
    offline = {h["host"]: {k: v for k, v in h.items() if k != "layers"} for h in report["hosts"]}
    for host in EXAMPLE_LAYERS:
        out = next((tmp_path / ".cache" / "vilms" / "rendered").glob(f"run-*/{host}"))
        one = subprocess.run([sys.executable, "-m", "vilms", "plan", "--render", str(out), "--host", host,
                              "--format", "json"], capture_output=True, text=True, timeout=60)
        assert json.loads(one.stdout)["hosts"][0] == offline[host], host
