"""vrpc's metrics in the Prometheus text exposition format (version 0.0.4), with no dependency.

Inside an enclave there is no network to scrape: the server answers
``vrpc.reflection.prometheus()`` with this text, and ``vrpc metrics`` on the parent instance
re-exposes it over HTTP for Prometheus (see docs/operations.md). Only names and numbers appear:
method names, status names, failure reasons, never arguments, results or metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from vrpc.metrics import BUCKETS_MS, HANDSHAKE_BUCKETS_S, Metrics
from vrpc.status import Status

if TYPE_CHECKING:
    from vrpc.metrics import ServerView

__all__ = ["CONTENT_TYPE", "render", "render_server"]

#: The Content-Type of the exposition, as Prometheus expects it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CALL_BOUNDS_S = tuple(bound / 1000 for bound in BUCKETS_MS)


def _escape(value: str) -> str:
    # The three escapes the format defines for label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _bound(value: float) -> str:
    return f"{value:.10g}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels or {})} {_number(value)}")

    def counter_by(self, name: str, help_text: str, label: str, values: Mapping[str, int]) -> None:
        self.family(name, "counter", help_text)
        for key, value in sorted(values.items()):
            self.sample(name, value, {label: key})

    def histogram(
        self,
        name: str,
        bounds: Sequence[float],
        buckets: Sequence[int],
        total: float,
        labels: Mapping[str, str],
    ) -> None:
        cumulative = 0
        for bound, count in zip(bounds, buckets, strict=False):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, {**labels, "le": _bound(bound)})
        count = sum(buckets)
        self.sample(f"{name}_bucket", count, {**labels, "le": "+Inf"})
        self.sample(f"{name}_sum", total, labels)
        self.sample(f"{name}_count", count, labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _resident_memory_bytes() -> int | None:
    # Linux only: the second field of /proc/self/statm is the resident set in pages.
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def render(
    metrics: Metrics,
    *,
    connections: int,
    calls_in_flight: int,
    loop_blocked: int = 0,
    extra: Iterable[str] = (),
) -> str:
    """The exposition text of one server's ``metrics`` and gauges."""
    w = _Writer()
    methods = metrics.methods
    w.family("vrpc_server_calls_total", "counter", "Calls finished, by method and status.")
    for method, m in methods.items():
        for code, n in sorted(m.statuses.items()):
            w.sample("vrpc_server_calls_total", n, {"method": method, "status": Status(code).name})
    w.family(
        "vrpc_server_call_duration_seconds",
        "histogram",
        "Time from a call's arrival to its answer (the whole stream for streaming calls).",
    )
    for method, m in methods.items():
        w.histogram(
            "vrpc_server_call_duration_seconds",
            _CALL_BOUNDS_S,
            m.buckets,
            m.total_seconds,
            {"method": method},
        )
    w.family("vrpc_server_connections", "gauge", "Connections open now (handshaking included).")
    w.sample("vrpc_server_connections", connections)
    w.family("vrpc_server_calls_in_flight", "gauge", "Calls running now.")
    w.sample("vrpc_server_calls_in_flight", calls_in_flight)
    w.family("vrpc_server_connections_accepted_total", "counter", "Connections accepted.")
    w.sample("vrpc_server_connections_accepted_total", metrics.connections_accepted)
    w.counter_by(
        "vrpc_server_connections_refused_total",
        "Connections closed at once, by reason.",
        "reason",
        metrics.connections_refused,
    )
    w.counter_by(
        "vrpc_server_handshakes_total",
        "Handshakes completed, by session mode.",
        "mode",
        metrics.handshakes,
    )
    w.counter_by(
        "vrpc_server_handshake_failures_total",
        "Handshakes that failed, by reason.",
        "reason",
        metrics.handshake_failures,
    )
    w.counter_by(
        "vrpc_server_attestation_failures_total",
        "Attestation failures (a peer's document refused, or this server's attester failing).",
        "reason",
        metrics.attestation_failures,
    )
    w.family(
        "vrpc_server_handshake_duration_seconds",
        "histogram",
        "Time from accepting a connection to the end of its handshake (attestation included).",
    )
    w.histogram(
        "vrpc_server_handshake_duration_seconds",
        HANDSHAKE_BUCKETS_S,
        metrics.handshake_buckets,
        metrics.handshake_seconds,
        {},
    )
    w.family(
        "vrpc_server_event_loop_blocked_total",
        "counter",
        "Times the event loop was blocked longer than the server's loop_lag_warning.",
    )
    w.sample("vrpc_server_event_loop_blocked_total", loop_blocked)
    rss = _resident_memory_bytes()
    if rss is not None:
        w.family("process_resident_memory_bytes", "gauge", "Resident memory of the process.")
        w.sample("process_resident_memory_bytes", rss)
    w.lines.extend(extra)
    return w.text()


def render_server(server: ServerView) -> str:
    """The exposition text of a running ``vrpc.Server``."""
    return render(
        server.metrics,
        connections=server.connection_count,
        calls_in_flight=server.calls_in_flight,
        loop_blocked=server.loop_stalls,
    )
