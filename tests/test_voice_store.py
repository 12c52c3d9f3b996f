from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import soundfile
from fsspec.implementations.memory import MemoryFileSystem

from app.voices.store import VOICE_ID, VoiceError, VoiceLimits, VoiceNotFound, VoiceStore


def recording(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def encode(samples: np.ndarray, rate: int = 16_000, format: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=format, subtype=subtype)
    return buffer.getvalue()


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "voices")  # not created yet: the store creates it on the first add
        return
    # The memory filesystem is one per process, so each test gets its own root and removes it afterwards.
    url = f"memory://voices-{uuid.uuid4().hex}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def store(root: str) -> VoiceStore:
    return VoiceStore(root)


def rejected(store: VoiceStore, data: bytes) -> VoiceError:
    with pytest.raises(VoiceError) as caught:
        store.add(data, owner="team-a")
    return caught.value


# Adding


@pytest.mark.parametrize(("format", "subtype"), [("WAV", "PCM_16"), ("FLAC", None), ("OGG", "VORBIS")])
def test_add_and_read_back(store: VoiceStore, format: str, subtype: str | None) -> None:
    samples = recording(2.0)
    record = store.add(encode(samples, format=format, subtype=subtype), owner="team-a", name="Alice")
    assert VOICE_ID.fullmatch(record.voice_id)
    assert record.owner == "team-a" and record.name == "Alice"
    assert record.rate == 16_000 and record.seconds == pytest.approx(2.0, abs=0.01)
    assert store.get(record.voice_id) == record
    audio = store.audio(record.voice_id)
    assert audio.rate == 16_000 and audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert len(audio.samples) == len(samples)
    if format == "OGG":  # lossy: the waveform is close, not equal
        assert np.corrcoef(audio.samples, samples)[0, 1] > 0.99
    else:  # 16-bit quantisation only
        np.testing.assert_allclose(audio.samples, samples, atol=1 / 2**15)


def test_float_wav_is_exact(store: VoiceStore) -> None:
    samples = recording(1.5, rate=44_100)
    record = store.add(encode(samples, rate=44_100, subtype="FLOAT"), owner="team-a")
    audio = store.audio(record.voice_id)
    assert audio.rate == 44_100 and np.array_equal(audio.samples, samples)


def test_stereo_is_averaged_to_mono(store: VoiceStore) -> None:
    left, right = recording(1.5), np.full(24_000, 0.25, dtype=np.float32)
    record = store.add(encode(np.stack([left, right], axis=1), subtype="FLOAT"), owner="team-a")
    np.testing.assert_allclose(store.audio(record.voice_id).samples, (left + right) / 2, atol=1e-7)


def test_record_file_is_small_json(store: VoiceStore, root: str) -> None:
    record = store.add(encode(recording(1.5)), owner="team-a")
    fs, path = fsspec.core.url_to_fs(root)
    stored = json.loads(fs.cat_file(f"{path}/{record.voice_id}.json"))
    assert stored == {
        "voice_id": record.voice_id,
        "owner": "team-a",
        "name": None,
        "seconds": 1.5,
        "rate": 16_000,
        "created_at": record.created_at,
    }


def test_original_bytes_are_kept(store: VoiceStore, root: str) -> None:
    data = encode(recording(1.5), format="FLAC")
    record = store.add(data, owner="team-a")
    fs, path = fsspec.core.url_to_fs(root)
    assert fs.cat_file(f"{path}/{record.voice_id}.audio") == data


def test_ids_are_random_not_content_hashes(store: VoiceStore) -> None:
    data = encode(recording(1.5))
    first, second = store.add(data, owner="team-a"), store.add(data, owner="team-a")
    assert first.voice_id != second.voice_id
    assert store.get(first.voice_id) == first and store.get(second.voice_id) == second


# Rejections


@pytest.mark.parametrize("data", [b"", b"not audio at all", b"RIFF\x00\x00\x00\x00WAVEfmt garbage", bytes(range(256))])
def test_garbage_is_bad_format(store: VoiceStore, data: bytes) -> None:
    error = rejected(store, data)
    assert error.reason == "bad_format"
    assert "supported formats: WAV, FLAC" in str(error)
    assert str(error.__cause__) not in str(error), "the client's answer quotes no decoder internals"


def test_too_large(store: VoiceStore) -> None:
    error = rejected(store, b"\x00" * (10 * 1024 * 1024 + 1))
    assert error.reason == "too_large"
    assert str(error) == "the recording is 10485761 bytes; the limit is 10485760"


def test_too_large_is_checked_on_the_raw_bytes(root: str) -> None:
    data = encode(recording(1.5))
    store = VoiceStore(root, VoiceLimits(max_bytes=len(data) - 1))
    assert rejected(store, data).reason == "too_large"
    assert VoiceStore(root, VoiceLimits(max_bytes=len(data))).add(data, owner="team-a").seconds == 1.5


