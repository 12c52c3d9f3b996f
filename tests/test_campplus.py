"""CAMPPlus speaker encoder and its fbank front end against the parity sets (voice stage)."""

from __future__ import annotations

import json

import pytest
import torch

from app.model.campplus import CAMPPLUS_LAYOUT, CAMPPlus, CAMPPlusConfig, speaker_fbank
from app.model.checkpoints import CheckpointMismatch
from bench.parity import ParitySet


def _config(parity: ParitySet) -> CAMPPlusConfig:
    path = parity.model_dir / parity.bundle["files"]["speaker_encoder_config"].removeprefix("model/")
    return CAMPPlusConfig.from_json_dict(json.loads(path.read_text()))


def _checkpoint(parity: ParitySet) -> dict[str, torch.Tensor]:
    path = parity.model_dir / parity.bundle["files"]["speaker_encoder_checkpoint"].removeprefix("model/")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def model(parity: ParitySet) -> CAMPPlus:
    return CAMPPlus.from_state_dict(_config(parity), _checkpoint(parity))


def test_fbank_matches_reference(parity: ParitySet) -> None:
    wave = torch.from_numpy(parity.wav("reference_16k"))
    parity.assert_close("voice_fbank", speaker_fbank(wave), kind="stage")


@torch.no_grad()
def test_style_from_reference_fbank(parity: ParitySet, model: CAMPPlus) -> None:
    style = model(parity.tensor("voice_fbank")[None])
    parity.assert_close("voice_style", style, kind="stage")


@torch.no_grad()
def test_style_end_to_end(parity: ParitySet, model: CAMPPlus) -> None:
    wave = torch.from_numpy(parity.wav("reference_16k"))
    parity.assert_close("voice_style", model(speaker_fbank(wave)[None]), kind="e2e")


@torch.no_grad()
def test_batch_rows_are_independent(parity: ParitySet, model: CAMPPlus) -> None:
    first = parity.tensor("voice_fbank")
    # A second, different utterance of the same length: the time-reversed fbank, shifted.
    second = first.flip(0) + 0.5
    together = model(torch.stack([first, second]))
    alone = torch.cat([model(first[None]), model(second[None])])
    assert together.shape == (2, model.config.embedding_size)
    assert not torch.allclose(alone[0], alone[1])
    assert (together - alone).abs().max().item() < 1e-5


def test_loads_renamed_layout(parity: ParitySet, model: CAMPPlus) -> None:
    renamed = {key.replace("xvector.dense.", "dense."): value for key, value in _checkpoint(parity).items()}
    reloaded = CAMPPlus.from_state_dict(_config(parity), renamed)
    assert not reloaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_layout_writes_funasr_keys(parity: ParitySet, model: CAMPPlus) -> None:
    written = CAMPPLUS_LAYOUT.to_file(model, model.state_dict())
    assert {key: value.shape for key, value in written.items()} == {k: v.shape for k, v in _checkpoint(parity).items()}


def test_both_layouts_at_once_are_refused(parity: ParitySet) -> None:
    state = _checkpoint(parity)
    state["dense.linear.weight"] = state["xvector.dense.linear.weight"]
    with pytest.raises(
        CheckpointMismatch, match=r"both '(xvector\.)?dense\.linear\.weight' and '(xvector\.)?dense\.linear\.weight'"
    ):
        CAMPPlus.from_state_dict(_config(parity), state)


def test_missing_key_is_named(parity: ParitySet) -> None:
    state = _checkpoint(parity)
    del state["xvector.transit2.linear.weight"]
    with pytest.raises(CheckpointMismatch, match=r"missing keys.*xvector\.transit2\.linear\.weight"):
        CAMPPlus.from_state_dict(_config(parity), state)


def test_wrong_shape_is_named(parity: ParitySet) -> None:
    state = _checkpoint(parity)
    state["xvector.dense.linear.weight"] = state["xvector.dense.linear.weight"][:-1]
    with pytest.raises(CheckpointMismatch, match=r"shape.*dense\.linear\.weight"):
        CAMPPlus.from_state_dict(_config(parity), state)


def test_unexpected_key_is_named(parity: ParitySet) -> None:
    state = _checkpoint(parity)
    state["xvector.block9.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match=r"unexpected keys.*xvector\.block9\.weight"):
        CAMPPlus.from_state_dict(_config(parity), state)


def test_config_rejects_unknown_key() -> None:
    with pytest.raises(ValueError, match=r"unknown CAMPPlus config keys.*'channels'"):
        CAMPPlusConfig.from_json_dict({"feat_dim": 80, "channels": 3})


def test_config_defaults_match_upstream_speaker_encoder() -> None:
    config = CAMPPlusConfig.from_json_dict({})
    assert (config.feat_dim, config.embedding_size) == (80, 192)
