"""The fleet report callback on real ansible-playbook runs (local connection, no Docker): batches, halts, budget,
unreachable hosts, the role's result facts, and an HTML page that escapes what hosts say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.ansible

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def write_play(tmp: Path) -> Path:
    """A stand-in for the stack play: the same play keywords as playbooks/site.yml, and the facts vilms_stack sets.

    Each host's fate comes from its inventory variable `fate`: ok, rollback (the role's rescue rolled back and the
    previous release passed its gate), down (that rollback failed), or fail (failed with no rollback).
    """
    deploy = [
        {"name": "Deploy | Reach the host", "ansible.builtin.ping": {}},
        {"name": "Deploy | Find the running release (current)", "ansible.builtin.set_fact": {"vilms_stack_previous": "r-old"}},
        # as tasks/gate.yml with API keys on: the requests were no_log, the role hands the report its rows
        {"name": "Gate | Rows for the fleet report (requests were hidden by no_log)", "ansible.builtin.set_fact": {
            "vilms_stack_gate_rows": [{"task": "Gate | chat", "model": "LLM", "ok": "{{ fate == 'ok' }}",
                                       "status": "{{ 200 if fate == 'ok' else 500 }}", "seconds": 0.1}]}},
        {"name": "Deploy | Fail unless every model answered", "when": "fate != 'ok'", "ansible.builtin.fail": {
            "msg": "release r-new failed its gate: chat VLM: HTTP 500 <script>alert(1)</script>"}},
        {"name": "Result | Remember the outcome", "ansible.builtin.set_fact": {
            "vilms_stack_result": {"result": "deployed", "release": "r-new", "attempted": "r-new"}}},
    ]
    messages = ("{{ {'rollback': 'rolled back to release r-old, healthy', 'down': 'rollback failed, host down',"
                " 'fail': 'release r-new failed, left as it is'}[fate] }} ({{ ansible_failed_result.msg }})")
    rescue = [
        {"name": "Rollback | Record the outcome", "ansible.builtin.set_fact": {"vilms_stack_result": {
            "result": "{{ {'rollback': 'rolled-back', 'down': 'down', 'fail': 'failed'}[fate] }}",
            "release": "{{ 'r-old' if fate == 'rollback' else None }}", "attempted": "r-new", "message": messages}}},
    ]
    # As roles/vilms_stack/tasks/main.yml: deploy, rescue, always (the lock), then the failure, outside the rescue.
    stack = [{"name": "Stack | Deploy and gate", "block": deploy, "rescue": rescue,
              "always": [{"name": "Stack | Release the rollout lock", "ansible.builtin.debug": {"msg": "unlocked"}}]},
             {"name": "Stack | Fail the host with what happened (rolled back, down, or failed)",
              "ansible.builtin.fail": {"msg": "{{ inventory_hostname }}: {{ vilms_stack_result.message }}"},
              "when": "vilms_stack_result.result != 'deployed'"}]
    facts = {"name": "Preflight | facts (an unreachable box drops out here, as in site.yml)", "hosts": "boxes",
             "gather_facts": True, "gather_subset": ["min"], "tasks": []}
    play = [facts, {"name": "Stack | stand-in", "hosts": "boxes", "gather_facts": False,
                    "serial": "{{ vilms_rollout_batches | default([1, '25%', '100%']) }}",
                    "max_fail_percentage": "{{ vilms_rollout_max_fail_percentage | default(0) }}",
                    "tasks": stack}]
    path = tmp / "play.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    return path


def run(tmp: Path, fates: dict[str, str], extra: dict[str, Any] | None = None,
        limit: str | None = None) -> tuple[int, dict[str, Any], str]:
    hosts = {}
    for name, fate in fates.items():
        if fate == "unreachable":  # ssh to a closed loopback port: refused at once
            hosts[name] = {"fate": "ok", "ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": 9,
                           "ansible_ssh_common_args": "-o ConnectTimeout=3"}
        else:
            hosts[name] = {"fate": fate, "ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    (tmp / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"boxes": {"hosts": hosts}}}}))
    reports = tmp / "reports"
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "VILMS_FLEET_REPORT_DIR": str(reports),
           "ANSIBLE_NOCOLOR": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "gateway"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp / "hosts.yml"), str(write_play(tmp)),
                           "-e", json.dumps(extra or {}), *(["--limit", limit] if limit else [])], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    report = json.loads((reports / "latest.json").read_text())
    return proc.returncode, report, proc.stdout + proc.stderr


def outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {name: h["outcome"] for name, h in report["hosts"].items()}


def test_canary_failure_halts_and_later_batches_are_untouched(tmp_path):
    fates = {"b1": "rollback", "b2": "ok", "b3": "ok", "b4": "ok"}
    rc, report, log = run(tmp_path, fates)
    assert rc != 0
    assert outcomes(report) == {"b1": "rolled_back", "b2": "untouched", "b3": "untouched", "b4": "untouched"}, log
    b1 = report["hosts"]["b1"]
    assert (b1["batch"], b1["release_before"], b1["release_after"], b1["release_attempted"]) == (1, "r-old", "r-old", "r-new")
    assert b1["failed_task"] == "Deploy | Fail unless every model answered"
    assert [(g["model"], g["ok"], g["status"]) for g in b1["gate"]] == [("LLM", False, 500)], b1["gate"]
    assert "rolled back to release r-old, healthy" in b1["error"]
    assert report["rollout"]["halted"] and report["rollout"]["halted_in_batch"] == 1
    assert [b["hosts"] for b in report["rollout"]["batches"]] == [["b1"]]
    assert report["summary"]["verdict"].startswith("HALTED in batch 1")
    page = (tmp_path / "reports" / "latest.html").read_text()
    assert "HALTED in batch 1" in page and 'class="o-rolled_back"' in page and 'class="o-untouched"' in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    retry = tmp_path / "reports" / "latest.retry"  # the rolled-back host and the untouched ones, for --limit @file
    assert retry.read_text().split() == report["retry"] == ["b1", "b2", "b3", "b4"]
    assert f"4 host(s) to run again: --limit @{tmp_path / 'reports'}" in log


def test_budget_lets_a_failure_in_a_later_batch_pass(tmp_path):
    # batches [1, 25%, 100%] of 4 = [b1], [b2], [b3, b4]; b3 fails: 50 % of its batch, budget 50 % -> not exceeded
    fates = {"b1": "ok", "b2": "ok", "b3": "rollback", "b4": "ok"}
    rc, report, log = run(tmp_path, fates, {"vilms_rollout_max_fail_percentage": 50})
    assert rc != 0
    assert outcomes(report) == {"b1": "updated", "b2": "updated", "b3": "rolled_back", "b4": "updated"}, log
    assert not report["rollout"]["halted"]
    assert [b["hosts"] for b in report["rollout"]["batches"]] == [["b1"], ["b2"], ["b3", "b4"]]
    assert report["summary"]["verdict"] == "COMPLETED with failures"


def test_default_budget_stops_after_the_failed_batch_and_reports_down(tmp_path):
    # batches [b1], [b2], [b3, b4], [b5, b6]: b3's rollback fails too; its batch-mate finishes, batch 4 never starts
    fates = {"b1": "ok", "b2": "ok", "b3": "down", "b4": "ok", "b5": "ok", "b6": "ok"}
    rc, report, _ = run(tmp_path, fates, {"vilms_rollout_batches": [1, 1, 2]})
    got = outcomes(report)
    assert rc != 0 and got["b3"] == "down"
    assert got["b4"] in ("updated", "halted")  # finished its deploy, or was stopped before its result
    assert (got["b1"], got["b2"], got["b5"], got["b6"]) == ("updated", "updated", "untouched", "untouched")
    assert report["rollout"]["halted_in_batch"] == 3
    assert "b3 failed" in report["rollout"]["halt_reason"]


def test_unreachable_host_is_reported_and_does_not_halt(tmp_path):
    # batch 2 is only b2, which dropped out before the stack play: the rollout goes on to batch 3
    fates = {"b1": "ok", "b2": "unreachable", "b3": "ok", "b4": "ok"}
    rc, report, log = run(tmp_path, fates)
    assert outcomes(report) == {"b1": "updated", "b2": "unreachable", "b3": "updated", "b4": "updated"}, log
    assert report["hosts"]["b2"]["error"] and report["hosts"]["b2"]["batch"] == 2
    assert not report["rollout"]["halted"], report["rollout"]
    assert report["summary"]["counts"] == {"unreachable": 1, "updated": 3}
    assert (tmp_path / "reports" / "latest.retry").read_text() == "b2\n"


def test_retry_list_reruns_exactly_the_hosts_left_and_is_empty_when_all_are_done(tmp_path):
    rc, report, log = run(tmp_path, {"b1": "ok", "b2": "unreachable", "b3": "ok", "b4": "ok"})
    retry = (tmp_path / "reports" / "latest.retry").resolve()
    saved = tmp_path / "again.retry"
    saved.write_text(retry.read_text())
    rc, report, log = run(tmp_path, {"b1": "ok", "b2": "ok", "b3": "ok", "b4": "ok"}, limit=f"@{saved}")
    assert rc == 0 and sorted(report["hosts"]) == ["b2"], log  # only the host the first run left
    assert report["retry"] == [] and (tmp_path / "reports" / "latest.retry").read_text() == ""
    assert "no host to run again" in log
