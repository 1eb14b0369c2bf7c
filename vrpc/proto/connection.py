"""The sans-IO call multiplexer: many concurrent calls over one message stream.

Theory of operation
-------------------
Bytes of the plaintext message stream go in through ``receive_data(data, now)``; events come out.
Calls, stream items, cancels and control messages go out through methods that append encoded
frames to an outbound buffer, which the shell drains with ``data_to_send()`` once per loop tick
(so all frames produced in a tick leave in one write, and in one record when encrypted).
Time is an input: the shell arms a timer at ``get_timer()`` and calls ``handle_timer(now)``.
Nothing here imports asyncio, socket or time.

Every message is a frame (``framing.py``) whose body is a MessagePack array; the first element is
the message type (``MsgType``). docs/protocol.md lists every shape.

Calls are identified by ``call_id``: the client numbers them 1, 2, 3, ... strictly increasing, so a
replayed or reordered REQUEST is a protocol error and GOAWAY can name the last call it will serve.
Messages for a call id that has finished are ignored: they cross a CANCEL or a deadline on the
wire legitimately.

Per-call state (both roles; the table is ``_CALL_TRANSITIONS``). A call exists from its REQUEST
until its outcome. A call with a request stream starts OPEN, any other call starts
REQUEST_ENDED; a streaming call also tracks its flow-control credit::

    OPEN --request ITEM--> OPEN --END--> REQUEST_ENDED
    OPEN | REQUEST_ENDED --RESPONSE | ERROR | CANCEL | deadline | GOAWAY above it--> (forgotten)

ITEM from the server is legal only on a call whose flags asked for a response stream. Anything
else for a live call is a protocol error; for a forgotten call it is ignored (it may cross a
CANCEL or a deadline on the wire legitimately). Unary calls share one immutable record
(``_UNARY``): they never step, so the hot path pays nothing for the table.

The server announces in SETTINGS (its first message) how many calls it serves at once on the
connection; a REQUEST above that limit is refused with RESOURCE_EXHAUSTED and the detail
``{"unprocessed": true}`` so the client knows it may send it again.

Flow control is per stream and counted in encoded bytes. A sender starts with ``INITIAL_WINDOW``
bytes of credit per stream direction and may send an item while its credit is positive; the
receiver returns credit (CREDIT messages) as the application consumes items, a quarter of the
window at a time. The receiver's buffer for one stream is therefore bounded by the window plus one
message, whatever the peer does; a peer that sends without credit breaks the protocol and loses
the connection.
"""

from __future__ import annotations

import enum
import heapq
from typing import Any

import msgspec

from vrpc.exceptions import LocalProtocolError, RemoteProtocolError, RpcError
from vrpc.proto.events import (
    CallCancelled,
    ConnectionTerminated,
    CreditAvailable,
    ErrorReceived,
    Event,
    GoAwayReceived,
    HeadersReceived,
    ItemReceived,
    PongReceived,
    RequestReceived,
    ResponseReceived,
    SettingsReceived,
    StreamEnded,
)
from vrpc.proto.framing import HEADER, FrameDecoder
from vrpc.status import Status

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "INITIAL_WINDOW",
    "UNPROCESSED",
    "CallInput",
    "CallState",
    "Connection",
    "MsgType",
    "Role",
    "is_unprocessed",
]

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024 + 1024
# 1 MiB: at 256 KiB a stream of 64 KiB items moved two items per round trip (credit-bound, not
# CPU-bound); a window of 16 items keeps the sender busy while credit returns (docs/performance.md).
INITIAL_WINDOW = 1024 * 1024
# The receiver returns credit once this much was consumed: a quarter of the window, so the sender
# has three quarters left in flight when the grant leaves.
_GRANT_AT = INITIAL_WINDOW // 4
_FLAG_STREAM_REQUEST = 1
_FLAG_STREAM_RESPONSE = 2


