"""How often each API key may make a request: a token bucket per key id, for endpoints that hand out something
(TURN credentials from GET /v1/ice) where one key asking thousands of times a second must not cost the service.

The buckets of the least recently seen keys are forgotten beyond `max_keys`, so that the memory stays bounded; a
forgotten key starts again with a full bucket, which errs towards allowing, never towards refusing a key.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from app.transport.limits import Clock, TokenBucket


class KeyRate:
    def __init__(self, rate: float, burst: float, max_keys: int = 10_000, clock: Clock = time.monotonic) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys}")
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key_id: str) -> bool:
        """Counts one request of the key; False when it is over its rate (then nothing is counted)."""
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = TokenBucket(self.rate, self.burst, self._clock)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key_id)
        return bucket.take()

    @property
    def retry_after_s(self) -> float:
        """How long until a key over its rate may ask again."""
        return 1.0 / self.rate
