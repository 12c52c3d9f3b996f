"""Loading the model: from the hub (default), from a bundle, writing a bundle, and failing clearly.

The hub cannot be reached here, so a fake hub serves files under the OFFICIAL repo ids and file names: the fixture's
DiT and content encoder, and full-size random HiFT and CAMPPlus weights in the official layouts (CosyVoice's legacy
weight-norm keys, funasr's `xvector.dense` keys). The hub's vocoder and speaker encoder ship without configs, so
this exercises the named defaults in our code exactly as the real files would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from app.audio.files import read_audio
from app.bundle import write_bundle
from app.model import sources
from app.model.campplus import CAMPPlus, CAMPPlusConfig
from app.model.checkpoints import read_checkpoint
from app.model.hift import HiFTConfig, HiFTVocoder
from app.model.seedvc import SeedVC
from app.model.sources import ModelLoadError, bundle_files
from app.streaming.settings import StreamSettings
from app.streaming.stream import Stream, step_streams
from app.streaming.voice import prepare_voice
from bench.parity import ParitySet

HUB_ENCODER_ID = "facebook/wav2vec2-xls-r-300m"


def legacy_weight_norm_state(model: torch.nn.Module, weight_normed: set[str]) -> dict[str, torch.Tensor]:
    """Our folded weights re-expressed as CosyVoice stores them: weight_g (norm per output channel) + weight_v."""
    state = {}
    for key, value in model.state_dict().items():
        module = key.removesuffix(".weight")
        if module in weight_normed:
            norm = value.flatten(1).norm(dim=1).view(-1, *([1] * (value.dim() - 1)))
            state[f"{module}.weight_g"], state[f"{module}.weight_v"] = norm, value
        else:
            state[key] = value
    return state


@pytest.fixture(scope="module")
def fake_hub(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    hub = tmp_path_factory.mktemp("hub")
    seedvc = hub / sources.HUB_DIT_CONFIG.repo_id
    seedvc.mkdir(parents=True)
    config = yaml.safe_load((parity.model_dir / "config_dit.yml").read_text())
    config["model_params"]["speech_tokenizer"]["name"] = HUB_ENCODER_ID  # what the real config says
    (seedvc / sources.HUB_DIT_CONFIG.filename).write_text(yaml.safe_dump(config))
    (seedvc / sources.HUB_DIT_CHECKPOINT.filename).write_bytes((parity.model_dir / "dit.pth").read_bytes())
    encoder = hub / HUB_ENCODER_ID
    encoder.mkdir(parents=True)
    for file in (parity.model_dir / "content_encoder").iterdir():
        (encoder / file.name).write_bytes(file.read_bytes())
    torch.manual_seed(0)
    fixture_hift = torch.load(parity.model_dir / "hift.pt", weights_only=True)
    weight_normed = {key.removesuffix(".weight_g") for key in fixture_hift if key.endswith(".weight_g")}
    hift = hub / sources.HUB_VOCODER.repo_id
    hift.mkdir(parents=True)
    vocoder = HiFTVocoder(HiFTConfig())  # full size: the hub file has no config, our defaults must fit it
    torch.save(legacy_weight_norm_state(vocoder, weight_normed), hift / sources.HUB_VOCODER.filename)
    campplus = hub / sources.HUB_SPEAKER_ENCODER.repo_id
    campplus.mkdir(parents=True)
    speaker = CAMPPlus(CAMPPlusConfig()).state_dict()
    funasr_layout = {
        key.replace("dense.", "xvector.dense.", 1) if key.startswith("dense.") else key: value
        for key, value in speaker.items()
    }
    torch.save(funasr_layout, campplus / sources.HUB_SPEAKER_ENCODER.filename)
    return hub


@pytest.fixture
def hub_requests(fake_hub: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Route huggingface_hub's two download calls to the fake hub, recording what was asked for."""
    requests: list[tuple[str, str]] = []

    def download(repo_id: str, filename: str) -> str:
        requests.append((repo_id, filename))
        return str(fake_hub / repo_id / filename)

    def snapshot(repo_id: str, allow_patterns: list[str]) -> str:
        requests.append((repo_id, "*"))
        assert "config.json" in allow_patterns
        return str(fake_hub / repo_id)

    monkeypatch.setattr(sources, "hf_hub_download", download)
    monkeypatch.setattr(sources, "snapshot_download", snapshot)
    return requests


