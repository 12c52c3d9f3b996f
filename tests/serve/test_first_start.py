"""A first start without the weights, with real Serve.

Locally: `serve run serve_config.yaml` on a fresh machine that cannot reach the hub (HF_HUB_OFFLINE=1, an empty hub
cache, the test's private network namespace) prints the advice at once and exits non-zero. The real command starts its
own local Ray; the app builder's check (deployments/model_check.py) must end it before any converter starts. Without
the check, `serve run` keeps running with the app DEPLOY_FAILED until killed.

On a cluster the builder cannot check a bundle path (it may exist only on GPU nodes): converters that cannot load
their model fail the deploy after a bounded number of starts, with the loader's message.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ray import serve
from ray.serve.schema import DeploymentStatus

from bench.harness import APP, NO_CPU, app_args, local_ray
from bench.parity import ParitySet
from deployments.app import CONVERTER_START_RETRIES, build_app

ROOT = Path(__file__).resolve().parents[2]
# Generous: a local Ray starts in 10-30 s on two busy cores; without the check the command never exits at all.
EXIT_BOUND_S = 240

pytestmark = pytest.mark.serve


def test_serve_run_without_the_weights_stops_with_the_advice(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-hf-home"),
        "SEEDVC_VOICE_STORE": str(tmp_path / "voices"),
    }
    env.pop("SEEDVC_MODEL", None)  # the config's model: hub
    serve_bin = Path(sys.executable).parent / "serve"
    process = subprocess.Popen(
        [str(serve_bin), "run", "serve_config.yaml"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a hung run can be ended with its local Ray
    )
    try:
        stdout, stderr = process.communicate(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"serve run was still running after {EXIT_BOUND_S} s:\n{stderr[-3000:]}")
    assert process.returncode != 0, stderr[-3000:]
    advice = next((line for line in stderr.splitlines() if "seedvc cannot start" in line), "")
    for needed in ("Plachta/Seed-VC", "HF_HUB_OFFLINE", "python -m app.bundle", "SEEDVC_MODEL"):
        assert needed in advice, f"{needed!r} missing from the advice line: {advice!r}\n{stderr[-3000:]}"
    assert "Adding 1 replica to Deployment(name='Converter'" not in stdout + stderr, "a converter was started"


def test_converters_without_their_model_fail_the_deploy_after_bounded_starts(parity: ParitySet, tmp_path: Path) -> None:
    replicas = 3  # Serve's own bound would be 3 failed starts per replica: 9
    missing = tmp_path / "bundle-on-other-nodes"
    app = build_app(
        app_args(parity, tmp_path / "voices", model=str(missing)),
        converter_options={"num_replicas": replicas, **NO_CPU},
        ingress_options=NO_CPU,
    )
    with local_ray():
        with pytest.raises(RuntimeError, match="failed"):
            serve.run(app, name=APP, route_prefix="/")
        converter = serve.status().applications[APP].deployments["Converter"]
    assert converter.status == DeploymentStatus.DEPLOY_FAILED
    starts = re.search(r"failed to start (\d+) times", converter.message)
    assert starts is not None, converter.message
    assert CONVERTER_START_RETRIES <= int(starts.group(1)) < 3 * replicas, converter.message
    assert f"no model bundle at {missing}" in converter.message
