"""All networks of the Seed-VC real-time model, built and loaded from the official files or a bundle."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import yaml
from torch import nn

from app.model.campplus import CAMPPlus, CAMPPlusConfig
from app.model.checkpoints import load_state, read_checkpoint
from app.model.config import ConfigError, SeedVCConfig, load_config
from app.model.content_encoder import ContentEncoder
from app.model.dit import DIT_LAYOUT, REGULATOR_LAYOUT, DiT, dit_checkpoint_parts
from app.model.hift import HiFTConfig, HiFTVocoder
from app.model.length_regulator import LengthRegulator
from app.model.mel import MelSpectrogram
from app.model.precision import (
    DeviceCapabilities,
    Precision,
    PrecisionChoice,
    compute_context,
    convert_matrix_weights,
    disable_tf32,
    resolve,
)
from app.model.sources import HUB, ModelFiles, ModelLoadError, resolve_files

log = logging.getLogger(__name__)


class SeedVC(nn.Module):
    def __init__(
        self,
        config: SeedVCConfig,
        content_encoder: ContentEncoder,
        length_regulator: LengthRegulator,
        dit: DiT,
        vocoder: HiFTVocoder,
        speaker_encoder: CAMPPlus,
    ) -> None:
        super().__init__()
        self.config = config
        self.content_encoder = content_encoder
        self.length_regulator = length_regulator
        self.dit = dit
        self.vocoder = vocoder
        self.speaker_encoder = speaker_encoder
        self.mel = MelSpectrogram(config.mel)
        self.precision = Precision.FP32
        self.eval()

    @property
    def sample_rate(self) -> int:
        return self.config.mel.sample_rate

    @property
    def device(self) -> torch.device:
        return self.mel.window.device

    def compute(self) -> contextlib.AbstractContextManager[None]:
        """The context the heavy stages (content encoder, DiT, vocoder) run in: autocast in a reduced precision."""
        return compute_context(self.precision, self.device)

    def set_precision(self, requested: Precision | str) -> PrecisionChoice:
        """Choose the compute precision once, after moving to the device: reduced types convert weights for good."""
        choice = resolve(requested, DeviceCapabilities.of(self.device))
        disable_tf32()
        if choice.precision is self.precision:
            return choice
        if self.precision is not Precision.FP32:
            raise ValueError(f"the model already computes in {self.precision}; load it again for {choice.precision}")
        dtype = choice.precision.dtype
        wrong = [
            *convert_matrix_weights(self.content_encoder, dtype, name="content_encoder"),
            *convert_matrix_weights(self.dit, dtype, name="dit"),
            *convert_matrix_weights(
                self.vocoder, dtype, keep=(self.vocoder.f0_predictor, self.vocoder.m_source), name="vocoder"
            ),
        ]
        if wrong:
            log.warning(
                "%s kernels on %s compute wrong results for %d layer(s), kept in float32: %s",
                choice.precision,
                self.device,
                len(wrong),
                ", ".join(map(str, wrong)),
            )
        self.precision = choice.precision
        return choice

    @classmethod
    def load(
        cls, source: str | Path = HUB, device: str | torch.device = "cpu", precision: Precision | str = Precision.FP32
    ) -> SeedVC:
        """From `hub` (the official files by hub id) or a model bundle directory, onto `device`, in `precision`."""
        model = cls.from_files(resolve_files(source)).to(device)
        choice = model.set_precision(precision)
        log.info("compute precision %s (%s)", choice.precision, choice.reason)
        return model

    @classmethod
    def from_files(cls, files: ModelFiles) -> SeedVC:
        config = load_config(files.dit_config)
        estimator_state, regulator_state = dit_checkpoint_parts(
            read_checkpoint(files.dit_checkpoint, "DiT"), files.dit_checkpoint
        )
        dit = DiT(config.dit)
        load_state(dit, estimator_state, DIT_LAYOUT, files.dit_checkpoint)
        regulator = LengthRegulator(config.length_regulator)
        load_state(regulator, regulator_state, REGULATOR_LAYOUT, files.dit_checkpoint)
        model = cls(
            config,
            _load_content_encoder(files.content_encoder, config),
            regulator,
            dit,
            _load_vocoder(files, config),
            _load_speaker_encoder(files),
        )
        log.info("Seed-VC model loaded from %s", files.dit_checkpoint.parent)
        return model


def _load_content_encoder(folder: Path, config: SeedVCConfig) -> ContentEncoder:
    try:
        encoder = ContentEncoder.from_pretrained(folder, config.content_encoder)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the content encoder from {folder}: {error}") from error
    if encoder.hidden_size != config.length_regulator.in_channels:
        raise ModelLoadError(
            f"content encoder width {encoder.hidden_size} does not match length_regulator.in_channels "
            f"{config.length_regulator.in_channels} in config_dit.yml"
        )
    return encoder


def _read_mapping(path: Path, parse: str) -> dict:
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if parse == "yaml" else json.loads(text)
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a mapping")
    return data


def _load_vocoder(files: ModelFiles, config: SeedVCConfig) -> HiFTVocoder:
    try:
        vocoder_config = (
            HiFTConfig.from_yaml_dict(_read_mapping(files.vocoder_config, "yaml"))
            if files.vocoder_config
            else HiFTConfig()
        )
    except ValueError as error:
        raise ModelLoadError(f"HiFT vocoder config {files.vocoder_config}: {error}") from error
    state = read_checkpoint(files.vocoder_checkpoint, "HiFT vocoder")
    vocoder = HiFTVocoder.from_state_dict(vocoder_config, state, files.vocoder_checkpoint)
    mel = config.mel
    if (vocoder_config.in_channels, vocoder_config.sampling_rate, vocoder_config.samples_per_frame) != (
        mel.n_mels,
        mel.sample_rate,
        mel.hop_length,
    ):
        raise ConfigError(
            f"the vocoder (mels {vocoder_config.in_channels}, {vocoder_config.sampling_rate} Hz, "
            f"{vocoder_config.samples_per_frame} samples/frame) does not fit the DiT's mel "
            f"({mel.n_mels} mels, {mel.sample_rate} Hz, hop {mel.hop_length})"
        )
    return vocoder


def _load_speaker_encoder(files: ModelFiles) -> CAMPPlus:
    try:
        speaker_config = (
            CAMPPlusConfig.from_json_dict(_read_mapping(files.speaker_encoder_config, "json"))
            if files.speaker_encoder_config
            else CAMPPlusConfig()
        )
    except ValueError as error:
        raise ModelLoadError(f"CAMPPlus speaker encoder config {files.speaker_encoder_config}: {error}") from error
    state = read_checkpoint(files.speaker_encoder_checkpoint, "CAMPPlus speaker encoder")
    return CAMPPlus.from_state_dict(speaker_config, state, files.speaker_encoder_checkpoint)
