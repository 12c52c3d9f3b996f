"""Cutting a stream of sample arrays of any length into fixed-size chunks (20 ms codec frames, model blocks)."""

from __future__ import annotations

from typing import Generic, TypeVar

import numpy as np
import torch

# One Chunker handles one kind of array; its chunks are of the kind that was pushed.
Samples = TypeVar("Samples", np.ndarray, torch.Tensor)


def _concat(first: Samples, second: Samples) -> Samples:
    if isinstance(first, torch.Tensor):
        return torch.cat((first, second))
    return np.concatenate((first, second))


def _copy(samples: Samples) -> Samples:
    if isinstance(samples, torch.Tensor):
        return samples.clone()
    return samples.copy()


def _zeros(like: Samples, count: int) -> Samples:
    if isinstance(like, torch.Tensor):
        return torch.zeros(count, dtype=like.dtype, device=like.device)
    return np.zeros(count, dtype=like.dtype)


class Chunker(Generic[Samples]):
    """Returns every complete chunk of `size` samples, in order, and holds fewer than `size` samples between pushes.

    Chunks never share memory with the arrays pushed, so callers may reuse their receive buffers.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"chunk size must be positive, got {size}")
        self.size = size
        self._pending: Samples | None = None

    @property
    def pending(self) -> int:
        """Samples buffered towards the next chunk (always fewer than `size`)."""
        return 0 if self._pending is None else len(self._pending)

    def push(self, samples: Samples) -> list[Samples]:
        """Adds (n,) samples of the same array type and dtype as earlier pushes; returns the chunks now complete."""
        if samples.ndim != 1:
            raise ValueError(f"expected (n,) samples, got shape {tuple(samples.shape)}")
        if self._pending is None:
            buffered = _copy(samples)
        elif type(samples) is not type(self._pending) or samples.dtype != self._pending.dtype:
            raise TypeError(
                f"this Chunker holds {type(self._pending).__name__} {self._pending.dtype} samples, "
                f"got {type(samples).__name__} {samples.dtype}"
            )
        else:
            buffered = _concat(self._pending, samples)
        whole = len(buffered) // self.size * self.size
        chunks = [buffered[start : start + self.size] for start in range(0, whole, self.size)]
        # A copy, so that the remainder does not keep a large pushed array alive.
        self._pending = _copy(buffered[whole:]) if whole < len(buffered) else None
        return chunks

    def flush_padded(self) -> Samples | None:
        """Returns the buffered remainder zero-padded to `size` (None when nothing is buffered) and empties."""
        if self._pending is None:
            return None
        chunk = _concat(self._pending, _zeros(self._pending, self.size - len(self._pending)))
        self._pending = None
        return chunk
