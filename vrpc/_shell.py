"""What the server and client asyncio shells share: the protocol base that runs the handshake,
feeds the session and the connection core, coalesces writes and drives the core's timer.

The hot path is an ``asyncio.Protocol`` (no streams): ``data_received`` goes straight into the
session (decryption) and the sans-IO connection; frames produced during one loop tick leave in a
single ``writelines`` (so in as few records as possible when encrypted).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import typing
from typing import Any

import structlog

from vrpc.exceptions import AttestationError, HandshakeError, RemoteProtocolError
from vrpc.proto.connection import Connection
from vrpc.proto.events import Event
from vrpc.proto.handshake import HandshakeComplete, NeedAttestation
from vrpc.proto.record import Session
from vrpc.status import Status

log = structlog.get_logger("vrpc")

monotonic = time.monotonic

# Internal callbacks (flushes, protocol timers) run in this empty context, not in whatever
# context happened to schedule them: a keepalive timer armed from inside a handler would
# otherwise keep that call's context (and through it the connection) alive for its whole delay.
BARE_CONTEXT = contextvars.Context()


class FlowGate:
    """An awaitable gate for a sender (transport write buffer, stream credit)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._event.set()

    @property
    def is_open(self) -> bool:
        return self._event.is_set()

    def open(self) -> None:
        self._event.set()

    def close(self) -> None:
        self._event.clear()

    async def wait(self) -> None:
        await self._event.wait()


