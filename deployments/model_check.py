"""The app builder's check that the model can be had, before Serve starts converters that would each fail.

What `serve run serve_config.yaml` does with a builder that raises (Ray 2.60, tested in
tests/serve/test_serve_run_offline.py): it builds the app in a Ray task, logs the exception inside the controller's
traceback, marks the app DEPLOY_FAILED and then sleeps until killed, exit status and all. So a failed check prints its
advice as one paragraph and also ends the `serve run` that asked for this build, when that runs on this node, with
SIGTERM: a non-zero exit at once instead of a terminal that looks alive. On a cluster deployed otherwise (`serve
deploy`, or `serve run --address` from elsewhere) only the exception remains: `serve status` shows the advice.

Only the hub source is checked here. Every node fetches from the same hub, so a builder node that has neither the
files cached nor the hub tells that converters will not have them either. A bundle path is not checked: on a cluster
the bundle may exist only on the GPU nodes (cluster.yaml downloads it there), so a converter that cannot load it
fails with the same kind of advice, and Serve gives up after CONVERTER_START_RETRIES failed starts (deployments/app.py).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

import ray
from ray._private import state as ray_state

from app.model.sources import HUB, ModelLoadError, check_hub_files

SERVICE_ADVICE = (
    "For the service, point SEEDVC_MODEL (or converter.model in the config) at a model bundle directory; "
    "SEEDVC_MODEL=tests/fixtures/parity_a/model runs the tiny test bundle (noise, but the real pipeline)."
)
# Worker output reaches the `serve run` terminal through Ray's log monitor, a poll away: time for the advice to
# arrive before that process ends.
ADVICE_DELIVERY_S = 3.0


def check_model_source(model: str) -> None:
    """Raise ModelLoadError with the advice (and end a local `serve run`) when the hub model cannot be had here."""
    if model != HUB:
        return
    try:
        check_hub_files()
    except ModelLoadError as error:
        advice = f"seedvc cannot start: {error} {SERVICE_ADVICE}"
        print(advice, file=sys.stderr, flush=True)
        driver = local_serve_run_pid()
        if driver is not None:
            time.sleep(ADVICE_DELIVERY_S)
            os.kill(driver, signal.SIGTERM)
        raise ModelLoadError(advice) from None


def local_serve_run_pid() -> int | None:
    """The process id of the `serve run` whose deploy this task builds, when it runs on this node; else None."""
    job_id = ray.get_runtime_context().get_job_id()
    node_ip = ray.util.get_node_ip_address()
    # No public Ray API names a driver's process; the job table (ray._private.state) does.
    for job in ray_state.jobs():
        if (
            job["JobID"] == job_id
            and not job.get("IsDead", False)
            and job.get("DriverIPAddress") == node_ip
            and is_serve_run(job.get("Entrypoint", ""))
        ):
            return int(job["DriverPid"])
    return None


def is_serve_run(entrypoint: str) -> bool:
    """Whether a driver's command line is Serve's CLI `serve run ...` (e.g. `/venv/bin/python3 /venv/bin/serve run
    serve_config.yaml`)."""
    try:
        words = shlex.split(entrypoint)
    except ValueError:
        return False
    return any(Path(word).name == "serve" and words[i + 1 : i + 2] == ["run"] for i, word in enumerate(words))
