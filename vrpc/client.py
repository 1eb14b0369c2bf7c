"""The client shell: connect (retrying while the enclave boots), verify the attestation in the
handshake, multiplex calls (queueing beyond the server's announced limit), reconnect after a
loss, retry idempotent calls, typed stubs.

::

    policy = vrpc.Policy.load("enclave-policy.json")          # pinned PCRs from the EIF build
    async with vrpc.connect("vsock://16:5000", policy=policy) as client:
        vault = client.stub(KeyVault)                           # typed as KeyVault for mypy
        signature = await vault.sign("k1", b"hello")
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar, assert_never

import msgspec
import structlog

from vrpc._flow import FlowGate
from vrpc._retry import backoff_delays, retrying
from vrpc._shell import EndpointProtocol, monotonic
from vrpc._verify import handshake_verifier
from vrpc.context import CallOptions, _current, _options
from vrpc.exceptions import (
    AttestationError,
    ConnectError,
    HandshakeAlert,
    HandshakeError,
    RpcError,
)
from vrpc.proto.connection import (
    DEFAULT_MAX_MESSAGE_SIZE,
    UNPROCESSED,
    Connection,
    Role,
    is_unprocessed,
)
from vrpc.proto.endpoint import BUSY_ALERTS, DEFAULT_MESSAGE_TIMEOUT, Endpoint
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
from vrpc.proto.handshake import ClientHandshake
from vrpc.service import Service
from vrpc.status import Status
from vrpc.stub import make_stub
from vrpc.transport import create_connection, parse_address

__all__ = ["Client", "ClientInterceptor", "connect"]

log = structlog.get_logger("vrpc.client")
T = TypeVar("T", bound=Service)

# Calls a client sends before the server's SETTINGS tell it the real limit. A server with a lower
# limit refuses the excess as unprocessed, and the client sends those again (docs/protocol.md).
INITIAL_MAX_CALLS = 100
# Times a call refused as unprocessed is sent again before the refusal reaches the caller: a
# server that keeps refusing what it announced it would serve must not hold a call forever.
MAX_RESENDS = 100


class _Pending(msgspec.Struct):
    """A call in flight: a future for the final outcome, optionally a queue of stream items.
    A Struct: built in C, once per call."""

    future: asyncio.Future[Any]
    options: CallOptions | None
    items: asyncio.Queue[tuple[Any, int]] | None = None
    gate: FlowGate | None = None


def _unprocessed(exc: RpcError) -> bool:
    """The server says it never started this call: sending it again is safe for any call."""
    return is_unprocessed(exc.details)


class _ClientConnection(EndpointProtocol):
    def __init__(self, client: Client) -> None:
        super().__init__(attester=client.mutual_attester)
        self.client = client
        self.pending: dict[int, _Pending] = {}
        self._draining = False
        # Monotonic time until which new calls may start here: set when the session opens (its
        # age limit), 0 while opening and once draining or closed. One comparison on the fast
        # path instead of three checks.
        self.usable_until = 0.0
        # The server's announced per-connection call limit (until SETTINGS: an assumption).
        self.max_calls = INITIAL_MAX_CALLS
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.peer_claims: Any = None
        self.channel_binding = b""
        self.mode = ""
        # Calls waiting for a free slot under the server's limit, in arrival order; calls to
        # send again after a refusal as unprocessed wait apart, ahead of them.
        self._waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._resent: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._waiting = 0  # waiters neither woken, timed out nor cancelled
        self._handed = 0  # slots given to woken waiters that have not started their call yet

    def make_endpoint(self, now: float, wall_clock: float) -> Endpoint:
        client = self.client
        self.conn = Connection(
            Role.CLIENT,
            max_send_message_size=client.max_send_message_size,
            max_receive_message_size=client.max_receive_message_size,
            keepalive_interval=client.keepalive_interval,
            keepalive_timeout=client.keepalive_timeout,
        )
        return Endpoint(
            client._new_handshake(),
            self.conn,
            now=now,
            wall_clock=wall_clock,
            handshake_timeout=client.handshake_timeout,
            max_session_age=client.max_session_age,
            message_timeout=client.message_timeout,
        )

    def on_connection_made(self) -> None:
        self.after(self.endpoint.initiate(monotonic()))

    # ------------------------------------------------------------------ capacity

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        if value:
            self.usable_until = 0.0

    def usable(self, now: float) -> bool:
        return now < self.usable_until and self.endpoint.is_open

    def has_slot(self) -> bool:
        """A new call may start now without overtaking a call that waits."""
        return len(self.pending) + self._handed < self.max_calls and not self._waiting

    @property
    def queued(self) -> int:
        return self._waiting + self._handed

    def room(self) -> bool:
        """A slot is free for a call that was handed one (it has waited its turn)."""
        return len(self.pending) + self._handed < self.max_calls

    async def wait_for_slot(self, timeout: float | None, *, resend: bool = False) -> bool:
        """Wait, in order, until a call may start under the server's announced limit; False
        when ``timeout`` passes first. A call sent again after a refusal as unprocessed
        (``resend``) was issued before every call still waiting: it goes ahead of them.

        A woken call's slot stays reserved (``_handed``) until the caller, running again,
        starts it with no await in between, so no later call can take it in the meantime.
        A waiter that times out or is cancelled stays in its queue, done, and is skipped when
        its turn comes: removing it from the middle would cost O(queue) each time."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        (self._resent if resend else self._waiters).append(waiter)
        self._waiting += 1
        timer = None if timeout is None else self.loop.call_later(timeout, self._expire, waiter)
        try:
            handed = await waiter
        except BaseException:
            if not waiter.done() or waiter.cancelled():
                waiter.cancel()
                self._left_queue()
            elif waiter.result():
                self._handed -= 1
                self._wake()  # we were handed a slot we will not use: pass it on
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if handed:
            self._handed -= 1
        return handed

    def _left_queue(self) -> None:
        self._waiting -= 1
        if not self._waiting:
            # Only done waiters are left: drop them so the queues do not hold them.
            self._waiters.clear()
            self._resent.clear()

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            waiter.set_result(False)
            self._left_queue()

    def _wake(self) -> None:
        free = self.max_calls - len(self.pending) - self._handed
        for queue in (self._resent, self._waiters):
            while queue and free > 0:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(True)
                    self._handed += 1
                    self._waiting -= 1
                    free -= 1

    def _release_waiters(self) -> None:
        for queue in (self._resent, self._waiters):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    # They find the connection unusable and move on to the next one.
                    waiter.set_result(True)
                    self._handed += 1
                    self._waiting -= 1

    # ------------------------------------------------------------------ calls

    def start_unary(self, method: str, args: list[Any]) -> tuple[int, asyncio.Future[Any]]:
        """Start the common call: no deadline, metadata or options (the client's fast path)."""
        call_id = self.conn.start_unary(method, args)
        future = self.loop.create_future()
        pending = self.pending
        pending[call_id] = _Pending(future, None)
        if len(pending) == 1:
            self.flush_now()  # the only call in flight: see ``start``
        elif self._flush_handle is None:
            self.schedule_flush()
        return call_id, future

    def start(
        self,
        method: str,
        args: list[Any],
        options: CallOptions | None,
        *,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
        stream_request: bool = False,
        stream_response: bool = False,
    ) -> tuple[int, _Pending]:
        now = monotonic()
        call_id = self.conn.start_call(
            method,
            args,
            now=now,
            timeout=timeout,
            metadata=metadata,
            stream_request=stream_request,
            stream_response=stream_response,
        )
        pending = _Pending(self.loop.create_future(), options)
        self.pending[call_id] = pending
        if len(self.pending) == 1:
            # The only call in flight: nothing else can join this write, so send it now rather
            # than a loop turn later (latency at 1 in flight; batches are unaffected).
            self.flush_now()
        else:
            self.schedule_flush()
        if timeout is not None:
            self.arm_timer()
        return call_id, pending

    def abandon(self, call_id: int) -> None:
        """The caller gave up: tell the server, forget the call."""
        if self.conn.is_active(call_id):
            self.conn.cancel(call_id)
            self.schedule_flush()
        self.finished(call_id)

    def finished(self, call_id: int) -> None:
        self.pending.pop(call_id, None)
        self.after_finished()

    def after_finished(self) -> None:
        """A call's slot is free: wake a waiter, or close a retired connection now idle."""
        if self._waiting:
            self._wake()
        if self._draining and not self.pending:
            self.client._idle_retired(self)

    # ------------------------------------------------------------------ events

    def dispatch(self, events: list[EndpointEvent]) -> None:
        pending_calls = self.pending
        for ev in events:
            match ev:
                case ResponseReceived():
                    p = pending_calls.get(ev.call_id)
                    if p is not None and not p.future.done():
                        if p.options is not None and ev.trailers:
                            p.options.trailers.update(ev.trailers)
                        p.future.set_result(ev.result)
                case ErrorReceived():
                    p = pending_calls.get(ev.call_id)
                    if p is not None:
                        if not p.future.done():
                            if p.options is not None and ev.trailers:
                                p.options.trailers.update(ev.trailers)
                            p.future.set_exception(RpcError(ev.status, ev.message, ev.details))
                        if p.gate is not None:
                            p.gate.open()
                case ItemReceived():
                    p = pending_calls.get(ev.call_id)
                    if p is not None and p.items is not None:
                        p.items.put_nowait((ev.item, ev.size))
                case HeadersReceived():
                    p = pending_calls.get(ev.call_id)
                    if p is not None and p.options is not None:
                        p.options.headers.update(ev.metadata)
                case CreditAvailable():
                    p = pending_calls.get(ev.call_id)
                    if p is not None and p.gate is not None:
                        p.gate.open()
                case SettingsReceived():
                    self.max_calls = ev.max_calls
                    self._wake()  # the limit may have grown
                case GoAwayReceived():
                    log.info("server draining", peer=self.peer_address, reason=ev.reason)
                    self.client._retire(self)
                case PongReceived():
                    pass  # the server is alive; the endpoint already noted it
                case AttestationRequested():
                    self.attest(ev)
                case SessionEstablished():
                    if not self._draining:
                        self.usable_until = self.endpoint.expires_at
                    self.peer_claims = ev.peer_claims
                    self.channel_binding = ev.channel_binding
                    self.mode = ev.mode
                    if not self.ready.done():
                        self.ready.set_result(None)
                case ConnectionClosed():
                    self._closed(ev)
                case RequestReceived() | StreamEnded() | CallCancelled():
                    # The core refuses these from a server before they become events.
                    raise AssertionError(f"server-side event on a client: {ev!r}")
                case _:
                    assert_never(ev)

    def _closed(self, ev: ConnectionClosed) -> None:
        self.connection_closed(ev)
        self.draining = True
        if not self.ready.done():
            self.ready.set_exception(_handshake_failure(ev))
            self.ready.exception()  # the awaiting side may already be gone
        reason = ev.reason if ev.error is None else f"{ev.reason}: {ev.error}"
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(RpcError(Status.UNAVAILABLE, reason))
            if pending.gate is not None:
                pending.gate.open()
        self._release_waiters()
        self.client._connection_lost(self)


