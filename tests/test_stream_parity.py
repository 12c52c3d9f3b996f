"""End-to-end parity of streaming conversion (app/streaming) against a parity fixture set, within `atol_e2e`.

Everything is computed from the set's inputs/ and model/ only (README sections 2, 7 and 10):

* the voice stage: `prepare_voice` on the reference file gives the prompt mel, prompt condition and style;
* the whole stream: a `Stream` fed the source block by block through `step_streams` reproduces every block's
  16 kHz window (bitwise), CFM mel, vocoder wave, SOLA scores and offsets (bitwise) and output, and the whole
  streamed output;
* batching: the fixture stream stepped together with two strangers (other seeds and inputs, one with a shorter
  prompt) still reproduces the streamed output and offsets, and a stranger computes in the batch what it computes
  alone;
* bounded state: a stream's window and SOLA tail keep their sizes however many blocks it has run;
* bad input: references shorter than the minimum or holding NaN, and contradictory settings, are refused with
  errors that say why.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from app.audio.files import Audio, AudioError, read_audio
from app.model.seedvc import SeedVC
from app.streaming.settings import SettingsError
from app.streaming.stream import Stream, step_streams
from app.streaming.voice import MIN_REFERENCE_SECONDS, Voice, prepare_voice, prompt_audio
from bench.parity import ParitySet
from tests.settings_from_bundle import one_torch_thread, stream_settings


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _reference(parity: ParitySet) -> Audio:
    return read_audio(parity.root / parity.bundle["files"]["reference_22k"])


@pytest.fixture(scope="module")
def voice(parity: ParitySet, model: SeedVC) -> Voice:
    return prepare_voice(model, _reference(parity), parity.settings["max_prompt_length"])


def _source_blocks(parity: ParitySet) -> list[torch.Tensor]:
    source = torch.from_numpy(parity.wav("source_16k"))
    size = parity.geometry["block_frame_16k"]
    count = parity.bundle["n_blocks"]
    assert source.shape[0] == count * size
    return [source[k * size : (k + 1) * size] for k in range(count)]


def _fixture_stream(parity: ParitySet, model: SeedVC, voice: Voice) -> Stream:
    return Stream(model, voice, stream_settings(parity), seed=parity.bundle["stream_seed"])


def test_voice(parity: ParitySet, voice: Voice) -> None:
    parity.assert_close("voice_ref_mel", voice.prompt_mel[None], kind="e2e")
    parity.assert_close("voice_prompt_condition", voice.prompt_condition[None], kind="e2e")
    parity.assert_close("voice_style", voice.style[None], kind="e2e")


def test_whole_stream(parity: ParitySet, model: SeedVC, voice: Voice) -> None:
    stream = _fixture_stream(parity, model, voice)
    outputs = []
    for k, block in enumerate(_source_blocks(parity)):
        step = step_streams(model, [stream], [block])
        assert step.batch is not None and step.converted == (0,)
        parity.assert_close("blk_window16k", stream.window, kind="e2e", index=k)
        parity.assert_close("blk_cfm_mel", step.batch.mel, kind="e2e", index=k)
        parity.assert_close("blk_vocoder_wave", step.batch.wave[0], kind="e2e", index=k)
        parity.assert_close("blk_sola_score", step.batch.sola.scores[0], kind="e2e", index=k)
        parity.assert_close("blk_sola_offset", step.batch.sola.offsets[0], kind="e2e", index=k)
        parity.assert_close("blk_output", step.audio[0], kind="e2e", index=k)
        outputs.append(step.audio[0])
    parity.assert_close("output_stream", torch.cat(outputs), kind="e2e")


def _stranger_voice(parity: ParitySet, model: SeedVC) -> Voice:
    """Another voice with a shorter prompt: the END of the reference, cut between the minimum and the prompt cap."""
    reference = _reference(parity)
    seconds = (MIN_REFERENCE_SECONDS + min(parity.settings["max_prompt_length"], reference.seconds)) / 2
    cropped = Audio(samples=reference.samples[-int(seconds * reference.rate) :].copy(), rate=reference.rate)
    return prepare_voice(model, cropped, parity.settings["max_prompt_length"])


@pytest.mark.slow
def test_fixture_stream_among_strangers(parity: ParitySet, model: SeedVC, voice: Voice) -> None:
    settings = stream_settings(parity)
    seed = parity.bundle["stream_seed"]
    stranger_voice = _stranger_voice(parity, model)
    assert stranger_voice.prompt_frames < voice.prompt_frames, "the stranger must need padding"
    streams = [
        Stream(model, stranger_voice, settings, seed=seed + 1),
        _fixture_stream(parity, model, voice),
        Stream(model, voice, settings, seed=seed + 2),
    ]
    alone = Stream(model, stranger_voice, settings, seed=seed + 1)
    blocks = _source_blocks(parity)
    outputs, alone_outputs, offsets = [], [], []
    for k, block in enumerate(blocks):
        # The strangers hear other audio: the source backwards, and a quieter earlier block.
        stranger_block = blocks[-1 - k].flip(0)
        step = step_streams(model, streams, [stranger_block, block, 0.5 * blocks[k // 2]])
        assert step.batch is not None and step.converted == (0, 1, 2)
        outputs.append(step.audio)
        offsets.append(step.batch.sola.offsets[1].item())
        if k < 4:  # enough blocks to cover SOLA against a real tail; each costs a full solo pass
            alone_outputs.append(step_streams(model, [alone], [stranger_block]).audio[0])

    parity.assert_close("output_stream", torch.cat([audio[1] for audio in outputs]), kind="e2e")
    parity.assert_close("blk_sola_offset", np.array(offsets), kind="e2e")

    atol = parity.tolerance("blk_output", "e2e")
    for k, audio in enumerate(alone_outputs):
        error = (outputs[k][0] - audio).abs().max().item()
        assert error <= atol, f"block {k}: the short-prompt stranger differs from its solo run by {error:.3g}"
    # The strangers really are different streams (else the test would prove nothing about row independence).
    for other in (0, 2):
        assert not torch.allclose(outputs[-1][other], outputs[-1][1], atol=atol)


def test_stream_state_does_not_grow(parity: ParitySet, model: SeedVC, voice: Voice) -> None:
    # One diffusion step: the state's size does not depend on it, and it keeps this test cheap.
    settings = dataclasses.replace(stream_settings(parity), diffusion_steps=1)
    stream = Stream(model, voice, settings, seed=parity.bundle["stream_seed"])
    initial = (stream.window.shape, stream.tail.shape)
    assert initial == ((parity.geometry["input_wav_res_len"],), (parity.geometry["sola_buffer_frame"],))

    def held_bytes() -> int:
        return stream.window.untyped_storage().nbytes() + stream.tail.untyped_storage().nbytes()

    blocks = _source_blocks(parity)
    sizes = []
    for block in blocks[:4]:
        step_streams(model, [stream], [block])
        assert (stream.window.shape, stream.tail.shape) == initial
        sizes.append(held_bytes())
    assert stream.blocks_done == 4
    assert len(set(sizes)) == 1, f"memory held by the stream state changes from block to block: {sizes}"
    assert torch.equal(stream.window[-blocks[3].shape[0] :], blocks[3]), "the window must end with the newest block"


# --- bad input -------------------------------------------------------------------------------------------------------


def _reference_start(parity: ParitySet, samples: int) -> Audio:
    reference = _reference(parity)
    return Audio(samples=reference.samples[:samples].copy(), rate=reference.rate)


def test_reference_shorter_than_the_minimum_is_refused(parity: ParitySet, model: SeedVC) -> None:
    minimum = math.ceil(MIN_REFERENCE_SECONDS * _reference(parity).rate)  # samples in the shortest usable reference
    too_short = _reference_start(parity, minimum - 1)
    max_prompt = parity.settings["max_prompt_length"]
    with pytest.raises(AudioError, match="at least"):
        prompt_audio(too_short, model.sample_rate, max_prompt)
    with pytest.raises(AudioError, match="at least"):
        prepare_voice(model, too_short, max_prompt)
    # The minimum itself is accepted.
    just_enough = _reference_start(parity, minimum)
    assert prompt_audio(just_enough, model.sample_rate, max_prompt).at_16k.shape[0] > 0


def test_reference_with_nan_is_refused(parity: ParitySet, model: SeedVC, tmp_path: Path) -> None:
    reference = _reference(parity)
    samples = reference.samples.copy()
    samples[len(samples) // 2] = np.nan
    broken = Audio(samples=samples, rate=reference.rate)
    max_prompt = parity.settings["max_prompt_length"]
    with pytest.raises(AudioError, match="NaN"):
        prompt_audio(broken, model.sample_rate, max_prompt)
    with pytest.raises(AudioError, match="NaN"):
        prepare_voice(model, broken, max_prompt)
    path = tmp_path / "nan.wav"
    soundfile.write(path, samples, reference.rate, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        read_audio(path)


def test_dit_context_beyond_content_encoder_context_is_refused(parity: ParitySet) -> None:
    settings = stream_settings(parity)
    dit_context = settings.ce_context + 0.5
    with pytest.raises(SettingsError) as raised:
        dataclasses.replace(settings, dit_context=dit_context)
    message = str(raised.value)
    # Both settings are named, with the values that contradict each other.
    assert re.search(r"DiT context|dit_context", message, re.IGNORECASE), message
    assert re.search(r"content-encoder context|ce_context", message, re.IGNORECASE), message
    assert str(dit_context) in message and str(settings.ce_context) in message, message
