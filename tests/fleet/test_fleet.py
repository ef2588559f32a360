"""Fleet rollouts on a small simulated fleet (4 Docker-in-Docker boxes: 2 dgpu, 2 Jetson) with the real site.yml.

One fleet for the module, images from a site registry (Debian's docker-registry). Failures are injected the way an
operator would cause them: through host_vars in the fleet's generated inventory (a model no engine serves).
Play order is dgpu-01, dgpu-02, jetson-01, jetson-02; batches [1, "25%", "100%"] are [dgpu-01], [dgpu-02],
[jetson-01, jetson-02].
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import Any, Iterator

import pytest
import yaml

from devkit import fleet as fleetlib

pytestmark = [pytest.mark.docker, pytest.mark.ansible, pytest.mark.timeout(1500)]

PREFIX = os.environ.get("VILMS_FLEET_TEST_PREFIX", "vilms-tfleet")
N = 4


def _docker_ready() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI"
    try:
        client = fleetlib.docker_client()
        client.ping()
        client.images.get(fleetlib.BASE_IMAGE)
    except Exception as exc:  # noqa: BLE001 - any reason is a skip reason here
        return f"Docker or the rig images are not ready ({exc}); run `make fleet-up` once"
    if not (fleetlib.rig_cache() / "images" / "gateway.tar").exists():
        return "rig image archives missing: bash devkit/rig/rig.sh images"
    if not fleetlib.REGISTRY_BINARY.exists():
        return "Debian's docker-registry package is not installed"
    return None




class FleetRun:
    """One rollout's result: return code, parsed report, log text (and what a test measured around it)."""

    def __init__(self, rc: int, report: dict[str, Any], log: str):
        self.rc, self.report, self.log = rc, report, log
        self.rx: dict[str, int] = {}
        self.new_gateway = ""
        self.old_gateway: dict[str, str] = {}

    def host(self, name: str) -> dict[str, Any]:
        return self.report["hosts"][name]


@pytest.fixture(scope="module")
def fleet(rig) -> Iterator[fleetlib.Fleet]:
    missing = _docker_ready()  # after the session's rig fixture: on a machine that can run the rig, a failure
    assert missing is None, missing
    f = fleetlib.Fleet(PREFIX)
    if os.environ.get("VILMS_FLEET_REUSE") and (f.inventory / "hosts.yml").exists():  # development only
        yield f
        return
    fleetlib.down(f)
    fleetlib.up(f, N, registry=True)
    # First rollout: every box at once (the canary behaviour is what the tests below look at).
    run = rollout(f, "first", batches=["100%"])
    assert run.rc == 0, run.log[-6000:]
    assert {h["outcome"] for h in run.report["hosts"].values()} == {"updated"}
    yield f
    if not os.environ.get("VILMS_FLEET_KEEP"):
        fleetlib.down(f)


def rollout(f: fleetlib.Fleet, name: str, batches: list[Any] | None = None, budget: int | None = None,
            limit: str | None = None) -> FleetRun:
    extra: dict[str, Any] = {}
    if batches is not None:
        extra["vilms_rollout_batches"] = batches
    if budget is not None:
        extra["vilms_rollout_max_fail_percentage"] = budget
    args = ["-e", json.dumps(extra)] + (["--limit", limit] if limit else [])
    log = f.state / f"test-{name}.log"
    before = {p.name for p in f.reports.glob("*.json")} if f.reports.exists() else set()
    rc = fleetlib.rollout(f, args, log=log)
    new = sorted({p.name for p in f.reports.glob("*.json")} - before)
    assert new, f"no fleet report written; log:\n{log.read_text()[-4000:]}"
    return FleetRun(rc, json.loads((f.reports / new[-1]).read_text()), log.read_text())


def boxes(f: fleetlib.Fleet) -> list[str]:
    return fleetlib.boxes(f)


def box_exec(name: str, argv: list[str]) -> str:
    res = fleetlib.docker_client().containers.get(name).exec_run(argv)
    assert res.exit_code == 0, res.output.decode()[-2000:]
    return res.output.decode()


def stack_fingerprint(name: str) -> str:
    """What runs on a box: the release `current` points at, its files, and each container's image ID."""
    files = box_exec(name, ["sh", "-c", "readlink /opt/vilms/current; cat /opt/vilms/current/*.yaml"])
    ids = box_exec(name, ["sh", "-c", "docker inspect -f '{{.Name}} {{.Image}}' $(docker ps -q) | sort"])
    return hashlib.sha256((files + ids).encode()).hexdigest()


