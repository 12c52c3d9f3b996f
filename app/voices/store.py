"""The voice store: uploaded reference recordings, kept under random ids on a local directory or any fsspec URL.

Each voice is two files side by side, `<id>.audio` (the bytes as uploaded) and `<id>.json` (its `VoiceRecord`),
plus an empty entry `_owners/<owner>/<id>` in its owner's index, so that listing a key's voices reads that key's
records only, never every tenant's. The record is written last and deleted first, so a voice exists exactly when its
record does, and a crash half-way leaves at most an orphaned audio file or index entry (listing skips those), never
a record without audio. A store written before the index existed is indexed once, by the first listing.

Ids are `secrets.token_urlsafe(12)`: random, so they reveal nothing about the audio and two uploads of the same
recording get two ids. They are the only user input a path is ever built from, and only after `VOICE_ID` matched.
The store does not check ownership: callers compare `VoiceRecord.owner` with the key asking. Every method does
blocking I/O (and `add` decodes): on an event loop, call them through a worker pool (app/offload.py).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Literal

import fsspec.core
import numpy as np
import soundfile

from app.audio.files import SUPPORTED_FORMATS, Audio, AudioError, check_samples
from app.auth.keystore import KEY_ID

VOICE_ID = re.compile(r"[A-Za-z0-9_-]{16}")  # what token_urlsafe(12) produces: 12 random bytes, base64url
RATE_RANGE = (8_000, 192_000)  # Hz; outside it a file is not a voice recording (and 1 Hz would defeat max_seconds)
MAX_NAME_CHARS = 200  # names are labels for people; every listing reads them
_DECODE_BLOCK_FRAMES = 4096  # decode in blocks so that memory does not scale with the file's channel count
_OWNERS = "_owners"  # the per-owner index; not a voice id (VOICE_ID has no room for it), so never taken for one
_INDEXED = ".indexed"  # marks a store whose every voice is in the index

VoiceErrorReason = Literal["too_large", "bad_format", "too_short", "too_long", "bad_samples", "bad_name", "too_slow"]


class VoiceError(ValueError):
    """An upload that cannot become a voice; `reason` is stable for clients, the message explains it to people."""

    def __init__(self, reason: VoiceErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class VoiceNotFound(LookupError):
    """No voice has this id, or the id is not even well formed."""


@dataclass(frozen=True)
class VoiceLimits:
    max_bytes: int = 10 * 1024 * 1024  # of the upload as sent
    min_seconds: float = 1.0  # CAMPPlus's style vector needs about a second of speech
    max_seconds: float = 60.0  # only the first `max_prompt` seconds become the prompt; more is wasted storage
    # Samples decoded, all channels counted, checked before decoding: a many-channel file at a high rate takes long
    # to decode however short it is. 60 s of 96 kHz stereo fits.
    max_decoded_samples: int = 12_000_000


@dataclass(frozen=True)
class VoiceRecord:
    voice_id: str
    owner: str  # the API key id that uploaded it
    name: str | None
    seconds: float
    rate: int  # the recording's own sample rate
    created_at: float  # unix seconds


def _decode(data: bytes, limits: VoiceLimits | None) -> Audio:
    """Mono float32 at the file's own rate, as `read_audio` gives for a file, but from bytes.

    With `limits` (an upload), decoding stops one frame past `max_seconds`: a small compressed file can hold hours of
    audio, and reading all of it just to refuse it would let one upload take gigabytes of memory; and a file whose
    channels times frames to decode exceed `max_decoded_samples` is refused before any decoding.
    """
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as file:
            rate = int(file.samplerate)
            if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
                raise VoiceError("bad_format", f"sample rate {rate} Hz is outside {RATE_RANGE[0]}-{RATE_RANGE[1]} Hz")
            frames = -1 if limits is None else int(limits.max_seconds * rate) + 1
            if limits is not None:
                # A file that states no length (or a wrong one) is decoded up to `frames` at most.
                decoded = file.channels * (frames if file.frames <= 0 else min(frames, file.frames))
                if decoded > limits.max_decoded_samples:
                    raise VoiceError(
                        "too_large",
                        f"the recording has {file.channels} channels at {rate} Hz: {decoded} samples to decode, over "
                        f"the limit of {limits.max_decoded_samples}",
                    )
            # Averaging keeps a mono file's samples exact, as in read_audio.
            chunks = [
                block.mean(axis=1, dtype=np.float32)
                for block in file.blocks(_DECODE_BLOCK_FRAMES, frames=frames, dtype="float32", always_2d=True)
            ]
    except soundfile.SoundFileError as error:
        # libsndfile's wording (and the reader object it names) stays out of the answer a client gets.
        raise VoiceError(
            "bad_format", f"cannot decode the recording; supported formats: {SUPPORTED_FORMATS}"
        ) from error
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    try:
        check_samples(samples, "the recording")
    except AudioError as error:
        raise VoiceError("bad_samples", str(error)) from error
    return Audio(samples=samples, rate=rate)


class VoiceStore:
    """Voices under `root`: a local directory or an fsspec URL such as "s3://bucket/voices" or "memory://voices"."""

    def __init__(self, root: str, limits: VoiceLimits | None = None) -> None:
        self._fs, path = fsspec.core.url_to_fs(root)
        self._root = path.rstrip("/")
        self._limits = limits or VoiceLimits()
        self._indexed = False  # known to hold the index marker (checked once per process)

    def _path(self, voice_id: str, suffix: str) -> str:
        if not VOICE_ID.fullmatch(voice_id):
            raise VoiceNotFound("malformed voice id")
        return f"{self._root}/{voice_id}{suffix}"

    def _index_dir(self, owner: str) -> str:
        if not KEY_ID.fullmatch(owner):  # owners are API key ids; nothing else may name a directory
            raise ValueError("malformed owner")
        return f"{self._root}/{_OWNERS}/{owner}"

    def add(self, data: bytes, owner: str, name: str | None = None) -> VoiceRecord:
        """Validate an uploaded recording and store it under a new random id."""
        limits = self._limits
        if len(data) > limits.max_bytes:
            raise VoiceError("too_large", f"the recording is {len(data)} bytes; the limit is {limits.max_bytes}")
        if name is not None and len(name) > MAX_NAME_CHARS:
            raise VoiceError("bad_name", f"the name is {len(name)} characters; the limit is {MAX_NAME_CHARS}")
        index_dir = self._index_dir(owner)  # refuses a malformed owner before anything is decoded
        audio = _decode(data, limits)
        if audio.seconds > limits.max_seconds:
            raise VoiceError(
                "too_long", f"the recording is longer than {limits.max_seconds} s, the most a voice may be"
            )
        if audio.seconds < limits.min_seconds:
            raise VoiceError(
                "too_short", f"the recording is {audio.seconds:.2f} s long; voices need at least {limits.min_seconds} s"
            )
        record = VoiceRecord(
            voice_id=secrets.token_urlsafe(12),
            owner=owner,
            name=name,
            seconds=audio.seconds,
            rate=audio.rate,
            created_at=time.time(),
        )
        self._fs.makedirs(index_dir, exist_ok=True)
        self._fs.pipe_file(self._path(record.voice_id, ".audio"), data)
        self._fs.pipe_file(f"{index_dir}/{record.voice_id}", b"")
        self._fs.pipe_file(self._path(record.voice_id, ".json"), json.dumps(asdict(record)).encode())
        return record

    def get(self, voice_id: str) -> VoiceRecord:
        path = self._path(voice_id, ".json")
        try:
            return VoiceRecord(**json.loads(self._fs.cat_file(path)))
        except FileNotFoundError:
            raise VoiceNotFound(f"no voice {voice_id}") from None

    def exists(self, voice_id: str) -> bool:
        try:
            return bool(self._fs.exists(self._path(voice_id, ".json")))
        except VoiceNotFound:  # a malformed id names no voice
            return False

    def audio(self, voice_id: str) -> Audio:
        """The voice's recording, decoded to mono float32 at its own rate."""
        self.get(voice_id)  # the record decides whether the voice exists (see the module docstring)
        try:
            data = self._fs.cat_file(self._path(voice_id, ".audio"))
        except FileNotFoundError:  # deleted between the two reads
            raise VoiceNotFound(f"no voice {voice_id}") from None
        # The upload was checked when it was added; limits may have changed since, and must not hide a stored voice.
        return _decode(data, limits=None)

    def delete(self, voice_id: str) -> None:
        record = self.get(voice_id)
        try:
            self._fs.rm_file(self._path(voice_id, ".json"))
        except FileNotFoundError:
            raise VoiceNotFound(f"no voice {voice_id}") from None
        for path in (self._path(voice_id, ".audio"), f"{self._index_dir(record.owner)}/{voice_id}"):
            with contextlib.suppress(FileNotFoundError):  # an index entry is missing from stores indexed late
                self._fs.rm_file(path)

    def list(self, owner: str) -> builtins.list[VoiceRecord]:
        """The owner's voices, oldest first: their records only, found through the owner's index."""
        self._ensure_index()
        try:
            paths = self._fs.ls(self._index_dir(owner), detail=False)
        except FileNotFoundError:  # nothing added by this owner yet
            return []
        records = []
        for path in paths:
            voice_id = path.rstrip("/").rsplit("/", 1)[-1]
            if not VOICE_ID.fullmatch(voice_id):
                continue  # not ours
            try:
                record = self.get(voice_id)
            except VoiceNotFound:  # deleted since the listing, or an index entry a crash left behind
                continue
            if record.owner == owner:
                records.append(record)
        return sorted(records, key=lambda record: (record.created_at, record.voice_id))

    def _ensure_index(self) -> None:
        """Indexes a store written before the index existed: every record once, then a marker says it is done."""
        if self._indexed:
            return
        marker = f"{self._root}/{_OWNERS}/{_INDEXED}"
        if not self._fs.exists(marker):
            try:
                paths = self._fs.ls(self._root, detail=False)
            except FileNotFoundError:  # an empty store
                paths = []
            for path in paths:
                voice_id, _, suffix = path.rsplit("/", 1)[-1].partition(".")
                if suffix == "json" and VOICE_ID.fullmatch(voice_id):
                    with contextlib.suppress(VoiceNotFound, ValueError):  # gone since, or an owner with no index
                        owner_dir = self._index_dir(self.get(voice_id).owner)
                        self._fs.makedirs(owner_dir, exist_ok=True)
                        self._fs.pipe_file(f"{owner_dir}/{voice_id}", b"")
            self._fs.makedirs(f"{self._root}/{_OWNERS}", exist_ok=True)
            self._fs.pipe_file(marker, b"")
        self._indexed = True
