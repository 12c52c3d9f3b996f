"""Stage parity of the Seed-VC real-time model (app/model, app/streaming) against a parity fixture set.

Each stage is fed the fixture's own inputs for that stage and must reproduce the fixture's output within its
`atol_stage` (README sections 8 and 10):

* mel front end: the prompt mel of the cropped 22.05 kHz reference, and the mel filterbank itself;
* content encoder: input normalisation, the prompt's content features, and every block's window in ONE batched call;
* length regulator: the prompt condition, and every block's condition in one batched call;
* DiT estimator: the right-padded 3-row case (valid region only) and block 0's first CFG call;
* CFM sampler: every block in one batched call, and a batch whose rows have different prompt lengths (padding and
  key-mask path: a padded row equals itself computed alone, the fixture row still matches);
* SOLA: the whole chain of blocks from the fixture's vocoder waves (scores, offsets bitwise, output);
* randomness: a stream's generator reproduces every shipped draw bitwise, in the contracted order and counts;
* geometry: `StreamGeometry` derived from the set's settings equals the set's geometry.

The vocoder and the speaker encoder have their own files (test_hift.py, test_campplus.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from app.model.cfm import FlowBatch, sample
from app.model.content_encoder import normalise_rows
from app.model.seedvc import SeedVC
from app.streaming.noise import draw_block_noise
from app.streaming.settings import StreamGeometry
from app.streaming.sola import fade_in_window, sola_join
from bench.parity import ParitySet
from tests.settings_from_bundle import one_torch_thread, stream_settings


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _blocks(parity: ParitySet) -> list[int]:
    return list(range(parity.expected["blk_output"].shape[0]))


def _prompt_frames(parity: ParitySet) -> int:
    return int(parity.expected["voice_ref_mel"].shape[-1])


def _wav(parity: ParitySet, key: str) -> torch.Tensor:
    return torch.from_numpy(parity.wav(key))


# --- mel -------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_prompt_mel(parity: ParitySet, model: SeedVC) -> None:
    samples = int(parity.geometry["sr"] * parity.settings["max_prompt_length"])
    mel = model.mel(_wav(parity, "reference_22k")[None, :samples])
    parity.assert_close("voice_ref_mel", mel, kind="stage")


def test_mel_basis(parity: ParitySet, model: SeedVC) -> None:
    parity.assert_close("mel_basis", model.mel.mel_basis, kind="stage")


# --- content encoder -------------------------------------------------------------------------------------------------


def test_content_encoder_input_normalisation(parity: ParitySet) -> None:
    parity.assert_close("voice_ce_input", normalise_rows(_wav(parity, "reference_16k")[None]), kind="stage")


@torch.inference_mode()
def test_content_of_the_prompt(parity: ParitySet, model: SeedVC) -> None:
    parity.assert_close("voice_content", model.content_encoder(_wav(parity, "reference_16k")[None]), kind="stage")


@torch.inference_mode()
def test_content_of_every_window_batched(parity: ParitySet, model: SeedVC) -> None:
    windows = parity.tensor("blk_window16k")  # (K, W16): all blocks in one call
    content = model.content_encoder(windows)
    for k in _blocks(parity):
        parity.assert_close("blk_content", content[k : k + 1], kind="stage", index=k)


# --- length regulator ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_prompt_condition(parity: ParitySet, model: SeedVC) -> None:
    condition = model.length_regulator(parity.tensor("voice_content"), _prompt_frames(parity))
    parity.assert_close("voice_prompt_condition", condition, kind="stage")


@torch.inference_mode()
def test_block_condition_batched(parity: ParitySet, model: SeedVC) -> None:
    cut = parity.geometry["ce_dit_frame_difference"]
    content = parity.tensor("blk_content")[:, 0, cut:]  # (K, F - cut, C): all blocks in one call
    condition = model.length_regulator(content, parity.geometry["target_lengths"])
    for k in _blocks(parity):
        parity.assert_close("blk_cond", condition[k : k + 1], kind="stage", index=k)


# --- DiT estimator ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_estimator_padded_rows(parity: ParitySet, model: SeedVC) -> None:
    x_lens = parity.tensor("est_x_lens")
    out = model.dit(
        parity.tensor("est_x"),
        parity.tensor("est_prompt_x"),
        x_lens,
        parity.tensor("est_t"),
        parity.tensor("est_style"),
        parity.tensor("est_cond"),
    ).numpy()
    expected = parity.expected["est_out"]
    assert out.shape == expected.shape
    atol = parity.tolerance("est_out", "stage")
    for row, length in enumerate(x_lens.tolist()):
        error = float(np.abs(out[row, :, :length] - expected[row, :, :length]).max())
        assert error <= atol, f"est_out row {row} (valid length {length}): max abs error {error:.3g} > {atol:.3g}"


@torch.inference_mode()
def test_estimator_first_call_of_block_0(parity: ParitySet, model: SeedVC) -> None:
    x = parity.tensor("blk0_est0_x")
    # Upstream passes one x_lens entry for both CFG rows; ours takes one per row.
    x_lens = parity.tensor("blk0_est0_x_lens").expand(x.shape[0])
    out = model.dit(
        x,
        parity.tensor("blk0_est0_prompt_x"),
        x_lens,
        parity.tensor("blk0_est0_t"),
        parity.tensor("blk0_est0_style"),
        parity.tensor("blk0_est0_cond"),
    )
    parity.assert_close("blk0_est0_out", out, kind="stage")


# --- CFM sampler -----------------------------------------------------------------------------------------------------


def _flow_batch(
    conditions: list[torch.Tensor],
    prompt_mels: list[torch.Tensor],
    noises: list[torch.Tensor],
    styles: list[torch.Tensor],
    cfg_rate: float,
    padding_value: float = 0.0,
) -> FlowBatch:
    """Rows of [prompt | block] right-padded to the longest; condition and noise padding filled with a value."""
    frames = max(noise.shape[-1] for noise in noises)
    condition = torch.full((len(noises), frames, conditions[0].shape[-1]), padding_value)
    noise = torch.full((len(noises), noises[0].shape[0], frames), padding_value)
    prompt_mel = torch.zeros(len(noises), prompt_mels[0].shape[0], frames)
    for row, (row_condition, row_prompt, row_noise) in enumerate(zip(conditions, prompt_mels, noises, strict=True)):
        condition[row, : row_condition.shape[0]] = row_condition
        noise[row, :, : row_noise.shape[-1]] = row_noise
        prompt_mel[row, :, : row_prompt.shape[-1]] = row_prompt
    prompt_frames = torch.tensor([mel.shape[-1] for mel in prompt_mels])
    return FlowBatch(
        condition=condition,
        prompt_mel=prompt_mel,
        prompt_frames=prompt_frames,
        valid_frames=torch.tensor([row_noise.shape[-1] for row_noise in noises]),
        style=torch.stack(styles),
        noise=noise,
        cfg_rates=(cfg_rate,) * len(noises),
    )


def _fixture_row(parity: ParitySet, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(condition (T, D), prompt mel (M, P), noise (M, T), style) of block k, all from the fixture."""
    return (
        parity.tensor("blk_cat_condition")[k, 0],
        parity.tensor("voice_ref_mel")[0],
        parity.tensor("rng_cfm_z")[k, 0],
        parity.tensor("voice_style")[0],
    )


