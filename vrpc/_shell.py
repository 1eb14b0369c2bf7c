"""What the server and client asyncio shells share: an ``asyncio.Protocol`` that moves bytes
between a transport and a sans-IO ``Endpoint``, arms the endpoint's one timer, runs attestation
off the loop and coalesces writes. Nothing protocol-shaped lives here (``vrpc/proto/endpoint.py``
owns it); subclasses map the endpoint's events to futures and tasks.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import typing
from typing import Any

import structlog

from vrpc._flow import FlowGate
from vrpc.proto.endpoint import Endpoint
from vrpc.proto.events import AttestationRequested, ConnectionClosed, EndpointEvent
from vrpc.transport import describe_peer

log = structlog.get_logger("vrpc")

monotonic = time.monotonic

# Internal callbacks (flushes, protocol timers) run in this empty context, not in whatever
# context happened to schedule them: a keepalive timer armed from inside a handler would
# otherwise keep that call's context (and through it the connection) alive for its whole delay.
BARE_CONTEXT = contextvars.Context()


class EndpointProtocol(asyncio.Protocol):
    """One connection's shell. Subclasses build the endpoint and ``dispatch`` its events."""

    endpoint: Endpoint

    def __init__(self, attester: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.attester = attester
        self.transport: asyncio.Transport | None = None
        self.peer_address = "?"
        self.closed = False  # the endpoint reached ConnectionClosed
        self.write_gate = FlowGate()
        self._flush_handle: asyncio.Handle | None = None
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.closed_by: ConnectionClosed | None = None  # how the connection ended
        # Resolved once the connection is over (closed by the endpoint or lost): what a close
        # awaits, instead of polling.
        self.gone: asyncio.Future[None] = self.loop.create_future()

    def make_endpoint(self, now: float, wall_clock: float) -> Endpoint:
        raise NotImplementedError

    def dispatch(self, events: list[EndpointEvent]) -> None:
        raise NotImplementedError

    def on_connection_made(self) -> None:
        pass

    # A subclass that accounts for the input a connection holds (the server's memory budget)
    # sets ``tracks_input``; ``input_held`` then hears of every change of the amount after a
    # read. Checked here rather than in an override: it runs on every read.
    tracks_input = False
    held_input = 0

    def input_held(self, held: int) -> None:
        self.held_input = held

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit asyncio.Transport; they implement its interface.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.peer_address = describe_peer(transport)
        # Bulk transfers stall at the default 64 KiB high-water mark: raise it.
        self.transport.set_write_buffer_limits(high=4 * 1024 * 1024, low=1024 * 1024)
        self.endpoint = self.make_endpoint(monotonic(), time.time())
        self.on_connection_made()
        self.flush()
        self.arm_timer()

    def data_received(self, data: bytes) -> None:
        endpoint = self.endpoint
        events = endpoint.receive_data(data, monotonic())
        if events:
            self.dispatch(events)
        if self.tracks_input:
            held = 0 if self.closed else endpoint.buffered_input
            if held != self.held_input:
                self.input_held(held)
        if endpoint.wants_write:
            self.schedule_flush()
        if endpoint.timer_changed:
            self.arm_timer()

    def eof_received(self) -> bool:
        self.after(self.endpoint.eof_received(monotonic()))
        return False  # asyncio closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection lost"
        events = self.endpoint.connection_lost(monotonic(), reason)
        if events:
            self.dispatch(events)
        self._cancel_callbacks()
        self.write_gate.open()
        if not self.gone.done():
            self.gone.set_result(None)

    def pause_writing(self) -> None:
        self.write_gate.close()

    def resume_writing(self) -> None:
        self.write_gate.open()

    # ------------------------------------------------------------------ driving the endpoint

    def after(self, events: list[EndpointEvent]) -> None:
        """Dispatch events an endpoint call returned, send what it produced, re-arm the timer."""
        if events:
            self.dispatch(events)
        self.flush()
        self.arm_timer()

    def attest(self, need: AttestationRequested) -> None:
        """Produce this side's attestation document. An attester that declares
        ``attests_inline = True`` (microseconds, no device) runs on the loop; any other runs in
        a thread, since /dev/nsm is a blocking ioctl and the loop serves other connections."""
        attester = self.attester
        if attester is None:
            self.after(self.endpoint.attestation_failed("no attester", monotonic()))
            return

        def produce() -> bytes:
            document: bytes = attester.attest(
                user_data=need.user_data, nonce=need.nonce, public_key=need.public_key
            )
            return document

        if getattr(attester, "attests_inline", False):
            try:
                document = produce()
            except Exception as exc:
                self.after(self.endpoint.attestation_failed(repr(exc), monotonic()))
                return
            self.after(self.endpoint.supply_attestation(document, monotonic()))
            return
        self.run_attester(produce)

    def run_attester(self, produce: typing.Callable[[], bytes]) -> None:
        """Run a blocking attester in a thread; the server overrides this to bound how many
        run at once."""
        future = self.loop.run_in_executor(None, produce)
        future.add_done_callback(self._attested)

    def _attested(self, future: asyncio.Future[bytes]) -> None:
        exc = future.exception()
        if self.closed:
            return  # the connection ended meanwhile (deadline, peer gone): nothing to supply
        if exc is not None:
            self.after(self.endpoint.attestation_failed(repr(exc), monotonic()))
        else:
            self.after(self.endpoint.supply_attestation(future.result(), monotonic()))

    def connection_closed(self, ev: ConnectionClosed) -> None:
        """The endpoint is done: send its last bytes (an ALERT, our CLOSE), close the transport."""
        self.closed = True
        self.closed_by = ev
        self.write_gate.open()
        if not self.gone.done():
            self.gone.set_result(None)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            out = self.endpoint.data_to_send()
            if out:
                transport.writelines(out)
            transport.close()
        self._cancel_callbacks()

    def _cancel_callbacks(self) -> None:
        for handle in (self._flush_handle, self._timer_handle):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._timer_handle = None
        self._timer_at = None

    # ------------------------------------------------------------------ output

    def schedule_flush(self) -> None:
        if self._flush_handle is None and not self.closed:
            self._flush_handle = self.loop.call_soon(self.flush, context=BARE_CONTEXT)

    def flush_now(self) -> None:
        """Write at once what is queued (e.g. the only call in flight: nothing else will join
        this write, so waiting a loop turn would only add latency)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.flush()

    def flush(self) -> None:
        self._flush_handle = None
        if self.closed or self.transport is None:
            return
        out = self.endpoint.data_to_send()
        if out:
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)

    def arm_timer(self) -> None:
        if self.closed:
            return
        when = self.endpoint.get_timer()
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
        if not self.closed:
            self.after(self.endpoint.handle_timer(monotonic()))

    # ------------------------------------------------------------------ closing

    def close_gracefully(self, reason: str = "") -> None:
        """Queued bytes leave, then our CLOSE; the transport closes when the peer answers."""
        if not self.closed:
            self.after(self.endpoint.close(monotonic(), reason))

    def abort(self) -> None:
        """Drop the connection at once (no CLOSE): for tests of truncation and lost peers."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
