"""One vrpc connection, whole and sans-IO: handshake, then record session, then calls.

Theory of operation
-------------------
The pieces below this module are pure one by one (``handshake.py``, ``record.py``,
``connection.py``); an ``Endpoint`` composes them and owns everything *between* them, so the
whole life of a connection can be driven and tested without an event loop:

* **Bytes in**: ``receive_data(data, now)`` and ``eof_received(now)``; a transport that failed
  without an end of stream is reported with ``connection_lost(now, reason)``.
* **Bytes out**: ``data_to_send()`` returns wire-ready buffers (handshake messages, sealed
  records, the CLOSE record) in order; the shell writes them with ``writelines``.
* **Time**: one timer. The shell arms ``get_timer()`` and calls ``handle_timer(now)``. It covers
  the handshake deadline (absolute from the first byte: trickling cannot extend it), keepalive,
  idle, call deadlines, the session age, the time-based key update, the message deadline (a
  message that has begun must complete within ``message_timeout``) and the wait for the peer's
  CLOSE.
* **Memory**: ``buffered_input`` is what the connection holds for messages not complete yet and
  ``partial_since`` since when; the server sums them into its budget and ``shed()`` closes the
  connection it picks.
* **Attestation** is I/O (``/dev/nsm``): the endpoint emits ``AttestationRequested``; the shell
  runs the attester off the loop and answers with ``supply_attestation`` (or
  ``attestation_failed``). The peer may send nothing meanwhile: it is waiting for us, so any byte
  it sends then is a protocol violation and nothing is buffered for it.
* **Events out**: one stream (``EndpointEvent``). ``ConnectionClosed`` is always last and comes
  once; after it the shell writes what ``data_to_send()`` holds and closes the transport.

Phases::

    HANDSHAKE --attestation needed--> ATTESTING --supplied--> HANDSHAKE
    HANDSHAKE --complete--> OPEN --close()--> CLOSING --peer CLOSE / timeout--> CLOSED
    OPEN --peer CLOSE--> CLOSED (our CLOSE answers it)
    any --failure, EOF, timer--> CLOSED

Closing (docs/protocol.md §4) follows TLS's close_notify: CLOSE is the last record of a direction.
The receiver of a CLOSE ends every call still in flight visibly (the server answers each with
ERROR CANCELLED, the client fails each with UNAVAILABLE), then answers with its own CLOSE. The
side that sent CLOSE first keeps reading until the peer's CLOSE arrives or ``close_timeout``
passes. An end of stream without CLOSE is truncation.

Every failure, including one while *sending* (a PONG larger than the send limit, an exhausted
key), becomes a ``ConnectionClosed`` with a status; nothing raises out of the receive or timer
paths. Calls themselves are made through ``calls`` (the ``Connection`` multiplexer).
"""

from __future__ import annotations

import enum
from typing import assert_never

from vrpc.exceptions import (
    AttestationError,
    HandshakeAlert,
    HandshakeError,
    LocalProtocolError,
    RemoteProtocolError,
    RpcError,
)
from vrpc.proto.connection import Connection, Role
from vrpc.proto.events import (
    AttestationRequested,
    ConnectionClosed,
    ConnectionTerminated,
    EndpointEvent,
    Event,
    SessionEstablished,
)
from vrpc.proto.handshake import (
    Alert,
    ClientHandshake,
    HandshakeComplete,
    NeedAttestation,
    ServerHandshake,
    alert_frame,
)
from vrpc.proto.record import Session
from vrpc.status import Status

__all__ = [
    "BUSY_ALERTS",
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_KEY_UPDATE_INTERVAL",
    "DEFAULT_MESSAGE_TIMEOUT",
    "Endpoint",
    "Phase",
]