def test_too_short(store: VoiceStore) -> None:
    error = rejected(store, encode(recording(0.5)))
    assert error.reason == "too_short"
    assert str(error) == "the recording is 0.50 s long; voices need at least 1.0 s"


def test_too_long(store: VoiceStore) -> None:
    error = rejected(store, encode(recording(61.0, rate=8_000), rate=8_000))
    assert error.reason == "too_long"
    assert str(error) == "the recording is longer than 60.0 s, the most a voice may be"


def test_exactly_the_limits_are_accepted(store: VoiceStore) -> None:
    assert store.add(encode(recording(1.0)), owner="team-a").seconds == 1.0
    assert store.add(encode(recording(60.0, rate=8_000), rate=8_000), owner="team-a").seconds == 60.0


def test_compressed_hours_are_refused_without_decoding_them(store: VoiceStore) -> None:
    # Twenty minutes of silence compress to a small FLAC; decoding stops just past the 60 s limit.
    data = encode(np.zeros(20 * 60 * 8_000, dtype=np.float32), rate=8_000, format="FLAC")
    assert len(data) < 1024 * 1024
    assert rejected(store, data).reason == "too_long"


def test_many_channels_are_refused_before_decoding(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels times frames is what decoding costs: 8 channels of 48 kHz for 5 s is 1.9 million samples, over a
    limit of a million, although a small FLAC of silence; 2 channels are under it."""
    store = VoiceStore(root, VoiceLimits(max_decoded_samples=1_000_000))
    data = encode(np.zeros((5 * 48_000, 8), dtype=np.float32), rate=48_000, format="FLAC")
    blocks = soundfile.SoundFile.blocks

    def undecodable(*args: object, **kwargs: object) -> object:
        raise AssertionError("decoding started")

    monkeypatch.setattr(soundfile.SoundFile, "blocks", undecodable)
    error = rejected(store, data)
    assert error.reason == "too_large"
    assert "8 channels at 48000 Hz: 1920000 samples" in str(error)
    monkeypatch.setattr(soundfile.SoundFile, "blocks", blocks)
    stereo = np.tile(recording(5.0, rate=48_000)[:, None], (1, 2))
    assert store.add(encode(stereo, rate=48_000, format="FLAC"), owner="team-a").seconds == 5.0
    assert VoiceLimits().max_decoded_samples >= 2 * 96_000 * 60, "60 s of 96 kHz stereo is a voice recording"


def test_nan_samples(store: VoiceStore) -> None:
    samples = recording(1.5)
    samples[100] = np.nan
    error = rejected(store, encode(samples, subtype="FLOAT"))
    assert error.reason == "bad_samples"
    assert str(error) == "the recording contains NaN or infinite samples"


def test_empty_audio_file(store: VoiceStore) -> None:
    error = rejected(store, encode(np.zeros(0, dtype=np.float32)))
    assert error.reason == "bad_samples"
    assert str(error) == "the recording holds no audio samples"


def test_implausible_sample_rate(store: VoiceStore) -> None:
    error = rejected(store, encode(recording(2.0, rate=4_000), rate=4_000))
    assert error.reason == "bad_format"
    assert "4000 Hz" in str(error)


def test_name_too_long(store: VoiceStore) -> None:
    with pytest.raises(VoiceError) as caught:
        store.add(encode(recording(1.5)), owner="team-a", name="n" * 201)
    assert caught.value.reason == "bad_name"


def test_rejected_uploads_store_nothing(store: VoiceStore) -> None:
    for data in (b"garbage", encode(recording(0.5))):
        rejected(store, data)
    assert store.list("team-a") == []


# Listing, deleting, lookups


def test_list_by_owner(store: VoiceStore) -> None:
    assert store.list("team-a") == []
    data = encode(recording(1.5))
    first = store.add(data, owner="team-a", name="one")
    other = store.add(data, owner="team-b")
    second = store.add(data, owner="team-a", name="two")
    assert store.list("team-a") == sorted([first, second], key=lambda record: (record.created_at, record.voice_id))
    assert store.list("team-b") == [other]
    assert store.list("team-c") == []


def test_listing_reads_the_owners_records_only(store: VoiceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing a key's voices must not read every tenant's records (an S3 GET each, on every listing)."""
    data = encode(recording(1.5))
    mine = [store.add(data, owner="team-a") for _ in range(2)]
    theirs = {store.add(data, owner="team-b").voice_id for _ in range(5)}
    store.list("team-a")  # a first listing may index a store written before the index existed
    read: list[str] = []
    cat_file = type(store._fs).cat_file

    def recording_reads(fs: object, path: str, *args: object, **kwargs: object) -> bytes:
        read.append(path)
        return cat_file(fs, path, *args, **kwargs)

    monkeypatch.setattr(type(store._fs), "cat_file", recording_reads)
    assert store.list("team-a") == mine
    assert len(read) == 2 and not any(voice_id in path for path in read for voice_id in theirs)


def test_a_store_written_before_the_index_is_indexed_once(store: VoiceStore, root: str) -> None:
    data = encode(recording(1.5))
    first, other = store.add(data, owner="team-a"), store.add(data, owner="team-b")
    fs, path = fsspec.core.url_to_fs(root)
    fs.rm(f"{path}/_owners", recursive=True)  # as an older version left it: records and audio only
    reopened = VoiceStore(root)
    assert reopened.list("team-a") == [first] and reopened.list("team-b") == [other]
    assert fs.exists(f"{path}/_owners/.indexed")
    second = reopened.add(data, owner="team-a")
    assert VoiceStore(root).list("team-a") == [first, second]


def test_owners_are_key_ids(store: VoiceStore) -> None:
    for owner in ("../team-a", "team/a", ""):
        with pytest.raises(ValueError, match="malformed owner"):
            store.add(encode(recording(1.5)), owner=owner)
        with pytest.raises(ValueError, match="malformed owner"):
            store.list(owner)


def test_list_ignores_foreign_files(store: VoiceStore, root: str) -> None:
    record = store.add(encode(recording(1.5)), owner="team-a")
    fs, path = fsspec.core.url_to_fs(root)
    fs.pipe_file(f"{path}/notes.json", b"{}")
    fs.pipe_file(f"{path}/README", b"hello")
    assert store.list("team-a") == [record]


def test_delete(store: VoiceStore, root: str) -> None:
    kept = store.add(encode(recording(1.5)), owner="team-a")
    gone = store.add(encode(recording(1.5)), owner="team-a")
    store.delete(gone.voice_id)
    assert store.list("team-a") == [kept]
    for lookup in (store.get, store.audio, store.delete):
        with pytest.raises(VoiceNotFound):
            lookup(gone.voice_id)
    fs, path = fsspec.core.url_to_fs(root)
    assert sorted(name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)) == sorted(
        [f"{kept.voice_id}.audio", f"{kept.voice_id}.json", "_owners"]
    )
    assert [name.rsplit("/", 1)[-1] for name in fs.ls(f"{path}/_owners/team-a", detail=False)] == [kept.voice_id]


