"""The server shell: accept connections, run the attested handshake, dispatch calls to handlers.

A bad peer costs one connection, never the server; a failing handler costs one call:

* a handler's ``RpcError`` goes back as it is; any other exception becomes INTERNAL with a fixed
  message, and only the server log gets the traceback;
* arguments are validated against the declared type hints before the handler runs;
* limits (connections, calls per connection and in total, message sizes, handshake and idle time)
  answer with RESOURCE_EXHAUSTED or close the offending connection, nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, assert_never

import structlog

from vrpc._flow import FlowGate
from vrpc._shell import BARE_CONTEXT, EndpointProtocol, monotonic
from vrpc._validation import ArgumentBinder, served_methods
from vrpc._verify import handshake_verifier
from vrpc.attestation import Verifier
from vrpc.context import CallContext, Peer, _current
from vrpc.exceptions import RpcError
from vrpc.metrics import Metrics
from vrpc.proto.connection import DEFAULT_MAX_MESSAGE_SIZE, INITIAL_WINDOW, Connection, Role
from vrpc.proto.endpoint import DEFAULT_MESSAGE_TIMEOUT, Endpoint
from vrpc.proto.events import (
    AttestationRequested,
    CallCancelled,
    ConnectionClosed,
    CreditAvailable,
    EndpointEvent,
    ErrorReceived,
    GoAwayReceived,
    HeadersReceived,
    ItemReceived,
    PongReceived,
    RequestReceived,
    ResponseReceived,
    SessionEstablished,
    SettingsReceived,
    StreamEnded,
)
from vrpc.proto.handshake import Alert, ServerHandshake
from vrpc.service import MethodSpec, Service
from vrpc.status import Status
from vrpc.transport import Listener, create_server

__all__ = ["Server", "ServerInterceptor"]

log = structlog.get_logger("vrpc.server")

CallNext = Callable[[], Awaitable[Any]]

# Answers are coalesced into one write per loop turn, but at most this many answers (or bytes)
# per write: sending a batch in a few slices lets the client start on the first answers while
# the server is still working on the rest, so the two processes overlap instead of taking turns
# (measured: 64 B x 64 in flight went from ~65k to ~112k calls/s; see docs/performance.md).
_EARLY_FLUSH_ANSWERS = 16
_EARLY_FLUSH_BYTES = 64 * 1024
# Read on every call: module constants, since an enum member lookup costs ~100 ns on Python 3.11.
_OK, _INTERNAL = Status.OK, Status.INTERNAL


class ServerInterceptor(Protocol):
    """Wraps every call: may read ``ctx`` (method, metadata, peer), deny with ``RpcError``,
    observe the outcome (the exception or the result) and time it."""

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Any: ...


class _Method:
    __slots__ = ("bind", "handler", "spec", "streams_request", "streams_response")

    def __init__(self, spec: MethodSpec, handler: Callable[..., Any]) -> None:
        self.spec = spec
        self.handler = handler
        self.bind = ArgumentBinder(spec).bind
        # Read once here: the per-call path only tests these two booleans.
        self.streams_request = spec.kind.streams_request
        self.streams_response = spec.kind.streams_response


class InboundStream:
    """The async iterator a client- or bidi-streaming handler receives.

    Items wait here until the handler takes them; credit goes back to the peer as they are
    taken, so a slow handler slows the sender (flow control) instead of growing this buffer.
    """

    def __init__(self, proto: _ServerConnection, call_id: int, converter: Callable[[Any], Any]):
        self._proto = proto
        self._call_id = call_id
        self._convert = converter
        self._items: asyncio.Queue[tuple[Any, int] | None] = asyncio.Queue()
        self.buffered_bytes = 0

    def _put(self, item: Any, size: int) -> None:
        self.buffered_bytes += size
        self._items.put_nowait((item, size))

    def _end(self) -> None:
        self._items.put_nowait(None)

    def __aiter__(self) -> InboundStream:
        return self

    async def __anext__(self) -> Any:
        entry = await self._items.get()
        if entry is None:
            self._items.put_nowait(None)  # stay ended for repeated iteration
            raise StopAsyncIteration
        item, size = entry
        self.buffered_bytes -= size
        self._proto.conn.consumed(self._call_id, size)
        self._proto.schedule_flush()
        try:
            return self._convert(item)
        except Exception as exc:
            raise RpcError(Status.INVALID_ARGUMENT, f"invalid stream item: {exc}") from None


class _ServerConnection(EndpointProtocol):
    def __init__(self, server: Server) -> None:
        super().__init__(attester=server.attester)
        self.server = server
        self.tasks: dict[int, asyncio.Task[None]] = {}
        # What each call in flight counts in the server's max_in_flight_bytes (see _start).
        self.call_bytes: dict[int, int] = {}
        self.inbound: dict[int, InboundStream] = {}
        self.credit_gates: dict[int, FlowGate] = {}
        self.peer = Peer("?")
        self.opened_at = monotonic()
        self.established = False
        self.unflushed = 0  # answers queued since the last write (see _EARLY_FLUSH_*)
        self.cut_off = False  # the server's shutdown cancels the calls still running
        self.handshaking = False  # counted in the server's concurrent-handshake limit
        # What this connection holds in the server's memory budget (see Server.max_buffered):
        # partial input (``held_input``, kept up to date by the shell after every read), and the
        # output queued when writing last paused.
        self.held_output = 0
        self.held_since: float | None = None  # output paused since (input: the endpoint knows)

    def make_endpoint(self, now: float, wall_clock: float) -> Endpoint:
        server = self.server
        calls = Connection(
            Role.SERVER,
            max_send_message_size=server.max_send_message_size,
            max_receive_message_size=server.max_receive_message_size,
            max_concurrent_calls=server.max_calls_per_connection,
            keepalive_interval=server.keepalive_interval,
            keepalive_timeout=server.keepalive_timeout,
            idle_timeout=server.idle_timeout,
        )
        self.conn = calls
        return Endpoint(
            server._new_handshake(),
            calls,
            now=now,
            wall_clock=wall_clock,
            handshake_timeout=server.handshake_timeout,
            max_session_age=server.max_session_age,
            session_grace=server.session_grace,
            message_timeout=server.message_timeout,
        )

    def flush(self) -> None:
        self.unflushed = 0
        super().flush()

    def on_connection_made(self) -> None:
        server = self.server
        self.peer = Peer(self.peer_address)
        if not server._accepting:
            server.metrics.connection_refused("draining")
            self.after(self.endpoint.refuse(Alert.CONNECTION_LIMIT, "server is shutting down"))
        elif len(server._connections) >= server.max_connections:
            log.warning("connection refused", peer=self.peer_address, reason="connection limit")
            server.metrics.connection_refused("limit")
            self.after(self.endpoint.refuse(Alert.CONNECTION_LIMIT, "server at connection limit"))
        elif server._handshakes >= server.max_handshakes:
            # Each handshake costs an X25519 exchange and an attestation: a flood of hellos is
            # refused here, before either, and established connections keep the loop.
            log.warning("connection refused", peer=self.peer_address, reason="handshake limit")
            server.metrics.connection_refused("handshake_limit")
            self.after(self.endpoint.refuse(Alert.HANDSHAKE_LIMIT, "server busy with handshakes"))
        else:
            server._connections.add(self)
            server._handshakes += 1
            self.handshaking = True
            server.metrics.connection_accepted()

    def _handshake_over(self) -> None:
        if self.handshaking:
            self.handshaking = False
            self.server._handshakes -= 1

    def run_attester(self, produce: Callable[[], bytes]) -> None:
        # Attesters that block (/dev/nsm serializes its calls) run at most max_attestations at
        # once; the others wait in arrival order (at most max_handshakes of them).
        server = self.server
        if server._attesting < server.max_attestations:
            server._attesting += 1
            super().run_attester(produce)
        else:
            server._attest_queue.append((self, produce))

    def _attested(self, future: asyncio.Future[bytes]) -> None:
        server = self.server
        server._attesting -= 1
        while server._attest_queue:
            proto, produce = server._attest_queue.popleft()
            if not proto.closed:
                server._attesting += 1
                EndpointProtocol.run_attester(proto, produce)
                break
        super()._attested(future)

    tracks_input = True

    def input_held(self, held: int) -> None:
        delta, self.held_input = held - self.held_input, held
        self.server._hold(self, delta)  # may shed this very connection

    # A peer that sends requests but never reads the responses would otherwise make the server
    # buffer every response: stop reading it while its responses cannot leave. Only the server
    # does this (a client always reads), so two peers can never wait on each other.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            # Accounted at the pause (not on every write): the peer stopped reading what it
            # asked for, and the queue stays at least this large until it reads again.
            queued = self.transport.get_write_buffer_size()
            self.held_since = monotonic()
            delta, self.held_output = queued - self.held_output, queued
            self.server._hold(self, delta)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._release_output()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _release_output(self) -> None:
        if self.held_output:
            held, self.held_output = self.held_output, 0
            self.server._hold(self, -held)
        self.held_since = None

    def holding_since(self) -> float:
        """Since when this connection has held memory without finishing a message or reading
        its answers (the oldest holder is shed first when the budget is exceeded)."""
        since = [t for t in (self.endpoint.partial_since, self.held_since) if t is not None]
        return min(since) if since else monotonic()

    def dispatch(self, events: list[EndpointEvent]) -> None:
        for ev in events:
            match ev:
                case RequestReceived():
                    self._start(ev)
                case ItemReceived():
                    stream = self.inbound.get(ev.call_id)
                    if stream is not None:
                        stream._put(ev.item, ev.size)
                case StreamEnded():
                    stream = self.inbound.get(ev.call_id)
                    if stream is not None:
                        stream._end()
                case CallCancelled():
                    task = self.tasks.get(ev.call_id)
                    if task is not None:
                        self.cancel_task(ev.call_id, task)
                case CreditAvailable():
                    gate = self.credit_gates.get(ev.call_id)
                    if gate is not None:
                        gate.open()
                case PongReceived():
                    pass  # the client is alive; the endpoint already noted it
                case AttestationRequested():
                    self.attest(ev)
                case SessionEstablished():
                    self._established(ev)
                case ConnectionClosed():
                    self._closed(ev)
                case (
                    ResponseReceived()
                    | ErrorReceived()
                    | HeadersReceived()
                    | GoAwayReceived()
                    | SettingsReceived()
                ):
                    # The core refuses these from a client before they become events.
                    raise AssertionError(f"client-side event on a server: {ev!r}")
                case _:
                    assert_never(ev)

    def _established(self, ev: SessionEstablished) -> None:
        self._handshake_over()
        self.established = True
        self.server.metrics.handshake_completed(ev.mode, monotonic() - self.opened_at)
        self.peer = Peer(self.peer_address, ev.peer_claims, ev.mode, ev.channel_binding)
        log.info("connection open", peer=self.peer_address, mode=ev.mode)
        if self.server._draining:
            self.conn.goaway("server is shutting down")

    def _closed(self, ev: ConnectionClosed) -> None:
        self.connection_closed(ev)
        self._handshake_over()
        if self.held_input:
            held, self.held_input = self.held_input, 0
            self.server._hold(self, -held)
        self._release_output()
        counted = self in self.server._connections  # refused connections were never admitted
        if ev.in_handshake and counted:
            # A transport that ended says nothing about the peer: counted apart from verdicts.
            failure = "connection_lost" if ev.retryable or ev.error is None else ev.error
            self.server.metrics.handshake_failed(failure)
        self.server._connections.discard(self)
        for call_id, task in list(self.tasks.items()):
            self.cancel_task(call_id, task)
        for gate in self.credit_gates.values():
            gate.open()
        if ev.in_handshake:
            # A connection refused at the limit already logged "connection refused": one line
            # per refusal, so a connection storm does not double the log.
            if ev.error is not None and counted:
                log.warning(
                    "handshake failed",
                    peer=self.peer_address,
                    reason=ev.reason,
                    error=type(ev.error).__name__,
                )
            return
        log.log(
            logging.INFO if ev.error is None else logging.WARNING,
            "connection closed",
            peer=self.peer_address,
            seconds=round(monotonic() - self.opened_at, 3),
            reason=ev.reason,
            clean=ev.clean,
            error=None if ev.error is None else str(ev.error),
        )

    def _start(self, ev: RequestReceived) -> None:
        server = self.server
        call_id = ev.call_id
        method = server._methods.get(ev.method)
        if method is None:
            self._refuse(ev, Status.UNIMPLEMENTED, f"unknown method {ev.method!r}")
            return
        if server._in_flight >= server.max_concurrent_calls:
            message = f"the server has {server.max_concurrent_calls} calls in flight"
            self._refuse(ev, Status.RESOURCE_EXHAUSTED, message)
            return
        if (
            ev.stream_request != method.streams_request
            or ev.stream_response != method.streams_response
        ):
            kind = method.spec.kind.value
            self._refuse(
                ev, Status.INVALID_ARGUMENT, f"{ev.method} is a {kind} method", {"kind": kind}
            )
            return
        try:
            args = method.bind(ev.args)
        except RpcError as exc:
            self._refuse(ev, exc.status, exc.message, exc.details)
            return
        # The arguments stay in memory until the handler returns, and a request stream's window
        # lets the client send that much more before the handler reads any of it: a peer
        # calling slow handlers with large arguments would otherwise hold memory without bound.
        weight = ev.size + INITIAL_WINDOW if method.streams_request else ev.size
        held = server._in_flight_bytes
        limit = server.max_in_flight_bytes
        if held and limit is not None and held + weight > limit:
            # (One call runs whatever its size: a single message is bounded by its own limit.)
            message = f"the server's calls in flight hold {held} bytes (limit {limit})"
            self._refuse(ev, Status.RESOURCE_EXHAUSTED, message)
            return
        server._in_flight_bytes = held + weight
        self.call_bytes[call_id] = weight
        if method.streams_request:
            from vrpc._validation import converter_for

            item_type = method.spec.request_item_type
            stream = InboundStream(self, call_id, converter_for(item_type))
            self.inbound[call_id] = stream
            args.append(stream)
        deadline = None if ev.timeout is None else monotonic() + ev.timeout
        ctx = CallContext(ev.method, ev.metadata or {}, self.peer, deadline, self, call_id)
        server._in_flight += 1
        coro = self._run(method, call_id, args, ctx)
        if self.loop.get_task_factory() is None:
            # What create_task does without a factory, named after the method: uvloop's
            # create_task would first format a "Task-N" name and then replace it.
            task: asyncio.Task[None] = asyncio.Task(coro, loop=self.loop, name=ev.method)
        else:
            task = self.loop.create_task(coro, name=ev.method)
        self.tasks[call_id] = task

    def _refuse(
        self, ev: RequestReceived, status: Status, message: str, details: Any = None
    ) -> None:
        """Answer a call that will not run, and count it in the method's statuses."""
        self.conn.send_error(ev.call_id, status, message, details)
        self.server.metrics.record(ev.method, status, 0.0)

    def cancel_task(self, call_id: int, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step never enters _run, so _run's cleanup never
        # happens (a REQUEST and its CANCEL often arrive in one read): do it when it ends.
        task.cancel()
        task.add_done_callback(lambda _: self._forget(call_id))

    def _cancelled_status(self) -> tuple[Status, str]:
        """What the client hears about a handler the server cancelled while the call was live.
        Cut off by a shutdown past its grace period, the call failed because the server went
        away: UNAVAILABLE, which an idempotent call may retry elsewhere."""
        if self.cut_off:
            return Status.UNAVAILABLE, "server shut down before the call finished"
        return Status.CANCELLED, "call cancelled by the server"

    def _forget(self, call_id: int) -> None:
        if self.tasks.pop(call_id, None) is None:
            return  # _run ran and cleaned up
        self._release(call_id)
        self.inbound.pop(call_id, None)
        self.credit_gates.pop(call_id, None)
        if self.conn.is_active(call_id):
            self.conn.send_error(call_id, *self._cancelled_status())
            self.schedule_flush()

    def _release(self, call_id: int) -> None:
        """A call admitted by ``_start`` is over: give back its place and its weight in the
        server's limits, and let a drain waiting for the last call go on."""
        server = self.server
        server._in_flight -= 1
        server._in_flight_bytes -= self.call_bytes.pop(call_id, 0)
        if not server._in_flight and server._draining:
            server._idle.set()

    def send_headers(self, call_id: int, metadata: dict[str, Any]) -> None:
        self.conn.send_headers(call_id, metadata)
        self.schedule_flush()

    async def _run(self, method: _Method, call_id: int, args: list[Any], ctx: CallContext) -> None:
        server = self.server
        _current.set(ctx)
        started = monotonic()
        status = _OK
        pending = 0  # bytes waiting to be written after this answer (large answers go at once)
        try:
            if server.interceptors:
                if method.streams_response:
                    invoke: CallNext = lambda: self._pump(method, call_id, args)  # noqa: E731
                else:
                    invoke = lambda: method.handler(*args)  # noqa: E731
                for interceptor in reversed(server.interceptors):
                    invoke = _bind_interceptor(interceptor, ctx, invoke)
                result = await invoke()
            elif method.streams_response:
                await self._pump(method, call_id, args)
                result = None
            else:
                result = await method.handler(*args)
        except RpcError as exc:
            status = exc.status
            self.conn.send_error(
                call_id, exc.status, exc.message, exc.details, ctx.trailers or None
            )
        except asyncio.CancelledError:
            # Cancelled by the client, by the deadline (the core already answered), by a lost
            # connection, or by a drain past its grace period.
            status, message = self._cancelled_status()
            if self.conn.is_active(call_id):
                self.conn.send_error(call_id, status, message)
        except Exception:
            status = _INTERNAL
            log.exception("handler failed", method=ctx.method, peer=self.peer_address)
            self.conn.send_error(call_id, Status.INTERNAL, "internal error")
        else:
            if method.streams_response:
                result = None
            pending = self.conn.send_response(call_id, result, ctx.trailers or None)
        finally:
            self._release(call_id)
            self.tasks.pop(call_id, None)
            if method.streams_request:
                self.inbound.pop(call_id, None)
            if method.streams_response:
                self.credit_gates.pop(call_id, None)
            if not self.closed:
                self.unflushed += 1
                if (
                    not self.tasks
                    or self.unflushed >= _EARLY_FLUSH_ANSWERS
                    or pending >= _EARLY_FLUSH_BYTES
                ):
                    # The last call in flight on this connection: nothing else will join this
                    # write, so send now instead of a loop turn later (latency at 1 in flight).
                    self.unflushed = 0
                    self.flush_now()
                else:
                    self.schedule_flush()
            elapsed = monotonic() - started
            server.metrics.record(ctx.method, status, elapsed)
            if server.log_calls or status is _INTERNAL:
                server._log_call(ctx.method, status, elapsed, self.peer_address)

    async def _pump(self, method: _Method, call_id: int, args: list[Any]) -> None:
        """Drive a server-streaming handler, honouring credit and the transport's buffer."""
        conn = self.conn
        gate = self.credit_gates[call_id] = FlowGate()
        agen: AsyncIterator[Any] = method.handler(*args)
        try:
            async for item in agen:
                while not conn.can_send(call_id):
                    if not conn.is_active(call_id) or self.closed:
                        raise asyncio.CancelledError
                    gate.close()
                    await gate.wait()
                if not self.write_gate.is_open:
                    await self.write_gate.wait()
                if not conn.send_item(call_id, item):
                    raise asyncio.CancelledError
                self.schedule_flush()
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()


def _bind_interceptor(interceptor: ServerInterceptor, ctx: CallContext, nxt: CallNext) -> CallNext:
    return lambda: interceptor(ctx, nxt)


class _LoopLagMonitor:
    """Notices when the event loop was blocked (a handler doing blocking work) and logs it.

    A callback due every ``interval`` seconds measures how late it ran; lateness above
    ``threshold`` means nothing else could run meanwhile, every connection included.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.interval = min(0.1, threshold / 2)
        self.loop = asyncio.get_running_loop()
        self.blocked = 0
        self._due = monotonic() + self.interval
        self._handle: asyncio.TimerHandle | None = self.loop.call_later(
            self.interval, self._tick, context=BARE_CONTEXT
        )

    def _tick(self) -> None:
        now = monotonic()
        lag = now - self._due
        if lag > self.threshold:
            self.blocked += 1
            log.warning(
                "event loop blocked",
                ms=round(lag * 1000, 1),
                hint="a handler is doing blocking work: use asyncio.to_thread",
            )
        self._due = now + self.interval
        self._handle = self.loop.call_later(self.interval, self._tick, context=BARE_CONTEXT)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Server:
    """Serves a list of service instances on one or more addresses.

    ``attester`` produces the attestation documents the handshake needs: ``NsmAttester()`` inside
    a Nitro enclave (the default), ``InsecureTestAttester()`` on machines without Nitro (the
    clients must opt in to trust it). ``allow_plaintext=True`` additionally accepts clients that
    explicitly ask for an unencrypted session (for measuring the cost of encryption only).
    ``mutual_verifier=vrpc.Verifier(policy, root)`` requires every client to present its own
    attestation document (enclave to enclave); handlers read the verified claims from
    ``vrpc.current_call().peer.claims``.
    """

    def __init__(
        self,
        services: Iterable[Service],
        *,
        attester: Any = None,
        allow_plaintext: bool = False,
        mutual_verifier: Any = None,
        interceptors: Sequence[ServerInterceptor] = (),
        max_send_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_receive_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_calls_per_connection: int = 1024,
        max_concurrent_calls: int = 16384,
        max_connections: int = 1024,
        max_handshakes: int = 128,
        max_attestations: int = 4,
        max_buffered: int | None = 256 * 1024 * 1024,
        max_in_flight_bytes: int | None = 128 * 1024 * 1024,
        message_timeout: float | None = DEFAULT_MESSAGE_TIMEOUT,
        handshake_timeout: float = 10.0,
        idle_timeout: float | None = 300.0,
        keepalive_interval: float | None = 30.0,
        keepalive_timeout: float = 20.0,
        max_session_age: float | None = 7200.0,
        session_grace: float = 30.0,
        reflection: bool = True,
        health: bool = True,
        log_calls: bool = False,
        loop_lag_warning: float | None = 0.25,
    ) -> None:
        if attester is None:
            from vrpc.attestation import NsmAttester

            attester = NsmAttester()
        self.attester = attester
        self.mode = "dev-insecure" if getattr(attester, "insecure", False) else "prod"
        if self.mode == "dev-insecure" and os.path.exists("/dev/nsm"):
            raise RuntimeError(
                "refusing the insecure test attester: /dev/nsm exists (this is a real enclave)"
            )
        self.allow_plaintext = allow_plaintext
        if isinstance(mutual_verifier, Verifier):
            mutual_verifier = handshake_verifier(mutual_verifier)
        self.mutual_verifier = mutual_verifier
        self.interceptors = list(interceptors)
        self.max_send_message_size = max_send_message_size
        self.max_receive_message_size = max_receive_message_size
        self.max_calls_per_connection = max_calls_per_connection
        self.max_concurrent_calls = max_concurrent_calls
        self.max_connections = max_connections
        if message_timeout is not None and message_timeout <= 0:
            raise ValueError("message_timeout must be positive (or None for no limit)")
        if max_handshakes < 1 or max_attestations < 1:
            raise ValueError("max_handshakes and max_attestations must be at least 1")
        if max_buffered is not None and max_buffered <= 0:
            raise ValueError("max_buffered must be positive (or None for no budget)")
        if max_in_flight_bytes is not None and max_in_flight_bytes <= 0:
            raise ValueError("max_in_flight_bytes must be positive (or None for no limit)")
        self.max_handshakes = max_handshakes
        self.max_attestations = max_attestations
        self.max_buffered = max_buffered
        self.max_in_flight_bytes = max_in_flight_bytes
        self.message_timeout = message_timeout
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.max_session_age = max_session_age
        self.session_grace = session_grace
        self.metrics = Metrics()
        self.log_calls = log_calls  # one structured line per call (off by default: hot path)
        # A handler that blocks the event loop stalls every connection: say so in the log.
        self.loop_lag_warning = loop_lag_warning
        self._lag_monitor: _LoopLagMonitor | None = None
        self._services: list[Service] = list(services)
        from vrpc.builtin import Health, Reflection

        self.health = Health(self) if health else None
        if self.health is not None:
            self._services.append(self.health)
        if reflection:
            self._services.append(Reflection(self))
        self._methods: dict[str, _Method] = {}
        for service in self._services:
            for spec, handler in served_methods(service):
                if spec.full_name in self._methods:
                    raise ValueError(f"{spec.full_name} is served twice")
                self._methods[spec.full_name] = _Method(spec, handler)
        self._listeners: list[Listener] = []
        self._connections: set[_ServerConnection] = set()
        self._in_flight = 0
        self._handshakes = 0  # connections admitted and still in their handshake
        self._attesting = 0  # attester calls running in threads
        self._attest_queue: collections.deque[tuple[_ServerConnection, Callable[[], bytes]]] = (
            collections.deque()
        )
        self._held = 0  # bytes all connections hold (see max_buffered)
        self._in_flight_bytes = 0  # what the calls in flight weigh (see max_in_flight_bytes)
        self._accepting = True
        self._draining = False
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()  # set when a drain sees the last call finish
        if allow_plaintext:
            log.warning("plaintext sessions allowed: clients that opt in get NO encryption")

    @property
    def services(self) -> list[Service]:
        return list(self._services)

    @property
    def methods(self) -> dict[str, MethodSpec]:
        return {name: m.spec for name, m in self._methods.items()}

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def calls_in_flight(self) -> int:
        return self._in_flight

    @property
    def in_flight_bytes(self) -> int:
        """What the calls in flight weigh in ``max_in_flight_bytes``: the encoded size of each
        one's request, plus the stream window of each call that streams its request."""
        return self._in_flight_bytes

    @property
    def buffered_bytes(self) -> int:
        """What all connections hold now in the ``max_buffered`` budget."""
        return self._held

    def _hold(self, proto: _ServerConnection, delta: int) -> None:
        """Account ``delta`` bytes to ``proto``; over the budget, shed the connections that
        have held memory the longest (a peer that trickles a message or stops reading is older
        than any honest one mid-message) until the total fits again."""
        self._held += delta
        budget = self.max_buffered
        if budget is None or delta <= 0 or self._held <= budget:
            return
        holders = sorted(
            (p for p in self._connections if p.held_input or p.held_output),
            key=lambda p: p.holding_since(),
        )
        for victim in holders:
            if self._held <= budget:
                break
            log.warning(
                "connection shed",
                peer=victim.peer_address,
                reason="server memory budget",
                held=victim.held_input + victim.held_output,
            )
            self.metrics.connection_refused("memory_budget")
            victim.after(victim.endpoint.shed(monotonic(), "server memory budget exceeded"))
            # Dropped, not flushed: what it holds is queued output the peer is not reading.
            victim.abort()

    @property
    def loop_stalls(self) -> int:
        """How often the event loop was found blocked (see ``loop_lag_warning``)."""
        monitor = self._lag_monitor
        return 0 if monitor is None else monitor.blocked

    def _new_handshake(self) -> ServerHandshake:
        return ServerHandshake(
            mode=self.mode,
            allow_plaintext=self.allow_plaintext,
            verify_peer=self.mutual_verifier,
            require_mutual=self.mutual_verifier is not None,
            services={spec.service for spec in self.methods.values()},
        )

    def _log_call(self, method: str, status: Status, seconds: float, peer: str) -> None:
        # Names and numbers only: never arguments, results or metadata values.
        log.log(
            logging.ERROR if status is Status.INTERNAL else logging.INFO,
            "call",
            method=method,
            status=status.name,
            ms=round(seconds * 1000, 3),
            peer=peer,
        )

    async def start(self, uri: str) -> None:
        """Listen on ``uri`` (vsock://ANY:5000, unix:///run/x.sock, tcp://127.0.0.1:7000)."""
        listener = await create_server(uri, lambda: _ServerConnection(self))
        self._listeners.append(listener)
        if self.loop_lag_warning is not None and self._lag_monitor is None:
            self._lag_monitor = _LoopLagMonitor(self.loop_lag_warning)
        log.info("listening", address=uri, mode=self.mode, methods=len(self._methods))

    async def serve(self, uri: str | None = None, *, handle_signals: bool = True) -> None:
        """Listen (if ``uri``) and serve until ``close()``; SIGTERM/SIGINT drain gracefully."""
        if uri is not None:
            await self.start(uri)
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, lambda: loop.create_task(self.close()))
                except (NotImplementedError, RuntimeError):
                    pass
        try:
            await self._closed.wait()
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    try:
                        loop.remove_signal_handler(sig)
                    except (NotImplementedError, RuntimeError):
                        pass

    async def close(self, grace: float = 5.0) -> None:
        """Drain: stop accepting, send GOAWAY, let calls finish for ``grace`` s, cancel the rest."""
        if self._closed.is_set():
            return
        self._accepting = False
        if self._lag_monitor is not None:
            self._lag_monitor.stop()
            self._lag_monitor = None
        self._draining = True
        if self.health is not None:
            self.health.set_all_not_serving()
        for listener in self._listeners:
            listener.close()
        for proto in list(self._connections):
            proto.conn.goaway("server is shutting down")
            proto.schedule_flush()
        if self._in_flight:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.warning("grace period over: cancelling calls", calls=self._in_flight)
        for proto in list(self._connections):
            proto.cut_off = True
            for call_id, task in list(proto.tasks.items()):
                proto.cancel_task(call_id, task)
        await asyncio.sleep(0)
        closing = list(self._connections)
        for proto in closing:
            proto.close_gracefully("server is shutting down")
        # Each connection ends when its client answers our CLOSE (or the endpoint's close
        # timeout passes); wait for that so no answer is cut off mid-write.
        waiting = [p.gone for p in closing if not p.gone.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=3.0)  # a backstop behind the close timeout
        for listener in self._listeners:
            await listener.wait_closed()
        self._closed.set()
        log.info("server closed")

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(grace=0)
