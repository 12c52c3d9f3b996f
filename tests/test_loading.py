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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub.errors import LocalEntryNotFoundError

from app.audio.files import read_audio
from app.bundle import write_bundle
from app.model import sources
from app.model.campplus import CAMPPLUS_LAYOUT, CAMPPlus, CAMPPlusConfig
from app.model.checkpoints import CheckpointMismatch, read_checkpoint
from app.model.dit import DIT_LAYOUT, REGULATOR_LAYOUT
from app.model.hift import HIFT_LAYOUT, HiFTConfig, HiFTVocoder
from app.model.seedvc import SeedVC
from app.model.sources import ModelLoadError, bundle_files
from app.streaming.settings import StreamSettings
from app.streaming.stream import Stream, step_streams
from app.streaming.voice import prepare_voice
from bench.parity import ParitySet

HUB_ENCODER_ID = "facebook/wav2vec2-xls-r-300m"


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
    # Full size in the official layouts (CosyVoice's legacy weight norm, funasr's `xvector.dense`): the hub files
    # have no configs, our defaults must fit them. test_hift/test_campplus check these layouts against real files.
    torch.manual_seed(0)
    hift = hub / sources.HUB_VOCODER.repo_id
    hift.mkdir(parents=True)
    vocoder = HiFTVocoder(HiFTConfig())
    torch.save(HIFT_LAYOUT.to_file(vocoder, vocoder.state_dict()), hift / sources.HUB_VOCODER.filename)
    campplus = hub / sources.HUB_SPEAKER_ENCODER.repo_id
    campplus.mkdir(parents=True)
    speaker = CAMPPlus(CAMPPlusConfig())
    torch.save(CAMPPLUS_LAYOUT.to_file(speaker, speaker.state_dict()), campplus / sources.HUB_SPEAKER_ENCODER.filename)
    return hub


@dataclass
class HubDouble:
    """huggingface_hub's two download calls, served from a directory: what is cached, and whether the hub answers.

    Every call is recorded as (kind, repo_id, filename or "*", revision), kind one of "file" and "folder" (downloads,
    or cache hits), "lookup" (cache only) and "dry_run"; snapshots record their allow_patterns.
    """

    root: Path
    reachable: bool = True
    cached: set[tuple[str, str]] = field(default_factory=set)
    calls: list[tuple[str, str, str, str]] = field(default_factory=list)
    patterns: list[tuple[str, ...]] = field(default_factory=list)

    def _serve(self, kind: str, repo_id: str, name: str, revision: str, cached_only: bool) -> str:
        self.calls.append(("lookup" if cached_only else kind, repo_id, name, revision))
        if (repo_id, name) not in self.cached and (cached_only or not self.reachable):
            raise LocalEntryNotFoundError(f"{repo_id}/{name} is not cached")
        if kind != "dry_run":
            self.cached.add((repo_id, name))
        return str(self.root / repo_id / name) if name != "*" else str(self.root / repo_id)

    def download(
        self, repo_id: str, filename: str, revision: str, local_files_only: bool = False, dry_run: bool = False
    ) -> str:
        return self._serve("dry_run" if dry_run else "file", repo_id, filename, revision, local_files_only)

    def snapshot(self, repo_id: str, revision: str, allow_patterns: list[str], local_files_only: bool = False) -> str:
        self.patterns.append(tuple(allow_patterns))
        return self._serve("folder", repo_id, "*", revision, local_files_only)

    def downloads(self) -> set[tuple[str, str, str]]:
        return {(repo_id, name, revision) for kind, repo_id, name, revision in self.calls if kind in ("file", "folder")}


@pytest.fixture
def hub(fake_hub: Path, monkeypatch: pytest.MonkeyPatch) -> HubDouble:
    double = HubDouble(fake_hub)
    monkeypatch.setattr(sources, "hf_hub_download", double.download)
    monkeypatch.setattr(sources, "snapshot_download", double.snapshot)
    return double


OFFICIAL_DOWNLOADS = {
    ("Plachta/Seed-VC", "config_dit_mel_seed_uvit_xlsr_tiny.yml", "main"),
    ("Plachta/Seed-VC", "DiT_uvit_tat_xlsr_ema.pth", "main"),
    ("facebook/wav2vec2-xls-r-300m", "*", "main"),
    ("FunAudioLLM/CosyVoice-300M", "hift.pt", "main"),
    ("funasr/campplus", "campplus_cn_common.bin", "main"),
}


def test_hub_default_fetches_the_official_files_and_runs(parity: ParitySet, hub: HubDouble) -> None:
    model = SeedVC.load()
    assert hub.downloads() == OFFICIAL_DOWNLOADS
    # The content encoder's repository holds more than these; nothing else is fetched.
    assert hub.patterns == [("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin")]
    assert model.vocoder.config == HiFTConfig() and model.speaker_encoder.config == CAMPPlusConfig()
    voice = prepare_voice(model, read_audio(parity.root / parity.bundle["files"]["reference_22k"]), 3.0)
    stream = Stream(model, voice, StreamSettings(diffusion_steps=1), seed=0)
    audio = step_streams(model, [stream], [torch.zeros(stream.geometry.block_16k)]).audio
    assert audio.shape == (1, stream.geometry.block) and torch.isfinite(audio).all()


