"""Shared helpers of the model-stage and stream parity tests: a parity set's stream settings as `StreamSettings`.

bundle.json names the settings as upstream's real-time GUI does; the mapping to our names lives here only, so both
test files build their settings the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from app.streaming.settings import UPSTREAM_SETTING_NAMES, StreamSettings
from bench.parity import ParitySet

BUNDLE_TO_SETTINGS = UPSTREAM_SETTING_NAMES  # bundle.json `stream_settings` key -> StreamSettings field


def stream_settings(parity: ParitySet) -> StreamSettings:
    """The set's stream settings; a bundle key this mapping does not know is an error, not silently dropped."""
    bundle = parity.settings
    unknown = sorted(set(bundle) - set(BUNDLE_TO_SETTINGS))
    assert not unknown, f"bundle.json stream_settings has keys with no StreamSettings field: {unknown}"
    return StreamSettings(**{ours: bundle[theirs] for theirs, ours in BUNDLE_TO_SETTINGS.items()})


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, as the fixtures were generated (README section 1), then restore.

    Besides matching the reference's reduction order, this keeps the run time stable: with several OpenMP threads
    on a busy machine the tiny DiT calls spend most of their time waiting at barriers.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
