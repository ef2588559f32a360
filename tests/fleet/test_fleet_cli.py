"""`python -m devkit.fleet rollout -- ARGS` (what `make fleet-rollout ARGS=...` runs) hands ARGS to ansible-playbook."""

from __future__ import annotations

from devkit.fleet import split_args


def test_arguments_after_the_separator_go_to_ansible_playbook():
    own, ansible = split_args(["rollout", "--prefix", "f", "--", "-e", '{"vilms_rollout_batches": ["100%"]}', "-v"])
    assert own == ["rollout", "--prefix", "f"]
    assert ansible == ["-e", '{"vilms_rollout_batches": ["100%"]}', "-v"]


def test_no_separator_means_no_ansible_arguments():
    assert split_args(["down", "--prefix", "f"]) == (["down", "--prefix", "f"], [])