def test_unknown_id(store: VoiceStore) -> None:
    for lookup in (store.get, store.audio, store.delete):
        with pytest.raises(VoiceNotFound, match="no voice AAAAAAAAAAAAAAAA"):
            lookup("A" * 16)


def test_store_survives_reopening(root: str) -> None:
    record = VoiceStore(root).add(encode(recording(1.5)), owner="team-a")
    assert VoiceStore(root).get(record.voice_id) == record


MALICIOUS_IDS = [
    "../../etc/passwd",
    "..",
    "../secret",
    "/etc/passwd",
    "AAAAAAAAAAAAAAA/",
    "AAAAAAAAAAAAAAAA/../../x",
    "",
    "A" * 15,
    "A" * 17,
    "AAAAAAAAAAAAAAA.",
    "AAAAAAAAAAAAAAA\x00",
    "ÄAAAAAAAAAAAAAAA",
    "AAAAAAAAAAAAAAAA\n",
]


@pytest.mark.parametrize("voice_id", MALICIOUS_IDS)
def test_malicious_ids_never_reach_storage(voice_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = VoiceStore(f"memory://voices-{uuid.uuid4().hex}")

    def untouchable(*args: object, **kwargs: object) -> None:
        raise AssertionError("storage was touched")

    for method in ("cat_file", "pipe_file", "rm_file", "rm", "ls", "exists", "open", "info", "makedirs"):
        monkeypatch.setattr(MemoryFileSystem, method, untouchable)
    for lookup in (store.get, store.audio, store.delete):
        with pytest.raises(VoiceNotFound) as caught:
            lookup(voice_id)
        assert str(caught.value) == "malformed voice id"


def test_traversal_cannot_read_outside_the_root(tmp_path: Path) -> None:
    secret = {"voice_id": "x", "owner": "team-a", "name": None, "seconds": 1.0, "rate": 16_000, "created_at": 0.0}
    (tmp_path / "secret.json").write_text(json.dumps(secret))
    store = VoiceStore(str(tmp_path / "voices"))
    with pytest.raises(VoiceNotFound, match="malformed voice id"):
        store.get("../secret")
    with pytest.raises(VoiceNotFound, match="malformed voice id"):
        store.delete("../secret")
    assert (tmp_path / "secret.json").exists()
