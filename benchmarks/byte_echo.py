"""The second ceiling: a pure byte echo. No frames, no futures, no per-call Python objects.

The server writes back whatever it reads. The client keeps ``inflight`` payloads' worth of bytes
outstanding: each time bytes come back it counts how many whole payloads have returned and sends
that many more, in one write. A "call" is one payload's worth of bytes returned. What remains is
the event loop's callback and the kernel's socket copies: the most this loop and this kernel can
move over one connection, and the distance from raw-echo to it is what framing and per-call
futures cost.

The client has no per-call latency (it never tells one call's bytes from another's).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from benchmarks._base import Closer, connect, listen

# Below this size several payloads are joined into one write; above it each goes as it is.
_JOIN_BELOW = 64 * 1024


class _ServerProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: cast, do not check.
        self.write = cast(asyncio.Transport, transport).write

    def data_received(self, data: bytes) -> None:
        self.write(data)


class _PumpProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.payload = b""
        self.inflight = 0
        self.sent = 0  # payloads sent
        self.received = 0  # bytes received
        self.stopping = False
        self.done: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection lost"))
        if not self.lost.done():
            self.lost.set_result(None)

    def _send(self, count: int) -> None:
        assert self.transport is not None
        self.sent += count
        if len(self.payload) < _JOIN_BELOW:
            self.transport.write(self.payload * count)
        else:
            for _ in range(count):
                self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        size = len(self.payload)
        if self.stopping:
            done = self.done
            if self.received >= self.sent * size and done is not None and not done.done():
                done.set_result(None)
            return
        more = self.received // size + self.inflight - self.sent
        if more > 0:
            self._send(more)

    async def once(self, payload: bytes) -> int:
        """Send ``payload`` once and wait for as many bytes back; return the bytes received."""
        self.payload, self.inflight = payload, 0
        self.sent = self.received = 0
        self.stopping = True  # nothing more is sent: wait for the one payload to return
        self.done = done = asyncio.get_running_loop().create_future()
        self._send(1)
        await done
        return self.received

    async def pump(self, payload: bytes, inflight: int, duration: float) -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        self.payload, self.inflight = payload, inflight
        self.sent = self.received = 0
        self.stopping = False
        self.done = done = loop.create_future()

        def stop() -> None:
            self.stopping = True
            if self.received >= self.sent * len(payload) and not done.done():
                done.set_result(None)

        t0 = time.perf_counter()
        self._send(inflight)
        handle = loop.call_later(duration, stop)
        try:
            await done
        finally:
            handle.cancel()
        return self.received // len(payload), time.perf_counter() - t0


class ByteClient:
    def __init__(self, transport: asyncio.Transport, protocol: _PumpProtocol) -> None:
        self.transport = transport
        self.protocol = protocol

    async def pump(self, payload: bytes, inflight: int, duration: float) -> tuple[int, float]:
        """Keep ``inflight`` payloads outstanding for ``duration`` s, then drain; return the
        payloads echoed and the seconds taken."""
        return await self.protocol.pump(payload, inflight, duration)

    async def echo(self, payload: bytes) -> bytes:
        """One payload there and back: a check of the byte count (the content is the server's
        own echo), not what is measured."""
        received = await self.protocol.once(payload)
        if received != len(payload):
            raise AssertionError(f"byte-echo: {received} bytes came back for {len(payload)}")
        return payload

    async def stream(self, size: int, count: int) -> int:
        raise NotImplementedError("byte-echo has no streams")

    async def close(self) -> None:
        self.transport.close()
        await self.protocol.lost


async def start_server(address: str) -> Closer:
    return await listen(address, _ServerProtocol)


async def open_client(address: str) -> Any:
    transport, protocol = await connect(address, _PumpProtocol)
    return ByteClient(transport, protocol)


__all__ = ["ByteClient", "open_client", "start_server"]
