"""The rollout policy on real runs of playbooks/site.yml (local connection, no Docker): the fleet-wide failure limit,
the soak's second gate, and the policy read from the inventory with extra vars winning.

What is real: site.yml's plays and their keywords, and the vilms_stack role's rollout-policy, rollout-batch and
rollout-soak entry points with what they include (lock, gate, rollback, verdict), run against a stand-in gateway
(an HTTP server in this process) on each host's own stack directory. What stands in: the roles before the stack
play (no-ops), the role's deploy (tasks/main.yml: no images, no compose; it still gates through the real
tasks/gate.yml and rolls back through the real tasks/rollback.yml), and community.docker's docker_compose_v2 (it
writes what it was asked to a log). A host's health is a file flag the stand-in gateway reads:
`<flags>/<host>-<release>` makes that release of that host answer 503.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

pytestmark = pytest.mark.ansible

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# roles/vilms_stack/tasks/main.yml without Docker: the previous release r-old runs, r-new is deployed. With
# `real_gate` the deploy gates through the real tasks/gate.yml and a failure takes the real tasks/rollback.yml;
# without it the host's fate decides (ok, rollback, down), as in test_fleet_report.py. Fate `breaks`: the host passes
# its first gate, then its release stops answering (what the soak's second gate can catch). Fate `locked`: another
# run takes the host's rollout lock after its first gate. Fate `vanishes`: the box drops off the network mid-deploy
# (its connection now points at a closed port: unreachable, as a box that lost its link or rebooted).
STACK_MAIN = """\
---
- name: Stack | Deploy and gate (stand-in for tasks/deploy.yml)
  block:
    - name: Deploy | Find the running release (current)
      ansible.builtin.set_fact:
        vilms_stack_previous: r-old
        vilms_stack_release: r-new
        vilms_stack_release_dir: "{{ vilms_stack_dir }}/releases/r-new"
        vilms_stack_plan: "{{ lookup('ansible.builtin.file', vilms_stack_dir ~ '/releases/r-new/plan.json') | from_json }}"
    - name: Deploy | (stand-in) The box goes offline mid-deploy (its next task cannot reach it)
      ansible.builtin.set_fact:
        ansible_connection: ssh
        ansible_host: 127.0.0.1
        ansible_port: 9
      when: fate == 'vanishes'
    - name: Deploy | (stand-in) Reach the box
      ansible.builtin.ping:
      when: fate == 'vanishes'
    - name: Deploy | Gate the release
      ansible.builtin.include_tasks: gate.yml
      vars:
        vilms_stack_gate_plan: "{{ vilms_stack_plan }}"
      when: real_gate
    - name: Gate | Rows for the fleet report (the fate decides)
      ansible.builtin.set_fact:
        vilms_stack_gate_rows: [{task: "Gate | chat", model: LLM, ok: "{{ fate == 'ok' }}", status: 200, seconds: 0.1}]
        vilms_stack_gate_errors: "{{ '' if fate == 'ok' else 'chat LLM: HTTP 500' }}"
      when: not real_gate
    - name: Deploy | Fail unless every model answered
      ansible.builtin.fail:
        msg: "release {{ vilms_stack_release }} failed its gate: {{ vilms_stack_gate_errors }}"
      when: vilms_stack_gate_errors | length > 0
    - name: Deploy | Point current at the release
      ansible.builtin.file:
        src: releases/r-new
        dest: "{{ vilms_stack_dir }}/current"
        state: link
      when: real_gate
    - name: Result | Remember the outcome
      ansible.builtin.set_fact:
        vilms_stack_result: {result: deployed, release: r-new, attempted: r-new, host: "{{ inventory_hostname }}",
                             message: "release r-new deployed, every model answered"}
    - name: Deploy | (stand-in) The release stops answering after its first gate
      ansible.builtin.file:
        path: "{{ flags }}/{{ inventory_hostname }}-r-new"
        state: touch
        mode: "0644"
      delegate_to: localhost
      when: fate == 'breaks'
    - name: Deploy | (stand-in) Another run takes the host's rollout lock after the first gate
      ansible.builtin.file:
        src: another run
        dest: "{{ vilms_stack_dir }}/rollout.lock"
        state: link
        force: true
      when: fate == 'locked'
  rescue:
    - name: Stack | Roll back to the previous release and gate it
      ansible.builtin.include_tasks: rollback.yml
      when: real_gate
    - name: Rollback | Record the outcome (the fate decides)
      ansible.builtin.set_fact:
        vilms_stack_result:
          result: "{{ {'rollback': 'rolled-back', 'down': 'down'}[fate] }}"
          release: "{{ 'r-old' if fate == 'rollback' else None }}"
          attempted: r-new
          message: "{{ {'rollback': 'rolled back to release r-old, healthy', 'down': 'rollback failed, host down'}[fate] }}"
      when: not real_gate
  always:
    - name: Stack | Remove this run's render from the controller (it may hold keys.yaml)
      ansible.builtin.file:
        path: "{{ vilms_stack_render_dir }}"
        state: absent
      delegate_to: localhost
      when: real_gate