DEFAULT_CLOSE_TIMEOUT = 2.0
DEFAULT_KEY_UPDATE_INTERVAL = 3600.0
# A message (or record) that has begun to arrive must be complete this long after its first
# byte: the slow-body timeout of HTTP servers. A peer that trickles one byte a second into a
# 4 MiB frame would otherwise pin 4 MiB for as long as it likes (every byte is "activity" to
# keepalive). 30 s lets the largest default message (4 MiB) arrive at 140 KiB/s.
DEFAULT_MESSAGE_TIMEOUT = 30.0


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    ATTESTING = "attesting"
    OPEN = "open"
    CLOSING = "closing"  # our CLOSE is sent; waiting for the peer's
    CLOSED = "closed"


# The phases as module constants: on Python 3.11 ``Phase.OPEN`` goes through the enum metaclass's
# ``__getattr__`` hook (~100 ns), and the phase is tested on every read, write and timer query.
_HANDSHAKE, _ATTESTING, _OPEN, _CLOSING, _CLOSED = (
    Phase.HANDSHAKE,
    Phase.ATTESTING,
    Phase.OPEN,
    Phase.CLOSING,
    Phase.CLOSED,
)


# Refusals that say nothing about the peer's trustworthiness: try later or elsewhere.
BUSY_ALERTS = {
    Alert.CONNECTION_LIMIT: "server at connection limit",
    Alert.HANDSHAKE_LIMIT: "server busy with handshakes",
}

_HANDSHAKE_ERRORS = (HandshakeError, AttestationError, RemoteProtocolError, LocalProtocolError)


