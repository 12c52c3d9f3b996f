"""The CPU real-time profile (ConverterConfig.cpu_settings): who gets it and who does not.

A converter on a CPU serves the profile to clients that send no settings; settings a client sends are kept; a
converter on a GPU serves the README settings (the device decision is faked: there is no GPU here); once open, a
session keeps its settings wherever it moves. Real converter services on the tiny model, in this process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.auth.tokens import TokenSigner
from app.model.seedvc import SeedVC
from app.serving.config import CPU_REALTIME_PROFILE, ConverterConfig
from app.serving.converter import ConverterService
from app.serving.live import LiveSession
from app.serving.local import LocalConverterClient
from app.streaming.settings import StreamSettings
from app.transport.protocol import (
    ErrorCode,
    ProtocolError,
    ReadyEvent,
    SettingsOverrides,
    StartMessage,
    parse_client_message,
)
from app.transport.sessions import StreamServices

README = StreamSettings()
PROFILE = CPU_REALTIME_PROFILE.apply(README)


def converter(model: SeedVC, voice_root: str, tag: str = "cpu", **config: object) -> ConverterService:
    settings = ConverterConfig(voice_store=voice_root, silence_gate_dbfs=None, identity=True, replica_tag=tag, **config)
    return ConverterService(settings, model=model)


def services_of(client: LocalConverterClient) -> StreamServices:
    """The transports' side as the ingress builds it: no defaults of its own, the converter decides."""
    any_service = next(iter(client.services.values()))
    tokens = TokenSigner(b"a test secret of at least 32 bytes")
    return StreamServices(client=client, tokens=tokens, voices=any_service.store, defaults=None)


def start(voice_id: str, settings: dict[str, object] | None = None) -> StartMessage:
    text: dict[str, object] = {"type": "start", "version": 1, "token": "t", "voice_id": voice_id}
    if settings is not None:
        text["settings"] = settings
    message = parse_client_message(json.dumps(text))
    assert isinstance(message, StartMessage)
    return message


def ready_settings(services: StreamServices, message: StartMessage) -> StreamSettings:
    async def open_and_close() -> ReadyEvent:
        session, ready = await services.open_session(message, owner="k")
        await session.close()
        return ready

    return asyncio.run(open_and_close()).settings


# ---- the decision -------------------------------------------------------------------------------------------------


def test_the_profile_is_the_default_on_a_cpu_and_not_on_a_gpu() -> None:
    config = ConverterConfig()
    assert config.default_settings(torch.device("cpu")) == PROFILE != README
    assert config.default_settings(torch.device("cuda")) == README
    assert config.default_settings(torch.device("cuda", 1)) == README


def test_cpu_settings_null_serves_the_readme_settings_on_a_cpu_too() -> None:
    assert ConverterConfig(cpu_settings=None).default_settings(torch.device("cpu")) == README


def test_the_profile_is_real_time_shaped() -> None:
    """What makes it cheaper than the README settings; the figures behind it are in the README."""
    assert PROFILE.diffusion_steps < README.diffusion_steps and PROFILE.cfg_rate == 0
    assert PROFILE.ce_context < README.ce_context and PROFILE.max_prompt < README.max_prompt
    assert PROFILE.block_time >= README.block_time


def test_a_profile_that_contradicts_itself_fails_at_start_up() -> None:
    with pytest.raises(ValueError, match="cannot exceed the content-encoder context"):
        ConverterConfig(cpu_settings={"dit_context": 3.0})
    with pytest.raises(ValueError, match=r"cpu_settings\.diffusion_steps"):
        ConverterConfig(cpu_settings={"diffusion_steps": 100})  # outside the live ranges


# ---- through the converter service and the transports' shared code ------------------------------------------------


