"""StreamingResampler against torchaudio's offline resampler: same samples, same length, minimal delay, low cost."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import torch
import torchaudio

from app.audio.stream_resample import StreamingResampler

# (from_rate, to_rate) -> delay_in_samples: the kernel half-width torchaudio uses for the pair.
DELAYS = {(48000, 16000): 19, (22050, 48000): 7, (16000, 48000): 7, (48000, 22050): 14}
RATES = list(DELAYS)
CHUNKINGS = {"7": [7], "960": [960], "1001": [1001], "mixed": [7, 960, 1001, 1, 333]}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Streams are resampled with one torch intra-op thread (see the module docstring: the default pool stalls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise(samples: int, seed: int = 0) -> torch.Tensor:
    return 0.3 * torch.randn(samples, generator=torch.Generator().manual_seed(seed))


def stream(resampler: StreamingResampler, signal: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    outputs, start = [], 0
    for size in itertools.cycle(sizes):
        if start >= len(signal):
            break
        outputs.append(resampler.push(signal[start : start + size]))
        start += size
    return [*outputs, resampler.flush()]


@pytest.mark.parametrize("rates", RATES, ids=lambda r: f"{r[0]}-{r[1]}")
@pytest.mark.parametrize("chunking", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_streamed_output_equals_the_offline_resampler(rates: tuple[int, int], chunking: list[int]) -> None:
    from_rate, to_rate = rates
    signal = noise(from_rate + 123)  # not a whole number of periods: the end is handled as offline
    expected = torchaudio.functional.resample(signal, from_rate, to_rate)
    streamed = torch.cat(stream(StreamingResampler(from_rate, to_rate), signal, chunking))
    assert streamed.shape == expected.shape
    # Edges included: the stream starts and ends with the same zero padding as the offline call.
    torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rates", RATES, ids=lambda r: f"{r[0]}-{r[1]}")
def test_each_output_is_released_as_soon_as_its_input_has_arrived(rates: tuple[int, int]) -> None:
    from_rate, to_rate = rates
    resampler = StreamingResampler(from_rate, to_rate)
    delay = resampler.delay_in_samples
    assert delay == DELAYS[rates]
    released = 0
    for received, sample in enumerate(noise(2 * from_rate // 50), start=1):
        released += len(resampler.push(sample.reshape(1)))
        # Output m sits at input time m * from / to and needs `delay` more input samples.
        assert released == ((received - delay) * to_rate // from_rate + 1 if received >= delay else 0)


@pytest.mark.parametrize("rates", RATES, ids=lambda r: f"{r[0]}-{r[1]}")
def test_signal_shorter_than_the_delay_and_empty_stream(rates: tuple[int, int]) -> None:
    from_rate, to_rate = rates
    resampler = StreamingResampler(from_rate, to_rate)
    assert len(resampler.flush()) == 0
    signal = noise(5)
    streamed = torch.cat([resampler.push(signal), resampler.flush()])
    torch.testing.assert_close(streamed, torchaudio.functional.resample(signal, from_rate, to_rate), rtol=0, atol=1e-6)


def test_flush_resets_for_a_new_stream() -> None:
    resampler = StreamingResampler(48000, 22050)
    first = torch.cat(stream(resampler, noise(5000, seed=1), [960]))
    second = torch.cat(stream(resampler, noise(5000, seed=2), [960]))
    torch.testing.assert_close(first, torchaudio.functional.resample(noise(5000, seed=1), 48000, 22050))
    torch.testing.assert_close(second, torchaudio.functional.resample(noise(5000, seed=2), 48000, 22050))


def test_equal_rates_pass_samples_through() -> None:
    resampler = StreamingResampler(48000, 48000)
    signal = noise(100)
    assert resampler.delay_in_samples == 0
    assert torch.equal(resampler.push(signal), signal)
    assert len(resampler.flush()) == 0


def test_refuses_what_it_cannot_stream() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        StreamingResampler(0, 16000)
    resampler = StreamingResampler(48000, 16000)
    with pytest.raises(ValueError, match=r"expected \(n,\) float32 samples, got \(1, 960\)"):
        resampler.push(torch.zeros(1, 960))
    with pytest.raises(ValueError, match=r"torch\.float64"):
        resampler.push(torch.zeros(960, dtype=torch.float64))


@pytest.mark.parametrize("rates", RATES, ids=lambda r: f"{r[0]}-{r[1]}")
def test_a_20ms_chunk_costs_well_under_a_millisecond(rates: tuple[int, int]) -> None:
    from_rate, to_rate = rates
    resampler = StreamingResampler(from_rate, to_rate)
    chunks = noise(from_rate * 3).reshape(-1, from_rate // 50)  # 150 chunks of 20 ms
    costs = []
    for chunk in chunks:
        started = time.perf_counter()
        resampler.push(chunk)
        costs.append(time.perf_counter() - started)
    # Median ~50 us measured on 2 shared cores; the bound is broad because CI machines are noisy.
    assert sorted(costs[10:])[len(costs[10:]) // 2] < 1e-3
