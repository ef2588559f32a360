"""uvicorn factory: each worker process loads the config named by $VILMS_CONFIG and builds its app."""

from __future__ import annotations

import os
import sys
from typing import Any

from vilms.config.load import load_config
from vilms.serve import heap
from vilms.serve.observe import setup_logging
from vilms.serve.api.app import create_app
from vilms.serve.api.bodies import SWITCH_INTERVAL


def app() -> Any:
    config = load_config()
    sys.setswitchinterval(SWITCH_INTERVAL)
    setup_logging(os.environ.get("VILMS_LOG_FORMAT") or config.gateway["log-format"], config.gateway["log-level"])
    # the heap frozen once started (sessions open, models loaded), young collections rarer: vilms.serve.heap
    return create_app(config, after_start=heap.settle)
