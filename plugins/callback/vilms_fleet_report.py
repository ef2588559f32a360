"""Ansible callback: a per-host fleet report (JSON + HTML) at the end of every site.yml run.

Collects, per host: the canary batch it ran in (with `serial`, the play-start event fires once per batch, which
gives the batch timeline), whether it changed, each gate request's model/result/time, whether a rollback ran and
what the role's final message said, and unreachable hosts. Hosts of batches the rollout never reached are
reported as untouched. The report's shape and the page live in `vilms.fleet_report`; this plugin only listens.

What the vilms_stack role says about a host is read from its facts: `vilms_stack_previous` (the release that ran
before) and `vilms_stack_result` ({result: deployed|rolled-back|down|failed, release, attempted, message}). Any other
role may publish fields with facts named `vilms_fleet_<field>`: each lands in the host's record as `<field>`.

The rollout policy comes from the fact `vilms_stack_rollout` (site.yml's first play). A batch whose first task, the
fleet-wide limit's check (`Rollout | Halt ...`), failed never started: the rollout halted after the batch before it,
and that batch's hosts are untouched. Gate rows of the soak's second gate (tasks after a `Soak |` task) carry
`phase: soak`.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: vilms_fleet_report
type: aggregate
short_description: Per-host fleet report (JSON + HTML) for vilms rollouts
description:
  - Writes <report_dir>/<timestamp>.json and .html (and latest.json / latest.html) when a playbook ends.
requirements:
  - enable it in ansible.cfg (callbacks_enabled) and have the vilms package importable by ansible-playbook
options:
  report_dir:
    description: Directory the reports are written to.
    default: ~/.cache/vilms/fleet-report
    env:
      - name: VILMS_FLEET_REPORT_DIR
    ini:
      - section: vilms_fleet_report
        key: report_dir
  mode:
    description: C(on) writes a report at the end of each run, C(off) writes nothing.
    default: "on"
    choices: ["on", "off"]
    env:
      - name: VILMS_FLEET_REPORT
    ini:
      - section: vilms_fleet_report
        key: mode
"""

# Tasks whose results are gate requests (one per model), by name prefix.
GATE_PREFIXES = ("Gate |", "Smoke |", "Deploy | Health gate")
ROLLBACK_PREFIX = "Rollback |"
HALT_PREFIX = "Rollout | Halt"  # roles/vilms_stack/tasks/rollout-batch.yml: the fleet-wide limit was exceeded
SOAK_PREFIX = "Soak |"  # roles/vilms_stack/tasks/rollout-soak.yml: the second gate, after the soak
POLICY_FACT = "vilms_stack_rollout"
FLEET_FACT_PREFIX = "vilms_fleet_"
DOWN_MARKERS = ("host down", "rollback failed")
# vilms_stack_result.result -> outcome
RESULTS = {"rolled-back": "rolled_back", "down": "down", "failed": "failed"}
GROUPS = ("dgpu", "jetsons")
FAILED = ("down", "failed", "rolled_back")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _first_line(text: Any, limit: int = 2000) -> str:
    text = str(text or "").strip()
    return text[:limit]


def _error_text(res: dict[str, Any]) -> str:
    for key in ("msg", "stderr", "reason", "exception"):
        if res.get(key):
            return _first_line(res[key])
    return ""


def _task_name(task: Any) -> str:
    """The task's own name, without the "role : " prefix get_name() adds."""
    return str(task.name or task.get_name())


def _model_of(item: Any) -> str:
    if isinstance(item, dict):
        for key in ("model", "id", "name", "alias"):
            if item.get(key):
                return str(item[key])
    return str(item) if item is not None else ""