def test_hub_default_fetches_the_official_files_and_runs(parity: ParitySet, hub_requests: list) -> None:
    model = SeedVC.load()
    assert set(hub_requests) == {
        ("Plachta/Seed-VC", "config_dit_mel_seed_uvit_xlsr_tiny.yml"),
        ("Plachta/Seed-VC", "DiT_uvit_tat_xlsr_ema.pth"),
        ("facebook/wav2vec2-xls-r-300m", "*"),
        ("FunAudioLLM/CosyVoice-300M", "hift.pt"),
        ("funasr/campplus", "campplus_cn_common.bin"),
    }
    assert model.vocoder.config == HiFTConfig() and model.speaker_encoder.config == CAMPPlusConfig()
    voice = prepare_voice(model, read_audio(parity.root / parity.bundle["files"]["reference_22k"]), 3.0)
    stream = Stream(model, voice, StreamSettings(diffusion_steps=1), seed=0)
    audio = step_streams(model, [stream], [torch.zeros(stream.geometry.block_16k)]).audio
    assert audio.shape == (1, stream.geometry.block) and torch.isfinite(audio).all()


def test_bundle_from_hub_has_the_fixed_layout(hub_requests: list, fake_hub: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    write_bundle(sources.hub_files(), bundle)
    files = bundle_files(bundle)  # raises if any fixed name is missing
    assert sorted(p.name for p in bundle.iterdir()) == sorted(sources.BUNDLE_NAMES)
    config = yaml.safe_load(files.dit_config.read_text())
    assert config["model_params"]["speech_tokenizer"]["name"] == "content_encoder"
    hub_dit = fake_hub / sources.HUB_DIT_CHECKPOINT.repo_id / sources.HUB_DIT_CHECKPOINT.filename
    assert files.dit_checkpoint.read_bytes() == hub_dit.read_bytes()
    assert HiFTConfig.from_yaml_dict(yaml.safe_load(files.vocoder_config.read_text())) == HiFTConfig()
    assert json.loads(files.speaker_encoder_config.read_text()) == dataclasses.asdict(CAMPPlusConfig())
    SeedVC.from_files(files)  # and the bundle loads on its own
    with pytest.raises(ModelLoadError, match="not empty"):
        write_bundle(sources.hub_files(), bundle)


def test_offline_and_not_cached_fails_fast_with_advice(parity: ParitySet, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}
    files = parity.bundle["files"]
    result = subprocess.run(
        [sys.executable, "-m", "app.convert", files["source_16k"], files["reference_22k"], str(tmp_path / "o.wav")],
        cwd=parity.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Plachta/Seed-VC" in result.stderr and "python -m app.bundle" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr


class PicklesCode:
    """Any class instance in a checkpoint means unpickling would import and run code."""


def test_checkpoints_never_unpickle_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"net": {"cfm": {}, "length_regulator": {}}, "hook": PicklesCode()}, path)
    with pytest.raises(ModelLoadError, match="not a readable PyTorch weights file"):
        read_checkpoint(path, "DiT")


def test_unknown_extra_weights_are_logged_not_fatal(
    parity: ParitySet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for file in parity.model_dir.iterdir():
        if file.is_file():
            (bundle / file.name).write_bytes(file.read_bytes())
    (bundle / "content_encoder").symlink_to(parity.model_dir / "content_encoder")
    checkpoint = torch.load(bundle / "dit.pth", weights_only=True)
    checkpoint["net"]["cfm"]["estimator.brand_new_head.weight"] = torch.zeros(3)
    torch.save(checkpoint, bundle / "dit.pth")
    with caplog.at_level(logging.WARNING):
        SeedVC.load(bundle)
    assert "brand_new_head" in caplog.text
