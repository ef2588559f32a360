"""Model weights: fetched once on the controller (the real huggingface_hub against a loopback hub stand-in), shipped
to hosts by the vilms_stack role (real rsync / copy), verified by size + sha256, and refused when a disk is full."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devkit.hub_standin import HubStandin, publish_tiny
from vilms.deploy import weights
from vilms.deploy.compose import render_compose
from vilms.config.load import build_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REPO = "acme/tiny-llm"


def vllm_config(**weights_block) -> dict:
    model = {"name": REPO, "aliases": ["LLM"]}
    if weights_block:
        model["weights"] = weights_block
    return {"host": {"platform": "dgpu"}, "gateway": {"allow-anonymous": True},
            "serving": {"engine": "vllm", "models": [model]}}


@pytest.fixture()
def hub(tmp_path):
    publish_tiny(tmp_path / "hub", REPO)
    with HubStandin(tmp_path / "hub") as server:
        yield server


# --- which models, where --------------------------------------------------------------------------------------

def test_weights_for_covers_vllm_and_local_embeddings_and_leaves_operator_paths_alone():
    config = build_config({
        "serving": {"engine": "vllm", "models": [
            {"name": "Qwen/Qwen3-4B-Instruct-2507", "path": "Qwen/Qwen3-4B-Instruct-2507", "aliases": ["LLM"]},
            {"name": "org/pinned", "weights": {"revision": "v1.0"}},
            {"name": "provided", "path": "/models/provided"},
            {"name": "engine-downloads/x", "weights": {"ship": False}},
            {"name": "qwen2.5vl:3b", "type": "vlm"}]},
        "embedding": {"enabled": True, "model": "intfloat/multilingual-e5-small"}})
    specs = {w.model: w for w in weights.weights_for(config)}
    assert set(specs) == {"Qwen/Qwen3-4B-Instruct-2507", "org/pinned", "intfloat/multilingual-e5-small"}
    qwen = specs["Qwen/Qwen3-4B-Instruct-2507"]
    assert (qwen.repo, qwen.container_path, qwen.host_dir) == (
        "Qwen/Qwen3-4B-Instruct-2507", "/models/qwen-qwen3-4b-instruct-2507", "./models/qwen-qwen3-4b-instruct-2507")
    assert specs["org/pinned"].slug == "org-pinned--v1.0"
    assert specs["intfloat/multilingual-e5-small"].service == "gateway"


def test_compose_points_vllm_at_the_shipped_copy_and_picks_the_embeddings_gateway_image():
    config = build_config({
        "serving": {"engine": "vllm", "models": [{"name": "Qwen/Qwen3-4B-Instruct-2507", "aliases": ["LLM"]}]},
        "embedding": {"enabled": True, "model": "intfloat/multilingual-e5-small"},
        "docker": {"tag": {"gateway": "0.1.0"}}})
    compose = yaml.safe_load(render_compose(config, gpu=False))
    vllm = compose["services"]["vllm-qwen-qwen3-4b-instruct-2507"]
    cmd = vllm["command"]
    assert cmd[cmd.index("--model") + 1] == "/models/qwen-qwen3-4b-instruct-2507"
    assert cmd[cmd.index("--served-model-name") + 1] == "Qwen/Qwen3-4B-Instruct-2507"
    assert vllm["volumes"] == ["./models/qwen-qwen3-4b-instruct-2507:/models/qwen-qwen3-4b-instruct-2507:ro"]
    assert vllm["environment"]["HF_HUB_OFFLINE"] == "1"
    gateway = compose["services"]["gateway"]
    assert gateway["image"] == "vilms/gateway:0.1.0-emb"
    assert "./models/intfloat-multilingual-e5-small:/models/intfloat-multilingual-e5-small:ro" in gateway["volumes"]
    assert gateway["environment"]["VILMS_MODELS_DIR"] == "/models"
    os.environ[weights.MODELS_DIR_ENV] = "/models"
    try:
        emb = next(s for s in config.models if s.is_embedding)
        assert weights.runtime_source(config, emb) == "/models/intfloat-multilingual-e5-small"
    finally:
        del os.environ[weights.MODELS_DIR_ENV]
    assert weights.runtime_source(config, emb) == "intfloat/multilingual-e5-small"  # dev box: as written
    slim = build_config({"serving": {"engine": "vllm", "models": [{"name": "m"}]}, "docker": {"tag": {"gateway": "0.1.0"}}})
    assert yaml.safe_load(render_compose(slim, gpu=False))["services"]["gateway"]["image"] == "vilms/gateway:0.1.0"


# --- controller fetch -----------------------------------------------------------------------------------------

def test_fetch_downloads_once_with_allow_patterns_and_a_hub_checked_manifest(hub, tmp_path):
    spec = weights.weights_for(build_config(vllm_config()))[0]
    fetched = weights.fetch(spec, tmp_path / "cache", endpoint=hub.url)
    files = {f.path: f for f in fetched.files}
    assert set(files) == {"config.json", "model.safetensors", "tokenizer_config.json"}  # README.md not allowed
    tree = json.loads(_get(f"{hub.url}/api/models/{REPO}/tree/main"))
    lfs = next(e for e in tree if e["path"] == "model.safetensors")["lfs"]
    assert (files["model.safetensors"].sha256, files["model.safetensors"].origin) == (lfs["oid"], "hub-lfs")
    assert weights.verify(fetched.staged, fetched.files) == []
    downloads = [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]
    assert len(downloads) == 3
    hub.requests.clear()
    again = weights.fetch(spec, tmp_path / "cache", endpoint=hub.url)
    assert again.files == fetched.files
    assert not [r for r in hub.requests if "/resolve/" in r]  # second fetch: nothing downloaded


def test_fetch_refuses_a_cache_file_that_does_not_match_the_hub(hub, tmp_path):
    spec = weights.weights_for(build_config(vllm_config()))[0]
    fetched = weights.fetch(spec, tmp_path / "cache", endpoint=hub.url)
    blob = (Path(fetched.staged) / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert weights.verify(fetched.staged, fetched.files) == [
        f"model.safetensors: sha256 {weights.sha256_file(blob)[:12]}…, expected {fetched.files[1].sha256[:12]}…"]
    for manifest in (tmp_path / "cache" / "manifests").rglob("*.json"):
        manifest.unlink()
    with pytest.raises(weights.WeightsError, match="does not match the hub"):
        weights.fetch(spec, tmp_path / "cache", endpoint=hub.url)


def test_gated_repo_needs_the_token(hub, tmp_path):
    (tmp_path / "hub" / "acme" / "tiny-llm.gated").write_text("hf_secret\n")
    spec = weights.weights_for(build_config(vllm_config()))[0]
    with pytest.raises(weights.WeightsError, match="gated or private"):
        weights.fetch(spec, tmp_path / "cache", endpoint=hub.url)
    fetched = weights.fetch(spec, tmp_path / "cache", endpoint=hub.url, token="hf_secret")
    assert weights.verify(fetched.staged, fetched.files) == []


def test_pinned_revision_and_unknown_revision(hub, tmp_path):
    commit = json.loads(_get(f"{hub.url}/api/models/{REPO}"))["sha"]
    spec = weights.weights_for(build_config(vllm_config(revision=commit)))[0]
    assert weights.fetch(spec, tmp_path / "cache", endpoint=hub.url).commit == commit
    bad = weights.weights_for(build_config(vllm_config(revision="v9")))[0]
    with pytest.raises(weights.WeightsError, match="RevisionNotFound"):
        weights.fetch(bad, tmp_path / "cache", endpoint=hub.url)


def test_local_directory_source_for_air_gapped_sites(tmp_path):
    src = publish_tiny(tmp_path / "offline", REPO)
    spec = weights.weights_for(build_config(vllm_config(**{"local-dir": str(src)})))[0]
    fetched = weights.fetch(spec, tmp_path / "cache")
    assert {f.path for f in fetched.files} == {"config.json", "model.safetensors", "tokenizer_config.json"}
    assert all(f.sha256 == weights.sha256_file(src / f.path) for f in fetched.files)
    assert weights.verify(fetched.staged, fetched.files) == []


def test_cli_verify_reports_each_bad_file(hub, tmp_path):
    spec = weights.weights_for(build_config(vllm_config()))[0]
    fetched = weights.fetch(spec, tmp_path / "cache", endpoint=hub.url)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-rL", fetched.staged, str(copy)], check=True)
    (copy / "config.json").unlink()
    (tmp_path / "m.json").write_text(json.dumps({"files": [f.__dict__ for f in fetched.files]}))
    result = subprocess.run([sys.executable, "-m", "vilms", "weights", "verify", str(copy), "--manifest",
                             str(tmp_path / "m.json")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and json.loads(result.stdout)["problems"] == ["config.json: missing"]


# --- shipping with the role -------------------------------------------------------------------------------------

def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def run_ship(tmp: Path, hub_url: str, hosts: dict[str, dict], limit: str | None = None) -> subprocess.CompletedProcess:
    inventory = {"all": {"children": {"dgpu": {"hosts": {
        name: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
               "vilms_stack_dir": str(tmp / name / "opt" / "vilms"),
               "vilms_preflight_render_dir": str(tmp / "render" / name), **extra} for name, extra in hosts.items()}}},
        "vars": {"vilms_config": vllm_config(), "vilms_gpu": False, "vilms_stack_hf_endpoint": hub_url,
                 "vilms_stack_weights_cache": str(tmp / "cache")}}}
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0", "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_LOCALHOST_WARNING": "0"}
    args = [str(BIN / "ansible-playbook"), "-i", str(tmp / "hosts.yml"), str(ROOT / "tests" / "deploy" / "weights" / "ship.yml")]
    if limit:
        args += ["--limit", limit]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def recap(output: str) -> dict[str, dict[str, int]]:
    rows = re.findall(r"^(\S+)\s+:\s+(.*)$", output.split("PLAY RECAP")[-1], re.M)
    return {host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", stats)} for host, stats in rows}


def models_dir(tmp: Path, host: str) -> Path:
    return tmp / host / "opt" / "vilms" / "models" / "acme-tiny-llm"


@pytest.mark.ansible
@pytest.mark.timeout(900)
def test_role_ships_once_to_two_hosts_reruns_unchanged_and_resends_a_corrupt_file(hub, tmp_path):
    hosts = {"h12-w1": {}, "h12-w2": {"vilms_stack_weights_transport": "copy"}}  # rsync and the plain-copy fallback
    first = run_ship(tmp_path, hub.url, hosts)
    assert first.returncode == 0, first.stdout[-6000:]
    assert len([r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]) == 3  # fetched once for both
    manifest = json.loads((models_dir(tmp_path, "h12-w1") / ".vilms-weights.json").read_text())
    for host in hosts:
        files = [weights.FileEntry(**f) for f in manifest["files"]]
        assert weights.verify(models_dir(tmp_path, host), files) == []
    assert "acme/tiny-llm: model.safetensors (0.2 MiB)" in first.stdout  # one progress line per file

    second = run_ship(tmp_path, hub.url, hosts)
    assert second.returncode == 0, second.stdout[-6000:]
    assert {h: r["changed"] for h, r in recap(second.stdout).items()} == {"h12-w1": 0, "h12-w2": 0}

    # Same size, same mtime, one byte flipped: only the sha256 check can see it.
    for host in hosts:
        target = models_dir(tmp_path, host) / "model.safetensors"
        stat = target.stat()
        data = bytearray(target.read_bytes())
        data[4096] ^= 0x01
        target.write_bytes(bytes(data))
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    third = run_ship(tmp_path, hub.url, hosts)
    assert third.returncode == 0, third.stdout[-6000:]
    assert "Send again what failed verification" in third.stdout
    for host in hosts:
        assert recap(third.stdout)[host]["changed"] >= 1
        files = [weights.FileEntry(**f) for f in manifest["files"]]
        assert weights.verify(models_dir(tmp_path, host), files) == []


@pytest.mark.ansible
def test_host_without_space_fails_in_preflight_before_anything_changes(hub, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs as the host's disk: run it as root (make test does)")
    small = tmp_path / "h12-full" / "opt"
    small.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "h12-weights-test", str(small)], check=True)
    try:
        result = run_ship(tmp_path, hub.url, {"h12-full": {}})
        assert result.returncode != 0
        message = re.search(r"h12-full: not enough disk for model weights.*", result.stdout).group(0)
        assert "164318 bytes to ship, 65536 free" in message
        assert "acme/tiny-llm: 164318 of 164318 bytes to ship" in message
        assert list(small.iterdir()) == []  # nothing created on the host
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.ansible
def test_prune_removes_only_shipped_weights_no_kept_release_references(tmp_path):
    stack = tmp_path / "h12-p1" / "opt" / "vilms"
    models = stack / "models"
    for slug in ("kept-by-old-release", "current", "orphan"):
        (models / slug).mkdir(parents=True)
        (models / slug / "model.safetensors").write_bytes(b"x")
        (models / slug / weights.MANIFEST_NAME).write_text("{}")
    (models / "operator-provided").mkdir()  # no marker: vilms did not ship it, never touched
    for release, slug in (("aaa111", "current"), ("bbb222", "kept-by-old-release")):
        (stack / "releases" / release).mkdir(parents=True)
        (stack / "releases" / release / "plan.json").write_text(json.dumps({"weights": [{"slug": slug}]}))
    inventory = {"all": {"hosts": {"h12-p1": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                                              "vilms_stack_dir": str(stack),
                                              "vilms_stack_plan": {"models_dir": "./models"}}}}}  # the render's
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_LOCALHOST_WARNING": "0"}
    result = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path / "hosts.yml"),
                             str(ROOT / "tests" / "deploy" / "weights" / "prune.yml")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-4000:]
    assert sorted(p.name for p in models.iterdir()) == ["current", "kept-by-old-release", "operator-provided"]