- name: Stack | Fail the host with what happened
  ansible.builtin.include_tasks: verdict.yml
"""

COMPOSE_STANDIN = '''\
#!/usr/bin/python
"""Stand-in for community.docker.docker_compose_v2: appends "<state> <project_src>" to $VILMS_TEST_COMPOSE_LOG."""
import os
from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(argument_spec=dict(
        project_src=dict(type="path"), files=dict(type="list", elements="str"), state=dict(default="present"),
        pull=dict(), remove_orphans=dict(type="bool"), recreate=dict(), wait=dict(type="bool"),
        wait_timeout=dict(type="int")), supports_check_mode=True)
    with open(os.environ["VILMS_TEST_COMPOSE_LOG"], "a") as log:
        log.write(f"{module.params['state']} {module.params['project_src']}\\n")
    module.exit_json(changed=True, msg="(stand-in) docker compose")


main()
'''


class Gateway(BaseHTTPRequestHandler):
    """/<host>/<release>/{health/ready, v1/models, v1/chat/completions}: one model, LLM, for the API key
    `key-<host>` only; a flag file breaks it."""

    flags: Path

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self) -> None:
        host, release, path = (self.path.strip("/").split("/", 2) + ["", ""])[:3]
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ok = not (self.flags / f"{host}-{release}").exists()
        if self.headers.get("Authorization") != f"Bearer key-{host}":
            self._send(401, {"error": {"message": "invalid API key"}})
        elif path == "health/ready":
            self._send(200 if ok else 503, {"models": [{"model": "LLM", "ready": ok, "state": "ready" if ok else "error"}]})
        elif path == "v1/models":
            self._send(200, {"data": [{"id": "LLM"}]})
        elif path == "v1/chat/completions":
            self._send(200, {"choices": [{"message": {"content": "pong"}}]}) if ok else \
                self._send(500, {"error": {"message": f"{release} on {host} is broken"}})
        else:
            self._send(404, {"error": {"message": self.path}})

    do_GET = do_POST = _answer


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    flags = tmp_path / "flags"
    flags.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("G", (Gateway,), {"flags": flags}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", flags
    server.shutdown()


# The real tasks/main.yml (plan, weights, lock, ship, deploy/rescue, prune, always: unlock and render removal,
# verdict) with its leaves standing in: fate `weights` fails while shipping weights, after the lock is taken.
REAL_MAIN_LEAVES = {
    "plan.yml": """\
- name: Plan | (stand-in) The plan names one model's weights
  ansible.builtin.set_fact:
    vilms_stack_plan: {weights: [{name: LLM, files: 1}], engine_tag: test}
""",
    "weights.yml": "[]\n",
    "weights-prune.yml": "[]\n",
    "weights-ship.yml": """\
- name: Weights | Verify the shipped files (size + sha256) before the release is switched
  ansible.builtin.fail:
    msg: "LLM/model.safetensors: sha256 of the shipped file does not match the controller's (link dropped?)"
  when: fate == 'weights'
""",
    "deploy.yml": """\
- name: Result | (stand-in deploy) Remember the outcome
  ansible.builtin.set_fact:
    vilms_stack_result: {result: deployed, release: r-new, attempted: r-new, host: "{{ inventory_hostname }}",
                         message: "release r-new deployed, every model answered"}
