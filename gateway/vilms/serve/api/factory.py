"""uvicorn factory: each worker process loads the config named by $VILMS_CONFIG and builds its app."""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from vilms.config.load import load_config
from vilms.serve.observe import setup_logging
from vilms.serve.api.app import create_app
from vilms.serve.api.bodies import SWITCH_INTERVAL


def app() -> Any:
    config = load_config()
    sys.setswitchinterval(SWITCH_INTERVAL)
    setup_logging(os.environ.get("VILMS_LOG_FORMAT") or config.gateway["log-format"], config.gateway["log-level"])
    app = create_app(config)
    gc.freeze()  # the ~100,000 objects of the imports and the app: no full collection walks them again (64 ms each)
    return app
