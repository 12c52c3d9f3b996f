"""Chunker: exact chunks in order, a bounded remainder, zero-padded flush, for numpy and torch samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.audio.framing import Chunker


def test_chunks_come_out_whole_and_in_order_whatever_the_push_sizes() -> None:
    chunker: Chunker[np.ndarray] = Chunker(4)
    signal = np.arange(23, dtype=np.float32)
    chunks: list[np.ndarray] = []
    start = 0
    for size in [1, 0, 3, 4, 9, 2, 4]:
        chunks += chunker.push(signal[start : start + size])
        start += size
        assert chunker.pending < 4
    assert all(chunk.shape == (4,) and chunk.dtype == np.float32 for chunk in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), signal[:20])
    assert chunker.pending == 3
    np.testing.assert_array_equal(chunker.flush_padded(), [20, 21, 22, 0])
    assert chunker.pending == 0
    assert chunker.flush_padded() is None


def test_exact_multiples_leave_nothing_pending() -> None:
    chunker: Chunker[np.ndarray] = Chunker(3)
    assert len(chunker.push(np.ones(6))) == 2
    assert chunker.pending == 0
    assert chunker.flush_padded() is None
    assert chunker.push(np.ones(2)) == []
    assert chunker.pending == 2


def test_torch_samples_give_torch_chunks() -> None:
    chunker: Chunker[torch.Tensor] = Chunker(960)
    chunks = chunker.push(torch.ones(2000))
    assert [type(chunk) for chunk in chunks] == [torch.Tensor, torch.Tensor]
    assert chunker.pending == 80
    padded = chunker.flush_padded()
    assert padded is not None and padded.dtype == torch.float32
    assert torch.equal(padded, torch.cat([torch.ones(80), torch.zeros(880)]))


def test_chunks_do_not_share_memory_with_the_pushed_array() -> None:
    chunker: Chunker[np.ndarray] = Chunker(2)
    received = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    (chunk,) = chunker.push(received)
    received[:] = 0  # a caller reusing its receive buffer
    np.testing.assert_array_equal(chunk, [1.0, 2.0])
    np.testing.assert_array_equal(chunker.flush_padded(), [3.0, 0.0])


def test_refuses_mixed_kinds_and_shapes() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Chunker(0)
    chunker: Chunker[np.ndarray] = Chunker(4)
    with pytest.raises(ValueError, match=r"expected \(n,\) samples, got shape \(2, 3\)"):
        chunker.push(np.zeros((2, 3)))
    chunker.push(np.zeros(1, dtype=np.float32))
    with pytest.raises(TypeError, match="holds ndarray float32 samples, got ndarray float64"):
        chunker.push(np.zeros(1, dtype=np.float64))
    with pytest.raises(TypeError, match=r"got Tensor torch\.float32"):
        chunker.push(torch.zeros(1))  # type: ignore[arg-type]  # a Tensor, on purpose
    assert chunker.pending == 1
