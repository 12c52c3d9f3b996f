"""Noise suppression (the `noise_suppression` control, app/audio/denoise.py): SNR gain on speech and cost per block.

The speech is the fixture set's source utterance (eSpeak NG, tests/fixtures/parity_a), at 48 kHz as a microphone
sends it, with white noise (full band, or below 8 kHz) or babble (four copies of the fixture's other voice, each
shifted) mixed in at an input SNR. The SNR is measured against the clean speech, after lining the denoised audio up
by the suppressor's delay: at 48 kHz (what the suppressor sees) and at 16 kHz (what the model hears: the input is
resampled to 16 kHz before blocks are cut). The cost is the wall time of denoising the input 20 ms packet by 20 ms
packet, per block.

eSpeak's formant voice is not a human one, and RNNoise was trained on human speech: `--speech FILE ...` measures on
recordings instead (concatenated; the babble stays the fixture's voice). Debian's alsa-utils ships nine short
recordings of a real voice: `--speech /usr/share/sounds/alsa/{Front,Rear,Side}_*.wav`.

    python -m bench.noise_suppression [--snr 10] [--speech FILE ...] [--block-time 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from app.audio.denoise import DELAY_SAMPLES, NoiseSuppressor
from app.audio.files import resample
from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE
from app.streaming.settings import CONTENT_RATE
from bench.common import write_json
from bench.fixtures import PARITY_A_REFERENCE, PARITY_A_SOURCE


def _load_48k(path: str) -> np.ndarray:
    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    samples = samples.mean(axis=1, dtype=np.float32)  # mono, as the service hears a microphone
    return resample(torch.from_numpy(samples), rate, SAMPLE_RATE).numpy()


def fixture_speech_48k() -> np.ndarray:
    return _load_48k(str(PARITY_A_SOURCE))


def recorded_speech_48k(paths: list[Path]) -> np.ndarray:
    """The recordings one after another, each mixed down to mono."""
    return np.concatenate([_load_48k(str(path)) for path in paths])


def white_noise(length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(length).astype(np.float32)


def speech_band(noise: np.ndarray) -> np.ndarray:
    """The noise below 8 kHz only: all of it reaches the model (the 16 kHz resampler removes the rest)."""
    narrow = resample(torch.from_numpy(noise), SAMPLE_RATE, CONTENT_RATE)
    return resample(narrow, CONTENT_RATE, SAMPLE_RATE).numpy()[: len(noise)]


def babble(length: int, seed: int = 0) -> np.ndarray:
    """Four talkers at once: the fixture's reference voice, each copy starting somewhere else."""
    voice = _load_48k(str(PARITY_A_REFERENCE))
    rng = np.random.default_rng(seed)
    looped = np.tile(voice, -(-length // len(voice)) + 1)
    return np.sum([np.roll(looped, int(rng.integers(len(voice))))[:length] for _ in range(4)], axis=0)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    scale = np.sqrt(np.mean(speech**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (speech + scale * noise[: len(speech)]).astype(np.float32)


def snr_db(estimate: np.ndarray, clean: np.ndarray) -> float:
    error = (estimate - clean).astype(np.float64)
    return float(10 * np.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum(error**2)))


def denoise_packets(noisy: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The suppressor's output fed 20 ms at a time (as a stream is), lined up with its input; seconds per packet."""
    suppressor = NoiseSuppressor()
    out: list[np.ndarray] = []
    seconds: list[float] = []
    for start in range(0, len(noisy), FRAME_SAMPLES):
        began = time.perf_counter()
        out.append(suppressor.process(noisy[start : start + FRAME_SAMPLES]))
        seconds.append(time.perf_counter() - began)
    denoised = np.concatenate([*out, suppressor.flush()])
    return denoised[DELAY_SAMPLES:], seconds


def snr_gains(clean: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    """SNR in and out at 48 kHz and at 16 kHz, over the part the delay leaves comparable."""
    denoised, _ = denoise_packets(noisy)
    length = len(denoised)

    def to_16k(samples: np.ndarray) -> np.ndarray:
        return resample(torch.from_numpy(np.ascontiguousarray(samples[:length])), SAMPLE_RATE, CONTENT_RATE).numpy()

    result = {"in_48k": snr_db(noisy[:length], clean[:length]), "out_48k": snr_db(denoised, clean[:length])}
    result |= {"in_16k": snr_db(to_16k(noisy), to_16k(clean)), "out_16k": snr_db(to_16k(denoised), to_16k(clean))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", type=float, default=10.0, help="input SNR, dB")
    parser.add_argument("--speech", type=Path, nargs="+", help="recordings to use as the speech (default: the fixture)")
    parser.add_argument("--block-time", type=float, default=0.5, help="block length for the cost per block, s")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    clean = recorded_speech_48k(args.speech) if args.speech else fixture_speech_48k()
    report: dict[str, object] = {"input_snr_db": args.snr, "speech": [str(p) for p in args.speech or [PARITY_A_SOURCE]]}
    noises = {
        "white": white_noise(len(clean)),
        "white < 8 kHz": speech_band(white_noise(len(clean))),
        "babble": babble(len(clean)),
    }
    for name, noise in noises.items():
        gains = snr_gains(clean, mix_at_snr(clean, noise, args.snr))
        report[name] = gains
        print(
            f"{name:13s} SNR 48 kHz {gains['in_48k']:5.1f} -> {gains['out_48k']:5.1f} dB "
            f"(gain {gains['out_48k'] - gains['in_48k']:+.1f}); 16 kHz {gains['in_16k']:5.1f} -> "
            f"{gains['out_16k']:5.1f} dB (gain {gains['out_16k'] - gains['in_16k']:+.1f})"
        )
    _, seconds = denoise_packets(mix_at_snr(clean, white_noise(len(clean)), args.snr))
    per_packet_ms = 1000 * float(np.median(seconds))
    per_block_ms = per_packet_ms * args.block_time * 1000 / 20
    report |= {"per_20ms_packet_ms": per_packet_ms, "per_block_ms": per_block_ms, "block_time_s": args.block_time}
    print(
        f"cost: {per_packet_ms:.2f} ms per 20 ms packet (median of {len(seconds)}), {per_block_ms:.1f} ms per "
        f"{args.block_time:g} s block, {per_packet_ms / 20:.1%} of one core in real time"
    )
    if args.json:
        write_json(Path(args.json), report)


if __name__ == "__main__":
    main()