def _handshake_failure(ev: ConnectionClosed) -> Exception:
    """What awaiting a connection raises when it ended before its session was established."""
    error = ev.error
    if isinstance(error, AttestationError):
        return error  # a verdict on the peer: never retried
    if ev.retryable:
        # The server is busy or the transport failed: a later or other attempt may succeed,
        # and no call was sent on this connection.
        busy = isinstance(ev.error, HandshakeAlert) and ev.error.alert in BUSY_ALERTS
        return RpcError(Status.UNAVAILABLE, ev.reason, {**UNPROCESSED, "busy": busy})
    return HandshakeError(ev.reason) if not isinstance(error, HandshakeError) else error


class ClientInterceptor:
    """Wraps every call made by a client: ``await call_next()`` performs it.

    Subclass and override ``intercept``; ``method`` is "service.method" and ``metadata`` the
    outgoing metadata (mutable: add an auth token here).
    """

    async def intercept(
        self, method: str, metadata: dict[str, Any], call_next: Callable[[], Any]
    ) -> Any:
        return await call_next()

    def intercept_stream(
        self,
        method: str,
        metadata: dict[str, Any],
        call_next: Callable[[], AsyncIterator[Any]],
    ) -> AsyncIterator[Any]:
        """Wraps a streaming call: ``call_next()`` starts it and returns its items. Override
        with an async generator to act around the stream's whole lifetime; the default passes
        the stream through."""
        return call_next()