class CallbackModule(CallbackBase):
    """Listens to a run; writes the fleet report on v2_playbook_on_stats."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "vilms_fleet_report"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._t0 = time.monotonic()
        self._started = _now_iso()
        self._playbook = ""
        self._hosts: dict[str, dict[str, Any]] = {}
        self._rollout: dict[str, Any] | None = None
        self._in_rollout = False
        self._expects_rollout = False
        self._task_started: dict[tuple[str, str], float] = {}
        self._policy: dict[str, Any] = {}
        self._halt: dict[str, Any] | None = None

    # ---- helpers -------------------------------------------------------------------------------------------
    def _t(self) -> float:
        return round(time.monotonic() - self._t0, 2)

    def _host(self, name: str) -> dict[str, Any]:
        rec = self._hosts.get(name)
        if rec is None:
            rec = self._hosts[name] = {
                "group": None, "batch": None, "outcome": None, "changed": 0, "rolled_back": False, "rollback_ran": False,
                "release_before": None, "release_after": None, "gate": [], "rollback_gate": [],
                "failed_task": None, "error": None, "last_task": None, "start_s": None, "end_s": None,
                "duration_s": None}
        return rec

    def _note_groups(self, hosts: list[Any]) -> None:
        for host in hosts:
            rec = self._host(host.get_name())
            if rec["group"] is None:
                names = [g.get_name() for g in host.get_groups()]
                rec["group"] = next((g for g in GROUPS if g in names), next((g for g in names if g != "all"), None))

    def _touch(self, name: str, task: Any) -> dict[str, Any]:
        rec = self._host(name)
        if self._in_rollout:
            now = self._t()
            rec["start_s"] = now if rec["start_s"] is None else rec["start_s"]
            rec["end_s"] = now
            rec["last_task"] = _task_name(task)
            if rec["last_task"].startswith(SOAK_PREFIX):
                rec["phase"] = "soak"
        return rec

    def _gate_rows(self, rec: dict[str, Any], rows: Any) -> None:
        """Gate rows go to the rollback's gate once a rollback ran; the soak's second gate tags its own."""
        rows = list(rows)
        if rec.get("phase") == "soak" and not rec["rollback_ran"]:
            rows = [dict(r, phase="soak") for r in rows]
        rec["rollback_gate" if rec["rollback_ran"] else "gate"].extend(rows)

    def _close_batch(self) -> None:
        if self._rollout and self._rollout["batches"] and self._rollout["batches"][-1]["end_s"] is None:
            self._rollout["batches"][-1]["end_s"] = self._t()

    # ---- playbook and play events ----------------------------------------------------------------------------
    def v2_playbook_on_start(self, playbook: Any) -> None:
        self._playbook = Path(getattr(playbook, "_file_name", "") or "").name
        # A play with `serial` is the rollout; if the run ends before it starts, its hosts were never touched.
        self._expects_rollout = any(getattr(p, "serial", None) for p in playbook.get_plays())

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self._close_batch()
        inventory = getattr(getattr(play, "_variable_manager", None), "_inventory", None)
        batch = inventory.get_hosts(play.hosts) if inventory else []
        every = inventory.get_hosts(play.hosts, ignore_restrictions=True) if inventory else []
        self._note_groups(list(every))
        serial = list(play.serial or [])
        self._in_rollout = bool(serial)
        if not serial:
            return
        if self._rollout is None or self._rollout["play"] != play.get_name():
            self._rollout = {"play": play.get_name(), "batch_spec": serial,
                             "max_fail_percentage": play.max_fail_percentage,
                             "max_failures": self._policy.get("max_failures"), "soak_s": self._policy.get("soak", 0),
                             "hosts": [h.get_name() for h in every], "batches": [], "halted": False}
        index = len(self._rollout["batches"]) + 1
        names = [h.get_name() for h in batch]
        self._rollout["batches"].append({"index": index, "hosts": names, "start_s": self._t(), "end_s": None})
        for name in names:
            self._host(name)["batch"] = index

    def v2_playbook_on_no_hosts_remaining(self) -> None:
        if self._in_rollout and self._rollout and self._rollout["batches"]:
            self._rollout["batches"][-1]["stopped"] = True

    # ---- task results -------------------------------------------------------------------------------------
    def v2_runner_on_start(self, host: Any, task: Any) -> None:
        self._task_started[(host.get_name(), task._uuid)] = time.monotonic()
        self._touch(host.get_name(), task)

    def _gate_entry(self, result: Any, failed: bool) -> None:
        task, res = result._task, result._result
        name = _task_name(task)
        if not name.startswith(GATE_PREFIXES):
            return
        host = result._host.get_name()
        key = (host, task._uuid)
        started = self._task_started.get(key)
        now = time.monotonic()
        self._task_started[key] = now  # the next loop item is timed from here
        if "status" not in res and not failed:
            return  # not a request (e.g. the gate's verdict), or skipped
        rec = self._host(host)
        seconds = round(now - started, 2) if started else None
        body = res.get("json")
        if isinstance(body, dict) and isinstance(body.get("models"), list):  # /health/ready: a state per model
            self._gate_rows(rec, ({"task": name, "model": str(m.get("model")), "ok": bool(m.get("ready")),
                                   "status": m.get("state"), "seconds": seconds}
                                  for m in body["models"] if isinstance(m, dict)))
            return
        item = res.get("item") if isinstance(res.get("item"), dict) else res.get("_ansible_item_label", res.get("item"))
        status = res.get("status")
        ok = not failed and isinstance(status, int) and 200 <= status < 300  # gate requests never fail by themselves
        what = _model_of(item) or urlsplit(str(res.get("url") or "")).path or name.split("|", 1)[-1].strip()
        entry = {"task": name, "model": what, "ok": ok,
                 "status": status, "seconds": seconds}
        if not ok and isinstance(res.get("json"), dict) and res["json"].get("error"):
            error = res["json"]["error"]
            entry["error"] = _first_line(error.get("message") if isinstance(error, dict) else error, 300)
        if failed:
            entry["error"] = _error_text(res)
        self._gate_rows(rec, [entry])

    def _record(self, result: Any, failed: bool = False) -> None:
        task, res = result._task, result._result
        rec = self._touch(result._host.get_name(), task)
        if res.get("changed") and self._in_rollout:
            rec["changed"] += 1
        if _task_name(task).startswith(ROLLBACK_PREFIX) and not res.get("skipped"):
            rec["rollback_ran"] = True
        for key, value in (res.get("ansible_facts") or {}).items():
            if key == "vilms_stack_previous":
                rec["release_before"] = value or None
            elif key == "vilms_stack_result" and isinstance(value, dict):
                rec["result"] = value
                rec["release_after"] = value.get("release")
                rec["release_attempted"] = value.get("attempted", value.get("release"))
            elif key == "vilms_stack_gate_rows" and isinstance(value, list):  # the gate's requests, no_log
                self._gate_rows(rec, (r for r in value if isinstance(r, dict)))
            elif key == POLICY_FACT and isinstance(value, dict):
                self._policy = value
            elif key.startswith(FLEET_FACT_PREFIX):
                rec[key[len(FLEET_FACT_PREFIX):]] = value
        if "results" not in res:  # loop results arrive item by item below
            self._gate_entry(result, failed)
        if failed:
            rec["failed_task"] = rec["failed_task"] or _task_name(task)
            rec["error"] = _error_text(res) or rec["error"]

    def v2_runner_on_ok(self, result: Any) -> None:
        self._record(result)

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        if _task_name(result._task).startswith(HALT_PREFIX) and self._in_rollout and self._rollout:
            # The batch stops before it changes anything: its hosts are untouched, not failed.
            self._halt = {"batch": len(self._rollout["batches"]), "reason": _error_text(result._result)}
            return
        if ignore_errors:
            self._record(result)
        else:
            self._record(result, failed=True)

    def v2_runner_on_unreachable(self, result: Any) -> None:
        rec = self._touch(result._host.get_name(), result._task)
        rec["unreachable"] = True
        rec["error"] = _error_text(result._result) or "unreachable"

    def v2_runner_item_on_ok(self, result: Any) -> None:
        self._gate_entry(result, failed=False)

    def v2_runner_item_on_failed(self, result: Any) -> None:
        self._gate_entry(result, failed=True)

    # ---- the end -------------------------------------------------------------------------------------------
    def _outcome(self, name: str, rec: dict[str, Any], stats: Any) -> str:
        """A host's outcome from what it reported itself; `halted` is decided afterwards, per batch."""
        if stats.dark.get(name) or rec.get("unreachable"):
            return "unreachable"
        if rec.get("not_started"):  # its batch was stopped by the fleet-wide limit before its first change
            return "untouched"
        result = (rec.get("result") or {}).get("result")
        if result in RESULTS:
            return RESULTS[result]
        if result == "deployed":
            return "unchanged" if rec["release_before"] == rec["release_after"] else "updated"
        if stats.failures.get(name):
            if any(m in (rec["error"] or "").lower() for m in DOWN_MARKERS):
                return "down"
            return "rolled_back" if rec["rollback_ran"] else "failed"
        if self._rollout and name in self._rollout["hosts"] and rec["batch"] is None:
            return "untouched"
        if self._rollout is None and (self._expects_rollout or not stats.processed.get(name)):
            return "untouched"
        return "updated" if rec["changed"] else "unchanged"

    def _undo_halted_batch(self) -> None:
        """The batch the fleet-wide limit stopped at its first task never started: drop it, unbatch its hosts."""
        rollout, halt = self._rollout, self._halt
        if not (rollout and halt and rollout["batches"] and rollout["batches"][-1]["index"] == halt["batch"]):
            return
        for name in rollout["batches"].pop()["hosts"]:
            rec = self._host(name)
            rec.update(batch=None, not_started=True, start_s=None, end_s=None, last_task=None)

    def _judge_rollout(self, rollout: dict[str, Any]) -> None:
        """Did the rollout halt, and in which batch? Ansible says "no hosts remaining" when a budget is spent
        mid-batch, but a batch whose every host failed ends quietly: hosts that never got a batch show it too."""
        untouched = [h for h in rollout["hosts"] if self._hosts[h]["batch"] is None]
        last = rollout["batches"][-1]
        failed = [h for h in last["hosts"] if self._hosts[h]["outcome"] in FAILED]
        if self._halt:  # checked before the next batch: the fleet-wide limit, or a batch that lost hosts unreachable
            by = "batch_budget" if self._halt["reason"].startswith("batch budget") else "fleet_limit"
            rollout.update(halted=True, halted_in_batch=last["index"], halted_by=by,
                           halt_reason=f"{self._halt['reason']}; {len(untouched)} host(s) untouched")
        elif untouched or (last.get("stopped") and failed):
            rollout["halted"] = True
            rollout["halted_in_batch"] = last["index"]
            rollout["halted_by"] = "batch_budget"
            rollout["halt_reason"] = (f"{', '.join(failed) or 'the batch'} failed; failure budget "
                                      f"{rollout['max_fail_percentage']:g}% per batch; {len(untouched)} host(s) untouched")
            for h in last["hosts"]:  # stopped where they were, with no result of their own
                rec = self._hosts[h]
                if rec["outcome"] in ("updated", "unchanged") and not rec.get("result"):
                    rec["outcome"] = "halted"
        for batch in rollout["batches"]:
            outcomes = {self._hosts[h]["outcome"] for h in batch["hosts"]}
            batch["outcome"] = next((o for o in ("down", "failed", "rolled_back", "halted", "unreachable")
                                     if o in outcomes), "updated")

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._close_batch()
        if str(self.get_option("mode")).lower() == "off" or not (self._rollout or self._expects_rollout):
            return  # a playbook that rolled nothing out (a lint run, a probe playbook) gets no report
        for name in list(stats.processed) + list(self._hosts):
            self._host(name)
        self._undo_halted_batch()
        for name, rec in self._hosts.items():
            rec["outcome"] = self._outcome(name, rec, stats)
            if rec["start_s"] is not None:
                rec["duration_s"] = round(rec["end_s"] - rec["start_s"], 2)
        rollout = self._rollout
        if rollout and rollout["batches"]:
            self._judge_rollout(rollout)
        for rec in self._hosts.values():
            rec["rolled_back"] = rec["outcome"] == "rolled_back"
        report = {"playbook": self._playbook, "started": self._started, "finished": _now_iso(),
                  "duration_s": self._t(), "rollout": rollout, "hosts": self._hosts}
        out_dir = Path(os.path.expanduser(str(self.get_option("report_dir"))))
        stem = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        try:
            from vilms.deploy import fleet_report
        except ImportError:  # the controller's Python lacks the vilms package: JSON only
            import json
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
            self._display.warning(f"vilms_fleet_report: vilms not importable by {sys.executable}; wrote JSON only")
            return
        json_path, html_path = fleet_report.write(report, out_dir, stem)
        retry = fleet_report.retry_hosts(report)
        again = (f"{len(retry)} host(s) to run again: --limit @{out_dir / (stem + '.retry')}" if retry
                 else "no host to run again")
        # stderr: stdout belongs to the stdout callback (a JSON callback's output must stay parseable)
        self._display.display(f"Fleet report: {html_path} ({json_path.name}); {again}", stderr=True)
