"""A receive jitter buffer for RTP audio: packets in sequence order, played out on their RTP timestamps.

UDP reorders, duplicates, delays and loses packets. The buffer holds each packet until its turn, a fixed delay
after the first packet's arrival; a packet missing at its turn while later ones have arrived is a gap, which the
caller conceals (in-band FEC from the packet after it, or PLC) instead of skipping, so the input's timeline keeps
its length: 10 s sent is 10 s received. Timestamps, not arrival times, say where a packet belongs: a sender that
stops sending during silence (Opus DTX) leaves a timestamp jump, which becomes a gap when it resumes (a pause longer
than the buffer's depth is skipped down to it). A packet that arrives after its turn has passed, or twice, is
dropped.

Positions are in samples at 48 kHz (the RTP clock of Opus, RFC 7587) from the first packet's timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQUENCE_MODULO = 1 << 16
TIMESTAMP_MODULO = 1 << 32
DEFAULT_FRAME_SAMPLES = 960  # 20 ms: what a gap lasts when nothing says otherwise
CONCEAL_STEP = 120  # libopus conceals multiples of 2.5 ms


def unwrap(value: int, reference: int, modulo: int) -> int:
    """The extended value nearest to `reference` (itself extended) whose remainder is `value`."""
    half = modulo // 2
    return reference + ((value - reference + half) % modulo) - half


@dataclass(frozen=True)
class Packet:
    payload: bytes


@dataclass(frozen=True)
class Gap:
    """`samples` to conceal; `next_payload` is the packet right after the gap, whose FEC may rebuild its end."""

    samples: int
    next_payload: bytes | None


@dataclass(frozen=True)
class _Held:
    timestamp: int  # extended, relative to the first packet
    payload: bytes


class JitterBuffer:
    def __init__(self, max_depth_samples: int) -> None:
        self.max_depth_samples = max_depth_samples  # held audio beyond this is skipped: the sender ran ahead
        self._packets: dict[int, _Held] = {}  # by extended sequence number
        self._origin: tuple[int, int] | None = None  # the first packet's (sequence number, timestamp), as sent
        self._newest = (0, 0)  # extended (sequence, timestamp) of the newest packet held or played
        self._next_sequence = 0
        self._next_timestamp = 0  # the position the next output sample belongs to
        self._frame_samples = DEFAULT_FRAME_SAMPLES
        self.late = 0  # packets dropped for arriving after their turn (or twice)
        self.concealed_samples = 0
        self.skipped_samples = 0

    @property
    def started(self) -> bool:
        return self._origin is not None

    @property
    def position(self) -> int:
        """The position (samples since the first packet's timestamp) the next output sample belongs to."""
        return self._next_timestamp

    def push(self, sequence: int, timestamp: int, payload: bytes) -> bool:
        """Holds one packet (header fields as sent); False when it is dropped as late or duplicate."""
        if self._origin is None:
            self._origin = (sequence, timestamp)
        first_sequence, first_timestamp = self._origin
        newest_sequence, newest_timestamp = self._newest
        extended = unwrap(sequence - first_sequence, newest_sequence, SEQUENCE_MODULO)
        position = unwrap(timestamp - first_timestamp, newest_timestamp, TIMESTAMP_MODULO)
        if extended < self._next_sequence or extended in self._packets:
            self.late += 1
            return False
        self._packets[extended] = _Held(position, payload)
        if extended > newest_sequence:
            self._newest = (extended, position)
        self._skip_if_too_deep()
        return True

    def next(self, until: int) -> Packet | Gap | None:
        """What plays next, if its turn has come (it starts before position `until`); None while it has not.

        After a `Packet`, the caller reports its decoded length with `played`."""
        if self._origin is None or self._next_timestamp >= until:
            return None
        held = self._packets.get(self._next_sequence)
        if held is None and not self._packets:
            # Nothing newer either: the sender may just have paused (or stopped). Wait: a loss is concealed once a
            # later packet shows it, and a pause's length is known when the sender resumes (its timestamps).
            return None
        if held is None:  # lost, or later than its turn: conceal the frame it held
            following = self._packets.get(self._next_sequence + 1)
            samples = following.timestamp - self._next_timestamp if following is not None else self._frame_samples
            self._next_sequence += 1
            return self._gap(samples, following.payload if following is not None else None)
        if held.timestamp < self._next_timestamp - self._frame_samples:  # belongs to audio long played out
            del self._packets[self._next_sequence]
            self._next_sequence += 1
            self.late += 1
            return self.next(until)
        # A packet that starts a little before the previous one's decoded end: the timestamps are right, the decoded
        # length was not (GStreamer's opusenc stamps its first packet 960 samples long and the next 648 later, the
        # encoder's lookahead left out). Play it from its own timestamp on.
        self._next_timestamp = min(self._next_timestamp, held.timestamp)
        if held.timestamp > self._next_timestamp:  # the sender paused (DTX): conceal up to the packet, in turn
            return self._gap(min(held.timestamp, until) - self._next_timestamp, held.payload)
        del self._packets[self._next_sequence]
        self._next_sequence += 1
        return Packet(held.payload)

    def played(self, samples: int) -> None:
        """A packet returned by `next` decoded to `samples`."""
        self._next_timestamp += samples
        if samples > 0:
            self._frame_samples = samples

    def _gap(self, samples: int, next_payload: bytes | None) -> Gap:
        samples = max(CONCEAL_STEP, samples - samples % CONCEAL_STEP)
        self._next_timestamp += samples
        self.concealed_samples += samples
        return Gap(samples, next_payload)

    def _skip_if_too_deep(self) -> None:
        """Drops the oldest held audio when more than `max_depth_samples` waits: a sender that runs ahead (a burst
        after a stall, or a faster clock) must not turn into ever more delay."""
        newest_timestamp = self._newest[1]
        if newest_timestamp - self._next_timestamp <= self.max_depth_samples:
            return
        target = newest_timestamp - self.max_depth_samples
        for sequence in sorted(self._packets):
            if self._packets[sequence].timestamp < target:
                del self._packets[sequence]
        # Play on from the oldest packet left (the newest is always left): the ones before it are gone or lost.
        self._next_sequence = min(self._packets)
        self.skipped_samples += target - self._next_timestamp
        self._next_timestamp = target
