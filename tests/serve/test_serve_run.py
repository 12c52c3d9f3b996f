"""The real command a user types: `serve run serve_config.yaml`, with the tiny bundle, then one stream through it.

It starts its own local Ray (as it does on a fresh machine) and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from bench.harness import ServeApp
from bench.parity import ParitySet
from client.api import get_token, upload_voice
from client.stream_client import stream_audio

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 240

pytestmark = pytest.mark.serve


def wait_until_ready(process: subprocess.Popen, base_url: str) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "serve run exited during start-up"
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the service was not ready within {STARTUP_TIMEOUT_S} s")


def test_serve_run_serves_a_stream(parity: ParitySet, tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    base_url = f"http://{config['http_options']['host']}:{config['http_options']['port']}"
    api_key = config["applications"][0]["args"]["ingress"]["api_keys"]["dev"]
    env = {**os.environ, "SEEDVC_MODEL": str(parity.model_dir), "SEEDVC_VOICE_STORE": str(tmp_path / "voices")}
    serve_bin = Path(sys.executable).parent / "serve"
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [str(serve_bin), "run", "serve_config.yaml"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        ready = wait_until_ready(process, base_url)
        assert ready["status"] == "ready" and ready["converter"]["real_time_factor"] > 0
        token = get_token(base_url, api_key)
        voice = upload_voice(base_url, token, parity.root / parity.bundle["files"]["reference_22k"])
        app = ServeApp(parity=parity, token=token, voice_id=voice["voice_id"])
        audio = app.source_48k(2.0)
        result = asyncio.run(stream_audio(base_url, token, voice["voice_id"], audio, realtime=False, seed=0))
        assert result.error is None and result.end is not None and result.ready is not None, result.error
        assert abs(len(result.output_48k) - len(audio)) <= 48 * result.ready["block_ms"] + 960
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