""",
}


def stand_ins(tmp: Path, real_main: bool = False) -> tuple[Path, Path]:
    """The roles path (the real vilms_stack with a stand-in deploy, no-op roles before it) and the collections path.
    `real_main`: the role's own tasks/main.yml, its leaves standing in (REAL_MAIN_LEAVES)."""
    roles = tmp / "roles"
    if roles.exists():
        return roles, tmp / "collections"
    for role in ("vilms_preflight", "docker_engine", "nvidia_container_toolkit", "jetson_runtime"):
        (roles / role / "tasks").mkdir(parents=True)
        (roles / role / "tasks" / "main.yml").write_text("---\n[]\n")
    (roles / "vilms_preflight" / "tasks" / "facts.yml").write_text("---\n[]\n")
    shutil.copytree(ROOT / "roles" / "vilms_stack", roles / "vilms_stack")
    for name, text in (REAL_MAIN_LEAVES.items() if real_main else [("main.yml", STACK_MAIN)]):
        (roles / "vilms_stack" / "tasks" / name).write_text("---\n" + text if real_main else text)
    modules = tmp / "collections" / "ansible_collections" / "community" / "docker" / "plugins" / "modules"
    modules.mkdir(parents=True)
    (modules / "docker_compose_v2.py").write_text(COMPOSE_STANDIN)
    return roles, tmp / "collections"


