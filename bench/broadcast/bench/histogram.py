"""A latency histogram of fixed size: percentiles within ~3 %, whatever the number of samples.

Every delivery is one sample, so millions per run: keeping them all would grow without bound.
Buckets are log-linear (32 per power of two, like HdrHistogram with 1.5 significant digits),
in microseconds, mergeable across worker processes by adding counts.
"""

from __future__ import annotations

from collections.abc import Iterable

# 32 sub-buckets per power of two bounds the relative error of a percentile to 1/32.
_SUB_BITS = 5
_SUB = 1 << _SUB_BITS
_LINEAR = 2 * _SUB  # values below this (µs) get a bucket each
# Buckets up to 2**(_LINEAR_BITS + 27) µs: far above any latency worth measuring (hours).
BUCKETS = _LINEAR + 27 * _SUB


def bucket_of(micros: int) -> int:
    if micros < _LINEAR:
        return max(micros, 0)
    shift = micros.bit_length() - _SUB_BITS - 1
    index = _LINEAR + (shift - 1) * _SUB + (micros >> shift) - _SUB
    return min(index, BUCKETS - 1)


def bucket_top(index: int) -> int:
    """The largest value (µs) that falls in bucket ``index``: percentiles err on the high side."""
    if index < _LINEAR:
        return index
    shift, sub = divmod(index - _LINEAR, _SUB)
    shift += 1
    return ((sub + _SUB + 1) << shift) - 1


class Histogram:
    __slots__ = ("counts", "max_us", "total")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.total = 0
        self.max_us = 0

    def add(self, micros: int) -> None:
        # bucket_of, inlined: this runs once per delivery in the receivers.
        if micros < _LINEAR:
            index = micros if micros > 0 else 0
        else:
            shift = micros.bit_length() - _SUB_BITS - 1
            index = min(_LINEAR + (shift - 1) * _SUB + (micros >> shift) - _SUB, BUCKETS - 1)
        self.counts[index] += 1
        self.total += 1
        if micros > self.max_us:
            self.max_us = micros

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, fraction: float) -> int | None:
        """The value (µs) under which ``fraction`` of the samples fall; None without samples."""
        if not self.total:
            return None
        rank = max(1, round(fraction * self.total))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return min(bucket_top(index), self.max_us)
        return self.max_us

    def summary_ms(self) -> dict[str, float | None]:
        def ms(micros: int | None) -> float | None:
            return None if micros is None else round(micros / 1000, 2)

        return {
            "p50": ms(self.percentile(0.50)),
            "p99": ms(self.percentile(0.99)),
            "max": ms(self.max_us if self.total else None),
            "samples": self.total,
        }

    # Sent between processes as a sparse list: most buckets are empty.
    def to_wire(self) -> tuple[list[tuple[int, int]], int, int]:
        return [(i, c) for i, c in enumerate(self.counts) if c], self.total, self.max_us

    @classmethod
    def from_wire(cls, wire: tuple[Iterable[tuple[int, int]], int, int]) -> Histogram:
        histogram = cls()
        pairs, histogram.total, histogram.max_us = wire
        for index, count in pairs:
            histogram.counts[index] = count
        return histogram