class MsgType(enum.IntEnum):
    REQUEST = 0  # [0, call_id, method, args, flags, timeout_ms|nil, metadata|nil]
    RESPONSE = 1  # [1, call_id, result, trailers|nil]
    ERROR = 2  # [2, call_id, status, message, details, trailers|nil]
    CANCEL = 3  # [3, call_id]
    ITEM = 4  # [4, call_id, item]
    END = 5  # [5, call_id]                 client: no more request items
    CREDIT = 6  # [6, call_id, bytes]
    HEADERS = 7  # [7, call_id, metadata]
    PING = 8  # [8, opaque]
    PONG = 9  # [9, opaque]
    GOAWAY = 10  # [10, last_call_id, reason]
    SETTINGS = 11  # [11, max_calls]           server: its first message


# The hot path compares plain ints (an IntEnum member compares several times slower); these are
# the same numbers under the same names.
REQUEST = int(MsgType.REQUEST)
RESPONSE = int(MsgType.RESPONSE)
ERROR = int(MsgType.ERROR)
CANCEL = int(MsgType.CANCEL)
ITEM = int(MsgType.ITEM)
END = int(MsgType.END)
CREDIT = int(MsgType.CREDIT)
HEADERS = int(MsgType.HEADERS)
PING = int(MsgType.PING)
PONG = int(MsgType.PONG)
GOAWAY = int(MsgType.GOAWAY)
SETTINGS = int(MsgType.SETTINGS)
# Fields per message type, including the type itself.
_MSG_LENGTHS = {
    REQUEST: 7,
    RESPONSE: 4,
    ERROR: 6,
    CANCEL: 2,
    ITEM: 3,
    END: 2,
    CREDIT: 3,
    HEADERS: 3,
    PING: 2,
    PONG: 2,
    GOAWAY: 3,
    SETTINGS: 2,
}
# The details of a refusal that tells the client the call was never processed (safe to resend).
UNPROCESSED = {"unprocessed": True}


def is_unprocessed(details: Any) -> bool:
    """The error's details say the server never started the call."""
    return isinstance(details, dict) and details.get("unprocessed") is True


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class CallState(enum.Enum):
    OPEN = "open"  # the request stream may still carry ITEMs and its END
    REQUEST_ENDED = "request-ended"  # END seen, or the call never had a request stream


class CallInput(enum.Enum):
    REQUEST_ITEM = "request ITEM"
    END = "END"


# Every legal step of a call's request side (both roles keep the same table, the client for
# what it sends, the server for what it receives). Any (state, input) not listed is an error:
# LocalProtocolError when sending, a protocol violation (the connection closes) when received.
# Responses need no table: a RESPONSE or ERROR (or CANCEL, a deadline, a GOAWAY above the call)
# forgets the call in any state, and response ITEMs are allowed exactly on calls whose flags
# asked for a response stream.
_CALL_TRANSITIONS: dict[tuple[CallState, CallInput], CallState] = {
    (CallState.OPEN, CallInput.REQUEST_ITEM): CallState.OPEN,
    (CallState.OPEN, CallInput.END): CallState.REQUEST_ENDED,
}
# Module constants for the per-item path (an enum member lookup costs ~100 ns on Python 3.11).
_STATE_OPEN, _REQUEST_ENDED = CallState.OPEN, CallState.REQUEST_ENDED
_REQUEST_ITEM, _END_OF_REQUEST = CallInput.REQUEST_ITEM, CallInput.END


_pack_header = HEADER.pack_into


class _Call:
    __slots__ = (
        "pending_grant",
        "recv_credit",
        "send_credit",
        "state",
        "stream_request",
        "stream_response",
    )

    def __init__(self, stream_request: bool, stream_response: bool) -> None:
        self.stream_request = stream_request
        self.stream_response = stream_response
        self.send_credit = INITIAL_WINDOW
        self.recv_credit = INITIAL_WINDOW
        self.pending_grant = 0
        # A call without a request stream starts where a streaming one ends up after END.
        self.state = _STATE_OPEN if stream_request else _REQUEST_ENDED

    def step(self, event: CallInput) -> bool:
        """Apply ``event`` by the table; False (state unchanged) if it is not allowed."""
        nxt = _CALL_TRANSITIONS.get((self.state, event))
        if nxt is None:
            return False
        self.state = nxt
        return True


