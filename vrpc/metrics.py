"""Per-method call counters and latency histograms (no payloads, no keys: names and numbers)."""

from __future__ import annotations

import bisect
import dataclasses

from vrpc.status import Status

__all__ = ["BUCKETS_MS", "MethodMetrics", "Metrics"]

# Upper bounds in milliseconds; the last bucket is everything slower.
BUCKETS_MS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 5000)


@dataclasses.dataclass(slots=True)
class MethodMetrics:
    calls: int = 0
    statuses: dict[Status, int] = dataclasses.field(default_factory=dict)
    buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(BUCKETS_MS) + 1))
    total_seconds: float = 0.0

    def snapshot(self) -> dict[str, object]:
        return {
            "calls": self.calls,
            "statuses": {Status(code).name: n for code, n in sorted(self.statuses.items())},
            "latency_ms_buckets": list(zip([*BUCKETS_MS, "inf"], self.buckets, strict=True)),
            "mean_ms": round(self.total_seconds / self.calls * 1000, 4) if self.calls else 0.0,
        }


class Metrics:
    def __init__(self) -> None:
        self._methods: dict[str, MethodMetrics] = {}

    def record(self, method: str, status: Status, seconds: float) -> None:
        m = self._methods.get(method)
        if m is None:
            if len(self._methods) >= 4096:
                method = "<other>"  # bound memory: unknown method names come from the peer
                m = self._methods.get(method)
            if m is None:
                m = self._methods[method] = MethodMetrics()
        m.calls += 1
        statuses = m.statuses
        statuses[status] = statuses.get(status, 0) + 1  # keyed by code: .name is slow
        m.buckets[bisect.bisect_left(BUCKETS_MS, seconds * 1000)] += 1
        m.total_seconds += seconds

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {name: m.snapshot() for name, m in sorted(self._methods.items())}
