"""Per-method call counters and latency histograms, plus connection, handshake and attestation
counters (no payloads, no keys: names and numbers). ``vrpc.prometheus`` renders them."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from vrpc.status import Status

if TYPE_CHECKING:
    from vrpc.service import MethodSpec

__all__ = [
    "BUCKETS_MS",
    "HANDSHAKE_BUCKETS_S",
    "MethodMetrics",
    "Metrics",
    "ServerView",
    "handshake_failure_reason",
]

# Upper bounds in milliseconds; the last bucket is everything slower.
BUCKETS_MS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 5000)
# Handshake durations in seconds (attestation by /dev/nsm dominates them inside an enclave).
HANDSHAKE_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip

# Alert names a peer may abort a handshake with (vrpc.proto.handshake.Alert), lower case.
_PEER_ALERTS = frozenset(
    {
        "bad_message",
        "mode_refused",
        "unknown_service",
        "mutual_refused",
        "attestation_refused",
        "finished_invalid",
        "internal_error",
    }
)


# The server's own refusals, by a fragment of the HandshakeError message they raise.
_HANDSHAKE_MESSAGES = (
    ("client asked for plaintext", "mode_refused"),
    ("does not match server mode", "mode_refused"),
    ("unknown service", "unknown_service"),
    ("mutual attestation", "mutual_refused"),
    ("Finished MAC is invalid", "finished_invalid"),
)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def handshake_failure_reason(exc: BaseException) -> str:
    """A short label for why a handshake failed, from a fixed, small set (safe as a metric
    label: never free text from the peer).

    Attestation errors keep their class (``policy_violation``, ``signature_invalid``, ...);
    ``attester_error`` is this server's own attester failing (e.g. /dev/nsm), ``timeout`` the
    handshake deadline, ``peer_<alert>`` the peer aborting with an alert
    (``peer_attestation_refused``: a client refused this enclave's document), ``mode_refused``,
    ``unknown_service``, ``mutual_refused`` and ``finished_invalid`` this server's refusals,
    ``protocol_error`` anything else malformed.
    """
    from vrpc.exceptions import AttestationError, HandshakeError

    if isinstance(exc, AttestationError):
        return _snake(type(exc).__name__)
    if isinstance(exc, HandshakeError):
        message = str(exc)
        if message == "handshake timed out":
            return "timeout"
        if message.startswith("attestation failed"):
            return "attester_error"
        if message.startswith("attestation verifier raised"):
            return "verifier_error"
        if message.startswith("peer aborted the handshake ("):
            alert = message[len("peer aborted the handshake (") : -1]
            return f"peer_{alert}" if alert in _PEER_ALERTS else "peer_other"
        for fragment, reason in _HANDSHAKE_MESSAGES:
            if fragment in message:
                return reason
    return "protocol_error"


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
        self.connections_accepted = 0
        self.connections_refused: dict[str, int] = {}
        self.handshakes: dict[str, int] = {}  # by session mode
        self.handshake_failures: dict[str, int] = {}  # by handshake_failure_reason
        self.attestation_failures: dict[str, int] = {}
        self.handshake_buckets = [0] * (len(HANDSHAKE_BUCKETS_S) + 1)
        self.handshake_seconds = 0.0

    # -- connections and handshakes (called by the server shell) ---------------------------

    def connection_accepted(self) -> None:
        """A transport connection was accepted (before its handshake)."""
        self.connections_accepted += 1

    def connection_refused(self, reason: str) -> None:
        """A connection was closed at once, e.g. ``"connection_limit"``."""
        self.connections_refused[reason] = self.connections_refused.get(reason, 0) + 1

    def handshake_completed(self, mode: str, seconds: float) -> None:
        """A handshake finished after ``seconds`` (from the accepted connection)."""
        self.handshakes[mode] = self.handshakes.get(mode, 0) + 1
        self.handshake_buckets[bisect.bisect_left(HANDSHAKE_BUCKETS_S, seconds)] += 1
        self.handshake_seconds += seconds

    def handshake_failed(self, exc: BaseException | str) -> str:
        """Count a failed handshake (an exception, or a reason label) and return its reason.

        Failures of attestation (the peer's document refused, or this server's attester
        failing) also count as attestation failures.
        """
        reason = exc if isinstance(exc, str) else handshake_failure_reason(exc)
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1
        from vrpc.exceptions import AttestationError

        if isinstance(exc, AttestationError) or reason == "attester_error":
            self.attestation_failures[reason] = self.attestation_failures.get(reason, 0) + 1
        return reason

    @property
    def methods(self) -> dict[str, MethodMetrics]:
        return dict(sorted(self._methods.items()))

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


class ServerView(Protocol):
    """What health and reflection read from the server that serves them, and nothing more."""

    metrics: Metrics

    @property
    def methods(self) -> Mapping[str, MethodSpec]: ...

    @property
    def connection_count(self) -> int: ...

    @property
    def calls_in_flight(self) -> int: ...

    @property
    def loop_stalls(self) -> int: ...