# Unary calls (no stream in either direction) have no per-call state to mutate: they all share
# this one record, which saves an allocation per call on the hot path. It starts (and stays) in
# REQUEST_ENDED, where the table allows no step, and code that touches credit checks the stream
# flags first, which are False here.
_UNARY = _Call(False, False)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message)


def _metadata(value: Any, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _bad(f"{what} must be a map with string keys")
    return value


def _int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise _bad(f"{what} must be a non-negative integer, got {type(value).__name__}")
    return value


class Connection:
    """One side of a vrpc connection (see the module docstring)."""

    def __init__(
        self,
        role: Role,
        *,
        max_send_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_receive_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_concurrent_calls: int = 1024,
        keepalive_interval: float | None = None,
        keepalive_timeout: float = 20.0,
        idle_timeout: float | None = None,
    ) -> None:
        self.role = role
        self._client = role is Role.CLIENT
        self.max_send_message_size = max_send_message_size
        self.max_concurrent_calls = max_concurrent_calls
        self._frames = FrameDecoder(max_receive_message_size)
        self._out = bytearray()
        self._calls: dict[int, _Call] = {}
        self._last_call_id = 0
        self._deadlines: list[tuple[float, int]] = []
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._idle_timeout = idle_timeout
        self._last_activity: float | None = None  # last bytes received (keepalive)
        # Idleness is about calls, not bytes: PING/PONG keep a connection alive but not busy.
        # ``_idle_since`` restarts whenever the timer sees calls come or go (``_idle_mark``).
        self._idle_since: float | None = None
        self._idle_mark: tuple[int, bool] = (0, False)
        self._ping_sent_at: float | None = None
        self._ping_id = 0
        # Bumped whenever ``get_timer`` may have become earlier other than by ``handle_timer``
        # (a deadline added, an outstanding PING answered by traffic, the clock started): a
        # shell that compares it after a read need not ask ``get_timer`` on every read.
        self.timer_epoch = 0
        self.goaway_sent: int | None = None
        self.goaway_received: int | None = None
        # The server's announced per-connection call limit (client side; None until SETTINGS).
        self.peer_max_calls: int | None = None
        self.closed = False

    # ------------------------------------------------------------------ state

    @property
    def calls_in_flight(self) -> int:
        return len(self._calls)

    def is_active(self, call_id: int) -> bool:
        return call_id in self._calls

    @property
    def partial_input(self) -> int:
        """Received bytes of a message not complete yet (memory accounting)."""
        return self._frames.buffered

    @property
    def frames_received(self) -> int:
        """Complete messages received so far."""
        return self._frames.frames

    @property
    def pending_bytes(self) -> int:
        """Encoded bytes waiting for ``data_to_send``."""
        return len(self._out)

    def data_to_send(self) -> bytearray | None:
        """The encoded frames produced since the last call, or None.

        A fresh buffer is handed over each time: since Python 3.12 the transport may keep a
        reference to unsent data, so a buffer that was written must never be mutated again.
        """
        if not self._out:
            return None
        out, self._out = self._out, bytearray()
        return out

    # ------------------------------------------------------------------ encode

    def _emit(self, message: tuple[Any, ...]) -> int:
        out = self._out
        start = len(out)
        out += b"\x00\x00\x00\x00"
        try:
            _encoder.encode_into(message, out, start + 4)
        except BaseException:
            # An unencodable value must not leave a zero-length prefix (or a partial body) in
            # the stream: every later frame would be misread by the peer.
            del out[start:]
            raise
        size = len(out) - start - 4
        if size > self.max_send_message_size:
            del out[start:]
            raise RpcError(
                Status.RESOURCE_EXHAUSTED,
                f"message of {size} bytes exceeds the maximum of {self.max_send_message_size}",
            )
        _pack_header(out, start, size)
        return size

    # ------------------------------------------------------------------ client API

    def start_call(
        self,
        method: str,
        args: list[Any] | tuple[Any, ...],
        *,
        now: float,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
        stream_request: bool = False,
        stream_response: bool = False,
    ) -> int:
        """Client: send a REQUEST; returns the call id."""
        if not self._client:
            raise LocalProtocolError("only a client starts calls")
        if self.goaway_received is not None:
            raise RpcError(Status.UNAVAILABLE, "the server is draining this connection")
        if self.closed:
            raise RpcError(Status.UNAVAILABLE, "the connection is closed")
        call_id = self._last_call_id + 1
        flags = (_FLAG_STREAM_REQUEST if stream_request else 0) | (
            _FLAG_STREAM_RESPONSE if stream_response else 0
        )
        timeout_ms = None
        if timeout is not None:
            timeout_ms = max(0, int(timeout * 1000))
        self._emit((REQUEST, call_id, method, args, flags, timeout_ms, metadata))
        self._last_call_id = call_id
        self._calls[call_id] = _Call(stream_request, stream_response) if flags else _UNARY
        if timeout is not None:
            heapq.heappush(self._deadlines, (now + timeout, call_id))
            self.timer_epoch += 1
        return call_id

    def start_unary(self, method: str, args: list[Any] | tuple[Any, ...]) -> int:
        """Client: ``start_call`` for the common call (no deadline, metadata or streams),
        with only the checks that call needs: it is the client's hot path."""
        if self.goaway_received is not None or self.closed or not self._client:
            return self.start_call(method, args, now=0.0)  # raises the precise error
        call_id = self._last_call_id + 1
        self._emit((REQUEST, call_id, method, args, 0, None, None))
        self._last_call_id = call_id
        self._calls[call_id] = _UNARY
        return call_id

    def end_request(self, call_id: int) -> None:
        """Client: no more request items on this call."""
        call = self._calls.get(call_id)
        if call is None:
            return
        if not call.step(_END_OF_REQUEST):
            raise LocalProtocolError("end_request on a call without an open request stream")
        self._emit((END, call_id))

    def cancel(self, call_id: int) -> None:
        """Client: abandon a call; the server cancels its handler."""
        if self._calls.pop(call_id, None) is not None:
            self._emit((CANCEL, call_id))

    # ------------------------------------------------------------------ server API

    def send_headers(self, call_id: int, metadata: dict[str, Any]) -> None:
        if call_id in self._calls:
            self._emit((HEADERS, call_id, metadata))

    def send_response(
        self, call_id: int, result: Any, trailers: dict[str, Any] | None = None
    ) -> int:
        """Server: finish a call with OK. A result too large becomes RESOURCE_EXHAUSTED.
        Returns ``pending_bytes`` (whether to write now is the caller's next question)."""
        if self._calls.pop(call_id, None) is None:
            return len(self._out)
        try:
            self._emit((RESPONSE, call_id, result, trailers))
        except RpcError as exc:
            self._emit((ERROR, call_id, int(exc.status), exc.message, None, trailers))
        except (TypeError, ValueError, OverflowError):
            # The call is already forgotten: it must still get an answer, not hang.
            self._emit(
                (ERROR, call_id, int(Status.INTERNAL), "result could not be encoded", None, None)
            )
        return len(self._out)

    def send_error(
        self,
        call_id: int,
        status: Status,
        message: str,
        details: Any = None,
        trailers: dict[str, Any] | None = None,
    ) -> None:
        if self._calls.pop(call_id, None) is None:
            return
        try:
            self._emit((ERROR, call_id, int(status), message, details, trailers))
        except (RpcError, TypeError, ValueError, OverflowError):
            # Unencodable or oversize details must not lose the status itself.
            self._emit((ERROR, call_id, int(status), message, None, None))

    def send_settings(self) -> None:
        """Server: announce the per-connection call limit (the first message of a session)."""
        if self._client:
            raise LocalProtocolError("only a server sends SETTINGS")
        self._emit((SETTINGS, self.max_concurrent_calls))

    def goaway(self, reason: str = "") -> None:
        """Server: serve the calls already received, refuse newer ones."""
        if self.goaway_sent is None:
            self.goaway_sent = self._last_call_id
            self._emit((GOAWAY, self._last_call_id, reason))

    # ------------------------------------------------------------------ both

    def can_send(self, call_id: int) -> bool:
        call = self._calls.get(call_id)
        return call is not None and call.send_credit > 0

    def send_item(self, call_id: int, item: Any) -> bool:
        """Send a stream item. Returns False when the call is gone (cancelled, finished).

        The caller must check ``can_send`` first (and wait for ``CreditAvailable``).
        """
        call = self._calls.get(call_id)
        if call is None:
            return False
        if self._client:
            ok = call.step(_REQUEST_ITEM)
        else:
            ok = call.stream_response
        if not ok:
            raise LocalProtocolError("this call has no open stream in this direction")
        if call.send_credit <= 0:
            raise LocalProtocolError("stream item sent without flow-control credit")
        call.send_credit -= self._emit((ITEM, call_id, item))
        return True

    def consumed(self, call_id: int, size: int) -> None:
        """The application took an item of ``size`` bytes: return the credit when worth it."""
        call = self._calls.get(call_id)
        if call is None:
            return
        call.pending_grant += size
        if call.pending_grant >= _GRANT_AT:
            grant, call.pending_grant = call.pending_grant, 0
            call.recv_credit += grant
            self._emit((CREDIT, call_id, grant))

    def ping(self, now: float) -> None:
        self._ping_id += 1
        self._ping_sent_at = now
        self.timer_epoch += 1
        self._emit((PING, self._ping_id))

    # ------------------------------------------------------------------ receive

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed received plaintext bytes; returns the events they complete.

        Raises RemoteProtocolError (the connection must then be closed) on any violation.
        """
        self._last_activity = now
        events: list[Event] = []
        handle = self._handle
        for body in self._frames.views(data):
            try:
                msg = _decoder.decode(body)
            except msgspec.DecodeError as exc:
                raise _bad(f"undecodable message: {exc}") from None
            except RecursionError:
                # A frame of nested one-element arrays decodes recursively: refuse the nesting
                # depth itself rather than let the interpreter's limit escape as a crash.
                raise _bad("message nested too deeply") from None
            if type(msg) is not list or not msg or type(msg[0]) is not int:
                raise _bad("a message must be a non-empty array starting with its type")
            if _MSG_LENGTHS.get(msg[0]) != len(msg):
                raise _bad(f"message type {msg[0]!r} with {len(msg)} fields is not defined")
            handle(msg, len(body), now, events)
        if self._ping_sent_at is not None:
            self._ping_sent_at = None  # any traffic proves the peer alive
            self.timer_epoch += 1  # the next PING may now be due before the PING's timeout
        return events

    def _handle(self, msg: list[Any], size: int, now: float, events: list[Event]) -> None:
        kind = msg[0]
        if kind == REQUEST:
            self._on_request(msg, size, now, events)
        elif kind in (RESPONSE, ERROR):
            self._on_result(msg, events)
        elif kind == ITEM:
            self._on_item(msg, size, events)
        elif kind == CANCEL:
            if self._client:
                raise _bad("a server does not send CANCEL")
            call_id = _int(msg[1], "call id")
            if self._calls.pop(call_id, None) is not None:
                events.append(CallCancelled(call_id, Status.CANCELLED))
        elif kind == END:
            if self._client:
                raise _bad("a server does not send END")
            call_id = _int(msg[1], "call id")
            call = self._calls.get(call_id)
            if call is not None:
                if not call.step(_END_OF_REQUEST):
                    raise _bad("END on a call without an open request stream")
                events.append(StreamEnded(call_id))
        elif kind == CREDIT:
            call_id = _int(msg[1], "call id")
            grant = _int(msg[2], "credit")
            call = self._calls.get(call_id)
            if call is _UNARY:
                raise _bad("CREDIT on a call without streams")
            if call is not None:
                was_blocked = call.send_credit <= 0
                call.send_credit += grant
                if was_blocked and call.send_credit > 0:
                    events.append(CreditAvailable(call_id))
        elif kind == HEADERS:
            if not self._client:
                raise _bad("a client does not send HEADERS")
            call_id = _int(msg[1], "call id")
            md = _metadata(msg[2], "headers")
            if call_id in self._calls:
                events.append(HeadersReceived(call_id, md or {}))
        elif kind == PING:
            self._emit((PONG, msg[1]))
        elif kind == PONG:
            if self._ping_sent_at is not None:
                events.append(PongReceived(now - self._ping_sent_at))
        elif kind == SETTINGS:
            if not self._client:
                raise _bad("a client does not send SETTINGS")
            limit = _int(msg[1], "max calls")
            if limit < 1:
                raise _bad("SETTINGS must allow at least one call")
            self.peer_max_calls = limit
            events.append(SettingsReceived(limit))
        elif kind == GOAWAY:
            if not self._client:
                raise _bad("a client does not send GOAWAY")
            last = _int(msg[1], "last call id")
            reason = msg[2] if isinstance(msg[2], str) else ""
            self.goaway_received = last
            events.append(GoAwayReceived(last, reason))
            for call_id in [c for c in self._calls if c > last]:
                del self._calls[call_id]
                # Above the server's last call id: it never started them, so any call, idempotent
                # or not, may be sent again elsewhere.
                events.append(
                    ErrorReceived(
                        call_id, Status.UNAVAILABLE, "server draining; not processed", UNPROCESSED
                    )
                )
        else:  # pragma: no cover - receive_data admits only the types of _MSG_LENGTHS
            raise AssertionError(f"message type {kind} has no handler")

    def _on_request(self, msg: list[Any], size: int, now: float, events: list[Event]) -> None:
        if self._client:
            raise _bad("a server does not send REQUEST")
        _, call_id, method, args, flags, timeout_ms, metadata = msg
        if type(call_id) is not int or call_id <= self._last_call_id:
            raise _bad(f"call id {call_id!r} is not above the last one ({self._last_call_id})")
        if type(method) is not str or type(args) is not list or type(flags) is not int:
            raise _bad("REQUEST fields have the wrong types")
        if timeout_ms is not None:
            _int(timeout_ms, "timeout")
        md = None if metadata is None else _metadata(metadata, "metadata")
        self._last_call_id = call_id
        if self.goaway_sent is not None:
            self._emit(
                (ERROR, call_id, int(Status.UNAVAILABLE), "server is draining", UNPROCESSED, None)
            )
            return
        if len(self._calls) >= self.max_concurrent_calls:
            self._emit(
                (
                    ERROR,
                    call_id,
                    int(Status.RESOURCE_EXHAUSTED),
                    f"more than {self.max_concurrent_calls} calls in flight on this connection",
                    UNPROCESSED,
                    None,
                )
            )
            return
        stream_request = bool(flags & _FLAG_STREAM_REQUEST)
        self._calls[call_id] = (
            _Call(stream_request, bool(flags & _FLAG_STREAM_RESPONSE)) if flags else _UNARY
        )
        timeout = None
        if timeout_ms is not None:
            timeout = timeout_ms / 1000
            heapq.heappush(self._deadlines, (now + timeout, call_id))
            self.timer_epoch += 1
        events.append(
            RequestReceived(
                call_id,
                method,
                args,
                md,
                timeout,
                stream_request,
                bool(flags & _FLAG_STREAM_RESPONSE),
                size,
            )
        )

    def _on_result(self, msg: list[Any], events: list[Event]) -> None:
        if not self._client:
            raise _bad("a client does not send RESPONSE or ERROR")
        call_id = _int(msg[1], "call id")
        if self._calls.pop(call_id, None) is None:
            return
        if msg[0] == RESPONSE:
            events.append(ResponseReceived(call_id, msg[2], _metadata(msg[3], "trailers")))
            return
        _, _, status, message, details, trailers = msg
        events.append(
            ErrorReceived(
                call_id,
                Status.from_wire(status),
                message if isinstance(message, str) else "",
                details,
                _metadata(trailers, "trailers"),
            )
        )

    def _on_item(self, msg: list[Any], size: int, events: list[Event]) -> None:
        call_id = _int(msg[1], "call id")
        call = self._calls.get(call_id)
        if call is None:
            return
        if self._client:
            ok = call.stream_response
        else:
            ok = call.step(_REQUEST_ITEM)
        if not ok:
            raise _bad("stream item on a call without an open stream in that direction")
        if call.recv_credit <= 0:
            raise _bad("stream item sent without flow-control credit")
        call.recv_credit -= size
        events.append(ItemReceived(call_id, msg[2], size))

    # ------------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called, or None."""
        # Written out (no list, no min()): the shells ask after every read.
        when = self._deadlines[0][0] if self._deadlines else None
        if self._last_activity is not None:
            if self._ping_sent_at is not None:
                extra: float | None = self._ping_sent_at + self._keepalive_timeout
            elif self._keepalive_interval is not None:
                extra = self._last_activity + self._keepalive_interval
            else:
                extra = None
            if extra is not None and (when is None or extra < when):
                when = extra
            if self._idle_timeout is not None and self._idle_since is not None:
                # Checked lazily (no clock on the hot path): a connection is closed between one
                # and two idle timeouts after its last call ended. Asked for whether or not
                # calls are in flight, so that calls coming and going never make the timer
                # earlier (the shells need not ask again when a call ends); a busy connection
                # pays one look every idle timeout.
                extra = self._idle_since + self._idle_timeout
                if when is None or extra < when:
                    when = extra
        return when

    def start_clock(self, now: float) -> None:
        """Start keepalive and idle timing (the shell calls it when the connection opens)."""
        if self._last_activity is None:
            self._last_activity = now
            self._idle_since = now
            self.timer_epoch += 1

    def handle_timer(self, now: float) -> list[Event]:
        events: list[Event] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, call_id = heapq.heappop(deadlines)
            if self._calls.pop(call_id, None) is None:
                continue
            if self._client:
                self._emit((CANCEL, call_id))
                events.append(ErrorReceived(call_id, Status.DEADLINE_EXCEEDED, "deadline exceeded"))
            else:
                self._emit(
                    (ERROR, call_id, int(Status.DEADLINE_EXCEEDED), "deadline exceeded", None, None)
                )
                events.append(CallCancelled(call_id, Status.DEADLINE_EXCEEDED))
        if self._last_activity is None or self.closed:
            return events
        if self._ping_sent_at is not None:
            if now >= self._ping_sent_at + self._keepalive_timeout:
                self.closed = True
                events.append(ConnectionTerminated(Status.UNAVAILABLE, "keepalive timeout"))
                return events
        elif (
            self._keepalive_interval is not None
            and now >= self._last_activity + self._keepalive_interval
        ):
            self.ping(now)
        if self._idle_timeout is not None:
            mark = (self._last_call_id, bool(self._calls))
            if mark != self._idle_mark or self._idle_since is None:
                # Calls came or went since the last look: idleness starts now at the earliest.
                self._idle_mark = mark
                self._idle_since = now
            elif not self._calls and now >= self._idle_since + self._idle_timeout:
                self.closed = True
                events.append(ConnectionTerminated(Status.UNAVAILABLE, "idle timeout"))
        return events

    def refuse_all(self, status: Status, message: str) -> list[Event]:
        """End every call in flight visibly: the server answers each with ERROR (the handlers
        are to be cancelled), the client fails each locally. Nothing is sent afterwards."""
        calls, self._calls = self._calls, {}
        self._deadlines.clear()
        if self._client:
            return [ErrorReceived(c, status, message) for c in calls]
        for call_id in calls:
            self._emit((ERROR, call_id, int(status), message, None, None))
        return [CallCancelled(c, status) for c in calls]

    def fail_all(self, status: Status, message: str) -> list[Event]:
        """The transport is gone: every call in flight ends (client: errors; server: cancels)."""
        self.closed = True
        calls, self._calls = self._calls, {}
        self._deadlines.clear()
        if self._client:
            return [ErrorReceived(c, status, message) for c in calls]
        return [CallCancelled(c, status) for c in calls]
