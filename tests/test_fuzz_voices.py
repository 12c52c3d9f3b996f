"""Fuzzing voice uploads (app/voices/store.py, `VoiceStore.add`) with hypothesis.

Any bytes, real WAV/FLAC/OGG/MP3 files cut short or with bytes flipped, spliced from two formats, with any name:
`add` either returns a record whose voice reads back, or raises `VoiceError` with one of its stable reasons, and
then the store holds nothing more than before.
"""

from __future__ import annotations

import io
import tempfile
import typing
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app.auth.keystore import KEY_ID
from app.voices.store import MAX_NAME_CHARS, RATE_RANGE, VoiceError, VoiceErrorReason, VoiceLimits, VoiceStore

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REASONS = set(typing.get_args(VoiceErrorReason))
# Small limits, so that short files cross every one of them: too_large, too_short and too_long are all reachable.
LIMITS = VoiceLimits(max_bytes=120_000, min_seconds=1.0, max_seconds=2.5)
RATE = 16_000


@cache
def real_files() -> tuple[bytes, ...]:
    """Uploads as clients make them: several formats and lengths on both sides of the limits."""
    files = []
    for seconds, format, subtype in [
        (1.5, "WAV", "PCM_16"),
        (1.2, "WAV", "FLOAT"),
        (0.5, "WAV", "PCM_16"),
        (1.5, "FLAC", None),
        (3.0, "FLAC", None),
        (1.5, "OGG", "VORBIS"),
        (1.5, "OGG", "OPUS"),
        (1.5, "MP3", "MPEG_LAYER_III"),
    ]:
        rate = 48_000 if subtype == "OPUS" else RATE  # libsndfile writes Ogg Opus at 48 kHz only
        t = np.arange(round(seconds * rate)) / rate
        samples = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, rate, format=format, subtype=subtype)
        files.append(buffer.getvalue())
    return tuple(files)


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(real_files())))
    kind = draw(st.sampled_from(["truncate", "flip_header", "flip", "splice", "extend", "repeat"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind in ("flip_header", "flip"):
        # Headers (RIFF chunk sizes, FLAC STREAMINFO, Ogg page headers) are where parsers go wrong; the body next.
        end = min(len(data), 128) if kind == "flip_header" else len(data)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
    elif kind == "splice":
        other = draw(st.sampled_from(real_files()))
        data = data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=4096))
    else:
        data = data * 2
    return bytes(data)


uploads = st.one_of(st.binary(max_size=2048), mutated_files(), st.sampled_from(real_files()))
names = st.one_of(
    st.none(),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.integers(MAX_NAME_CHARS - 2, MAX_NAME_CHARS + 2).map(lambda size: "n" * size),
    st.sampled_from(["../../etc/passwd", "a/b\\c", "\x00", "CON", ".json", "x" * 10 + ".audio", "é\u202e🎤"]),
)


@pytest.fixture(scope="module")
def stores_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzzed-voices")


def files_under(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


# A float WAV with flipped bytes can hold inf and -inf: the stereo mean of the two is NaN, with numpy's warning, and
# the upload is refused as bad_samples, which is what the test checks.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@FUZZ
@given(data=uploads, name=names, owner=st.from_regex(KEY_ID, fullmatch=True))
def test_any_upload_is_a_readable_voice_or_a_voice_error(
    stores_root: Path, data: bytes, name: str | None, owner: str
) -> None:
    # A fresh store per example (a module-scoped directory: hypothesis runs many examples in one test call).
    root = Path(tempfile.mkdtemp(dir=stores_root))
    store = VoiceStore(str(root / "voices"), LIMITS)
    other = store.add(real_files()[0], owner="someone-else")  # another tenant's voice, which must stay untouched
    before = files_under(root)
    try:
        record = store.add(data, owner=owner, name=name)
    except VoiceError as error:
        event(f"refused: {error.reason}")  # in --hypothesis-show-statistics
        assert error.reason in REASONS and str(error)
        if len(data) > LIMITS.max_bytes:
            assert error.reason == "too_large"
        elif name is not None and len(name) > MAX_NAME_CHARS:
            assert error.reason == "bad_name"
        assert files_under(root) == before, "a refused upload left files behind"
    else:
        event("stored")
        assert len(data) <= LIMITS.max_bytes and (name is None or len(name) <= MAX_NAME_CHARS)
        assert LIMITS.min_seconds <= record.seconds <= LIMITS.max_seconds
        assert RATE_RANGE[0] <= record.rate <= RATE_RANGE[1]
        assert (record.owner, record.name) == (owner, name)
        # Stored means usable: the converter reads the voice back when a stream starts with it.
        assert store.get(record.voice_id) == record
        audio = store.audio(record.voice_id)
        assert audio.rate == record.rate and np.isfinite(audio.samples).all()
        stored = {f"voices/{record.voice_id}.audio", f"voices/{record.voice_id}.json", f"voices/_owners/{owner}"}
        assert files_under(root) == before | stored | {f"voices/_owners/{owner}/{record.voice_id}"}
        assert store.list(owner) == [record] or owner == "someone-else"
    assert store.get(other.voice_id) == other