def rig_api_key() -> str:
    """The Jetson boxes' gateway key: molecule's jetson scenario vaults it (test-only vault password).

    Decrypted in a child Python: importing ansible here patches `sys.intern` for the whole pytest process, and torch
    (imported later by the serve tests) then fails in `substitute_in_graph`.
    """
    vaulted = yaml.safe_load((fleetlib.ROOT / "molecule" / "jetson" / "group_vars" / "all" / "vault.yml").read_text()
                             .replace("!vault |", "|"))["vilms_rig_api_key"]
    code = ("import sys; from ansible.constants import DEFAULT_VAULT_ID_MATCH as M; "
            "from ansible.parsing.vault import VaultLib, VaultSecret; "
            "s = VaultSecret(open(sys.argv[1], 'rb').read().strip()); "
            "sys.stdout.write(VaultLib([(M, s)]).decrypt(sys.stdin.read()).decode())")
    return subprocess.run([sys.executable, "-c", code, str(fleetlib.VAULT_PASSWORD)], input=vaulted, text=True,
                          capture_output=True, check=True).stdout


def models_listed(name: str) -> set[str]:
    """/v1/models on the box itself; Jetson boxes need the rig's API key (their gateways refuse anonymous calls)."""
    headers = {"Authorization": f"Bearer {rig_api_key()}"} if "-jetson-" in name else {}
    out = box_exec(name, ["python3", "-c", "import json,sys,urllib.request;"
                          "r=urllib.request.Request('http://127.0.0.1:8989/v1/models', headers=json.loads(sys.argv[1]));"
                          "print(json.dumps([m['id'] for m in json.load(urllib.request.urlopen(r, timeout=10))['data']]))",
                          json.dumps(headers)])
    return set(json.loads(out))


def group_vars(f: fleetlib.Fleet, group: str) -> dict[str, Any]:
    return yaml.safe_load((f.inventory / "group_vars" / group / "main.yml").read_text())


def set_group_vars(f: fleetlib.Fleet, group: str, data: dict[str, Any]) -> None:
    (f.inventory / "group_vars" / group / "main.yml").write_text(yaml.safe_dump(data, sort_keys=False))


def set_max_tokens(f: fleetlib.Fleet, value: int) -> None:
    """A config-only update for every box: each model's max-tokens default."""
    for group in ("dgpu", "jetsons"):
        gv = group_vars(f, group)
        for model in gv["vilms_config"]["serving"]["models"]:
            model.setdefault("params", {})["max-tokens"] = value
        set_group_vars(f, group, gv)


def clear_host_vars(f: fleetlib.Fleet, host: str) -> None:
    (f.inventory / "host_vars" / f"{host}.yml").write_text("---\n{}\n")


def test_inventory_is_a_normal_directory(fleet):
    inv = fleet.inventory
    assert (inv / "hosts.yml").is_file() and (inv / "group_vars" / "all.yml").is_file()
    names = boxes(fleet)
    assert len(names) == N and {n.split("-")[-2] for n in names} == {"dgpu", "jetson"}
    assert {p.stem for p in (inv / "host_vars").glob("*.yml")} == set(names)


def test_canary_failure_rolls_back_and_halts(fleet):
    names = boxes(fleet)
    canary, later = names[0], names[1:]
    set_max_tokens(fleet, 12)  # a new release for every box
    broken = fleetlib.inject_gate_failure(fleet, canary)
    before = {n: stack_fingerprint(n) for n in names}
    try:
        run = rollout(fleet, "canary")
    finally:
        clear_host_vars(fleet, canary)
    assert run.rc != 0
    rollout_info = run.report["rollout"]
    assert rollout_info["halted"] and rollout_info["halted_in_batch"] == 1, rollout_info
    assert rollout_info["batch_spec"] == [1, "25%", "100%"]
    assert [b["hosts"] for b in rollout_info["batches"]] == [[canary]]
    c = run.host(canary)
    assert c["batch"] == 1 and c["outcome"] == "rolled_back" and c["rolled_back"], c
    assert any(not g["ok"] and g["model"] == broken for g in c["gate"]), c["gate"]
    assert all(g["ok"] for g in c["rollback_gate"]) and c["rollback_gate"], c["rollback_gate"]
    assert c["release_before"] and c["release_after"] == c["release_before"] != c["release_attempted"], c
    assert "rolled back to release " + c["release_before"] + ", healthy" in c["error"], c["error"]
    for name in later:
        h = run.host(name)
        assert h["outcome"] == "untouched" and h["batch"] is None, (name, h)
    # The canary runs what it ran before, and serves; later boxes were not touched at all.
    after = {n: stack_fingerprint(n) for n in names}
    assert after == before
    assert {"LLM", "LLM_SMALL"} <= models_listed(canary) and "GHOST" not in models_listed(canary)
    summary = run.report["summary"]
    assert summary["counts"] == {"rolled_back": 1, "untouched": N - 1}
    html = (fleet.reports / "latest.html").read_text()
    assert "HALTED in batch 1" in html and canary in html


