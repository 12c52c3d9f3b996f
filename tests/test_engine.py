"""The multi-session engine: batch independence, silence skip, deadline control, bounded state.

Independence is the engine's central promise: a session's output never depends on which other sessions share its
batch. It is checked against the same session run alone, block by block, with tolerances from the parity fixture.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from app.audio.files import Audio, read_audio
from app.engine.deadline import DeadlinePolicy, GroupCost, StepCostModel
from app.engine.engine import BlockRequest, BlockResult, Engine, SessionError
from app.engine.plan import ShapeBuckets
from app.engine.silence import SilenceGate
from app.model.seedvc import SeedVC
from app.streaming.settings import StreamSettings
from app.streaming.voice import Voice, prepare_voice
from bench.parity import ParitySet

MEL_TOLERANCE = 1e-5  # CFM output, batched vs alone (issue: multi-session engine)
SOLA_TIE_MARGIN = 1e-3  # offsets must agree wherever the best two scores differ by more than this


def fixture_settings(parity: ParitySet) -> StreamSettings:
    s = parity.settings
    return StreamSettings(
        block_time=s["block_time"],
        crossfade_time=s["crossfade_time"],
        ce_context=s["extra_time_ce"],
        dit_context=s["extra_time"],
        lookahead=s["extra_time_right"],
        diffusion_steps=s["diffusion_steps"],
        cfg_rate=s["inference_cfg_rate"],
        max_prompt=s["max_prompt_length"],
    )


@pytest.fixture(scope="module")
def reference(parity: ParitySet) -> Audio:
    return read_audio(parity.root / parity.bundle["files"]["reference_22k"])


@pytest.fixture(scope="module")
def source(parity: ParitySet) -> torch.Tensor:
    return torch.from_numpy(parity.wav("source_16k"))


@dataclass(frozen=True)
class Plan:
    """One session of the independence test: when it joins and leaves, and what it streams."""

    name: str
    voice: Voice
    settings: StreamSettings
    seed: int
    join: int  # engine step at which it sends its first block
    blocks: list[torch.Tensor]


def run_alone(model: SeedVC, plan: Plan) -> list[BlockResult]:
    engine = Engine(model)
    engine.open(plan.name, plan.voice, plan.settings, plan.seed)
    return [engine.step([BlockRequest(plan.name, block)]).results[0] for block in plan.blocks]


def run_together(
    model: SeedVC, plans: list[Plan], buckets: ShapeBuckets | None = None
) -> tuple[dict[str, list[BlockResult]], list[list[int]]]:
    engine = Engine(model, buckets=buckets)
    results: dict[str, list[BlockResult]] = {plan.name: [] for plan in plans}
    group_sizes = []
    last_step = max(plan.join + len(plan.blocks) for plan in plans)
    for step in range(last_step):
        requests = []
        for plan in plans:
            index = step - plan.join
            if index == 0:
                engine.open(plan.name, plan.voice, plan.settings, plan.seed)
            if 0 <= index < len(plan.blocks):
                requests.append(BlockRequest(plan.name, plan.blocks[index]))
            elif index == len(plan.blocks):
                engine.close(plan.name)
        report = engine.step(requests)
        group_sizes.append(report.group_sizes)
        for result in report.results:
            results[result.session_id].append(result)
    return results, group_sizes


def source_blocks(source: torch.Tensor, size: int, count: int, shift: int) -> list[torch.Tensor]:
    rolled = torch.roll(source, shift)
    return [rolled[(k * size) % (len(rolled) - size) :][:size].clone() for k in range(count)]


# With buckets every pass is padded to static rows and prompt frames (the GPU's shapes): padding rows are inert.
@pytest.mark.parametrize("buckets", [None, ShapeBuckets((1, 2, 4, 8), prompt_step=64)], ids=["unpadded", "bucketed"])
def test_sessions_are_independent_of_their_batch(
    parity: ParitySet, model: SeedVC, reference: Audio, source: torch.Tensor, buckets: ShapeBuckets | None
) -> None:
    settings = fixture_settings(parity)
    block = parity.geometry["block_frame_16k"]
    n_blocks = parity.bundle["n_blocks"]
    fixture_voice = prepare_voice(model, reference, settings.max_prompt)
    # Different voices have different prompt lengths: the CFM rows are right-padded and masked.
    prompt_seconds = [1.0, 1.3, 1.7, 2.2, 2.6, 2.9]
    plans = [Plan("fixture", fixture_voice, settings, parity.bundle["stream_seed"], 0, list(source.split(block)))]
    for number, seconds in enumerate(prompt_seconds):
        voice = prepare_voice(model, reference, seconds)
        plans.append(
            Plan(
                f"s{number}",
                voice,
                replace(settings, max_prompt=seconds),
                100 + number,
                join=number % 4,
                blocks=source_blocks(source, block, 6 + number % 5, shift=997 * (number + 1)),
            )
        )
    # One session with another block size coexists in its own group.
    other = replace(settings, block_time=2 * settings.block_time)
    other_block = round(block * other.block_time / settings.block_time)
    plans.append(Plan("other", fixture_voice, other, 7, 2, source_blocks(source, other_block, 5, shift=31)))
    assert len({plan.voice.prompt_frames for plan in plans}) >= 6

    together, group_sizes = run_together(model, plans, buckets)
    assert max(max(sizes) for sizes in group_sizes) >= 6, "sessions were not batched together"
    assert any(len(sizes) == 2 for sizes in group_sizes), "the other block size did not form its own group"

    wave_atol = parity.tolerance("blk_vocoder_wave", "e2e")
    for plan in plans:
        alone = run_alone(model, plan)
        assert len(together[plan.name]) == len(alone) == len(plan.blocks)
        for mine, solo in zip(together[plan.name], alone, strict=True):
            assert mine.detail is not None and solo.detail is not None
            where = f"{plan.name} block {mine.block_index}"
            assert (mine.detail.mel - solo.detail.mel).abs().max() <= MEL_TOLERANCE, where
            assert (mine.detail.wave - solo.detail.wave).abs().max() <= wave_atol, where
            top2 = solo.detail.sola_scores.topk(2).values
            if top2[0] - top2[1] > SOLA_TIE_MARGIN:
                assert mine.detail.sola_offset == solo.detail.sola_offset, where

    # And the fixture's stream, batched with strangers, still matches upstream.
    streamed = torch.cat([result.audio for result in together["fixture"]])
    assert len(together["fixture"]) == n_blocks
    parity.assert_close("output_stream", streamed, kind="e2e")


def test_silent_blocks_skip_the_model_but_stay_in_step(
    parity: ParitySet, model: SeedVC, reference: Audio, source: torch.Tensor
) -> None:
    settings = replace(fixture_settings(parity), diffusion_steps=2)
    voice = prepare_voice(model, reference, settings.max_prompt)
    block = parity.geometry["block_frame_16k"]
    speech = list(source.split(block))
    silence = [torch.zeros(block)] * 24  # long enough for the whole output region to fall silent
    engine = Engine(model)
    engine.open("gated", voice, settings, seed=1, gate=SilenceGate())
    engine.open("plain", voice, settings, seed=1)
    results: dict[str, list[BlockResult]] = {"gated": [], "plain": []}
    for chunk in speech[:6] + silence + speech[6:10]:
        report = engine.step([BlockRequest("gated", chunk), BlockRequest("plain", chunk)])
        for result in report.results:
            results[result.session_id].append(result)
    gated = results["gated"]
    assert not any(r.silent for r in gated[:6]), "speech was gated"
    skipped = [r for r in gated if r.silent]
    assert len(skipped) >= 10, "long silence was not skipped"
    assert all(r.steps_used == 0 and r.detail is None and not r.audio.any() for r in skipped)
    assert not any(r.silent for r in results["plain"])
    # The generator drew the same numbers as the ungated twin, and the window advanced the same.
    gated_stream, plain_stream = engine.session("gated").stream, engine.session("plain").stream
    assert torch.equal(gated_stream.generator.get_state(), plain_stream.generator.get_state())
    assert torch.equal(gated_stream.window, plain_stream.window)
    # Speech after the silence is converted again and starts from a silent crossfade tail.
    assert not gated[-1].silent and gated[-1].audio.abs().max() > 0


def test_deadline_lowers_steps_to_the_floor_and_reports_it(
    parity: ParitySet, model: SeedVC, reference: Audio, source: torch.Tensor
) -> None:
    settings = replace(fixture_settings(parity), diffusion_steps=6)
    voice = prepare_voice(model, reference, settings.max_prompt)
    block = parity.geometry["block_frame_16k"]
    engine = Engine(model, DeadlinePolicy(min_steps=2))
    engine.open("a", voice, settings, seed=1)
    first = engine.step([BlockRequest("a", source[:block])], budget_seconds=1e-9)
    assert first.results[0].steps_used == 6, "with nothing measured yet the step runs as configured"
    squeezed = engine.step([BlockRequest("a", source[block : 2 * block])], budget_seconds=1e-9)
    assert squeezed.results[0].steps_used == 2
    relaxed = engine.step([BlockRequest("a", source[2 * block : 3 * block])], budget_seconds=1e9)
    assert relaxed.results[0].steps_used == 6
    default = Engine(model)
    default.open("b", voice, settings, seed=1)
    default.step([BlockRequest("b", source[:block])], budget_seconds=1e-9)
    assert default.step([BlockRequest("b", source[:block])], budget_seconds=1e-9).results[0].steps_used == 6


def test_step_cost_model_cuts_evenly_to_fit_the_budget() -> None:
    costs = StepCostModel(DeadlinePolicy(min_steps=3))
    costs.observe("x", rows=2, steps=10, stage_seconds={"content_encoder": 0.2, "cfm": 2.0})  # 0.1 s/step/row
    costs.observe("y", rows=1, steps=10, stage_seconds={"vocoder": 0.1, "cfm": 1.0})
    x, y = GroupCost("x", 2, 10), GroupCost("y", 1, 10)
    # Configured: 0.2 + 0.1 + 3 rows * 10 steps * 0.1 = 3.3 s.
    assert costs.projected_seconds(x) == pytest.approx(2.2)
    assert costs.choose_steps([x, y], budget_seconds=4.0) == [10, 10]
    assert costs.choose_steps([x, y], budget_seconds=2.4) == [7, 7]
    assert costs.choose_steps([x, y], budget_seconds=0.0) == [3, 3]
    assert StepCostModel(DeadlinePolicy(min_steps=3)).choose_steps([x], 0.0) == [10], "nothing measured: as configured"


def test_a_shape_never_measured_is_projected_from_the_costliest_measured_rate() -> None:
    costs = StepCostModel(DeadlinePolicy(min_steps=2))
    costs.observe("small", rows=1, steps=4, stage_seconds={"vocoder": 0.1, "cfm": 0.4}, work=10)  # 0.01/0.01 per work
    costs.observe("dense", rows=1, steps=4, stage_seconds={"vocoder": 0.3, "cfm": 0.4}, work=10)  # 0.03/0.01
    unseen = GroupCost("big", rows=1, steps=4, work=20)
    assert costs.projected_seconds(unseen) == pytest.approx(20 * 0.03 + 4 * 20 * 0.01)  # 1.4 s
    assert costs.choose_steps([unseen], budget_seconds=1.0) == [2], "its first step is bounded, not run blind"


def test_state_stays_bounded_and_closing_frees_it(
    parity: ParitySet, model: SeedVC, reference: Audio, source: torch.Tensor
) -> None:
    settings = replace(fixture_settings(parity), diffusion_steps=1, cfg_rate=0.0)
    voice = prepare_voice(model, reference, settings.max_prompt)
    block = parity.geometry["block_frame_16k"]
    blocks = list(source.split(block))
    engine = Engine(model, DeadlinePolicy(min_steps=1))
    names = [f"s{i}" for i in range(4)]
    for number, name in enumerate(names):
        engine.open(name, voice, settings, seed=number)

    def sizes() -> list[int]:
        state = []
        for name in names:
            stream = engine.session(name).stream
            state += [stream.window.numel(), stream.tail.numel(), stream.generator.get_state().numel()]
        return [*state, len(engine), len(engine.costs or [])]

    def run(steps: int) -> None:
        for step in range(steps):
            engine.step([BlockRequest(name, blocks[(step + i) % len(blocks)]) for i, name in enumerate(names)], 0.05)

    run(5)  # warm-up
    before = sizes()
    run(200)
    assert sizes() == before
    assert all(engine.session(name).stream.blocks_done == 205 for name in names)
    stream_ref = weakref.ref(engine.session("s0").stream)
    for name in names:
        engine.close(name)
    gc.collect()
    assert len(engine) == 0 and stream_ref() is None


def test_requests_are_checked(parity: ParitySet, model: SeedVC, reference: Audio) -> None:
    settings = fixture_settings(parity)
    voice = prepare_voice(model, reference, settings.max_prompt)
    engine = Engine(model)
    engine.open("a", voice, settings, seed=0)
    block = torch.zeros(parity.geometry["block_frame_16k"])
    with pytest.raises(ValueError, match="already open"):
        engine.open("a", voice, settings, seed=0)
    with pytest.raises(ValueError, match="at most one block per session"):
        engine.step([BlockRequest("a", block), BlockRequest("a", block)])
    with pytest.raises(SessionError):
        engine.step([BlockRequest("nobody", block)])
    engine.close("nobody")  # closing twice or racing a loss is harmless
    assert np.isfinite(engine.step([BlockRequest("a", block)]).results[0].audio.numpy()).all()
