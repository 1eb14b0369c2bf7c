"""Events the sans-IO endpoint hands to its shell.

``msgspec.Struct`` classes rather than dataclasses or plain classes: one or two are built per
call on the hot path, and a Struct is built in C (~4x faster than a Python ``__init__``). The
per-call ones are also left out of the cyclic garbage collector (``gc=False``): they hold only
decoded wire data, which cannot refer back to them, so no cycle can pass through them.
``EndpointEvent`` is the closed union of everything ``Endpoint`` returns; the shells dispatch on
it with ``match`` and ``typing.assert_never``, so mypy names any event a shell forgets.
``ConnectionTerminated`` is internal to the call multiplexer: the endpoint turns it into a close.
"""

from __future__ import annotations

from typing import Any

import msgspec

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


class Event(msgspec.Struct):
    """Base of every event (equality by fields, a readable repr, not hashable)."""


class RequestReceived(Event, gc=False):
    """Server side: a new call. ``timeout`` is the caller's remaining time in seconds; ``size``
    is the encoded size of the REQUEST message (what its arguments weigh on the wire)."""

    call_id: int
    method: str
    args: list[Any]
    metadata: dict[str, Any] | None
    timeout: float | None
    stream_request: bool
    stream_response: bool = False
    size: int = 0


class ResponseReceived(Event, gc=False):
    """Client side: the call finished with OK (for a stream, after its items)."""

    call_id: int
    result: Any
    trailers: dict[str, Any] | None


class ErrorReceived(Event, gc=False):
    """Client side: the call finished with a non-OK status (from the peer or a local deadline)."""

    call_id: int
    status: Status
    message: str
    details: Any = None
    trailers: dict[str, Any] | None = None


class ItemReceived(Event, gc=False):
    """A stream item. ``size`` is its encoded size, to be handed back via ``consumed``."""

    call_id: int
    item: Any
    size: int


class StreamEnded(Event, gc=False):
    """Server side: the client finished sending its request stream."""

    call_id: int


class HeadersReceived(Event, gc=False):
    """Client side: the handler sent its initial metadata."""

    call_id: int
    metadata: dict[str, Any]


class CallCancelled(Event, gc=False):
    """Server side: stop the handler (the client cancelled, or the deadline passed)."""

    call_id: int
    status: Status


class CreditAvailable(Event, gc=False):
    """The peer granted flow-control credit: a blocked stream sender may continue."""

    call_id: int


class GoAwayReceived(Event):
    """Client side: the server is draining; calls above ``last_call_id`` were not processed."""

    last_call_id: int
    reason: str


class PongReceived(Event):
    """The peer answered our keepalive PING; ``rtt`` is the round trip in seconds."""

    rtt: float


class ConnectionTerminated(Event):
    """The connection must be closed (keepalive timeout, idle timeout)."""

    status: Status
    reason: str


class SettingsReceived(Event):
    """Client side: the server announced how many calls it serves at once on this connection."""

    max_calls: int


class AttestationRequested(Event):
    """The handshake needs this side's attestation document with exactly these fields: run the
    attester (off the event loop for /dev/nsm) and answer with ``Endpoint.supply_attestation``."""

    user_data: bytes
    nonce: bytes
    public_key: bytes


class SessionEstablished(Event):
    """The handshake completed: calls may flow. ``peer_claims`` are the verified attestation
    claims of the peer (None when the peer was not attested)."""

    peer_claims: Any
    mode: str
    channel_binding: bytes
    service: str | None


class _Ending(Event):
    status: Status
    reason: str


class ConnectionClosed(_Ending, kw_only=True):
    """The connection is over; the shell sends ``data_to_send()`` and closes the transport.

    Always the last event, emitted once. ``clean`` is True for an exchange of CLOSE records;
    ``error`` is the exception that ended it (None when clean); ``in_handshake`` says no session
    was established; ``retryable`` says a new connection may succeed (the transport failed or the
    server was at its connection limit), as opposed to a verdict on the peer (attestation,
    protocol violation), which is never retried silently.
    """

    clean: bool = False
    error: Exception | None = None
    in_handshake: bool = False
    retryable: bool = False


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
