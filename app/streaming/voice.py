"""Voices: reference audio -> the prompt features every block of a stream is conditioned on.

The prompt is the first `max_prompt` seconds of the reference. Its mel (at the model rate) is what the CFM
continues; its content features, stretched to the mel's length, are the prompt condition; CAMPPlus on its 16 kHz
fbank gives the style vector. Prompts are never padded or looped: their length is the voice's own.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from app.audio.files import Audio, AudioError, check_samples, resample
from app.model.campplus import speaker_fbank
from app.model.seedvc import SeedVC
from app.streaming.settings import CONTENT_RATE

MIN_REFERENCE_SECONDS = 1.0


@dataclass(frozen=True)
class Voice:
    prompt_mel: Tensor  # (n_mels, P)
    prompt_condition: Tensor  # (P, content_dim)
    style: Tensor  # (style_dim,)

    @property
    def prompt_frames(self) -> int:
        return int(self.prompt_mel.shape[-1])


@dataclass(frozen=True)
class PromptAudio:
    at_model_rate: Tensor  # (n,) for the mel
    at_16k: Tensor  # (m,) for the content encoder and the fbank


def prompt_audio(reference: Audio, model_rate: int, max_prompt: float) -> PromptAudio:
    """Crop the reference to the prompt and bring it to both rates, resampling only what is not there yet.

    Upstream crops at the model rate and resamples that crop to 16 kHz; a 16 kHz reference is used as is.
    """
    check_samples(reference.samples, "the reference")
    if reference.seconds < MIN_REFERENCE_SECONDS:
        raise AudioError(
            f"the reference is {reference.seconds:.2f} s long; a voice needs at least {MIN_REFERENCE_SECONDS:.0f} s"
        )
    samples = torch.from_numpy(reference.samples)
    if reference.rate == CONTENT_RATE:
        at_16k = samples[: int(CONTENT_RATE * max_prompt)]
        at_model_rate = resample(samples, CONTENT_RATE, model_rate)[: int(model_rate * max_prompt)]
        return PromptAudio(at_model_rate=at_model_rate, at_16k=at_16k)
    at_model_rate = resample(samples, reference.rate, model_rate)[: int(model_rate * max_prompt)]
    return PromptAudio(at_model_rate=at_model_rate, at_16k=resample(at_model_rate, model_rate, CONTENT_RATE))


@torch.inference_mode()
def prepare_voice(model: SeedVC, reference: Audio, max_prompt: float) -> Voice:
    prompt = prompt_audio(reference, model.sample_rate, max_prompt)
    device = model.device
    at_16k = prompt.at_16k.to(device)
    prompt_mel = model.mel(prompt.at_model_rate.to(device)[None])  # (1, n_mels, P)
    with model.compute():
        content = model.content_encoder(at_16k[None])  # (1, F, C)
    condition = model.length_regulator(content, prompt_mel.shape[-1])  # (1, P, D)
    style = model.speaker_encoder(speaker_fbank(at_16k)[None])  # (1, style_dim)
    return Voice(prompt_mel=prompt_mel[0], prompt_condition=condition[0], style=style[0])


class VoiceCache:
    """Prepared voices by content hash of the reference (samples and rate) and the prompt length; LRU-bounded.

    Entries can carry labels (the voice ids they were prepared for), so that a voice deleted from the store can be
    forgotten by id; an entry goes when its last label does (two uploads of one recording share it).
    """

    def __init__(self, model: SeedVC, capacity: int = 64) -> None:
        self._model = model
        self._capacity = capacity
        self._voices: OrderedDict[str, Voice] = OrderedDict()
        self._labels: dict[str, set[str]] = {}  # entry key -> labels

    def __len__(self) -> int:
        return len(self._voices)

    @staticmethod
    def key(reference: Audio, max_prompt: float) -> str:
        digest = hashlib.sha256(reference.samples.astype("<f4").tobytes())
        digest.update(f"{reference.rate}:{max_prompt}".encode())
        return digest.hexdigest()

    def get(self, reference: Audio, max_prompt: float, label: str | None = None) -> Voice:
        key = self.key(reference, max_prompt)
        voice = self._voices.get(key)
        if voice is None:
            voice = prepare_voice(self._model, reference, max_prompt)
            self._voices[key] = voice
            if len(self._voices) > self._capacity:
                evicted, _ = self._voices.popitem(last=False)
                self._labels.pop(evicted, None)
        else:
            self._voices.move_to_end(key)
        if label is not None:
            self._labels.setdefault(key, set()).add(label)
        return voice

    def labels(self) -> set[str]:
        return set().union(*self._labels.values())

    def forget(self, label: str) -> None:
        """Drop `label` from every entry, and every entry left without a label."""
        for key, labels in list(self._labels.items()):
            labels.discard(label)
            if not labels:
                del self._labels[key]
                self._voices.pop(key, None)