class ShellProtocol(asyncio.Protocol):
    """Handshake, then records, then the connection core. Subclasses handle the events."""

    handshake_timeout = 10.0

    def __init__(self, conn: Connection, handshake: Any, attester: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.conn = conn
        self.handshake: Any = handshake
        self.session: Session | None = None
        self.attester = attester
        self.transport: asyncio.Transport | None = None
        self.peer_address = "?"
        self.peer_claims: Any = None
        self.channel_binding = b""
        self.mode = ""
        self.closed = False
        self.write_gate = FlowGate()
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self._flush_handle: asyncio.Handle | None = None
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._pending_input: list[bytes] = []
        self.unflushed = 0  # answers queued since the last write (see server._EARLY_FLUSH_*)
        self._attesting = False
        # The transport ended before the handshake did (reset, server restarting): no verdict on
        # the peer was reached, so a client may try again with a fresh handshake.
        self.lost_in_handshake = False

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit asyncio.Transport; they implement its interface.
        self.transport = typing.cast(asyncio.Transport, transport)
        transport = self.transport
        peer = transport.get_extra_info("peername")
        self.peer_address = str(peer) if peer else str(transport.get_extra_info("sockname"))
        from vrpc.transport.vsock import peer_address

        # On uvloop's AF_UNIX route for vsock, peername is a mangled path: ask the kernel.
        vsock_peer = peer_address(transport)
        if vsock_peer is not None:
            self.peer_address = f"vsock://{vsock_peer[0]}:{vsock_peer[1]}"
        # Bulk transfers stall at the default 64 KiB high-water mark: raise it.
        transport.set_write_buffer_limits(high=4 * 1024 * 1024, low=1024 * 1024)
        self._handshake_timer = self.loop.call_later(
            self.handshake_timeout, self._on_handshake_timeout, context=BARE_CONTEXT
        )
        self.on_connection_made()
        self._flush_handshake()

    def on_connection_made(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.session is None:
            if self._attesting:
                self._pending_input.append(data)
                return
            self._handshake_input(data)
            return
        try:
            plain = self.session.receive(data)
            if plain:
                events = self.conn.receive_data(plain, monotonic())
                if events:
                    self.handle_events(events)
            if self.session.peer_closed:
                self.abort(None, "peer closed the session")
                return
        except RemoteProtocolError as exc:
            self.abort(exc, "protocol violation")
            return
        except RecursionError:
            # msgspec refuses deeply nested input with RecursionError, not DecodeError.
            self.abort(RemoteProtocolError("message nested too deeply"), "protocol violation")
            return
        self.schedule_flush()
        self.arm_timer()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        was_closed = self.closed
        self.closed = True
        self.write_gate.open()
        if not self.ready.done():
            self.lost_in_handshake = True
            self.ready.set_exception(
                HandshakeError("the connection closed during the handshake")
                if exc is None
                else HandshakeError(f"the connection failed during the handshake: {exc}")
            )
            self.ready.exception()  # the awaiting side may already be gone
        truncated = False
        if self.session is not None and not self.session.peer_closed and not was_closed:
            try:
                self.session.eof_received()
            except RemoteProtocolError:
                truncated = True
        events = self.conn.fail_all(Status.UNAVAILABLE, "connection lost")
        self.handle_events(events)
        self.on_connection_lost(exc, truncated)

    def on_connection_lost(self, exc: Exception | None, truncated: bool) -> None:
        pass

    def pause_writing(self) -> None:
        self.write_gate.close()

    def resume_writing(self) -> None:
        self.write_gate.open()

    # ------------------------------------------------------------------ handshake

    def _handshake_input(self, data: bytes) -> None:
        try:
            events = self.handshake.receive_data(data, time.time())
        except (HandshakeError, AttestationError, RemoteProtocolError) as exc:
            self.handshake_failed(exc)
            return
        self._handshake_events(events)

    def _handshake_events(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, NeedAttestation):
                self._attest(ev)
                return
            if isinstance(ev, HandshakeComplete):
                self._flush_handshake()
                self._complete(ev)
                return
        self._flush_handshake()

    def _attest(self, need: NeedAttestation) -> None:
        if self.attester is None:
            self.handshake_failed(HandshakeError("the peer requires attestation; no attester"))
            return
        if getattr(self.attester, "insecure", True):
            # The test attester signs in microseconds: no thread hop.
            try:
                document = self.attester.attest(
                    user_data=need.user_data, nonce=need.nonce, public_key=need.public_key
                )
            except Exception as exc:
                self.handshake_failed(HandshakeError(f"attestation failed: {exc}"))
                return
            self._attested(document)
            return
        # /dev/nsm is a blocking ioctl: keep the loop responsive for other connections.
        self._attesting = True
        fut = self.loop.run_in_executor(
            None,
            lambda: self.attester.attest(
                user_data=need.user_data, nonce=need.nonce, public_key=need.public_key
            ),
        )
        fut.add_done_callback(self._attest_done)

    def _attest_done(self, fut: asyncio.Future[bytes]) -> None:
        self._attesting = False
        if self.closed:
            return
        exc = fut.exception()
        if exc is not None:
            self.handshake_failed(HandshakeError(f"attestation failed: {exc}"))
            return
        self._attested(fut.result())
        pending, self._pending_input = self._pending_input, []
        for data in pending:
            self.data_received(data)  # a no-op once the connection is closed

    def _attested(self, document: bytes) -> None:
        try:
            self.handshake.supply_attestation(document)
            events = self.handshake.receive_data(b"", time.time())
        except (HandshakeError, AttestationError, RemoteProtocolError) as exc:
            self.handshake_failed(exc)
            return
        self._flush_handshake()
        self._handshake_events(events)

    def _flush_handshake(self) -> None:
        if self.handshake is None or self.transport is None or self.closed:
            return
        data = self.handshake.data_to_send()
        if data:
            self.transport.write(data)

    def _complete(self, done: HandshakeComplete) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.session = done.session
        self.peer_claims = done.peer_claims
        self.channel_binding = getattr(done.session, "channel_binding", b"")
        self.mode = done.mode
        self.handshake = None
        self.conn.start_clock(monotonic())
        # Idle and keepalive timing must run even if no call ever arrives on this connection.
        self.arm_timer()
        self.on_established()
        if not self.ready.done():
            self.ready.set_result(None)
        if done.trailing:
            self.data_received(done.trailing)

    def on_established(self) -> None:
        pass

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.session is None and not self.closed:
            self.handshake_failed(HandshakeError("handshake timed out"))

    def handshake_failed(self, exc: Exception) -> None:
        log.warning(
            "handshake failed",
            peer=self.peer_address,
            reason=str(exc),
            error=type(exc).__name__,
        )
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()
        # The handshake queues a one-byte alert (e.g. "mode refused") so the peer learns why;
        # close() (not abort) lets it leave before the socket closes.
        alert = b""
        if self.handshake is not None:
            try:
                alert = self.handshake.data_to_send()
            except Exception:
                alert = b""
        if self.transport is not None and not self.transport.is_closing():
            if alert:
                self.transport.write(alert)
            self.transport.close()
        self.closed = True

    # ------------------------------------------------------------------ output

    def schedule_flush(self) -> None:
        if self._flush_handle is None and not self.closed:
            self._flush_handle = self.loop.call_soon(self.flush, context=BARE_CONTEXT)

    def flush(self) -> None:
        self._flush_handle = None
        self.unflushed = 0
        if self.closed or self.session is None or self.transport is None:
            return
        out = self.conn.data_to_send()
        if out is None:
            return
        records = self.session.seal(out)
        if len(records) == 1:
            self.transport.write(records[0])
        else:
            self.transport.writelines(records)

    def arm_timer(self) -> None:
        when = self.conn.get_timer()
        if when is None or when == self._timer_at:
            return
        if self._timer_handle is not None:
            if self._timer_at is not None and self._timer_at <= when:
                return  # the earlier timer re-arms when it fires
            self._timer_handle.cancel()
        self._timer_at = when
        self._timer_handle = self.loop.call_later(
            max(0.0, when - monotonic()), self._on_timer, context=BARE_CONTEXT
        )

    def _on_timer(self) -> None:
        self._timer_handle = None
        self._timer_at = None
        if self.closed:
            return
        events = self.conn.handle_timer(monotonic())
        if events:
            self.handle_events(events)
        self.schedule_flush()
        self.arm_timer()

    # ------------------------------------------------------------------ closing

    def close_gracefully(self) -> None:
        """Send what is queued, then the authenticated close, then close the transport."""
        if self.closed or self.transport is None:
            return
        if self.session is not None:
            self.flush()
            try:
                self.transport.write(self.session.close())
            except Exception:  # the session may already have failed
                pass
        self.closed = True
        self.transport.close()

    def abort(self, exc: BaseException | None, reason: str) -> None:
        if exc is not None:
            log.warning("closing connection", peer=self.peer_address, reason=reason, error=str(exc))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        self.closed = True

    def handle_events(self, events: list[Event]) -> None:
        raise NotImplementedError