def test_a_stream_without_settings_gets_the_profile_on_a_cpu(
    model: SeedVC, voice_ids: tuple[str, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    root, [voice, _] = voice_ids
    with caplog.at_level(logging.WARNING, logger="app.serving.converter"):
        service = converter(model, root)
    assert "no GPU: serving the CPU real-time profile" in caplog.text
    assert "converter.cpu_settings: null" in caplog.text  # the way back to the README settings, in the same line
    assert service.speed.block_seconds == PROFILE.block_time  # the start-up speed check measures what it serves
    services = services_of(LocalConverterClient({"cpu": service}))

    assert ready_settings(services, start(voice)) == PROFILE
    assert ready_settings(services, start(voice, {})) == PROFILE  # an empty settings object asks for nothing


def test_settings_a_client_sends_are_kept(model: SeedVC, voice_ids: tuple[str, list[str]]) -> None:
    root, [voice, _] = voice_ids
    services = services_of(LocalConverterClient({"cpu": converter(model, root)}))

    assert ready_settings(services, start(voice, dataclasses.asdict(README))) == README
    # Part of them: what was sent is kept, the rest is the converter's defaults.
    partial = ready_settings(services, start(voice, {"diffusion_steps": 10, "block_time": 0.24}))
    assert partial == dataclasses.replace(PROFILE, diffusion_steps=10, block_time=0.24)


def test_settings_that_contradict_the_profile_are_bad_settings(model: SeedVC, voice_ids: tuple[str, list[str]]) -> None:
    root, [voice, _] = voice_ids
    service = converter(model, root)
    services = services_of(LocalConverterClient({"cpu": service}))
    with pytest.raises(ProtocolError) as refused:  # fine over the README's 2.5 s content context, not the profile's
        ready_settings(services, start(voice, {"dit_context": PROFILE.ce_context + 0.5}))
    assert refused.value.code == ErrorCode.bad_settings
    assert len(service.engine) == 0


def test_a_converter_without_the_profile_serves_the_readme_settings(
    model: SeedVC, voice_ids: tuple[str, list[str]]
) -> None:
    root, [voice, _] = voice_ids
    services = services_of(LocalConverterClient({"cpu": converter(model, root, cpu_settings=None)}))
    assert ready_settings(services, start(voice)) == README


def test_a_session_keeps_its_settings_on_a_converter_with_other_defaults(
    model: SeedVC, voice_ids: tuple[str, list[str]]
) -> None:
    """Opened with the profile, then re-homed onto a converter whose defaults are the README settings (as a GPU
    converter's are): the re-open carries the session's settings in full, so nothing changes mid-stream."""
    root, [voice, _] = voice_ids
    cpu, readme = converter(model, root, tag="cpu"), converter(model, root, tag="readme", cpu_settings=None)
    client = LocalConverterClient({"cpu": cpu, "readme": readme})

    async def run() -> LiveSession:
        session = LiveSession(client, "moving", voice, SettingsOverrides(), seed=0)
        opened = await session.open()
        assert opened.replica == "cpu" and session.settings == PROFILE
        client.lose("cpu")
        session.feed(
            np.zeros(int(2 * 48_000 * PROFILE.block_time), dtype=np.float32)
        )  # a block, and the resampler's lookahead
        output = await session.next_output()
        assert output is not None and output[1].rehomed
        return session

    session = asyncio.run(run())
    assert session.replica == "readme" and session.settings == PROFILE
    assert asyncio.run(readme.attach("moving")).settings == PROFILE


# ---- the engine thread computes with the threads it was given ----------------------------------------------------

# OpenMP's thread count of the engine thread and of a plain new thread, in a process started as Ray starts a replica
# with num_cpus 1 (OMP_NUM_THREADS=1): the profile is real time on 2 cores only with both.
THREADS_SCRIPT = """
import ctypes, glob, os, torch
from concurrent.futures import ThreadPoolExecutor
from app.serving.converter import engine_thread
[gomp] = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*"))
max_threads = ctypes.CDLL(gomp).omp_get_max_threads
print(engine_thread(2).submit(max_threads).result(), ThreadPoolExecutor(1).submit(max_threads).result())
"""


def test_the_engine_thread_uses_the_configured_torch_threads_under_rays_environment() -> None:
    if not list((Path(torch.__file__).parent / "lib").glob("libgomp*")):
        pytest.skip("this torch build does not use GNU OpenMP")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", THREADS_SCRIPT], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    engine, plain = result.stdout.split()
    assert plain == "1"  # what the engine thread had before: one core
    assert engine == "2"
