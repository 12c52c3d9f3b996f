"""Real-time stream settings and the block geometry derived from them.

One content frame is 20 ms (`zc` = rate // 50 samples at the model rate); every duration is rounded to whole content
frames, as upstream's real-time GUI does. The 16 kHz rolling window the content encoder sees is, oldest first:

    [ content-encoder left context | crossfade | SOLA search | block | lookahead ]

Only the last `dit_context` seconds of left context (plus the rest) reach the DiT; the content encoder sees all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTENT_RATE = 16_000  # the content encoder's input rate
CONTENT_FRAMES_PER_SECOND = 50
SAMPLES_PER_CONTENT_FRAME_16K = CONTENT_RATE // CONTENT_FRAMES_PER_SECOND  # 320: the encoder's total stride


# Upstream's real-time GUI names of the stream settings (as parity bundles carry them) -> StreamSettings fields.
UPSTREAM_SETTING_NAMES = {
    "block_time": "block_time",
    "crossfade_time": "crossfade_time",
    "extra_time_ce": "ce_context",
    "extra_time": "dit_context",
    "extra_time_right": "lookahead",
    "diffusion_steps": "diffusion_steps",
    "inference_cfg_rate": "cfg_rate",
    "max_prompt_length": "max_prompt",
}


class SettingsError(ValueError):
    """Stream settings that are out of range or contradict each other."""


@dataclass(frozen=True)
class StreamSettings:
    """What a user can set per stream. Defaults: upstream README's real-time settings for the tiny model."""

    block_time: float = 0.18  # seconds of audio per block
    crossfade_time: float = 0.04
    ce_context: float = 2.5  # content-encoder left context (upstream: extra_time_ce)
    dit_context: float = 0.5  # DiT left context (upstream: extra_time)
    lookahead: float = 0.02  # right context (upstream: extra_time_right)
    diffusion_steps: int = 10
    cfg_rate: float = 0.7
    max_prompt: float = 3.0  # seconds of reference used as the prompt

    def __post_init__(self) -> None:
        checks = [
            (self.block_time >= 0.02, "block time must be at least one 20 ms content frame"),
            (self.crossfade_time >= 0.02, "crossfade must be at least 0.02 s"),
            (self.ce_context >= 0, "content-encoder context must not be negative"),
            (self.dit_context >= 0, "DiT context must not be negative"),
            (self.lookahead >= 0.02, "lookahead must be at least 0.02 s (one content frame)"),
            (
                self.dit_context <= self.ce_context,
                f"DiT context ({self.dit_context} s) cannot exceed the content-encoder context "
                f"({self.ce_context} s): the DiT only sees frames the content encoder produced",
            ),
            (1 <= self.diffusion_steps <= 200, "diffusion steps must be between 1 and 200"),
            (0 <= self.cfg_rate <= 10, "cfg rate must be between 0 and 10"),
            (1.0 <= self.max_prompt <= 30.0, "max prompt must be between 1 and 30 s"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise SettingsError("; ".join(problems))


def _frames(seconds: float, zc: int, rate: int) -> int:
    """Seconds -> samples at the model rate, rounded to whole content frames (numpy round-half-even)."""
    return int(np.round(seconds * rate / zc)) * zc


@dataclass(frozen=True)
class StreamGeometry:
    """Sample and frame counts of one block, all derived from settings, model rate and mel hop."""

    rate: int  # model (output) rate
    hop: int  # mel hop at the model rate
    zc: int  # samples per content frame at the model rate
    block: int  # output samples per block (model rate)
    block_16k: int  # input samples per block (16 kHz)
    sola_buffer: int  # crossfade length
    sola_search: int
    extra: int  # content-encoder left context (model rate samples)
    extra_right: int  # lookahead (model rate samples)
    window_16k: int  # rolling window the content encoder sees
    skip_head: int  # content frames of left context
    skip_tail: int  # content frames of lookahead
    return_length: int  # content frames that become output (block + crossfade + search)
    dit_cut: int  # content frames dropped before the DiT (ce_context - dit_context)
    mel_frames: int  # N: mel frames generated per block

    @classmethod
    def from_settings(cls, settings: StreamSettings, rate: int, hop: int) -> StreamGeometry:
        zc = rate // CONTENT_FRAMES_PER_SECOND
        block = _frames(settings.block_time, zc, rate)
        crossfade = _frames(settings.crossfade_time, zc, rate)
        sola_buffer = min(crossfade, 4 * zc)
        sola_search = zc
        extra = _frames(settings.ce_context, zc, rate)
        extra_right = _frames(settings.lookahead, zc, rate)
        window = extra + crossfade + sola_search + block + extra_right
        skip_head = extra // zc
        skip_tail = extra_right // zc
        return_length = (block + sola_buffer + sola_search) // zc
        dit_cut = int((settings.ce_context - settings.dit_context) * CONTENT_FRAMES_PER_SECOND)
        # Upstream evaluates this in float arithmetic with a floor division; keep the same expression.
        mel_frames = int((skip_head + return_length + skip_tail - dit_cut) / 50 * rate // hop)
        return cls(
            rate=rate,
            hop=hop,
            zc=zc,
            block=block,
            block_16k=SAMPLES_PER_CONTENT_FRAME_16K * block // zc,
            sola_buffer=sola_buffer,
            sola_search=sola_search,
            extra=extra,
            extra_right=extra_right,
            window_16k=SAMPLES_PER_CONTENT_FRAME_16K * window // zc,
            skip_head=skip_head,
            skip_tail=skip_tail,
            return_length=return_length,
            dit_cut=dit_cut,
            mel_frames=mel_frames,
        )

    @property
    def output_region_16k(self) -> int:
        """The newest part of the 16 kHz window that becomes this block's output: all but the left context."""
        return self.window_16k - SAMPLES_PER_CONTENT_FRAME_16K * self.extra // self.zc

    @property
    def vocoder_samples(self) -> int:
        return self.mel_frames * self.hop

    @property
    def tail(self) -> int:
        """Vocoder samples at the end that belong to the lookahead and are dropped."""
        return self.skip_tail * self.zc

    @property
    def infer_length(self) -> int:
        """Vocoder samples handed to SOLA: block + crossfade + search."""
        return self.return_length * self.zc

    @property
    def delay(self) -> int:
        """Model-rate samples by which the output lags the input (lookahead, crossfade and SOLA search)."""
        return self.extra_right + self.sola_buffer + self.sola_search

    @property
    def flush_blocks(self) -> int:
        """Blocks of silence to feed after the input ends so that its last samples reach the output."""
        return -(-self.delay // self.block)

    def check_vocoder(self, samples_per_frame: int) -> None:
        if self.mel_frames * samples_per_frame < self.infer_length + self.tail:
            raise SettingsError(
                f"the DiT context is too short: {self.mel_frames} mel frames give "
                f"{self.mel_frames * samples_per_frame} samples, the block needs {self.infer_length + self.tail}"
            )
