"""bf16 against fp32, streamed on the parity fixture's model: bounds on the deviation, and a control that breaks them.

The fixture's source goes through `Stream` / `step_streams` for all its blocks, with the fixture's settings, stream
seed and reference, once in fp32 and once in bf16 (each a freshly loaded model). Compared (app/streaming/deviation.py):
the mean L1 of the per-block CFM mels, the largest shift of the f0 the vocoder reads from them, and the waveform SNR of
the whole output stream.

Why the waveform is compared with f0 pinned: the fixture's random f0 predictor turns bf16's mel difference (L1 1.2e-3)
into an f0 shift of up to 0.26 Hz, and the NSF source integrates f0 over the vocoder window, so the later samples move
by whole cycles. Unpinned, the bf16 stream measured -0.2 dB against fp32: as far apart as two unrelated signals
(about -3 dB), so no bound on it could catch anything, the control below included (-2.1 dB). So the bf16 run takes
each block's f0 from the fp32 run (the vocoder's `predict_f0` replaced on this test's own model), and the SNR measures
what bf16's arithmetic does to everything else: content encoder, DiT, vocoder convolutions, SOLA. The f0 path itself
is bounded through its input (mel L1) and its output (f0 shift).

CONTROL: the same bf16 run with the NSF phase accumulated in bf16 (torch.cumsum as app.model.hift sees it, patched in
this test only) must fail the SNR bound: it measured -2.1 dB.

fp16 is not tested here: on this CPU it has no fast fp16 matrix units and runs 5x slower than fp32 (the fixture
stream took 12.7 s against 2.6 s, which alone would take this module past its time budget), and `auto` never picks it
on a CPU. Measured once, for the record: mel L1 1.33e-4, f0 shift 0.024 Hz, pinned SNR 57.1 dB, unpinned 25.3 dB.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

import app.model.hift
from app.audio.files import read_audio
from app.model.seedvc import SeedVC
from app.streaming.deviation import Deviation, StreamedOutput, stream_blocks
from app.streaming.voice import prepare_voice
from bench.parity import ParitySet
from tests.settings_from_bundle import one_torch_thread, stream_settings

# Measured on the fixture (parity_a, one torch thread, a CPU with AVX512-BF16), bf16 against fp32:
#   mel L1 1.229e-3, f0 shift 0.261 Hz, waveform SNR with f0 pinned 39.1 dB (unpinned -0.2 dB).
# On an Intel Xeon with AMX: mel L1 1.227e-3, f0 shift 0.264 Hz, SNR 39.2 dB, with XLS-R's positional convolution
# kept float32 by the conversion's kernel check (app/model/precision.py: oneDNN's AMX bf16 kernel for it is wrong at
# the fixture's size); without the check, mel L1 7.6e-3 and f0 shift 1.54 Hz, and this test failed.
# Bounds: within 3 dB of the measured SNR, within 2x of the measured mel L1 and f0 shift.
BF16_MIN_SNR_DB = 36.5
BF16_MAX_MEL_L1 = 2.4e-3
BF16_MAX_F0_SHIFT_HZ = 0.5


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _source_blocks(parity: ParitySet) -> list[Tensor]:
    source = torch.from_numpy(parity.wav("source_16k"))
    size = parity.geometry["block_frame_16k"]
    count = parity.bundle["n_blocks"]
    assert source.shape[0] == count * size
    return list(source.split(size))


def _stream(parity: ParitySet, model: SeedVC) -> StreamedOutput:
    reference = read_audio(parity.root / parity.bundle["files"]["reference_22k"])
    settings = stream_settings(parity)
    voice = prepare_voice(model, reference, settings.max_prompt)
    return stream_blocks(model, voice, settings, parity.bundle["stream_seed"], _source_blocks(parity))


class _Reference:
    """The fp32 run, with the f0 its vocoder read in every block (in order)."""

    def __init__(self, parity: ParitySet) -> None:
        self.model = SeedVC.load(parity.model_dir, precision="fp32")
        self.f0: list[Tensor] = []
        predict = self.model.vocoder.predict_f0

        def recording(mel: Tensor) -> Tensor:
            f0 = predict(mel)
            self.f0.append(f0.clone())
            return f0

        self.model.vocoder.predict_f0 = recording  # type: ignore[method-assign]  # records f0 on this instance only
        self.output = _stream(parity, self.model)
        assert len(self.f0) == parity.bundle["n_blocks"]

    def pinned_f0(self) -> Callable[[Tensor], Tensor]:
        """A `predict_f0` that hands back the fp32 run's f0, block by block."""
        blocks = iter(self.f0)

        def pinned(mel: Tensor) -> Tensor:
            f0 = next(blocks)
            assert f0.shape == (mel.shape[0], mel.shape[-1]), "the pinned f0 must belong to this block"
            return f0

        return pinned


@pytest.fixture(scope="module")
def reference(parity: ParitySet) -> _Reference:
    return _Reference(parity)


def _bf16_run(parity: ParitySet, reference: _Reference) -> StreamedOutput:
    model = SeedVC.load(parity.model_dir, precision="bf16")
    model.vocoder.predict_f0 = reference.pinned_f0()  # type: ignore[method-assign, assignment]  # f0 pinned on purpose
    return _stream(parity, model)


def test_bf16_stream_stays_within_its_bounds(parity: ParitySet, reference: _Reference) -> None:
    deviation = Deviation.between(reference.model, reference.output, _bf16_run(parity, reference))
    assert deviation.mel_l1 <= BF16_MAX_MEL_L1, deviation
    assert deviation.f0_max_hz <= BF16_MAX_F0_SHIFT_HZ, deviation
    assert deviation.snr_db >= BF16_MIN_SNR_DB, deviation
    # bf16 really did compute something else (else the bounds would prove nothing).
    assert deviation.mel_l1 > 0 and math.isfinite(deviation.snr_db), deviation


class _TorchWithCumsumIn(types.ModuleType):
    """torch, except that cumsum first casts its input to `dtype` (so the running sum is rounded to it)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__("torch")
        self.calls = 0
        self._dtype = dtype

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    def cumsum(self, values: Tensor, dim: int) -> Tensor:
        self.calls += 1
        return torch.cumsum(values.to(self._dtype), dim=dim)


def test_control_nsf_phase_in_bf16_fails_the_snr_bound(
    parity: ParitySet, reference: _Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    patched = _TorchWithCumsumIn(torch.bfloat16)
    monkeypatch.setattr(app.model.hift, "torch", patched)
    control = _bf16_run(parity, reference)
    monkeypatch.undo()

    assert patched.calls == parity.bundle["n_blocks"], "the patch must reach the NSF phase cumsum of every block"
    deviation = Deviation.between(reference.model, reference.output, control)
    assert deviation.mel_l1 <= BF16_MAX_MEL_L1, "the control changes only the vocoder's phase, not the mel"
    assert deviation.snr_db < BF16_MIN_SNR_DB, f"the SNR bound does not catch a bf16 NSF phase: {deviation}"