def test_cfm_every_block_batched(parity: ParitySet, model: SeedVC) -> None:
    settings = stream_settings(parity)
    blocks = _blocks(parity)
    rows = [_fixture_row(parity, k) for k in blocks]
    conditions, prompt_mels, noises, styles = (list(column) for column in zip(*rows, strict=True))
    batch = _flow_batch(conditions, prompt_mels, noises, styles, cfg_rate=settings.cfg_rate)
    mel = sample(model.dit, batch, settings.diffusion_steps)[..., _prompt_frames(parity) :]
    for row, k in enumerate(blocks):
        parity.assert_close("blk_cfm_mel", mel[row : row + 1], kind="stage", index=k)


def test_cfm_rows_with_different_prompt_lengths(parity: ParitySet, model: SeedVC) -> None:
    settings = stream_settings(parity)
    blocks = _blocks(parity)
    prompt = _prompt_frames(parity)
    k = blocks[-1]
    condition, prompt_mel, _, style = _fixture_row(parity, k)
    # A stranger: half the prompt, another block's condition, its own noise; its padding holds garbage.
    short = prompt // 2
    stranger_condition = torch.cat(
        [parity.tensor("voice_prompt_condition")[0, :short], parity.tensor("blk_cond")[0, 0]]
    )
    stranger_prompt = prompt_mel[:, :short]
    generator = torch.Generator().manual_seed(parity.bundle["stream_seed"] + 1)
    stranger_noise = torch.randn((prompt_mel.shape[0], stranger_condition.shape[0]), generator=generator)
    stranger_style = -style
    assert short + parity.geometry["target_lengths"] == stranger_condition.shape[0] < condition.shape[0]

    batch = _flow_batch(
        [stranger_condition, condition],
        [stranger_prompt, prompt_mel],
        [stranger_noise, parity.tensor("rng_cfm_z")[k, 0]],
        [stranger_style, style],
        cfg_rate=settings.cfg_rate,
        padding_value=1e3,
    )
    together = sample(model.dit, batch, settings.diffusion_steps)
    parity.assert_close("blk_cfm_mel", together[1:2, :, prompt:], kind="stage", index=k)

    alone_batch = _flow_batch(
        [stranger_condition], [stranger_prompt], [stranger_noise], [stranger_style], cfg_rate=settings.cfg_rate
    )
    alone = sample(model.dit, alone_batch, settings.diffusion_steps)
    valid = stranger_condition.shape[0]
    error = (together[0, :, short:valid] - alone[0, :, short:]).abs().max().item()
    atol = parity.tolerance("blk_cfm_mel", "stage")
    assert error <= atol, f"padded row differs from itself computed alone by {error:.3g} > {atol:.3g}"
    assert together[0, :, :short].abs().max().item() == 0, "the prompt frames of the output must be zero"


