"""The streams the serving benchmarks send, and which of the block events coming back they count.

Shared by bench.serving_overhead, bench.load and bench.soak: input looped to a length, start times spread over one
block, and the rule that a block counts only when live packets completed its input (the padded last block and the
flush blocks, which the server cuts all at once after the end message, do not).
"""

from __future__ import annotations

import numpy as np

from app.transport.protocol import FRAME_MS
from client.stream_client import Event

# Input after the block's end that must still come from real packets (the 48 -> 16 kHz resampler's delay is well
# under one packet), so that a kept block was completed by a live packet and not by the end message's flush.
COMPLETE_MARGIN_MS = 2 * FRAME_MS


def kept_block(event: Event, block_ms: float, input_ms: float) -> bool:
    """A block event whose input was complete, with margin, before the input ended (not a padded or flush block)."""
    return event["type"] == "block" and (event["index"] + 1) * block_ms + COMPLETE_MARGIN_MS <= input_ms


def dropped_block(event: Event) -> bool:
    """A block the server dropped for falling behind: answered with silence, reported with latency 0 (live.py)."""
    return bool(event["silent"]) and event["latency_ms"] == 0.0 and event["queue_ms"] == 0.0


def phases(streams: int, block_s: float, aligned: bool) -> list[float]:
    """When each stream sends its first packet, after the common start: spread evenly over one block, or all at 0."""
    return [0.0 if aligned else index * block_s / streams for index in range(streams)]


def looped(audio: np.ndarray, seconds: float, rate: int) -> np.ndarray:
    """The audio repeated to exactly `seconds`."""
    samples = int(seconds * rate)
    return np.tile(audio, -(-samples // audio.size))[:samples].astype(np.float32)
