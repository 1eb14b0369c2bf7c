"""Events the sans-IO endpoint hands to its shell.

Plain classes with ``__slots__`` rather than dataclasses: one is built per call on the hot path.
``EndpointEvent`` is the closed union of everything ``Endpoint`` returns; the shells dispatch on
it with ``match`` and ``typing.assert_never``, so mypy names any event a shell forgets.
``ConnectionTerminated`` is internal to the call multiplexer: the endpoint turns it into a close.
"""

from __future__ import annotations

from typing import Any

from vrpc.status import Status

__all__ = [
    "AttestationRequested",
    "CallCancelled",
    "ConnectionClosed",
    "ConnectionTerminated",
    "CreditAvailable",
    "EndpointEvent",
    "ErrorReceived",
    "Event",
    "GoAwayReceived",
    "HeadersReceived",
    "ItemReceived",
    "PongReceived",
    "RequestReceived",
    "ResponseReceived",
    "SessionEstablished",
    "SettingsReceived",
    "StreamEnded",
]


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in names)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        names: tuple[str, ...] = self.__slots__
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in names
        )

    __hash__ = None  # type: ignore[assignment]


class RequestReceived(Event):
    """Server side: a new call. ``timeout`` is the caller's remaining time in seconds."""

    __slots__ = (
        "args",
        "call_id",
        "metadata",
        "method",
        "stream_request",
        "stream_response",
        "timeout",
    )

    def __init__(
        self,
        call_id: int,
        method: str,
        args: list[Any],
        metadata: dict[str, Any] | None,
        timeout: float | None,
        stream_request: bool,
        stream_response: bool = False,
    ) -> None:
        self.call_id = call_id
        self.method = method
        self.args = args
        self.metadata = metadata
        self.timeout = timeout
        self.stream_request = stream_request
        self.stream_response = stream_response


class ResponseReceived(Event):
    """Client side: the call finished with OK (for a stream, after its items)."""

    __slots__ = ("call_id", "result", "trailers")

    def __init__(self, call_id: int, result: Any, trailers: dict[str, Any] | None) -> None:
        self.call_id = call_id
        self.result = result
        self.trailers = trailers


class ErrorReceived(Event):
    """Client side: the call finished with a non-OK status (from the peer or a local deadline)."""

    __slots__ = ("call_id", "details", "message", "status", "trailers")

    def __init__(
        self,
        call_id: int,
        status: Status,
        message: str,
        details: Any = None,
        trailers: dict[str, Any] | None = None,
    ) -> None:
        self.call_id = call_id
        self.status = status
        self.message = message
        self.details = details
        self.trailers = trailers


class ItemReceived(Event):
    """A stream item. ``size`` is its encoded size, to be handed back via ``consumed``."""

    __slots__ = ("call_id", "item", "size")

    def __init__(self, call_id: int, item: Any, size: int) -> None:
        self.call_id = call_id
        self.item = item
        self.size = size


class StreamEnded(Event):
    """Server side: the client finished sending its request stream."""

    __slots__ = ("call_id",)

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id


class HeadersReceived(Event):
    """Client side: the handler sent its initial metadata."""

    __slots__ = ("call_id", "metadata")

    def __init__(self, call_id: int, metadata: dict[str, Any]) -> None:
        self.call_id = call_id
        self.metadata = metadata


class CallCancelled(Event):
    """Server side: stop the handler (the client cancelled, or the deadline passed)."""

    __slots__ = ("call_id", "status")

    def __init__(self, call_id: int, status: Status) -> None:
        self.call_id = call_id
        self.status = status


class CreditAvailable(Event):
    """The peer granted flow-control credit: a blocked stream sender may continue."""

    __slots__ = ("call_id",)

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id


class GoAwayReceived(Event):
    """Client side: the server is draining; calls above ``last_call_id`` were not processed."""

    __slots__ = ("last_call_id", "reason")

    def __init__(self, last_call_id: int, reason: str) -> None:
        self.last_call_id = last_call_id
        self.reason = reason


class PongReceived(Event):
    """The peer answered our keepalive PING; ``rtt`` is the round trip in seconds."""

    __slots__ = ("rtt",)

    def __init__(self, rtt: float) -> None:
        self.rtt = rtt


class ConnectionTerminated(Event):
    """The connection must be closed (keepalive timeout, idle timeout)."""

    __slots__ = ("reason", "status")

    def __init__(self, status: Status, reason: str) -> None:
        self.status = status
        self.reason = reason


class SettingsReceived(Event):
    """Client side: the server announced how many calls it serves at once on this connection."""

    __slots__ = ("max_calls",)

    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls


class AttestationRequested(Event):
    """The handshake needs this side's attestation document with exactly these fields: run the
    attester (off the event loop for /dev/nsm) and answer with ``Endpoint.supply_attestation``."""

    __slots__ = ("nonce", "public_key", "user_data")

    def __init__(self, user_data: bytes, nonce: bytes, public_key: bytes) -> None:
        self.user_data = user_data
        self.nonce = nonce
        self.public_key = public_key


class SessionEstablished(Event):
    """The handshake completed: calls may flow. ``peer_claims`` are the verified attestation
    claims of the peer (None when the peer was not attested)."""

    __slots__ = ("channel_binding", "mode", "peer_claims", "service")

    def __init__(
        self, peer_claims: Any, mode: str, channel_binding: bytes, service: str | None
    ) -> None:
        self.peer_claims = peer_claims
        self.mode = mode
        self.channel_binding = channel_binding
        self.service = service


class ConnectionClosed(Event):
    """The connection is over; the shell sends ``data_to_send()`` and closes the transport.

    Always the last event, emitted once. ``clean`` is True for an exchange of CLOSE records;
    ``error`` is the exception that ended it (None when clean); ``in_handshake`` says no session
    was established; ``retryable`` says a new connection may succeed (the transport failed or the
    server was at its connection limit), as opposed to a verdict on the peer (attestation,
    protocol violation), which is never retried silently.
    """

    __slots__ = ("clean", "error", "in_handshake", "reason", "retryable", "status")

    def __init__(
        self,
        status: Status,
        reason: str,
        *,
        clean: bool = False,
        error: Exception | None = None,
        in_handshake: bool = False,
        retryable: bool = False,
    ) -> None:
        self.status = status
        self.reason = reason
        self.clean = clean
        self.error = error
        self.in_handshake = in_handshake
        self.retryable = retryable


EndpointEvent = (
    RequestReceived
    | ResponseReceived
    | ErrorReceived
    | ItemReceived
    | StreamEnded
    | HeadersReceived
    | CallCancelled
    | CreditAvailable
    | GoAwayReceived
    | PongReceived
    | SettingsReceived
    | AttestationRequested
    | SessionEstablished
    | ConnectionClosed
)
