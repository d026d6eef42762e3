"""Admission control before anything is queued: rate limits per client. Pure (clock injected).

Each client identity (its authenticated name once there is authentication; until then its
address) has a token bucket: ``rate`` tokens a second, at most ``burst`` saved up. A job costs a
token; a batch costs one per job. A request that finds too few tokens is refused whole, and the
refusal says how long until it would fit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from dist_exec.clock import Clock
from dist_exec.errors import RateLimited, ResourceExhausted

MAX_CLIENTS = 100_000  # buckets kept; beyond, the least recently used one is dropped


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, clock: Clock, rate_per_s: float, burst: int) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.clock = clock
        self.rate = rate_per_s
        self.burst = burst
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently used first

    def admit(self, client: str, cost: int = 1) -> None:
        """Take ``cost`` tokens, or raise ResourceExhausted with a retry-after hint."""
        now = self.clock.monotonic()
        bucket = self._buckets.get(client)
        if bucket is None:
            while len(self._buckets) >= MAX_CLIENTS:  # (one scan per new client was O(clients))
                self._buckets.popitem(last=False)
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        else:
            self._buckets.move_to_end(client)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if cost > self.burst:
            raise ResourceExhausted(
                f"rate limit: a request of {cost} jobs is larger than the burst of {self.burst} "
                f"allowed for {client}; send smaller batches"
            )
        if bucket.tokens < cost:
            wait_s = (cost - bucket.tokens) / self.rate
            raise RateLimited(
                f"rate limit exceeded for {client}: {self.rate:g} jobs/s, burst {self.burst}; "
                f"retry in {wait_s:.2f}s",
                retry_after_s=wait_s,
            )
        bucket.tokens -= cost
