"""The client shell: connect (retrying while the enclave boots), verify the attestation in the
handshake, multiplex calls, reconnect after a loss, retry idempotent calls, typed stubs.

::

    policy = vrpc.Policy.load("enclave-policy.json")          # pinned PCRs from the EIF build
    async with vrpc.connect("vsock://16:5000", policy=policy) as client:
        vault = client.stub(KeyVault)                           # typed as KeyVault for mypy
        signature = await vault.sign("k1", b"hello")
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar

import structlog

from vrpc._shell import FlowGate, ShellProtocol, monotonic
from vrpc._verify import handshake_verifier
from vrpc.context import CallOptions, _current, _options
from vrpc.exceptions import (
    AttestationError,
    ConnectError,
    HandshakeError,
    RemoteProtocolError,
    RpcError,
)
from vrpc.proto.connection import DEFAULT_MAX_MESSAGE_SIZE, Connection, Role
from vrpc.proto.events import (
    ConnectionTerminated,
    CreditAvailable,
    ErrorReceived,
    Event,
    GoAwayReceived,
    HeadersReceived,
    ItemReceived,
    ResponseReceived,
)
from vrpc.proto.handshake import ClientHandshake
from vrpc.service import Service
from vrpc.status import Status
from vrpc.transport import create_connection, parse_address

__all__ = ["Client", "ClientInterceptor", "connect"]

log = structlog.get_logger("vrpc.client")
T = TypeVar("T", bound=Service)


class _Pending:
    """A call in flight: a future for the final outcome, optionally a queue of stream items."""

    __slots__ = ("future", "gate", "items", "options")

    def __init__(self, future: asyncio.Future[Any], options: CallOptions | None) -> None:
        self.future = future
        self.options = options
        self.items: asyncio.Queue[tuple[Any, int]] | None = None
        self.gate: FlowGate | None = None


class _ClientConnection(ShellProtocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        conn = Connection(
            Role.CLIENT,
            max_send_message_size=client.max_send_message_size,
            max_receive_message_size=client.max_receive_message_size,
            keepalive_interval=client.keepalive_interval,
            keepalive_timeout=client.keepalive_timeout,
        )
        super().__init__(conn, client._new_handshake(), attester=client.mutual_attester)
        self.handshake_timeout = client.handshake_timeout
        self.pending: dict[int, _Pending] = {}
        self.draining = False
        self.established_at = 0.0

    def on_connection_made(self) -> None:
        self.handshake.initiate()

    def on_established(self) -> None:
        self.established_at = monotonic()

    def on_connection_lost(self, exc: Exception | None, truncated: bool) -> None:
        self.draining = True
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(RpcError(Status.UNAVAILABLE, "connection lost"))
            if pending.gate is not None:
                pending.gate.open()
        self.pending.clear()
        self.client._connection_lost(self)

    def handle_events(self, events: list[Event]) -> None:
        pending_calls = self.pending
        for ev in events:
            kind = type(ev)
            if kind is ResponseReceived:
                p = pending_calls.pop(ev.call_id, None)  # type: ignore[attr-defined]
                if p is not None and not p.future.done():
                    if p.options is not None and ev.trailers:  # type: ignore[attr-defined]
                        p.options.trailers.update(ev.trailers)  # type: ignore[attr-defined]
                    p.future.set_result(ev.result)  # type: ignore[attr-defined]
            elif kind is ItemReceived:
                p = pending_calls.get(ev.call_id)  # type: ignore[attr-defined]
                if p is not None and p.items is not None:
                    p.items.put_nowait((ev.item, ev.size))  # type: ignore[attr-defined]
            elif kind is ErrorReceived:
                p = pending_calls.pop(ev.call_id, None)  # type: ignore[attr-defined]
                if p is not None and not p.future.done():
                    if p.options is not None and ev.trailers:  # type: ignore[attr-defined]
                        p.options.trailers.update(ev.trailers)  # type: ignore[attr-defined]
                    p.future.set_exception(
                        RpcError(ev.status, ev.message, ev.details)  # type: ignore[attr-defined]
                    )
                if p is not None and p.gate is not None:
                    p.gate.open()
            elif kind is HeadersReceived:
                p = pending_calls.get(ev.call_id)  # type: ignore[attr-defined]
                if p is not None and p.options is not None:
                    p.options.headers.update(ev.metadata)  # type: ignore[attr-defined]
            elif kind is CreditAvailable:
                p = pending_calls.get(ev.call_id)  # type: ignore[attr-defined]
                if p is not None and p.gate is not None:
                    p.gate.open()
            elif kind is GoAwayReceived:
                self.draining = True
                log.info("server draining", peer=self.peer_address, reason=ev.reason)  # type: ignore[attr-defined]
                self.client._retire(self)
            elif kind is ConnectionTerminated:
                self.abort(None, ev.reason)  # type: ignore[attr-defined]


class ClientInterceptor:
    """Wraps every call made by a client: ``await call_next()`` performs it.

    Subclass and override ``intercept``; ``method`` is "service.method" and ``metadata`` the
    outgoing metadata (mutable: add an auth token here).
    """

    async def intercept(
        self, method: str, metadata: dict[str, Any], call_next: Callable[[], Any]
    ) -> Any:
        return await call_next()


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
        interceptors: list[ClientInterceptor] | None = None,
        audit: Any = None,
    ) -> None:
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
            if self.mode == "prod":
                policy.require_pins()
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
        self._connecting: asyncio.Lock | None = None
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

    async def _connection(self) -> _ClientConnection:
        proto = self._proto
        if proto is not None and not proto.closed and not proto.draining:
            if monotonic() - proto.established_at < self.max_session_age:
                return proto
            # A fresh handshake (and attestation) before the NSM leaf certificate (~3 h) expires.
            self._retire(proto)
        if self._closed:
            raise RpcError(Status.UNAVAILABLE, "the client is closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            proto = self._proto
            if proto is not None and not proto.closed and not proto.draining:
                return proto
            self._proto = await self._connect_with_retry()
            return self._proto

    async def _connect_with_retry(self) -> _ClientConnection:
        give_up = time.monotonic() + self.connect_timeout
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                _, proto = await create_connection(self.uri, lambda: _ClientConnection(self))
            except ConnectError as exc:
                # vsock refuses at once until the enclave's server listens: retry with backoff.
                if time.monotonic() + delay > give_up:
                    raise RpcError(
                        Status.UNAVAILABLE,
                        f"cannot connect to {self.uri} after {attempt} attempts: {exc}",
                    ) from exc
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                continue
            assert isinstance(proto, _ClientConnection)
            try:
                await proto.ready
            except HandshakeError as exc:
                if not proto.lost_in_handshake:
                    raise  # fail closed; never retried silently
                if time.monotonic() + delay > give_up:
                    raise RpcError(
                        Status.UNAVAILABLE,
                        f"cannot connect to {self.uri} after {attempt} attempts: {exc}",
                    ) from exc
                # Only the transport failed (e.g. a server restarting): same backoff as above.
                log.info("connection lost during the handshake", address=self.uri, error=str(exc))
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                continue
            except AttestationError:
                raise  # fail closed; never retried silently
            except RemoteProtocolError as exc:
                raise HandshakeError(str(exc)) from exc
            self.peer_claims = proto.peer_claims
            self.channel_binding = proto.channel_binding
            log.info("connected", address=self.uri, mode=proto.mode)
            return proto

    def _retire(self, proto: _ClientConnection) -> None:
        proto.draining = True
        if self._proto is proto:
            self._proto = None
        if proto.pending:
            self._retired.add(proto)
        else:
            proto.close_gracefully()

    def _connection_lost(self, proto: _ClientConnection) -> None:
        self._retired.discard(proto)
        if self._proto is proto:
            self._proto = None

    def _call_done(self, proto: _ClientConnection) -> None:
        if proto.draining and not proto.pending and proto in self._retired:
            self._retired.discard(proto)
            proto.close_gracefully()

    async def close(self) -> None:
        self._closed = True
        for proto in [self._proto, *self._retired]:
            if proto is not None:
                proto.close_gracefully()
        self._proto = None
        self._retired.clear()
        await asyncio.sleep(0)

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
    ) -> Any:
        """Call ``service.method`` with positional ``args``; returns the decoded result."""
        if timeout is None and metadata is None:
            started = self._start_fast(method, args)
            if started is not None:
                return await self._finish_fast(started, method, args, idempotent)
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
            return await call_next()
        return await self._unary(method, args, idempotent, timeout, metadata, options)

    def _start_fast(
        self, method: str, args: list[Any]
    ) -> tuple[_ClientConnection, int, asyncio.Future[Any]] | None:
        """Start a call at once when nothing needs the general path: no deadline, metadata or
        interceptor, an established connection. Typed stubs await the returned future directly,
        so the common call costs one coroutine frame instead of three."""
        proto = self._proto
        if (
            proto is None
            or proto.draining
            or proto.closed
            or self.timeout is not None
            or self.interceptors
            or _options.get() is not None
            or _current.get(None) is not None
            or monotonic() - proto.established_at >= self.max_session_age
        ):
            return None
        call_id = proto.conn.start_call(method, args, now=0.0)  # `now` only dates deadlines
        future: asyncio.Future[Any] = proto.loop.create_future()
        pending = proto.pending
        pending[call_id] = _Pending(future, None)
        if len(pending) == 1:
            # The only call in flight: nothing else can join this write, so send it now rather
            # than a loop turn later (latency at 1 in flight; batches are unaffected).
            if proto._flush_handle is not None:
                proto._flush_handle.cancel()
            proto.flush()
        elif proto._flush_handle is None:
            proto.schedule_flush()
        return proto, call_id, future

    def _abandon(self, proto: _ClientConnection, call_id: int) -> None:
        """The caller was cancelled: tell the server, forget the call."""
        if proto.conn.is_active(call_id):
            proto.conn.cancel(call_id)
            proto.schedule_flush()
        proto.pending.pop(call_id, None)

    async def _finish_fast(
        self,
        started: tuple[_ClientConnection, int, asyncio.Future[Any]],
        method: str,
        args: list[Any],
        idempotent: bool,
    ) -> Any:
        proto, call_id, future = started
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(proto, call_id)
            raise
        except RpcError as exc:
            return await self._retry_fast(exc, method, args, idempotent)
        finally:
            if proto.draining:
                self._call_done(proto)

    async def _retry_fast(
        self, exc: RpcError, method: str, args: list[Any], idempotent: bool
    ) -> Any:
        """The fast attempt failed: retry an idempotent call that met UNAVAILABLE, else raise."""
        if not idempotent or exc.status is not Status.UNAVAILABLE or self.retries < 1:
            raise exc
        # That was the first of the 1 + retries attempts: only the retries remain.
        log.info("retrying idempotent call", method=method, reason=exc.message)
        await asyncio.sleep(0.02)
        return await self._unary(method, args, idempotent, None, None, None, first=1)

    async def _unary(
        self,
        method: str,
        args: list[Any],
        idempotent: bool,
        timeout: float | None,
        metadata: dict[str, Any] | None,
        options: CallOptions | None,
        first: int = 0,
    ) -> Any:
        attempts = 1 + (self.retries if idempotent else 0)
        started = monotonic()
        for attempt in range(first, attempts):
            remaining = None if timeout is None else timeout - (monotonic() - started)
            if remaining is not None and remaining <= 0:
                raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded")
            try:
                return await self._unary_once(method, args, remaining, metadata, options)
            except RpcError as exc:
                if exc.status is not Status.UNAVAILABLE or attempt + 1 >= attempts:
                    raise
                log.info("retrying idempotent call", method=method, reason=exc.message)
                await asyncio.sleep(0.02 * (2**attempt))
        raise AssertionError("unreachable")

    async def _unary_once(
        self,
        method: str,
        args: list[Any],
        timeout: float | None,
        metadata: dict[str, Any] | None,
        options: CallOptions | None,
    ) -> Any:
        proto = await self._connection()
        conn = proto.conn
        call_id = conn.start_call(method, args, now=monotonic(), timeout=timeout, metadata=metadata)
        future: asyncio.Future[Any] = proto.loop.create_future()
        proto.pending[call_id] = _Pending(future, options)
        proto.schedule_flush()
        if timeout is not None:
            proto.arm_timer()
        try:
            return await future
        except asyncio.CancelledError:
            if conn.is_active(call_id):
                conn.cancel(call_id)
                proto.schedule_flush()
            proto.pending.pop(call_id, None)
            raise
        finally:
            if proto.draining:
                self._call_done(proto)

    async def stream(
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
        options = _options.get()
        timeout = self._effective_timeout(timeout, options)
        if metadata is None and options is not None:
            metadata = options.metadata
        proto = await self._connection()
        conn = proto.conn
        call_id = conn.start_call(
            method,
            args,
            now=monotonic(),
            timeout=timeout,
            metadata=metadata,
            stream_request=request is not None,
            stream_response=stream_response,
        )
        future: asyncio.Future[Any] = proto.loop.create_future()
        pending = _Pending(future, options)
        if stream_response:
            pending.items = asyncio.Queue()
        pending.gate = FlowGate()
        proto.pending[call_id] = pending
        proto.schedule_flush()
        if timeout is not None:
            proto.arm_timer()
        sender = None
        if request is not None:
            sender = proto.loop.create_task(self._send_items(proto, call_id, pending, request))
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
                            future.result()  # raises the call's error
                            return
                        continue
                    item, size = getter.result()
                else:
                    item, size = items.get_nowait()
                conn.consumed(call_id, size)
                proto.schedule_flush()
                yield convert(item)
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
            if conn.is_active(call_id):
                conn.cancel(call_id)
                proto.schedule_flush()
            proto.pending.pop(call_id, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()
            if proto.draining:
                self._call_done(proto)

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
        from vrpc.stub import make_stub

        return make_stub(self, interface)


def _bind_client(
    interceptor: ClientInterceptor, method: str, md: dict[str, Any], nxt: Callable[[], Any]
) -> Callable[[], Any]:
    return lambda: interceptor.intercept(method, md, nxt)


def connect(uri: str, **kwargs: Any) -> Client:
    """``async with vrpc.connect(uri, policy=...) as client``; see ``Client`` for the options."""
    return Client(uri, **kwargs)