# --- SOLA ------------------------------------------------------------------------------------------------------------


def test_sola_chain(parity: ParitySet) -> None:
    geometry = parity.geometry
    infer_len, tail_len = geometry["infer_wav_len"], geometry["tail_len"]
    crossfade = geometry["sola_buffer_frame"]
    fade_in = fade_in_window(crossfade)
    waves = parity.tensor("blk_vocoder_wave")
    tails = torch.zeros(1, crossfade)
    for k in _blocks(parity):
        infer = waves[k : k + 1, -(infer_len + tail_len) : -tail_len]
        result = sola_join(infer, tails, fade_in, geometry["sola_search_frame"], geometry["block_frame"])
        parity.assert_close("blk_sola_score", result.scores[0], kind="stage", index=k)
        parity.assert_close("blk_sola_offset", result.offsets[0], kind="stage", index=k)
        parity.assert_close("blk_output", result.output[0], kind="stage", index=k)
        tails = result.tails


# --- randomness ------------------------------------------------------------------------------------------------------


def _draw_shapes(parity: ParitySet) -> tuple[int, int, int, int]:
    """(n_mels, P + N, harmonics + 1, L) from the shapes of the shipped draws."""
    _, _, n_mels, cfm_frames = parity.expected["rng_cfm_z"].shape
    harmonics = parity.expected["rng_hift_phase_u"].shape[2]
    samples = parity.expected["rng_hift_sine_noise"].shape[3]
    return n_mels, cfm_frames, harmonics, samples


def test_block_noise_reproduces_every_draw(parity: ParitySet, model: SeedVC) -> None:
    n_mels, cfm_frames, harmonics, samples = _draw_shapes(parity)
    assert cfm_frames == parity.geometry["cfm_T"] and samples == parity.geometry["vocoder_samples"]
    assert harmonics == model.vocoder.config.nb_harmonics + 1
    generator = torch.Generator().manual_seed(parity.bundle["stream_seed"])
    for k in _blocks(parity):
        noise = draw_block_noise(generator, n_mels, cfm_frames, harmonics, samples)
        parity.assert_close("rng_cfm_z", noise.cfm[None], kind="stage", index=k)
        parity.assert_close("rng_hift_phase_u", noise.phase_u[None], kind="stage", index=k)
        parity.assert_close("rng_hift_sine_noise", noise.sine_noise[None], kind="stage", index=k)


def test_block_noise_order_and_fourth_draw(parity: ParitySet) -> None:
    n_mels, cfm_frames, harmonics, samples = _draw_shapes(parity)
    seed = parity.bundle["stream_seed"]
    # By hand, in the contracted order: the first three draws are the shipped ones ...
    by_hand = torch.Generator().manual_seed(seed)
    parity.assert_close("rng_cfm_z", torch.randn((1, n_mels, cfm_frames), generator=by_hand), "stage", index=0)
    parity.assert_close("rng_hift_phase_u", torch.rand((1, harmonics, 1), generator=by_hand), "stage", index=0)
    sine = torch.randn((1, harmonics, samples), generator=by_hand)
    parity.assert_close("rng_hift_sine_noise", sine, kind="stage", index=0)
    # ... and the fourth, drawn from the generator those three advanced, is the shipped noise-branch draw.
    source = torch.randn((1, samples, 1), generator=by_hand)
    parity.assert_close("rng_hift_source_noise_blk0", source[None], kind="stage")

    # draw_block_noise consumes exactly these four draws: it leaves its generator where the hand-drawn one is.
    drawn = torch.Generator().manual_seed(seed)
    draw_block_noise(drawn, n_mels, cfm_frames, harmonics, samples)
    assert torch.equal(drawn.get_state(), by_hand.get_state())


# --- geometry --------------------------------------------------------------------------------------------------------


def test_geometry_from_settings(parity: ParitySet, model: SeedVC) -> None:
    expected = parity.geometry
    assert (model.sample_rate, model.config.mel.hop_length) == (expected["sr"], expected["hop_length"])
    geometry = StreamGeometry.from_settings(stream_settings(parity), expected["sr"], expected["hop_length"])
    actual = {
        "block_frame": geometry.block,
        "block_frame_16k": geometry.block_16k,
        "sola_buffer_frame": geometry.sola_buffer,
        "sola_search_frame": geometry.sola_search,
        "extra_frame": geometry.extra,
        "extra_frame_right": geometry.extra_right,
        "input_wav_res_len": geometry.window_16k,
        "skip_head": geometry.skip_head,
        "skip_tail": geometry.skip_tail,
        "return_length": geometry.return_length,
        "ce_dit_frame_difference": geometry.dit_cut,
        "target_lengths": geometry.mel_frames,
        "infer_wav_len": geometry.infer_length,
        "tail_len": geometry.tail,
        "vocoder_samples": geometry.vocoder_samples,
    }
    assert actual == {name: expected[name] for name in actual}
