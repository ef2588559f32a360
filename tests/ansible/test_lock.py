"""The rollout lock (roles/vilms_stack/tasks/lock.yml) on a real ansible-playbook run, local connection: a lock left
by a run that the host's reboot ended is recognised as stale by the boot id it names and taken over; a lock from
this boot still stops the run, naming its holder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ansible

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
OTHER_BOOT = "00000000-0000-4000-8000-000000000000"


def take_lock(tmp: Path, stack_dir: Path, then: list | None = None) -> subprocess.CompletedProcess:
    play = [{"hosts": "localhost", "gather_facts": False, "connection": "local",
             "vars": {"ansible_python_interpreter": sys.executable, "vilms_stack_dir": str(stack_dir),
                      "vilms_stack_lock_break": False,
                      "vilms_preflight_run_owner": "ops@controller pid 42 started 2026-12-04T00:00:00Z"},
             "tasks": [{"name": "Take the lock as the stack role does",
                        "ansible.builtin.include_role": {"name": "vilms_stack", "tasks_from": "lock"}}, *(then or [])]}]
    (tmp / "lock.yml").write_text(yaml.safe_dump(play))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0"}
    return subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", str(tmp / "lock.yml")],
                          capture_output=True, text=True, env=env, timeout=120)


def test_a_lock_from_before_the_last_boot_is_stale_and_taken_over(tmp_path):
    """Before: a host rebooted mid-deploy kept its lock; every later run failed on it until an operator passed
    -e vilms_stack_lock_break=true."""
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "rollout.lock").symlink_to(f"ops@controller pid 7 started 2026-12-03T00:00:00Z boot {OTHER_BOOT}")
    run = take_lock(tmp_path, stack)
    assert run.returncode == 0, run.stdout[-3000:]
    assert os.readlink(stack / "rollout.lock").endswith(f"pid 42 started 2026-12-04T00:00:00Z boot {BOOT_ID}")


def test_a_lock_from_this_boot_still_stops_the_run_naming_its_holder(tmp_path):
    stack = tmp_path / "stack"
    stack.mkdir()
    holder = f"ops@other pid 7 started 2026-12-04T00:00:00Z boot {BOOT_ID}"
    (stack / "rollout.lock").symlink_to(holder)
    run = take_lock(tmp_path, stack)
    assert run.returncode != 0
    assert "another rollout holds the lock" in run.stdout and holder in run.stdout, run.stdout[-3000:]
    assert os.readlink(stack / "rollout.lock") == holder


def test_a_lock_naming_no_boot_is_never_guessed_stale(tmp_path):
    """Locks written before boot ids were recorded: only the operator can say their run is gone."""
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "rollout.lock").symlink_to("ops@old pid 7 started 2026-12-01T00:00:00Z")
    assert take_lock(tmp_path, stack).returncode != 0
    assert os.readlink(stack / "rollout.lock") == "ops@old pid 7 started 2026-12-01T00:00:00Z"


def test_unlock_removes_only_this_runs_own_lock(tmp_path):
    """A run that outlived a reboot (its lock taken over as stale by the next run) must not remove the new holder's
    lock when it finishes: before, unlock removed whatever lock was there."""
    stack = tmp_path / "stack"
    stack.mkdir()
    newer = f"ops@other pid 9 started 2026-12-04T01:00:00Z boot {BOOT_ID}"
    steps = [{"name": "Another run takes the lock over meanwhile", "ansible.builtin.command": {
                 "argv": ["ln", "-sfn", newer, str(stack / "rollout.lock")]}, "changed_when": False},
             {"name": "Release as the stack role does",
              "ansible.builtin.include_role": {"name": "vilms_stack", "tasks_from": "unlock"}}]
    run = take_lock(tmp_path, stack, steps)
    assert run.returncode == 0, run.stdout[-3000:]
    assert os.readlink(stack / "rollout.lock") == newer
    own = take_lock(tmp_path, tmp_path / "own", [{"name": "Release", "ansible.builtin.include_role": {
        "name": "vilms_stack", "tasks_from": "unlock"}}])
    assert own.returncode == 0 and not (tmp_path / "own" / "rollout.lock").is_symlink(), own.stdout[-3000:]
