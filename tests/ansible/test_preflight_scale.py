"""The preflight at fleet scale, in seconds: `python -m bench.preflight --ansible`'s run on the example inventory
grown to 20 hosts (its SKU groups, its host exception, its vault file encrypted and opened with
--vault-password-file), through the real `site.yml --tags preflight`.

No host is contacted: the names resolve nowhere, so a task that connected would leave its host unreachable, and the
harness refuses such a run. And the preflight play costs each host three tasks (the argument check, the merge, the
checks), the rest running once for the fleet: every per-host task is one controller worker per host, ~25-60 ms of
CPU each on the 2-core dev VM, so each one more is ~15-30 s on 500 hosts (bench/results/preflight.md). The play
before issue #24 ran nine per host.
"""

from __future__ import annotations

import pytest

from bench.preflight import ansible_preflight

PREFLIGHT_PLAY = "Preflight | Validate every targeted host's model config before anything changes"


@pytest.mark.ansible
def test_the_preflight_costs_each_host_three_tasks_and_contacts_none(tmp_path):
    result = ansible_preflight(20, None, tmp_path)  # raises on a failed or unreachable host
    assert result["hosts"] == {"orin_nano_8gb": 11, "orin_nx_16gb": 6, "agx_orin_64gb": 2, "dgpu": 1}
    assert result["tasks_per_nano_host"][PREFLIGHT_PLAY] == 3, result["tasks_per_nano_host"]
    assert PREFLIGHT_PLAY in {p["play"] for p in result["plays"]}  # the per-play split read the run's own log
