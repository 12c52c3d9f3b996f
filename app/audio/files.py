"""Reading and writing audio files, and the one resampler the library uses.

Files decode through libsndfile (soundfile): WAV, FLAC, OGG (Vorbis and Opus), MP3, AIFF and more. Samples come
back as float32 in [-1, 1]; float WAVs are read bit-exact. Multi-channel audio is averaged to mono.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

SUPPORTED_FORMATS = "WAV, FLAC, OGG (Vorbis/Opus), MP3, AIFF"


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, too short, or holding NaN/Inf samples."""


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # (n,) float32 mono
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


def check_samples(samples: np.ndarray, what: str) -> None:
    if samples.size == 0:
        raise AudioError(f"{what} holds no audio samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{what} contains NaN or infinite samples")


def read_audio(path: Path) -> Audio:
    """Decode a file to mono float32 at its own rate (no resampling here)."""
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as error:
        raise AudioError(f"cannot decode {path} ({error}); supported formats: {SUPPORTED_FORMATS}") from error
    except OSError as error:
        raise AudioError(f"cannot read {path}: {error}") from error
    # Averaging keeps a mono file's samples exact (a mean over one channel is that channel).
    samples = data[:, 0].copy() if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    check_samples(samples, str(path))
    return Audio(samples=samples, rate=int(rate))


def write_audio(path: Path, samples: np.ndarray, rate: int) -> None:
    """WAV output is 32-bit float (no clipping or dithering of what the model produced)."""
    subtype = "FLOAT" if path.suffix.lower() in {".wav", ".wave"} else None
    try:
        soundfile.write(path, samples, rate, subtype=subtype)
    except (soundfile.LibsndfileError, OSError, TypeError, ValueError) as error:
        raise AudioError(f"cannot write {path}: {error}") from error


def resample(samples: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """torchaudio's default windowed-sinc resampler (upstream's choice); a no-op at equal rates."""
    if from_rate == to_rate:
        return samples
    return torchaudio.functional.resample(samples, from_rate, to_rate)
