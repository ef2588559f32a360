"""The molecule scenarios on a real Docker engine: converge, idempotence (changed=0), verify over HTTP.

The rig (a Docker daemon, the debootstrap base image, image archives) is prepared by devkit/rig/rig.sh;
this module runs it first, and stops a daemon only if the rig started it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import minilm_path

pytestmark = [pytest.mark.molecule, pytest.mark.skipif(os.geteuid() != 0 or shutil.which("dockerd") is None,
                                                        reason="the rig needs root and dockerd (make system)")]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RIG = ROOT / "devkit" / "rig" / "rig.sh"


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "VILMS_RIG_MINILM": minilm_path(),
            "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "NO_COLOR": "1", "PY_COLORS": "0"}


@pytest.mark.timeout(3600)  # cold: the rig builds its images inside the first test's fixture; dgpu runs the rollout cases
@pytest.mark.parametrize("scenario", ["jetson", "dgpu"])
def test_molecule_scenario(rig, scenario):
    log = ROOT / ".cache" / f"molecule-{scenario}.log"
    with open(log, "w") as out:
        result = subprocess.run([str(BIN / "molecule"), "test", "-s", scenario], cwd=ROOT, env=env(), stdout=out,
                                stderr=subprocess.STDOUT, timeout=2700)
    text = log.read_text()
    assert result.returncode == 0, f"molecule test -s {scenario} failed; last lines of {log}:\n{text[-6000:]}"
    assert "idempotence: Executed: Successful" in text.replace("➜ ", "")
    assert "gateway verified" in text
    if scenario == "dgpu":  # the rollout cases ran (molecule/resources/verify_rollout.yml), not skipped
        for step in ("The second run failed at the lock", "Back on the previous release, on the previous image IDs",
                     "Reported as down, not as restored", "The engines run the new image"):
            assert f"TASK [Verify | {step}" in text, step
