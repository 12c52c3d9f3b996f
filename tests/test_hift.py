"""HiFT vocoder (app/model/hift.py) against a parity fixture set: f0, NSF source, waveform, loader, config."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from app.model.checkpoints import CheckpointMismatch
from app.model.hift import HIFT_LAYOUT, HiFTConfig, HiFTNoise, HiFTVocoder
from bench.parity import ParitySet

# Parity README, section 10: "Vocoder with f0 injected from blk_f0 (bypassing the f0 predictor): 0.0001".
F0_INJECTED_ATOL = 1e-4


def _yaml(parity: ParitySet) -> dict:
    return yaml.safe_load((parity.model_dir / "hift.yml").read_text())


def _state_dict(parity: ParitySet) -> dict[str, torch.Tensor]:
    return torch.load(parity.model_dir / "hift.pt", weights_only=True, map_location="cpu")


def _noise(parity: ParitySet, blocks: list[int]) -> HiFTNoise:
    """The fixture's draws 2 and 3 of the given blocks, one row per block."""
    phase_u = parity.tensor("rng_hift_phase_u")
    sine_noise = parity.tensor("rng_hift_sine_noise")
    return HiFTNoise(
        phase_u=torch.cat([phase_u[k] for k in blocks]),  # (B, H+1, 1)
        sine_noise=torch.cat([sine_noise[k] for k in blocks]),  # (B, H+1, L)
    )


def _mels(parity: ParitySet, blocks: list[int]) -> torch.Tensor:
    mel = parity.tensor("blk_cfm_mel")
    return torch.cat([mel[k] for k in blocks])  # (B, 80, N)


def _blocks(parity: ParitySet) -> list[int]:
    return list(range(parity.expected["blk_cfm_mel"].shape[0]))


@pytest.fixture(scope="module")
def vocoder(parity: ParitySet) -> HiFTVocoder:
    config = HiFTConfig.from_yaml_dict(_yaml(parity))
    return HiFTVocoder.from_state_dict(config, _state_dict(parity))


@torch.inference_mode()
def test_f0_matches_every_block(parity: ParitySet, vocoder: HiFTVocoder) -> None:
    blocks = _blocks(parity)
    f0 = vocoder.predict_f0(_mels(parity, blocks))
    for k in blocks:
        parity.assert_close("blk_f0", f0[k : k + 1], kind="stage", index=k)


@torch.inference_mode()
def test_harmonic_source_of_block_0(parity: ParitySet, vocoder: HiFTVocoder) -> None:
    f0 = vocoder.predict_f0(_mels(parity, [0]))
    source = vocoder.harmonic_source(f0, _noise(parity, [0]))
    parity.assert_close("blk0_hift_har_source", source, kind="stage")


@torch.inference_mode()
def test_waveform_batched_over_all_blocks(parity: ParitySet, vocoder: HiFTVocoder) -> None:
    blocks = _blocks(parity)
    waves = vocoder(_mels(parity, blocks), _noise(parity, blocks))
    for k in blocks:
        parity.assert_close("blk_vocoder_wave", waves[k], kind="stage", index=k)

    # A row computed alone equals its batched row (only reduction order may differ).
    last = blocks[-1]
    alone = vocoder(_mels(parity, [last]), _noise(parity, [last]))
    tolerance = parity.tolerance("blk_vocoder_wave", "stage")
    assert (alone[0] - waves[last]).abs().max().item() < tolerance


@torch.inference_mode()
def test_waveform_with_injected_f0(parity: ParitySet, vocoder: HiFTVocoder) -> None:
    blocks = _blocks(parity)
    f0 = torch.cat([parity.tensor("blk_f0")[k] for k in blocks])  # (B, N)
    waves = vocoder(_mels(parity, blocks), _noise(parity, blocks), f0=f0)
    for k in blocks:
        error = parity.max_error("blk_vocoder_wave", waves[k], index=k)
        assert error <= F0_INJECTED_ATOL, f"blk_vocoder_wave[{k}] with blk_f0 injected: {error:.3g}"


def test_loader_rejects_missing_key(parity: ParitySet) -> None:
    config = HiFTConfig.from_yaml_dict(_yaml(parity))
    state = _state_dict(parity)
    del state["conv_post.weight_g"]
    with pytest.raises(CheckpointMismatch, match=re.escape("missing key conv_post.weight_g")):
        HiFTVocoder.from_state_dict(config, state)


def test_loader_rejects_wrong_shape(parity: ParitySet) -> None:
    config = HiFTConfig.from_yaml_dict(_yaml(parity))
    state = _state_dict(parity)
    state["m_source.l_linear.weight"] = torch.zeros(1, config.nb_harmonics + 2)
    with pytest.raises(CheckpointMismatch, match=re.escape("wrong shapes [m_source.l_linear.weight")):
        HiFTVocoder.from_state_dict(config, state)


def test_loader_rejects_a_wrong_gain_shape(parity: ParitySet) -> None:
    config = HiFTConfig.from_yaml_dict(_yaml(parity))
    state = _state_dict(parity)
    state["conv_pre.weight_g"] = state["conv_pre.weight_g"].flatten()
    with pytest.raises(CheckpointMismatch, match=re.escape("wrong shape conv_pre.weight_g")):
        HiFTVocoder.from_state_dict(config, state)


def test_layout_writes_cosyvoice_keys_that_load_back(parity: ParitySet, vocoder: HiFTVocoder) -> None:
    """The inverse (bench/full_size.py writes bundles with it) gives the file's keys and shapes and reloads the same
    weights, up to the rounding of g * v / ||v||."""
    file_state = _state_dict(parity)
    written = HIFT_LAYOUT.to_file(vocoder, vocoder.state_dict())
    assert {key: value.shape for key, value in written.items()} == {key: v.shape for key, v in file_state.items()}
    reloaded = HiFTVocoder.from_state_dict(vocoder.config, written)
    for key, value in vocoder.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=1e-6, atol=1e-9, msg=key)


def test_config_rejects_unknown_key(parity: ParitySet) -> None:
    data = _yaml(parity)
    data["hift"]["upsample_scale"] = 256
    with pytest.raises(ValueError, match="upsample_scale"):
        HiFTConfig.from_yaml_dict(data)


def test_config_honours_the_yaml(parity: ParitySet) -> None:
    data = _yaml(parity)
    config = HiFTConfig.from_yaml_dict(data)
    assert config.base_channels == data["hift"]["base_channels"] != HiFTConfig().base_channels
    assert config.f0_cond_channels == data["f0_predictor"]["cond_channels"]
    assert config.istft_n_fft == data["hift"]["istft_params"]["n_fft"]
    mel_frames = parity.expected["blk_cfm_mel"].shape[-1]
    assert config.samples_per_frame * mel_frames == parity.expected["blk_vocoder_wave"].shape[-1]


def test_vocoder_runs_under_bfloat16_autocast(parity):
    """Reduced precision is a serving option (bench --autocast); the iSTFT must not reject it."""
    from app.model.hift import HiFTConfig, HiFTNoise, HiFTVocoder

    config = HiFTConfig(base_channels=8, f0_cond_channels=8)
    vocoder = HiFTVocoder(config).eval()
    frames, samples = 4, 4 * config.samples_per_frame
    noise = HiFTNoise(
        phase_u=torch.rand(1, config.nb_harmonics + 1, 1), sine_noise=torch.randn(1, config.nb_harmonics + 1, samples)
    )
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        wave = vocoder(torch.randn(1, config.in_channels, frames), noise)
    assert wave.shape == (1, samples) and torch.isfinite(wave.float()).all()
