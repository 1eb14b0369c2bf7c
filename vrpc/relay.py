"""An opaque byte relay for the parent instance: remote clients reach an enclave through it.

The relay never sees plaintext: the session is end-to-end between the client and the enclave
(attested handshake, AEAD records), so the relay is just another untrusted hop that copies bytes
both ways. Each accepted connection gets its own upstream connection; when either side closes,
the other side is closed after what was already received has been written. Backpressure: a side
whose peer cannot keep up stops being read (``pause_reading``) until the peer's buffer drains.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from vrpc.exceptions import ConnectError
from vrpc.transport import Listener, create_connection, create_server

__all__ = ["Relay"]

log = structlog.get_logger("vrpc.relay")

_HIGH_WATER = 1024 * 1024


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection; forwards everything to ``peer``."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: Any = None
        self.peer: _Pipe | None = None
        self.early: list[bytes] = []
        self.closed = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.relay.bytes_relayed += len(data)
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)  # upstream still connecting
            return
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            # Upstream still connecting: keep what arrived and pass the EOF on once it is up.
            return True
        if peer.eof:
            # Both directions have ended: nothing more can flow, release both sides (a half-closed
            # pair would otherwise stay open forever, holding two descriptors).
            peer.transport.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True  # keep our write side open for the answer
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.close()
        self.relay._pipe_closed(self)

    # Our peer's writes pile up in *our* transport: stop reading the peer until they drain.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Relay:
    """``Relay(listen, to)``; ``await relay.start()``; ``await relay.close()``."""

    def __init__(self, listen: str, to: str, *, max_connections: int = 4096) -> None:
        self.listen = listen
        self.to = to
        self.max_connections = max_connections
        self.bytes_relayed = 0
        self.connections = 0
        self._listener: Listener | None = None
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._listener = await create_server(self.listen, self._accept)
        log.info("relay listening", listen=self.listen, to=self.to)

    def _accept(self) -> _Pipe:
        downstream = _Pipe(self)
        self._pipes.add(downstream)
        if len(self._pipes) > 2 * self.max_connections:
            log.warning("relay connection refused", reason="connection limit")
            loop = asyncio.get_running_loop()
            loop.call_soon(lambda: downstream.transport and downstream.transport.abort())
            return downstream
        task = asyncio.get_running_loop().create_task(self._connect_upstream(downstream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return downstream

    async def _connect_upstream(self, downstream: _Pipe) -> None:
        await asyncio.sleep(0)  # let connection_made run first
        upstream = _Pipe(self)
        try:
            await create_connection(self.to, lambda: upstream)
        except ConnectError as exc:
            log.warning("relay upstream unreachable", to=self.to, reason=str(exc))
            if downstream.transport is not None:
                downstream.transport.close()
            return
        if downstream.closed:
            upstream.transport.close()
            return
        self._pipes.add(upstream)
        self.connections += 1
        upstream.peer, downstream.peer = downstream, upstream
        for chunk in downstream.early:
            upstream.transport.write(chunk)
        downstream.early.clear()
        if downstream.eof and upstream.transport.can_write_eof():
            upstream.transport.write_eof()

    def _pipe_closed(self, pipe: _Pipe) -> None:
        self._pipes.discard(pipe)

    @property
    def active_pipes(self) -> int:
        return len(self._pipes)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        for pipe in list(self._pipes):
            if pipe.transport is not None:
                pipe.transport.close()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.wait_closed()
        await asyncio.sleep(0)
