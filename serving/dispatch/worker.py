"""The entry of one `promptier dispatch` worker process: the app its supervisor
(`serving.dispatch.dispatch_supervisor`) loads by dotted path, built from the config the supervisor names
in the environment, with the metrics that workers share kept true.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from prometheus_client import multiprocess
from starlette.types import ASGIApp

from classifier.errors import PromptierError
from serving.common.logs import configure_json_logging
from serving.common.startup import freeze_startup_objects
from serving.dispatch.app import create_app
from serving.dispatch.dispatch_config import load_dispatcher_config
from serving.dispatch.dispatch_supervisor import CONFIG_ENV, METRICS_DIR_ENV

log = logging.getLogger("promptier.dispatcher")


def app_from_environment() -> ASGIApp:
    """The app of one worker process: the config named by PROMPTIER_DISPATCH_CONFIG.

    A worker that cannot build its app (a config or artifact that does not load) exits with uvicorn's
    start-up failure code: the supervisor then stops, at launch, instead of restarting the worker
    forever (what it does with any other exit code), and on SIGHUP keeps the running workers.
    """
    from uvicorn.config import STARTUP_FAILURE

    configure_json_logging()
    if METRICS_DIR_ENV in os.environ:
        _forget_dead_workers(Path(os.environ[METRICS_DIR_ENV]))
    try:
        app = create_app(load_dispatcher_config(Path(os.environ[CONFIG_ENV])))
    except PromptierError as error:
        log.error(json.dumps({"event": "worker_cannot_start", "error": str(error)}))
        sys.exit(STARTUP_FAILURE)
    except Exception:
        log.exception("worker_cannot_start")
        sys.exit(STARTUP_FAILURE)
    freeze_startup_objects()
    return app


def _forget_dead_workers(metrics_dir: Path) -> None:
    """Drop the live gauges of workers that are gone (a killed worker never removes its own), so that
    sums over live workers stay true; their counters stay, as counts must not go back."""
    import psutil

    for path in metrics_dir.glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            multiprocess.mark_process_dead(int(pid), str(metrics_dir))