@pytest.fixture(scope="module")
def budget_run(fleet, tmp_path_factory) -> Iterator[FleetRun]:
    """One update rollout for three claims: a config change plus a new gateway image (the old one and one small
    layer) through the site registry, in batches [dgpu-01], [dgpu-02, jetson-01, jetson-02]; jetson-02 fails its
    gate and the budget (50 %) allows it; jetson-01 is switched off.

    (The failing box is a Jetson: its rollback recreates the Ollama container, which must still list its models,
    and its gate requests carry an API key, so the report's gate rows come from the role's no_log-safe fact.)"""
    names = boxes(fleet)
    failing, offline = names[3], names[2]
    client = fleetlib.docker_client()
    ctx = tmp_path_factory.mktemp("image")
    (ctx / "Dockerfile").write_text(f"FROM vilms/gateway:{PREFIX}\nCOPY release-note.txt /etc/vilms-release-note\n")
    (ctx / "release-note.txt").write_bytes(os.urandom(256 * 1024))  # incompressible: 256 KiB on the wire
    tag = f"{PREFIX}-update"
    client.images.build(path=str(ctx), tag=f"vilms/gateway:{tag}", rm=True)
    fleetlib.push(fleet, f"vilms/gateway:{tag}")
    for group in ("dgpu", "jetsons"):
        gv = group_vars(fleet, group)
        gv["vilms_config"]["docker"]["tag"]["gateway"] = tag
        set_group_vars(fleet, group, gv)
    set_max_tokens(fleet, 10)
    fleetlib.inject_gate_failure(fleet, failing)
    online = [n for n in names if n != offline]
    old_gateway = {n: gateway_image(n) for n in online}
    client.containers.get(offline).stop(timeout=1)
    rx_before = fleetlib.net_rx_bytes(online)
    try:
        run = rollout(fleet, "budget", batches=[1, "100%"], budget=50)
        rx_after = fleetlib.net_rx_bytes(online)
    finally:
        clear_host_vars(fleet, failing)
        client.containers.get(offline).start()
    run.rx = {n: rx_after[n] - rx_before[n] for n in online}
    run.new_gateway = client.images.get(f"vilms/gateway:{tag}").id
    run.old_gateway = old_gateway
    yield run


def gateway_image(name: str) -> str:
    return box_exec(name, ["sh", "-c", "docker inspect -f '{{.Image}}' $(docker ps -q --filter name=gateway)"]).strip()


def test_budget_lets_a_later_batch_failure_pass(fleet, budget_run):
    names = boxes(fleet)
    run = budget_run
    assert run.rc != 0  # a host failed, and the run says so
    assert not run.report["rollout"]["halted"], run.report["rollout"]
    failing, sibling = names[3], names[1]
    f = run.host(failing)
    assert f["outcome"] == "rolled_back" and f["batch"] == 2, f
    assert run.host(sibling)["outcome"] == "updated" and run.host(sibling)["batch"] == 2
    assert run.host(names[0])["outcome"] == "updated" and run.host(names[0])["batch"] == 1
    assert "GHOST" not in models_listed(failing) and "LLM" in models_listed(failing)
    # Keys on (Jetsons): the gate's requests are no_log, and the report still has a row per model.
    assert any(not g["ok"] and g["model"] == "ghost-model" for g in f["gate"]), f["gate"]
    assert f["rollback_gate"] and all(g["ok"] for g in f["rollback_gate"]), f["rollback_gate"]
    assert "qwen2.5:3b" in {g["model"] for g in f["rollback_gate"]}, f["rollback_gate"]


def test_unreachable_box_is_reported(fleet, budget_run):
    offline = boxes(fleet)[2]
    h = budget_run.host(offline)
    assert h["outcome"] == "unreachable" and h["error"], h
    assert budget_run.report["summary"]["counts"] == {"updated": 2, "rolled_back": 1, "unreachable": 1}


def test_registry_update_moves_only_changed_layers(fleet, budget_run):
    """Each updated box pulled the new layer (256 KiB) and manifests, not the ~300 MB gateway image."""
    names = boxes(fleet)
    full = fleetlib.docker_client().images.get(f"vilms/gateway:{PREFIX}").attrs["Size"]
    for name in (names[0], names[1]):
        assert budget_run.host(name)["outcome"] == "updated"
        assert gateway_image(name) == budget_run.new_gateway != budget_run.old_gateway[name], name
        assert 256 * 1024 < budget_run.rx[name] < 8 * 1024 * 1024, (name, budget_run.rx[name], full)
    # the box that failed its gate runs its previous release's image again
    assert gateway_image(names[3]) == budget_run.old_gateway[names[3]]