def run(tmp: Path, gateway: tuple[str, Path], fates: dict[str, str], all_vars: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None, real_gate: bool = False,
        real_main: bool = False) -> tuple[int, dict[str, Any], str]:
    """site.yml over `fates` (ok, rollback, down, breaks, locked), every host in dgpu; group_vars/all from all_vars."""
    url, flags = gateway
    hosts = {}
    for name, fate in fates.items():
        stack, render = tmp / "hosts" / name, tmp / "render" / name
        keys = yaml.safe_dump([{"name": "apps", "key": f"key-{name}"}])
        render.mkdir(parents=True, exist_ok=True)
        (render / "keys.yaml").write_text(keys)  # the deploy's gate reads the render's keys (the role removes it)
        for release in ("r-old", "r-new"):
            (stack / "releases" / release).mkdir(parents=True, exist_ok=True)
            plan = {"project": "vilms", "gateway": {"url": f"{url}/{name}/{release}"},
                    "gate": {"models": ["LLM"], "chat": ["LLM"], "embedding": [], "key": "apps"}}
            (stack / "releases" / release / "plan.json").write_text(json.dumps(plan))
            (stack / "releases" / release / "keys.yaml").write_text(keys)  # the soak's gate reads the release's
        if not (stack / "current").is_symlink():
            (stack / "current").symlink_to("releases/r-old")
        for release in {"rollback": ["r-new"], "down": ["r-new", "r-old"]}.get(fate, []):
            (flags / f"{name}-{release}").touch()
        hosts[name] = {"fate": fate, "real_gate": real_gate, "vilms_stack_dir": str(stack), "ansible_connection": "local",
                       "ansible_python_interpreter": sys.executable, "ansible_become": False,
                       "vilms_preflight_plan": {"gpu_mode": "none"}, "vilms_preflight_run_owner": f"test {tmp.name}",
                       "vilms_preflight_out": str(render)}
    inventory = tmp / "inventory"
    (inventory / "group_vars").mkdir(parents=True, exist_ok=True)
    (inventory / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"dgpu": {"hosts": hosts}}}}))
    # fast gates: /health/ready is polled once more after a 1 s delay
    (inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(
        {"flags": str(flags), "vilms_stack_gate_timeout": 1, "vilms_stack_gate_delay": 1, **(all_vars or {})}))
    roles, collections = stand_ins(tmp, real_main)
    reports = tmp / "reports"
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(roles),
           "ANSIBLE_COLLECTIONS_PATH": str(collections), "VILMS_FLEET_REPORT_DIR": str(reports),
           "VILMS_TEST_COMPOSE_LOG": str(tmp / "compose.log"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FACTS_MODULES": "ansible.builtin.ping",  # the facts gate still reaches each host; no stand-in reads facts
           "PATH": f"{BIN}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "gateway"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory / "hosts.yml"),
                           str(ROOT / "playbooks" / "site.yml"), "-e", json.dumps(extra or {})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads((reports / "latest.json").read_text())
    return proc.returncode, report, proc.stdout + proc.stderr


def outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {name: h["outcome"] for name, h in report["hosts"].items()}


def batches(report: dict[str, Any]) -> list[list[str]]:
    return [b["hosts"] for b in report["rollout"]["batches"]]


def test_fleet_wide_limit_halts_a_rollout_whose_every_batch_stayed_within_its_budget(tmp_path, gateway):
    # Batches of 2, budget 50 % per batch: one failure per batch never spends a batch's budget. The fleet-wide limit
    # of 1 does: after batch 2, b1 and b3 have failed (2 > 1), so batch 3 never starts.
    fates = {"b1": "rollback", "b2": "ok", "b3": "rollback", "b4": "ok", "b5": "rollback", "b6": "ok"}
    rc, report, log = run(tmp_path, gateway, fates, extra={
        "vilms_rollout_batches": [2, 2, 2], "vilms_rollout_max_fail_percentage": 50, "vilms_rollout_max_failures": 1})
    assert rc != 0
    assert outcomes(report) == {"b1": "rolled_back", "b2": "updated", "b3": "rolled_back", "b4": "updated",
                                "b5": "untouched", "b6": "untouched"}, log[-4000:]
    rollout = report["rollout"]
    assert batches(report) == [["b1", "b2"], ["b3", "b4"]]
    assert (rollout["halted"], rollout["halted_in_batch"], rollout["halted_by"]) == (True, 2, "fleet_limit")
    assert rollout["halt_reason"].startswith("fleet-wide failure limit exceeded: 2 of the 4 host(s) rolled so far "
                                             "failed (b1, b3), over vilms_rollout_max_failures=1"), rollout
    assert rollout["halt_reason"].endswith("2 host(s) untouched")
    assert report["summary"]["verdict"].startswith("HALTED in batch 2: fleet-wide failure limit exceeded")
    assert report["retry"] == ["b1", "b3", "b5", "b6"]
    assert (tmp_path / "reports" / "latest.retry").read_text().split() == ["b1", "b3", "b5", "b6"]
    for name in ("b5", "b6"):  # nothing ran on the hosts of the batch that never started
        assert report["hosts"][name]["batch"] is None and report["hosts"][name]["gate"] == []
        assert report["hosts"][name]["failed_task"] is None and report["hosts"][name]["error"] is None
    assert "rolled back to release r-old, healthy" in report["hosts"]["b1"]["error"]


def test_a_box_that_goes_offline_mid_deploy_spends_the_batch_budget(tmp_path, gateway):
    """Before: Ansible's max_fail_percentage counts failed hosts, not unreachable ones, so with the default budget
    of 0 a batch that lost a box mid-deploy went on to the next batch as if nothing had happened."""
    fates = {"b1": "ok", "b2": "vanishes", "b3": "ok", "b4": "ok"}
    rc, report, log = run(tmp_path, gateway, fates, extra={"vilms_rollout_batches": [2, 2]})
    assert rc != 0
    assert outcomes(report) == {"b1": "updated", "b2": "unreachable", "b3": "untouched", "b4": "untouched"}, log[-4000:]
    rollout = report["rollout"]
    assert batches(report) == [["b1", "b2"]]
    assert (rollout["halted"], rollout["halted_in_batch"], rollout["halted_by"]) == (True, 1, "batch_budget")
    assert rollout["halt_reason"].startswith("batch budget exceeded: 1 of the 2 host(s) of the previous batch failed "
                                             "or became unreachable mid-play (b2)"), rollout
    assert report["retry"] == ["b2", "b3", "b4"]


def test_a_failure_while_shipping_weights_spends_the_budget_and_releases_the_lock(tmp_path, gateway):
    """The role's own control flow (tasks/main.yml): weights ship inside the block whose always releases the lock,
    outside the deploy's rescue, so a failed transfer fails the host where Ansible's budget counts it."""
    fates = {"w1": "ok", "w2": "weights", "w3": "ok", "w4": "ok"}
    rc, report, log = run(tmp_path, gateway, fates, extra={"vilms_rollout_batches": [2, 2]}, real_main=True)
    assert rc != 0
    assert outcomes(report) == {"w1": "updated", "w2": "failed", "w3": "untouched", "w4": "untouched"}, log[-4000:]
    w2 = report["hosts"]["w2"]
    assert w2["failed_task"] == "Weights | Verify the shipped files (size + sha256) before the release is switched"
    assert "sha256 of the shipped file does not match" in w2["error"]
    assert (report["rollout"]["halted"], report["rollout"]["halted_by"]) == (True, "batch_budget")
    assert report["retry"] == ["w2", "w3", "w4"]
    assert not (tmp_path / "hosts" / "w2" / "rollout.lock").is_symlink()  # the always released it
    assert not (tmp_path / "render" / "w2").exists()  # and removed the render (keys) from the controller


def test_soak_second_gate_catches_a_host_that_breaks_after_its_first_gate(tmp_path, gateway):
    # Batch 1 is b1, b2 and b3; all pass their gate, then b2's release stops answering and another run takes b3's
    # lock. After the soak the second gate fails on b2: rolled back, current points at r-old again. b3 is not gated
    # again (the lock is not this run's): failed, left running. The budget (0 %) halts before b4's batch.
    fates = {"b1": "ok", "b2": "breaks", "b3": "locked", "b4": "ok"}
    rc, report, log = run(tmp_path, gateway, fates, extra={"vilms_rollout_batches": [3, 1], "vilms_rollout_soak": 1},
                          real_gate=True)
    assert rc != 0
    assert outcomes(report) == {"b1": "updated", "b2": "rolled_back", "b3": "failed", "b4": "untouched"}, log[-4000:]
    assert report["rollout"]["soak_s"] == 1 and report["rollout"]["halted_by"] == "batch_budget"
    b1, b2, b3 = (report["hosts"][name] for name in ("b1", "b2", "b3"))
    phases = [(g.get("phase", "deploy"), g["model"], g["ok"]) for g in b2["gate"] if g["model"] == "LLM"]
    assert phases == [("deploy", "LLM", True), ("deploy", "LLM", True), ("soak", "LLM", False)], b2["gate"]
    assert [(g.get("phase", "deploy"), g["ok"]) for g in b1["gate"] if g["model"] == "LLM"] == \
        [("deploy", True), ("deploy", True), ("soak", True), ("soak", True)]
    assert b2["failed_task"] == "Soak | Fail unless every model answered (second gate)"
    assert "rolled back to release r-old, healthy" in b2["error"] and "failed its second gate" in b2["error"]
    assert [g["ok"] for g in b2["rollback_gate"] if g["model"] == "LLM"] == [True, True]
    assert f"present {tmp_path}/hosts/b2/releases/r-old" in (tmp_path / "compose.log").read_text()
    assert os.readlink(tmp_path / "hosts" / "b2" / "current") == "releases/r-old"
    assert os.readlink(tmp_path / "hosts" / "b1" / "current") == "releases/r-new"
    assert not (tmp_path / "hosts" / "b2" / "rollout.lock").is_symlink()  # the soak took the lock and released it
    assert not (tmp_path / "render" / "b2").exists()  # the soak's gate had the key from the release on the host
    assert "key-b2" not in log  # the gate's requests were no_log
    result = json.loads((tmp_path / "hosts" / "b2" / "releases" / "last-result.json").read_text())
    assert (result["result"], result["release"], result["attempted"]) == ("rolled-back", "r-old", "r-new")
    assert "second gate did not run" in b3["error"] and "another rollout holds the lock" in b3["error"], b3
    assert [g.get("phase") for g in b3["gate"]] == [None] * len(b3["gate"])  # not gated again
    assert os.readlink(tmp_path / "hosts" / "b3" / "rollout.lock") == "another run"  # the other run's lock stays
    page = (tmp_path / "reports" / "latest.html").read_text()
    assert "[soak] LLM FAIL" in page and "soak 1 s, then a second gate" in page


def test_policy_from_group_vars_all_takes_effect_and_extra_vars_win(tmp_path, gateway):
    fates = {"b1": "ok", "b2": "ok", "b3": "ok"}
    # The default [1, "25%", "100%"] makes [b1], [b2], [b3] of three hosts; the inventory says [2, 1]. The example
    # inventory's old `vilms_serial: "100%"` line is not read from the inventory (only -e vilms_serial is, as
    # before): it would have rolled every host at once.
    policy = {"vilms_rollout_batches": [2, 1], "vilms_rollout_max_failures": "10%", "vilms_rollout_soak": 0,
              "vilms_serial": "100%"}
    rc, report, log = run(tmp_path, gateway, fates, all_vars=policy)
    assert rc == 0, log[-4000:]
    assert batches(report) == [["b1", "b2"], ["b3"]]
    assert (report["rollout"]["batch_spec"], report["rollout"]["max_failures"]) == ([2, 1], "10%")
    rc, report, log = run(tmp_path, gateway, fates, all_vars=policy,
                          extra={"vilms_rollout_batches": ["100%"], "vilms_rollout_max_failures": 0})
    assert rc == 0, log[-4000:]
    assert batches(report) == [["b1", "b2", "b3"]]
    assert (report["rollout"]["batch_spec"], report["rollout"]["max_failures"]) == (["100%"], 0)