class Endpoint:
    """One side of one connection (see the module docstring)."""

    def __init__(
        self,
        handshake: ClientHandshake | ServerHandshake,
        calls: Connection,
        *,
        now: float,
        wall_clock: float,
        handshake_timeout: float = 10.0,
        max_session_age: float | None = None,
        session_grace: float = 5.0,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        key_update_interval: float | None = DEFAULT_KEY_UPDATE_INTERVAL,
        message_timeout: float | None = DEFAULT_MESSAGE_TIMEOUT,
    ) -> None:
        if message_timeout is not None and message_timeout <= 0:
            raise ValueError("message_timeout must be positive (or None for no limit)")
        self.role = calls.role
        self.calls = calls
        self.session: Session | None = None
        self.phase = _HANDSHAKE
        self.mode = ""
        self.peer_claims: object | None = None
        self.channel_binding = b""
        self.established_at: float | None = None
        self._handshake: ClientHandshake | ServerHandshake | None = handshake
        self._wire: list[bytes | bytearray | memoryview] = []
        self._handshake_deadline = now + handshake_timeout
        self._max_session_age = max_session_age
        self._session_grace = session_grace
        self._age_goaway_at: float | None = None
        self._close_timeout = close_timeout
        self._close_deadline: float | None = None
        self._key_update_interval = key_update_interval
        self._next_key_update: float | None = None
        self._close_requested: str | None = None
        self._message_timeout = message_timeout
        # Since when received bytes have been waiting for the rest of their message (None:
        # nothing partial is held), and how many messages had completed at that time.
        self.partial_since: float | None = None
        self._frames_seen = 0
        self._buffered = 0  # bytes of partial records and messages after the last read
        # True when ``get_timer`` may answer earlier than when last asked because of input
        # (a new deadline, a partial message, the handshake moving on): after a read, a shell
        # asks ``get_timer`` again only then. Any other call of the endpoint may move the
        # timer too: shells ask after each of those.
        self.timer_changed = True
        self._calls_epoch = calls.timer_epoch
        # The handshake checks documents at wall-clock time (certificate validity, freshness);
        # every other timer runs on the monotonic ``now``. Both are passed in, never read here.
        self._wall_offset = wall_clock - now

    # ------------------------------------------------------------------ state

    @property
    def is_open(self) -> bool:
        """Calls may be started (the session is established and not closing)."""
        return self.phase is _OPEN

    @property
    def closed(self) -> bool:
        return self.phase is _CLOSED

    @property
    def buffered_input(self) -> int:
        """Received bytes this connection holds for messages not complete yet: a partial record
        and a partial frame (what a peer can make the server keep without finishing anything).
        The handshake's own buffer is capped by its per-message limits (at most 20 KiB)."""
        if self.session is None or self.phase is _CLOSED:
            return 0
        return self._buffered

    @property
    def expires_at(self) -> float:
        """When the session reaches ``max_session_age`` (``inf`` without a limit or before it
        opens): new calls belong on a fresh session from then on."""
        if self._max_session_age is None or self.established_at is None:
            return float("inf")
        return self.established_at + self._max_session_age

    def expired(self, now: float) -> bool:
        """The session is older than ``max_session_age``: start new calls elsewhere."""
        return now >= self.expires_at

    # ------------------------------------------------------------------ input

    def initiate(self, now: float) -> list[EndpointEvent]:
        """Client: send the CLIENT_HELLO."""
        hs = self._handshake
        if not isinstance(hs, ClientHandshake):
            raise LocalProtocolError("only a client initiates")
        try:
            hs.initiate()
        except _HANDSHAKE_ERRORS as exc:
            return self._handshake_failed(exc)
        self._drain_handshake()
        return []

    def receive_data(self, data: bytes, now: float) -> list[EndpointEvent]:
        phase = self.phase
        if phase is _OPEN or phase is _CLOSING:
            # The records path, written out here: it runs for every read of every connection.
            session = self.session
            assert session is not None
            calls = self.calls
            try:
                plain = session.receive(data)
                events: list[Event] = calls.receive_data(plain, now) if plain else []
            except RemoteProtocolError as exc:
                return self._close(exc.status, "protocol violation", error=exc)
            except RecursionError:
                nested = RemoteProtocolError("message nested too deeply")
                return self._close(Status.UNAVAILABLE, "protocol violation", error=nested)
            except RpcError as exc:
                # An answer the peer provoked could not be sent (a PING larger than our send
                # limit).
                return self._close(exc.status, exc.message, error=exc)
            if session.peer_closed:
                return [*events, *self._peer_closed()]  # type: ignore[list-item]
            held = session.buffered + calls.partial_input
            self._buffered = held
            if held:
                self._note_partial(now)
            elif self.partial_since is not None:
                self.partial_since = None
            if calls.timer_epoch != self._calls_epoch:
                self.timer_changed = True
            return events  # type: ignore[return-value]
        if phase is _HANDSHAKE or phase is _ATTESTING:
            self.timer_changed = True
            return self._receive_handshake(data, now)
        return []  # CLOSED: whatever still arrives is not read

    def eof_received(self, now: float) -> list[EndpointEvent]:
        phase = self.phase
        if phase is _CLOSED:
            return []
        if phase is _HANDSHAKE or phase is _ATTESTING:
            return self._close(
                Status.UNAVAILABLE,
                "the connection closed during the handshake",
                error=HandshakeError("the connection closed during the handshake"),
                retryable=True,
            )
        session = self.session
        assert session is not None
        try:
            session.eof_received()
        except RemoteProtocolError as exc:
            return self._close(Status.UNAVAILABLE, str(exc), error=exc, retryable=True)
        # A plaintext session has no CLOSE record: its end of stream is its close.
        return self._close(Status.UNAVAILABLE, "the peer closed the connection", clean=True)

    def connection_lost(self, now: float, reason: str) -> list[EndpointEvent]:
        """The transport failed or was closed under us (no more bytes either way)."""
        if self.phase is _CLOSED:
            return []
        in_handshake = self.phase is _HANDSHAKE or self.phase is _ATTESTING
        error = HandshakeError(reason) if in_handshake else None
        return self._close(Status.UNAVAILABLE, reason, error=error, retryable=True)

    # ------------------------------------------------------------------ handshake

    def _receive_handshake(self, data: bytes, now: float) -> list[EndpointEvent]:
        hs = self._handshake
        assert hs is not None
        try:
            events = hs.receive_data(data, now + self._wall_offset)
        except _HANDSHAKE_ERRORS as exc:
            return self._handshake_failed(exc)
        return self._handshake_events(events, now)

    def _handshake_events(
        self, events: list[NeedAttestation | HandshakeComplete], now: float
    ) -> list[EndpointEvent]:
        self._drain_handshake()
        out: list[EndpointEvent] = []
        for ev in events:
            match ev:
                case NeedAttestation():
                    self.phase = _ATTESTING
                    out.append(AttestationRequested(ev.user_data, ev.nonce, ev.public_key))
                case HandshakeComplete():
                    out.extend(self._established(ev, now))
                case _:
                    assert_never(ev)
        return out

    def supply_attestation(self, document: bytes, now: float) -> list[EndpointEvent]:
        """Answer ``AttestationRequested`` with this side's document."""
        if self.phase is not _ATTESTING:
            return []  # closed meanwhile (timeout, peer gone): the document is not needed
        hs = self._handshake
        assert hs is not None
        self.phase = _HANDSHAKE
        try:
            hs.supply_attestation(document)
        except _HANDSHAKE_ERRORS as exc:
            return self._handshake_failed(exc)
        return self._receive_handshake(b"", now)

    def attestation_failed(self, reason: str, now: float) -> list[EndpointEvent]:
        """The attester could not produce a document."""
        if self.phase is not _ATTESTING:
            return []
        self._queue_alert(Alert.INTERNAL_ERROR)
        return self._close(
            Status.UNAVAILABLE,
            f"attestation failed: {reason}",
            error=HandshakeError(f"attestation failed: {reason}"),
        )

    def refuse(self, alert: Alert, reason: str) -> list[EndpointEvent]:
        """Server: refuse the connection before reading anything (e.g. at its connection
        limit); the peer learns why from the ALERT."""
        if self.phase is not _HANDSHAKE:
            raise LocalProtocolError("only a connection still in its handshake can be refused")
        self._handshake = None
        self._queue_alert(alert)
        return self._close(Status.UNAVAILABLE, reason, error=HandshakeError(reason), retryable=True)

    def shed(self, now: float, reason: str) -> list[EndpointEvent]:
        """Close at once to free what this connection holds (the server's memory budget):
        calls in flight fail with RESOURCE_EXHAUSTED, our CLOSE goes out if it still can."""
        if self.phase is _CLOSED:
            return []
        if self.session is None:
            self._queue_alert(Alert.INTERNAL_ERROR)
        return self._close(
            Status.RESOURCE_EXHAUSTED, reason, error=RpcError(Status.RESOURCE_EXHAUSTED, reason)
        )

    def _queue_alert(self, alert: Alert) -> None:
        self._wire.append(alert_frame(alert))

    def _drain_handshake(self) -> None:
        hs = self._handshake
        if hs is not None:
            out = hs.data_to_send()
            if out:
                self._wire.append(out)

    def _handshake_failed(self, exc: Exception) -> list[EndpointEvent]:
        self._drain_handshake()  # the ALERT the handshake queued, if any
        if isinstance(exc, HandshakeAlert) and exc.alert in BUSY_ALERTS:
            reason = BUSY_ALERTS[exc.alert]
            return self._close(Status.UNAVAILABLE, reason, error=exc, retryable=True)
        return self._close(Status.UNAVAILABLE, str(exc), error=exc)

    def _established(self, done: HandshakeComplete, now: float) -> list[EndpointEvent]:
        self._handshake = None
        self.session = done.session
        self.mode = done.mode
        self.peer_claims = done.peer_claims
        self.channel_binding = getattr(done.session, "channel_binding", b"")
        self.phase = _OPEN
        self.established_at = now
        self.calls.start_clock(now)
        if self._key_update_interval is not None and done.session.encrypted:
            self._next_key_update = now + self._key_update_interval
        if self._max_session_age is not None and self.role is Role.SERVER:
            self._age_goaway_at = now + self._max_session_age
        if self.role is Role.SERVER:
            self.calls.send_settings()
        out: list[EndpointEvent] = [
            SessionEstablished(done.peer_claims, done.mode, self.channel_binding, done.service)
        ]
        if self._close_requested is not None and self.role is Role.SERVER:
            self.calls.goaway(self._close_requested)  # requests already sent are refused
        if done.trailing:
            out.extend(self.receive_data(done.trailing, now))
        if self._close_requested is not None:
            out.extend(self.close(now, self._close_requested))
        return out

    # ------------------------------------------------------------------ records and calls

    def _note_partial(self, now: float) -> None:
        """A partial message is held: start its deadline when it appears, and restart it
        whenever a message completes (the next one is then the partial one)."""
        frames = self.calls.frames_received
        if self.partial_since is None:
            self.timer_changed = True  # the message deadline starts
        if self.partial_since is None or frames != self._frames_seen:
            self.partial_since = now
            self._frames_seen = frames

    def _peer_closed(self) -> list[EndpointEvent]:
        peer = "client" if self.role is Role.SERVER else "server"
        if self.role is Role.SERVER:
            status, message = Status.CANCELLED, "the client closed the connection"
        else:
            status, message = Status.UNAVAILABLE, "the server closed the connection"
        ended: list[EndpointEvent] = self.calls.refuse_all(status, message)  # type: ignore[assignment]
        return [
            *ended,
            *self._close(Status.UNAVAILABLE, f"the {peer} closed the connection", clean=True),
        ]

    def close(self, now: float, reason: str = "") -> list[EndpointEvent]:
        """Begin a graceful close: what is queued leaves, then our CLOSE; the connection ends
        when the peer's CLOSE arrives or ``close_timeout`` passes. Calls still in flight stay
        pending until then (the peer may still answer them)."""
        if self.phase is _OPEN:
            self._seal_pending(closing=True)
            self.phase = _CLOSING
            self._close_deadline = now + self._close_timeout
            if self.session is not None and not self.session.encrypted:
                # Plaintext mode has no CLOSE record: the end of stream is the close.
                return self._close(Status.UNAVAILABLE, reason or "closed", clean=True)
            return []
        if self.phase is _HANDSHAKE or self.phase is _ATTESTING:
            # The peer may already consider the session open (a client is, once it sent its
            # Finished): finish the handshake, then close properly. The deadline bounds it.
            self._close_requested = reason or "closed"
        return []

    def _close(
        self,
        status: Status,
        reason: str,
        *,
        clean: bool = False,
        error: Exception | None = None,
        retryable: bool = False,
    ) -> list[EndpointEvent]:
        """Enter CLOSED: our CLOSE goes out if the session can still send, every call left
        ends, and ConnectionClosed is the last event."""
        if self.phase is _CLOSED:
            return []
        in_handshake = self.session is None
        if self.phase is _OPEN:
            self._seal_pending(closing=True)
        self.phase = _CLOSED
        self._handshake = None
        ended: list[EndpointEvent] = self.calls.fail_all(status, reason)  # type: ignore[assignment]
        return [
            *ended,
            ConnectionClosed(
                status,
                reason,
                clean=clean,
                error=error,
                in_handshake=in_handshake,
                retryable=retryable,
            ),
        ]

    def _seal_pending(self, *, closing: bool = False) -> None:
        session = self.session
        if session is None:
            return
        plain = self.calls.data_to_send()
        try:
            if plain is not None:
                self._wire.extend(session.seal(plain))
            if closing:
                close = session.close()
                if close:
                    self._wire.append(close)
        except LocalProtocolError:
            pass  # the session already failed: nothing more can be sent

    @property
    def wants_write(self) -> bool:
        """``data_to_send`` has something (a shell need not schedule a write otherwise)."""
        return bool(self._wire) or (self.phase is _OPEN and self.calls.pending_bytes > 0)

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Wire bytes to write, in order (possibly empty). Buffers are fresh and never touched
        again by the endpoint (transports may keep a reference to unsent data)."""
        wire = self._wire
        if self.phase is _OPEN:
            plain = self.calls.data_to_send()
            session = self.session
            assert session is not None
            if plain is not None:
                try:
                    sealed = session.seal(plain)
                except LocalProtocolError:
                    return self._take_wire()
                if not wire:
                    return sealed
                wire.extend(sealed)
        if wire:
            return self._take_wire()
        return []

    def _take_wire(self) -> list[bytes | bytearray | memoryview]:
        wire, self._wire = self._wire, []
        return wire

    # ------------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        self.timer_changed = False
        self._calls_epoch = self.calls.timer_epoch
        phase = self.phase
        if phase is not _OPEN:
            if phase is _HANDSHAKE or phase is _ATTESTING:
                return self._handshake_deadline
            if phase is _CLOSING:
                return self._close_deadline
            return None  # closed
        when = self.calls.get_timer()
        # Written out (no list, no loop): the shells ask after every read.
        extra = self._next_key_update
        if extra is not None and (when is None or extra < when):
            when = extra
        extra = self._age_goaway_at
        if extra is not None and (when is None or extra < when):
            when = extra
        if self.partial_since is not None and self._message_timeout is not None:
            extra = self.partial_since + self._message_timeout
            if when is None or extra < when:
                when = extra
        return when

    def handle_timer(self, now: float) -> list[EndpointEvent]:
        phase = self.phase
        if phase is _HANDSHAKE or phase is _ATTESTING:
            if now >= self._handshake_deadline:
                return self._close(
                    Status.UNAVAILABLE,
                    "handshake timed out",
                    error=HandshakeError("handshake timed out"),
                )
            return []
        if phase is _CLOSING:
            assert self._close_deadline is not None
            if now >= self._close_deadline:
                return self._close(Status.UNAVAILABLE, "the peer did not answer our CLOSE")
            return []
        if phase is _CLOSED:
            return []
        if (
            self.partial_since is not None
            and self._message_timeout is not None
            and now >= self.partial_since + self._message_timeout
        ):
            reason = f"message not complete within message_timeout ({self._message_timeout:g} s)"
            return self._close(Status.UNAVAILABLE, reason, error=RemoteProtocolError(reason))
        out: list[EndpointEvent] = []
        for ev in self.calls.handle_timer(now):
            if isinstance(ev, ConnectionTerminated):
                if ev.reason == "idle timeout" and self.role is Role.SERVER:
                    self.calls.goaway("idle timeout")
                out.extend(self._close(ev.status, ev.reason, clean=ev.reason == "idle timeout"))
                return out
            out.append(ev)  # type: ignore[arg-type]
        if self._next_key_update is not None and now >= self._next_key_update:
            session = self.session
            assert session is not None
            session.request_key_update()
            self._next_key_update = now + (self._key_update_interval or 0.0)
        if self._age_goaway_at is not None and now >= self._age_goaway_at:
            out.extend(self._session_age(now))
        return out

    def _session_age(self, now: float) -> list[EndpointEvent]:
        """Server: the session reached ``max_session_age``. First a GOAWAY (calls in flight may
        finish within ``session_grace``), then a close that refuses whatever is left."""
        if self.calls.goaway_sent is None:
            self.calls.goaway("session age limit")
            self._age_goaway_at = now + self._session_grace
            if not self.calls.calls_in_flight:
                self._age_goaway_at = now  # nothing to wait for: close at the next look
            return []
        self._age_goaway_at = None
        ended: list[EndpointEvent] = self.calls.refuse_all(  # type: ignore[assignment]
            Status.UNAVAILABLE, "session age limit: call not finished within the grace period"
        )
        return [*ended, *self._close(Status.UNAVAILABLE, "session age limit", clean=True)]
