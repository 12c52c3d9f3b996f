"""How far one stream's output is from a reference run of the same stream: waveform SNR, mean mel L1, f0 shift.

Used to bound what a reduced compute precision costs (tests/test_precision.py) and to print it next to the speed it
buys (bench/precision.py). Both runs must hear the same input with the same stream seed, so that the only difference
is the arithmetic: `stream_blocks` runs one stream over all its blocks and keeps what the metrics compare.

Reading the numbers: the vocoder's NSF source integrates f0 over the whole vocoder window, so an f0 that moves by a
fraction of a hertz shifts the phase of the later samples by whole cycles. A tiny mel difference can therefore
decorrelate two waveforms that sound alike (two unrelated signals of equal power give about -3 dB); the mel L1 and
the f0 shift say whether that is what happened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from app.model.precision import full_precision
from app.model.seedvc import SeedVC
from app.streaming.settings import StreamSettings
from app.streaming.stream import Stream, step_streams
from app.streaming.voice import Voice


def snr_db(reference: Tensor, actual: Tensor) -> float:
    """Signal-to-noise ratio in dB of `actual` against `reference`: 10 log10(sum ref^2 / sum (actual - ref)^2).

    Computed in float64 over every sample. Equal signals give +inf; higher is closer. Shapes must match.
    """
    if reference.shape != actual.shape:
        raise ValueError(f"shapes differ: reference {tuple(reference.shape)}, actual {tuple(actual.shape)}")
    reference64 = reference.detach().to("cpu", torch.float64)
    error = actual.detach().to("cpu", torch.float64) - reference64
    noise = float(error.square().sum())
    signal = float(reference64.square().sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def mel_l1(reference: Tensor | Sequence[Tensor], actual: Tensor | Sequence[Tensor]) -> float:
    """Mean absolute difference between two mels (log-mel units), or two equally long lists of per-block mels."""
    if not isinstance(reference, Tensor):
        reference = torch.stack(list(reference))
    if not isinstance(actual, Tensor):
        actual = torch.stack(list(actual))
    if reference.shape != actual.shape:
        raise ValueError(f"shapes differ: reference {tuple(reference.shape)}, actual {tuple(actual.shape)}")
    difference = actual.detach().to("cpu", torch.float64) - reference.detach().to("cpu", torch.float64)
    return float(difference.abs().mean())


@torch.inference_mode()
def predicted_f0(model: SeedVC, mels: Tensor) -> Tensor:
    """The f0 in Hz (blocks, N) the vocoder reads from per-block mels (blocks, n_mels, N); always float32.

    Calls the f0 predictor module itself (kept float32 in every precision), the same computation the vocoder runs.
    """
    with full_precision(model.device):
        return model.vocoder.f0_predictor(mels.to(model.device, torch.float32)).float().cpu()


@dataclass(frozen=True)
class StreamedOutput:
    audio: Tensor  # (blocks * block,) the whole output stream at the model rate, float32, on the CPU
    mels: Tensor  # (blocks, n_mels, N) each block's CFM mel (BlockBatch.mel), float32, on the CPU


def stream_blocks(
    model: SeedVC, voice: Voice, settings: StreamSettings, seed: int, blocks_16k: Sequence[Tensor]
) -> StreamedOutput:
    """One fresh stream (`seed`) fed `blocks_16k` one step each, as a live stream would be; every block converted."""
    stream = Stream(model, voice, settings, seed=seed)
    audio, mels = [], []
    for block in blocks_16k:
        step = step_streams(model, [stream], [block])
        assert step.batch is not None, "a stream with no skipped rows converts every block"
        audio.append(step.audio[0])
        mels.append(step.batch.mel[0].detach().float().cpu())
    return StreamedOutput(audio=torch.cat(audio), mels=torch.stack(mels))


@dataclass(frozen=True)
class Deviation:
    snr_db: float  # waveform SNR of the whole output stream
    mel_l1: float  # mean |mel - reference mel| over every block's CFM mel
    f0_max_hz: float  # largest |f0 - reference f0| the vocoder reads from those mels, over every frame

    @classmethod
    def between(cls, model: SeedVC, reference: StreamedOutput, actual: StreamedOutput) -> Deviation:
        """`model` supplies the f0 predictor (float32 in every precision, so either run's model will do)."""
        f0_shift = predicted_f0(model, actual.mels) - predicted_f0(model, reference.mels)
        return cls(
            snr_db=snr_db(reference.audio, actual.audio),
            mel_l1=mel_l1(reference.mels, actual.mels),
            f0_max_hz=float(f0_shift.abs().max()),
        )
