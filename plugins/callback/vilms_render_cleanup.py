# vilms: remove this run's controller renders (they hold decrypted API keys) however the playbook ends.
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: vilms_render_cleanup
type: aggregate
short_description: Removes this run's vilms renders from the controller when the playbook ends
description:
  - vilms_preflight renders every host into ~/.cache/vilms/rendered/run-<ansible-playbook pid>/<host>/; a host's
    keys.yaml there holds its API keys in clear. vilms_stack removes a host's render at the end of its deploy, but a
    host that never gets there (a --tags preflight run, a halted batch, a failed preflight, an unreachable box) left
    it behind. This removes the whole run directory when the playbook ends, whatever ended it.
  - Enable it in ansible.cfg (callbacks_enabled), as this repository does; from the collection it is
    vilms.fleet.vilms_render_cleanup.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "vilms_render_cleanup"
    CALLBACK_NEEDS_ENABLED = True

    def _run_dir(self) -> Path:
        # The preflight names the run by the ansible-playbook process: this callback runs inside it.
        return Path(os.path.expanduser("~")) / ".cache" / "vilms" / "rendered" / f"run-{os.getpid()}"

    def v2_playbook_on_stats(self, stats: Any) -> None:
        shutil.rmtree(self._run_dir(), ignore_errors=True)