class Client:
    """A connection (re-established on demand) to one vrpc server. Use ``vrpc.connect``."""

    def __init__(
        self,
        uri: str,
        *,
        policy: Any = None,
        root: Any = None,
        plaintext: bool = False,
        mutual_attester: Any = None,
        service: str | None = None,
        timeout: float | None = None,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        retries: int = 2,
        max_session_age: float = 3600.0,
        keepalive_interval: float | None = 30.0,
        keepalive_timeout: float = 20.0,
        max_send_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_receive_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        message_timeout: float | None = DEFAULT_MESSAGE_TIMEOUT,
        interceptors: list[ClientInterceptor] | None = None,
        audit: Any = None,
    ) -> None:
        if message_timeout is not None and message_timeout <= 0:
            raise ValueError("message_timeout must be positive (or None for no limit)")
        self.message_timeout = message_timeout
        self.uri = str(parse_address(uri))
        self.plaintext = plaintext
        self._verifier: Any = None
        if plaintext:
            if policy is not None:
                raise ValueError("plaintext=True cannot verify a policy: choose one")
            if audit is not None:
                raise ValueError("plaintext=True has no attestation to audit")
            self.mode = "plaintext"
            log.warning("plaintext session requested: NO encryption, NO attestation", uri=uri)
        else:
            from vrpc.attestation import AWS_NITRO_ROOT, Policy, Verifier

            if policy is None:
                policy = Policy()
            if not isinstance(policy, Policy):
                raise TypeError("policy must be a vrpc.Policy")
            root = AWS_NITRO_ROOT if root is None else root
            self.mode = "dev-insecure" if root.insecure else "prod"
            # Fail closed at construction, under a test root too (docs/security.md).
            policy.require_pins(prod=self.mode == "prod")
            self._verifier = Verifier(policy, root)
        self.mutual_attester = mutual_attester
        self.service = service
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.retries = retries
        self.max_session_age = max_session_age
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.max_send_message_size = max_send_message_size
        self.max_receive_message_size = max_receive_message_size
        self.interceptors = list(interceptors or ())
        self.audit = audit  # a vrpc.AuditTrail recording every attestation verdict
        self._proto: _ClientConnection | None = None
        self._connecting: asyncio.Future[_ClientConnection | None] | None = None
        self._retired: set[_ClientConnection] = set()
        self._closed = False
        self.peer_claims: Any = None
        # The current session's channel binding (docs/guide.md); b"" before connecting.
        self.channel_binding = b""

    # ------------------------------------------------------------------ connection management

    def _new_handshake(self) -> ClientHandshake:
        return ClientHandshake(
            mode=self.mode,
            verify=None
            if self._verifier is None
            else handshake_verifier(self._verifier, audit=self.audit, peer=self.uri),
            service=self.service,
            mutual=self.mutual_attester is not None,
        )

    async def connect(self) -> None:
        await self._connection()

    @property
    def calls_in_flight(self) -> int:
        proto = self._proto
        return 0 if proto is None else len(proto.pending)

    @property
    def calls_queued(self) -> int:
        """Calls waiting in this client for a slot under the server's per-connection limit."""
        proto = self._proto
        return 0 if proto is None else proto.queued

    @property
    def saturated(self) -> bool:
        """Every call slot of the current connection is taken (new calls would queue)."""
        proto = self._proto
        return proto is not None and not proto.has_slot()

    async def _connection(self) -> _ClientConnection:
        proto = self._proto
        if proto is not None:
            if proto.usable(monotonic()):
                return proto
            # Draining, closed, or older than max_session_age: a fresh handshake (and
            # attestation) before the NSM leaf certificate (~3 h) expires.
            self._retire(proto)
        if self._closed:
            raise RpcError(Status.UNAVAILABLE, "the client is closed")
        # Every call that finds no connection shares one attempt and its outcome: a thousand
        # calls queued on a server that went away learn it together, not one connect timeout
        # after another. The first caller connects inline (no extra task, no extra loop turn);
        # the others wait for its outcome.
        for _ in range(1000):  # bounded: each turn follows a leader that was cancelled
            outcome = self._connecting
            if outcome is None:
                return await self._lead_connect()
            proto = await asyncio.shield(outcome)
            if self._closed:
                raise RpcError(Status.UNAVAILABLE, "the client is closed")
            if proto is not None:
                return proto
        raise RpcError(Status.UNAVAILABLE, f"cannot connect to {self.uri}: attempts cancelled")

    async def _lead_connect(self) -> _ClientConnection:
        outcome: asyncio.Future[_ClientConnection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._connecting = outcome
        try:
            proto = await self._connect_with_retry()
        except asyncio.CancelledError:
            outcome.set_result(None)  # this caller gave up: a waiting one tries itself
            raise
        except BaseException as exc:
            outcome.set_exception(exc)
            outcome.exception()  # retrieved here: no waiter may be left to retrieve it
            raise
        finally:
            self._connecting = None
        if self._closed:
            proto.close_gracefully("client closed")
            outcome.set_result(None)
            raise RpcError(Status.UNAVAILABLE, "the client is closed")
        self._proto = proto
        outcome.set_result(proto)
        return proto

    async def _connect_with_retry(self) -> _ClientConnection:
        give_up = time.monotonic() + self.connect_timeout
        attempt = 0
        for delay in backoff_delays():
            attempt += 1
            try:
                _, proto = await create_connection(self.uri, lambda: _ClientConnection(self))
                assert isinstance(proto, _ClientConnection)
                try:
                    await proto.ready
                except asyncio.CancelledError:
                    proto.close_gracefully("client closed")  # closed while connecting
                    raise
            except (ConnectError, RpcError) as exc:
                # vsock refuses at once until the enclave's server listens, and a server that
                # restarts drops connections mid-handshake: retry those with backoff. A server
                # at its connection limit answers at once: say so, the caller decides.
                if (
                    isinstance(exc, RpcError)
                    and isinstance(exc.details, dict)
                    and exc.details.get("busy")
                ):
                    raise
                if time.monotonic() + delay > give_up:
                    raise RpcError(
                        Status.UNAVAILABLE,
                        f"cannot connect to {self.uri} after {attempt} attempts: {exc}",
                        UNPROCESSED,
                    ) from exc
                await asyncio.sleep(delay)
                continue
            self.peer_claims = proto.peer_claims
            self.channel_binding = proto.channel_binding
            log.info("connected", address=self.uri, mode=proto.mode)
            return proto
        raise AssertionError("backoff_delays never ends")

    def _retire(self, proto: _ClientConnection) -> None:
        proto.draining = True
        # Calls queued for this connection would otherwise wait for its last calls to finish:
        # they move to the next connection now, ahead of calls issued after them.
        proto._release_waiters()
        if self._proto is proto:
            self._proto = None
        if proto.pending:
            self._retired.add(proto)
        else:
            proto.close_gracefully()

    def _idle_retired(self, proto: _ClientConnection) -> None:
        if proto in self._retired:
            self._retired.discard(proto)
            proto.close_gracefully()

    def _connection_lost(self, proto: _ClientConnection) -> None:
        self._retired.discard(proto)
        if self._proto is proto:
            self._proto = None

    async def close(self) -> None:
        """Close every connection: our CLOSE, then the server's; calls still in flight are
        answered or refused by the server before its CLOSE (docs/protocol.md §4)."""
        self._closed = True
        protos = [p for p in (self._proto, *self._retired) if p is not None]
        self._proto = None
        self._retired.clear()
        for proto in protos:
            proto.close_gracefully("client closed")
        waiting = [p.gone for p in protos if not p.gone.done()]
        if waiting:
            # Returns as soon as every server answered our CLOSE (or the endpoint's close
            # timeout, 2 s, ended the connection); the bound here is only a backstop.
            await asyncio.wait(waiting, timeout=3.0)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ calls

    def _effective_timeout(
        self, method_default: float | None, options: CallOptions | None
    ) -> float | None:
        timeout = options.timeout if options is not None and options.timeout is not None else None
        if timeout is None:
            timeout = method_default if method_default is not None else self.timeout
        ctx = _current.get(None)
        if ctx is not None and ctx.deadline is not None:
            remaining = max(0.0, ctx.deadline - monotonic())
            timeout = remaining if timeout is None else min(timeout, remaining)
        return timeout

    async def call(
        self,
        method: str,
        args: list[Any],
        *,
        idempotent: bool = False,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
        convert: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Call ``service.method`` with positional ``args``; returns the decoded result, passed
        through ``convert`` if given (typed stubs check the declared result type there)."""
        proto = self._proto
        if (
            proto is not None
            and timeout is None
            and metadata is None
            and self.timeout is None
            and not self.interceptors
            # ``proto.has_slot()`` written out: a method call less on every call.
            and len(proto.pending) + proto._handed < proto.max_calls
            and not proto._waiting
            and monotonic() < proto.usable_until
            and _options.get() is None
            and _current.get(None) is None
        ):
            # The common call (no deadline, metadata or interceptor, a free slot on an open
            # connection): one attempt right here, the general path only if it must be retried.
            call_id, future = proto.start_unary(method, args)
            try:
                result = await future
                return result if convert is None else convert(result)
            except asyncio.CancelledError:
                proto.abandon(call_id)
                raise
            except RpcError as exc:
                resend = _unprocessed(exc)
                if resend:
                    used = 0  # never started: it does not count as an attempt
                elif idempotent and exc.status is Status.UNAVAILABLE and self.retries > 0:
                    used = 1
                else:
                    raise
                log.info("retrying call", method=method, reason=exc.message)
                result = await self._unary(
                    method, args, idempotent, None, None, None, used, resend=resend
                )
                return result if convert is None else convert(result)
            finally:
                # ``finished`` inlined for the common case: nobody waits, nothing drains.
                proto.pending.pop(call_id, None)
                if proto._waiting or proto._draining:
                    proto.after_finished()
        options = _options.get()
        timeout = self._effective_timeout(timeout, options)
        if metadata is None and options is not None:
            metadata = options.metadata
        if self.interceptors:
            md = dict(metadata or {})
            call_next: Callable[[], Any] = lambda: self._unary(  # noqa: E731
                method, args, idempotent, timeout, md or None, options
            )
            for interceptor in reversed(self.interceptors):
                call_next = _bind_client(interceptor, method, md, call_next)
            result = await call_next()
        else:
            result = await self._unary(method, args, idempotent, timeout, metadata, options)
        return result if convert is None else convert(result)

    async def _unary(
        self,
        method: str,
        args: list[Any],
        idempotent: bool,
        timeout: float | None,
        metadata: dict[str, Any] | None,
        options: CallOptions | None,
        used: int = 0,
        *,
        resend: bool = False,
    ) -> Any:
        """The general unary path: deadline, metadata, queueing, retries (``used`` attempts
        were already spent on the fast path)."""
        deadline = None if timeout is None else monotonic() + timeout

        async def attempt(n: int) -> Any:
            return await self._unary_once(
                method, args, deadline, metadata, options, resend and n == 0
            )

        return await retrying(
            attempt,
            attempts=1 + (self.retries if idempotent else 0) - used,
            deadline=deadline,
            retry_on=lambda exc: exc.status is Status.UNAVAILABLE,
            what=method,
        )

    async def _slot(self, deadline: float | None, *, resend: bool = False) -> _ClientConnection:
        """A connection with a free call slot, waiting in order behind earlier calls; a call
        whose deadline passes while it waits never reaches the wire. The caller must start its
        call before its next await, or the slot may be taken."""
        while True:
            proto = await self._connection()
            if proto.has_slot():
                return proto
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded while queued")
            if not await proto.wait_for_slot(remaining, resend=resend):
                raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded while queued")
            if proto.usable(monotonic()) and proto.room():
                return proto
            # The connection closed or began draining while we waited: take a turn on the
            # next one, still ahead of calls issued after us.
            resend = True

    async def _unary_once(
        self,
        method: str,
        args: list[Any],
        deadline: float | None,
        metadata: dict[str, Any] | None,
        options: CallOptions | None,
        resend: bool = False,
    ) -> Any:
        for turn in range(MAX_RESENDS + 1):
            proto = await self._slot(deadline, resend=resend)
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")
            call_id, pending = proto.start(
                method, args, options, timeout=remaining, metadata=metadata
            )
            try:
                return await pending.future
            except asyncio.CancelledError:
                proto.abandon(call_id)
                raise
            except RpcError as exc:
                if not _unprocessed(exc) or turn == MAX_RESENDS:
                    raise
                # Refused before it started (over the limit before SETTINGS arrived, or the
                # server began draining): send it again, ahead of the calls issued after it,
                # for any kind of call.
                resend = True
            finally:
                proto.finished(call_id)
        raise AssertionError("the last turn returns or raises")

    def stream(
        self,
        method: str,
        args: list[Any],
        *,
        request: AsyncIterable[Any] | None = None,
        stream_response: bool = True,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
        convert: Callable[[Any], Any] = lambda x: x,
    ) -> AsyncIterator[Any]:
        """A streaming call: yields response items (or the single result for client streaming)."""
        if self.interceptors:
            return self._intercepted_stream(
                method, args, request, stream_response, timeout, metadata, convert
            )
        return self._stream(method, args, request, stream_response, timeout, metadata, convert)

    async def _intercepted_stream(
        self,
        method: str,
        args: list[Any],
        request: AsyncIterable[Any] | None,
        stream_response: bool,
        timeout: float | None,
        metadata: dict[str, Any] | None,
        convert: Callable[[Any], Any],
    ) -> AsyncIterator[Any]:
        options = _options.get()
        if metadata is None and options is not None:
            metadata = options.metadata
        md = dict(metadata or {})
        call_next: Callable[[], AsyncIterator[Any]] = lambda: self._stream(  # noqa: E731
            method, args, request, stream_response, timeout, md or None, convert
        )
        for interceptor in reversed(self.interceptors):
            call_next = _bind_client_stream(interceptor, method, md, call_next)
        items = call_next()
        try:
            if not stream_response:
                # One result: run the chain to its end before handing it over, so the
                # interceptors see the call finish even if the caller stops iterating there.
                for item in [item async for item in items]:
                    yield item
                return
            async for item in items:
                yield item
        finally:
            # Closed now rather than by the garbage collector: an interceptor's span or
            # cleanup ends when the caller stops, in the caller's task.
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _stream(
        self,
        method: str,
        args: list[Any],
        request: AsyncIterable[Any] | None,
        stream_response: bool,
        timeout: float | None,
        metadata: dict[str, Any] | None,
        convert: Callable[[Any], Any],
    ) -> AsyncIterator[Any]:
        options = _options.get()
        timeout = self._effective_timeout(timeout, options)
        if metadata is None and options is not None:
            metadata = options.metadata
        deadline = None if timeout is None else monotonic() + timeout
        resend = False
        # Bounded: each further turn follows a refusal of a call the server never started.
        for _ in range(MAX_RESENDS + 1):
            proto = await self._slot(deadline, resend=resend)
            resend = False
            conn = proto.conn
            call_id, pending = proto.start(
                method,
                args,
                options,
                timeout=None if deadline is None else max(0.0, deadline - monotonic()),
                metadata=metadata,
                stream_request=request is not None,
                stream_response=stream_response,
            )
            future = pending.future
            if stream_response:
                pending.items = asyncio.Queue()
            pending.gate = FlowGate()
            sender = None
            if request is not None:
                sender = proto.loop.create_task(self._send_items(proto, call_id, pending, request))
            yielded = False
            try:
                if not stream_response:
                    yield convert(await future)
                    return
                assert pending.items is not None
                items = pending.items
                while True:
                    if items.empty():
                        getter = asyncio.ensure_future(items.get())
                        await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                        if not getter.done():
                            getter.cancel()
                            if future.done() and items.empty():
                                # Refused before it started (over the limit before SETTINGS
                                # arrived, or it crossed a GOAWAY): nothing was consumed on
                                # either side, so it is sent again, ahead of later calls.
                                exc = None if future.cancelled() else future.exception()
                                resend = (
                                    not yielded
                                    and request is None
                                    and isinstance(exc, RpcError)
                                    and _unprocessed(exc)
                                )
                                if resend:
                                    break
                                future.result()  # raises the call's error
                                return
                            continue
                        item, size = getter.result()
                    else:
                        item, size = items.get_nowait()
                    conn.consumed(call_id, size)
                    proto.schedule_flush()
                    yielded = True
                    yield convert(item)
            finally:
                if sender is not None and not sender.done():
                    sender.cancel()
                proto.abandon(call_id)
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()
        raise RpcError(
            Status.UNAVAILABLE, f"{method}: refused as unprocessed {MAX_RESENDS + 1} times"
        )

    async def _send_items(
        self, proto: _ClientConnection, call_id: int, pending: _Pending, request: AsyncIterable[Any]
    ) -> None:
        conn = proto.conn
        gate = pending.gate
        assert gate is not None
        try:
            async for item in request:
                while not conn.can_send(call_id):
                    if not conn.is_active(call_id) or proto.closed:
                        return
                    gate.close()
                    await gate.wait()
                if not proto.write_gate.is_open:
                    await proto.write_gate.wait()
                if not conn.send_item(call_id, item):
                    return
                proto.schedule_flush()
            if conn.is_active(call_id):
                conn.end_request(call_id)
                proto.schedule_flush()
        except Exception as exc:
            # The request iterator failed: abandon the call, tell the caller why.
            if conn.is_active(call_id):
                conn.cancel(call_id)
                proto.schedule_flush()
            if not pending.future.done():
                pending.future.set_exception(
                    RpcError(Status.CANCELLED, f"request stream failed: {exc!r}")
                )

    # ------------------------------------------------------------------ stubs

    def stub(self, interface: type[T]) -> T:
        """An object typed as ``interface`` whose methods call the server."""
        return make_stub(self, interface)


def _bind_client(
    interceptor: ClientInterceptor, method: str, md: dict[str, Any], nxt: Callable[[], Any]
) -> Callable[[], Any]:
    return lambda: interceptor.intercept(method, md, nxt)


def _bind_client_stream(
    interceptor: ClientInterceptor,
    method: str,
    md: dict[str, Any],
    nxt: Callable[[], AsyncIterator[Any]],
) -> Callable[[], AsyncIterator[Any]]:
    return lambda: interceptor.intercept_stream(method, md, nxt)


def connect(uri: str, **kwargs: Any) -> Client:
    """``async with vrpc.connect(uri, policy=...) as client``; see ``Client`` for the options."""
    return Client(uri, **kwargs)