def test_each_hub_file_is_fetched_at_its_revision(hub: HubDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    pinned = dataclasses.replace(sources.HUB_VOCODER, revision="v1.0")
    monkeypatch.setattr(sources, "HUB_VOCODER", pinned)
    monkeypatch.setattr(sources, "CONTENT_ENCODER_REVISION", "refs/pr/7")
    sources.hub_files()
    assert ("FunAudioLLM/CosyVoice-300M", "hift.pt", "v1.0") in hub.downloads()
    assert ("facebook/wav2vec2-xls-r-300m", "*", "refs/pr/7") in hub.downloads()
    assert ("Plachta/Seed-VC", "DiT_uvit_tat_xlsr_ema.pth", "main") in hub.downloads()


def test_hub_check_downloads_nothing(hub: HubDouble) -> None:
    sources.check_hub_files()  # nothing cached, the hub answers
    assert hub.downloads() == set()
    assert {(repo, name) for kind, repo, name, _ in hub.calls if kind == "dry_run"} == {
        (file.repo_id, file.filename) for file in sources.HUB_NAMED_FILES
    }


def test_hub_check_fails_with_advice_when_nothing_is_cached_and_the_hub_is_away(hub: HubDouble) -> None:
    hub.reachable = False
    with pytest.raises(ModelLoadError, match=r"not in the Hugging Face cache.*python -m app\.bundle"):
        sources.check_hub_files()
    assert hub.downloads() == set()


def test_hub_check_passes_from_the_cache_without_the_hub(hub: HubDouble) -> None:
    sources.hub_files()  # fills the cache
    hub.reachable = False
    hub.calls.clear()
    sources.check_hub_files()
    assert {kind for kind, *_ in hub.calls} == {"lookup"}  # cache look-ups only, no dry run


def test_bundle_from_hub_has_the_fixed_layout(hub: HubDouble, fake_hub: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    write_bundle(sources.hub_files(), bundle)
    files = bundle_files(bundle)  # raises if any fixed name is missing
    assert sorted(p.name for p in bundle.iterdir()) == sorted(sources.BUNDLE_NAMES)
    config = yaml.safe_load(files.dit_config.read_text())
    assert config["model_params"]["speech_tokenizer"]["name"] == "content_encoder"
    hub_dit = fake_hub / sources.HUB_DIT_CHECKPOINT.repo_id / sources.HUB_DIT_CHECKPOINT.filename
    assert files.dit_checkpoint.read_bytes() == hub_dit.read_bytes()
    assert files.vocoder_config is not None and files.speaker_encoder_config is not None  # a bundle has both
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


def bundle_with_dit(parity: ParitySet, directory: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the fixture bundle whose DiT checkpoint `edit` changed in place."""
    directory.mkdir()
    for file in parity.model_dir.iterdir():
        if file.is_file():
            (directory / file.name).write_bytes(file.read_bytes())
    (directory / "content_encoder").symlink_to(parity.model_dir / "content_encoder")
    checkpoint = torch.load(directory / "dit.pth", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, directory / "dit.pth")
    return directory


def test_unknown_extra_weights_are_logged_not_fatal(
    parity: ParitySet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def add_head(checkpoint: dict) -> None:
        checkpoint["net"]["cfm"]["estimator.brand_new_head.weight"] = torch.zeros(3)

    with caplog.at_level(logging.WARNING):
        SeedVC.load(bundle_with_dit(parity, tmp_path / "bundle", add_head))
    assert "brand_new_head" in caplog.text


def test_a_missing_dit_weight_names_the_key_and_the_file(parity: ParitySet, tmp_path: Path) -> None:
    def drop_one(checkpoint: dict) -> None:
        cfm = checkpoint["net"]["cfm"]
        del cfm[next(key for key in cfm if key.endswith("attention.wqkv.weight"))]

    bundle = bundle_with_dit(parity, tmp_path / "bundle", drop_one)
    with pytest.raises(CheckpointMismatch, match=r"DiT estimator checkpoint .*dit\.pth.*missing keys \[transformer"):
        SeedVC.load(bundle)


def test_data_parallel_prefixes_load_the_same_weights(parity: ParitySet, tmp_path: Path) -> None:
    def wrap(checkpoint: dict) -> None:
        for part in ("cfm", "length_regulator"):
            checkpoint["net"][part] = {f"module.{key}": value for key, value in checkpoint["net"][part].items()}

    wrapped = SeedVC.load(bundle_with_dit(parity, tmp_path / "bundle", wrap))
    plain = SeedVC.load(parity.model_dir)
    for key, value in plain.state_dict().items():
        assert torch.equal(wrapped.state_dict()[key], value), key


def test_dit_layouts_write_the_upstream_keys(parity: ParitySet) -> None:
    model = SeedVC.load(parity.model_dir)
    net = torch.load(parity.model_dir / "dit.pth", weights_only=True)["net"]
    cfm = DIT_LAYOUT.to_file(model.dit, model.dit.state_dict())
    regulator = REGULATOR_LAYOUT.to_file(model.length_regulator, model.length_regulator.state_dict())
    # Upstream's files also hold the weights the real-time path does not build; ours are a subset of the same shapes.
    assert {key: value.shape for key, value in cfm.items()}.items() <= {
        k: v.shape for k, v in net["cfm"].items()
    }.items()
    assert {k: v.shape for k, v in regulator.items()}.items() <= {
        k: v.shape for k, v in net["length_regulator"].items()
    }.items()


def test_a_checkpoint_that_is_no_state_dict_is_refused() -> None:
    with pytest.raises(CheckpointMismatch, match=r"HiFT vocoder checkpoint.*does not hold a state dict"):
        HiFTVocoder.from_state_dict(HiFTConfig(), [torch.zeros(1)])  # type: ignore[arg-type]  # a list, on purpose
